"""LoRA experts merged in their core space (issue #32): exact for task arithmetic, the
paper's recipe for the others, ranks that differ, a PEFT adapter out, bad inputs refused."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import artifact_tensors, assert_refused, dir_tensors
from test_subspace import iso_reference, tsv_reference

from compressor.demo.models import save_random_lora

TARGETS = ("q_proj", "v_proj", "down_proj")


def save_adapter(base, out, r, alpha, seed, targets=TARGETS):
    """A real PEFT LoRA adapter on ``base`` with random (non-zero) A and B."""
    return save_random_lora(base, out, seed, targets, r, alpha)


@pytest.fixture(scope="module")
def adapters(models, tmp_path_factory):
    """Three adapters of ranks 4, 4 and 8 (alphas 8, 16, 8) on the tiny Llama."""
    root = tmp_path_factory.mktemp("core")
    base = models["base-fp32"]
    specs = [(4, 8, 1), (4, 16, 2), (8, 8, 3)]
    return base, [save_adapter(base, root / f"a{i}", *s) for i, s in enumerate(specs)]


def _factors(adapter_dir):
    """{module weight name: ΔW = s·B·A (float64)} of a saved adapter, read directly."""
    import json

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = dir_tensors(adapter_dir)
    out = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        b = tensors[key.replace("lora_A", "lora_B")]
        leaf = module.rsplit(".", 1)[-1]
        r = (
            config["rank_pattern"].get(module, config["r"])
            if config.get("rank_pattern")
            else config["r"]
        )
        alpha = (config.get("alpha_pattern") or {}).get(module, config["lora_alpha"])
        assert leaf in TARGETS
        out[f"{module}.weight"] = (b.double() @ a.double()) * (alpha / r)
    return out


def _export(run, name, tmp_path):
    out = tmp_path / f"{name}-out"
    r = run("--quiet", "export", name, str(out))
    assert r.exit_code == 0, r.output
    return out


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_task_arithmetic_in_core_space_equals_the_full_space_sum(run, adapters, tmp_path):
    """Exact: every ΔW_t lies in the spans of the stacked factors."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, experts = adapters
    common = ["--quiet", "merge", "-p", "task-arithmetic", "--base", base, *map(str, experts)]
    common += ["-o", "weights", "1,0.5,2", "-o", "scale", "0.8"]
    assert run(*common, "-o", "space", "core", "-n", "core").exit_code == 0
    assert run(*common, "-n", "full").exit_code == 0
    full, base_t = artifact_tensors("full"), dir_tensors(base)
    out = _export(run, "core", tmp_path)
    deltas = _factors(out)
    assert set(deltas) == {n for n in base_t if n.split(".")[-2] in TARGETS}
    for name, d in deltas.items():
        want = full[name].double() - base_t[name].double()
        assert _rel(d, want) < 1e-5, name
    # PEFT loads the exported adapter, and its merge is the full-space merge
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    merged = model.merge_and_unload().state_dict()
    for name in deltas:
        torch.testing.assert_close(merged[name], full[name], rtol=1e-5, atol=1e-6)
    r = run("store", "show", "core")
    assert "core_rank" in r.output and "16" in r.output  # 4 + 4 + 8


def test_rank_truncates_to_the_best_rank_r_approximation(run, adapters, tmp_path):
    base, experts = adapters
    args = ["--quiet", "merge", "-p", "task-arithmetic", "--base", base, *map(str, experts)]
    assert run(*args, "-o", "space", "core", "-o", "rank", "6", "-n", "r6").exit_code == 0
    out = _export(run, "r6", tmp_path)
    deltas = _factors(out)
    adapters_delta = [_factors(e) for e in experts]
    for name, d in deltas.items():
        total = sum(a[name] for a in adapters_delta)
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        best = u[:, :6] * s[:6] @ vh[:6]
        assert _rel(d, best) < 1e-5, name
        assert torch.linalg.matrix_rank(d.float()) <= 6


def _core_reference(experts, rule, weights):
    """The paper's recipe in float64: SVD bases of the stacked factors, cores, rule, back."""
    per = [_factors_raw(e) for e in experts]
    out = {}
    for name in per[0]:
        bs = [p[name][0] for p in per]
        as_ = [p[name][1] for p in per]
        u_b = torch.linalg.svd(torch.cat(bs, 1), full_matrices=False)[0]
        v_a = torch.linalg.svd(torch.cat(as_, 0), full_matrices=False)[2].T
        cores = [w * (u_b.T @ b @ a @ v_a) for a, b, w in zip(as_, bs, weights, strict=True)]
        out[name] = u_b @ rule(cores) @ v_a.T
    return out


def _factors_raw(adapter_dir):
    """{weight name: (s·B, A)} in float64."""
    import json

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = dir_tensors(adapter_dir)
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            s = config["lora_alpha"] / config["r"]
            b = tensors[key.replace("lora_A", "lora_B")].double() * s
            out[f"{module}.weight"] = (b, a.double())
    return out


@pytest.mark.parametrize("plugin, rule", [("tsv-m", tsv_reference), ("iso-c", iso_reference)])
def test_subspace_merges_in_core_space_follow_the_paper(run, adapters, tmp_path, plugin, rule):
    base, experts = adapters
    args = ["--quiet", "merge", "-p", plugin, "--base", base, *map(str, experts)]
    args += ["-o", "space", "core", "-o", "weights", "1,2,1", "-n", plugin]
    assert run(*args).exit_code == 0, plugin
    got = _factors(_export(run, plugin, tmp_path))
    want = _core_reference(experts, rule, (1, 2, 1))
    for name in want:
        assert _rel(got[name], want[name]) < 1e-5, name


def test_bad_inputs_are_refused_with_the_store_unchanged(
    run, adapters, models, private_store, tmp_path
):
    base, experts = adapters
    e = list(map(str, experts))
    core = ["-o", "space", "core"]
    assert_refused(
        run,
        private_store,
        ["merge", "-p", "ties", "--base", base, e[0], models["ft1-fp32"], *core],
        f"{models['ft1-fp32']} is not a LoRA adapter; -o space core merges PEFT LoRA "
        "adapters only (use -o space full)",
        code=2,
    )
    assert_refused(
        run,
        private_store,
        ["merge", "-p", "tsv-m", "--base", base, e[0], *core],
        "method 'tsv-m' needs at least 2 experts; got 1",
        code=2,
    )
    other = save_adapter(base, tmp_path / "q-only", 4, 8, 7, targets=("q_proj",))
    assert_refused(
        run,
        private_store,
        ["merge", "-p", "task-arithmetic", "--base", base, e[0], str(other), *core],
        f"{e[0]} and {other} adapt different modules "
        "(model.layers.0.mlp.down_proj.weight is in one only); "
        "core space needs adapters of the same target modules",
    )
    twin = tmp_path / "twin-base"
    shutil.copytree(base, twin)
    elsewhere = save_adapter(twin, tmp_path / "elsewhere", 4, 8, 8)
    assert_refused(
        run,
        private_store,
        ["merge", "-p", "task-arithmetic", "--base", base, e[0], str(elsewhere), *core],
        f"{e[0]} and {elsewhere} are adapters of different bases ({base} and {twin})",
    )
    assert_refused(
        run,
        private_store,
        ["merge", "-p", "task-arithmetic", "--base", base, *e, "-o", "rank", "4"],
        "option 'rank' applies to -o space core only",
        code=2,
    )


def test_ties_runs_on_the_cores_and_its_adapter_loads_in_peft(run, adapters, tmp_path):
    """TIES trims and elects signs among the cores' entries (the paper's TIES row)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, experts = adapters
    args = ["--quiet", "merge", "-p", "ties", "--base", base, *map(str, experts)]
    assert run(*args, "-o", "space", "core", "-o", "density", "0.3", "-n", "t").exit_code == 0
    out = _export(run, "t", tmp_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    merged = model.merge_and_unload().state_dict()
    base_t = dir_tensors(base)
    deltas = _factors(out)
    for name, d in deltas.items():
        torch.testing.assert_close(
            merged[name].double() - base_t[name].double(), d, atol=1e-5, rtol=1e-4
        )
        assert 0 < torch.linalg.matrix_rank(d.float()) <= 16
