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


def _biased_pair(tmp_path, kind: str):
    """A tiny BERT or GPT-2 (linears with biases) and a full fine-tune of it: every linear's
    weight moved by a rank-2 Δ, every linear's bias moved, and one LayerNorm changed."""
    import transformers

    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=48,
            max_position_embeddings=32,
        )
        model = transformers.BertModel(config)
    else:
        config = transformers.GPT2Config(
            vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32
        )
        model = transformers.GPT2Model(config)
    model.save_pretrained(tmp_path / "base")
    names = {n for n, m in model.named_modules() if hasattr(m, "weight") and m.weight.dim() == 2}
    with torch.no_grad():
        for name, module in model.named_modules():
            if name not in names or "embed" in name or name in ("wte", "wpe"):
                continue
            w = module.weight
            w += 0.05 * torch.randn(w.shape[0], 2) @ torch.randn(2, w.shape[1])
            if getattr(module, "bias", None) is not None:
                module.bias += 0.05 * torch.randn_like(module.bias)
        norm = model.encoder.layer[0].output.LayerNorm if kind == "bert" else model.h[0].ln_1
        norm.weight += 0.1
    model.save_pretrained(tmp_path / "ft")
    return tmp_path / "base", tmp_path / "ft"


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_linears_with_biases_extract_to_factors_that_peft_loads(run, tmp_path, kind):
    """A full fine-tune of a model whose linears have biases put every linear in
    modules_to_save (lora_params=0, modules=0) and PEFT could not load the adapter."""
    import transformers
    from peft import PeftModel

    base, ft = _biased_pair(tmp_path, kind)
    args = ["apply", "-p", "lora-extract", "--base", base, ft, "-o", "rank", "2", "--json"]
    r = run("--quiet", *args, "-n", "lx")
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout)["metrics"]
    norm = "encoder.layer.0.output.LayerNorm" if kind == "bert" else "h.0.ln_1"
    assert "1 module(s) changed where LoRA factors cannot hold the change" in r.stderr
    assert f"modules_to_save: {norm}" in r.stderr
    linears = 2 * (6 if kind == "bert" else 4) + (1 if kind == "bert" else 0)  # + BERT's pooler
    assert metrics["modules"] == linears and metrics["modules_to_save"] == 1
    assert metrics["max_rel_error"] < 1e-5  # rank-2 Δ at rank 2: nothing truncated
    assert run("--quiet", "export", "lx", tmp_path / "adapter").exit_code == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and config["modules_to_save"] == [norm]
    auto = transformers.AutoModel
    peft_model = PeftModel.from_pretrained(auto.from_pretrained(base), tmp_path / "adapter")
    tuned = auto.from_pretrained(ft).eval()
    ids = torch.randint(0, 64, (3, 12))
    with torch.no_grad():
        got = peft_model.eval()(input_ids=ids).last_hidden_state
        want = tuned(input_ids=ids).last_hidden_state
        untouched = auto.from_pretrained(base).eval()(input_ids=ids).last_hidden_state
    assert (want - untouched).abs().max() > 0.05
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    # our own reader takes the bias back: the adapter on the base is the fine-tune
    out = tmp_path / "again"
    assert run("--quiet", "export", "lx", out, "--base", base).exit_code == 0
    again, want_tensors = dir_tensors(out), dir_tensors(ft)
    for name, tensor in want_tensors.items():
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=1e-5, msg=name)
