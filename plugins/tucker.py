"""Tucker compression of task vectors: each tensor as a small core times one factor per mode.

FLoRA (Si et al. 2024, arXiv 2405.14739) writes an N-dimensional update as
G ×1 U1 ×2 U2 … ×N UN. Here that is a compressor of task vectors: every
tensor with enough entries is fitted with HOSVD then HOOI iterations
(tensorly's ``tucker`` on the PyTorch backend) at ranks given per mode, or
chosen per tensor to meet a relative error or a size ratio. Biases, norms and
tensors the product would not shrink are kept dense.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from compressor.errors import InputError, OptionError
from compressor.hookspecs import hookimpl
from compressor.io.deltas import CompressionInput
from compressor.io.safetensors import TensorInfo
from compressor.io.sources import DecodedDelta, TensorSource
from compressor.method import Manifest, Method, Option, positive

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch


def _open_fraction(v: float) -> str | None:
    return None if 0 < v < 1 else "must be in (0, 1)"


def _above_one(v: float) -> str | None:
    return None if v > 1 else "must be above 1"


class Tucker(Method):
    """Core + factors per tensor; ``export`` and every merge decode them tensor by tensor."""

    name = "tucker"
    kind = "compress"
    uses_device = True  # each tensor's HOSVD/HOOI (tensorly on torch)
    summary = "Tucker cores: each τ tensor as a small core times one factor per mode (FLoRA)"
    reference = "https://arxiv.org/abs/2405.14739"
    version = "1"
    options = (
        Option(
            "ranks",
            "ints",
            None,
            "one rank per mode, for the tensors of that order (others stay dense)",
        ),
        Option(
            "rel_error",
            "float",
            None,
            "pick each tensor's ranks so its relative Frobenius error is at most this",
            check=_open_fraction,
        ),
        Option(
            "ratio",
            "float",
            None,
            "pick each tensor's ranks so it is at least this many times smaller",
            check=_above_one,
        ),
        Option("iterations", "int", 10, "HOOI iterations after the HOSVD start", check=positive),
        Option(
            "min_size",
            "int",
            4096,
            "tensors with fewer entries (biases, norms) stay dense",
            check=positive,
        ),
    )

    def run(self, job):
        import tensorly as tl
        import torch

        tl.set_backend("pytorch")
        opts = job.options
        given = [k for k in ("ranks", "rel_error", "ratio") if opts[k] is not None]
        if len(given) != 1:
            raise OptionError(
                "tucker needs exactly one of -o ranks R1,R2,..., -o rel_error E, -o ratio C"
                + (f"; got {', '.join(given)}" if given else "")
            )
        tv = CompressionInput(job.base, job.inputs[0], "delta", job.warn, self.name)
        names = [n for n in tv.names if _candidate(tv.infos[n], opts["min_size"])]
        if opts["ranks"] is not None:
            _check_ranks(opts["ranks"], [tv.infos[n] for n in names], tv.source.label)
        tensors: dict[str, dict] = {}
        err2 = norm2 = 0.0
        stored = dense_bytes = 0
        worst = (0.0, None)
        for name in job.progress(tv.names, desc="tucker"):
            t = torch.cat([b.reshape(-1) for b in tv.blocks(name)]).reshape(tv.infos[name].shape)
            t = t.to(job.device)  # one tensor on the device: HOSVD/HOOI there
            n2 = float(t.square().sum())
            norm2 += n2
            dense_bytes += 4 * t.numel()
            ranks = _ranks(t, opts) if name in names else None
            if ranks is None or _tucker_size(t.shape, ranks) >= t.numel():
                job.writer.write(name, t.cpu())
                tensors[name] = {"shape": list(t.shape)}
                stored += 4 * t.numel()
                continue
            core, factors = tl.decomposition.tucker(
                t, rank=list(ranks), init="svd", n_iter_max=opts["iterations"], tol=1e-7
            )
            approx = tl.tucker_to_tensor((core, factors))
            e2 = float((t - approx).square().sum())
            err2 += e2
            rel = math.sqrt(e2 / n2) if n2 else 0.0
            if rel >= worst[0]:
                worst = (rel, name)
            job.writer.write(f"{name}.core", core.contiguous().cpu())
            for k, f in enumerate(factors):
                job.writer.write(f"{name}.factor{k}", f.contiguous().cpu())
            tensors[name] = {"shape": list(t.shape), "ranks": list(ranks), "rel_error": rel}
            stored += 4 * _tucker_size(t.shape, ranks)
        if norm2 == 0:
            raise InputError(
                f"the task vector of {tv.source.label} is all zeros: nothing to compress"
            )
        for name in tv.dense:
            job.writer.write(name, tv.dense_tensor(name))
        fitted = [n for n, m in tensors.items() if "ranks" in m]
        dense = len(tensors) - len(fitted)
        small = len(tv.names) - len(names)
        if dense > small:  # tensors that could be factored, and were not
            why = []
            if small:
                why.append(f"{small} too small or 1-D")
            if dense - small:
                how = (
                    f"rel_error {opts['rel_error']:g}"
                    if opts["rel_error"] is not None
                    else "the asked ranks"
                )
                why.append(f"{dense - small} where {how} needs ranks no smaller than dense")
            job.warn(
                f"{dense} of {len(tensors)} tensors stay dense ({'; '.join(why)}); "
                f"size ratio {dense_bytes / stored:.2f}"
            )
        return Manifest(
            "delta",
            metrics={
                "bytes": stored,
                "ratio": dense_bytes / stored,
                "rel_error": math.sqrt(err2 / norm2),
                "worst_rel_error": worst[0],
                "worst_tensor": worst[1],
                "factored_tensors": len(fitted),
                "dense_tensors": len(tensors) - len(fitted),
            },
            extra={
                "encoding": "tucker",
                "order": tv.names,
                "tensors": tensors,
                "carried": tv.dense,
                "summary": [
                    f"{len(fitted)} tensors as core + factors, {len(tensors) - len(fitted)} dense; "
                    f"worst relative error {worst[0]:.4f} ({worst[1]})"
                ],
            },
        )

    def decode(self, source: TensorSource) -> TensorSource:
        return DecodedTucker(source)


def _candidate(info: TensorInfo, min_size: int) -> bool:
    return len(info.shape) >= 2 and info.numel >= min_size


def _check_ranks(ranks: list[int], infos: list[TensorInfo], label: str) -> None:
    orders = sorted({len(i.shape) for i in infos})
    if len(ranks) not in orders:
        raise OptionError(
            f"ranks has {len(ranks)} entries, one per mode, but no tensor of {label} has "
            f"order {len(ranks)} (orders with enough entries: {', '.join(map(str, orders))})"
        )
    if any(r < 1 for r in ranks):
        raise OptionError(f"ranks must be at least 1; got {','.join(map(str, ranks))}")
    for info in infos:
        if len(info.shape) != len(ranks):
            continue
        for mode, (r, size) in enumerate(zip(ranks, info.shape, strict=True)):
            if r > size:
                raise OptionError(
                    f"rank {r} of mode {mode} is larger than that mode of '{info.name}' "
                    f"(shape {list(info.shape)})"
                )


def _tucker_size(shape, ranks) -> int:
    return math.prod(ranks) + sum(s * r for s, r in zip(shape, ranks, strict=True))


def _useful(shape) -> list[int]:
    """The largest rank each mode can use: min(mode size, product of the other modes)."""
    total = math.prod(shape)
    return [min(s, total // s) for s in shape]


def _ranks(t: torch.Tensor, opts: dict) -> list[int] | None:
    ranks = _wanted_ranks(t, opts)
    if ranks is None:
        return None
    # a mode's rank cannot exceed the product of the others' (the core's unfolding): cap it
    changed = True
    while changed:
        changed = False
        for n, r in enumerate(ranks):
            cap = math.prod(ranks) // r
            if r > cap:
                ranks[n], changed = cap, True
    return ranks


def _wanted_ranks(t: torch.Tensor, opts: dict) -> list[int] | None:
    import torch

    shape = list(t.shape)
    if opts["ranks"] is not None:
        return list(opts["ranks"]) if len(opts["ranks"]) == len(shape) else None
    useful = _useful(shape)
    if opts["ratio"] is not None:
        budget = t.numel() / opts["ratio"]
        lo, hi = 0.0, 1.0  # ranks = ceil(s·useful); the largest s that fits the budget
        for _ in range(40):
            mid = (lo + hi) / 2
            ranks = [max(1, math.ceil(mid * u)) for u in useful]
            lo, hi = (mid, hi) if _tucker_size(shape, ranks) <= budget else (lo, mid)
        ranks = [max(1, math.ceil(lo * u)) for u in useful]
        return ranks if _tucker_size(shape, ranks) <= budget else None
    # rel_error: truncating mode n at rank r leaves its singular-value tail; the HOSVD error
    # is at most sqrt(Σ_n tail_n²), so each mode gets an equal share e²‖T‖²/N (HOOI only improves)
    share = opts["rel_error"] ** 2 * float(t.square().sum()) / len(shape)
    ranks = []
    for mode, u in enumerate(useful):
        unfolded = t.movedim(mode, 0).reshape(shape[mode], -1)
        sv2 = torch.linalg.svdvals(unfolded).cpu().double().square()
        tail = sv2.flip(0).cumsum(0).flip(0)  # tail[r] = Σ_{i ≥ r} σ_i²
        r = int((tail > share).sum())  # smallest r with tail[r] ≤ share
        ranks.append(max(1, min(r, u)))
    return ranks


class DecodedTucker(DecodedDelta):
    """A Tucker artifact read back as dense τ̂, one tensor at a time."""

    def encoded(self, name: str) -> bool:
        return "ranks" in self.manifest["tensors"].get(name, {})

    def _decode(self, name: str) -> torch.Tensor:
        import torch

        out = self.raw.get(f"{name}.core").float()
        for k in range(len(self.manifest["tensors"][name]["shape"])):
            factor = self.raw.get(f"{name}.factor{k}").float()
            out = torch.tensordot(out, factor, dims=([0], [1]))  # contracts modes in turn
        return out


@hookimpl
def register_methods(register):
    register(Tucker())
