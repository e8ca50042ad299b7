"""``eval``'s options: a light module, so the CLI builds its help without the model code."""

from __future__ import annotations

from compressor.method import Option, positive

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
