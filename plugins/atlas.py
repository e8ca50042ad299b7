"""atlas: learn a coefficient per task vector and parameter block (Zhang et al. NeurIPS 2024).

θ_b = θ0_b + Σ_t Λ_tb·τ_tb, with Λ ∈ R^{T×B} learned from a little data while
every weight stays frozen: the real model, built with transformers from the
base's config, runs through ``torch.func.functional_call`` on the composed
parameters, so gradients reach only Λ. ``groups K`` splits each tensor's
entries into K fixed random groups with a coefficient each (aTLAS×K).

Data is one file for every expert, or one file per expert (``-o data a.jsonl,b.jsonl``):
then expert t's rows run through the merged body under expert t's own classification
head when the experts carry heads the base lacks (the multi-task setting of the paper,
each task keeping its head), and ``agree`` distils expert t on its own rows. Parameters
are matched to checkpoint tensors through :func:`compressor.models.modeling.checkpoint_names`,
so architectures transformers renames on load (ViT) work.
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING

from compressor.errors import InputError, OptionError
from compressor.hookspecs import hookimpl
from compressor.io.deltas import TaskVectorView
from compressor.learning.data import read_examples
from compressor.learning.tasks import Split, Task, has_classifier, is_causal_lm
from compressor.learning.training import BestOnValidation, Trainer, functional_forward, show_loss
from compressor.method import Manifest, Method, Option, non_negative, positive
from compressor.models.modeling import checkpoint_names, source_model

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch

COEFFICIENTS_FILE = "atlas_coefficients.safetensors"
CHUNK = 32  # most examples through the model at once; a step sums the gradients of its chunks
HEADS = ("classifier.", "score.")  # transformers' classification heads: an expert's own, if any


def _chunking(batch_size: int) -> tuple[int, int]:
    """(examples per chunk, chunks per step) for a step of ``batch_size`` examples (0: all)."""
    if not batch_size:
        return CHUNK, 0
    per_step = -(-batch_size // CHUNK)
    return -(-batch_size // per_step), per_step


def _regex_check(v: str) -> str | None:
    try:
        re.compile(v)
    except re.error as e:
        return f"is not a valid regular expression ({e})"
    return None


class Atlas(Method):
    """Learn Λ (experts × parameter blocks) on a few examples; write θ0 + Σ Λ·τ.

    Objectives: ``ce`` (cross-entropy on labelled rows), ``entropy`` (prediction
    entropy on unlabelled rows: test-time adaptation, as AdaMerging), ``lm``
    (next-token loss on text, causal LMs), ``agree`` (the merged model's pooled last
    hidden states matched by cosine to each expert's on its rows: distillation, for
    models without a head or rows without labels). ``auto`` picks ce on labelled rows,
    else lm for a causal LM, entropy for a classifier and agree for a model without a
    head. Λ starts at 0 (the base); AdamW with weight decay 0.1 and gradient clipping
    at 1.0; the Λ with the best validation score is kept (the mean over the data files
    of accuracy on labelled ``val`` rows, else of the objective's score on ``val``, or
    on the training data when no ``val`` is given).

    Memory: every expert's task vector of the learned blocks stays in memory in
    float32 while learning (experts × parameters × 4 bytes, beside the model
    and its gradients); ``blocks REGEX`` learns only the matching tensors (the
    rest keep the base's weights) and loads only their task vectors.
    """

    name = "atlas"
    kind = "merge"
    summary = "aTLAS: learn per-block coefficients of each task vector from a few examples"
    reference = "https://arxiv.org/abs/2407.02880"
    version = "2"
    needs_base = True
    max_inputs = None
    uses_device = True  # the model, Λ, θ0 and the τ of the learned blocks live on the device
    example_options = {"data": "train.jsonl"}
    options = (
        Option(
            "data",
            "str",
            None,
            "training data: JSONL rows with text (or pixels) and label, or text lines; one "
            "file for all experts, or one per expert, comma-separated",
        ),
        Option(
            "objective",
            "choice",
            "auto",
            "ce on labels, entropy of the predictions, lm loss, or agree (match each "
            "expert's pooled hidden states); auto: ce on labelled rows, else lm for a "
            "causal LM, entropy for a classifier, agree for a model without a head",
            choices=("auto", "ce", "entropy", "lm", "agree"),
        ),
        Option(
            "val",
            "str",
            None,
            "validation data that picks the best Λ (default: data); as many files as data",
        ),
        Option(
            "shots",
            "int",
            0,
            "examples per class taken from each data file (labelled rows) or in all "
            "(otherwise); 0: all",
            check=non_negative,
        ),
        Option("epochs", "int", 20, "passes over the training examples", check=positive),
        Option("lr", "float", 0.1, "AdamW learning rate of Λ", check=positive),
        Option(
            "groups",
            "int",
            1,
            "random groups per tensor, one coefficient each (aTLAS×K)",
            check=positive,
        ),
        Option(
            "blocks",
            "str",
            None,
            "regular expression: learn only the tensors whose name it finds; "
            "the rest keep the base's weights (default: every float tensor)",
            check=_regex_check,
        ),
        Option(
            "batch_size",
            "int",
            0,
            "examples per AdamW step; 0: all training examples (full-batch steps, "
            f"gradients summed over chunks of {CHUNK} examples to bound memory)",
            check=non_negative,
        ),
        Option(
            "max_length",
            "int",
            128,
            "tokens per text",
            check=lambda v: None if v > 1 else "must be at least 2",
        ),
        Option("seed", "int", 0, "seed of shot sampling, shuffling and groups"),
    )

    def run(self, job):
        opts = job.options
        if not opts["data"]:
            raise OptionError("atlas needs -o data PATH")
        experts = list(job.inputs)
        files = _files(opts["data"], "data", len(experts))
        val_files = _files(opts["val"], "val", len(experts)) if opts["val"] else None
        if val_files is not None and len(val_files) != len(files):
            raise OptionError(
                f"option 'val' names {len(val_files)} file(s) and 'data' {len(files)}: give as many"
            )
        train = [read_examples(f) for f in files]
        val = [read_examples(f) for f in val_files] if val_files else None
        heads = _own_heads(job.base, experts)
        if heads and len(files) == 1 and len(experts) > 1 and opts["objective"] != "agree":
            raise OptionError(
                "the experts carry their own heads (" + ", ".join(sorted(heads)[:2]) + "): "
                "give one data file per expert (-o data a.jsonl,b.jsonl,...), each scored "
                "under its expert's head, or -o objective agree"
            )
        views = [TaskVectorView(job.base, e, job.warn, frozenset(heads)) for e in experts]
        built_from = experts[0] if heads else job.base
        with source_model(built_from, "saved", job.device) as (model, tokenizer):
            objective = _objective(opts["objective"], train[0], model, heads)
            _check_rows(objective, train, files)
            if objective in ("ce", "entropy") and not (heads or has_classifier(model)):
                raise InputError(
                    f"{job.base.label} is a {type(model).__name__}, with no classification "
                    f"head for objective '{objective}': give labelled rows to a classifier, "
                    "or use -o objective agree"
                )
            names = checkpoint_names(model, built_from)
            coefs = _Coefficients(model, names, job.base, views, opts, job.device, bool(heads))
            streams = _streams(
                model, names, tokenizer, objective, coefs, experts, heads, opts, len(files)
            )
            splits = _splits(streams, train, files, val, val_files, opts, coefs)
            best, history = _learn(streams, splits, coefs, model, opts, job)
            self._write(job, coefs, best)
        score_name = streams[0].scorer.score_name
        count = sum(len(s.rows) for s, _ in splits)
        return self._manifest(job, coefs, best, history, count, score_name, objective)

    def _write(self, job, coefs: _Coefficients, best: torch.Tensor) -> None:
        import torch
        from safetensors.torch import save

        with torch.no_grad():
            merged = coefs.compose(best)
        by_checkpoint = {coefs.checkpoint[p]: t for p, t in merged.items()}
        for name in job.progress(job.base.names(), desc="atlas: write"):
            info = job.base.info(name)
            t = by_checkpoint.pop(name, None)
            job.writer.write(name, t.to("cpu", info.dtype) if t is not None else job.base.get(name))
        tensors = {
            coefs.checkpoint[name]: best[:, b].cpu().contiguous()
            for b, name in enumerate(coefs.blocks)
        }
        meta = {"experts": json.dumps([e.label for e in job.inputs]), "groups": str(coefs.k)}
        job.writer.add_file(COEFFICIENTS_FILE, save(tensors, metadata=meta))

    def _manifest(self, job, coefs, best, history, examples, score_name, objective) -> Manifest:
        labels = [e.label for e in job.inputs]
        per_block = best.mean(dim=2)  # T × B
        summary = []
        for t, label in enumerate(labels):
            row = per_block[t]
            order = row.abs().argsort(descending=True)[:3].tolist()
            largest = ", ".join(
                f"{coefs.checkpoint[coefs.blocks[b]]} {float(row[b]):+.3f}" for b in order
            )
            summary.append(
                f"Λ {label}: mean {float(best[t].mean()):+.3f}, min {float(best[t].min()):+.3f}, "
                f"max {float(best[t].max()):+.3f}; largest: {largest}"
            )
        first, top = history[0], max(history, key=lambda h: h["score"])
        return Manifest(
            "model",
            metrics={
                "experts": len(labels),
                "blocks": len(coefs.blocks),
                "coefficients": best.numel(),
                f"val_{score_name}": top["score"],
                f"base_val_{score_name}": first["score"],
                "best_epoch": top["epoch"],
                "train_examples": examples,
            },
            extra={
                "summary": summary,
                "objective": objective,
                "history": history,
                "coefficients": COEFFICIENTS_FILE,
            },
        )


def _files(value: str, option: str, experts: int) -> list[str]:
    """The data files an option names: one, or one per expert."""
    files = [f.strip() for f in str(value).split(",") if f.strip()]
    if len(files) not in (1, experts):
        raise OptionError(
            f"option '{option}' names {len(files)} files for {experts} experts: give one "
            "file, or one per expert"
        )
    return files


def _own_heads(base, experts) -> set[str]:
    """Classification-head tensors every expert holds and the base does not (each expert's
    own head, as in the multi-task setting); empty when the base has its head."""
    infos = base.infos()
    heads = None
    for e in experts:
        if e.content != "model":
            return set()
        own = {
            n for n, i in e.infos().items() if i.is_float and n not in infos and n.startswith(HEADS)
        }
        heads = own if heads is None else heads & own
    return heads or set()


def _objective(asked: str, rows, model, heads) -> str:
    """The objective ``auto`` stands for, given the rows and the model."""
    if asked != "auto":
        return asked
    if rows[0].label is not None:
        return "ce"
    if is_causal_lm(model):
        return "lm"
    return "entropy" if heads or has_classifier(model) else "agree"


def _check_rows(objective: str, train: list, files: list[str]) -> None:
    for rows, data in zip(train, files, strict=True):
        if objective == "ce" and rows[0].label is None:
            raise InputError(f"{data}: objective 'ce' needs a 'label' on every row")
        if objective == "lm" and any(e.text is None for e in rows):
            raise InputError(f"{data}: objective 'lm' needs text rows")


class _Stream:
    """One data file's share of the loss: its expert's head (or none: the base's), the
    teacher it agrees with (agree), the task it learns and the one it is scored by."""

    def __init__(self, task: Task, scorer: Task, head: dict, teacher: int | None):
        self.task, self.scorer, self.head, self.teacher = task, scorer, head, teacher

    def forward(self, model, coefs, lam, task: Task | None = None):
        """Inputs → the task's prediction under θ0 + Σ Λ·τ (differentiable in Λ)."""
        params = {**coefs.compose(lam), **self.head}
        task = task or self.task
        return lambda x: task.predict(lambda kw: functional_forward(model, params, kw), x)


def _streams(
    model, names, tokenizer, objective, coefs, experts, heads, opts, files: int
) -> list[_Stream]:
    """A stream per expert (its own file, its own head, or its teacher under agree), else
    one."""
    import torch
    import transformers

    per_expert = heads or objective == "agree" or files > 1
    out = []
    for t, expert in enumerate(experts if per_expert else experts[:1]):
        config = model.config
        head = {}
        if heads:
            cfg = expert.config() or {}
            config = transformers.AutoConfig.for_model(
                cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"}
            )
            head = {
                p: expert.get(c).to(coefs.device, torch.float32)
                for p, c in names.items()
                if c in heads
            }
        task = Task(objective, config, tokenizer, opts["max_length"], coefs.device)
        scorer = task
        if objective in ("ce", "entropy"):  # labelled validation rows: accuracy
            scorer = Task("ce", config, tokenizer, opts["max_length"], coefs.device)
        out.append(_Stream(task, scorer, head, t if objective == "agree" else None))
    return out


def _splits(streams, train, files, val, val_files, opts, coefs) -> list[tuple[Split, Split]]:
    """(training split, validation split) per stream; agree's splits carry the teacher's
    embeddings of their rows as targets."""
    chunk = _chunking(opts["batch_size"])[0]
    out = []
    for k, stream in enumerate(streams):
        i = k if len(train) > 1 else 0
        rows, data = train[i], files[i]
        if opts["shots"]:
            by_label = stream.task.objective != "lm"
            rows = _take_shots(rows, by_label, opts["shots"], opts["seed"])
        tr = stream.task.split(rows, data, chunk)
        va_rows, va_data = (val[i], val_files[i]) if val else (train[i], files[i])
        labelled = stream.task.objective != "lm" and va_rows[0].label is not None
        if not labelled and stream.scorer is not stream.task:
            stream.scorer = stream.task  # unlabelled validation rows: the objective's score
        va = stream.scorer.split(va_rows, va_data, chunk)
        out.append((tr, va))
    return out


def _teach(stream: _Stream, split: Split, model, coefs) -> None:
    """Set the split's targets to its expert's embeddings of its rows (θ0 + τ_t)."""
    import torch

    lam = coefs.zeros()
    lam[stream.teacher] = 1.0
    forward = stream.forward(model, coefs, lam)
    with torch.no_grad():
        split.labels = torch.cat([forward(x) for x, _ in stream.task.batches(split)]).detach()


def _take_shots(rows, by_label: bool, shots: int, seed: int):
    """``shots`` rows per label (or in all), drawn with a seeded shuffle, in file order."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=gen).tolist()
    if not by_label or rows[0].label is None:
        return [rows[i] for i in sorted(order[:shots])]
    taken: dict = {}
    keep = []
    for i in order:
        c = rows[i].label
        if taken.get(c, 0) < shots:
            taken[c] = taken.get(c, 0) + 1
            keep.append(i)
    return [rows[i] for i in sorted(keep)]


class _Coefficients:
    """The learned blocks: base weights, the experts' τ, group ids; composes parameters.
    Blocks are the model's parameter names; ``checkpoint`` maps them to the tensors."""

    def __init__(
        self,
        model,
        names: dict,
        base,
        views,
        opts: dict,
        device: str = "cpu",
        reset_body: bool = False,
    ):
        """``reset_body``: the model was built from an expert (for its head); its body is
        set to the base's tensors first."""
        import torch

        pattern = re.compile(opts["blocks"]) if opts["blocks"] else None
        infos = base.infos()
        self.k = opts["groups"]
        self.experts = len(views)
        self.device = device
        self.checkpoint: dict[str, str] = {}
        self.blocks: list[str] = []
        self.base: dict[str, torch.Tensor] = {}
        self.taus: dict[str, list[tuple[int, torch.Tensor]]] = {}
        self.groups: dict[str, torch.Tensor] = {}
        gen = torch.Generator().manual_seed(opts["seed"])
        for param, tensor in model.named_parameters():
            name = names.get(param)
            info = infos.get(name) if name else None
            if info is None or not info.is_float:
                continue
            if reset_body:
                with torch.no_grad():
                    tensor.copy_(base.get(name))
            if pattern and not pattern.search(name):
                continue
            taus = []
            for t, view in enumerate(views):
                d = view.delta(name)
                if d is not None and bool(d.any()):
                    taus.append((t, d.to(device)))
            if not taus:
                continue
            self.blocks.append(param)
            self.checkpoint[param] = name
            self.base[param] = tensor.detach()
            self.taus[param] = taus
            if self.k > 1:
                groups = torch.randint(self.k, tensor.shape, generator=gen)  # CPU draws
                self.groups[param] = groups.to(device)
        if not self.blocks:
            what = f"matching '{opts['blocks']}' " if pattern else ""
            raise InputError(f"no parameter tensor {what}differs between the base and the experts")

    def zeros(self) -> torch.Tensor:
        import torch

        return torch.zeros(self.experts, len(self.blocks), self.k, device=self.device)

    def compose(self, coefs: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ0 + Σ_t Λ_t·τ_t for every learned block (differentiable in Λ)."""
        params = {}
        for b, name in enumerate(self.blocks):
            theta = self.base[name]
            for t, tau in self.taus[name]:
                c = coefs[t, b]
                scale = c[self.groups[name]] if self.k > 1 else c[0]
                theta = theta + scale * tau
            params[name] = theta
        return params


def _learn(streams, splits, coefs, model, opts, job):
    """AdamW on Λ; returns the best Λ by the mean validation score over the streams and
    the per-epoch history."""
    import torch

    for stream, (tr, va) in zip(streams, splits, strict=True):
        if stream.teacher is not None:
            _teach(stream, tr, model, coefs)
            _teach(stream, va, model, coefs)

    def validate(lam) -> float:
        scores = []
        for stream, (_, va) in zip(streams, splits, strict=True):
            forward = stream.forward(model, coefs, lam.detach(), stream.scorer)
            scores.append(stream.scorer.score(stream.scorer.metrics(forward, va)))
        return sum(scores) / len(scores)

    gen = torch.Generator().manual_seed(opts["seed"])
    lam = coefs.zeros().requires_grad_(True)
    trainer = Trainer([lam], lr=opts["lr"], weight_decay=0.1, clip=1.0)
    best = BestOnValidation(lam.detach().clone(), validate(lam))
    best.history.append({"epoch": 0, "score": best.score, "loss": None})
    chunks = [  # tokenized once, reused every epoch
        (stream, x, y)
        for stream, (tr, _) in zip(streams, splits, strict=True)
        for x, y in stream.task.batches(tr)
    ]
    per_step = _chunking(opts["batch_size"])[1] or len(chunks)
    steps = opts["epochs"] * -(-len(chunks) // per_step)
    bar = job.progress(range(steps), desc="atlas", unit="step", total=steps)
    ticks = iter(bar)

    def piece(i):
        stream, x, y = chunks[i]
        return lambda: stream.task.loss(stream.forward(model, coefs, lam)(x), x, y)

    for epoch in range(1, opts["epochs"] + 1):
        loss_sum, count = 0.0, 0
        order = torch.randperm(len(chunks), generator=gen).tolist()
        for first in range(0, len(chunks), per_step):
            s, n = trainer.step(
                [piece(i) for i in order[first : first + per_step]], mean_over_count=True
            )
            loss_sum, count = loss_sum + s, count + n
            next(ticks, None)
        score = validate(lam)
        mean = loss_sum / max(count, 1)
        best.offer(lambda: lam.detach().clone(), score, epoch=epoch, loss=mean)
        show_loss(bar, loss=mean, val=score)
    if hasattr(bar, "close"):
        bar.close()
    history = [{"epoch": h["epoch"], "score": h["score"], "loss": h["loss"]} for h in best.history]
    if not math.isfinite(history[-1]["loss"] or 0.0):
        job.warn("atlas: the training loss is not finite; try a smaller lr")
    return best.state, history


@hookimpl
def register_methods(register):
    register(Atlas())
