"""task-arithmetic against mergekit's task_arithmetic, and with PEFT adapters as experts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import artifact_tensors, dir_tensors
from safetensors.torch import load_file


@pytest.mark.parametrize(
    "options, weights, lam",
    [((), [1.0, 1.0], 1.0), (("-o", "scale", "0.7", "-o", "weights", "0.3,1.2"), [0.3, 1.2], 0.7)],
)
def test_matches_mergekit(run, models, options, weights, lam):
    from mergekit.merge_methods.api import merge_state_dicts

    base, e1, e2 = models["base-fp32"], models["ft1-fp32"], models["ft2-fp32"]
    r = run("merge", "-p", "task-arithmetic", "--base", base, e1, e2, *options, "-n", "m", "--json")
    assert r.exit_code == 0, r.output
    ours = artifact_tensors("m")
    theirs = merge_state_dicts(
        {"base": dir_tensors(base), "e1": dir_tensors(e1), "e2": dir_tensors(e2)},
        "task_arithmetic",
        base="base",
        parameters={
            "weight": {"base": 0.0, "e1": weights[0], "e2": weights[1]},
            "lambda": lam,
            "normalize": False,
        },
    )
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6)


def test_task_vectors_and_models_mix(run, models):
    base, e1, e2 = models["base-fp32"], models["ft1-fp32"], models["ft2-fp32"]
    assert run("apply", "-p", "task-vector", "--base", base, e1, "-n", "tv1").exit_code == 0
    assert (
        run("merge", "-p", "task-arithmetic", "--base", base, "tv1", e2, "-n", "a").exit_code == 0
    )
    assert run("merge", "-p", "task-arithmetic", "--base", base, e1, e2, "-n", "b").exit_code == 0
    a, b = artifact_tensors("a"), artifact_tensors("b")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_weights_count_must_match(run, models):
    base, e1, e2 = models["base-fp32"], models["ft1-fp32"], models["ft2-fp32"]
    r = run("merge", "-p", "task-arithmetic", "--base", base, e1, e2, "-o", "weights", "1,2,3")
    assert r.exit_code == 2
    assert r.output.strip() == "Error: option 'weights' has 3 values for 2 experts"


def test_adapter_as_expert_matches_peft_merge(run, models, lora):
    adapter, expected = lora
    base = models["base-fp32"]
    r = run("merge", "-p", "task-arithmetic", "--base", base, adapter, "-n", "m")
    assert r.exit_code == 0, r.output
    ours = artifact_tensors("m")
    for name, t in ours.items():
        torch.testing.assert_close(t, expected[name], rtol=0, atol=1e-6, msg=name)


def test_adapter_delta_and_export(run, models, lora, tmp_path):
    adapter, expected = lora
    base = models["base-fp32"]
    r = run("apply", "-p", "task-vector", "--base", base, adapter, "-n", "lora-tv", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["content"] == "delta"
    out = tmp_path / "merged"
    assert run("export", "lora-tv", out, "--base", base).exit_code == 0
    assert not (out / "adapter_config.json").exists()
    got = dir_tensors(out)
    for name, t in got.items():
        torch.testing.assert_close(t, expected[name], rtol=0, atol=1e-6, msg=name)


def test_adapter_import_and_export_as_adapter(run, lora, tmp_path):
    adapter, _ = lora
    assert run("store", "import", adapter, "-n", "ad").exit_code == 0
    out = tmp_path / "ad-out"
    assert run("export", "ad", out).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            p.name
            for p in adapter.iterdir()
            if p.name in ("adapter_config.json", "adapter_model.safetensors", "README.md")
        ]
        + ["compressor.json"]
    )
    assert (
        load_file(out / "adapter_model.safetensors").keys()
        == load_file(adapter / "adapter_model.safetensors").keys()
    )
