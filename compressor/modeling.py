"""Running models: materialise an artifact as a transformers directory and load it.

Methods that run the model (``eval``, and later aTLAS, MatFormer's importance
order, SketchTune's calibration) share this layer and :mod:`compressor.objectives`
rather than writing their own loaders.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError
from .refs import ResolvedInput, resolve


@contextlib.contextmanager
def model_directory(
    store, ref: str, base: str | None = None
) -> Iterator[tuple[Path, ResolvedInput]]:
    """A directory transformers can load for REF (plus BASE for task vectors and adapters).

    A model directory given as a path is used in place; anything else is
    exported to a temporary directory in the store, removed afterwards.
    """
    from .api import export

    resolved = resolve(store, ref)
    resolved.source.close()
    if base is None and resolved.source.content != "model":
        raise InputError(
            f"{ref} holds a {resolved.source.content}, not a model; give --base BASE to "
            "evaluate it added to its base"
        )
    if base is None and resolved.external is not None and resolved.external.path.is_dir():
        yield resolved.external.path, resolved
        return
    with store.tmp_dir() as tmp:
        yield export(ref, tmp / "model", base=base, store=store), resolved


def is_image_config(config) -> bool:
    return getattr(config, "num_channels", None) is not None and not hasattr(config, "vocab_size")


def load_model(path: Path, head: str, label: str | None = None):
    """Load a transformers model with the head a task needs, in eval mode."""
    import transformers
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    label = label or str(path)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
        if head == "classify":
            auto = (
                transformers.AutoModelForImageClassification
                if is_image_config(config)
                else transformers.AutoModelForSequenceClassification
            )
        elif head == "lm":
            auto = transformers.AutoModelForCausalLM
        else:
            auto = transformers.AutoModel
        model = auto.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"{label} is not a model transformers can load for '{head}': {first}"
        ) from None
    return model.eval()


def load_tokenizer(path: Path, label: str | None = None):
    """The tokenizer saved with a model."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{label or path} has no tokenizer transformers can load ({e})") from None
