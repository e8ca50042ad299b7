"""ComPEFT against an independent calculation of the rule on the real MiniLM."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import artifact_tensors, assert_refused, dir_tensors, store_snapshot


@pytest.fixture(scope="module")
def tau(minilm):
    """τ of the MiniLM fine-tune (per-tensor scales differ), float tensors only."""
    b, f = dir_tensors(minilm["base"]), dir_tensors(minilm["ft"])
    return {n: f[n].float() - b[n].float() for n in b if b[n].is_floating_point()}


def _apply(run, minilm, *options, name="c"):
    r = run(
        "--quiet",
        "apply",
        "-p",
        "compeft",
        "--base",
        minilm["base"],
        minilm["ft"],
        "-n",
        name,
        *options,
        "--json",
    )
    assert r.exit_code == 0, r.output
    return _json_line(r.output)


def _json_line(output: str) -> dict:
    """The --json object among the lines the CLI printed (warnings go to stderr)."""
    return json.loads(next(line for line in output.splitlines() if line.startswith("{")))


def _expected(tau, density, scope, alpha):
    groups = [list(tau)] if scope == "global" else [[n] for n in tau]
    out = {}
    for group in groups:
        flat = torch.cat([tau[n].reshape(-1) for n in group])
        k = math.ceil(density * flat.numel())
        thr = flat.abs().topk(k).values.min()
        kept = flat.abs() >= thr
        sigma = float(flat.double().std())
        if alpha == "auto":
            scale = float(flat.abs()[kept].double().mean())
        else:
            scale = float(alpha) * sigma
        for n in group:
            keep = (tau[n].abs() >= thr) & (tau[n] != 0)
            out[n] = torch.where(keep, scale * tau[n].sign(), torch.zeros(()))
    return out


@pytest.mark.parametrize(
    "density, scope, alpha",
    [
        (0.1, "global", "1.0"),
        (0.05, "tensor", "1.0"),
        (0.2, "global", "auto"),
        (0.1, "tensor", "auto"),
        (0.5, "global", "2.5"),
    ],
)
def test_matches_the_rule(run, minilm, tau, density, scope, alpha):
    rec = _apply(
        run, minilm, "-o", "density", str(density), "-o", "scope", scope, "-o", "alpha", alpha
    )
    got = artifact_tensors("c")
    want = _expected(tau, density, scope, alpha)
    for n, w in want.items():
        assert torch.equal(got[n] != 0, w != 0), n  # the same support, exactly
        torch.testing.assert_close(got[n], w, rtol=1e-5, atol=0, msg=n)
    kept = sum(int((w != 0).sum()) for w in want.values())
    assert rec["metrics"]["density"] == pytest.approx(kept / sum(t.numel() for t in tau.values()))
    assert got["embeddings.position_ids"].dtype == torch.int64  # carried as it is


def test_prune_only_at_density_one_gives_tau_back(run, minilm, tau):
    _apply(run, minilm, "-o", "density", "1", "-o", "alpha", "none")
    got = artifact_tensors("c")
    for n, t in tau.items():
        assert torch.equal(got[n], t), n


def test_size_is_at_the_entropy_floor(run, minilm, tau):
    rec = _apply(run, minilm, "-o", "density", "0.1")
    want = _expected(tau, 0.1, "global", "1.0")
    floor_bits = 0.0
    for w in want.values():
        n, k = w.numel(), int((w != 0).sum())
        p = k / n
        h = 0.0 if p in (0, 1) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
        floor_bits += n * h + k
    d = sum(t.numel() for t in tau.values())
    assert rec["metrics"]["bits_per_param"] <= 1.03 * floor_bits / d
    binary_h = -(0.1 * math.log2(0.1) + 0.9 * math.log2(0.9))
    assert rec["metrics"]["bits_per_param"] < binary_h + 0.1  # the paper's d·(H(k)+k) bound


def test_task_vector_artifact_as_input_and_relative_error(run, minilm, tau):
    run("apply", "-p", "task-vector", "--base", minilm["base"], minilm["ft"], "-n", "tv")
    rec = _json_line(run("--quiet", "apply", "-p", "compeft", "tv", "-n", "c2", "--json").output)
    direct = _apply(run, minilm)
    a, b = artifact_tensors("c2"), artifact_tensors("c")
    assert all(torch.equal(a[n], b[n]) for n in tau)
    want = _expected(tau, 0.1, "global", "1.0")
    err = math.sqrt(sum(float((want[n] - tau[n]).double().square().sum()) for n in tau))
    norm = math.sqrt(sum(float(tau[n].double().square().sum()) for n in tau))
    assert rec["metrics"]["rel_error"] == pytest.approx(err / norm, rel=1e-6)
    assert direct["metrics"]["rel_error"] == pytest.approx(err / norm, rel=1e-6)


def test_export_and_merge_decode(run, minilm, tau, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel

    _apply(run, minilm, "-o", "alpha", "auto")
    decoded = artifact_tensors("c")
    assert run("export", "c", tmp_path / "tau.safetensors").exit_code == 0
    plain = load_file(tmp_path / "tau.safetensors")
    assert all(torch.equal(plain[n], decoded[n]) for n in tau)
    assert run("export", "c", tmp_path / "full", "--base", minilm["base"]).exit_code == 0
    AutoModel.from_pretrained(tmp_path / "full")
    r = run("merge", "-p", "task-arithmetic", "--base", minilm["base"], "c", "-n", "m")
    assert r.exit_code == 0, r.output
    base = dir_tensors(minilm["base"])
    merged = artifact_tensors("m")
    for n in tau:
        torch.testing.assert_close(merged[n], base[n] + decoded[n], rtol=0, atol=1e-7)


def test_positions_round_trip_with_escapes():
    from compressor.plugins.compeft import decode_positions, encode_positions

    rng = np.random.default_rng(0)
    numel = 100_000
    pos = np.sort(rng.choice(numel, 900, replace=False))
    pos = np.concatenate([pos[pos < 40_000], [99_999]])  # one long gap: an escape
    coded, escapes = encode_positions(pos, numel)
    assert escapes.size >= 1
    assert np.array_equal(decode_positions(coded, escapes, pos.size, numel), pos)
    empty, none = encode_positions(np.zeros(0, np.int64), numel)
    assert decode_positions(empty, none, 0, numel).size == 0
    every = np.arange(1000)
    assert np.array_equal(decode_positions(*encode_positions(every, 1000), 1000, 1000), every)


@pytest.mark.parametrize(
    "options, message",
    [
        (("-o", "density", "0"), "option 'density' must be in (0, 1]; got '0'"),
        (("-o", "density", "1.5"), "option 'density' must be in (0, 1]; got '1.5'"),
        (("-o", "alpha", "big"), "option 'alpha' must be a finite number, auto or none; got 'big'"),
        (("-o", "alpha", "nan"), "option 'alpha' must be a finite number, auto or none; got 'nan'"),
        (
            ("-o", "alpha", "-inf"),
            "option 'alpha' must be a finite number, auto or none; got '-inf'",
        ),
        (("-o", "scope", "layer"), "option 'scope' must be one of global, tensor; got 'layer'"),
    ],
)
def test_bad_options(run, minilm, private_store, options, message):
    run("store", "ls")
    before = store_snapshot(private_store)
    r = run("apply", "-p", "compeft", "--base", minilm["base"], minilm["ft"], *options)
    assert r.exit_code == 2 and r.output == f"Error: {message}\n"
    assert store_snapshot(private_store) == before


def test_full_model_needs_base(run, minilm, private_store):
    run("store", "ls")
    before = store_snapshot(private_store)
    r = run("apply", "-p", "compeft", minilm["ft"])
    assert r.exit_code == 2
    assert r.output == (
        "Error: compeft needs --base BASE when INPUT is a full model (or give a task vector)\n"
    )
    assert store_snapshot(private_store) == before


@pytest.fixture(scope="module")
def lora_suite():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "scripts" / "suite"))
    import build as suite_build

    suite = suite_build.build(suite_build.SMOKE, quiet=True)
    return suite / "text" / "base", suite / "lora" / "tech", suite / "text" / "data"


def test_adapter_factors(run, lora_suite, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base, adapter, data = lora_suite
    r = run(
        "--quiet", "apply", "-p", "compeft", adapter, "-o", "density", "0.2", "-n", "ca", "--json"
    )
    assert r.exit_code == 0, r.output
    rec = _json_line(r.output)
    assert rec["content"] == "adapter"
    assert "Warning: kept dense (whole modules the adapter replaces): " in r.output
    raw = dir_tensors(adapter)
    factors = {n: t.float() for n, t in raw.items() if ".lora_" in n}
    want = _expected(factors, 0.2, "global", "1.0")
    got = artifact_tensors("ca")
    for n, w in want.items():
        assert torch.equal(got[n] != 0, w != 0), n
        torch.testing.assert_close(got[n], w, rtol=1e-5, atol=0)
    for n in raw.keys() - factors.keys():  # modules_to_save: kept exactly
        assert torch.equal(got[n], raw[n]), n
    out = tmp_path / "adapter-out"
    assert run("export", "ca", out).exit_code == 0
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), out)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_A" in k}
    assert loaded  # PEFT loads the decoded adapter
    scores = json.loads(
        run(
            "--quiet",
            "eval",
            "ca",
            "--base",
            base,
            "-o",
            "data",
            data / "tech-test.jsonl",
            "--json",
        ).output.splitlines()[-1]
    )
    assert 0 <= scores["accuracy"] <= 1


def test_adapter_target_delta(run, lora_suite):
    from compressor.io.peft import PeftAdapter

    base, adapter, _ = lora_suite
    r = run("--quiet", "apply", "-p", "compeft", adapter, "-o", "target", "delta")
    assert r.exit_code == 2
    assert r.output == (
        "Error: compeft needs --base BASE when INPUT is an adapter with target "
        "delta (or give a task vector)\n"
    )
    r = run(
        "--quiet",
        "apply",
        "-p",
        "compeft",
        "--base",
        base,
        adapter,
        "-o",
        "target",
        "delta",
        "-n",
        "cd",
        "--json",
    )
    assert r.exit_code == 0, r.output
    assert _json_line(r.output)["content"] == "delta"
    b = dir_tensors(base)
    src = PeftAdapter(adapter)
    tau = {}
    for n, t in b.items():
        if not t.is_floating_point():
            continue
        if n in src.modules:
            tau[n] = src.delta(n)
        elif n in src.replaced:
            tau[n] = src.get(src.replaced[n]).float() - t.float()
        else:
            tau[n] = torch.zeros(t.shape)
    want = _expected(tau, 0.1, "global", "1.0")
    got = artifact_tensors("cd")
    for n, w in want.items():
        assert torch.equal(got[n] != 0, w != 0), n
        torch.testing.assert_close(got[n], w, rtol=1e-5, atol=0)


def test_all_zero_task_vector_isassert_refused(run, minilm, private_store):
    base = str(minilm["base"])
    assert_refused(
        run,
        private_store,
        ("apply", "-p", "compeft", "--base", base, base),
        f"the task vector of {base} is all zeros (σ = 0): nothing to compress "
        "(is the expert the base itself?)",
    )


def test_base_and_expert_that_do_not_match(run, minilm, models, private_store):
    base = models["base-fp32"]
    assert_refused(
        run,
        private_store,
        ("apply", "-p", "compeft", "--base", str(base), str(minilm["ft"])),
        f"base and expert differ: embeddings.LayerNorm.bias is in {minilm['ft']} but not in {base}",
    )


def test_adapter_directory_without_config(run, lora_suite, private_store, tmp_path):
    _, adapter, _ = lora_suite
    broken = tmp_path / "broken-adapter"
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes(
        (adapter / "adapter_model.safetensors").read_bytes()
    )
    assert_refused(
        run,
        private_store,
        ("apply", "-p", "compeft", str(broken)),
        f"{broken} holds adapter_model.safetensors but no adapter_config.json; "
        "a PEFT adapter needs its config (PEFT's save_pretrained writes both)",
    )
