"""Every merge method mergekit has, against mergekit's own result on the same tiny Llamas."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import artifact_tensors, dir_tensors

from compressor.demo.models import save_finetune
from compressor.merging.params import layer_positions


@pytest.fixture(scope="module")
def trio(models, tmp_path_factory):
    """The fp32 base, its two fine-tunes and a third one."""
    base = models["base-fp32"]
    ft3 = save_finetune(base, tmp_path_factory.mktemp("ft3") / "ft3", seed=4)
    return {"base": base, "e1": models["ft1-fp32"], "e2": models["ft2-fp32"], "e3": ft3}


def _ours(run, plugin, base, experts, options=()):
    args = ["merge", "-p", plugin, *(["--base", base] if base else []), *experts]
    r = run(*args, *options, "-n", "m")
    assert r.exit_code == 0, r.output
    return artifact_tensors("m")


def _theirs(trio, method, ids, base, parameters):
    from mergekit.merge_methods.api import merge_state_dicts

    return merge_state_dicts(
        {i: dir_tensors(trio[i]) for i in ids}, method, base=base, parameters=parameters
    )


def _same(ours, theirs, atol=1e-5):
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype, name
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=atol, msg=name)


# (our plugin, our options, mergekit method, mergekit parameters, base, experts)
CASES = [
    ("linear", ["-o", "weights", "0.3,0.7"], "linear", {"weight": [0.3, 0.7]}, None, "e1 e2"),
    (
        "linear",
        ["-o", "weights", "1,2,0.5", "-o", "normalize", "false"],
        "linear",
        {"weight": [1.0, 2.0, 0.5], "normalize": False},
        "base",
        "e1 e2",
    ),
    ("slerp", ["-o", "t", "0.3"], "slerp", {"t": 0.3}, "base", "e1"),
    ("nuslerp", ["-o", "weights", "0.4,0.6"], "nuslerp", {"weight": [0.4, 0.6]}, None, "e1 e2"),
    (
        "nuslerp",
        ["-o", "weights", "1,3", "-o", "flatten", "false", "-o", "row_wise", "true"],
        "nuslerp",
        {"weight": [1.0, 3.0], "nuslerp_flatten": False, "nuslerp_row_wise": True},
        "base",
        "e1 e2",
    ),
    (
        "multislerp",
        ["-o", "weights", "1,2,1"],
        "multislerp",
        {"weight": [1, 2, 1]},
        None,
        "e1 e2 e3",
    ),
    ("multislerp", [], "multislerp", {"weight": [1.0, 1.0]}, "base", "e1 e2"),
    ("karcher", [], "karcher", {}, None, "e1 e2 e3"),
    ("karcher", ["-o", "max_iter", "3"], "karcher", {"max_iter": 3}, "base", "e1 e2"),
    ("model-stock", [], "model_stock", {}, "base", "e1 e2 e3"),
    (
        "model-stock",
        ["-o", "filter_wise", "true"],
        "model_stock",
        {"filter_wise": True},
        "base",
        "e1 e2",
    ),
    ("nearswap", ["-o", "t", "0.002"], "nearswap", {"t": 0.002}, "base", "e1"),
    ("arcee-fusion", [], "arcee_fusion", {}, "base", "e1"),
    ("sce", [], "sce", {}, "base", "e1 e2 e3"),
    ("sce", ["-o", "select_topk", "0.3"], "sce", {"select_topk": 0.3}, "base", "e1 e2"),
    (
        "breadcrumbs",
        ["-o", "density", "0.8", "-o", "gamma", "0.05", "-o", "weights", "0.5,1"],
        "breadcrumbs",
        {"density": 0.8, "gamma": 0.05, "weight": [0.5, 1.0]},
        "base",
        "e1 e2",
    ),
    (
        "breadcrumbs-ties",
        ["-o", "density", "0.6", "-o", "gamma", "0.02", "-o", "scale", "0.9"],
        "breadcrumbs_ties",
        {"density": 0.6, "gamma": 0.02, "weight": 1.0, "lambda": 0.9},
        "base",
        "e1 e2",
    ),
    (
        "task-arithmetic",
        ["-o", "weights", "0.5,1.5", "-o", "normalize", "true"],
        "task_arithmetic",
        {"weight": [0.5, 1.5], "normalize": True},
        "base",
        "e1 e2",
    ),
]


@pytest.mark.parametrize("plugin, options, method, parameters, base, experts", CASES)
def test_matches_mergekit(run, trio, plugin, options, method, parameters, base, experts):
    experts = experts.split()
    ids = [*experts, *([base] if base else [])]
    ours = _ours(run, plugin, trio[base] if base else None, [trio[e] for e in experts], options)
    theirs = _theirs(trio, method, ids, base, parameters)
    _same(ours, theirs)


@pytest.fixture(scope="module")
def far(trio, tmp_path_factory):
    """The base and two experts perturbed by about their own size: far from colinear, so
    spherical methods cannot fall back to linear interpolation."""
    base = trio["base"]
    made = {
        name: save_finetune(base, tmp_path_factory.mktemp(name) / name, seed=seed, strength=1.0)
        for name, seed in (("f1", 11), ("f2", 12))
    }
    return {"base": base, **made}


FAR_CASES = [
    ("slerp", ["-o", "t", "0.3"], "slerp", {"t": 0.3}, "base", "f1"),
    ("nuslerp", ["-o", "weights", "0.4,0.6"], "nuslerp", {"weight": [0.4, 0.6]}, None, "f1 f2"),
    (
        "nuslerp",
        ["-o", "weights", "1,3", "-o", "flatten", "false", "-o", "row_wise", "true"],
        "nuslerp",
        {"weight": [1.0, 3.0], "nuslerp_flatten": False, "nuslerp_row_wise": True},
        "base",
        "f1 f2",
    ),
    (
        "nuslerp",
        ["-o", "weights", "2,1", "-o", "flatten", "false"],
        "nuslerp",
        {"weight": [2.0, 1.0], "nuslerp_flatten": False},
        None,
        "f1 f2",
    ),
    ("multislerp", ["-o", "weights", "1,2"], "multislerp", {"weight": [1, 2]}, None, "f1 f2"),
    ("multislerp", [], "multislerp", {"weight": [1.0, 1.0]}, "base", "f1 f2"),
    ("karcher", [], "karcher", {}, None, "f1 f2"),
    ("model-stock", [], "model_stock", {}, "base", "f1 f2"),
    (
        "model-stock",
        ["-o", "filter_wise", "true"],
        "model_stock",
        {"filter_wise": True},
        "base",
        "f1 f2",
    ),
    ("nearswap", ["-o", "t", "0.5"], "nearswap", {"t": 0.5}, "base", "f1"),
    ("arcee-fusion", [], "arcee_fusion", {}, "base", "f1"),
]


@pytest.mark.parametrize("plugin, options, method, parameters, base, experts", FAR_CASES)
def test_far_apart_experts_match_mergekit(
    run, far, plugin, options, method, parameters, base, experts
):
    """Experts as far from the base as the weights are large: the angles are wide, so
    per-row against per-tensor geometry and the non-linear branches are all exercised."""
    experts = experts.split()
    ids = [*experts, *([base] if base else [])]
    ours = _ours(run, plugin, far[base] if base else None, [far[e] for e in experts], options)
    theirs = _theirs(far, method, ids, base, parameters)
    _same(ours, theirs)


@pytest.mark.parametrize("shape", [(5_000_003,), (2_100, 2_048), (700, 3, 2_048)])
def test_nuslerp_in_blocks_matches_mergekit_on_tensors_larger_than_a_block(shape):
    """nuslerp sums its statistics over blocks of rows (or of a flat tensor's entries) and
    writes block by block; on tensors of more than one block (4M entries) it equals
    mergekit's whole-tensor nuslerp in every mode, of task vectors when given a base.
    mergekit runs in float64 here: its float32 sum of 4M products is itself 2e-4 off."""
    from mergekit.merge_methods.nuslerp import nuslerp as theirs

    from compressor.plugins.interpolation import nuslerp

    gen = torch.Generator().manual_seed(len(shape))
    base = torch.randn(shape, generator=gen)
    v0, v1 = base + torch.randn(shape, generator=gen), base + torch.randn(shape, generator=gen)
    for row_wise, flatten in ((False, True), (False, False), (True, False)):
        dim = 0 if row_wise else -1
        want = theirs(0.3, v0.double(), v1.double(), dim=dim, flatten=flatten).float()
        got = nuslerp(0.3, v0, v1, row_wise, flatten)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=str((row_wise, flatten)))
        d0, d1 = (v0 - base).double(), (v1 - base).double()
        want = base + theirs(0.3, d0, d1, dim=dim, flatten=flatten).float()
        got = nuslerp(0.3, v0, v1, row_wise, flatten, base)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=str((row_wise, flatten)))


def test_per_expert_density_and_filtered_weights_match_mergekit_per_tensor(run, trio):
    """density@N per expert and weights:FILTER per tensor name, against mergekit with the
    same values written per tensor group (PerGroupValues)."""
    from mergekit.merge_methods.base import PerGroupValues

    options = ["-o", "density@1", "0.3", "-o", "density@2", "0.6"]
    options += ["-o", "weights:self_attn", "0.5", "-o", "weights@2:mlp", "2"]
    ours = _ours(run, "ties", trio["base"], [trio["e1"], trio["e2"]], options)
    names = list(dir_tensors(trio["base"]))

    def weight(name, expert):
        if expert == "e2" and "mlp" in name:
            return 2.0
        return 0.5 if "self_attn" in name else 1.0

    theirs = _theirs(
        trio,
        "ties",
        ["e1", "e2", "base"],
        "base",
        {
            "density": {"e1": 0.3, "e2": 0.6},
            "weight": PerGroupValues([{e: weight(n, e) for e in ("e1", "e2")} for n in names]),
        },
    )
    _same(ours, theirs)


def test_slerp_gradient_over_layers(run, trio):
    """t 0,1 over the two layers: layer 0 is the base, layer 1 the expert, the rest t = 0."""
    from mergekit.merge_methods.base import PerGroupValues

    ours = _ours(run, "slerp", trio["base"], [trio["e1"]], ["-o", "t", "0,1"])
    names = list(dir_tensors(trio["base"]))
    positions = layer_positions(names)
    assert positions["model.layers.1.mlp.up_proj.weight"] == 1.0
    assert positions["lm_head.weight"] == 0.0
    theirs = _theirs(
        trio, "slerp", ["base", "e1"], "base", {"t": PerGroupValues([positions[n] for n in names])}
    )
    _same(ours, theirs)
    base, e1 = dir_tensors(trio["base"]), dir_tensors(trio["e1"])
    assert torch.equal(
        ours["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"]
    )
    torch.testing.assert_close(
        ours["model.layers.1.mlp.up_proj.weight"], e1["model.layers.1.mlp.up_proj.weight"]
    )


def test_della_keeps_density_on_average_favours_large_entries_and_is_seeded(run, trio):
    """DELLA is random: the kept fraction, the rank-dependent keep rate and the L1 rescale
    are checked on one expert; the seed makes the result reproducible."""
    options = ["-o", "density", "0.5", "-o", "epsilon", "0.3", "-o", "weights", "1"]
    a = _ours(run, "della-linear", trio["base"], [trio["e1"]], options)
    again = _ours(run, "della-linear", trio["base"], [trio["e1"]], options)
    other = _ours(run, "della-linear", trio["base"], [trio["e1"]], [*options, "-o", "seed", "1"])
    base, e1 = dir_tensors(trio["base"]), dir_tensors(trio["e1"])
    name = "model.layers.0.mlp.down_proj.weight"  # 64 x 128
    assert torch.equal(a[name], again[name]) and not torch.equal(a[name], other[name])
    tau, merged = e1[name] - base[name], a[name] - base[name]
    kept = merged != 0
    n = kept.numel()
    assert abs(kept.float().mean().item() - 0.5) < 4 * (0.25 / n) ** 0.5
    ranks = tau.abs().argsort(dim=1).argsort(dim=1)
    small, large = ranks < 32, ranks >= 96  # per row: the smallest and largest quarter
    # keep probability 0.2 + 0.6·rank/127: about 0.27 in the smallest quarter, 0.73 in the largest
    assert abs(kept[small].float().mean().item() - 0.27) < 0.04
    assert abs(kept[large].float().mean().item() - 0.73) < 0.04
    torch.testing.assert_close(merged.abs().sum(), tau.abs().sum(), rtol=1e-4, atol=0)
    torch.testing.assert_close(
        merged[kept] / tau[kept],
        torch.full((int(kept.sum()),), float(tau.abs().sum() / tau[kept].abs().sum())),
        rtol=1e-3,
        atol=0,
    )


def test_della_epsilon_outside_the_range_is_refused(run, trio, private_store):
    from conftest import assert_refused

    assert_refused(
        run,
        private_store,
        ["merge", "-p", "della", "--base", trio["base"], trio["e1"], "-o", "density", "0.9"],
        "della needs density ± epsilon inside (0, 1); got density 0.9, epsilon 0.15",
        code=2,
    )


@pytest.mark.parametrize(
    "plugin, options, message",
    [
        ("ties", ["-o", "density@3", "0.5"], "option 'density@3' names expert 3; there are 2"),
        (
            "ties",
            ["-o", "density@nope", "0.5"],
            "option 'density@nope': 'nope' is not one of the experts ({e1}, {e2})",
        ),
        ("slerp", ["-o", "t@1", "0.5"], "option 't' is not per expert; 't@1' names an expert"),
        ("ties", ["-o", "weights", "1,2,3"], "option 'weights' has 3 values for 2 experts"),
        (
            "linear",
            ["-o", "weights", "1,-1"],
            "linear: the weights sum to 0; give other weights or normalize false",
        ),
    ],
    ids=["expert out of range", "unknown expert", "shared option per expert", "count", "zero sum"],
)
def test_bad_merge_options_are_refused(run, trio, private_store, plugin, options, message):
    from conftest import assert_refused

    experts = [trio["e1"]] if plugin == "slerp" else [trio["e1"], trio["e2"]]
    base = [] if plugin == "linear" else ["--base", trio["base"]]
    assert_refused(
        run,
        private_store,
        ["merge", "-p", plugin, *base, *experts, *options],
        message.format(e1=trio["e1"], e2=trio["e2"]),
        code=2,
    )


@pytest.fixture(scope="module")
def untouched(trio, tmp_path_factory):
    """The fine-tunes with one tensor left as the base's in every one of them (BERT's
    pooler in every sentence-transformers fine-tune)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("untouched")
    base = load_file(trio["base"] / "model.safetensors")
    out = {}
    for e in ("e1", "e2", "e3"):
        out[e] = shutil.copytree(trio[e], root / e)
        tensors = load_file(out[e] / "model.safetensors")
        tensors["model.norm.weight"] = base["model.norm.weight"].clone()
        save_file(tensors, out[e] / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(
    "plugin, experts",
    [
        ("multislerp", "e1 e2 e3"),
        ("nuslerp", "e1 e2"),
        ("slerp", "e1"),
        ("karcher", "e1 e2"),
        ("model-stock", "e1 e2 e3"),
        ("linear", "e1 e2"),
    ],
)
def test_a_tensor_no_expert_changed_stays_the_base(run, trio, untouched, plugin, experts):
    """multislerp of experts that all leave a tensor unchanged failed the whole merge ("the
    weighted mean direction of the experts is zero"; mergekit fails alike)."""
    base = dir_tensors(trio["base"])
    ours = _ours(run, plugin, trio["base"], [untouched[e] for e in experts.split()])
    torch.testing.assert_close(
        ours["model.norm.weight"], base["model.norm.weight"], rtol=0, atol=1e-6
    )
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(ours[name], base[name])  # the changed tensors did merge


@pytest.mark.parametrize("t", ["1.5", "-0.25"])
def test_slerp_t_outside_the_unit_interval_is_a_warning(run, trio, t):
    """slerp -o t 1.5 was accepted silently; it extrapolates (mergekit runs it too)."""
    r = run("--quiet", "merge", "-p", "slerp", "--base", trio["base"], trio["e1"], "-o", "t", t)
    assert r.exit_code == 0, r.output
    past = "the expert" if float(t) > 1 else "the base"
    assert r.stderr == (
        f"Warning: slerp t {float(t):g} is outside [0, 1]: the merge extrapolates beyond "
        f"{past} (mergekit does the same)\n"
    )
