"""Pieces the merge methods share: expert weights, magnitude trimming, TIES' sign consensus.

Trimming keeps exactly k entries like mergekit's and PEFT's sort-based code
(entries tied at the threshold are taken in flat order, so the result does not
depend on a sort's tie order), found with the histogram threshold of
:mod:`compressor.merging.sparsify` instead of a sort.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from compressor.errors import OptionError, UsageError
from compressor.io.prefetch import prefetched
from compressor.io.sources import row_blocks
from compressor.merging.sparsify import magnitude_bits, topk_threshold_bits
from compressor.method import Manifest, Method, Option, positive

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch

WEIGHTS_OPTION = Option(
    "weights",
    "floats",
    None,
    "per-expert weights w_t: comma-separated in the order the experts are given, or per "
    "expert as weights@N (default: 1 each)",
)
SCALE_OPTION = Option(
    "scale",
    "float|auto",
    1.0,
    "λ, the factor on the merged task vector; auto: the best of -o grid on -o val data",
)
SCALE_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.4, 2.0)
VAL_OPTION = Option(
    "val",
    "str",
    None,
    "with scale auto: the data file each scale is scored on (labelled rows: accuracy; "
    "text lines: perplexity), in the formats eval reads",
)
GRID_OPTION = Option("grid", "floats", SCALE_GRID, "with scale auto: the scales tried")
SPACE_OPTION = Option(
    "space",
    "choice",
    "full",
    "full: merge every ΔW (any expert); core: PEFT LoRA experts merged in their core "
    "space, written as a LoRA adapter",
    choices=("full", "core"),
)
RANK_OPTION = Option(
    "rank",
    "int",
    None,
    "with space core: the merged adapter's rank (default: the experts' ranks summed)",
    check=positive,
)


CONSENSUS_CHUNK = 1 << 22  # entries per pass of sign election (16 MB a float32 temporary)


def expert_weights(values: list) -> list[float]:
    """The per-expert ``weights`` of one tensor, 1 where unset."""
    return [1.0 if w is None else w for w in values]


def weighted_sum(deltas: list, weights: list, normalize: str = "none") -> torch.Tensor | None:
    """Σ w_t·τ_t over the present τ (None when all are absent), divided by Σ w_t
    (``weights``; by 1 where |Σ w_t| < 1e-8, as mergekit does), by the expert count
    (``count``) or not at all (``none``). Unset weights are 1; the τ are reused."""
    weights = expert_weights(weights)
    mixed = None
    for d, w in zip(deltas, weights, strict=True):
        if d is not None:
            mixed = d.mul_(w) if mixed is None else mixed.add_(d, alpha=w)
    if mixed is not None and normalize != "none":
        divisor = sum(weights) if normalize == "weights" else len(weights)
        mixed.div_(divisor if abs(divisor) >= 1e-8 else 1.0)
    return mixed


def keep_mask(tau: torch.Tensor, threshold: int, ties: int) -> tuple[torch.Tensor, int]:
    """Entries with |τ| above the threshold (int32 bits), plus the first ``ties`` equal to it.

    Returns the flat mask and how many tied entries it took.
    """
    bits = magnitude_bits(tau).reshape(-1)
    mask = bits > threshold
    if ties > 0:
        tied = (bits == threshold).nonzero().squeeze(1)[:ties]
        mask[tied] = True
        return mask, tied.numel()
    return mask, 0


def top_k_mask(tau: torch.Tensor, k: int) -> torch.Tensor:
    """The flat mask of the k entries of largest |τ| (ties in flat order)."""
    threshold = topk_threshold_bits([tau], k)
    above = int((magnitude_bits(tau) > threshold).sum())
    return keep_mask(tau, threshold, k - above)[0]


def spans(n: int, chunk: int = CONSENSUS_CHUNK) -> list[tuple[int, int]]:
    """[start, stop) ranges of ``chunk`` items covering n."""
    return [(start, min(start + chunk, n)) for start in range(0, n, chunk)]


def row_spans(rows: int, width: int, chunk: int = CONSENSUS_CHUNK) -> list[tuple[int, int]]:
    """Ranges of whole rows of ``width`` entries, about ``chunk`` entries each."""
    return spans(rows, max(1, chunk // max(1, width)))


def flat_chunks(tau: torch.Tensor, chunk: int = CONSENSUS_CHUNK) -> list[torch.Tensor]:
    """A contiguous τ as flat views of ``chunk`` entries (writes reach τ); a strided τ whole."""
    if not tau.is_contiguous():
        return [tau]
    flat = tau.view(-1)
    return [flat[start:stop] for start, stop in spans(flat.numel(), chunk)]


def keep_above_(tau: torch.Tensor, threshold: int, ties: int, chunk: int = CONSENSUS_CHUNK) -> int:
    """Zero, in place, the entries of τ at or below the threshold (int32 bits)
    but the first ``ties`` equal to it (flat order); chunk by chunk, so the temporaries are a
    chunk's. Returns how many tied entries were kept: the same as :func:`keep_mask`."""
    used = 0
    for part in flat_chunks(tau, chunk):
        mask, took = keep_mask(part, threshold, ties - used)
        part.mul_(mask.reshape(part.shape))
        used += took
    return used


def _rank_cut(parts: list[torch.Tensor], k: int) -> tuple[int, int]:
    """The threshold (int32 bits) of the k largest |τ| over the parts, and how many entries
    tied at it the top k takes."""
    threshold = topk_threshold_bits(parts, k)
    return threshold, k - sum(int((magnitude_bits(p) > threshold).sum()) for p in parts)


def keep_top_k_(
    tau: torch.Tensor, k: int, drop: int = 0, chunk: int = CONSENSUS_CHUNK
) -> torch.Tensor:
    """Zero, in place, all but the k entries of largest |τ|, and of those the ``drop``
    largest too (ties in flat order): the entries of :func:`top_k_mask` (k) less those of
    ``top_k_mask(drop)``, found and applied chunk by chunk."""
    parts = flat_chunks(tau, chunk)
    if drop <= 0:
        keep_above_(tau, *_rank_cut(parts, k), chunk)
        return tau
    (keep_at, keep_ties), (drop_at, drop_ties) = _rank_cut(parts, k), _rank_cut(parts, drop)
    for part in parts:
        keep, took = keep_mask(part, keep_at, keep_ties)
        keep_ties -= took
        dropped, took = keep_mask(part, drop_at, drop_ties)
        drop_ties -= took
        part.mul_(keep.logical_and_(dropped.logical_not_()).reshape(part.shape))
    return tau


def trim_count(density: float, numel: int) -> int:
    """mergekit's and PEFT's k: ``int(density * n)``, at least one entry."""
    return max(1, int(density * numel))


def sign_consensus(
    deltas: list[torch.Tensor | None],
    weights: list[float],
    election: str = "weighted",
    normalize: str = "weights",
    chunk: int = CONSENSUS_CHUNK,
) -> torch.Tensor | None:
    """TIES' elect-and-disjoint-mean over (trimmed) task vectors of one tensor.

    The elected sign per entry is that of Σ w_t·τ_t (``election weighted``,
    mergekit) or Σ τ_t (``unweighted``, PEFT's "total"); expert t agrees where
    its (weighted) τ has that sign, zeros never do. The result is Σ w_t·τ_t over
    the agreeing experts, divided by their summed weights (``normalize weights``,
    mergekit), by their number (``count``, PEFT), or not at all (``none``);
    where no expert agrees the divisor is 1. ``None`` deltas are zero.

    Every step is per entry, so it runs over ``chunk`` entries at a time and writes
    the result into the first present τ: the temporaries (vote, signs, divisor) take
    a chunk each, not a tensor each.
    """
    present = [(d, w) for d, w in zip(deltas, weights, strict=True) if d is not None]
    if not present:
        return None
    shape = present[0][0].shape
    flat = [(d.reshape(-1), w) for d, w in present]
    out = flat[0][0]
    for start in range(0, out.numel(), chunk):
        part = [(d[start : start + chunk], w) for d, w in flat]
        out[start : start + chunk] = _consensus_chunk(part, election, normalize)
    return out.reshape(shape)


def _consensus_chunk(present: list, election: str, normalize: str) -> torch.Tensor:
    """:func:`sign_consensus` of one chunk of entries (a new tensor)."""
    import torch

    vote = torch.zeros_like(present[0][0])
    for d, w in present:
        vote.add_(d, alpha=w if election == "weighted" else 1.0)
    majority = torch.where(vote >= 0, 1.0, -1.0)
    del vote
    mixed = torch.zeros_like(majority)
    divisor = torch.zeros_like(majority) if normalize != "none" else None
    for d, w in present:
        sign = torch.sign(d)
        if election == "weighted":
            sign.mul_(1.0 if w > 0 else -1.0 if w < 0 else 0.0)
        agree = sign.eq_(majority)  # 1.0 where the expert agrees
        mixed.addcmul_(d, agree, value=w)
        if divisor is not None:
            divisor.add_(agree, alpha=w if normalize == "weights" else 1.0)
    if divisor is not None:
        divisor[divisor == 0] = 1
        mixed.div_(divisor)
    return mixed


@dataclass
class TensorCall:
    """What a merge rule gets for one output tensor (or a block of its rows).

    ``base`` is the base in float32 (None for methods without one); ``tensors`` the
    inputs in float32: task vectors τ_t (``space delta``, None where τ is zero) or
    weights θ_t (``space weights``). ``shared`` and ``per`` hold the options' values
    for this tensor (per-expert options as one value per input, None where unset).
    """

    name: str
    base: torch.Tensor | None
    tensors: list
    shared: dict
    per: dict
    state: object = None
    exact: torch.dtype | None = None  # mergekit-exact mode: mergekit's compute dtype


class TensorMerge(Method):
    """The streaming merge loop every merge method shares; subclasses write ``merge``.

    Per tensor of the reference model (the base, else the first input), in its order:
    non-float tensors are carried; float ones are read from every input (whole, or
    in row blocks for ``elementwise`` rules), merged by ``merge`` and written in
    the reference's dtype. Options are resolved per tensor and per expert
    (:mod:`compressor.merging.params`), so every option takes per-expert values,
    layer gradients and name filters.

    ``base_is_input``: the base, when given, is one more input after the experts
    (mergekit adds ``base_model`` to a linear or Karcher merge this way).
    """

    kind = "merge"
    uses_device = True
    needs_base = True
    max_inputs = None
    space = "delta"  # or "weights"
    elementwise = False
    base_is_input = False
    per_expert: frozenset[str] = frozenset({"weights"})

    def __init_subclass__(cls, **kwargs):
        """Every task-vector merge that runs this loop also merges LoRA experts in their
        core space (``-o space core``, :mod:`compressor.merging.core`)."""
        super().__init_subclass__(**kwargs)
        names = {o.name for o in cls.options}
        if cls.run is not TensorMerge.run:
            return
        if cls.space == "delta" and "space" not in names:
            cls.options = (*cls.options, SPACE_OPTION, RANK_OPTION)
        if SCALE_OPTION in cls.options and "val" not in names:
            cls.options = (*cls.options, VAL_OPTION, GRID_OPTION)

    def parse_options(self, pairs, labels=None):
        """Check ``-o`` pairs; keys may name an expert (``@N``) and a filter (``:TEXT``)."""
        from compressor.merging.params import parse_merge_options

        labels = list(labels) if labels is not None else []
        values = parse_merge_options(
            self.options, self.per_expert, pairs, labels, f"method '{self.name}'"
        )
        return settle_merge_options(self, values)

    def input_labels(self, inputs: list[str], base: str | None) -> list[str]:
        """The labels ``@EXPERT`` selectors refer to, in input order."""
        return [*inputs, base] if self.base_is_input and base is not None else list(inputs)

    def prepare(self, job, views):
        """State for the merge pass (whole-model statistics, counters), or None.

        ``views`` read the inputs: ``read(name, rows)`` → float32 τ_t or θ_t (None: zero).
        """
        return None

    def merge(self, call: TensorCall) -> torch.Tensor:
        """The merged float32 tensor (or rows) for one output tensor."""
        raise NotImplementedError

    # mergekit-exact mode: whether the rule, given its inputs in mergekit's compute dtype,
    # runs mergekit's steps in that dtype (else it computes in float32, as always)
    exact_by_cast = False

    def merge_exact(self, call: TensorCall) -> torch.Tensor:
        """The merged tensor as mergekit computes it in ``call.exact``: by default the
        rule's own steps on inputs rounded to that dtype (``exact_by_cast``), else in
        float32; methods whose steps differ from mergekit's override this."""
        if not self.exact_by_cast:
            return self.merge(call)
        call.base = None if call.base is None else call.base.to(call.exact)
        call.tensors = [None if t is None else t.to(call.exact) for t in call.tensors]
        return self.merge(call)

    def metrics(self, job, state) -> dict:
        """The artifact's metrics (the loop adds the expert count)."""
        return {}

    def prepared(self, job):
        """What a pass over the tensors needs: (base, reference, views, params, positions,
        state); the base is None where it is one more input (``base_is_input``)."""
        from compressor.merging.params import TensorParameters, layer_positions

        base, inputs = job.base, list(job.inputs)
        if self.base_is_input and base is not None:
            inputs, base = [*inputs, base], None
            reference_base = job.base
        else:
            reference_base = base
        reference = base if base is not None else inputs[0]
        views = _input_views(self, reference_base, base, inputs, job)
        params = TensorParameters(job.options, self.per_expert, len(inputs))
        positions = job.positions or layer_positions(reference.names())
        return base, reference, views, params, positions, self.prepare(job, views)

    def run(self, job):
        from compressor.io.safetensors import dtype_from_name

        if job.options.get("space") == "core":
            from compressor.merging.core import run_core_space

            return run_core_space(self, job)
        if job.options.get("scale") == "auto":
            from compressor.merging.autoscale import run_scale_auto

            return run_scale_auto(self, job)
        base, reference, views, params, positions, state = self.prepared(job)
        fixed = job.compute_dtype not in (None, "stored")
        exact_dtype = dtype_from_name(job.compute_dtype) if fixed else None
        names = job.progress(part_names(reference, job.part), desc=self.name)

        def work():  # (name, rows or None, first block, last block); non-float: rows "copy"
            for name in names:
                info = reference.info(name)
                if not info.is_float:
                    yield name, "copy", True, True
                    continue
                blocks = list(row_blocks(info)) if self.elementwise else [None]
                for k, rows in enumerate(blocks):
                    yield name, rows, k == 0, k == len(blocks) - 1

        def load(item):  # on the CPU, streamed; a step ahead while the device merges
            name, rows, _, _ = item
            if rows == "copy":
                return reference.get(name), None
            b = base.get(name, rows).float() if base is not None else None
            return b, [read(name, rows, b) for read in views]

        for (name, rows, first, last), (b, tensors) in prefetched(
            work(), load, ahead=job.device != "cpu"
        ):
            info = reference.info(name)
            if rows == "copy":
                job.writer.write(name, b)
                continue
            if first:
                job.writer.begin(name, info.shape, info.dtype)
                shared, per = params.at(name, positions.get(name, 0.0))
            b, tensors = on_device(b, tensors, job.device)
            call = TensorCall(name, b, tensors, shared, per, state)
            if job.compute_dtype is not None:
                call.exact = exact_dtype or info.dtype
                merged = self.merge_exact(call)
            else:
                merged = self.merge(call)
            job.writer.write_rows(merged.to(device="cpu", dtype=info.dtype))
            # drop this block's inputs before the next block's are read: held over,
            # the previous tensor's base and τs would sit beside the next ones
            del b, tensors, call
            if last:
                job.writer.end()
        return Manifest("model", metrics={"experts": len(job.inputs), **self.metrics(job, state)})


def on_device(base, tensors: list, device: str) -> tuple:
    """One tensor's base and expert inputs moved to the device its rule runs on (the
    same tensors on the CPU); None stays None."""
    if device == "cpu":
        return base, tensors
    base = None if base is None else base.to(device)
    return base, [None if t is None else t.to(device) for t in tensors]


def settle_merge_options(method, values: dict) -> dict:
    """Refuse options that do nothing together, then leave the core-space and scale-auto
    options out where they are at their defaults (an artifact's parameters name what
    shaped it). Run on parsed ``-o`` options and on a config's values alike."""
    scale = values.get("scale")
    auto = scale == "auto"
    if isinstance(scale, list) and "auto" in str(scale):
        raise OptionError("-o scale auto picks one scale for the whole merge")
    if values.get("space") != "core" and values.get("rank") is not None:
        raise OptionError("option 'rank' applies to -o space core only")
    if not auto and "grid" in values and tuple(values["grid"]) != SCALE_GRID:
        raise OptionError("option 'grid' applies to -o scale auto only")
    if not auto and values.get("val"):
        raise OptionError("option 'val' applies to -o scale auto only")
    if auto and not any(o.name == "val" for o in method.options):
        raise OptionError(f"method '{method.name}' cannot pick its scale on data (-o scale auto)")
    if auto and not values.get("val"):
        raise OptionError("-o scale auto needs -o val FILE: the data each scale is scored on")
    if auto and values.get("space") == "core":
        raise OptionError("-o scale auto scores full models; with -o space core give a scale")
    for key, default in (("space", "full"), ("rank", None), ("val", None)):
        if key in values and values[key] == default:
            del values[key]
    if not auto:
        values.pop("grid", None)
    return values


def part_names(source, part: tuple[int, int] | None, before: bool = False) -> list[str]:
    """The names of part k of n of a source's tensors: runs in the source's order, near
    equal in bytes (a tensor goes to the part its middle byte falls in). ``before``: the
    names of the parts before part k instead."""
    names = source.names()
    if part is None:
        return [] if before else names
    k, n = part
    if n > len(names):
        raise UsageError(
            f"{source.label} has {len(names)} tensors; it cannot be split in {n} parts"
        )
    sizes = [max(1, source.info(name).nbytes) for name in names]
    total, seen, out = sum(sizes), 0, []
    for name, size in zip(names, sizes, strict=True):
        at = int((seen + size / 2) * n // total) + 1
        if (at < k) if before else (at == k):
            out.append(name)
        seen += size
    return out


def check_full_models(method, base, inputs) -> None:
    """Without a base every input must be a full model (a task vector or adapter needs the
    base to be read): checked before anything is hashed or read."""
    if base is not None:
        return
    for source in inputs:
        if source.content != "model":
            raise UsageError(
                f"{source.label} is not a full model; method '{method.name}' needs --base BASE "
                "to read it"
            )


def _input_views(method, reference_base, base, inputs, job):
    """One reader per input: ``read(name, rows, base_rows)`` → float32 τ_t or θ_t."""
    from compressor.io.deltas import TaskVectorView

    if method.space == "delta" and base is None:
        raise UsageError(f"method '{method.name}' needs --base BASE")
    check_full_models(method, reference_base, inputs)
    readers = []
    for source in inputs:
        if source is reference_base or (base is None and source is inputs[0]):
            readers.append(_direct(source))
            continue
        view = TaskVectorView(reference_base or inputs[0], source, job.warn)
        if method.space == "delta":
            readers.append(view.delta)
        elif source.content == "model":
            readers.append(_direct(source))
        else:
            readers.append(_rebuilt(view, reference_base))
    return readers


def _direct(source):
    def read(name, rows, base_rows=None):
        return source.get(name, rows).float()

    return read


def _rebuilt(view, base):
    def read(name, rows, base_rows=None):
        b = base_rows if base_rows is not None else base.get(name, rows).float()
        d = view.delta(name, rows, b)
        return b.clone() if d is None else d.add_(b)

    return read
