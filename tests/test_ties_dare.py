"""ties, dare-linear, dare-ties against mergekit and PEFT on the same inputs."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import artifact_tensors, dir_tensors

from compressor.plugins.ties_dare import dare_seed


def _merge(run, plugin, base, *experts, options=(), name="m"):
    r = run("merge", "-p", plugin, "--base", base, *experts, *options, "-n", name)
    assert r.exit_code == 0, r.output
    return artifact_tensors(name)


def _taus(base: dict, *experts: dict) -> list[dict]:
    return [{n: e[n] - base[n] for n in base if base[n].is_floating_point()} for e in experts]


def _tied_at_threshold(taus: list[dict], density: float) -> set[str]:
    """Tensors where the k-th and (k+1)-th largest |τ| of some expert are equal.

    There the k kept entries are a choice: mergekit takes torch.argsort's
    (arbitrary) order, we take flat order. Real fine-tunes have a few such ties.
    """
    tied = set()
    for tau in taus:
        for name, t in tau.items():
            k = max(1, int(density * t.numel()))
            if density < 1 and k < t.numel():
                top = t.abs().reshape(-1).topk(k + 1).values
                if top[-1] == top[-2]:
                    tied.add(name)
    return tied


@pytest.mark.parametrize(
    "density, weights, lam, normalize",
    [
        (0.3, (1.0, 1.0), 1.0, True),
        (0.5, (0.7, 0.3), 0.8, True),
        (0.4, (1.0, -0.5), 1.0, True),
        (1.0, (1.0, 1.0), 1.0, True),
        (0.3, (1.0, 2.0), 1.0, False),
    ],
)
def test_ties_matches_mergekit(run, models, density, weights, lam, normalize):
    from mergekit.merge_methods.api import merge_state_dicts

    base, e1, e2 = models["base-fp32"], models["ft1-fp32"], models["ft2-fp32"]
    options = ["-o", "density", str(density), "-o", "weights", ",".join(map(str, weights))]
    options += ["-o", "scale", str(lam)] + ([] if normalize else ["-o", "normalize", "none"])
    ours = _merge(run, "ties", base, e1, e2, options=options)
    theirs = merge_state_dicts(
        {"base": dir_tensors(base), "e1": dir_tensors(e1), "e2": dir_tensors(e2)},
        "ties",
        base="base",
        parameters={
            "weight": {"base": 0.0, "e1": weights[0], "e2": weights[1]},
            "density": {"base": 1.0, "e1": density, "e2": density},
            "lambda": lam,
            "normalize": normalize,
        },
    )
    assert ours.keys() == theirs.keys()
    b = dir_tensors(base)
    tied = _tied_at_threshold(_taus(b, dir_tensors(e1), dir_tensors(e2)), density)
    assert len(tied) <= 2
    for name in ours.keys() - tied:
        assert ours[name].dtype == theirs[name].dtype
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-5, msg=name)


def test_trim_keeps_exactly_k_and_breaks_ties_by_position():
    from compressor.merging.loop import top_k_mask

    tau = torch.tensor([0.5, -0.2, 0.2, 0.9, -0.2, 0.1, 0.2])
    assert top_k_mask(tau, 3).tolist() == [True, True, False, True, False, False, False]
    assert top_k_mask(tau, 5).tolist() == [True, True, True, True, True, False, False]
    assert int(top_k_mask(torch.zeros(10), 4).sum()) == 4


def test_dare_ties_at_density_one_matches_mergekit(run, models):
    from mergekit.merge_methods.api import merge_state_dicts

    base, e1, e2 = models["base-fp32"], models["ft1-fp32"], models["ft2-fp32"]
    ours = _merge(
        run, "dare-ties", base, e1, e2, options=["-o", "density", "1", "-o", "weights", "0.6,1.1"]
    )
    theirs = merge_state_dicts(
        {"base": dir_tensors(base), "e1": dir_tensors(e1), "e2": dir_tensors(e2)},
        "dare_ties",
        base="base",
        parameters={"weight": {"base": 0.0, "e1": 0.6, "e2": 1.1}, "density": 1.0},
    )
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-5, msg=name)


def test_ties_peft_options_match_peft_merge_utils(run, models):
    from peft.utils.merge_utils import ties

    base, e1, e2 = models["base-fp32"], models["ft1-fp32"], models["ft2-fp32"]
    options = ["-o", "density", "0.3", "-o", "weights", "0.8,0.4"]
    options += ["-o", "normalize", "count", "-o", "election", "unweighted"]
    ours = _merge(run, "ties", base, e1, e2, options=options)
    b = dir_tensors(base)
    t1, t2 = _taus(b, dir_tensors(e1), dir_tensors(e2))
    tied = _tied_at_threshold([t1, t2], 0.3)
    for name, tensor in ours.items():
        if name not in t1 or name in tied:
            continue
        mixed = ties([t1[name], t2[name]], torch.tensor([0.8, 0.4]), density=0.3)
        torch.testing.assert_close(tensor, b[name] + mixed, rtol=0, atol=1e-5, msg=name)


def test_ties_global_scope_is_the_papers_whole_model_trim(run, models):
    """scope global: one top-k per task vector over every tensor, then mergekit's consensus."""
    from mergekit.merge_methods.api import merge_state_dicts

    base, e1, e2 = models["base-fp32"], models["ft1-fp32"], models["ft2-fp32"]
    ours = _merge(
        run, "ties", base, e1, e2, options=["-o", "density", "0.2", "-o", "scope", "global"]
    )
    b = dir_tensors(base)
    trimmed = []
    for tau in _taus(b, dir_tensors(e1), dir_tensors(e2)):
        flat = torch.cat([t.reshape(-1) for t in tau.values()])
        k = int(0.2 * flat.numel())
        threshold = flat.abs().topk(k).values.min()
        trimmed.append({n: b[n] + t * (t.abs() >= threshold) for n, t in tau.items()})
    theirs = merge_state_dicts(
        {"base": b, "e1": {**b, **trimmed[0]}, "e2": {**b, **trimmed[1]}},
        "ties",
        base="base",
        parameters={"weight": {"base": 0.0, "e1": 1.0, "e2": 1.0}, "density": 1.0},
    )
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-5, msg=name)


def _dare_masked(tau: torch.Tensor, seed: int, expert: int, name: str, density: float):
    gen = torch.Generator().manual_seed(dare_seed(seed, expert, name))
    keep = (torch.rand(tau.numel(), generator=gen) < density).reshape(tau.shape)
    return tau * keep / density


def test_dare_keeps_the_density_fraction_rescaled_and_is_seeded(run, models):
    base, e1 = models["base-fp32"], models["ft1-fp32"]
    opts = ["-o", "density", "0.3", "-o", "seed", "7"]
    a = _merge(run, "dare-linear", base, e1, options=opts, name="a")
    again = _merge(run, "dare-linear", base, e1, options=opts, name="again")
    other = _merge(run, "dare-linear", base, e1, options=["-o", "density", "0.3"], name="other")
    b = dir_tensors(base)
    (tau,) = _taus(b, dir_tensors(e1))
    changed = total = 0
    for name, t in tau.items():
        assert torch.equal(a[name], again[name]), name
        got = a[name] - b[name]
        kept = got != 0
        changed += int(kept.sum())
        total += t.numel()
        # every kept entry is τ / density; every other one is exactly the base
        torch.testing.assert_close(got[kept], t[kept] / 0.3, rtol=1e-5, atol=1e-6)
    assert changed / total == pytest.approx(0.3, abs=0.01)
    assert any(not torch.equal(a[n], other[n]) for n in tau)


def test_dare_ties_matches_peft_with_the_same_masks(run, models):
    from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge

    base, e1, e2 = models["base-fp32"], models["ft1-fp32"], models["ft2-fp32"]
    options = ["-o", "density", "0.4", "-o", "seed", "3", "-o", "weights", "1.0,0.5"]
    options += ["-o", "normalize", "count", "-o", "election", "unweighted"]
    ours = _merge(run, "dare-ties", base, e1, e2, options=options)
    b = dir_tensors(base)
    taus = _taus(b, dir_tensors(e1), dir_tensors(e2))
    for name in taus[0]:
        stacked = torch.stack([_dare_masked(t[name], 3, i, name, 0.4) for i, t in enumerate(taus)])
        majority = calculate_majority_sign_mask(stacked, method="total")
        weights = torch.tensor([1.0, 0.5]).view(-1, *([1] * (stacked.dim() - 1)))
        mixed = disjoint_merge(stacked * weights, majority)
        torch.testing.assert_close(ours[name], b[name] + mixed, rtol=0, atol=1e-5, msg=name)


def test_dare_l1_rescale_keeps_each_tensors_l1_norm(run, models):
    base, e1 = models["base-fp32"], models["ft1-fp32"]
    got = _merge(
        run, "dare-linear", base, e1, options=["-o", "density", "0.5", "-o", "rescale", "l1"]
    )
    b = dir_tensors(base)
    (tau,) = _taus(b, dir_tensors(e1))
    for name, t in tau.items():
        if t.abs().sum() > 1e-3:
            assert float((got[name] - b[name]).abs().sum()) == pytest.approx(
                float(t.abs().sum()), rel=1e-4
            )


def test_adapters_compeft_and_models_mix(run, models, lora):
    """An adapter, a ComPEFT artifact and a model merge exactly like their stored task vectors.

    (The task vectors themselves are checked against PEFT's merge and ComPEFT's
    rule in test_task_arithmetic and test_compeft.)
    """
    adapter, _ = lora
    base, e1, e2 = models["base-fp32"], models["ft1-fp32"], models["ft2-fp32"]
    assert run("apply", "-p", "compeft", "--base", base, e2, "-n", "c2").exit_code == 0
    for src, tv in ((adapter, "tv-ad"), ("c2", "tv-c2"), (e1, "tv-e1")):
        assert run("apply", "-p", "task-vector", "--base", base, src, "-n", tv).exit_code == 0
    for plugin in ("ties", "dare-ties", "dare-linear"):
        mixed = _merge(run, plugin, base, adapter, "c2", e1, name=f"{plugin}-mixed")
        plain = _merge(run, plugin, base, "tv-ad", "tv-c2", "tv-e1", name=f"{plugin}-plain")
        for name in mixed:
            assert torch.equal(mixed[name], plain[name]), (plugin, name)


def test_bf16_experts_merge_in_float32_and_keep_the_dtype(run, models):
    base, e1, e2 = models["base-bf16"], models["ft1-bf16"], models["ft2-bf16"]
    got = _merge(run, "ties", base, e1, e2)
    assert all(t.dtype == torch.bfloat16 for t in got.values() if t.is_floating_point())
    assert math.isfinite(sum(float(t.float().sum()) for t in got.values()))


def test_readme_worked_example_against_mergekit_and_peft():
    """The README's example: the conventions differ in election and normalisation."""
    from mergekit.merge_methods.api import merge_tensors
    from peft.utils.merge_utils import ties

    from compressor.merging.loop import sign_consensus

    t1, t2 = torch.tensor([0.4, -0.2, 0.1, 0.2]), torch.tensor([-0.1, -0.6, 0.3, -0.3])
    zero = torch.zeros(4)

    def ours(election, normalize):
        return sign_consensus([t1.clone(), t2.clone()], [1.0, 0.5], election, normalize)

    mk = {"weight": [1.0, 0.5], "density": [1.0, 1.0]}
    mergekit_ties = merge_tensors([zero, t1, t2], "ties", base_index=0, parameters=mk)
    mergekit_dare_ties = merge_tensors([zero, t1, t2], "dare_ties", base_index=0, parameters=mk)
    with pytest.warns(UserWarning, match="no pruning will be performed"):
        peft_ties = ties([t1, t2], torch.tensor([1.0, 0.5]), density=1.0)
    for got, theirs, by_hand in (
        (ours("weighted", "weights"), mergekit_ties, [0.4, -0.5 / 1.5, 0.25 / 1.5, 0.2]),
        (ours("weighted", "none"), mergekit_dare_ties, [0.4, -0.5, 0.25, 0.2]),
        (ours("unweighted", "count"), peft_ties, [0.4, -0.25, 0.125, -0.15]),
    ):
        torch.testing.assert_close(got, theirs, rtol=0, atol=1e-6)
        torch.testing.assert_close(got, torch.tensor(by_hand), rtol=0, atol=1e-6)


@pytest.mark.parametrize("election", ["weighted", "unweighted"])
@pytest.mark.parametrize("normalize", ["weights", "count", "none"])
def test_sign_consensus_in_chunks_equals_it_in_one(election, normalize):
    """Sign election runs over chunks of entries (bounded temporaries) and writes into the
    first τ; any chunk size gives the same entries as one pass over the whole tensor, to
    the bit, zeros and a missing τ included."""
    from compressor.merging.loop import sign_consensus

    gen = torch.Generator().manual_seed(5)
    taus = [torch.randn(13, 11, generator=gen) for _ in range(3)]
    taus[1][taus[1].abs() < 0.5] = 0  # trimmed entries
    weights = [1.0, -0.5, 2.0]
    whole = sign_consensus(
        [t.clone() for t in taus] + [None], [*weights, 1.0], election, normalize, 1 << 30
    )
    for chunk in (1, 7, 64, 143):
        got = sign_consensus(
            [t.clone() for t in taus] + [None], [*weights, 1.0], election, normalize, chunk
        )
        assert got.shape == (13, 11)
        assert torch.equal(got, whole), chunk


@pytest.mark.parametrize("k", [1, 5, 17, 40, 64])
def test_top_k_in_chunks_keeps_the_entries_top_k_mask_keeps(k):
    """TIES' trim runs chunk by chunk in place (bounded temporaries); with many tied
    magnitudes (zeros, repeated values) it keeps exactly the entries the whole-tensor mask
    keeps, ties in flat order across chunk boundaries."""
    from compressor.merging.loop import keep_top_k_, top_k_mask

    gen = torch.Generator().manual_seed(k)
    tau = torch.randint(-3, 4, (8, 8), generator=gen).float() * 0.5  # ties everywhere
    want = tau.reshape(-1) * top_k_mask(tau, k)
    for chunk in (1, 3, 10, 64, 1000):
        got = keep_top_k_(tau.clone(), k, chunk=chunk)
        assert torch.equal(got.reshape(-1), want), chunk
    assert torch.equal(
        keep_top_k_(tau.clone().t(), k).reshape(-1), tau.t().reshape(-1) * top_k_mask(tau.t(), k)
    )
    for drop in (0, 1, k // 2, k):  # Breadcrumbs' band: the top k less the top `drop`
        for x in (tau, tau.t()):  # contiguous in chunks, and a strided view whole
            band = top_k_mask(x, k) & ~top_k_mask(x, drop) if drop else top_k_mask(x, k)
            for chunk in (3, 1000):
                got = keep_top_k_(x.clone(), k, drop, chunk).reshape(-1)
                assert torch.equal(got, x.reshape(-1) * band), (drop, chunk)

    from compressor.merging.loop import keep_above_, keep_mask, topk_threshold_bits

    threshold = topk_threshold_bits([tau.t()], k)
    mask, used = keep_mask(tau.t(), threshold, 2)
    strided = tau.clone().t()  # not contiguous: the whole-tensor path
    assert keep_above_(strided, threshold, 2) == used
    assert torch.equal(strided.reshape(-1), tau.t().reshape(-1) * mask)


def test_della_and_dare_in_chunks_draw_what_the_whole_tensor_draws():
    """DELLA's drop runs over a few rows at a time and DARE's over flat chunks (bounded
    temporaries); drawing the chunks in turn from one generator keeps the result of the
    whole tensor at once, so seeded merges stay the same."""
    from compressor.merging.loop import flat_chunks
    from compressor.plugins import ties_dare as merge_rules
    from compressor.plugins.ties_dare import row_views

    tau = torch.randn(37, 29, generator=torch.Generator().manual_seed(0))
    whole = merge_rules.della_(tau.clone(), 0.6, 0.2, torch.Generator().manual_seed(5))
    assert 0 < int((whole == 0).sum()) < tau.numel()
    for chunk in (1, 29, 100, 10_000):
        got, generator = tau.clone(), torch.Generator().manual_seed(5)
        for rows in row_views(got, chunk):
            merge_rules.della_(rows, 0.6, 0.2, generator)
        assert torch.equal(got, whole), chunk

    drawn = torch.rand(tau.shape, generator=torch.Generator().manual_seed(5)) < 0.3
    for chunk in (7, 10_000):
        got, generator = tau.clone(), torch.Generator().manual_seed(5)
        for part in flat_chunks(got, chunk):
            part.mul_(torch.rand(part.shape, generator=generator) < 0.3)
        assert torch.equal(got, tau * drawn), chunk
