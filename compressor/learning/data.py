"""Reading evaluation and training data, with errors that name the line.

Two formats: JSONL, one object per line with ``text`` (or ``pixels``, a 2-D
list of grey levels, for image models) and an optional ``label``; or plain
text, one example per line (for language models and embeddings). A file whose
name ends in ``.jsonl`` or ``.json`` is JSONL; anything else is plain text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from compressor.errors import InputError


@dataclass
class Example:
    """One row: text or pixels, an optional label, and the line it came from."""

    line: int
    text: str | None = None
    pixels: list | None = None
    label: int | str | None = None


def read_examples(path: str | Path) -> list[Example]:
    """Read a data file into examples; raise InputError naming the bad line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such data file: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    jsonl = path.suffix in (".jsonl", ".json")
    examples = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        if not jsonl:
            examples.append(Example(number, text=raw))
            continue
        try:
            row = json.loads(raw)
        except ValueError as e:
            raise InputError(f"{path} line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path} line {number}: expected a JSON object")
        text, pixels = row.get("text"), row.get("pixels")
        if text is None and pixels is None:
            raise InputError(f"{path} line {number}: no 'text' (or 'pixels') field")
        if text is not None and not isinstance(text, str):
            raise InputError(f"{path} line {number}: 'text' must be a string")
        label = row.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, (int, str))):
            raise InputError(f"{path} line {number}: 'label' must be an integer or a string")
        examples.append(Example(number, text=text, pixels=pixels, label=label))
    if not examples:
        raise InputError(f"{path} holds no examples")
    labelled = sum(e.label is not None for e in examples)
    if 0 < labelled < len(examples):
        first = next(e for e in examples if e.label is None)
        raise InputError(f"{path} line {first.line}: no 'label', while other rows have one")
    return examples


def batches(items: list, size: int):
    """Consecutive slices of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
