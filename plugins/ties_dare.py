"""ties, dare-linear, dare-ties: sparsify each task vector, then add or sign-elect.

TIES (Yadav et al. 2023, https://arxiv.org/abs/2306.01708) trims each τ to its
largest entries, elects a sign per parameter and averages the agreeing values.
DARE (Yu et al. 2024, https://arxiv.org/abs/2311.03099) drops entries at
random and rescales the rest, then sums (dare-linear) or elects (dare-ties).
Semantics follow mergekit's ``ties``/``dare_linear``/``dare_ties`` by default;
options give the TIES paper's global trim and PEFT's count normalisation.

Each tensor is merged whole: memory holds the experts' τ of one tensor, the
base tensor and the result (experts + 2 tensors).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from compressor.alignment import TaskVectorView
from compressor.hookspecs import hookimpl
from compressor.merging import (
    SCALE_OPTION,
    WEIGHTS_OPTION,
    expert_weights,
    keep_mask,
    sign_consensus,
    top_k_mask,
    trim_count,
)
from compressor.method import Manifest, Method, Option, fraction
from compressor.selection import TopKThreshold
from compressor.sources import block_shape, row_blocks

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


def _dare_seed(seed: int, expert: int, name: str) -> int:
    """The mask seed of one expert's tensor: independent of block size and tensor order."""
    digest = hashlib.blake2b(f"{seed}:{expert}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class _SparsifyMerge(Method):
    """Sparsify every expert's τ of a tensor, then combine: the shared run loop."""

    kind = "merge"
    needs_base = True
    max_inputs = None
    version = "1"
    consensus = True

    def run(self, job):
        import torch

        weights = expert_weights(job)
        opts = job.options
        views = [TaskVectorView(job.base, e, job.warn) for e in job.inputs]
        state = self.prepare(job, views)
        kept = total = 0
        for name in job.progress(job.base.names(), desc=self.name):
            info = job.base.info(name)
            if not info.is_float:
                job.writer.write(name, job.base.get(name))
                continue
            base = job.base.get(name).float()
            deltas = []
            for t, view in enumerate(views):
                d = view.delta(name, None, base)
                if d is not None:
                    d = self.sparsify(state, t, name, d.reshape(-1), job)
                    kept += int(torch.count_nonzero(d))
                deltas.append(d)
                total += info.numel
            if self.consensus:
                mixed = sign_consensus(deltas, weights, opts["election"], opts["normalize"])
            else:
                mixed = _linear(deltas, weights, opts["normalize"])
            if mixed is not None:
                base.add_(mixed.reshape(info.shape), alpha=opts["scale"])
            job.writer.write(name, base.to(info.dtype))
        return Manifest(
            "model",
            metrics={"experts": len(job.inputs), "kept": kept / total if total else 0.0},
        )

    def prepare(self, job, views):
        """Whole-model statistics before the merge pass (TIES' global trim), or None."""
        return None

    def sparsify(self, state, t: int, name: str, tau: torch.Tensor, job) -> torch.Tensor:
        """Expert t's flat float32 τ of one tensor, sparsified (in place allowed)."""
        raise NotImplementedError


def _linear(deltas, weights, normalize: str) -> torch.Tensor | None:
    """Σ w_t·τ_t, divided by Σ w_t (``weights``), by the expert count (``count``) or not."""
    import torch

    present = [(d, w) for d, w in zip(deltas, weights, strict=True) if d is not None]
    if not present:
        return None
    mixed = torch.zeros_like(present[0][0])
    for d, w in present:
        mixed.add_(d, alpha=w)
    divisor = {"weights": sum(weights), "count": len(weights), "none": 1.0}[normalize]
    return mixed.div_(divisor if abs(divisor) >= 1e-8 else 1.0)


class Ties(_SparsifyMerge):
    """TIES: trim each τ to its largest entries, elect signs, take the disjoint mean.

    ``scope tensor`` (mergekit, the default) keeps the top ``density`` fraction of
    each tensor of each τ; ``scope global`` keeps the top fraction of each whole τ
    (the TIES paper), found in two streaming passes before the merge. Exactly
    k = int(density·n) entries are kept (at least one); ties at the threshold are
    taken in flat order.
    """

    name = "ties"
    summary = "TIES merging: trim each task vector, elect signs, average the agreeing entries"
    reference = "https://arxiv.org/abs/2306.01708"
    options = (
        WEIGHTS_OPTION,
        SCALE_OPTION,
        Option("density", "float", 0.2, "fraction of each τ's entries kept", check=fraction),
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
        if job.options["scope"] != "global":
            return None
        budgets = []
        names = [n for n in job.base.names() if job.base.info(n).is_float]
        for t, view in enumerate(views):
            finder = TopKThreshold()
            desc = f"ties: threshold of expert {t + 1}"
            for block in job.progress(_tau_blocks(job, view, names), desc=desc, unit="block"):
                finder.add_high(block)
            k = trim_count(job.options["density"], finder.total)
            if job.options["density"] < 1 and finder.start_refine(k):
                for block in _tau_blocks(job, view, names):
                    finder.add_low(block)
                threshold = finder.threshold()
                budgets.append([threshold, k - finder.above])
            else:
                budgets.append(None)  # keep everything
        return budgets

    def sparsify(self, state, t, name, tau, job):
        density = job.options["density"]
        if state is not None:
            budget = state[t]
            if budget is None:
                return tau
            mask, used = keep_mask(tau, budget[0], budget[1])
            budget[1] -= used
        elif density >= 1:
            return tau
        else:
            mask = top_k_mask(tau, trim_count(density, tau.numel()))
        return tau.mul_(mask)


def _tau_blocks(job, view: TaskVectorView, names: list[str]):
    """Every row block of an expert's τ, zeros where it has none (an adapter's other tensors)."""
    import torch

    for name in names:
        info = job.base.info(name)
        for rows in row_blocks(info):
            d = view.delta(name, rows)
            yield d if d is not None else torch.zeros(block_shape(info, rows))


class _Dare(_SparsifyMerge):
    """DARE: keep each entry with probability ``density`` (seeded), rescale the kept ones."""

    reference = "https://arxiv.org/abs/2311.03099"

    def sparsify(self, state, t, name, tau, job):
        import torch

        density = job.options["density"]
        if density >= 1:
            return tau
        gen = torch.Generator().manual_seed(_dare_seed(job.options["seed"], t, name))
        keep = torch.rand(tau.shape, generator=gen) < density
        rescale = job.options["rescale"]
        if rescale == "l1":  # mergekit: match the L1 norm of the unpruned τ
            before = float(tau.abs().sum())
            tau = tau.mul_(keep)
            after = float(tau.abs().sum())
            return tau.mul_(before / after) if before >= 1e-7 and after >= 1e-7 else tau
        tau = tau.mul_(keep)
        return tau.div_(density) if rescale == "density" else tau


def _dare_options(normalize: str, consensus: bool) -> tuple[Option, ...]:
    return (
        WEIGHTS_OPTION,
        SCALE_OPTION,
        Option(
            "density",
            "float",
            0.5,
            "probability of keeping each entry of τ (1 − the drop rate p)",
            check=fraction,
        ),
        Option("seed", "int", 0, "random seed of the drop masks"),
        Option(
            "rescale",
            "choice",
            "density",
            "rescale kept entries by 1/density (the paper, PEFT), to τ's L1 norm (mergekit), "
            "or not",
            choices=("density", "l1", "none"),
        ),
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


@hookimpl
def register_methods(register):
    register(Ties())
    register(DareLinear())
    register(DareTies())
