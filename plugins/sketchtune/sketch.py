"""Sketching one weight (its codes and tables) and ``apply -p sketchtune``: the plan, calibration
layer by layer, the tables written and the sketch's manifest."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

from compressor.errors import InputError, OptionError
from compressor.io.contents import describe_content
from compressor.io.sources import TensorSource, copy_tensor
from compressor.method import Manifest, Method, Option, non_negative, positive

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch
from compressor.plugins.sketchtune.calibrate import (
    calibrate_sequentially,
    calibration_batches,
    tune_layer,
)
from compressor.plugins.sketchtune.config import (
    ENCODING,
    SketchPlan,
    _bits,
    block_tune_lr,
    block_tune_passes,
    kmeans_exponent,
    module_of,
    refit_steps,
)
from compressor.plugins.sketchtune.decoded import DecodedSketch, _Tables


def sketch_weight(weight, hessian, opts: dict, device: str | None = None):
    """(tables fp16 out × G × 2^b, codes uint8 out × in, Ŵ float32, relative output error
    or None) of one weight, computed on ``device`` (default: the weight's); tables and
    codes come back on the CPU, Ŵ on the device.

    ``hessian`` None is H = I (no calibration): weights unweighted, no error feedback.
    """
    import torch

    from compressor.plugins.sketchtune.quantize import (
        activation_order,
        assign_codes,
        decode_tables,
        inverse_hessian_factor,
        refit_tables,
        table_nearest,
        weighted_kmeans,
    )

    device = device or weight.device
    w = weight.to(device).float().clone()
    hessian = None if hessian is None else hessian.to(device)
    out, cols = w.shape
    groups, k = opts["groups_per_row"], 2 ** opts["bits"]
    n = cols // groups
    order = None  # the order error feedback visits the columns in; None: their own
    if hessian is None:
        u, col_weights = None, torch.ones(cols, device=device)
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
    return tables.half().cpu(), codes.cpu(), values, error


def output_error(weight, approx, hessian) -> float:
    """Relative output error ‖(W − Ŵ)X‖ / ‖WX‖ on the calibration inputs, from H (on
    H's device)."""
    w = weight.to(hessian.device).float()
    d = w - approx.to(hessian.device)
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
    uses_device = True  # k-means, Hessians, error feedback, refit and block tuning
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
        state = _Written(plan, opts, job.device)
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


class _Written:
    """What has been written so far, and the numbers the manifest reports."""

    def __init__(self, plan: SketchPlan, opts: dict, device: str = "cpu"):
        self.plan, self.opts, self.device = plan, opts, device
        self.layers: dict[str, dict] = {}
        self.errors: dict[str, float] = {}
        self.block_errors: dict[int, list[float]] = {}
        self.pending: dict[str, tuple] = {}  # name -> (tables, codes) of the current block
        self.code_bits = self.table_bits = self.weights = 0

    def sketch(self, name: str, weight, hessian) -> torch.Tensor:
        """Sketch one weight (written by :meth:`flush`); return Ŵ in the source dtype."""
        tables, codes, values, error = sketch_weight(weight, hessian, self.opts, self.device)
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
        from compressor.plugins.sketchtune.quantize import pack_codes

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
    inputs = calibration_batches(
        plan.source, opts["data"], opts["samples"], opts["max_length"], job.device
    )

    tune = state.tune if block_tune_passes(opts) else None
    if tune is not None and len(inputs) < 2:
        job.warn(
            f"sketchtune: block tuning holds out a quarter of the calibration batches (8 rows "
            f"each), and {inputs.rows} rows make only one: it is skipped (give 9 rows or more)"
        )
        tune = None
    calibrate_sequentially(
        plan,
        inputs,
        state.sketch,
        lambda k: state.flush(job.writer, k),
        job.progress,
        tune=tune,
        device=job.device,
    )
    digest = hashlib.sha256(Path(opts["data"]).read_bytes()).hexdigest()
    return {
        "data": str(opts["data"]),
        "digest": digest,
        "samples": inputs.rows,
        "tokens": inputs.tokens,
    }


def _import_released(job, plan: SketchPlan, state: _Written, path: str) -> None:
    """Take the sketch from a released file: a dict of module name → (tables, codes), or
    one whose ``sketched_params`` entry is that dict. Tables are rows × 2^b (one group per
    row) or rows × groups × 2^b; codes rows × in (one per byte) or packed as stored here.
    Only ``torch.load(weights_only=True)``: a file that needs more unpickling is refused
    and never run."""
    import pickle
    import warnings

    import torch

    from compressor.plugins.sketchtune.quantize import packed_width, unpack_codes

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
