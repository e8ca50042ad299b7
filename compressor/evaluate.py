"""``compress eval``: score a model artifact on data, and store the scores as its metrics.

Tasks: ``classify`` (accuracy and loss on labelled rows, text or pixels),
``lm`` (perplexity of a causal LM on text lines), ``embed`` (mean cosine
agreement of sentence embeddings with a reference model's). Metrics are stored
on the artifact as ``NAME:DATA`` (``accuracy:test``), so ``store ls`` and
``store show`` list them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .data import Example, batches, read_examples
from .errors import InputError, OptionError
from .method import Option, parse_options, positive
from .modeling import is_image_config, label_ids, model_inputs, source_model
from .objectives import cross_entropy, embedding_agreement, language_model_nll, mean_pool

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    pass

EVAL_OPTIONS = (
    Option(
        "data", "str", None, "data file: JSONL rows with text (or pixels) and label, or text lines"
    ),
    Option(
        "task",
        "choice",
        "auto",
        "what to measure (auto: classify when rows have labels, "
        "embed when a reference is given, else lm)",
        choices=("auto", "classify", "lm", "embed"),
    ),
    Option("reference", "str", None, "REF of the model whose embeddings 'embed' compares against"),
    Option(
        "batch_size",
        "int",
        32,
        "examples per forward pass",
        check=positive,
    ),
    Option(
        "max_length",
        "int",
        128,
        "tokens per text; longer texts are truncated",
        check=lambda v: None if v > 1 else "must be at least 2",
    ),
)


def check_request(options) -> tuple[dict, list[Example], str]:
    """Check eval's options and read its data: (values, examples, task)."""
    values = parse_options(EVAL_OPTIONS, options or {}, "eval")
    if values["data"] is None:
        raise OptionError("eval needs -o data PATH")
    examples = read_examples(values["data"])
    task = values["task"]
    if task == "auto":
        task = (
            "classify"
            if examples[0].label is not None
            else ("embed" if values["reference"] else "lm")
        )
    if task == "classify" and examples[0].label is None:
        raise InputError(f"{values['data']}: task 'classify' needs a 'label' on every row")
    if task in ("lm", "embed") and any(e.text is None for e in examples):
        raise InputError(f"{values['data']}: task '{task}' needs text rows")
    if task == "embed" and not values["reference"]:
        raise OptionError("task 'embed' needs -o reference REF")
    return values, examples, task


def score(source, task: str, examples, values: dict, progress, reference=None) -> dict:
    """The metrics of the model a TensorSource holds, on the examples, for the task.

    ``reference`` is the TensorSource of the model whose embeddings ``embed`` compares to.
    """
    with source_model(source, task) as (model, tokenizer):
        if task == "classify":
            return _classify(model, tokenizer, examples, values, progress)
        if task == "lm":
            return _perplexity(model, tokenizer, examples, values, progress)
        with source_model(reference, task) as other:
            return _agreement([(model, tokenizer), other], examples, values, progress)


def _batches(examples: list[Example], values: dict, progress):
    return progress(list(batches(examples, values["batch_size"])), desc="eval", unit="batch")


def _classify(model, tokenizer, examples, values, progress) -> dict:
    import torch

    labels = label_ids(examples, model.config, values["data"])
    image = is_image_config(model.config)
    if not image and any(e.text is None for e in examples):
        raise InputError(f"{values['data']}: a text model needs 'text' rows")
    size = values["batch_size"]
    loss_sum, correct = 0.0, 0
    with torch.inference_mode():
        for i, batch in enumerate(_batches(examples, values, progress)):
            y = labels[i * size : i * size + len(batch)]
            x = model_inputs(batch, tokenizer, values["data"], values["max_length"])
            logits = model(**x).logits
            loss, _ = cross_entropy(logits, y)
            loss_sum += float(loss)
            correct += int((logits.argmax(-1) == y).sum())
    n = len(examples)
    return {"accuracy": correct / n, "loss": loss_sum / n, "examples": n}


def _perplexity(model, tokenizer, examples, values, progress) -> dict:
    import torch

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    nll, tokens = 0.0, 0
    with torch.inference_mode():
        for batch in _batches(examples, values, progress):
            enc = model_inputs(batch, tokenizer, values["data"], values["max_length"])
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            s, k = language_model_nll(logits, enc["input_ids"], enc["attention_mask"])
            nll += float(s)
            tokens += k
    if tokens == 0:
        raise InputError(f"{values['data']}: no text line is longer than one token")
    return {"perplexity": math.exp(nll / tokens), "loss": nll / tokens, "tokens": tokens}


def _agreement(models, examples, values, progress) -> dict:
    import torch

    total = 0.0
    with torch.inference_mode():
        for batch in _batches(examples, values, progress):
            embs = []
            for model, tokenizer in models:
                enc = model_inputs(batch, tokenizer, values["data"], values["max_length"])
                out = model(**enc).last_hidden_state
                embs.append(mean_pool(out, enc["attention_mask"]))
            s, _ = embedding_agreement(*embs)
            total += float(s)
    n = len(examples)
    return {"cosine": total / n, "examples": n}
