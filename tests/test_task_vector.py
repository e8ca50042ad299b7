"""task-vector then export --base gives the fine-tune back, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import artifact_tensors, dir_tensors
from safetensors.torch import load_file
from transformers import AutoModel


def _ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two float32 tensors."""
    ia = a.contiguous().view(torch.int32).long()
    ib = b.contiguous().view(torch.int32).long()
    return int((ia - ib).abs().max()) if a.numel() else 0


def _outputs(path):
    model = AutoModel.from_pretrained(path).eval()
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


@pytest.mark.parametrize("tag", ["bf16", "fp32"])
def test_round_trip_tiny_llama(run, models, tmp_path, tag):
    base, ft = models[f"base-{tag}"], models[f"ft1-{tag}"]
    r = run("apply", "--plugin", "task-vector", "--base", base, ft, "--name", "tv", "--json")
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    assert record["name"] == "tv" and record["version"] == 1 and record["kind"] == "compress"
    assert record["content"] == "delta" and record["plugin"] == "task-vector"
    assert [p["role"] for p in record["parents"]] == ["base", "input"]

    tv = artifact_tensors("tv")
    assert all(t.dtype == torch.float32 for t in tv.values())

    out = tmp_path / "out"
    r = run("export", "tv", out, "--base", base)
    assert r.exit_code == 0, r.output
    got, want = dir_tensors(out), dir_tensors(ft)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        if tag == "bf16":
            assert torch.equal(got[name], want[name]), name
        else:
            assert _ulp_diff(got[name], want[name]) <= 1, name
    assert (out / "config.json").read_text() == (ft / "config.json").read_text()
    if tag == "bf16":
        assert torch.equal(_outputs(out), _outputs(ft))


def test_round_trip_real_minilm(run, minilm, tmp_path):
    r = run(
        "apply", "--plugin", "task-vector", "--base", minilm["base"], minilm["ft"], "-n", "mini"
    )
    assert r.exit_code == 0, r.output
    out = tmp_path / "mini"
    assert run("export", "mini", out, "--base", minilm["base"]).exit_code == 0
    got, want = dir_tensors(out), dir_tensors(minilm["ft"])
    assert got.keys() == want.keys()
    for name in want:
        # within a factor of two of the base everywhere, so exact (DESIGN.md, precision)
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    # tokenizer and sentence-transformers files travel with the model
    for f in ("tokenizer.json", "vocab.txt", "config.json", "modules.json"):
        assert (out / f).read_bytes() == (minilm["ft"] / f).read_bytes()
    assert torch.equal(_outputs(out), _outputs(minilm["ft"]))


def test_task_vector_values_are_the_difference(run, models):
    base, ft = models["base-fp32"], models["ft1-fp32"]
    assert run("apply", "-p", "task-vector", "--base", base, ft, "-n", "tv").exit_code == 0
    tv = artifact_tensors("tv")
    b, f = dir_tensors(base), dir_tensors(ft)
    for name in b:
        assert torch.equal(tv[name], f[name] - b[name]), name


def test_export_delta_without_base_is_plain_tensors(run, models, tmp_path):
    base, ft = models["base-bf16"], models["ft1-bf16"]
    run("apply", "-p", "task-vector", "--base", base, ft, "-n", "tv")
    target = tmp_path / "tv.safetensors"
    assert run("export", "tv", target).exit_code == 0
    tensors = load_file(target)
    assert tensors.keys() == dir_tensors(base).keys()
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_export_casts_dtype_and_shards(run, models, tmp_path):
    base, ft = models["base-fp32"], models["ft1-fp32"]
    run("apply", "-p", "task-vector", "--base", base, ft, "-n", "tv")
    out = tmp_path / "bf16"
    r = run("export", "tv", out, "--base", base, "--dtype", "bf16", "--max-shard-size", "200KB")
    assert r.exit_code == 0, r.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0].startswith("model-00001-of-")
    got = dir_tensors(out)
    want = dir_tensors(ft)
    for name, t in got.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, want[name].to(torch.bfloat16)), name
    model = AutoModel.from_pretrained(out)
    assert model.dtype == torch.bfloat16


def test_buffer_saved_by_older_transformers_is_carried(minilm, tmp_path):
    """The packaged MiniLM holds embeddings.position_ids; a transformers-5 save does not."""
    import shutil

    from click.testing import CliRunner
    from safetensors.torch import save_file

    from compressor.cli import cli

    ft = tmp_path / "ft-v5"
    shutil.copytree(minilm["ft"], ft)
    tensors = load_file(ft / "model.safetensors")
    del tensors["embeddings.position_ids"]
    save_file(tensors, ft / "model.safetensors", metadata={"format": "pt"})

    r = CliRunner().invoke(
        cli, ["apply", "-p", "task-vector", "--base", str(minilm["base"]), str(ft), "-n", "tv"]
    )
    assert r.exit_code == 0, r.output
    assert (
        f"Warning: embeddings.position_ids (non-float) is only in {minilm['base']}; "
        "carried from the base"
    ) in r.output
    out = tmp_path / "out"
    assert (
        CliRunner().invoke(cli, ["export", "tv", str(out), "--base", str(minilm["base"])]).exit_code
        == 0
    )
    got = load_file(out / "model.safetensors")
    base = load_file(minilm["base"] / "model.safetensors")
    assert torch.equal(got["embeddings.position_ids"], base["embeddings.position_ids"])
    for name, t in tensors.items():
        assert torch.equal(got[name], t), name
