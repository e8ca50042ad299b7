"""Calibration: batches of the data, each layer's inputs run block by block, Hessians, and
block tuning of the tables against what the source model's block computes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from compressor.errors import InputError

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch
from compressor.plugins.sketchtune.config import SketchPlan


class _Batches(list):
    """Calibration batches (model keyword arguments), and how many rows they hold."""

    rows = 0

    @property
    def tokens(self) -> int:
        """The unpadded tokens of all batches."""
        return sum(int(x["attention_mask"].sum()) for x in self)


def calibration_batches(
    source, data: str, samples: int, max_length: int, device: str = "cpu"
) -> _Batches:
    """The first ``samples`` text rows of ``data``, tokenized in batches for the model, on
    ``device``."""
    from compressor.learning.data import batches, read_examples
    from compressor.models.modeling import model_inputs, source_tokenizer

    rows = read_examples(data)[:samples]
    if any(e.text is None for e in rows):
        raise InputError(f"{data}: calibration needs text rows")
    tokenizer = source_tokenizer(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    out = _Batches(model_inputs(b, tokenizer, data, max_length, device) for b in batches(rows, 8))
    out.rows = len(rows)
    return out


def calibrate_sequentially(
    plan: SketchPlan,
    inputs,
    quantize,
    after_layer,
    progress=None,
    sequential: bool = True,
    tune=None,
    device: str = "cpu",
) -> None:
    """Run ``inputs`` through the model block by block; in each block, hand every linear
    weight with its Hessian H = 2XᵀX/N (over unpadded tokens) to ``quantize(name, weight,
    H) -> Ŵ``, put Ŵ in the block, call ``tune(k, block, calibration, masks, hessian)``
    if given (it may change the block's weights again; ``hessian(suffix)`` gives H), then
    ``after_layer(k)``, and feed the next block the outputs of the quantised one
    (``sequential`` False: of the source's block, so every Hessian comes from the source
    model). The block runs on ``device``, where ``inputs`` must be. Also what the
    benchmarks' GPTQ baseline runs on."""
    from compressor.models.blockwise import run_blockwise, supports

    layout, source = plan.layout, plan.source
    if not supports(layout):
        raise InputError(
            f"sketchtune calibrates block by block, which the '{layout.model_type}' "
            "architecture does not support yet; leave out -o data for plain k-means"
        )
    acc = _Hessians([x["attention_mask"].bool() for x in inputs])

    def transform(layer: int, block, calibration) -> None:
        import torch

        modules = dict(block.named_modules())
        with torch.no_grad():
            for suffix, name in plan.layer_linears(layer).items():
                approx = quantize(name, source.get(name), acc.hessian(suffix))
                if sequential:
                    modules[suffix].weight.copy_(approx)
        if tune is not None and sequential:
            tune(layer, block, calibration, acc.masks, acc.hessian)
        after_layer(layer)
        acc.clear()

    run_blockwise(
        layout,
        inputs,
        acc.add,
        tuple(plan.suffixes()),
        transform=transform,
        progress=progress,
        source_targets=tune is not None and sequential,
        device=device,
    )


def tune_layer(plan, layer: int, block, calibration, masks, pending: dict, passes: int, lr):
    """Tune the sketches of layer ``layer`` (``pending``: weight name → (tables, codes),
    updated in place) with :func:`tune_block_tables` and put the tuned Ŵ in ``block``.
    Returns ([held-out error before, after], {name: Ŵ}), or None if nothing was tuned."""
    import torch

    from compressor.plugins.sketchtune.quantize import decode_tables

    names = plan.layer_linears(layer)
    if not passes or not names:
        return None
    sketches = {s: pending[n] for s, n in names.items()}
    tuned, before, after = tune_block_tables(block, sketches, calibration, masks, passes, lr)
    if before is None:
        return None
    modules = dict(block.named_modules())
    approx = {}
    with torch.no_grad():
        for s, n in names.items():
            codes = sketches[s][1]
            pending[n] = (tuned[s], codes)
            approx[n] = decode_tables(tuned[s].float(), codes)
            modules[s].weight.copy_(approx[n])
    return [before, after], approx


def tune_block_tables(block, sketches: dict, calibration, masks, passes: int, lr: float):
    """Tables of one block's sketched linears tuned so that, on its calibration inputs,
    the block computes what the source model's block computed (``calibration.targets``):
    codes fixed, Adam on the tables, one batch a step (AQLM's block fine-tuning, on
    SketchTune's tables). Each block then also makes up for what earlier blocks lost.

    ``sketches``: {module suffix: (fp16 tables out × G × 2^b, codes out × in)}. The last
    quarter of the calibration batches is held out: after each of ``passes`` passes over
    the others the tables, rounded to fp16 as they are stored, are scored there by the
    block's relative output error, and the best are kept, so tuning that fits the
    calibration text without carrying over is refused. Returns ({suffix: fp16 tables},
    held-out error before, after); the errors are None when there are too few batches
    to hold one out (the tables come back as they were).

    Memory: a batch goes through the block in chunks of rows of about 1,024 tokens, so
    backward keeps one chunk's activations, not a batch's; Ŵ is decoded once a batch and
    its gradient, summed over the chunks, goes to the tables (a scatter-add) one weight
    at a time."""
    import torch
    from torch.func import functional_call

    from compressor.models.blockwise import hidden_states
    from compressor.plugins.sketchtune.quantize import decode_tables

    dtype, device = next(block.parameters()).dtype, next(block.parameters()).device
    codes = {s: c.to(device) for s, (_, c) in sketches.items()}
    n = len(calibration.inputs)
    held = min(max(round(n / 4), 1), n - 1) if n > 1 else 0
    train, judge = list(range(n - held)), list(range(n - held, n))
    powers = [  # Σ squared target over each batch's tokens: the relative error's denominator
        float((t.float()[keep] ** 2).sum())
        for t, keep in zip(calibration.targets, masks, strict=True)
    ]

    def error(tables: dict, b: int, learn: bool = False) -> tuple[float, float]:
        """Σ squared output error and Σ squared target over batch b's tokens; with
        ``learn``, the relative error's gradient added to the tables'."""
        args, kwargs = calibration.inputs[b]
        target, keep, power = calibration.targets[b], masks[b], powers[b]
        with torch.no_grad():
            weights = {s: decode_tables(t, codes[s]).to(dtype) for s, t in tables.items()}
        for w in weights.values():
            w.requires_grad_(learn)
        named = {f"{s}.weight": w for s, w in weights.items()}
        num = 0.0
        for rows, a, kw in row_chunks(args, kwargs):
            out = functional_call(block, named, a, kw)
            diff = hidden_states(out).float() - target[rows].float()
            e = (diff[keep[rows]] ** 2).sum()
            if learn:
                (e / max(power, 1e-30)).backward()
            num += float(e.detach())
        if learn:  # dŴ, summed over the chunks, to the table entries; decoded again one
            # weight at a time so that only one weight's gather index is alive at once
            for s, t in tables.items():
                decode_tables(t, codes[s]).to(dtype).backward(weights[s].grad)
        return num, power

    def judged(tables: dict) -> float:
        with torch.no_grad():
            parts = [error(tables, b) for b in judge]
        return sum(e for e, _ in parts) / max(sum(p for _, p in parts), 1e-30)

    kept = {s: t.to(device).half() for s, (t, _) in sketches.items()}
    if not judge or passes == 0:
        return {s: t.cpu() for s, t in kept.items()}, None, None
    tables = {s: t.float().requires_grad_(True) for s, t in kept.items()}
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    start = best = judged({s: t.float() for s, t in kept.items()})
    opt = torch.optim.Adam(tables.values(), lr=lr)
    try:
        for _ in range(passes):
            for b in train:
                opt.zero_grad()
                error(tables, b, learn=True)
                opt.step()
            stored = {s: t.detach().half() for s, t in tables.items()}
            now = judged({s: t.float() for s, t in stored.items()})
            if now < best:
                best, kept = now, stored
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return {s: t.cpu() for s, t in kept.items()}, start, best


def row_chunks(args: tuple, kwargs: dict, tokens: int = 1024):
    """(rows, args, kwargs) for chunks of a batch's rows of about ``tokens`` tokens:
    every tensor of 2+ dimensions whose first is the batch's is cut to the chunk's rows
    (hidden states, masks, positions, per-row rotary tables); the rest is shared."""
    import torch

    batch, length = args[0].shape[:2]
    step = max(1, tokens // max(length, 1))

    def cut(x, rows: slice):
        if isinstance(x, torch.Tensor):
            return x[rows] if x.dim() >= 2 and x.shape[0] == batch else x
        if isinstance(x, tuple):
            return tuple(cut(v, rows) for v in x)
        if isinstance(x, list):
            return [cut(v, rows) for v in x]
        if isinstance(x, dict):
            return {k: cut(v, rows) for k, v in x.items()}
        return x

    for lo in range(0, batch, step):
        rows = slice(lo, min(lo + step, batch))
        yield rows, cut(args, rows), cut(kwargs, rows)


class _Hessians:
    """Σ XᵀX per linear of the current layer over the unpadded tokens; linears that read
    the same tensor (q, k, v; gate, up) share one sum."""

    def __init__(self, masks):
        self.masks = masks
        self.sums: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.alias: dict[str, str] = {}
        self._seen: dict[tuple, tuple[str, torch.Tensor]] = {}
        self._batch = None

    def add(self, _layer: int, suffix: str, batch: int, x) -> None:
        if batch != self._batch:  # tensors of the last batch are released only now,
            self._seen, self._batch = {}, batch  # so an address is never reused within one
        key = (x.data_ptr(), tuple(x.shape))
        if key in self._seen:
            self.alias[suffix] = self._seen[key][0]
            return
        self._seen[key] = (suffix, x)
        rows = x[self.masks[batch]].float() if x.dim() == 3 else x.float()
        xtx = rows.T @ rows
        if suffix in self.sums:
            self.sums[suffix] += xtx
            self.count[suffix] += rows.shape[0]
        else:
            self.sums[suffix], self.count[suffix] = xtx, rows.shape[0]

    def hessian(self, suffix: str):
        owner = self.alias.get(suffix, suffix)
        return 2 * self.sums[owner] / max(self.count[owner], 1)

    def clear(self) -> None:
        self.sums, self.count, self._seen, self._batch = {}, {}, {}, None
