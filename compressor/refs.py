"""Turning a REF (a path or a store reference) into a tensor source.

Paths are opened by the first registered reader that recognises them and
fingerprinted, so the store can record them as external artifacts without
copying them. Store references open the artifact's blobs in place; artifacts
whose manifest names an ``encoding`` are decoded by that method's plugin.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, RefError
from .peft_adapter import PeftAdapter
from .plugin_manager import get_registry
from .sources import SafetensorsShards, TensorSource, carried_files, shards_from_files

FULL_HASH_BYTES = 8 << 20
SAMPLE_BYTES = 64 << 10
SAMPLES = 32


@dataclass
class External:
    """An input path to record in the store as an external artifact."""

    id: str
    path: Path
    fingerprint: str
    content: str
    bytes: int


@dataclass
class ResolvedInput:
    """A tensor source and the artifact (stored or external) it stands for."""

    source: TensorSource
    artifact_id: str
    label: str
    external: External | None = None
    select: int | None = None  # which adapter of a joint artifact (``NAME#k``)


def looks_like_path(ref: str) -> bool:
    return os.sep in ref or ref.endswith(".safetensors") or ref.startswith((".", "~"))


def resolve(store, ref: str) -> ResolvedInput:
    """Open REF as a tensor source; paths win over store names."""
    path = Path(ref).expanduser()
    if path.exists():
        return _resolve_path(path.resolve())
    if looks_like_path(ref):
        raise InputError(f"no such file or directory: {ref}")
    name, select = _split_selection(ref)
    record = store.resolve(name)
    source = open_artifact(store, record, select)
    return ResolvedInput(source, record.id, record.label, select=select)


def _split_selection(ref: str) -> tuple[str, int | None]:
    """``NAME#k`` → (NAME, k); any other store reference → (ref, None)."""
    name, mark, pick = ref.rpartition("#")
    if not mark:
        return ref, None
    if not pick.isdigit():
        raise RefError(f"'{ref}': the part after '#' must be a number (which adapter)")
    return name, int(pick)


def adapter_count(store, ref: str) -> int:
    """How many adapters a stored artifact holds together (0 for anything else)."""
    if Path(ref).expanduser().exists() or looks_like_path(ref) or "#" in ref:
        return 0
    return len(store.resolve(ref).manifest.get("adapters", []))


def _resolve_path(path: Path) -> ResolvedInput:
    for reader in get_registry().readers:
        if reader.detect(path):
            source = reader.open(path)
            break
    else:
        raise InputError(f"{path}: no reader recognises this path")
    files = _input_files(path)
    digest, nbytes = fingerprint(files)
    ext = External(digest[:32], path, digest, source.content, nbytes)
    return ResolvedInput(source, ext.id, str(path), ext)


def _input_files(path: Path) -> dict[str, Path]:
    if path.is_file():
        return {path.name: path}
    return {p.name: p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")}


def fingerprint(files: dict[str, Path]) -> tuple[str, int]:
    """A quick content fingerprint of input files, and their total size.

    Small files are hashed whole; large ones by size, their first and last
    megabyte, and evenly spaced samples (any real fine-tune changes every
    tensor, so two checkpoints never share all of them).
    """
    h = hashlib.sha256()
    total = 0
    for rel in sorted(files):
        p = files[rel]
        size = p.stat().st_size
        total += size
        h.update(f"{rel}\0{size}\0".encode())
        with open(p, "rb") as f:
            if size <= FULL_HASH_BYTES:
                h.update(f.read())
                continue
            offsets = [0, size - (1 << 20)] + [
                (size * i) // (SAMPLES + 1) for i in range(1, SAMPLES + 1)
            ]
            for off in offsets:
                f.seek(off)
                h.update(f.read(1 << 20 if off in (0, size - (1 << 20)) else SAMPLE_BYTES))
    return h.hexdigest(), total


def open_artifact(store, record, select: int | None = None) -> TensorSource:
    """A stored artifact as a tensor source (decoded if it is an encoded form).

    ``select`` picks one adapter of an artifact that holds several (``NAME#k``).
    """
    if record.kind == "external":
        path = Path(record.path)
        if not path.exists():
            raise InputError(f"{record.label}: the external input is no longer at {path}")
        return _resolve_path(path).source
    files = store.files(record.id)
    encoding = record.manifest.get("encoding")
    if record.content == "adapter" and not encoding:
        return PeftAdapter(Path(record.label), files=files, label=record.label)
    prefix = "adapter_model" if record.content == "adapter" else "model"
    manifest = record.manifest if select is None else {**record.manifest, "select": select}
    if select is not None and not encoding:
        raise RefError(f"{record.label} holds one artifact; '#{select}' selects nothing in it")
    source = SafetensorsShards(
        record.label,
        shards_from_files(record.label, files, prefix),
        carried_files(files),
        record.content,
        manifest,
    )
    if encoding:
        method = get_registry().methods.get(encoding)
        if method is None or not hasattr(method, "decode"):
            raise RefError(
                f"{record.label} is encoded by '{encoding}', and no installed plugin decodes it"
            )
        source = method.decode(source)
        if record.content == "adapter" and not isinstance(source, PeftAdapter):
            return PeftAdapter(Path(record.label), files=files, label=record.label, tensors=source)
    return source
