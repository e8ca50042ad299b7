"""neumeta: learn a weight generator from a model, then sample the model at any width
(Yang et al., ECCV 2024, "Neural Metamorphosis", arXiv 2410.11878).

``compress train --plugin neumeta MODEL -o data train.jsonl`` learns an implicit neural
representation of MODEL's morphable part (``compressor.architectures.WidthLayout``: every
FFN's hidden neurons in the MatFormer families, every stage's channels in a ResNet of
basic blocks). Each group's neurons are first put in a smoothing order (a short
Hamiltonian path over their weights, fast-tsp), which leaves the model's function as it
was; then every step samples a width in the trained range, generates that model's width
tensors (``compressor.morphing``), runs it on a batch and trains the generator on the task
loss plus a reconstruction loss at full width. The generator's output is a correction to
the smoothed source resampled to the width (last layer zero-initialised), so full width
starts exactly at the source and no width starts from noise: the paper's recipe, trained
from scratch, collapses (issue #15's re-implementation; Sommariva et al. 2025).

The artifact holds the generator, the permutations and a manifest; every other tensor is
read from MODEL, its parent. It decodes to the full-width model (``export``, ``eval``).
``compress sample --plugin neumeta ARTIFACT -o width 0.4`` writes a model at that width.
"""

from __future__ import annotations

import math
import time

from compressor.contents import describe_content
from compressor.errors import InputError, OptionError
from compressor.hookspecs import hookimpl
from compressor.method import Manifest, Method, Option, fraction, non_negative, positive
from compressor.sources import DecodedSource, TensorSource, copy_tensor
from compressor.training import training_options

ENCODING = "neumeta"
SMOOTHING = ("greedy", "tsp", "none")


def _width_range(v) -> str | None:
    if len(v) != 2 or not all(0 < x <= 1 for x in v) or v[0] > v[1]:
        return "must be two fractions LOW,HIGH with 0 < LOW <= HIGH <= 1"
    return None


class NeumetaTrain(Method):
    """Learn a generator of MODEL's width tensors from coordinates, on data.

    Per step: a width fraction drawn uniformly from ``widths`` (LOW,HIGH), the width
    tensors generated there with coordinate noise (``noise``, in neuron cells), the task
    loss of a batch through the model at that width (everything outside the width part
    stays the source's), plus ``recon`` × the mean squared correction at full width.
    AdamW with ``weight_decay`` (the paper's small weight penalty), clipping 1.0. No
    dropout; BatchNorm normalises with each batch's statistics, since running statistics
    pooled from the source do not fit a narrower model (sampling re-estimates them).
    """

    name = "neumeta"
    kind = "train"
    summary = "NeuMeta: learn a generator of the model's weights at any FFN or channel width"
    reference = "https://arxiv.org/abs/2410.11878"
    version = "1"
    example_options = {"data": "train.jsonl"}
    options = (
        *training_options(steps=200, lr=1e-3, trained="the generator"),
        Option(
            "widths",
            "floats",
            [0.25, 1.0],
            "the width fractions trained on: LOW,HIGH",
            check=_width_range,
        ),
        Option("weight_decay", "float", 1e-4, "AdamW weight decay", check=non_negative),
        Option("hidden", "int", 64, "the generator MLPs' hidden size", check=positive),
        Option("depth", "int", 2, "residual blocks per generator MLP", check=non_negative),
        Option("fourier", "int", 6, "Fourier frequencies per coordinate", check=non_negative),
        Option(
            "noise",
            "float",
            0.5,
            "coordinate noise in training, in neuron cells",
            check=non_negative,
        ),
        Option(
            "recon",
            "float",
            1.0,
            "weight of the full-width reconstruction loss",
            check=non_negative,
        ),
        Option(
            "smoothing",
            "choice",
            "greedy",
            "neuron order first: fast-tsp nearest-neighbour path (deterministic), its "
            "local search for tsp_seconds, or none",
            choices=SMOOTHING,
        ),
        Option("tsp_seconds", "float", 2.0, "time per group for smoothing tsp", check=positive),
        Option("seed", "int", 0, "seed of the generator's init, widths, noise and row order"),
    )

    def run(self, job):
        import torch

        from compressor.architectures import WidthLayout
        from compressor.data import read_examples
        from compressor.modeling import source_model
        from compressor.morphing import COORDINATES, WidthGenerator, permute
        from compressor.tasks import Task, check_head, objective_for
        from compressor.training import Trainer, functional_forward, row_batches, show_loss

        opts, source = job.options, job.inputs[0]
        if not opts["data"]:
            raise OptionError("neumeta training needs -o data PATH")
        if source.content != "model":
            raise InputError(
                f"{source.label} holds {describe_content(source.content)}; neumeta needs a model"
            )
        layout = WidthLayout(source)
        rows = read_examples(opts["data"])
        objective = objective_for(rows, opts["objective"])
        lo, hi = opts["widths"]
        started = time.perf_counter()
        with source_model(source, "saved") as (net, tokenizer):
            check_head(net, objective, source.label)
            task = Task(objective, net.config, tokenizer, opts["max_length"])
            split = task.split(rows, opts["data"], opts["batch_size"])
            module_name = _module_names(net, source, layout)
            src = {n: source.get(n).float() for n in layout.tensors}
            perms = smoothing_orders(layout, src, opts["smoothing"], opts["tsp_seconds"], job)
            src = {n: permute(t, layout.tensors[n], perms) for n, t in src.items()}
            scales = {n: _scale(t) for n, t in src.items()}
            torch.manual_seed(opts["seed"])
            gen = WidthGenerator(layout, opts["hidden"], opts["depth"], opts["fourier"])
            for p in net.parameters():
                p.requires_grad_(False)
            norms = _batch_norms(net)
            for m in norms.values():
                m.train()  # batch statistics; the running ones are regenerated every step
            trainer = Trainer(gen.parameters(), lr=opts["lr"], weight_decay=opts["weight_decay"])
            rng = torch.Generator().manual_seed(opts["seed"])
            history: dict[str, list[float]] = {"task": [], "recon": []}
            picks = row_batches(len(rows), opts["batch_size"], opts["steps"], opts["seed"])
            bar = job.progress(picks, desc="neumeta", unit="step", total=opts["steps"])
            for pick in bar:
                f = lo + (hi - lo) * float(torch.rand((), generator=rng))
                widths = layout.widths_at(f)
                x, y = task.batch(split, pick)

                def piece(x=x, y=y, widths=widths):
                    params = {
                        module_name[n]: gen.tensor(s, src[n], scales[n], widths, opts["noise"], rng)
                        for n, s in layout.tensors.items()
                    }
                    total, n = task.loss(functional_forward(net, params, x).logits, x, y)
                    task_loss = total / max(n, 1)
                    recon = gen.reconstruction()
                    history["task"].append(float(task_loss.detach()))
                    history["recon"].append(float(recon.detach()))
                    return task_loss + opts["recon"] * recon, 1

                trainer.step([piece])
                show_loss(bar, loss=history["task"][-1])
        seconds = time.perf_counter() - started
        for key, value in gen.state_dict().items():
            job.writer.write(f"inr.{key}", value.detach().float())
        for group, perm in perms.items():
            job.writer.write(f"perm.{group}", perm)
        inr_params = sum(p.numel() for p in gen.parameters())
        width_params = sum(
            source.info(n).numel for n, s in layout.tensors.items() if not s.statistic
        )
        window = max(1, opts["steps"] // 10)
        return Manifest(
            "model",
            metrics={
                "steps": opts["steps"],
                "inr_parameters": inr_params,
                "width_parameters": width_params,
                "inr_ratio": inr_params / width_params,
                "task_loss_first": sum(history["task"][:window]) / window,
                "task_loss_last": sum(history["task"][-window:]) / window,
                "recon_last": history["recon"][-1],
                "train_seconds": round(seconds, 2),
            },
            extra={
                "encoding": ENCODING,
                "objective": objective,
                "groups": layout.groups,
                "families": [name for name, _ in gen.families],
                "hidden": opts["hidden"],
                "depth": opts["depth"],
                "fourier": opts["fourier"],
                "coordinates": COORDINATES,
                "widths_trained": [lo, hi],
                "noise": opts["noise"],
                "smoothing": opts["smoothing"],
                "batch_norm": bool(norms),
                "scales": scales,
                "summary": [
                    f"generator of {len(layout.tensors)} width tensors in {len(layout.groups)} "
                    f"groups: {inr_params} parameters ({inr_params / width_params:.2%} of the "
                    f"{width_params} they generate), trained at widths {lo:g}-{hi:g} over "
                    f"{opts['steps']} steps ({objective})",
                    "decodes to the full-width model; `compress sample --plugin neumeta "
                    "-o width F` writes other widths",
                ],
            },
        )


def _batch_norms(net) -> dict:
    """{module name: module} of every BatchNorm layer of ``net``."""
    import torch

    norm = torch.nn.modules.batchnorm._BatchNorm
    return {n: m for n, m in net.named_modules() if isinstance(m, norm)}


def _scale(t) -> float:
    std = float(t.std()) if t.numel() > 1 else 0.0
    return std if std > 0 else 1.0


def _module_names(net, source, layout) -> dict[str, str]:
    """{checkpoint name: the name functional_call takes} for every width tensor (they
    differ where transformers renames modules on load: ViT)."""
    from compressor.modeling import checkpoint_names

    own = {ckpt: param for param, ckpt in checkpoint_names(net, source).items()}
    buffers = dict(net.named_buffers())
    found = {}
    for name in layout.tensors:
        found[name] = own.get(name) or (name if name in buffers else None)
        if found[name] is None:
            raise InputError(f"{source.label}: no parameter of the loaded model reads {name}")
    return found


def smoothing_orders(layout, tensors: dict, how: str, seconds: float, job) -> dict:
    """Each group's smoothing permutation, from the source's width ``tensors`` (by name)."""
    from compressor.morphing import neuron_features, smoothing_order

    return {
        group: smoothing_order(neuron_features(layout, tensors, group), how, seconds)
        for group in job.progress(list(layout.groups), desc="neumeta: smoothing order")
    }


class NeumetaModel:
    """A trained NeuMeta artifact, opened: its parent, layout, generator and permutations."""

    def __init__(self, raw: TensorSource):
        from compressor.architectures import WidthLayout
        from compressor.morphing import WidthGenerator

        if raw.manifest.get("encoding") != ENCODING:
            raise InputError(
                f"{raw.label} is not a NeuMeta generator; train one with "
                "`compress train --plugin neumeta MODEL -o data PATH`"
            )
        m = raw.manifest
        self.raw = raw
        self.parent = raw.open_parent("input")
        self.layout = WidthLayout(self.parent)
        self.generator = WidthGenerator(self.layout, m["hidden"], m["depth"], m["fourier"])
        state = {k.removeprefix("inr."): raw.get(k) for k in raw.names() if k.startswith("inr.")}
        self.generator.load_state_dict(state)
        self.generator.requires_grad_(False)
        self.perms = {g: raw.get(f"perm.{g}").long() for g in self.layout.groups}
        self.scales = m["scales"]
        self.noise = float(m["noise"])

    def generate(self, name: str, widths: dict, samples: int = 1, gen=None):
        """A width tensor at ``widths``: clean coordinates, or the mean of ``samples``
        generations with the training's coordinate noise."""
        import torch

        from compressor.morphing import permute

        spec = self.layout.tensors[name]
        src = permute(self.parent.get(name).float(), spec, self.perms)
        with torch.no_grad():
            if samples <= 1:
                return self.generator.tensor(spec, src, self.scales[name], widths)
            draws = [
                self.generator.tensor(spec, src, self.scales[name], widths, self.noise, gen)
                for _ in range(samples)
            ]
            return torch.stack(draws).mean(0)

    def close(self) -> None:
        self.parent.close()


class DecodedNeumeta(DecodedSource):
    """A NeuMeta artifact read back as its full-width model (clean coordinates)."""

    content = "model"

    def __init__(self, raw: TensorSource):
        super().__init__(raw)
        self.model = NeumetaModel(raw)
        self._infos = dict(self.model.parent.infos())

    def encoded(self, name: str) -> bool:
        return name in self.model.layout.tensors

    def get(self, name: str, rows: slice | None = None):
        if not self.encoded(name):
            return self.model.parent.get(name, rows)
        return super().get(name, rows)

    def _decode(self, name: str):
        full = self.model.layout.groups
        return self.model.generate(name, full).to(self._infos[name].dtype)

    def verify(self) -> None:
        self.raw.verify()
        self.model.parent.verify()

    def close(self) -> None:
        self.raw.close()
        self.model.close()


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
        model = NeumetaModel(raw)
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

    from compressor.data import read_examples
    from compressor.modeling import _auto_class
    from compressor.tasks import Task

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
    task = Task("entropy", cfg, None, opts["max_length"])
    split = task.split(rows, opts["data"], opts["batch_size"])
    batches = job.progress(task.batches(split), desc="neumeta: BatchNorm statistics")
    reestimate_batch_norms(net, (x for x, _ in batches))
    return {
        f"{n}.{stat}": getattr(m, stat).detach().clone()
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


@hookimpl
def register_methods(register):
    register(NeumetaTrain())
    register(NeumetaSample())
