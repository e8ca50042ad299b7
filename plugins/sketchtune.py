"""sketchtune: linear weights as b-bit codes into per-(row, group) lookup tables, then
fine-tune only the tables (Zhang et al. ICML 2025, arXiv 2410.06364).

``compress apply --plugin sketchtune MODEL`` learns the sketch of every linear weight in
the model's layer list (attention and MLP projections; embeddings, norms, biases and the
head stay dense in the source dtype). Row i of W is split into G contiguous column groups;
group (i, g) gets a table of 2^b values and each weight a b-bit code, Ŵij = T[i, g(j),
cij]. With calibration data the model runs block by block (``compressor.blockwise``):
each linear's H = 2XᵀX/N from its real inputs, the tables by weighted k-means (column
weights (1/[H⁻¹]_jj)^p, the OBS saliency; LeanQuant's U_jj^-4 from the Cholesky factor
U of H⁻¹ scored worse on every model we measured, see docs/benchmarks.md), codes
assigned column block by column block with GPTQ error feedback, the tables refitted to
each layer's output, at 2 bits each block's tables tuned to the source model's block
outputs (:func:`tune_block_tables`), and block k+1 calibrated on the outputs of the
sketched block k. Without data H = I: plain k-means per group.

``compress train --plugin sketchtune SKETCH`` tunes the tables alone: codes frozen, each
table entry's gradient the sum of dŴ over the weights that map to it (a gather; no
kernel), one layer's dense weight rebuilt at a time in forward and again in backward. The
tuned artifact holds only the tables; its codes and dense rest are read from the sketch.

Stored per linear ``NAME``: ``NAME.sketch`` (fp16, rows × groups × 2^b; float32 in a
tune) and ``NAME.codes`` (uint8, each row's codes packed most significant bit first:
for 4 bits two per byte, high nibble first; see ``compressor.quantize``).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

from compressor.contents import describe_content
from compressor.errors import InputError, OptionError
from compressor.hookspecs import hookimpl
from compressor.method import Manifest, Method, Option, non_negative, positive
from compressor.safetensors_format import TensorInfo
from compressor.sources import DecodedSource, TensorSource, copy_tensor
from compressor.training import training_options

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch

ENCODING = "sketchtune"


def _bits(v: int) -> str | None:
    return None if v in (2, 3, 4) else "must be 2, 3 or 4"


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def module_of(weight_name: str) -> str:
    """The module a linear weight belongs to: ``...q_proj.weight`` → ``...q_proj``."""
    return weight_name.removesuffix(".weight")


class SketchPlan:
    """Which tensors of a source are sketched (every 2-D weight in the layer list)."""

    def __init__(self, source: TensorSource, groups: int):
        from compressor.architectures import FfnModel

        self.layout = FfnModel(source, "sketchtune")
        self.source = source
        self.by_layer: dict[int, list[str]] = {}
        self.layer_of: dict[str, int] = {}
        for name, info in source.infos().items():
            m = self.layout.layer_re.match(name)
            if m is None:
                continue
            layer = int(m.group(1))
            self.layer_of[name] = layer
            if name.endswith(".weight") and len(info.shape) == 2 and info.is_float:
                self.by_layer.setdefault(layer, []).append(name)
        self.linears = [n for layer in sorted(self.by_layer) for n in self.by_layer[layer]]
        if not self.linears:
            raise InputError(f"{source.label} has no linear weights in its layers to sketch")
        for name in self.linears:
            cols = source.info(name).shape[1]
            if cols % groups:
                raise OptionError(
                    f"groups_per_row {groups} does not divide the {cols} columns of "
                    f"'{module_of(name)}'"
                )

    def suffixes(self) -> list[str]:
        """The linear modules of a layer, as named inside it (``self_attn.q_proj``)."""
        return list(self.layer_linears(min(self.by_layer)))

    def layer_linears(self, layer: int) -> dict[str, str]:
        """Layer ``layer``'s sketched weights by module name inside the layer."""
        return {
            module_of(self.layout.layer_re.match(n).group(2)): n
            for n in self.by_layer.get(layer, [])
        }

    def layer_tensors(self, layer: int) -> list[str]:
        return [n for n, k in self.layer_of.items() if k == layer]


def sketch_weight(weight, hessian, opts: dict):
    """(tables fp16 out × G × 2^b, codes uint8 out × in, Ŵ float32, relative output error
    or None) of one weight.

    ``hessian`` None is H = I (no calibration): weights unweighted, no error feedback.
    """
    import torch

    from compressor.quantize import (
        activation_order,
        assign_codes,
        decode_tables,
        inverse_hessian_factor,
        refit_tables,
        table_nearest,
        weighted_kmeans,
    )

    w = weight.float().clone()
    out, cols = w.shape
    groups, k = opts["groups_per_row"], 2 ** opts["bits"]
    n = cols // groups
    order = None  # the order error feedback visits the columns in; None: their own
    if hessian is None:
        u, col_weights = None, torch.ones(cols)
    else:
        if opts["act_order"]:
            order = activation_order(hessian)
        u, dead = inverse_hessian_factor(hessian, opts["damp"], order)
        if opts.get("saliency", "obs") == "obs":  # 1 / [H⁻¹]_jj, with diag(H⁻¹) = diag(UᵀU)
            log_w = -kmeans_exponent(opts) * torch.log((u * u).sum(0))
        else:  # LeanQuant's U_jj^-exponent
            log_w = -kmeans_exponent(opts) * torch.log(torch.diag(u))
        col_weights = torch.exp(log_w - log_w.max())
        if order is not None:  # computed in visiting order
            col_weights[order] = col_weights.clone()
        w[:, dead] = 0
    points = w.reshape(out * groups, n)
    weights = col_weights.reshape(1, groups, n).expand(out, groups, n).reshape(out * groups, n)
    tables = weighted_kmeans(points, weights, k, opts["iters"]).reshape(out, groups, k)
    tables = tables.half().float()  # codes are chosen against the values that are stored
    nearest = table_nearest(tables, n)
    codes, values = assign_codes(w, u, nearest, opts["block_size"], order)
    error = None
    if hessian is not None:  # error feedback can run away on a grid that misses the
        plain = assign_codes(w, None, nearest)  # pushed weights: keep whichever does better
        error, plain_error = output_error(w, values, hessian), output_error(w, plain[1], hessian)
        if plain_error < error:
            (codes, values), error = plain, plain_error
        steps = refit_steps(opts)
        if steps:  # the codes fixed, tables that fit the layer's output better
            fitted = refit_tables(w, codes, tables, hessian, steps).half().float()
            approx = decode_tables(fitted, codes)
            fitted_error = output_error(w, approx, hessian)
            if fitted_error < error:  # it cannot grow but by the fp16 rounding
                tables, values, error = fitted, approx, fitted_error
    return tables.half(), codes, values, error


def refit_steps(opts: dict) -> int:
    """CG steps of the table refit: the option, else 16 at 3 and 4 bits and none at 2.

    Measured on MiniLM (docs/benchmarks.md): the refit gains 0.1-0.5 points of embedding
    agreement at 3 and 4 bits (and about doubles the time to sketch a large model); at 2 bits it lowers every layer's calibration error but
    also the held-out agreement (G2: 0.812 to 0.763), fitting 4-entry tables to the
    calibration text."""
    if opts.get("refit") is not None:
        return opts["refit"]
    return 16 if opts["bits"] >= 3 else 0


def block_tune_passes(opts: dict) -> int:
    """Passes of block tuning over the calibration batches: the option, else 4 at 2 bits
    and none at 3 and 4 (with data only).

    Measured on MiniLM (docs/benchmarks.md): at 2 bits it gains 2.7-3 points of embedding
    agreement (G4 0.838 to 0.865); at 3 bits 0.4 and at 4 bits 0.1-0.2, for 2-3x the
    sketching time."""
    if not opts.get("data"):
        return 0
    if opts.get("block_tune") is not None:
        return opts["block_tune"]
    return 4 if opts["bits"] == 2 else 0


def block_tune_lr(opts: dict) -> float:
    """Adam's learning rate on the tables in block tuning: the option, else 3e-4 at 2
    bits and 1e-4 at 3 and 4 (finer tables take smaller steps; the best of 3e-5 to 1e-3
    on MiniLM)."""
    if opts.get("block_tune_lr") is not None:
        return opts["block_tune_lr"]
    return 3e-4 if opts["bits"] == 2 else 1e-4


def kmeans_exponent(opts: dict) -> float:
    """The exponent on the k-means weights: the option, else 1 (obs) or 4 (cholesky).

    Measured on MiniLM (docs/benchmarks.md): obs with 1 is best at 4 bits; 1.5 gains a
    little at 2 bits but wrecks layers with outlier inputs (a BERT FFN output whose
    largest H diagonal is 170x the median: output error 0.94 against 0.04)."""
    if opts["exponent"] is not None:
        return opts["exponent"]
    return 1.0 if opts.get("saliency", "obs") == "obs" else 4.0


def output_error(weight, approx, hessian) -> float:
    """Relative output error ‖(W − Ŵ)X‖ / ‖WX‖ on the calibration inputs, from H."""
    w = weight.float()
    d = w - approx
    num = ((d @ hessian) * d).sum()
    den = ((w @ hessian) * w).sum()
    return math.sqrt(max(float(num), 0.0) / max(float(den), 1e-30))


class Sketch(Method):
    """Learn a sketch of every linear weight; every other command reads it decoded.

    Bits per weight: b for the codes plus 16·2^b·G / in for the fp16 tables (4 bits,
    G 4, 2048 columns: 4.5). Tables dominate small layers: at 96 columns and 16 entries
    per table each group costs 2.7 bits per weight more, so pick ``groups_per_row`` so
    that in / G stays at 256 columns or more. ``samples`` rows of ``data`` calibrate
    (text, truncated to ``max_length`` tokens); calibration runs block by block for the
    Llama and BERT families (other families: leave out ``data``).
    """

    name = "sketchtune"
    kind = "compress"
    summary = "SketchTune: linear weights as b-bit codes into per-row-group lookup tables"
    reference = "https://arxiv.org/abs/2410.06364"
    version = "4"
    options = (
        Option(
            "bits", "int", 4, "bits per code (2, 3 or 4): 2^bits entries per table", check=_bits
        ),
        Option("groups_per_row", "int", 4, "tables per row (column groups)", check=positive),
        Option("data", "str", None, "calibration text (lines or JSONL); none: plain k-means"),
        Option("samples", "int", 128, "calibration rows used (the first ones)", check=positive),
        Option(
            "max_length",
            "int",
            512,
            "tokens per calibration row",
            check=lambda v: None if v > 1 else "must be at least 2",
        ),
        Option(
            "exponent",
            "float",
            None,
            "k-means weight of column j: saliency^exponent (default: 1 for obs, 4 for cholesky)",
            check=non_negative,
        ),
        Option(
            "saliency",
            "choice",
            "obs",
            "column importance for k-means: obs 1/[H⁻¹]_jj, or cholesky U_jj^-1 (LeanQuant)",
            choices=("obs", "cholesky"),
        ),
        Option("damp", "float", 0.01, "λ: H + λ·mean(diag H)·I", check=positive),
        Option(
            "act_order",
            "bool",
            True,
            "error feedback visits the columns by decreasing H diagonal (GPTQ's act-order); "
            "tables stay per column group",
        ),
        Option("block_size", "int", 128, "columns per error-feedback block", check=positive),
        Option("iters", "int", 30, "k-means iterations at most", check=positive),
        Option(
            "refit",
            "int",
            None,
            "conjugate-gradient steps that refit the tables to the layer's output on the "
            "calibration data once the codes are chosen (0: none; default 16 at 3-4 bits, "
            "0 at 2; with data only)",
            check=non_negative,
        ),
        Option(
            "block_tune",
            "int",
            None,
            "passes of Adam over the calibration data that tune each block's tables to the "
            "source model's block outputs, a quarter of the data held out to keep the best "
            "(0: none; default 4 at 2 bits, 0 at 3-4; with data only)",
            check=non_negative,
        ),
        Option(
            "block_tune_lr",
            "float",
            None,
            "learning rate of block tuning (default 3e-4 at 2 bits, 1e-4 at 3 and 4)",
            check=positive,
        ),
        Option(
            "import",
            "str",
            None,
            "a released SketchTune/LeanQuant file (module → (tables, codes)) to take the "
            "sketch from instead of learning it; read with torch.load(weights_only=True)",
        ),
    )

    def run(self, job):
        opts = job.options
        source = job.inputs[0]
        if source.content != "model":
            raise InputError(
                f"{source.label} holds {describe_content(source.content)}; sketchtune needs a model"
            )
        if opts["import"] and opts["data"]:
            raise OptionError("give -o import FILE or -o data CALIB, not both")
        plan = SketchPlan(source, opts["groups_per_row"])
        state = _Written(plan, opts)
        for name in source.names():
            if name not in plan.layer_of:
                copy_tensor(job.writer, source, name)
        if opts["import"]:
            calibration = None
            _import_released(job, plan, state, opts["import"])
        elif opts["data"]:
            calibration = _calibrate(job, plan, state)
        else:
            calibration = None
            for layer in job.progress(sorted(plan.by_layer), desc="sketch", unit="layer"):
                for name in plan.by_layer[layer]:
                    state.sketch(name, source.get(name), None)
                state.flush(job.writer, layer)
        return state.manifest(calibration)

    def decode(self, source: TensorSource) -> TensorSource:
        return DecodedSketch(source)

    def merge_space(self, base, experts):
        """Tunes of the base sketch merge on their tables: they share its codes, and Ŵ is
        linear in the tables, so task arithmetic there is task arithmetic on the decoded
        weights (TIES' sign election and disjoint mean too; its trimming counts table
        entries, not weights) while reading ~1% of the parameters."""
        if not isinstance(base, DecodedSketch) or base.root is not base.raw:
            return None
        codes = f"{module_of(next(iter(base.layers)))}.codes"
        home = base.raw.tensor_file(codes)
        for e in experts:
            if not isinstance(e, DecodedSketch) or e.root.tensor_file(codes) != home:
                return None
        extra = {
            "encoding": ENCODING,
            "tuned": True,
            "codes_from": "base",
            "summary": [
                f"merged on the tables: {sum(_Tables(base).numels())} entries per expert, "
                "the codes and every other tensor the base sketch's"
            ],
        }
        return _Tables(base), [_Tables(e) for e in experts], extra


class _Tables(TensorSource):
    """A sketch's (or tune's) tables alone, float32, named ``NAME.sketch``: what merges
    of tunes read and write."""

    content = "model"

    def __init__(self, sketch: DecodedSketch):
        import torch

        self.sketch = sketch
        self.label = sketch.label
        self.files = sketch.raw.files
        self.manifest = {}
        self._infos = {}
        for name in sketch.layers:
            stored = f"{module_of(name)}.sketch"
            shape = tuple(sketch.raw.info(stored).shape)
            self._infos[stored] = TensorInfo(stored, shape, torch.float32, 0, 4 * math.prod(shape))

    def infos(self):
        return self._infos

    def numels(self):
        return [math.prod(i.shape) for i in self._infos.values()]

    def get(self, name: str, rows: slice | None = None):
        return self.sketch.raw.get(name, rows).float()


class _Written:
    """What has been written so far, and the numbers the manifest reports."""

    def __init__(self, plan: SketchPlan, opts: dict):
        self.plan, self.opts = plan, opts
        self.layers: dict[str, dict] = {}
        self.errors: dict[str, float] = {}
        self.block_errors: dict[int, list[float]] = {}
        self.pending: dict[str, tuple] = {}  # name -> (tables, codes) of the current block
        self.code_bits = self.table_bits = self.weights = 0

    def sketch(self, name: str, weight, hessian) -> torch.Tensor:
        """Sketch one weight (written by :meth:`flush`); return Ŵ in the source dtype."""
        tables, codes, values, error = sketch_weight(weight, hessian, self.opts)
        if error is not None:
            self.errors[name] = error
        self.pending[name] = (tables, codes)
        return values.to(weight.dtype)

    def tune(self, layer: int, block, calibration, masks, hessian) -> None:
        """Tune layer ``layer``'s tables to the source model's outputs
        (:func:`tune_layer`); record the block's and each weight's errors."""
        passes = block_tune_passes(self.opts)
        tuned = tune_layer(
            self.plan,
            layer,
            block,
            calibration,
            masks,
            self.pending,
            passes,
            block_tune_lr(self.opts),
        )
        if tuned is None:
            return
        self.block_errors[layer], approx = tuned
        for suffix, name in self.plan.layer_linears(layer).items():
            self.errors[name] = output_error(
                self.plan.source.get(name), approx[name], hessian(suffix)
            )

    def flush(self, writer, layer: int) -> None:
        """Write layer ``layer``'s sketches and the rest of its tensors."""
        for name in self.plan.by_layer.get(layer, []):
            if name in self.pending:
                info = self.plan.source.info(name)
                self.put(writer, name, tuple(info.shape), info.dtype, *self.pending.pop(name))
        self.dense_rest(writer, layer)

    def put(self, writer, name: str, shape: tuple, dtype, tables, codes) -> None:
        """Write a weight's tables (fp16) and codes (packed), and count their bits."""
        from compressor.quantize import pack_codes

        module = module_of(name)
        writer.write(f"{module}.sketch", tables)
        writer.write(f"{module}.codes", pack_codes(codes, self.opts["bits"]))
        self.layers[name] = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
        numel = math.prod(shape)
        self.weights += numel
        self.code_bits += numel * self.opts["bits"]
        self.table_bits += tables.numel() * 16

    def dense_rest(self, writer, layer: int) -> None:
        for name in self.plan.layer_tensors(layer):
            if name not in self.layers:
                copy_tensor(writer, self.plan.source, name)

    def manifest(self, calibration: dict | None) -> Manifest:
        source = self.plan.source
        source_bytes = sum(i.nbytes for i in source.infos().values())
        sketched = sum(source.info(n).nbytes for n in self.layers)
        stored = source_bytes - sketched + (self.code_bits + self.table_bits) // 8
        bpw = (self.code_bits + self.table_bits) / self.weights
        metrics = {
            "bits_per_weight": bpw,
            "bytes": stored,
            "ratio": source_bytes / stored,
            "sketched_weights": self.weights,
            "sketched_tensors": len(self.layers),
            "calibrated": calibration is not None,
        }
        if self.block_errors:  # held-out relative error of each tuned block's outputs
            after = [v[1] for v in self.block_errors.values()]
            metrics["mean_block_error"] = sum(after) / len(after)
        if self.errors:
            worst = max(self.errors, key=self.errors.get)
            metrics["mean_output_error"] = sum(self.errors.values()) / len(self.errors)
            metrics["worst_output_error"] = self.errors[worst]
            metrics["worst_tensor"] = worst
        if calibration:
            how = f"calibrated on {calibration['samples']} rows ({calibration['tokens']} tokens)"
        elif self.opts["import"]:
            how = f"imported from {self.opts['import']}"
        else:
            how = "no calibration data: plain k-means per group (H = I)"
        extra = {
            "encoding": ENCODING,
            "bits": self.opts["bits"],
            "groups_per_row": self.opts["groups_per_row"],
            "exponent": kmeans_exponent(self.opts),
            "saliency": self.opts["saliency"],
            "damp": self.opts["damp"],
            "act_order": bool(calibration) and self.opts["act_order"],
            "block_size": self.opts["block_size"],
            "refit_steps": refit_steps(self.opts) if calibration else 0,
            "block_tune_passes": block_tune_passes(self.opts) if self.block_errors else 0,
            "block_tune_lr": block_tune_lr(self.opts) if self.block_errors else None,
            "block_errors": {str(k): v for k, v in self.block_errors.items()},
            "calibration": calibration,
            "order": source.names(),
            "layers": self.layers,
            "output_errors": self.errors,
            "summary": [
                f"{len(self.layers)} linear weights sketched at {self.opts['bits']} bits, "
                f"{self.opts['groups_per_row']} tables per row: {bpw:.2f} bits per weight; {how}"
            ],
        }
        return Manifest("model", metrics=metrics, extra=extra)


def _calibrate(job, plan: SketchPlan, state: _Written) -> dict:
    """Sketch every linear on its calibration Hessian, block by block (true-sequential)."""
    opts = job.options
    inputs = calibration_batches(plan.source, opts["data"], opts["samples"], opts["max_length"])

    tune = state.tune if block_tune_passes(opts) else None
    if tune is not None and len(inputs) < 2:
        job.warn(
            f"sketchtune: block tuning holds out a quarter of the calibration batches (8 rows "
            f"each), and {inputs.rows} rows make only one: it is skipped (give 9 rows or more)"
        )
        tune = None
    calibrate_sequentially(
        plan, inputs, state.sketch, lambda k: state.flush(job.writer, k), job.progress, tune=tune
    )
    digest = hashlib.sha256(Path(opts["data"]).read_bytes()).hexdigest()
    return {
        "data": str(opts["data"]),
        "digest": digest,
        "samples": inputs.rows,
        "tokens": inputs.tokens,
    }


class _Batches(list):
    """Calibration batches (model keyword arguments), and how many rows they hold."""

    rows = 0

    @property
    def tokens(self) -> int:
        """The unpadded tokens of all batches."""
        return sum(int(x["attention_mask"].sum()) for x in self)


def calibration_batches(source, data: str, samples: int, max_length: int) -> _Batches:
    """The first ``samples`` text rows of ``data``, tokenized in batches for the model."""
    from compressor.data import batches, read_examples
    from compressor.modeling import model_inputs, source_tokenizer

    rows = read_examples(data)[:samples]
    if any(e.text is None for e in rows):
        raise InputError(f"{data}: calibration needs text rows")
    tokenizer = source_tokenizer(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    out = _Batches(model_inputs(b, tokenizer, data, max_length) for b in batches(rows, 8))
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
) -> None:
    """Run ``inputs`` through the model block by block; in each block, hand every linear
    weight with its Hessian H = 2XᵀX/N (over unpadded tokens) to ``quantize(name, weight,
    H) -> Ŵ``, put Ŵ in the block, call ``tune(k, block, calibration, masks, hessian)``
    if given (it may change the block's weights again; ``hessian(suffix)`` gives H), then
    ``after_layer(k)``, and feed the next block the outputs of the quantised one
    (``sequential`` False: of the source's block, so every Hessian comes from the source
    model). Also what the benchmarks' GPTQ baseline runs on."""
    from compressor.blockwise import run_blockwise, supports

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
    )


def tune_layer(plan, layer: int, block, calibration, masks, pending: dict, passes: int, lr):
    """Tune the sketches of layer ``layer`` (``pending``: weight name → (tables, codes),
    updated in place) with :func:`tune_block_tables` and put the tuned Ŵ in ``block``.
    Returns ([held-out error before, after], {name: Ŵ}), or None if nothing was tuned."""
    import torch

    from compressor.quantize import decode_tables

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

    from compressor.blockwise import hidden_states
    from compressor.quantize import decode_tables

    dtype = next(block.parameters()).dtype
    codes = {s: c for s, (_, c) in sketches.items()}
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
        for rows, a, kw in _row_chunks(args, kwargs):
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

    kept = {s: t.half() for s, (t, _) in sketches.items()}
    if not judge or passes == 0:
        return kept, None, None
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
    return kept, start, best


def _row_chunks(args: tuple, kwargs: dict, tokens: int = 1024):
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


def _import_released(job, plan: SketchPlan, state: _Written, path: str) -> None:
    """Take the sketch from a released file: a dict of module name → (tables, codes), or
    one whose ``sketched_params`` entry is that dict. Tables are rows × 2^b (one group per
    row) or rows × groups × 2^b; codes rows × in (one per byte) or packed as stored here.
    Only ``torch.load(weights_only=True)``: a file that needs more unpickling is refused
    and never run."""
    import pickle
    import warnings

    import torch

    from compressor.quantize import packed_width, unpack_codes

    file = Path(path)
    if not file.is_file():
        raise InputError(f"no such file: {file}")
    try:
        with warnings.catch_warnings():  # torch's own advice is to unpickle anyway: not ours
            warnings.simplefilter("ignore")
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError):
        raise InputError(
            f"{file} is not a plain tensor file: loading it needs arbitrary unpickling, which "
            "can run code, and compressor never does that"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("sketched_params"), dict):
        obj = obj["sketched_params"]
    if not isinstance(obj, dict):
        raise InputError(f"{file} holds a {type(obj).__name__}, not a dict of module sketches")
    bits, groups = state.opts["bits"], state.opts["groups_per_row"]
    for name in plan.linears:
        module = module_of(name)
        entry = obj.get(module)
        if not isinstance(entry, (tuple, list)) or len(entry) != 2:
            raise InputError(f"{file} has no (tables, codes) pair for '{module}'")
        tables, codes = (torch.as_tensor(t) for t in entry)
        rows, cols = plan.source.info(name).shape
        if tables.dim() == 2:
            tables = tables[:, None, :]
        if tuple(tables.shape) != (rows, groups, 2**bits):
            raise InputError(
                f"{file}: the tables of '{module}' have shape {list(tables.shape)}; "
                f"{bits} bits and {groups} groups per row need {[rows, groups, 2**bits]}"
            )
        if tuple(codes.shape) == (rows, packed_width(cols, bits)) and codes.dtype == torch.uint8:
            codes = unpack_codes(codes, bits, cols)
        if tuple(codes.shape) != (rows, cols) or int(codes.max()) >= 2**bits:
            raise InputError(f"{file}: the codes of '{module}' do not fit a {rows}x{cols} weight")
        info = plan.source.info(name)
        state.put(job.writer, name, info.shape, info.dtype, tables.half(), codes.to(torch.uint8))
    for layer in sorted(plan.by_layer):
        state.dense_rest(job.writer, layer)


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


class SketchTrain(Method):
    """Fine-tune a sketch's tables on data; codes, dense tensors and head stay frozen.

    Trainable parameters: Σ rows × G × 2^b over the sketched linears (about LoRA at rank
    8·G on the same projections at 4 bits). AdamW without weight decay (the tables are
    weights, not a correction), clipping 1.0; ``objective`` ce needs the classification
    head the model was saved with, lm a causal LM. The result holds only the tables; its
    parent is the sketch, whose codes it decodes with.
    """

    name = "sketchtune"
    kind = "train"
    summary = "SketchTune: fine-tune only a sketch's lookup tables (codes frozen)"
    reference = "https://arxiv.org/abs/2410.06364"
    version = "1"
    reads_raw = (ENCODING,)
    example_options = {"data": "train.jsonl"}
    options = (
        *training_options(steps=100, lr=3e-4, trained="the tables"),
        Option("seed", "int", 0, "seed of the row order and dropout"),
    )

    def run(self, job):
        import torch

        from compressor.data import read_examples
        from compressor.modeling import source_model
        from compressor.tasks import Task, check_head, objective_for
        from compressor.training import Trainer, row_batches, show_loss

        opts, raw = job.options, job.inputs[0]
        if not opts["data"]:
            raise OptionError("sketchtune training needs -o data PATH")
        if raw.manifest.get("encoding") != ENCODING:
            raise InputError(
                f"{raw.label} is not a sketch; make one with `compress apply --plugin sketchtune`"
            )
        sketch = DecodedSketch(raw)
        rows = read_examples(opts["data"])
        objective = objective_for(rows, opts["objective"])
        torch.manual_seed(opts["seed"])
        losses: list[float] = []
        with source_model(sketch, "saved") as (net, tokenizer):
            check_head(net, objective, raw.label)
            task = Task(objective, net.config, tokenizer, opts["max_length"])
            split = task.split(rows, opts["data"], opts["batch_size"])
            tables = swap_in_sketches(net, sketch)
            trainer = Trainer(list(tables.values()), lr=opts["lr"], weight_decay=0.0, clip=1.0)
            net.train()
            picks = row_batches(len(rows), opts["batch_size"], opts["steps"], opts["seed"])
            bar = job.progress(picks, desc="sketchtune", unit="step", total=opts["steps"])
            for pick in bar:
                x, y = task.batch(split, pick)

                def piece(x=x, y=y):
                    total, n = task.loss(net(**x).logits, x, y)
                    return total / max(n, 1), 1

                loss, _ = trainer.step([piece])
                losses.append(loss)
                show_loss(bar, loss=loss)
        for name, table in tables.items():
            job.writer.write(f"{module_of(name)}.sketch", table.detach().float())
        window = max(1, len(losses) // 10)
        trainable = sum(t.numel() for t in tables.values())
        return Manifest(
            "model",
            metrics={
                "steps": opts["steps"],
                "trainable_parameters": trainable,
                "loss_first": sum(losses[:window]) / window,
                "loss_last": sum(losses[-window:]) / window,
            },
            extra={
                "encoding": ENCODING,
                "tuned": True,
                "objective": objective,
                "summary": [
                    f"{trainable} table entries tuned over {opts['steps']} steps ({objective}); "
                    "codes and every other tensor are the sketch's"
                ],
            },
        )


def _sketched_linear_class():
    """The table-gather linear module (built on first use: start-up imports no torch)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from compressor.quantize import decode_tables

    class SketchedLinear(torch.nn.Module):
        """y = x Ŵᵀ + b with Ŵ gathered from trainable tables by frozen codes; Ŵ is
        rebuilt in forward and again in backward, never kept."""

        def __init__(self, tables, codes, bias, transposed: bool):
            super().__init__()
            self.tables = tables
            self.register_buffer("codes", codes, persistent=False)
            self.bias = bias
            self.transposed = transposed  # GPT-2's Conv1D stores (in, out)

        def _run(self, x, tables):
            w = decode_tables(tables, self.codes).to(x.dtype)
            if self.transposed:
                out = x @ w
                return out + self.bias if self.bias is not None else out
            return torch.nn.functional.linear(x, w, self.bias)

        def forward(self, x):
            return checkpoint(self._run, x, self.tables, use_reentrant=False)

    return SketchedLinear


def swap_in_sketches(net, sketch: DecodedSketch) -> dict:
    """Replace each sketched linear of ``net`` by a table-gather module; freeze the rest.
    Returns the trainable tables by weight name."""
    import torch

    from compressor.modeling import checkpoint_names

    cls = _sketched_linear_class()
    for p in net.parameters():
        p.requires_grad_(False)
    modules = dict(net.named_modules())
    own_name = {ckpt: param for param, ckpt in checkpoint_names(net, sketch).items()}
    tables = {}
    for name in sketch.layers:
        path = module_of(own_name.get(name, name))
        old = modules.get(path)
        if old is None:
            raise InputError(f"{sketch.label}: the model has no module '{path}'")
        parent_path, _, attr = path.rpartition(".")
        table = torch.nn.Parameter(sketch.tables(name))
        bias = getattr(old, "bias", None)
        if bias is not None:
            bias.requires_grad_(False)
        new = cls(table, sketch.codes(name), bias, type(old).__name__ == "Conv1D")
        setattr(modules[parent_path] if parent_path else net, attr, new)
        tables[name] = table
    return tables


class DecodedSketch(DecodedSource):
    """A sketch (or a tune of one) read back as the dense model, one weight at a time.

    A tune stores only its tables; codes and the dense rest come from the sketch it was
    tuned from (its ``input`` parent, followed through tunes of tunes).
    """

    content = "model"

    def __init__(self, raw: TensorSource):
        super().__init__(raw)
        self.root = _sketch_of(raw)  # the artifact holding codes and dense tensors
        self.layers = self.root.manifest["layers"]
        self.bits = self.root.manifest["bits"]
        for name in self.root.manifest["order"]:
            if name in self.layers:
                meta = self.layers[name]
                shape, dtype = tuple(meta["shape"]), _dtype(meta["dtype"])
                size = math.prod(shape) * dtype.itemsize
                self._infos[name] = TensorInfo(name, shape, dtype, 0, size)
            else:
                self._infos[name] = self.root.info(name)

    def encoded(self, name: str) -> bool:
        return name in self.layers

    def get(self, name: str, rows: slice | None = None):
        if not self.encoded(name):
            return self.root.get(name, rows)
        return super().get(name, rows)

    def tables(self, name: str):
        return self.raw.get(f"{module_of(name)}.sketch").float()

    def codes(self, name: str):
        from compressor.quantize import unpack_codes

        cols = self.layers[name]["shape"][1]
        return unpack_codes(self.root.get(f"{module_of(name)}.codes"), self.bits, cols)

    def _decode(self, name: str):
        from compressor.quantize import decode_tables

        out = decode_tables(self.tables(name), self.codes(name))
        return out.to(self._infos[name].dtype)

    def verify(self) -> None:
        self.raw.verify()
        if self.root is not self.raw:
            self.root.verify()

    def close(self) -> None:
        self.raw.close()
        if self.root is not self.raw:
            self.root.close()


def _sketch_of(raw: TensorSource) -> TensorSource:
    """The sketch a raw artifact's codes live in: itself, or the parent a tune (``input``)
    or a merge of tunes (``base``) was made from, recursively."""
    source = raw
    while source.manifest.get("tuned"):
        source = source.open_parent(source.manifest.get("codes_from", "input"), raw=(ENCODING,))
    return source


@hookimpl
def register_methods(register):
    register(Sketch())
    register(SketchTrain())
