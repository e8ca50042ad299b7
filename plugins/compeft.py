"""compeft: sparse ternary compression of task vectors (Yadav et al. 2023, arXiv 2311.13171).

Keeps the fraction ``density`` of task-vector entries with the largest
magnitude (one exact threshold and one σ over the whole model, or per tensor)
and replaces each kept entry by α·σ·sign(τ). On disk, per tensor: the kept
positions as gaps between them, entropy-coded with an ANS coder (constriction)
under the geometric model of the tensor's own density, and the signs
bit-packed, both as uint8 tensors in safetensors; the scale and the tensor
order live in the manifest. That reaches the floor Σ n_t·H(k_t) + kept bits.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from compressor.errors import InputError
from compressor.hookspecs import hookimpl
from compressor.io.deltas import CompressionInput
from compressor.io.sources import DecodedDelta, TensorSource
from compressor.merging.sparsify import HIGH_BUCKETS, TopKThreshold, magnitude_bits
from compressor.method import Manifest, Method, Option, fraction

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import numpy as np
    import torch

GAP_TAIL = 30.0  # the gap alphabet covers P(gap) down to about e^-30


def _alpha_check(v: str) -> str | None:
    if v in ("auto", "none"):
        return None
    try:
        finite = math.isfinite(float(v))
    except ValueError:
        finite = False
    return None if finite else "must be a finite number, auto or none"


# -- position coding ----------------------------------------------------------------


def _gap_model(density: float):
    """A categorical model of gaps between kept positions: geometric, with an escape symbol."""
    import constriction
    import numpy as np

    size = max(2, min(1 << 16, math.ceil(GAP_TAIL / max(density, 1e-9))))
    g = np.arange(size, dtype=np.float64)
    p = density * (1 - density) ** g
    p[-1] = max(1.0 - p[:-1].sum(), 0.0)  # escape: the gap is stored raw
    p = np.maximum(p, 1e-15)
    return constriction.stream.model.Categorical(p / p.sum(), perfect=False), size


def encode_positions(positions: np.ndarray, numel: int) -> tuple[np.ndarray, np.ndarray]:
    """ANS-code sorted flat positions; return (coded bytes, raw escaped gaps)."""
    import constriction
    import numpy as np

    if positions.size == 0:
        return np.zeros(0, np.uint8), np.zeros(0, np.uint32)
    gaps = np.empty(positions.size, np.int64)
    gaps[0] = positions[0]
    np.subtract(positions[1:], positions[:-1], out=gaps[1:])
    gaps[1:] -= 1
    model, size = _gap_model(positions.size / numel)
    escaped = gaps >= size - 1
    symbols = np.minimum(gaps, size - 1).astype(np.int32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols, model)
    words = coder.get_compressed()
    return words.view(np.uint8), gaps[escaped].astype(np.uint32)


def decode_positions(coded: np.ndarray, escapes: np.ndarray, kept: int, numel: int) -> np.ndarray:
    """The sorted flat positions that :func:`encode_positions` coded."""
    import constriction
    import numpy as np

    if kept == 0:
        return np.zeros(0, np.int64)
    model, size = _gap_model(kept / numel)
    coder = constriction.stream.stack.AnsCoder(coded.view(np.uint32).copy())
    gaps = coder.decode(model, kept).astype(np.int64)
    escaped = gaps == size - 1
    gaps[escaped] = escapes.astype(np.int64)
    return np.cumsum(gaps + 1) - 1


# -- the method -----------------------------------------------------------------------


def _sum_squares(x: torch.Tensor) -> float:
    """Σx² in float32 with torch's cascade summation: about 1e-8 relative, 20x faster than float64."""
    return float(x.square().sum())


def _each(job, group: list[str], step: str):
    """The group's tensor names, with a progress bar when there is more than one."""
    return job.progress(group, desc=f"compeft: {step}") if len(group) > 1 else group


class ComPEFT(Method):
    """Each kept entry of τ becomes α·σ·sign(τ); the rest become 0.

    σ is the standard deviation of all entries of τ before pruning; the kept
    entries are the ``density`` fraction with the largest |τ| (one exact
    threshold over the whole model with ``scope global``, found in two
    streaming histogram passes; per tensor with ``scope tensor``).
    ``alpha auto`` uses the least-squares scale (mean |τ| of the kept entries);
    ``alpha none`` prunes only and keeps the magnitudes (float32).
    INPUT is a fine-tuned model with --base, a stored task vector, or a PEFT
    LoRA adapter (its A and B factors; ``target delta`` with --base compresses
    ΔW instead). Modules an adapter replaces whole are kept dense.
    """

    name = "compeft"
    kind = "compress"
    uses_device = True  # statistics, threshold histograms and masks; coding on the CPU
    summary = "Sparse ternary task vectors: top-k entries as ±α·σ, entropy-coded positions"
    reference = "https://arxiv.org/abs/2311.13171"
    version = "1"
    options = (
        Option("density", "float", 0.1, "fraction of entries kept, in (0, 1]", check=fraction),
        Option(
            "alpha",
            "str",
            "1.0",
            "scale α on σ: a number, auto (least squares) or none (prune only)",
            check=_alpha_check,
        ),
        Option(
            "scope",
            "choice",
            "global",
            "one threshold and σ for the whole model, or per tensor",
            choices=("global", "tensor"),
        ),
        Option(
            "target",
            "choice",
            "factors",
            "for a PEFT LoRA adapter: compress its A and B factors (the paper), "
            "or ΔW = B·A·scaling (needs --base)",
            choices=("factors", "delta"),
        ),
    )

    def run(self, job):
        import numpy as np
        import torch

        tv = CompressionInput(job.base, job.inputs[0], job.options["target"], job.warn, self.name)
        if tv.content == "adapter":
            job.writer.prefix = "adapter_model"
        density, alpha, scope = job.options["density"], job.options["alpha"], job.options["scope"]
        groups = [tv.names] if scope == "global" else [[n] for n in tv.names]
        tensors: dict[str, dict] = {}
        total = dict(n=0, kept=0, bits=0, err=0.0, norm=0.0)
        scales = []
        for group in groups:
            stats = self._select(tv, group, density, job)
            scale = self._encode(
                tv, group, stats, self._scale(alpha, stats), alpha, job, tensors, total
            )
            if scale is not None:
                scales.append(scale)
        if total["norm"] == 0:
            raise InputError(
                f"the task vector of {tv.source.label} is all zeros (σ = 0): nothing to compress "
                "(is the expert the base itself?)"
            )
        for name in tv.dense:
            job.writer.write(name, tv.dense_tensor(name))
        d = total["n"]
        bits = total["bits"]
        source_bits = (
            16 if any(i.dtype in (torch.float16, torch.bfloat16) for i in tv.infos.values()) else 32
        )
        metrics = {
            "density": total["kept"] / d if d else 0.0,
            "alpha": alpha,
            "scale": (scales[0] if len(scales) == 1 else float(np.mean(scales)))
            if scales
            else None,
            "bits_per_param": bits / d if d else 0.0,
            "ratio": source_bits * d / bits if bits else None,
            "rel_error": math.sqrt(total["err"] / total["norm"]) if total["norm"] else 0.0,
            "params": d,
        }
        return Manifest(
            tv.content,
            metrics=metrics,
            extra={
                "encoding": "compeft",
                "order": tv.names,
                "tensors": tensors,
                "carried": tv.dense,
            },
        )

    # pass 1 and 2: σ and the exact threshold over the group
    def _select(self, tv: CompressionInput, group: list[str], density: float, job) -> dict:
        finder = TopKThreshold()
        n, s, ss = 0, 0.0, 0.0
        top: dict[str, int] = {}  # each tensor's highest bucket: passes 2 and 3 skip the rest
        low: dict[str, int] = {}
        for name in _each(job, group, "statistics"):
            top[name], low[name] = -1, HIGH_BUCKETS
            for block in tv.blocks(name):
                block = block.to(job.device)  # statistics and histograms on the device
                lo, hi = finder.add_high(block)
                if hi >= 0:
                    top[name], low[name] = max(top[name], hi), min(low[name], lo)
                n += block.numel()
                s, ss = s + float(block.sum()), ss + _sum_squares(block)
        kth = math.ceil(density * n)
        if finder.start_refine(kth):
            # only tensors with entries in the threshold's bucket are read again
            inside = [m for m in group if low[m] <= finder.bucket <= top[m]]
            for name in _each(job, inside, "threshold"):
                for block in tv.blocks(name):
                    finder.add_low(block)
        var = (ss - s * s / n) / (n - 1) if n > 1 else 0.0
        return {
            "threshold": finder.threshold(),
            "sigma": math.sqrt(max(var, 0.0)),
            "n": n,
            "sumsq": ss,
            "top": top,
        }

    def _scale(self, alpha: str, stats: dict) -> float | None:
        if alpha in ("auto", "none"):
            return None  # known after the encoding pass
        return float(alpha) * stats["sigma"]

    # pass 3: positions, signs (and magnitudes for alpha none)
    def _encode(self, tv, group, stats, scale, alpha, job, tensors, total) -> float | None:
        """Write the group's tensors; return the scale used (None for alpha none)."""
        import numpy as np
        import torch

        t = max(stats["threshold"], 1)  # bits 0 is |τ| = 0: a zero entry stays zero (sign 0)
        kept_abs_sum, kept_sq_sum, kept_count = 0.0, 0.0, 0
        entries = []
        for name in _each(job, group, "encode"):
            info = tv.infos[name]
            positions, signs, values = [np.zeros(0, np.int64)], [np.zeros(0, bool)], []
            offset = 0
            # a tensor whose largest entry is under the threshold keeps nothing: not read again
            reached = stats["top"][name] >= t >> 16
            for block in tv.blocks(name) if reached else ():
                flat = block.to(job.device).reshape(-1)
                mask = magnitude_bits(flat) >= t  # the mask on the device, positions on the CPU
                idx = np.flatnonzero(mask.cpu().numpy())  # numpy's: 2x faster than nonzero
                vals = flat[torch.from_numpy(idx).to(flat.device)]
                positions.append(idx + offset)
                signs.append((vals < 0).cpu().numpy())
                if alpha == "none":
                    values.append(vals.cpu())
                kept_abs_sum += float(vals.abs().sum())
                kept_sq_sum += _sum_squares(vals)
                kept_count += vals.numel()
                offset += flat.numel()
            pos = np.concatenate(positions)
            coded, escapes = encode_positions(pos, info.numel)
            packed = np.packbits(np.concatenate(signs)) if pos.size else np.zeros(0, np.uint8)
            job.writer.write(f"{name}.positions", torch.from_numpy(coded.copy()))
            job.writer.write(f"{name}.signs", torch.from_numpy(packed))
            bits = 8 * (coded.size + packed.size) + 32 * escapes.size
            if escapes.size:
                job.writer.write(f"{name}.escapes", torch.from_numpy(escapes.view(np.int32)))
            if alpha == "none":
                v = torch.cat(values) if values else torch.zeros(0)
                job.writer.write(f"{name}.values", v)
                bits += 32 * v.numel()
            entries.append(name)
            tensors[name] = {
                "shape": list(info.shape),
                "kept": int(pos.size),
                "escapes": int(escapes.size),
            }
            total["bits"] += bits
        if alpha == "auto":
            scale = kept_abs_sum / kept_count if kept_count else 0.0
        for name in entries:
            tensors[name]["scale"] = scale
        # ‖τ − τ̂‖²: dropped entries count whole; kept ones as (|τ| − s)², or 0 with alpha none
        kept_err = (
            0.0
            if scale is None
            else (kept_sq_sum - 2 * scale * kept_abs_sum + kept_count * scale * scale)
        )
        # t = 1 keeps every nonzero entry: nothing dropped, exactly (zeros change the sum order)
        dropped = 0.0 if t == 1 else max(stats["sumsq"] - kept_sq_sum, 0.0)
        total["err"] += dropped + max(kept_err, 0.0)
        total["norm"] += stats["sumsq"]
        total["n"] += stats["n"]
        total["kept"] += kept_count
        return scale

    def decode(self, source: TensorSource) -> TensorSource:
        return DecodedComPEFT(source)


class DecodedComPEFT(DecodedDelta):
    """A ComPEFT artifact read back as the dense τ̂, one tensor decoded at a time."""

    def _decode(self, name: str) -> torch.Tensor:
        import numpy as np
        import torch

        meta = self.manifest["tensors"][name]
        info = self._infos[name]
        kept = meta["kept"]
        out = torch.zeros(info.numel)
        if kept:
            coded = self.raw.get(f"{name}.positions").numpy()
            escapes = (
                self.raw.get(f"{name}.escapes").numpy().view(np.uint32)
                if meta.get("escapes")
                else np.zeros(0, np.uint32)
            )
            pos = torch.from_numpy(decode_positions(coded, escapes, kept, info.numel))
            negative = np.unpackbits(self.raw.get(f"{name}.signs").numpy())[:kept].astype(bool)
            if meta["scale"] is None:
                values = self.raw.get(f"{name}.values")
            else:
                values = torch.full((kept,), float(meta["scale"]))
                values[torch.from_numpy(negative)] *= -1
            out[pos] = values
        return out.reshape(info.shape)


@hookimpl
def register_methods(register):
    register(ComPEFT())
