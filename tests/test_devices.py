"""``--device`` (issue #33, first slice: merges): the CPU gives today's bytes, a device
that is not there is one line with the store unchanged, and on a GPU the same results."""

from __future__ import annotations

import pytest
import torch
from conftest import artifact_tensors, assert_refused, dir_tensors

from compressor.io import devices

CUDA = torch.cuda.is_available()
MERGES = [
    ("task-arithmetic", []),
    ("ties", ["-o", "density", "0.3"]),
    ("dare-ties", ["-o", "density", "0.5", "-o", "seed", "3"]),
    ("tsv-m", []),
    ("iso-c", []),
]


@pytest.fixture(autouse=True)
def _no_requested_device(monkeypatch):
    monkeypatch.delenv("COMPRESSOR_DEVICE", raising=False)
    devices.request(None)
    yield
    devices.request(None)
    monkeypatch.delenv("COMPRESSOR_DEVICE", raising=False)


@pytest.mark.parametrize("plugin, opts", MERGES)
def test_device_cpu_gives_the_default_bytes(run, models, plugin, opts):
    base, experts = models["base-fp32"], [models["ft1-fp32"], models["ft2-fp32"]]
    args = ["merge", "-p", plugin, "--base", base, *experts, *opts]
    assert run("--quiet", *args, "-n", "default").exit_code == 0
    assert run("--quiet", "--device", "cpu", *args, "-n", "cpu").exit_code == 0
    a, b = artifact_tensors("default"), artifact_tensors("cpu")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.skipif(CUDA, reason="this machine has a CUDA device")
def test_a_device_that_is_not_there_is_one_line(run, models, private_store):
    base, expert = models["base-fp32"], models["ft1-fp32"]
    args = ["merge", "-p", "task-arithmetic", "--base", base, expert]
    assert_refused(
        run,
        private_store,
        ["--device", "cuda", *args],
        "device 'cuda' is not available: torch sees no CUDA device here",
        code=2,
    )


def test_an_unknown_device_is_one_line(run, models, private_store):
    base, expert = models["base-fp32"], models["ft1-fp32"]
    assert_refused(
        run,
        private_store,
        ["--device", "tpu", "merge", "-p", "task-arithmetic", "--base", base, expert],
        "unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps",
        code=2,
    )


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("plugin, opts", MERGES)
def test_a_merge_on_the_gpu_matches_the_cpu(run, models, plugin, opts):
    """Float outputs within 1e-5 (TF32 stays off); DARE's masks, drawn on the CPU, equal."""
    torch.backends.cuda.matmul.allow_tf32 = False
    base, experts = models["base-fp32"], [models["ft1-fp32"], models["ft2-fp32"]]
    args = ["merge", "-p", plugin, "--base", base, *experts, *opts]
    assert run("--quiet", "--device", "cpu", *args, "-n", "cpu").exit_code == 0
    assert run("--quiet", "--device", "cuda", *args, "-n", "gpu").exit_code == 0
    a, b, t0 = artifact_tensors("cpu"), artifact_tensors("gpu"), dir_tensors(base)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5, msg=name)
        if plugin == "dare-ties":  # the same entries kept: the masks come from the CPU
            assert torch.equal(a[name] == t0[name], b[name] == t0[name]), name
    assert run("store", "show", "gpu", "--json").output.count('"cuda"') >= 1


def test_core_space_and_scale_auto_on_cpu_give_the_default_bytes(run, models, tmp_path):
    from compressor.demo.models import save_random_lora, zen_lines

    base = models["base-fp32"]
    adapters = [str(save_random_lora(base, tmp_path / f"a{i}", seed=i)) for i in range(2)]
    val = tmp_path / "val.txt"
    val.write_text("\n".join(zen_lines()) + "\n")
    for args in (
        ["merge", "-p", "ties", "--base", base, *adapters, "-o", "space", "core"],
        ["merge", "-p", "iso-c", "--base", base, models["ft1-fp32"], models["ft2-fp32"]]
        + ["-o", "scale", "auto", "-o", "val", val, "-o", "grid", "0.5,1"],
    ):
        assert run("--quiet", *args, "-n", "default").exit_code == 0
        assert run("--quiet", "--device", "cpu", *args, "-n", "cpu").exit_code == 0
        a, b = artifact_tensors("default"), artifact_tensors("cpu")
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_core_space_on_the_gpu_matches_the_cpu(run, models, tmp_path):
    from compressor.demo.models import save_random_lora

    base = models["base-fp32"]
    adapters = [str(save_random_lora(base, tmp_path / f"a{i}", seed=i)) for i in range(3)]
    args = ["merge", "-p", "tsv-m", "--base", base, *adapters, "-o", "space", "core"]
    assert run("--quiet", "--device", "cpu", *args, "-n", "cpu").exit_code == 0
    assert run("--quiet", "--device", "cuda", *args, "-n", "gpu").exit_code == 0
    a, b = artifact_tensors("cpu"), artifact_tensors("gpu")
    for name in a:  # factors agree up to the sign of each singular pair: compare B·A
        if ".lora_A." in name:
            other = name.replace("lora_A", "lora_B")
            torch.testing.assert_close(b[other] @ b[name], a[other] @ a[name], rtol=1e-5, atol=1e-6)
