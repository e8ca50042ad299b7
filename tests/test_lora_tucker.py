"""Joint Tucker-2 compression of LoRA adapters: exactness, optimality, PEFT round trip, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_refused

from compressor.demo.models import save_random_lora


def _adapter(base: Path, out: Path, seed: int, targets=("q_proj", "v_proj", "down_proj"), r=4):
    return save_random_lora(base, out, seed, targets, r, std=0.1, factors="lora_")


def _deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW = B·A·alpha/r per module, from the files, in float64 (independent of our reader)."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    t = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for k, a in t.items():
        if ".lora_A." in k:
            b = t[k.replace(".lora_A.", ".lora_B.")]
            out[k.replace(".lora_A.weight", "")] = (
                b.double() @ a.double() * cfg["lora_alpha"] / cfg["r"]
            )
    return out


@pytest.fixture(scope="module")
def adapters(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [_adapter(models["base-fp32"], root / f"a{i}", seed=10 + i) for i in range(3)]


def _compress(run, adapters, *options, name="joint"):
    r = run("--quiet", "apply", "-p", "lora-tucker", *adapters, *options, "-n", name)
    assert r.exit_code == 0, r.output
    return json.loads(run("store", "show", name, "--json").stdout)


def _merge(run, base, *experts, name):
    r = run("--quiet", "merge", "-p", "task-arithmetic", "--base", base, *experts, "-n", name)
    assert r.exit_code == 0, r.output


def _export(run, name, out):
    r = run("--quiet", "export", name, out)
    assert r.exit_code == 0, r.output
    return out


def test_full_rank_is_exact_and_peft_loads_every_adapter(run, adapters, models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rec = _compress(run, adapters, "-o", "rank", "14")  # 3 adapters × rank 4 = 12: nothing lost
    assert rec["metrics"]["rel_error"] < 1e-6
    out = _export(run, "joint", tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["1", "2", "3"]
    for k, original in enumerate(adapters, start=1):
        want = _deltas(original)
        got = _deltas(out / str(k))
        assert json.loads((out / str(k) / "adapter_config.json").read_text())["r"] == 14  # padded
        for name, d in want.items():
            torch.testing.assert_close(got[name], d, rtol=0, atol=1e-5)
        # PEFT loads it on the base and merges it into the same weights as the original
        base = AutoModelForCausalLM.from_pretrained(models["base-fp32"])
        merged = PeftModel.from_pretrained(base, out / str(k)).merge_and_unload().state_dict()
        base = AutoModelForCausalLM.from_pretrained(models["base-fp32"])
        ref = PeftModel.from_pretrained(base, original).merge_and_unload().state_dict()
        for n, t in ref.items():
            torch.testing.assert_close(merged[n], t, rtol=0, atol=1e-5)


def test_shared_factors_are_the_best_tucker2_of_the_stack(run, adapters, tmp_path):
    """At rank 4 the error is what the dense Tucker-2 (HOOI on the stacked ΔW) reaches."""
    rec = _compress(run, adapters, "-o", "rank", "4", "-o", "iterations", "20")
    out = _export(run, "joint", tmp_path / "out")
    wants = [_deltas(a) for a in adapters]
    gots = [_deltas(out / str(k)) for k in (1, 2, 3)]
    err2 = norm2 = 0.0
    for module in wants[0]:
        stack = [w[module] for w in wants]
        # independent: HOOI on the dense stack, 50 sweeps from the HOSVD
        u = torch.linalg.eigh(sum(d @ d.T for d in stack))[1][:, -4:]
        v = torch.linalg.eigh(sum(d.T @ d for d in stack))[1][:, -4:]
        for _ in range(50):
            u = torch.linalg.eigh(sum(d @ v @ v.T @ d.T for d in stack))[1][:, -4:]
            v = torch.linalg.eigh(sum(d.T @ u @ u.T @ d for d in stack))[1][:, -4:]
        best = sum(float((d - u @ u.T @ d @ v @ v.T).square().sum()) for d in stack)
        ours = sum(float((g[module] - d).square().sum()) for g, d in zip(gots, stack, strict=True))
        assert ours <= best * 1.02 + 1e-9, module
        err2 += ours
        norm2 += sum(float(d.square().sum()) for d in stack)
    assert rec["metrics"]["rel_error"] == pytest.approx((err2 / norm2) ** 0.5, rel=1e-3)
    # bytes: per module U and V (shared) and one 4×4 core per adapter, float32
    assert rec["metrics"]["bytes"] < rec["metrics"]["source_bytes"]


def test_one_adapter_shares_factors_across_layers(run, adapters, models, tmp_path):
    rec = _compress(run, adapters[:1], "-o", "rank", "4", name="one")
    assert rec["manifest"]["share"] == "layers"
    assert len(rec["manifest"]["groups"]) == 3  # q_proj, v_proj, down_proj across 2 layers
    # a single adapter decodes as an adapter: eval, export and merges take it as it is
    _merge(run, models["base-fp32"], "one", name="m")


def test_bad_inputs(run, private_store, adapters, models, tmp_path):
    other = _adapter(models["base-fp32"], tmp_path / "other", seed=3, targets=("q_proj",))
    assert_refused(
        run,
        private_store,
        ["apply", "-p", "lora-tucker", adapters[0], other],
        f"{other} and {adapters[0]} adapt different modules "
        "(e.g. 'model.layers.0.mlp.down_proj.weight'); "
        "joint compression needs the same target modules",
    )
    from compressor.demo.models import save_tiny_llama

    wide = save_tiny_llama(tmp_path / "wide", hidden=32)
    wide_adapter = _adapter(wide, tmp_path / "wide-adapter", seed=4)
    assert_refused(
        run,
        private_store,
        ["apply", "-p", "lora-tucker", adapters[0], wide_adapter],
        "'model.layers.0.mlp.down_proj.weight' has shape [32, 64] in "
        f"{wide_adapter} and [64, 128] in {adapters[0]}: the adapters are for different base models",
    )
    assert_refused(
        run,
        private_store,
        ["apply", "-p", "lora-tucker", models["base-fp32"]],
        f"{models['base-fp32']} is not a PEFT LoRA adapter; lora-tucker takes adapters",
    )
    _compress(run, adapters, name="joint")
    assert_refused(
        run,
        private_store,
        ["merge", "-p", "task-arithmetic", "--base", models["base-fp32"], "joint"],
        "joint@1 holds 3 adapters compressed together; name one as joint@1#1 … joint@1#3 "
        "(compress export writes them all)",
    )
    assert_refused(
        run,
        private_store,
        ["export", "joint#4", tmp_path / "x"],
        "joint@1 holds adapters #1 … #3; there is no #4",
    )


def test_each_adapter_of_a_joint_artifact_is_an_expert(run, adapters, models, tmp_path):
    from conftest import artifact_tensors

    _compress(run, adapters, "-o", "rank", "4")
    out = _export(run, "joint", tmp_path / "out")
    base = models["base-fp32"]
    _merge(run, base, "joint#1", "joint#3", name="from-refs")
    _merge(run, base, out / "1", out / "3", name="from-dirs")
    a, b = artifact_tensors("from-refs"), artifact_tensors("from-dirs")
    for name, t in a.items():
        torch.testing.assert_close(t, b[name], rtol=0, atol=1e-6)
    # an evaluation of one adapter is recorded under its own key on the joint artifact
    data = tmp_path / "zen.txt"
    from compressor.demo.models import zen_lines

    data.write_text("\n".join(zen_lines()) + "\n")
    r = run("--quiet", "eval", "joint#2", "--base", base, "-o", "data", data)
    assert r.exit_code == 0, r.output
    metrics = json.loads(run("store", "show", "joint", "--json").stdout)["metrics"]
    assert "perplexity:zen#2" in metrics
