"""``train -p neumeta``: the smoothing order, then the generator learned on the task and
the reconstruction at full width."""

from __future__ import annotations

import time

from compressor.errors import InputError, OptionError
from compressor.io.contents import describe_content
from compressor.learning.training import training_options
from compressor.method import Manifest, Method, Option, non_negative, positive
from compressor.plugins.neumeta.model import ENCODING, SMOOTHING, _batch_norms

CALIBRATION_ROWS = 256  # rows the activation order of resample truncate is measured on
# the default learning rates, by what morphs (docs/benchmarks/neumeta.md): a ResNet's
# channels learn at 3e-3; on MiniLM's FFNs 1e-4 already pulls every width below the cut
# it starts from, 1e-5 keeps full width at the source and the small widths above the cut
LR = {"channels": 3e-3, "ffn": 1e-5}


def _width_range(v) -> str | None:
    if len(v) != 2 or not all(0 < x <= 1 for x in v) or v[0] > v[1]:
        return "must be two fractions LOW,HIGH with 0 < LOW <= HIGH <= 1"
    return None


class NeumetaTrain(Method):
    """Learn a generator of MODEL's width tensors from coordinates, on data.

    Per step: a width fraction drawn uniformly from ``widths`` (LOW,HIGH), or from
    ``grid`` evenly spaced ones, plus the lowest and the highest with ``sandwich`` (the
    default); the width tensors generated there with coordinate noise (``noise``, in
    neuron cells), the task loss of a batch through the model at each width (everything
    outside the width part stays the source's), plus ``recon`` × the mean squared
    correction at full width. Defaults chosen on the benchmarks' ResNet and MiniLM:
    ``resample truncate``, ``sandwich``, and the learning rate by what morphs.
    AdamW with ``weight_decay`` (the paper's small weight penalty), clipping 1.0. No
    dropout; BatchNorm normalises with each batch's statistics, since running statistics
    pooled from the source do not fit a narrower model (sampling re-estimates them).
    """

    name = "neumeta"
    kind = "train"
    uses_device = True  # the model and the generator on the device; smoothing on the CPU
    summary = "NeuMeta: learn a generator of the model's weights at any FFN or channel width"
    reference = "https://arxiv.org/abs/2410.11878"
    version = "1"
    example_options = {"data": "train.jsonl"}
    options = (
        *training_options(
            steps=200,
            lr=None,
            trained="the generator",
            agree=True,
            lr_note=f" (default: {LR['channels']:g} for a ResNet's channels, {LR['ffn']:g} "
            "for transformers' FFNs: the benchmarks' choices)",
        ),
        Option(
            "widths",
            "floats",
            [0.25, 1.0],
            "the width fractions trained on: LOW,HIGH",
            check=_width_range,
        ),
        Option(
            "grid",
            "int",
            0,
            "0: each step draws a width uniformly in LOW,HIGH; N >= 2: only the N evenly "
            "spaced widths from LOW to HIGH (the rest are never trained on)",
            check=lambda v: None if v == 0 or v >= 2 else "must be 0 or at least 2",
        ),
        Option(
            "sandwich",
            "bool",
            True,
            "each step also trains at the lowest and the highest width (the sandwich rule)",
        ),
        Option(
            "resample",
            "choice",
            "truncate",
            "a width's starting point: pool (average neighbours along the smoothing "
            "order: the paper's) or truncate (the most important neurons: activation "
            "order for FFNs, filter L1 for channels; the generator corrects the cut)",
            choices=("pool", "truncate"),
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
            "resample pool's neuron order: fast-tsp nearest-neighbour path (deterministic), its "
            "local search for tsp_seconds, or none",
            choices=SMOOTHING,
        ),
        Option("tsp_seconds", "float", 2.0, "time per group for smoothing tsp", check=positive),
        Option("seed", "int", 0, "seed of the generator's init, widths, noise and row order"),
    )

    def run(self, job):
        import torch

        from compressor.learning.data import read_examples
        from compressor.learning.tasks import Task, check_head, objective_for
        from compressor.learning.training import Trainer, functional_forward, row_batches, show_loss
        from compressor.models.architectures import WidthLayout
        from compressor.models.modeling import source_model
        from compressor.plugins.neumeta.generator import COORDINATES, WidthGenerator, permute

        opts, source = job.options, job.inputs[0]
        if not opts["data"]:
            raise OptionError("neumeta training needs -o data PATH")
        if source.content != "model":
            raise InputError(
                f"{source.label} holds {describe_content(source.content)}; neumeta needs a model"
            )
        layout = WidthLayout(source)
        rows = read_examples(opts["data"])
        lo, hi = opts["widths"]
        started = time.perf_counter()
        with source_model(source, "saved", job.device) as (net, tokenizer):
            objective = objective_for(rows, opts["objective"], net)
            check_head(net, objective, source.label)
            task = Task(objective, net.config, tokenizer, opts["max_length"], job.device)
            split = task.split(rows, opts["data"], opts["batch_size"])
            module_name = _module_names(net, source, layout)
            src = {n: source.get(n).float() for n in layout.tensors}
            if opts["resample"] == "truncate":
                perms = importance_orders(layout, src, rows, opts, job)
            else:
                perms = smoothing_orders(layout, src, opts["smoothing"], opts["tsp_seconds"], job)
            src = {n: permute(t, layout.tensors[n], perms) for n, t in src.items()}
            scales = {n: _scale(t) for n, t in src.items()}
            src = {n: t.to(job.device) for n, t in src.items()}
            torch.manual_seed(opts["seed"])  # initialised on the CPU: a seed, one generator
            gen = WidthGenerator(
                layout, opts["hidden"], opts["depth"], opts["fourier"], opts["resample"]
            )
            gen.to(job.device)
            for p in net.parameters():
                p.requires_grad_(False)
            norms = _batch_norms(net)
            for m in norms.values():
                m.train()  # batch statistics; the running ones are regenerated every step
            lr = opts["lr"] or LR["channels" if layout.ffn is None else "ffn"]
            trainer = Trainer(gen.parameters(), lr=lr, weight_decay=opts["weight_decay"])
            rng = torch.Generator().manual_seed(opts["seed"])
            history: dict[str, list[float]] = {"task": [], "recon": []}
            picks = row_batches(len(rows), opts["batch_size"], opts["steps"], opts["seed"])
            bar = job.progress(picks, desc="neumeta", unit="step", total=opts["steps"])
            grid = opts["grid"]
            for pick in bar:
                u = float(torch.rand((), generator=rng))
                f = lo + (hi - lo) * (u if not grid else min(int(u * grid), grid - 1) / (grid - 1))
                fractions = [lo, hi, f] if opts["sandwich"] else [f]
                x, y = task.batch(split, pick)
                if objective == "agree":  # the teacher: the source model, at full width
                    with torch.no_grad():
                        y = task.predict(lambda kw: net(**kw), x)

                def piece(x=x, y=y, fraction=1.0, first=True):
                    widths = layout.widths_at(fraction)
                    params = {
                        module_name[n]: gen.tensor(s, src[n], scales[n], widths, opts["noise"], rng)
                        for n, s in layout.tensors.items()
                    }
                    out = task.predict(lambda kw: functional_forward(net, params, kw), x)
                    total, n = task.loss(out, x, y)
                    task_loss = total / max(n, 1)
                    history["task"].append(float(task_loss.detach()))
                    if not first:
                        return task_loss, 1
                    recon = gen.reconstruction()
                    history["recon"].append(float(recon.detach()))
                    return task_loss + opts["recon"] * recon, 1

                trainer.step(
                    [
                        lambda k=k, fr=fr: piece(fraction=fr, first=k == 0)
                        for k, fr in enumerate(fractions)
                    ]
                )
                show_loss(bar, loss=history["task"][-1])
        seconds = time.perf_counter() - started
        for key, value in gen.state_dict().items():
            job.writer.write(f"inr.{key}", value.detach().float().cpu())
        for group, perm in perms.items():
            job.writer.write(f"perm.{group}", perm)
        inr_params = sum(p.numel() for p in gen.parameters())
        width_params = sum(
            source.info(n).numel for n, s in layout.tensors.items() if not s.statistic
        )
        window = max(1, len(history["task"]) // 10)
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
                "smoothing": opts["smoothing"] if opts["resample"] == "pool" else None,
                "resample": opts["resample"],
                "lr": lr,
                "grid": opts["grid"],
                "sandwich": opts["sandwich"],
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


def _scale(t) -> float:
    std = float(t.std()) if t.numel() > 1 else 0.0
    return std if std > 0 else 1.0


def _module_names(net, source, layout) -> dict[str, str]:
    """{checkpoint name: the name functional_call takes} for every width tensor (they
    differ where transformers renames modules on load: ViT)."""
    from compressor.models.modeling import checkpoint_names

    own = {ckpt: param for param, ckpt in checkpoint_names(net, source).items()}
    buffers = dict(net.named_buffers())
    found = {}
    for name in layout.tensors:
        found[name] = own.get(name) or (name if name in buffers else None)
        if found[name] is None:
            raise InputError(f"{source.label}: no parameter of the loaded model reads {name}")
    return found


def importance_orders(layout, tensors: dict, rows, opts: dict, job) -> dict:
    """Each group's neurons, most important first: for FFNs MatFormer's activation order
    (E|h|·‖W_out column‖ over the first 256 training rows), for channels the L1 norm of
    the filters that write them."""
    from compressor.plugins.matformer import activation_importance, most_important_first
    from compressor.plugins.neumeta.generator import importance_order

    if layout.ffn is None:
        return {g: importance_order(layout, tensors, g) for g in layout.groups}
    scores = activation_importance(
        layout.ffn, opts, job, device=job.device, rows=rows[:CALIBRATION_ROWS]
    )
    return {f"ffn.{layer}": most_important_first(s) for layer, s in scores.items()}


def smoothing_orders(layout, tensors: dict, how: str, seconds: float, job) -> dict:
    """Each group's smoothing permutation, from the source's width ``tensors`` (by name)."""
    from compressor.plugins.neumeta.generator import neuron_features, smoothing_order

    return {
        group: smoothing_order(neuron_features(layout, tensors, group), how, seconds)
        for group in job.progress(list(layout.groups), desc="neumeta: smoothing order")
    }
