"""``compress eval``: score a model artifact on data, and store the scores as its metrics.

Tasks: ``classify`` (accuracy and loss on labelled rows, text or pixels),
``lm`` (perplexity of a causal LM on text lines), ``embed`` (mean cosine
agreement of sentence embeddings with a reference model's). Metrics are stored
on the artifact as ``NAME:DATA`` (``accuracy:test``), so ``store ls`` and
``store show`` list them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from compressor.app.eval_options import EVAL_OPTIONS
from compressor.app.refs import resolve
from compressor.errors import InputError, OptionError
from compressor.io import devices
from compressor.io.contents import describe_content
from compressor.learning.data import Example, batches, read_examples
from compressor.learning.objectives import embedding_agreement, mean_pool
from compressor.learning.tasks import Task
from compressor.method import parse_options
from compressor.models.modeling import model_inputs, source_model
from compressor.reporting import make_progress
from compressor.store import opened_store


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


def request_digest(values: dict, base: str | None = None) -> str:
    """What a score depends on besides the model: the data file's bytes, every option and
    the base, hashed (a plan's eval step reuses scores only of the same request)."""
    import hashlib
    import json

    h = hashlib.sha256(Path(values["data"]).read_bytes())
    rest = {k: str(v) for k, v in values.items() if k != "data"}
    h.update(json.dumps({"options": rest, "base": base}, sort_keys=True).encode())
    return h.hexdigest()


def score(
    source, task: str, examples, values: dict, progress, reference=None, device: str = "cpu"
) -> dict:
    """The metrics of the model a TensorSource holds, on the examples, for the task, with
    the model on ``device``.

    ``reference`` is the TensorSource of the model whose embeddings ``embed`` compares to.
    """
    with source_model(source, task, device) as (model, tokenizer):
        if task in ("classify", "lm"):
            objective = Task(
                "ce" if task == "classify" else "lm",
                model.config,
                tokenizer,
                values["max_length"],
                device,
            )
            split = objective.split(examples, values["data"], values["batch_size"])
            return objective.metrics(lambda x: model(**x).logits, split, progress)
        with source_model(reference, task, device) as other:
            return _agreement([(model, tokenizer), other], examples, values, progress, device)


def _agreement(models, examples, values, progress, device: str) -> dict:
    import torch

    total = 0.0
    chunks = list(batches(examples, values["batch_size"]))
    with torch.inference_mode():
        for batch in progress(chunks, desc="eval", unit="batch"):
            embs = []
            for model, tokenizer in models:
                enc = model_inputs(batch, tokenizer, values["data"], values["max_length"], device)
                out = model(**enc).last_hidden_state
                embs.append(mean_pool(out, enc["attention_mask"]))
            s, _ = embedding_agreement(*embs)
            total += float(s)
    n = len(examples)
    return {"cosine": total / n, "examples": n}


@contextlib.contextmanager
def model_source(store, ref: str, base: str | None = None, resolved=None) -> Iterator[tuple]:
    """(TensorSource of the full model, ResolvedInput of REF): REF as it is when it is a
    model, else REF added to BASE tensor by tensor (nothing is written to disk).
    ``resolved``: REF already resolved, so a path is not opened and hashed again."""
    from compressor.io.deltas import ModelFromDelta
    from compressor.reporting import warn

    resolved = resolved if resolved is not None else resolve(store, ref)
    with contextlib.ExitStack() as stack:
        stack.callback(resolved.source.close)
        if base is None:
            if resolved.source.content != "model":
                raise InputError(
                    f"{ref} holds {describe_content(resolved.source.content)}, not a model; "
                    "give --base BASE "
                    "to evaluate it added to its base"
                )
            yield resolved.source, resolved
            return
        base_source = resolve(store, base).source
        stack.callback(base_source.close)
        yield ModelFromDelta(base_source, resolved.source, warn), resolved


def evaluate(
    ref: str,
    options=None,
    *,
    base: str | None = None,
    store=None,
    quiet: bool = True,
    record: bool = True,
    resolved=None,
) -> dict:
    """Score REF (added to BASE, for a task vector or adapter) on data (``compress eval``);
    store the scores as its metrics (``NAME:DATA``) and return them. Without ``record``
    nothing is stored: the result's ``metrics_for`` holds (artifact id, metrics,
    externals, requests) for the catalog's writer to store; ``requests`` maps DATA to
    :func:`~compressor.app.evaluate.request_digest` (which scores a rerun may reuse).
    ``resolved``: REF already opened by :func:`~compressor.app.refs.resolve` (closed here)."""

    values, examples, task = check_request(options)
    device = devices.resolve()  # a device that is not there: refused before the store opens
    progress = make_progress(quiet)
    with opened_store(store) as st:
        with contextlib.ExitStack() as stack:
            source, resolved = stack.enter_context(model_source(st, ref, base, resolved))
            reference = None
            if task == "embed":
                reference, _ = stack.enter_context(model_source(st, values["reference"]))
            metrics = score(source, task, examples, values, progress, reference, device)
            source.verify()  # scores from damaged blobs are not stored
        stem = Path(values["data"]).stem
        if resolved.select is not None:  # one adapter of a joint artifact: say which
            stem += f"#{resolved.select}"
        keyed = {f"{k}:{stem}": v for k, v in metrics.items()}
        externals = [resolved.external] if resolved.external else []
        requests = {stem: request_digest(values, base)}
        result = {"task": task, "data": str(values["data"]), **metrics}
        if not record:
            return {**result, "metrics_for": (resolved.artifact_id, keyed, externals, requests)}
        st.set_metrics(resolved.artifact_id, keyed, externals=externals, requests=requests)
    return result
