"""Tucker compression of task vectors: against tensorly, error and size targets, decoding, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import artifact_tensors, assert_refused, dir_tensors
from safetensors.torch import load_file, save_file


def _low_rank(shape, ranks, gen) -> torch.Tensor:
    """A tensor of the given multilinear ranks, plus a little noise."""
    t = torch.randn(ranks, generator=gen)
    for mode, (size, r) in enumerate(zip(shape, ranks, strict=True)):
        u = torch.randn(size, r, generator=gen)
        t = torch.movedim(torch.tensordot(u, t, dims=([1], [mode])), 0, mode)
    return t + 0.05 * t.std() * torch.randn(shape, generator=gen)


@pytest.fixture
def conv(tmp_path) -> dict[str, Path]:
    """A base and a fine-tune whose task vector has 4-D conv kernels, a 2-D linear and biases."""
    gen = torch.Generator().manual_seed(0)
    base = {
        "conv1.weight": torch.randn(32, 16, 3, 3, generator=gen),
        "conv1.bias": torch.randn(32, generator=gen),
        "conv2.weight": torch.randn(48, 32, 3, 3, generator=gen),
        "fc.weight": torch.randn(64, 96, generator=gen),
        "steps": torch.tensor([3]),
    }
    delta = {
        "conv1.weight": _low_rank((32, 16, 3, 3), (6, 5, 2, 2), gen) * 0.01,
        "conv1.bias": torch.randn(32, generator=gen) * 0.01,
        "conv2.weight": _low_rank((48, 32, 3, 3), (8, 6, 3, 2), gen) * 0.01,
        "fc.weight": _low_rank((64, 96), (4, 4), gen) * 0.01,
    }
    ft = {k: v + delta.get(k, 0) if v.is_floating_point() else v for k, v in base.items()}
    delta = {k: ft[k] - base[k] for k in delta}  # τ exactly as stored (after rounding)
    save_file(base, tmp_path / "base.safetensors")
    save_file(ft, tmp_path / "ft.safetensors")
    return {
        "base": tmp_path / "base.safetensors",
        "ft": tmp_path / "ft.safetensors",
        "delta": delta,
    }


def _apply(run, conv, *options, name="tk"):
    r = run(
        "--quiet", "apply", "-p", "tucker", "--base", conv["base"], conv["ft"], *options, "-n", name
    )
    assert r.exit_code == 0, r.output
    return json.loads(run("store", "show", name, "--json").stdout)


def test_fixed_ranks_match_tensorly_and_store_core_plus_factors(run, conv, tmp_path):
    import tensorly as tl
    from tensorly.decomposition import tucker

    tl.set_backend("pytorch")
    ranks = (8, 6, 3, 2)
    rec = _apply(run, conv, "-o", "ranks", ",".join(map(str, ranks)))
    got = artifact_tensors("tk")
    for name in ("conv1.weight", "conv2.weight"):
        tau = conv["delta"][name]
        ours = (got[name] - tau).norm() / tau.norm()
        theirs_core, theirs_factors = tucker(tau, rank=list(ranks), init="svd", n_iter_max=10)
        theirs = (tl.tucker_to_tensor((theirs_core, theirs_factors)) - tau).norm() / tau.norm()
        assert ours <= theirs * 1.02 + 1e-7, name
        assert rec["manifest"]["tensors"][name]["ranks"] == list(ranks)
    # the 2-D linear (another order) and the bias are kept as they are
    assert torch.equal(got["fc.weight"], conv["delta"]["fc.weight"])
    assert torch.equal(got["conv1.bias"], conv["delta"]["conv1.bias"])
    # the stored bytes are the cores and factors (float32) plus the dense tensors
    size = sum(
        4 * (math.prod(ranks) + sum(s * r for s, r in zip(shape, ranks, strict=True)))
        for shape in ((32, 16, 3, 3), (48, 32, 3, 3))
    )
    size += 4 * (64 * 96 + 32)
    assert rec["metrics"]["bytes"] == size
    r = run("--quiet", "export", "tk", tmp_path / "out")
    assert r.exit_code == 0, r.output
    on_disk = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    dense = 4 * sum(t.numel() for t in conv["delta"].values())
    assert dense < on_disk < dense + 4096  # export writes the decoded, dense τ̂
    stored = json.loads(run("store", "show", "tk", "--json").stdout)["bytes"]
    assert size <= stored < size + 4096  # the artifact itself: core + factors + a header


def test_error_and_ratio_targets_hold_per_tensor(run, conv):
    rec = _apply(run, conv, "-o", "rel_error", "0.2", name="err")
    got = artifact_tensors("err")
    fitted = 0
    for name, tau in conv["delta"].items():
        rel = float((got[name] - tau).norm() / tau.norm())
        assert rel <= 0.2 + 1e-6, name
        if "ranks" in rec["manifest"]["tensors"][name]:
            fitted += 1
            assert rel == pytest.approx(rec["manifest"]["tensors"][name]["rel_error"], abs=1e-5)
    assert fitted == 3  # both kernels and the linear; the bias is too small
    rec = _apply(run, conv, "-o", "ratio", "8", name="small")
    for meta in rec["manifest"]["tensors"].values():
        if "ranks" in meta:
            shape, ranks = meta["shape"], meta["ranks"]
            parts = math.prod(ranks) + sum(s * r for s, r in zip(shape, ranks, strict=True))
            assert parts <= math.prod(shape) / 8


def test_export_with_base_and_merge_decode_the_cores(run, conv, tmp_path):
    _apply(run, conv, "-o", "rel_error", "0.1")
    tau_hat = artifact_tensors("tk")
    base = load_file(conv["base"])
    r = run("--quiet", "export", "tk", tmp_path / "full", "--base", conv["base"])
    assert r.exit_code == 0, r.output
    full = dir_tensors(tmp_path / "full")
    for name, t in full.items():
        want = base[name] + tau_hat[name] if t.is_floating_point() else base[name]
        torch.testing.assert_close(t, want, rtol=0, atol=1e-6)
    r = run(
        "--quiet",
        "merge",
        "-p",
        "task-arithmetic",
        "--base",
        conv["base"],
        "tk",
        "-o",
        "scale",
        "0.5",
        "-n",
        "m",
    )
    assert r.exit_code == 0, r.output
    merged = artifact_tensors("m")
    torch.testing.assert_close(
        merged["conv2.weight"],
        base["conv2.weight"] + 0.5 * tau_hat["conv2.weight"],
        rtol=0,
        atol=1e-6,
    )


def test_bad_inputs(run, private_store, conv):
    args = ["apply", "-p", "tucker", "--base", conv["base"], conv["ft"]]
    assert_refused(
        run,
        private_store,
        [*args, "-o", "ranks", "4,4,2,2,2"],
        "ranks has 5 entries, one per mode, but no tensor of "
        f"{conv['ft']} has order 5 (orders with enough entries: 2, 4)",
        code=2,
    )
    assert_refused(
        run,
        private_store,
        [*args, "-o", "ranks", "40,8,3,3"],
        "rank 40 of mode 0 is larger than that mode of 'conv1.weight' (shape [32, 16, 3, 3])",
        code=2,
    )
    for bad in ("0", "1", "1.5"):
        assert_refused(
            run,
            private_store,
            [*args, "-o", "rel_error", bad],
            f"option 'rel_error' must be in (0, 1); got '{bad}'",
            code=2,
        )
    assert_refused(
        run,
        private_store,
        args,
        "tucker needs exactly one of -o ranks R1,R2,..., -o rel_error E, -o ratio C",
        code=2,
    )
    assert_refused(
        run,
        private_store,
        [*args, "-o", "ratio", "4", "-o", "rel_error", "0.1"],
        "tucker needs exactly one of -o ranks R1,R2,..., -o rel_error E, -o ratio C; "
        "got rel_error, ratio",
        code=2,
    )


def test_a_compeft_artifact_is_decoded_then_factored(run, conv):
    r = run(
        "--quiet",
        "apply",
        "-p",
        "compeft",
        "--base",
        conv["base"],
        conv["ft"],
        "-o",
        "density",
        "0.5",
        "-o",
        "alpha",
        "none",
        "-n",
        "sparse",
    )
    assert r.exit_code == 0, r.output
    sparse = artifact_tensors("sparse")
    rec = json.loads(run("store", "show", "sparse", "--json").stdout)
    assert rec["content"] == "delta"
    r = run("--quiet", "apply", "-p", "tucker", "sparse", "-o", "ranks", "32,16,3,3", "-n", "tk")
    assert r.exit_code == 0, r.output
    got = artifact_tensors("tk")
    meta = json.loads(run("store", "show", "tk", "--json").stdout)["manifest"]["tensors"]
    # conv1 at full ranks would not shrink: kept as the decoded ComPEFT tensor, exactly
    assert "ranks" not in meta["conv1.weight"]
    torch.testing.assert_close(got["conv1.weight"], sparse["conv1.weight"], rtol=0, atol=0)
    # conv2 is factored, and its recorded error is against the decoded ComPEFT τ̂
    tau = sparse["conv2.weight"]
    rel = float((got["conv2.weight"] - tau).norm() / tau.norm())
    assert meta["conv2.weight"]["ranks"] == [32, 16, 3, 3]
    assert rel == pytest.approx(meta["conv2.weight"]["rel_error"], abs=1e-5)
