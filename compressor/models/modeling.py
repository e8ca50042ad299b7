"""Running models: build a transformers model from any tensor source, nothing written to disk.

Methods that run the model (``eval``, and later aTLAS, MatFormer's importance
order, SketchTune's calibration) share this layer and :mod:`compressor.learning.objectives`
rather than writing their own loaders.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from compressor.errors import InputError
from compressor.io.integrity import expected_digest, read_checked

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch


def is_image_config(config) -> bool:
    return getattr(config, "num_channels", None) is not None and not hasattr(config, "vocab_size")


def _auto_class(config, head: str):
    import transformers

    if head == "classify":
        return (
            transformers.AutoModelForImageClassification
            if is_image_config(config)
            else transformers.AutoModelForSequenceClassification
        )
    if head == "lm":
        return transformers.AutoModelForCausalLM
    if head == "saved":  # the class the checkpoint was saved from, so every tensor has a home
        for name in getattr(config, "architectures", None) or []:
            if hasattr(transformers, name):
                return getattr(transformers, name)
    return transformers.AutoModel


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


@contextlib.contextmanager
def linked_files(source) -> Iterator[Path]:
    """A temporary directory with a source's top-level config and tokenizer files, as
    transformers reads them: a store blob is copied once its hash is checked (a damaged
    tokenizer.json must not change a score), any other file linked."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="compressor-model-") as tmp:
        for rel, path in source.files.items():
            if "/" in rel:
                continue
            if expected_digest(Path(path)) is not None:
                (Path(tmp) / rel).write_bytes(read_checked(Path(path), source.label, rel))
            else:
                (Path(tmp) / rel).symlink_to(Path(path).resolve())
        yield Path(tmp)


def source_tokenizer(source):
    """The tokenizer carried with a source's files; None for an image model."""
    config = source.config() or {}
    if "num_channels" in config and "vocab_size" not in config:
        return None
    with linked_files(source) as tmp:
        return load_tokenizer(tmp, source.label)


@contextlib.contextmanager
def source_model(source, head: str, device: str = "cpu") -> Iterator[tuple]:
    """(model, tokenizer or None) built from a TensorSource's config with its own weights,
    on ``device`` (the model is built on the CPU, then moved whole).

    The config and tokenizer files are linked into a temporary directory; the
    weights (read from the source, so hash-checked and decoded like any input) go
    through transformers' own loading, which renames checkpoint keys where an
    architecture's modules were renamed (ViT in transformers 5). The whole model is
    in memory, and its state dict once more while it loads.
    """

    import transformers

    _quiet_transformers()
    if "config.json" not in source.files:
        raise InputError(
            f"{source.label} is not a model transformers can load for '{head}': "
            "it has no config.json"
        )
    source.config()  # parsed and checked by us first: a damaged one gets its own message
    with linked_files(source) as tmp:
        try:
            config = transformers.AutoConfig.from_pretrained(tmp)
            cls = _auto_class(config, head)
            weights = {name: source.get(name) for name in source.names()}
            if hasattr(cls, "_model_mapping"):  # an Auto class: the concrete one for this config
                cls = cls._model_mapping[type(config)]
            model, info = cls.from_pretrained(
                None, config=config, state_dict=weights, output_loading_info=True
            )
        except (OSError, ValueError, KeyError) as e:
            raise InputError(
                f"{source.label} is not a model transformers can load for '{head}': "
                f"{_first_line(e)}"
            ) from None
        del weights
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise InputError(
                f"{source.label} has no weights for {', '.join(missing[:3])}"
                f"{' ...' if len(missing) > 3 else ''} (a '{head}' model needs them)"
            )
        tokenizer = None if is_image_config(config) else load_tokenizer(Path(tmp), source.label)
        yield model.to(device).eval(), tokenizer


def checkpoint_names(net, source) -> dict[str, str]:
    """{parameter name in ``net``: the checkpoint tensor it was loaded from}.

    Most architectures keep the checkpoint's names; some are renamed on load
    (transformers 5 renames ViT's modules, and saves under the old names again). Then
    every tensor of the source is stood in for by a constant (its index, broadcast: no
    memory), the model is loaded once more from those, and each parameter reads back
    whose index it holds. A parameter built from several tensors (a fused projection)
    maps to none and is left out.
    """
    import torch

    infos = source.infos()
    params = dict(net.named_parameters())
    if all(n in infos for n in params):
        return {n: n for n in params}
    names = [n for n, i in infos.items() if i.is_float]
    offset = 1 << 20  # far from any initialiser's constant (ones, zeros); exact in float32
    markers = {
        n: torch.tensor(float(offset + k)).expand(tuple(infos[n].shape))
        for k, n in enumerate(names)
    }
    for n, i in infos.items():
        if not i.is_float:
            markers[n] = source.get(n)
    twin = type(net).from_pretrained(
        None, config=net.config, state_dict=markers, dtype=torch.float32
    )
    found = {}
    for pname, p in twin.named_parameters():
        k = float(p.detach().reshape(-1)[0]) - offset
        if k.is_integer() and 0 <= k < len(names) and bool((p == p.reshape(-1)[0]).all()):
            found[pname] = names[int(k)]
    del twin
    return found


def label_ids(examples, config, data: str) -> torch.Tensor:
    """The examples' labels as class ids of the model; an error names the first bad line."""
    import torch

    n = config.num_labels
    label2id = {str(k): v for k, v in (getattr(config, "label2id", None) or {}).items()}
    ids = []
    for e in examples:
        if isinstance(e.label, str):
            if e.label not in label2id:
                raise InputError(
                    f"{data} line {e.line}: label '{e.label}' is not one of the model's labels "
                    f"({', '.join(sorted(label2id))})"
                )
            ids.append(label2id[e.label])
        elif not 0 <= e.label < n:
            raise InputError(
                f"{data} line {e.line}: label {e.label} is outside the model's {n} classes "
                f"(0-{n - 1})"
            )
        else:
            ids.append(e.label)
    return torch.tensor(ids)


def model_inputs(batch, tokenizer, data: str, max_length: int, device: str = "cpu") -> dict:
    """Keyword arguments of a forward pass: pixel_values for an image model, else tokens;
    built on the CPU, then moved to ``device``."""
    import torch

    if tokenizer is None:
        if any(e.pixels is None for e in batch):
            raise InputError(f"{data}: an image model needs 'pixels' rows")
        x = torch.tensor([e.pixels for e in batch], dtype=torch.float32)
        return {"pixel_values": (x.unsqueeze(1) if x.dim() == 3 else x).to(device)}
    if any(e.text is None for e in batch):
        raise InputError(f"{data}: a text model needs 'text' rows")
    enc = tokenizer(
        [e.text for e in batch],
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return {k: v.to(device) for k, v in enc.items()}


def load_tokenizer(path: Path, label: str | None = None):
    """The tokenizer saved with a model."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{label or path} has no tokenizer transformers can load ({e})") from None
