"""lora-extract: PEFT loads the adapter; full rank gives the fine-tune back; rank r costs
exactly the truncated-SVD error."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import dir_tensors

from compressor.store import open_store


def _extract(run, models, rank, name="lx"):
    base, ft = models["base-fp32"], models["ft1-fp32"]
    r = run("apply", "-p", "lora-extract", "--base", base, ft, "-o", "rank", str(rank), "-n", name)
    assert r.exit_code == 0, r.output
    return base, ft


def test_full_rank_adapter_loads_in_peft_and_reproduces_the_finetune(run, models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, ft = _extract(run, models, rank=64)  # 64 = the smaller side of every linear
    assert run("export", "lx", tmp_path / "adapter").exit_code == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 64 and "model.layers.0.self_attn.q_proj" in config["target_modules"]
    assert "model.embed_tokens" in config["modules_to_save"]
    assert not (tmp_path / "adapter" / "config.json").exists()
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter"
    )
    merged = model.merge_and_unload().state_dict()
    want = dir_tensors(ft)
    for name, tensor in want.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=2e-6, msg=name)


@pytest.mark.parametrize("rank", [4, 16])
def test_rank_r_error_is_the_truncated_svd_error(run, models, rank):
    base, ft = _extract(run, models, rank=rank)
    b, f = dir_tensors(base), dir_tensors(ft)
    store = open_store()
    try:
        record = store.resolve("lx")
        files = {rel: p for rel, p in store.files(record.id).items()}
    finally:
        store.close()
    from safetensors.torch import load_file

    adapter = load_file(files["adapter_model.safetensors"])
    name = "model.layers.1.mlp.down_proj"
    a = adapter[f"base_model.model.{name}.lora_A.weight"]
    bb = adapter[f"base_model.model.{name}.lora_B.weight"]
    assert a.shape == (rank, 128) and bb.shape == (64, rank)
    delta = f[f"{name}.weight"] - b[f"{name}.weight"]
    s = torch.linalg.svdvals(delta.double())
    err = torch.linalg.matrix_norm(delta.double() - (bb @ a).double())
    torch.testing.assert_close(err, s[rank:].square().sum().sqrt(), rtol=1e-4, atol=1e-7)
    assert record.metrics["modules"] == 14  # 7 linears in each of the 2 layers
