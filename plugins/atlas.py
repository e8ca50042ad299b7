"""atlas: learn a coefficient per task vector and parameter block (Zhang et al. NeurIPS 2024).

θ_b = θ0_b + Σ_t Λ_tb·τ_tb, with Λ ∈ R^{T×B} learned from a little data while
every weight stays frozen: the real model, built with transformers from the
base's config, runs through ``torch.func.functional_call`` on the composed
parameters, so gradients reach only Λ. ``groups K`` splits each tensor's
entries into K fixed random groups with a coefficient each (aTLAS×K).
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
from compressor.learning.tasks import Split, Task
from compressor.learning.training import BestOnValidation, Trainer, functional_forward, show_loss
from compressor.method import Manifest, Method, Option, non_negative, positive
from compressor.models.modeling import check_names_match, source_model

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch

COEFFICIENTS_FILE = "atlas_coefficients.safetensors"
CHUNK = 32  # most examples through the model at once; a step sums the gradients of its chunks


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
    entropy on unlabelled rows: test-time adaptation), ``lm`` (next-token loss
    on text, causal LMs). Λ starts at 0 (the base); AdamW with weight decay 0.1
    and gradient clipping at 1.0; the Λ with the best validation score is kept
    (accuracy on labelled ``val`` rows, else minus the objective on ``val``, or
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
    version = "1"
    needs_base = True
    max_inputs = None
    uses_device = True  # the model, Λ, θ0 and the τ of the learned blocks live on the device
    example_options = {"data": "train.jsonl"}
    options = (
        Option(
            "data",
            "str",
            None,
            "training data: JSONL rows with text (or pixels) and label, or text lines (lm)",
        ),
        Option(
            "objective",
            "choice",
            "ce",
            "cross-entropy on labels, prediction entropy (no labels needed), or LM loss",
            choices=("ce", "entropy", "lm"),
        ),
        Option("val", "str", None, "validation data that picks the best Λ (default: data)"),
        Option(
            "shots",
            "int",
            0,
            "examples per class taken from data (labelled rows) or in all (otherwise); 0: all",
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
        objective = opts["objective"]
        train = read_examples(opts["data"])
        val = read_examples(opts["val"]) if opts["val"] else None
        if objective == "ce" and train[0].label is None:
            raise InputError(f"{opts['data']}: objective 'ce' needs a 'label' on every row")
        if objective == "lm" and any(e.text is None for e in train):
            raise InputError(f"{opts['data']}: objective 'lm' needs text rows")
        views = [TaskVectorView(job.base, e, job.warn) for e in job.inputs]
        head = "lm" if objective == "lm" else "classify"
        with source_model(job.base, head, job.device) as (model, tokenizer):
            task = Task(objective, model.config, tokenizer, opts["max_length"], job.device)
            train_set = _training_split(task, train, opts)
            val_rows, val_data = (val, opts["val"]) if val else (train, opts["data"])
            # labelled validation rows are scored by accuracy, whatever the objective learns
            labelled = objective != "lm" and val_rows[0].label is not None
            scorer = (
                Task("ce", model.config, tokenizer, opts["max_length"], job.device)
                if labelled
                else task
            )
            val_set = scorer.split(val_rows, val_data, _chunking(opts["batch_size"])[0])
            coefs = _Coefficients(model, job.base, views, opts, job.device)
            best, history = _learn(task, scorer, _Run(model, coefs, train_set, val_set), opts, job)
            self._write(job, coefs, best)
        return self._manifest(job, coefs, best, history, len(train_set.rows), scorer)

    def _write(self, job, coefs: _Coefficients, best: torch.Tensor) -> None:
        import torch
        from safetensors.torch import save

        with torch.no_grad():
            merged = coefs.compose(best)
        for name in job.progress(job.base.names(), desc="atlas: write"):
            info = job.base.info(name)
            t = merged.pop(name, None)
            job.writer.write(name, t.to("cpu", info.dtype) if t is not None else job.base.get(name))
        tensors = {name: best[:, b].cpu().contiguous() for b, name in enumerate(coefs.blocks)}
        meta = {"experts": json.dumps([e.label for e in job.inputs]), "groups": str(coefs.k)}
        job.writer.add_file(COEFFICIENTS_FILE, save(tensors, metadata=meta))

    def _manifest(self, job, coefs, best, history, examples: int, scorer) -> Manifest:
        labels = [e.label for e in job.inputs]
        per_block = best.mean(dim=2)  # T × B
        summary = []
        for t, label in enumerate(labels):
            row = per_block[t]
            order = row.abs().argsort(descending=True)[:3].tolist()
            largest = ", ".join(f"{coefs.blocks[b]} {float(row[b]):+.3f}" for b in order)
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
                f"val_{scorer.score_name}": top["score"],
                f"base_val_{scorer.score_name}": first["score"],
                "best_epoch": top["epoch"],
                "train_examples": examples,
            },
            extra={"summary": summary, "history": history, "coefficients": COEFFICIENTS_FILE},
        )


def _training_split(task: Task, rows, opts) -> Split:
    """The training rows (``shots`` of them per class, or in all) as a split of chunks."""
    if opts["shots"]:
        rows = _take_shots(rows, task.objective != "lm", opts["shots"], opts["seed"])
    return task.split(rows, opts["data"], _chunking(opts["batch_size"])[0])


class _Run:
    """What one aTLAS run learns over: the model, the coefficients and the two splits."""

    def __init__(self, model, coefs, train: Split, val: Split):
        self.model, self.coefs, self.train, self.val = model, coefs, train, val

    def forward(self, lam):
        """Inputs → logits of the model under θ0 + Σ Λ·τ (differentiable in Λ)."""
        params = self.coefs.compose(lam)
        return lambda x: functional_forward(self.model, params, x).logits


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
    """The learned blocks: base weights, the experts' τ, group ids; composes parameters."""

    def __init__(self, model, base, views, opts: dict, device: str = "cpu"):
        import torch

        pattern = re.compile(opts["blocks"]) if opts["blocks"] else None
        infos = base.infos()
        self.k = opts["groups"]
        self.experts = len(views)
        self.device = device
        self.blocks: list[str] = []
        self.base: dict[str, torch.Tensor] = {}
        self.taus: dict[str, list[tuple[int, torch.Tensor]]] = {}
        self.groups: dict[str, torch.Tensor] = {}
        gen = torch.Generator().manual_seed(opts["seed"])
        check_names_match(model, base, "aTLAS")
        for name, param in model.named_parameters():
            info = infos.get(name)
            if info is None or not info.is_float or (pattern and not pattern.search(name)):
                continue
            taus = []
            for t, view in enumerate(views):
                d = view.delta(name)
                if d is not None and bool(d.any()):
                    taus.append((t, d.to(device)))
            if not taus:
                continue
            self.blocks.append(name)
            self.base[name] = param.detach()
            self.taus[name] = taus
            if self.k > 1:
                groups = torch.randint(self.k, param.shape, generator=gen)  # CPU draws
                self.groups[name] = groups.to(device)
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


def _learn(task: Task, scorer: Task, run: _Run, opts, job):
    """AdamW on Λ; returns the best Λ by validation score and the per-epoch history."""
    import torch

    def validate(lam) -> float:
        return scorer.score(scorer.metrics(run.forward(lam.detach()), run.val))

    gen = torch.Generator().manual_seed(opts["seed"])
    lam = run.coefs.zeros().requires_grad_(True)
    trainer = Trainer([lam], lr=opts["lr"], weight_decay=0.1, clip=1.0)
    best = BestOnValidation(lam.detach().clone(), validate(lam))
    best.history.append({"epoch": 0, "score": best.score, "loss": None})
    chunks = list(task.batches(run.train))  # tokenized once, reused every epoch
    per_step = _chunking(opts["batch_size"])[1] or len(chunks)
    steps = opts["epochs"] * -(-len(chunks) // per_step)
    bar = job.progress(range(steps), desc="atlas", unit="step", total=steps)
    ticks = iter(bar)

    def piece(i):
        x, y = chunks[i]
        return lambda: task.loss(run.forward(lam)(x), x, y)  # summed; divided by the count

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
