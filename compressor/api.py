"""The Python API. The CLI calls these same functions.

``apply``, ``merge``, ``extract`` and ``sample`` run a method and commit its
artifact; ``export`` writes any artifact (or base + task vector) to a directory
that transformers loads, or to a plain ``.safetensors`` file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from compressor.app.evaluate import evaluate
from compressor.app.export import export
from compressor.app.runs import Options, PendingArtifact, import_path, join_parts, run_method
from compressor.store import ArtifactRecord

__all__ = [
    "Options",
    "PendingArtifact",
    "apply",
    "evaluate",
    "export",
    "extract",
    "import_path",
    "join_parts",
    "merge",
    "run_method",
    "sample",
    "train",
]


def apply(
    plugin: str, input: str | Sequence[str], *, base: str | None = None, **kw
) -> ArtifactRecord:
    """Run a compress method on one input, or several for methods that take them."""
    inputs = [input] if isinstance(input, (str, Path)) else list(input)
    return run_method("compress", plugin, inputs, base=base, **kw)


def merge(plugin: str, experts: Sequence[str], *, base: str, **kw) -> ArtifactRecord:
    """Merge experts into one model (``compress merge``)."""
    return run_method("merge", plugin, list(experts), base=base, **kw)


def extract(plugin: str, model: str, **kw) -> ArtifactRecord:
    """Cut a submodel from a model (``compress extract``)."""
    return run_method("extract", plugin, [model], **kw)


def sample(plugin: str, artifact: str, **kw) -> ArtifactRecord:
    """Sample weights from a learned artifact (``compress sample``)."""
    return run_method("sample", plugin, [artifact], **kw)


def train(plugin: str, model: str, **kw) -> ArtifactRecord:
    """Train a model, or an artifact learned from it, on data (``compress train``)."""
    return run_method("train", plugin, [model], **kw)
