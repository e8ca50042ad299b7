"""Sparsify each task vector, then add or sign-elect: mergekit's generalized task arithmetic.

TIES (Yadav et al. 2023, https://arxiv.org/abs/2306.01708) trims each τ to its
largest entries, elects a sign per parameter and averages the agreeing values.
DARE (Yu et al. 2024, https://arxiv.org/abs/2311.03099) drops entries at
random and rescales the rest, then sums (dare-linear) or elects (dare-ties).
Model Breadcrumbs (https://arxiv.org/abs/2312.06795) drops the largest outliers
and the smallest entries; DELLA (https://arxiv.org/abs/2406.11617) drops at random
with a probability falling with magnitude; SCE (https://arxiv.org/abs/2408.07990)
keeps the entries that vary most across experts and weights experts by energy.
Semantics follow mergekit's methods of the same names by default; options give
the TIES paper's global trim and PEFT's count normalisation.

Each tensor is merged whole: memory holds the experts' τ of one tensor, the
base tensor and the result (experts + 2 tensors).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from compressor.errors import OptionError
from compressor.hookspecs import hookimpl
from compressor.io.sources import block_shape, row_blocks
from compressor.merging import exact as mergekit_exact
from compressor.merging.loop import (
    CONSENSUS_CHUNK,
    SCALE_OPTION,
    WEIGHTS_OPTION,
    TensorMerge,
    expert_weights,
    flat_chunks,
    keep_above_,
    keep_top_k_,
    part_names,
    row_spans,
    sign_consensus,
    trim_count,
    weighted_sum,
)
from compressor.merging.sparsify import TopKThreshold, magnitude_bits
from compressor.method import Option, fraction, non_negative

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch


def _normalize(default: str) -> Option:
    return Option(
        "normalize",
        "choice",
        default,
        "divide the merged τ by the summed weights of the contributing experts (mergekit), "
        "by their number (PEFT), or not at all",
        choices=("weights", "count", "none"),
    )


ELECTION = Option(
    "election",
    "choice",
    "weighted",
    "elect each parameter's sign from Σ w_t·τ_t (mergekit) or the unweighted Σ τ_t (PEFT)",
    choices=("weighted", "unweighted"),
)


def dare_seed(seed: int, expert: int, name: str) -> int:
    """The mask seed of one expert's tensor: independent of block size and tensor order."""
    digest = hashlib.blake2b(f"{seed}:{expert}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class _SparsifyMerge(TensorMerge):
    """Sparsify every expert's τ of a tensor, then sum or sign-elect: mergekit's
    generalized task arithmetic, one tensor at a time."""

    version = "1"
    consensus = True
    per_expert = frozenset({"weights", "density", "gamma", "epsilon"})

    def prepare(self, job, views):
        return {"kept": 0, "total": 0}

    def merge(self, call):
        import torch

        deltas = []
        for t, d in enumerate(call.tensors):
            if d is not None:
                d = self.sparsify(call, t, d.reshape(-1))
                call.state["kept"] += int(torch.count_nonzero(d))
            call.state["total"] += call.base.numel()
            deltas.append(d)
        weights = expert_weights(call.per["weights"])
        opts = call.shared
        if self.consensus:
            mixed = sign_consensus(deltas, weights, opts["election"], opts["normalize"])
        else:
            mixed = weighted_sum(deltas, weights, opts["normalize"])
        if mixed is not None:
            call.base.add_(mixed.reshape(call.base.shape), alpha=opts["scale"])
        return call.base

    def metrics(self, job, state):
        return {"kept": state["kept"] / state["total"] if state["total"] else 0.0}

    def sparsify(self, call, t: int, tau: torch.Tensor) -> torch.Tensor:
        """Expert t's flat float32 τ of one tensor, sparsified (in place allowed)."""
        raise NotImplementedError

    def merge_exact(self, call):
        """mergekit's generalized task arithmetic in its compute dtype, where the options
        are mergekit's (weighted election, normalize by weights or not at all)."""
        opts = call.shared
        if opts["normalize"] == "count" or opts.get("election", "weighted") != "weighted":
            return self.merge(call)
        result, kept = mergekit_exact.task_arithmetic(
            call.base,
            call.tensors,
            call.exact,
            expert_weights(call.per["weights"]),
            lambda t, delta: self.sparsify_exact(call, t, delta),
            self.consensus,
            opts["normalize"] == "weights",
            opts["scale"],
        )
        call.state["kept"] += kept
        call.state["total"] += call.base.numel() * len(call.tensors)
        return result

    def sparsify_exact(self, call, t: int, delta: torch.Tensor) -> torch.Tensor:
        """Expert t's δ in the compute dtype, sparsified as mergekit does; by default our
        float32 sparsifier (a seeded random drop has no mergekit twin)."""
        flat = self.sparsify(call, t, delta.float().reshape(-1))
        return flat.reshape(delta.shape).to(delta.dtype)


def _density(default: float, help: str = "fraction of each τ's entries kept") -> Option:
    return Option("density", "float", default, help, check=fraction)


class Ties(_SparsifyMerge):
    """TIES: trim each τ to its largest entries, elect signs, take the disjoint mean.

    ``scope tensor`` (mergekit, the default) keeps the top ``density`` fraction of
    each tensor of each τ; ``scope global`` keeps the top fraction of each whole τ
    (the TIES paper), found in two streaming passes before the merge (one density
    per expert: filters and gradients do not apply there). Exactly k = int(density·n)
    entries are kept (at least one); ties at the threshold are taken in flat order.
    """

    name = "ties"
    summary = "TIES merging: trim each task vector, elect signs, average the agreeing entries"
    reference = "https://arxiv.org/abs/2306.01708"
    options = (
        WEIGHTS_OPTION,
        SCALE_OPTION,
        _density(0.2),
        Option(
            "scope",
            "choice",
            "tensor",
            "trim per tensor (mergekit) or over each whole task vector (the TIES paper)",
            choices=("tensor", "global"),
        ),
        _normalize("weights"),
        ELECTION,
    )

    def prepare(self, job, views):
        """With ``scope global``: per expert, [threshold bits, tied entries still to keep]."""
        from compressor.merging.params import TensorParameters

        state = super().prepare(job, views)
        if job.options["scope"] != "global":
            return state
        densities = TensorParameters(job.options, self.per_expert, len(views)).at("", 0.0)[1]
        budgets = []
        names = [n for n in job.base.names() if job.base.info(n).is_float]
        earlier = _earlier_names(job, names)
        for t, view in enumerate(views):
            density = densities["density"][t]
            finder = TopKThreshold()
            desc = f"ties: threshold of expert {t + 1}"
            for block in job.progress(_tau_blocks(job, view, names), desc=desc, unit="block"):
                finder.add_high(block)
            k = trim_count(density, finder.total)
            if density < 1 and finder.start_refine(k):
                for block in _tau_blocks(job, view, names):
                    finder.add_low(block)
                threshold = finder.threshold()
                ties = k - finder.above
                if earlier:  # the tied entries of earlier parts come first in flat order
                    blocks = _tau_blocks(job, view, earlier)
                    ties -= sum(int((magnitude_bits(b) == threshold).sum()) for b in blocks)
                budgets.append([threshold, max(ties, 0)])
            else:
                budgets.append(None)  # keep everything
        return {**state, "budgets": budgets}

    def merge_exact(self, call):
        if call.state.get("budgets") is not None:  # scope global: not mergekit's
            return self.merge(call)
        return super().merge_exact(call)

    def sparsify_exact(self, call, t, delta):
        return mergekit_exact.magnitude(delta, call.per["density"][t])

    def sparsify(self, call, t, tau):
        budgets = call.state.get("budgets")
        if budgets is not None:
            budget = budgets[t]
            if budget is None:
                return tau
            budget[1] -= keep_above_(tau, budget[0], budget[1])
            return tau
        density = call.per["density"][t]
        if density >= 1:
            return tau
        return keep_top_k_(tau, trim_count(density, tau.numel()))


def _earlier_names(job, names: list[str]) -> list[str]:
    """Of ``names``, those a split merge's earlier parts hold (none when not split)."""
    before = set(part_names(job.base, job.part, before=True))
    return [name for name in names if name in before]


def _tau_blocks(job, read, names: list[str]):
    """Every row block of an expert's τ, zeros where it has none (an adapter's other tensors)."""
    import torch

    for name in names:
        info = job.base.info(name)
        for rows in row_blocks(info):
            d = read(name, rows)
            yield d if d is not None else torch.zeros(block_shape(info, rows))


def _seeded(call, t: int):
    import torch

    return torch.Generator().manual_seed(dare_seed(call.shared["seed"], t, call.name))


def row_views(tau, chunk: int = CONSENSUS_CHUNK):
    """A contiguous τ as views of whole rows, about CONSENSUS_CHUNK entries each (one view
    of a vector): writes reach τ, and each chunk's draws in turn are the whole tensor's."""
    if tau.dim() < 2:
        return [tau]
    rows = tau.view(tau.shape[0], -1)
    return [rows[a:b] for a, b in row_spans(*rows.shape, chunk)]


class _Dare(_SparsifyMerge):
    """DARE: keep each entry with probability ``density`` (seeded), rescale the kept ones."""

    reference = "https://arxiv.org/abs/2311.03099"

    def sparsify(self, call, t, tau):
        import torch

        density = call.per["density"][t]
        if density >= 1:
            return tau
        how = call.shared["rescale"]
        before = float(tau.abs().sum()) if how == "l1" else 0.0  # τ's norm, before the drop
        generator = _seeded(call, t)
        for part in flat_chunks(tau):  # the same draws as one torch.rand of τ's shape
            part.mul_((torch.rand(part.shape, generator=generator) < density).to(part.device))
        return rescale_kept_(tau, how, density, before)


SEED = Option("seed", "int", 0, "random seed of the drop masks")


def _rescale(default: str, choices=("density", "l1", "none")) -> Option:
    return Option(
        "rescale",
        "choice",
        default,
        "rescale kept entries by 1/density (the paper, PEFT), to τ's L1 norm (mergekit), or not",
        choices=choices,
    )


def _dare_options(normalize: str, consensus: bool) -> tuple[Option, ...]:
    return (
        WEIGHTS_OPTION,
        SCALE_OPTION,
        _density(0.5, "probability of keeping each entry of τ (1 − the drop rate p)"),
        SEED,
        _rescale("density"),
        _normalize(normalize),
        *((ELECTION,) if consensus else ()),
    )


class DareLinear(_Dare):
    """DARE then a weighted sum of the task vectors."""

    name = "dare-linear"
    summary = "DARE: drop task-vector entries at random, rescale, add (weighted sum)"
    consensus = False
    options = _dare_options("none", consensus=False)


class DareTies(_Dare):
    """DARE then TIES' sign election and disjoint sum."""

    name = "dare-ties"
    summary = "DARE then TIES sign election: drop at random, rescale, elect signs, add"
    options = _dare_options("none", consensus=True)


GAMMA = Option(
    "gamma", "float", 0.01, "fraction of the largest |τ| dropped as outliers", check=non_negative
)


class Breadcrumbs(_SparsifyMerge):
    """Model Breadcrumbs: drop each τ's largest outliers and smallest entries, then add."""

    name = "breadcrumbs"
    summary = "Model Breadcrumbs: drop outliers and small entries of each τ, add (weighted sum)"
    reference = "https://arxiv.org/abs/2312.06795"
    consensus = False
    options = (WEIGHTS_OPTION, SCALE_OPTION, _density(0.9), GAMMA, _normalize("none"))

    def sparsify(self, call, t, tau):
        return breadcrumbs(tau, call.per["density"][t], call.per["gamma"][t])

    def sparsify_exact(self, call, t, delta):
        density, gamma = call.per["density"][t], call.per["gamma"][t]
        return mergekit_exact.magnitude_outliers(delta, density, gamma)


class BreadcrumbsTies(Breadcrumbs):
    """Model Breadcrumbs, then TIES' sign election."""

    name = "breadcrumbs-ties"
    summary = "Model Breadcrumbs then TIES sign election and disjoint sum"
    consensus = True
    options = (WEIGHTS_OPTION, SCALE_OPTION, _density(0.9), GAMMA, _normalize("none"), ELECTION)


EPSILON = Option(
    "epsilon",
    "float",
    0.15,
    "keep probabilities spread from density − ε (smallest |τ| of a row) to density + ε",
    check=non_negative,
)


def _della_options(normalize: str, consensus: bool) -> tuple[Option, ...]:
    return (
        WEIGHTS_OPTION,
        SCALE_OPTION,
        _density(0.7, "mean probability of keeping an entry of τ"),
        EPSILON,
        SEED,
        _rescale("l1", ("l1", "none")),
        _normalize(normalize),
        *((ELECTION,) if consensus else ()),
    )


class Della(_SparsifyMerge):
    """DELLA: magnitude-ranked random drop per row, rescale, elect signs, add."""

    name = "della"
    summary = "DELLA: drop τ entries at random, less often the larger they are; elect signs"
    reference = "https://arxiv.org/abs/2406.11617"
    options = _della_options("weights", consensus=True)

    def sparsify(self, call, t, tau):
        density = call.per["density"][t]
        if density >= 1:
            return tau
        shaped = tau.reshape(call.base.shape).contiguous()  # a view of τ when it can be
        how, generator = call.shared["rescale"], _seeded(call, t)
        before = float(shaped.abs().sum()) if how == "l1" else 0.0
        for rows in row_views(shaped):  # bounded temporaries; the same draws as whole
            della_(rows, density, call.per["epsilon"][t], generator)
        return rescale_kept_(shaped, how, density, before).reshape(-1)


class DellaLinear(Della):
    """DELLA's drop, then a weighted sum."""

    name = "della-linear"
    summary = "DELLA's magnitude-ranked random drop, then a weighted sum of the task vectors"
    consensus = False
    options = _della_options("none", consensus=False)


class Sce(TensorMerge):
    """SCE: select the entries that vary most across experts, weight experts by the energy
    of their τ, erase minority signs, average."""

    name = "sce"
    summary = "SCE: keep high-variance entries, weight experts by τ energy, elect signs, average"
    reference = "https://arxiv.org/abs/2408.07990"
    version = "1"
    options = (
        Option(
            "select_topk",
            "float",
            1.0,
            "fraction of entries kept: those whose τ varies most across experts",
            check=fraction,
        ),
        SCALE_OPTION,
    )
    per_expert = frozenset()

    def merge(self, call):
        import torch

        taus = [torch.zeros_like(call.base) if d is None else d for d in call.tensors]
        mask = sce_select(taus, call.shared["select_topk"])
        if mask is not None:
            taus = [tau.mul_(mask) for tau in taus]
        weights = sce_weights(taus)
        mixed = sign_consensus(taus, weights, "unweighted", "weights")
        return call.base.add_(mixed, alpha=call.shared["scale"])

    def merge_exact(self, call):
        """mergekit's steps in its compute dtype, the whole tensor at once (as mergekit)."""
        opts = call.shared
        return mergekit_exact.sce(
            call.base, call.tensors, call.exact, opts["select_topk"], opts["scale"]
        )


# -- the rules: what each method computes for one tensor --------------------


def rescale_kept_(kept: torch.Tensor, how: str, density: float, before: float) -> torch.Tensor:
    """Kept entries of τ (masked in place) rescaled in place: to τ's L1 norm ``before`` the
    drop (``l1``, mergekit), by 1/density (``density``, the DARE paper, PEFT) or not."""
    if how == "l1":
        after = float(kept.abs().sum())
        return kept if before < 1e-7 or after < 1e-7 else kept.mul_(before / after)
    return kept.div_(density) if how == "density" else kept


def breadcrumbs(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``gamma`` fraction of largest |τ| (outliers) and the
    smallest, keeping int(density·n) entries (https://arxiv.org/abs/2312.06795).

    mergekit sorts |τ|; the same ranks are found here by threshold, in place and chunk by
    chunk (entries tied at a cut are taken in flat order, where a sort's order is its own).
    """
    if density >= 1:
        return tau
    n = tau.numel()
    keep = int(density * n)
    outliers = min(int(gamma * n), n - keep)  # fewer dropped when density asks for more
    return keep_top_k_(tau, outliers + keep, drop=outliers)


def della_(
    tau: torch.Tensor, density: float, epsilon: float, generator: torch.Generator
) -> torch.Tensor:
    """DELLA's MagPrune, in place: keep each entry with a probability rising with its
    magnitude's rank in its row, from density − ε to density + ε
    (https://arxiv.org/abs/2406.11617). Rows are independent, so a caller may pass τ's rows
    in chunks; the draws then come in the same order as for the whole tensor."""
    import torch

    if density >= 1:
        return tau
    if not (0 < density - epsilon and density + epsilon < 1):
        raise OptionError(
            f"della needs density ± epsilon inside (0, 1); got density {density:g}, "
            f"epsilon {epsilon:g}"
        )
    rows = tau.unsqueeze(0) if tau.dim() < 2 else tau.view(tau.shape[0], -1)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).float().add_(1)
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    spread = ranks.sub_(low).div_(high - low)  # in place: ranks are not needed again
    probs = spread.clamp_(0, 1).mul_(2 * epsilon).add_(density - epsilon)
    rows.mul_(torch.rand(probs.shape, generator=generator).to(probs.device) < probs)
    return tau


def sce_select(taus: list[torch.Tensor], fraction: float) -> torch.Tensor | None:
    """SCE's select step: the mask of the ``fraction`` of entries (of those that vary at
    all) whose task vectors vary most across experts; None keeps everything.

    The variance is accumulated expert by expert (no stack of all τ) and the top entries
    found by threshold (ties in flat order, where mergekit's topk has its own)."""
    import torch

    if fraction >= 1:
        return None
    mean = torch.zeros_like(taus[0])
    for tau in taus:
        mean.add_(tau)
    mean.div_(len(taus))
    var = torch.zeros_like(mean)
    for tau in taus:
        gap = tau - mean
        var.addcmul_(gap, gap)
        del gap
    del mean
    var.div_(len(taus))
    k = int(int(torch.count_nonzero(var)) * fraction)
    return keep_top_k_(var, k).ne_(0)  # 1.0 where kept, in var's dtype


def sce_weights(taus: list[torch.Tensor]) -> list[float]:
    """SCE's calculate step: each expert's weight ∝ the mean square of its task vector."""
    energy = [float(t.square().mean()) for t in taus]
    total = sum(energy)
    if abs(total) < 1e-6:
        return [1.0 / len(taus)] * len(taus)
    return [e / total for e in energy]


@hookimpl
def register_methods(register):
    for method in (Ties, DareLinear, DareTies, Breadcrumbs, BreadcrumbsTies, Della, DellaLinear):
        register(method())
    register(Sce())
