"""``sample -p neumeta``: a model at a width, its normalisation statistics recalibrated."""

from __future__ import annotations

import math

from compressor.errors import InputError, OptionError
from compressor.io.sources import TensorSource, copy_tensor
from compressor.method import Manifest, Method, Option, fraction, positive
from compressor.plugins.neumeta.model import ENCODING, DecodedNeumeta, NeumetaModel, _batch_norms


class NeumetaSample(Method):
    """Write the model at a width from a trained NeuMeta generator.

    ``width`` is a fraction of every group's full width (MatFormer's rounding); ``widths``
    gives one width per group instead (ResNet: per stage; transformers take one FFN width,
    so their values must be equal). ``samples`` K > 1 averages K generations with the
    training's coordinate noise (seeded), as the paper does; 1 uses clean coordinates.
    The config's width keys are set to the new sizes; the rest is copied from the parent.
    """

    name = "neumeta"
    kind = "sample"
    uses_device = True  # the generator (and BatchNorm re-estimation) on the device
    summary = "NeuMeta: write the model at a width from a trained generator"
    reference = "https://arxiv.org/abs/2410.11878"
    version = "1"
    reads_raw = (ENCODING,)
    example_options = {"width": "0.5"}
    options = (
        Option("width", "float", None, "a fraction of the full width, in (0, 1]", check=fraction),
        Option("widths", "ints", None, "one width per group (ResNet: per stage)"),
        Option(
            "samples", "int", 1, "noisy generations averaged (1: clean coordinates)", check=positive
        ),
        Option("seed", "int", 0, "seed of the coordinate noise when samples > 1"),
        Option("data", "str", None, "rows to re-estimate BatchNorm statistics at the width"),
        Option("calibration_rows", "int", 256, "rows of -o data used for them", check=positive),
        Option("batch_size", "int", 64, "rows per forward pass", check=positive),
        Option("max_length", "int", 128, "tokens per text", check=positive),
    )

    def decode(self, source: TensorSource) -> TensorSource:
        return DecodedNeumeta(source)

    def run(self, job):
        import torch

        opts, raw = job.options, job.inputs[0]
        model = NeumetaModel(raw, job.device)
        try:
            layout = model.layout
            widths = self._widths(layout, opts)
            config = layout.resized_config(widths)
            gen = torch.Generator().manual_seed(opts["seed"])
            parent = model.parent
            held = {}
            # trained with batch statistics: re-estimate them (at full width, when data is
            # given; without it the source's fit there)
            norms = bool(raw.manifest.get("batch_norm")) and (
                bool(opts["data"]) or widths != layout.groups
            )
            if norms and not opts["data"]:
                raise OptionError(
                    "this model normalises with BatchNorm, whose statistics at a new width are "
                    "estimated from data: give -o data PATH (a few hundred rows)"
                )
            if norms:
                held = {n: model.generate(n, widths, opts["samples"], gen) for n in layout.tensors}
                held.update(recalibrate_norms(config, parent, held, opts, job))
            for name in job.progress(parent.names(), desc="neumeta sample"):
                if name in layout.tensors:
                    t = held.pop(name, None)
                    if t is None:
                        t = model.generate(name, widths, opts["samples"], gen)
                    job.writer.write(name, t.to(parent.info(name).dtype).contiguous())
                else:
                    copy_tensor(job.writer, parent, name)
            job.writer.add_json("config.json", config)
            params = sum(
                info.numel
                for n, info in parent.infos().items()
                if info.is_float and n not in layout.tensors
            ) + sum(math.prod(layout.shape(n, widths)) for n in layout.tensors)
            source_params = sum(i.numel for i in parent.infos().values() if i.is_float)
        finally:
            model.close()
        full = layout.groups
        return Manifest(
            "model",
            metrics={
                "params": params,
                "source_params": source_params,
                "ratio": params / source_params,
                "mean_width_fraction": sum(widths[g] / full[g] for g in full) / len(full),
            },
            extra={
                "widths": widths,
                "full_widths": full,
                "samples": opts["samples"],
                "batch_norm_statistics": "re-estimated" if norms else "generated",
                "summary": [
                    "widths: " + ", ".join(f"{g} {widths[g]}/{full[g]}" for g in full),
                    "clean coordinates"
                    if opts["samples"] == 1
                    else f"{opts['samples']} noisy generations averaged",
                ],
            },
        )

    @staticmethod
    def _widths(layout, opts) -> dict[str, int]:
        if (opts["width"] is None) == (opts["widths"] is None):
            raise OptionError("neumeta sampling needs one of -o width F or -o widths W1,W2,...")
        if opts["width"] is not None:
            return layout.widths_at(opts["width"])
        groups = list(layout.groups)
        values = opts["widths"]
        if len(values) != len(groups):
            raise OptionError(
                f"option 'widths' needs {len(groups)} values (one per group: "
                f"{', '.join(groups)}); got {len(values)}"
            )
        for g, v in zip(groups, values, strict=True):
            if not 0 < v <= layout.groups[g]:
                raise OptionError(f"option 'widths': {g} takes 1 to {layout.groups[g]}; got {v}")
        return layout.fit(dict(zip(groups, values, strict=True)))


def recalibrate_norms(config: dict, parent, tensors: dict, opts: dict, job) -> dict:
    """BatchNorm running statistics of the model at a new width, re-estimated on rows of
    ``opts['data']`` (a cumulative average over ``calibration_rows``); returns them by name."""
    import torch
    import transformers

    from compressor.learning.data import read_examples
    from compressor.learning.tasks import Task
    from compressor.models.modeling import _auto_class

    rows = read_examples(opts["data"])[: opts["calibration_rows"]]
    if not rows:
        raise InputError(f"{opts['data']} has no rows")
    cfg = transformers.AutoConfig.for_model(
        config["model_type"], **{k: v for k, v in config.items() if k != "model_type"}
    )
    with torch.device("meta"):
        net = _auto_class(cfg, "saved")(cfg)
    state = {n: tensors[n] if n in tensors else parent.get(n) for n in parent.names()}
    net.load_state_dict(state, assign=True, strict=True)
    net.to(job.device)
    task = Task("entropy", cfg, None, opts["max_length"], job.device)
    split = task.split(rows, opts["data"], opts["batch_size"])
    batches = job.progress(task.batches(split), desc="neumeta: BatchNorm statistics")
    reestimate_batch_norms(net, (x for x, _ in batches))
    return {
        f"{n}.{stat}": getattr(m, stat).detach().cpu().clone()
        for n, m in _batch_norms(net).items()
        for stat in ("running_mean", "running_var")
    }


def reestimate_batch_norms(net, inputs) -> None:
    """Every BatchNorm's running statistics, anew: the cumulative average over ``inputs``
    (model input dicts) run without gradients; the model is left in eval mode."""
    import torch

    norms = _batch_norms(net).values()
    net.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average, not an exponential one
        m.train()
    with torch.no_grad():
        for x in inputs:
            net(**x)
    net.eval()
