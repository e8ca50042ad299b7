"""MatFormer: cut nested-FFN submodels out of a model (Devvrit et al. 2023, arXiv 2310.07707).

A width m of an FFN keeps its first m hidden neurons: the rows of the up (and
gate) projection and its bias, the columns of the down projection; fused
gate-up weights are cut per half. Layers can be dropped and the rest
renumbered. ``order weight|activation`` first permutes each FFN's neurons by
importance, which leaves the model's function unchanged, so that the prefix
holds the neurons that matter most in a model that was not trained nested.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from compressor.errors import InputError, OptionError
from compressor.hookspecs import hookimpl
from compressor.io.contents import describe_content
from compressor.io.sources import copy_tensor, row_blocks
from compressor.method import Manifest, Method, Option, fraction, positive
from compressor.models.architectures import (
    GRANULARITIES,
    PER_LAYER_KEYS,
    PER_LAYER_TENSORS,
    FfnModel,
    Member,
    width_at,
)

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch


class MatformerExtract(Method):
    """Cut a submodel: every FFN to a width (or one per layer), optionally dropping layers.

    Architectures: the Llama family (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3's
    fused gate-up), Gemma 3n (text), BERT/RoBERTa/ViT and GPT-2, found from
    ``config.json`` and the tensor names. The output is a Hugging Face
    directory with ``intermediate_size`` (GPT-2: ``n_inner``) updated: a list
    for Gemma 3n, which takes one width per layer; the others take one integer,
    so their widths must be equal. Tensors stream one at a time.
    """

    name = "matformer"
    kind = "extract"
    uses_device = True  # the activation statistics (the calibration forward passes)
    summary = "MatFormer: cut a submodel with narrower FFNs (Mix'n'Match widths, skipped layers)"
    reference = "https://arxiv.org/abs/2310.07707"
    version = "1"
    options = (
        Option("ffn_ratio", "float", None, "keep this fraction of every FFN", check=fraction),
        Option("widths", "ints", None, "one FFN width per kept layer (Mix'n'Match)"),
        Option(
            "target_params",
            "int",
            None,
            "pick per-layer widths from d_ff·{1/8, 1/4, 1/2, 1}, not shrinking with depth, "
            "to land at or under this many parameters",
            check=positive,
        ),
        Option("skip_layers", "ints", None, "drop these layers (0-based) and renumber the rest"),
        Option(
            "order",
            "choice",
            "none",
            "permute each FFN's neurons by importance first (function-preserving): "
            "weight norms, or activations on -o data",
            choices=("none", "weight", "activation"),
        ),
        Option("data", "str", None, "calibration rows for order activation (JSONL or text)"),
        Option("max_length", "int", 128, "tokens per calibration text", check=positive),
        Option("batch_size", "int", 16, "calibration rows per forward pass", check=positive),
    )

    def run(self, job):
        opts = job.options
        model = FfnModel(job.inputs[0])
        kept = _kept_layers(model, opts["skip_layers"])
        widths = _widths(model, kept, opts)
        if opts["order"] == "activation" and not opts["data"]:
            raise OptionError("order activation needs -o data PATH (calibration rows)")
        perms = {}  # order weight: filled layer by layer while writing, from the tensors read
        if opts["order"] == "activation":
            scores = activation_importance(model, opts, job, device=job.device)
            perms = {i: most_important_first(scores[i]) for i in kept}
        params_in = _float_params(job.inputs[0])
        _write(job, model, kept, widths, perms, by_weight=opts["order"] == "weight")
        config = _config(model, kept, widths)
        job.writer.add_json("config.json", config)
        params_out = _planned_params(model, kept, widths)
        return Manifest(
            "model",
            metrics={
                "params": params_out,
                "source_params": params_in,
                "ratio": params_out / params_in,
                "layers": len(kept),
                "mean_ffn_fraction": sum(
                    w / model.d_ff[i] for i, w in zip(kept, widths, strict=True)
                )
                / len(kept),
            },
            extra={
                "summary": [
                    f"layers kept: {_ranges(kept)} of 0-{model.num_layers - 1}",
                    "FFN widths: " + _runs(widths) + f" (d_ff {_runs(model.d_ff)})",
                    f"neuron order: {opts['order']}",
                ],
                "kept_layers": kept,
                "widths": widths,
                "d_ff": model.d_ff,
                "order": opts["order"],
                "permutation": {str(i): p.tolist() for i, p in perms.items()},
            },
        )


def _kept_layers(model: FfnModel, skip: list[int] | None) -> list[int]:
    skip = sorted(set(skip or []))
    n = model.num_layers
    bad = [i for i in skip if not 0 <= i < n]
    if bad:
        raise OptionError(f"skip_layers names layer {bad[0]}; the model has layers 0-{n - 1}")
    if len(skip) == n:
        raise OptionError(f"skip_layers drops all {n} layers; keep at least one")
    modes = model.kv_sharing()
    shared = [i for i in skip if modes[i] is not None]
    if shared:
        fixed = [i for i, m in enumerate(modes) if m is not None]
        raise OptionError(
            f"layer {shared[0]} takes part in Gemma 3n's KV sharing "
            f"({'its KV is read by later layers' if modes[shared[0]] == 'store' else 'it reads the KV of an earlier layer'})"
            f" and cannot be skipped; layers {_ranges(fixed)} must stay"
        )
    return [i for i in range(n) if i not in skip]


def _ranges(items: list[int]) -> str:
    out, start = [], None
    for k, i in enumerate(items):
        if start is None:
            start = i
        if k + 1 == len(items) or items[k + 1] != i + 1:
            out.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ", ".join(out)


def _runs(values: list[int]) -> str:
    """``768 ×4, 1536 ×2``: a list of widths, repeats collapsed."""
    out = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return ", ".join(f"{v} ×{n}" if n > 1 else str(v) for v, n in out)


def _widths(model: FfnModel, kept: list[int], opts: dict) -> list[int]:
    given = [k for k in ("ffn_ratio", "widths", "target_params") if opts[k] is not None]
    if len(given) > 1:
        raise OptionError(f"give one of ffn_ratio, widths, target_params; got {', '.join(given)}")
    d_ff = [model.d_ff[i] for i in kept]
    if not given:
        if not opts["skip_layers"] and opts["order"] == "none":
            raise OptionError(
                "matformer needs -o ffn_ratio R, -o widths W1,W2,..., -o target_params N "
                "or -o skip_layers I,J,..."
            )
        widths = d_ff
    elif given[0] == "ffn_ratio":
        widths = [width_at(d, opts["ffn_ratio"]) for d in d_ff]
    elif given[0] == "widths":
        widths = opts["widths"]
        if len(widths) != len(kept):
            raise OptionError(
                f"widths lists {len(widths)} widths; the extracted model has {len(kept)} "
                "layers (one width per kept layer)"
            )
        for i, w, d in zip(kept, widths, d_ff, strict=True):
            if not 1 <= w <= d:
                raise OptionError(f"width {w} of layer {i} is outside 1..{d} (its d_ff)")
    else:
        widths = _fit_params(model, kept, opts["target_params"])
    if not model.layout.per_layer_widths and len(set(widths)) > 1:
        raise OptionError(
            f"{model.model_type} takes one {model.layout.width_key} for all layers; "
            f"widths must be equal (got {', '.join(map(str, widths))})"
        )
    return widths


def _planned_params(model: FfnModel, kept: list[int], widths: list[int]) -> int:
    """Float parameters of the submodel that ``kept`` and ``widths`` describe."""
    return _fixed_params(model, kept) + sum(
        model.neuron_cost(i) * w for i, w in zip(kept, widths, strict=True)
    )


def _fixed_params(model: FfnModel, kept: list[int]) -> int:
    ffn = {name for layer in model.ffn.values() for name in layer}
    total = 0
    keep = set(kept)
    for name, info in model.source.infos().items():
        if not info.is_float or name in ffn:
            continue
        m = model.layer_re.match(name)
        if m and int(m.group(1)) not in keep:
            continue
        numel = info.numel
        if _per_layer_dim(name) is not None:
            numel = numel // model.num_layers * len(kept)
        total += numel
    return total


def _fit_params(model: FfnModel, kept: list[int], target: int) -> list[int]:
    """Per-layer granularities, never shrinking with depth, with the most parameters ≤ target."""
    fixed = _fixed_params(model, kept)
    costs = [model.neuron_cost(i) for i in kept]
    options = [[width_at(model.d_ff[i], g) for g in GRANULARITIES] for i in kept]
    n, levels = len(kept), len(GRANULARITIES)
    best = None
    # a non-decreasing level sequence is how many layers sit at each level, in order
    for counts in _compositions(n, levels, uniform=not model.layout.per_layer_widths):
        seq = [lvl for lvl, c in enumerate(counts) for _ in range(c)]
        total = fixed + sum(costs[k] * options[k][lvl] for k, lvl in enumerate(seq))
        if total <= target:
            key = (total, -sum(1 for c in counts if c))  # most parameters, then fewest changes
            if best is None or key > best[0]:
                best = (key, [options[k][lvl] for k, lvl in enumerate(seq)])
    if best is None:
        smallest = fixed + sum(c * o[0] for c, o in zip(costs, options, strict=True))
        raise OptionError(
            f"target_params {target} is below the smallest submodel: {smallest} parameters "
            "with every FFN at d_ff/8"
        )
    return best[1]


def _compositions(n: int, parts: int, uniform: bool):
    if uniform:
        for p in range(parts):
            yield tuple(n if q == p else 0 for q in range(parts))
        return
    if parts == 1:
        yield (n,)
        return
    for first in range(n + 1):
        for rest in _compositions(n - first, parts - 1, False):
            yield (first, *rest)


def _per_layer_dim(name: str) -> int | None:
    for suffix, dim in PER_LAYER_TENSORS.items():
        if name.endswith(suffix):
            return dim
    return None


def most_important_first(scores: torch.Tensor) -> torch.Tensor:
    """Neurons from most to least important (stable, so ties keep their order)."""
    import torch

    return torch.sort(scores, descending=True, stable=True).indices


def _neuron_sq(t: torch.Tensor, member: Member, d_ff: int) -> torch.Tensor:
    """Σ of squares of each hidden neuron's entries in ``t`` (fused gate-up: both halves)."""
    import torch

    dims = [k for k in range(t.dim()) if k != member.dim]
    sq = torch.linalg.vector_norm(t, dim=dims, dtype=torch.float32).square()
    return sq[:d_ff] + sq[d_ff:] if member.fused else sq


def weight_importance(model: FfnModel, layer: int, tensors: dict) -> torch.Tensor:
    """‖what feeds neuron j‖ · ‖what reads it‖ from the layer's FFN ``tensors`` (by name)."""
    import torch

    d = model.d_ff[layer]
    fed = torch.zeros(d)
    read = torch.zeros(d)
    for name, member in model.ffn[layer].items():
        if member.role == "bias":
            continue
        sq = _neuron_sq(tensors[name], member, d)
        (fed if member.role == "in" else read).add_(sq)
    return fed.sqrt() * read.sqrt()


def activation_importance(
    model: FfnModel,
    opts: dict,
    job,
    blockwise: bool | None = None,
    device: str = "cpu",
    rows: list | None = None,
) -> dict[int, torch.Tensor]:
    """E|h_j| over the calibration tokens · ‖W_out[:, j]‖, per layer.

    Runs block by block (one layer's tensors in memory) where the architecture allows
    (``blockwise`` None), else, or with ``blockwise`` False, through the whole model; on
    ``device``; over ``rows`` (examples) when given, else every row of ``opts['data']``."""
    import torch

    from compressor.learning.data import batches, read_examples
    from compressor.models.blockwise import run_blockwise, supports
    from compressor.models.modeling import model_inputs, source_model, source_tokenizer

    rows = rows if rows is not None else read_examples(opts["data"])
    sums = {i: torch.zeros(d, device=device) for i, d in enumerate(model.d_ff)}
    counts = dict.fromkeys(sums, 0)
    chunks = list(batches(rows, opts["batch_size"]))

    def add(layer: int, x: torch.Tensor, mask) -> None:
        h = x.float().abs().reshape(-1, x.shape[-1])
        if mask is not None and mask.numel() == h.shape[0]:
            h = h[mask.reshape(-1).bool()]
        sums[layer] += h.sum(dim=0)
        counts[layer] += h.shape[0]

    out_names = model.out_tensors()
    if blockwise if blockwise is not None else supports(model):
        tokenizer = source_tokenizer(model.source)
        inputs = [
            model_inputs(c, tokenizer, opts["data"], opts["max_length"], device) for c in chunks
        ]
        masks = [x.get("attention_mask") for x in inputs]
        suffix = {i: m.rest.removesuffix(".weight") for i, (_, m) in out_names.items()}
        run_blockwise(
            model,
            inputs,
            lambda layer, _s, b, x: add(layer, x, masks[b]),
            suffixes=tuple(sorted(set(suffix.values()))),
            progress=job.progress,
            device=device,
        )
    else:
        with source_model(model.source, "saved", device) as (net, tokenizer):
            state = {}
            handles = [
                module.register_forward_pre_hook(
                    lambda _m, args, i=i: add(i, args[0].detach(), state.get("mask"))
                )
                for i, module in model.out_modules(net).items()
            ]
            try:
                with torch.no_grad():
                    for chunk in job.progress(chunks, desc="matformer: calibrate", unit="batch"):
                        x = model_inputs(chunk, tokenizer, opts["data"], opts["max_length"], device)
                        state["mask"] = x.get("attention_mask")
                        net(**x)
            finally:
                for h in handles:
                    h.remove()
    scores = {}
    for i, (name, member) in out_names.items():
        col = _neuron_sq(model.source.get(name), member, model.d_ff[i]).sqrt()
        scores[i] = sums[i].cpu() / max(counts[i], 1) * col
    return scores


def _write(job, model: FfnModel, kept, widths, perms: dict, by_weight: bool) -> None:
    """Stream every kept tensor out, FFNs cut; ``by_weight`` fills ``perms`` layer by layer,
    holding one layer's FFN tensors between reading them for the scores and writing them."""
    import torch

    source, writer = job.inputs[0], job.writer
    new_index = {old: new for new, old in enumerate(kept)}
    width_of = dict(zip(kept, widths, strict=True))
    members = {name: (i, m) for i, layer in model.ffn.items() for name, m in layer.items()}
    held: dict[str, torch.Tensor] = {}
    for name in job.progress(source.names(), desc="matformer"):
        out = name
        m = model.layer_re.match(name)
        if m:
            layer = int(m.group(1))
            if layer not in new_index:
                continue
            out = f"{model.prefix}{model.layout.layers}.{new_index[layer]}.{m.group(2)}"
        if name in members:
            layer, member = members[name]
            if by_weight and layer not in perms:
                held = {n: source.get(n) for n in model.ffn[layer]}
                perms[layer] = most_important_first(weight_importance(model, layer, held))
            t = held.pop(name) if name in held else source.get(name)
            d, w = model.d_ff[layer], width_of[layer]
            keep = perms[layer][:w] if layer in perms else torch.arange(w)
            if member.fused:
                keep = torch.cat([keep, keep + d])
            writer.write(out, t.index_select(member.dim, keep).contiguous())
            continue
        dim = _per_layer_dim(name)
        if dim is not None and len(kept) < model.num_layers:
            _write_layer_chunks(writer, source, name, dim, model.num_layers, kept)
            continue
        copy_tensor(writer, source, name, out)


def _write_layer_chunks(writer, source, name, dim, layers, kept) -> None:
    """A tensor with one equal chunk per layer along ``dim``: keep the kept layers' chunks."""
    import torch

    info = source.info(name)
    size = info.shape[dim] // layers
    keep = torch.cat([torch.arange(i * size, (i + 1) * size) for i in kept])
    shape = list(info.shape)
    shape[dim] = len(keep)
    if dim == 0:
        writer.write(name, source.get(name).index_select(0, keep).contiguous())
        return
    writer.begin(name, tuple(shape), info.dtype)
    for rows in row_blocks(info):
        writer.write_rows(source.get(name, rows).index_select(dim, keep).contiguous())
    writer.end()


def _config(model: FfnModel, kept: list[int], widths: list[int]) -> dict:
    config = json.loads(json.dumps(model.config))
    text = config.get("text_config") or config
    layout = model.layout
    n = model.num_layers
    for key in PER_LAYER_KEYS:
        if isinstance(text.get(key), list) and len(text[key]) == n:
            text[key] = [text[key][i] for i in kept]
    text[layout.layers_key] = len(kept)
    text[layout.width_key] = list(widths) if layout.per_layer_widths else widths[0]
    return config


def _float_params(source) -> int:
    return sum(info.numel for info in source.infos().values() if info.is_float)


class MatformerTrain(Method):
    """Nested training: each step sums the loss at every granularity on the same batch.

    At granularity g each FFN uses only its first d_ff·g hidden neurons (the
    others are masked to zero, which is exactly what slicing them off computes),
    so after training the prefixes are good submodels and ``extract`` cuts
    them. The whole model trains (AdamW, grad-clip 1.0); the artifact is the
    full-width model. Cross-entropy on labelled rows with the head the
    checkpoint was saved with, or next-token loss on text for causal LMs.
    ``granularities 1`` is plain fine-tuning with the same budget: the
    baseline nested training is measured against.
    """

    name = "matformer-train"
    kind = "train"
    uses_device = True  # the model, its gradients and the optimizer state
    summary = "MatFormer nested training: sum the loss at every FFN granularity, so prefixes work"
    reference = "https://arxiv.org/abs/2310.07707"
    version = "1"
    example_options = {"data": "train.jsonl"}
    options = (
        Option("data", "str", None, "training rows: JSONL text/pixels with labels, or text (LM)"),
        Option(
            "granularities",
            "floats",
            list(GRANULARITIES),
            "FFN fractions trained together",
            check=lambda v: (
                None if v and all(0 < g <= 1 for g in v) else "must be fractions in (0, 1]"
            ),
        ),
        Option("steps", "int", 200, "optimizer steps", check=positive),
        Option("lr", "float", 5e-5, "AdamW learning rate", check=positive),
        Option("batch_size", "int", 16, "rows per step", check=positive),
        Option("max_length", "int", 128, "tokens per text", check=positive),
        Option("seed", "int", 0, "seed of the row order and dropout"),
    )

    def run(self, job):
        import torch

        from compressor.learning.data import read_examples
        from compressor.learning.tasks import Task, check_head, objective_for
        from compressor.learning.training import Trainer, row_batches
        from compressor.models.modeling import checkpoint_names, source_model

        opts = job.options
        if not opts["data"]:
            raise OptionError("matformer-train needs -o data PATH")
        source = job.inputs[0]
        if source.content != "model":
            raise InputError(
                f"{source.label} holds {describe_content(source.content)}; matformer-train needs a model"
            )
        layout = FfnModel(source)
        rows = read_examples(opts["data"])
        objective = objective_for(rows)
        torch.manual_seed(opts["seed"])
        grans = sorted(set(opts["granularities"]))
        history = {g: [] for g in grans}
        with source_model(source, "saved", job.device) as (net, tokenizer):
            check_head(net, objective, source.label)
            param_of = {c: p for p, c in checkpoint_names(net, source).items()}
            task = Task(objective, net.config, tokenizer, opts["max_length"], job.device)
            split = task.split(rows, opts["data"], opts["batch_size"])
            masks = MaskedWidths(net, layout, param_of)
            trainer = Trainer(net.parameters(), lr=opts["lr"], clip=1.0)
            net.train()
            picks = row_batches(len(rows), opts["batch_size"], opts["steps"], opts["seed"])
            for pick in job.progress(
                picks, desc="matformer-train", unit="step", total=opts["steps"]
            ):
                x, y = task.batch(split, pick)

                def at(g, x=x, y=y):  # the mean loss with the FFNs cut to g
                    def piece():
                        masks.g = g
                        total, n = task.loss(net(**x).logits, x, y)
                        loss = total / max(n, 1)
                        history[g].append(float(loss.detach()))
                        return loss, 1

                    return piece

                trainer.step([at(g) for g in grans])
            masks.remove()
            state = net.state_dict()
            for name in job.progress(source.names(), desc="matformer-train: write"):
                info = source.info(name)
                t = state.get(param_of.get(name, name))
                job.writer.write(
                    name, t.detach().to("cpu", info.dtype) if t is not None else source.get(name)
                )
        window = max(1, opts["steps"] // 10)
        metrics = {"steps": opts["steps"]}
        for g in grans:
            metrics[f"loss_first_{g:g}"] = sum(history[g][:window]) / window
            metrics[f"loss_last_{g:g}"] = sum(history[g][-window:]) / window
        return Manifest("model", metrics=metrics, extra={"granularities": grans})


class MaskedWidths:
    """Forward pre-hooks that zero each FFN's hidden neurons past d_ff·g (= slicing them off)."""

    def __init__(self, net, layout: FfnModel, param_of: dict | None = None):
        self.g = 1.0  # the granularity the next forward pass runs at
        self.handles = [
            module.register_forward_pre_hook(self._hook(layout.d_ff[layer]))
            for layer, module in layout.out_modules(net, param_of).items()
        ]

    def _hook(self, d_ff: int):
        import torch

        def hook(_module, args):
            m = width_at(d_ff, self.g)
            if m >= d_ff:
                return None
            mask = torch.zeros(d_ff, dtype=args[0].dtype, device=args[0].device)
            mask[:m] = 1
            return (args[0] * mask, *args[1:])

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@hookimpl
def register_methods(register):
    register(MatformerExtract())
    register(MatformerTrain())
