"""Task objects: what a data file asks of a model, as a loss to learn and a score to report.

One ``Task`` serves ``compress eval`` (its metrics), aTLAS (loss and a
validation score over composed parameters) and the methods that train through
the model (MatFormer's nested training, SketchTune's table tuning). Objectives:

- ``ce``: cross-entropy on labelled rows (text or pixels) with the model's head;
  metrics ``accuracy``, ``loss``, ``examples``.
- ``lm``: next-token loss on text lines; metrics ``perplexity``, ``loss``, ``tokens``.
- ``entropy``: the entropy of the predictions on unlabelled rows (test-time
  adaptation); metrics ``entropy``, ``examples``.
- ``agree``: the model's pooled last hidden states matched to a teacher's embeddings of
  the same rows (the split's targets), loss 1 − cosine; needs no head and no labels;
  metrics ``cosine``, ``loss``, ``examples``.

A ``Split`` holds one data file's rows and labels and yields batches of model
inputs; losses are sums with a count, so any batching averages exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from compressor.errors import InputError
from compressor.learning.data import Example
from compressor.learning.objectives import (
    cross_entropy,
    disagreement,
    language_model_nll,
    pooled_hidden,
    prediction_entropy,
)
from compressor.models.modeling import is_image_config, label_ids, model_inputs

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch

OBJECTIVES = ("ce", "lm", "entropy", "agree")


def objective_for(rows: list[Example], objective: str = "auto", model=None) -> str:
    """The objective a data file asks for (``auto``: ce on labelled rows, else lm; agree
    instead of lm when ``model`` is given and has no causal LM head)."""
    if objective == "auto":
        objective = "ce" if rows[0].label is not None else "lm"
        if objective == "lm" and model is not None and not is_causal_lm(model):
            objective = "agree"
    return objective


def is_causal_lm(model) -> bool:
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def has_classifier(model) -> bool:
    return type(model).__name__.endswith(("ForSequenceClassification", "ForImageClassification"))


def check_head(model, objective: str, label: str) -> None:
    """Refuse a model whose head cannot learn the objective (a trained model keeps the head
    the checkpoint was saved with: ce needs a classifier, lm a causal LM head)."""
    kind = type(model).__name__
    if objective == "ce" and not has_classifier(model):
        raise InputError(f"{label} is a {kind}; labelled rows need a classification head")
    if objective == "lm" and not is_causal_lm(model):
        raise InputError(
            f"{label} is a {kind}; unlabelled text trains a causal LM (give labelled rows "
            "to train a classifier)"
        )


@dataclass
class Split:
    """One data file prepared for a task: its rows, their class ids, and the batch size."""

    rows: list[Example]
    labels: torch.Tensor | None
    data: str
    batch_size: int
    device: str = "cpu"  # where batches go (the model's device)

    def batches(self, tokenizer, max_length: int) -> Iterator[tuple[dict, torch.Tensor | None]]:
        """(model inputs, class ids or None) per batch, tokenized as they are needed."""
        for start in range(0, len(self.rows), self.batch_size):
            picked = range(start, min(start + self.batch_size, len(self.rows)))
            yield self.batch(picked, tokenizer, max_length)

    def batch(self, indices, tokenizer, max_length: int) -> tuple[dict, torch.Tensor | None]:
        """(model inputs, class ids or None) of the rows at ``indices``."""
        indices = list(indices)
        rows = [self.rows[i] for i in indices]
        x = model_inputs(rows, tokenizer, self.data, max_length, self.device)
        return x, (self.labels[indices].to(self.device) if self.labels is not None else None)

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)


class Task:
    """An objective on a model's outputs: the loss of a batch and the metrics of a split."""

    def __init__(
        self, objective: str, config, tokenizer, max_length: int = 128, device: str = "cpu"
    ):
        if objective not in OBJECTIVES:
            raise InputError(f"unknown objective '{objective}' (one of {', '.join(OBJECTIVES)})")
        self.objective = objective
        self.config = config
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.device = device  # the model's: batches are moved there
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token

    @property
    def score_name(self) -> str:
        """The name of the number ``score`` returns (higher is better)."""
        return {"ce": "accuracy", "lm": "neg_loss", "entropy": "neg_entropy", "agree": "cosine"}[
            self.objective
        ]

    def predict(self, call: Callable[[dict], object], x: dict) -> torch.Tensor:
        """What the objective reads of ``call`` (model inputs → model output) run on ``x``:
        the pooled last hidden states for agree, else the logits."""
        if self.objective == "agree":
            out = call({**x, "output_hidden_states": True})
            return pooled_hidden(out, x.get("attention_mask"))
        return call(x).logits

    def split(self, rows: list[Example], data: str, batch_size: int) -> Split:
        """Check the rows fit the objective and the model; an error names the file and line.
        For agree, the caller sets the split's ``labels`` to the teacher's embeddings."""
        if self.objective == "ce":
            if rows[0].label is None:
                raise InputError(f"{data}: objective 'ce' needs a 'label' on every row")
            labels = label_ids(rows, self.config, data)
        else:
            labels = None
        image = is_image_config(self.config)
        if self.objective == "lm" and any(e.text is None for e in rows):
            raise InputError(f"{data}: objective 'lm' needs text rows")
        if not image and any(e.text is None for e in rows):
            raise InputError(f"{data}: a text model needs 'text' rows")
        return Split(rows, labels, data, batch_size, self.device)

    def batches(self, split: Split):
        """The split's batches tokenized for this task's model."""
        return split.batches(self.tokenizer, self.max_length)

    def batch(self, split: Split, indices) -> tuple[dict, torch.Tensor | None]:
        """The rows of the split at ``indices``, tokenized for this task's model."""
        return split.batch(indices, self.tokenizer, self.max_length)

    def loss(self, logits: torch.Tensor, x: dict, y) -> tuple[torch.Tensor, int]:
        """The summed objective of a batch and its count (examples, or tokens for lm)."""
        if self.objective == "lm":
            return language_model_nll(logits, x["input_ids"], x["attention_mask"])
        if self.objective == "ce":
            return cross_entropy(logits, y)
        if self.objective == "agree":
            return disagreement(logits, y)
        return prediction_entropy(logits)

    def metrics(self, forward: Callable[[dict], torch.Tensor], split: Split, progress=None) -> dict:
        """Run ``forward`` (inputs → logits) over the split without gradients; the metrics."""
        import torch

        batch_iter = self.batches(split)
        if progress is not None:
            batch_iter = progress(batch_iter, desc="eval", unit="batch", total=len(split))
        total, count, correct = 0.0, 0, 0
        with torch.no_grad():
            for x, y in batch_iter:
                logits = forward(x)
                s, n = self.loss(logits, x, y)
                total, count = total + float(s), count + n
                if self.objective == "ce":
                    correct += int((logits.argmax(-1) == y).sum())
        if self.objective == "lm":
            if count == 0:
                raise InputError(f"{split.data}: no text line is longer than one token")
            return {"perplexity": math.exp(total / count), "loss": total / count, "tokens": count}
        if self.objective == "ce":
            return {"accuracy": correct / count, "loss": total / count, "examples": count}
        if self.objective == "agree":
            return {"cosine": 1 - total / count, "loss": total / count, "examples": count}
        return {"entropy": total / count, "examples": count}

    def score(self, metrics: dict) -> float:
        """Higher is better: accuracy for ce, else minus the mean loss (or entropy)."""
        if self.objective == "ce":
            return metrics["accuracy"]
        if self.objective == "agree":
            return metrics["cosine"]
        return -metrics["loss" if self.objective == "lm" else "entropy"]
