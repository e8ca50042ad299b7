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


# every method, as (steps that make its input, the command compared); {base} {ft1} {ft2}:
# the tiny Llama and two fine-tunes, {a0} {a1}: LoRA adapters on it, {text}: text lines
TWO = ["--base", "{base}", "{ft1}", "{ft2}"]
EVERY_METHOD = {
    **{
        m: ([], ["merge", "-p", m, *TWO])
        for m in (
            "task-arithmetic",
            "ties",
            "breadcrumbs",
            "breadcrumbs-ties",
            "sce",
            "linear",
            "multislerp",
            "karcher",
            "model-stock",
            "tsv-m",
            "iso-c",
            "iso-cts",
        )
    },
    **{
        m: ([], ["merge", "-p", m, *TWO, "-o", "seed", "3"])
        for m in ("dare-linear", "dare-ties", "della", "della-linear")
    },
    "wudi": ([], ["merge", "-p", "wudi", *TWO, "-o", "steps", "5"]),
    "core-space": (
        [],
        ["merge", "-p", "ties", "--base", "{base}", "{a0}", "{a1}"] + ["-o", "space", "core"],
    ),
    "scale-auto": (
        [],
        ["merge", "-p", "task-arithmetic", *TWO, "-o", "scale", "auto"]
        + ["-o", "val", "{text}", "-o", "grid", "0.5,1"],
    ),
    "slerp": ([], ["merge", "-p", "slerp", "--base", "{base}", "{ft1}", "-o", "t", "0.3"]),
    "nearswap": ([], ["merge", "-p", "nearswap", "--base", "{base}", "{ft1}", "-o", "t", "0.01"]),
    "arcee-fusion": ([], ["merge", "-p", "arcee-fusion", "--base", "{base}", "{ft1}"]),
    "nuslerp": ([], ["merge", "-p", "nuslerp", "{ft1}", "{ft2}"]),
    "passthrough": ([], ["merge", "-p", "passthrough", "{ft1}"]),
    "atlas": (
        [],
        ["merge", "-p", "atlas", *TWO, "-o", "data", "{text}", "-o", "objective", "lm"]
        + ["-o", "epochs", "2"],
    ),
    "task-vector": ([], ["apply", "-p", "task-vector", "--base", "{base}", "{ft1}"]),
    "compeft": (
        [],
        ["apply", "-p", "compeft", "--base", "{base}", "{ft1}", "-o", "density", "0.2"],
    ),
    "tucker": ([], ["apply", "-p", "tucker", "--base", "{base}", "{ft1}", "-o", "ratio", "4"]),
    "lora-extract": ([], ["apply", "-p", "lora-extract", "--base", "{base}", "{ft1}"]),
    "lora-tucker": ([], ["apply", "-p", "lora-tucker", "{a0}", "{a1}"]),
    "sketchtune": (
        [],
        ["apply", "-p", "sketchtune", "{base}", "-o", "bits", "2"] + ["-o", "data", "{text}"],
    ),
    "sketchtune-train": (
        [["apply", "-p", "sketchtune", "{base}", "-o", "bits", "2", "-n", "sk"]],
        ["train", "-p", "sketchtune", "sk", "-o", "data", "{text}", "-o", "steps", "2"],
    ),
    "matformer": (
        [],
        ["extract", "-p", "matformer", "{base}", "-o", "ffn_ratio", "0.5"]
        + ["-o", "order", "activation", "-o", "data", "{text}"],
    ),
    "matformer-train": (
        [],
        ["train", "-p", "matformer-train", "{base}", "-o", "data", "{text}"] + ["-o", "steps", "2"],
    ),
    "neumeta": (
        [],
        ["train", "-p", "neumeta", "{base}", "-o", "data", "{text}"]
        + ["-o", "steps", "2", "-o", "hidden", "8"],
    ),
    "neumeta-sample": (
        [
            ["train", "-p", "neumeta", "{base}", "-o", "data", "{text}", "-o", "steps", "2"]
            + ["-o", "hidden", "8", "-n", "gen"]
        ],
        ["sample", "-p", "neumeta", "gen", "-o", "width", "0.5", "-o", "samples", "2"],
    ),
}


@pytest.fixture(scope="module")
def inputs(models, tmp_path_factory) -> dict[str, str]:
    from compressor.demo.models import save_random_lora, zen_lines

    root = tmp_path_factory.mktemp("device-inputs")
    base = models["base-fp32"]
    text = root / "text.txt"
    text.write_text("\n".join(zen_lines()) + "\n")
    adapters = {f"a{i}": str(save_random_lora(base, root / f"a{i}", seed=i)) for i in range(2)}
    return {
        "base": str(base),
        "ft1": str(models["ft1-fp32"]),
        "ft2": str(models["ft2-fp32"]),
        "text": str(text),
        **adapters,
    }


def test_every_method_is_in_the_device_table():
    from compressor.registry import get_registry

    verbs = {"apply": "compress", "merge": "merge", "extract": "extract"}
    covered = {
        (args[args.index("-p") + 1], verbs.get(args[0], args[0]))
        for _setup, args in EVERY_METHOD.values()
    }
    assert set(get_registry().methods) - covered == set()


@pytest.mark.parametrize("case", sorted(EVERY_METHOD))
def test_device_cpu_gives_the_default_bytes(run, inputs, case):
    """``--device cpu`` runs the same code as the default on a machine without a GPU:
    identical tensors, every method (the bytes before #33 were checked once by hand)."""
    setup, args = EVERY_METHOD[case]
    for step in setup:
        assert run("--quiet", *(a.format(**inputs) for a in step)).exit_code == 0
    args = [a.format(**inputs) for a in args]
    r = run("--quiet", *args, "-n", "default")
    assert r.exit_code == 0, r.output
    r = run("--quiet", "--device", "cpu", *args, "-n", "cpu")
    assert r.exit_code == 0, r.output
    for select in ("#1", "#2") if case == "lora-tucker" else ("",):  # one of a joint artifact
        a, b = artifact_tensors("default" + select), artifact_tensors("cpu" + select)
        assert a.keys() == b.keys()
        assert [n for n in a if not torch.equal(a[n], b[n])] == []


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


@pytest.mark.skipif(CUDA, reason="this machine has a CUDA device")
@pytest.mark.parametrize(
    "case", ["compeft", "sketchtune", "matformer", "matformer-train", "neumeta-sample"]
)
def test_every_verb_refuses_a_device_that_is_not_there(run, inputs, private_store, case):
    setup, args = EVERY_METHOD[case]
    for step in setup:
        assert run("--quiet", *(a.format(**inputs) for a in step)).exit_code == 0
    message = "device 'cuda:1' is not available: torch sees no CUDA device here"
    args = [a.format(**inputs) for a in args]
    assert_refused(run, private_store, ["--device", "cuda:1", *args], message, code=2)


@pytest.mark.skipif(CUDA, reason="this machine has a CUDA device")
def test_eval_refuses_a_device_that_is_not_there(run, inputs, private_store):
    message = "device 'cuda' is not available: torch sees no CUDA device here"
    args = ["--device", "cuda", "eval", inputs["base"], "-o", "data", inputs["text"]]
    assert_refused(run, private_store, args, message, code=2)


def test_eval_on_cpu_gives_the_default_scores(run, inputs):
    args = ["eval", inputs["base"], "-o", "data", inputs["text"], "--json"]
    a = run("--quiet", *args)
    b = run("--quiet", "--device", "cpu", *args)
    assert a.exit_code == b.exit_code == 0 and a.output == b.output and "perplexity" in a.output


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


LEARNED = {"atlas", "matformer-train", "neumeta", "neumeta-sample", "sketchtune-train", "wudi"}
KEPT_SETS = {"compeft", "dare-linear", "dare-ties", "della", "della-linear", "ties"}


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("case", sorted(EVERY_METHOD))
def test_every_method_on_the_gpu_matches_the_cpu(run, inputs, case):
    """The decoded artifacts: floats within 1e-4 of the CPU's, relative to each tensor's
    norm (1e-2 where the method learns, whose steps round differently on a GPU; 5e-2 for
    SketchTune, where a weight within rounding of two table entries' midpoint may take
    the other code); LoRA factors compared as B·A (an SVD's signs are free); the kept
    entries of sparsifying methods identical."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    setup, args = EVERY_METHOD[case]
    for step in setup:
        assert run("--quiet", "--device", "cpu", *(a.format(**inputs) for a in step)).exit_code == 0
    args = [a.format(**inputs) for a in args]
    assert run("--quiet", "--device", "cpu", *args, "-n", "cpu").exit_code == 0
    r = run("--quiet", "--device", "cuda", *args, "-n", "gpu")
    assert r.exit_code == 0, r.output
    tol = 1e-2 if case in LEARNED else 5e-2 if case == "sketchtune" else 1e-4
    base = dir_tensors(inputs["base"])
    for select in ("#1", "#2") if case == "lora-tucker" else ("",):
        a, b = artifact_tensors("cpu" + select), artifact_tensors("gpu" + select)
        assert a.keys() == b.keys()
        for name in a:
            x, y = a[name], b[name]
            if ".lora_B." in name:
                continue  # with its lora_A
            if ".lora_A." in name:
                other = name.replace(".lora_A.", ".lora_B.")
                x, y = a[other].double() @ x.double(), b[other].double() @ y.double()
            if not x.is_floating_point():
                assert torch.equal(x, y), name
                continue
            err = float((x.double() - y.double()).norm() / x.double().norm().clamp_min(1e-30))
            assert err <= tol, (name, err)
            if case in KEPT_SETS:  # the same entries kept (changed from the base, for merges)
                ref = base.get(name, torch.zeros_like(x)) if case != "compeft" else 0
                assert torch.equal(x != ref, y != ref), name


@pytest.mark.parametrize("args", [["tsv-m"], ["ties", "-o", "space", "core"]])
def test_float64_methods_are_refused_on_mps(run, inputs, private_store, monkeypatch, args):
    """MPS has no float64: the SVD merges and core space say so (torch told an MPS is here)."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    plugin, *opts = args
    cmd = ["--device", "mps", "merge", "-p", plugin, "--base", inputs["base"]]
    cmd += [inputs["a0"], inputs["a1"], *opts]
    message = f"method '{plugin}' computes in float64, which MPS does not have; use --device cpu"
    assert_refused(run, private_store, cmd, message, code=2)


@pytest.mark.parametrize("ahead", [False, True])
def test_prefetched_loads_in_order_one_ahead(ahead):
    import threading

    from compressor.io.prefetch import prefetched

    log = []

    def load(i):
        log.append(("load", i))
        return i * i

    for i, sq in prefetched(range(4), load, ahead):
        if ahead and i < 3:  # the next item is loaded while this one is worked on
            for _ in range(1000):
                if ("load", i + 1) in log:
                    break
                threading.Event().wait(0.005)
        log.append(("work", i, sq))
    loads = [e[1] for e in log if e[0] == "load"]
    assert loads == [0, 1, 2, 3]
    assert [e for e in log if e[0] == "work"] == [("work", i, i * i) for i in range(4)]
    if ahead:
        assert log.index(("load", 1)) < log.index(("work", 0, 0))
    else:
        assert log.index(("load", 1)) > log.index(("work", 0, 0))
