"""Turning a REF (a path or a store reference) into a tensor source.

Paths are opened by the first registered reader that recognises them and
identified by a full hash of their bytes, so the store can record them as
external artifacts without copying them. A Hugging Face hub id resolves to
its snapshot in the local cache. Store references open the artifact's blobs in place; artifacts
whose manifest names an ``encoding`` are decoded by that method's plugin.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from compressor.errors import InputError, RefError
from compressor.io.integrity import read_checked, sha256_file
from compressor.io.peft import PeftAdapter
from compressor.io.sources import (
    SafetensorsShards,
    TensorSource,
    carried_files,
    directory_files,
    shards_from_files,
)
from compressor.registry import get_registry

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$")


class External:
    """An input path to record in the store as an external artifact.

    Its id is the SHA-256 of every file's full bytes, taken while the weights
    are read anyway (whatever was not read is hashed when the id is asked for).
    """

    def __init__(self, path: Path, files: dict[str, Path], source: TensorSource, reader: str):
        self.path = path
        self.reader = reader  # which input format opened it
        self.files = files
        self.source = source
        self.content = source.content
        self.bytes = sum(p.stat().st_size for p in files.values())
        self.digests: dict[Path, str] = {}  # files already hashed elsewhere (a copy)
        self._fingerprint: str | None = None

    def __getstate__(self) -> dict:
        """What a plan's worker hands the driver: the record without the tensor source
        (fingerprinted first). The driver commits from the record alone, and unpickling a
        source there would import torch before its first commit."""
        self.fingerprint  # noqa: B018 - fills _fingerprint and digests
        return {**self.__dict__, "source": None}

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha256()
            for rel in sorted(self.files):
                p = self.files[rel]
                digest = self.digests.get(p) or self.source.file_digest(p) or sha256_file(p)
                self.digests[p] = digest
                h.update(f"{rel}\0{p.stat().st_size}\0{digest}\n".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    @property
    def id(self) -> str:
        return self.fingerprint[:32]


@dataclass
class ResolvedInput:
    """A tensor source and the artifact (stored or external) it stands for."""

    source: TensorSource
    stored_id: str | None
    label: str
    external: External | None = None
    select: int | None = None  # which adapter of a joint artifact (``NAME#k``)

    @property
    def artifact_id(self) -> str:
        """The stored artifact's id, or the external input's (hashing it if need be)."""
        return self.external.id if self.external is not None else self.stored_id


def looks_like_path(ref: str) -> bool:
    return os.sep in ref or ref.endswith(".safetensors") or ref.startswith((".", "~"))


def resolve(store, ref: str, raw: tuple[str, ...] = ()) -> ResolvedInput:
    """Open REF as a tensor source; paths win over store names, then hub ids in the HF cache.

    An artifact whose encoding is in ``raw`` is opened as stored, not decoded."""
    if not ref.strip():
        raise InputError("an empty reference names nothing")
    path = Path(ref).expanduser()
    if path.exists():
        return _resolve_path(path.resolve(), store)
    if HUB_ID.match(ref) and not ref.endswith(".safetensors"):
        return _resolve_path(hub_cache_path(ref), store)
    if looks_like_path(ref):
        raise InputError(f"no such file or directory: {ref}")
    name, select = _split_selection(ref)
    record = store.resolve(name)
    source = open_artifact(store, record, select, raw)
    return ResolvedInput(source, record.id, record.label, select=select)


def hub_cache_path(repo_id: str) -> Path:
    """The snapshot directory of a Hugging Face hub model in the local cache (no download);
    ``ORG/NAME@REVISION`` (a branch, tag or commit, mergekit's form) picks that snapshot."""
    repo_id, _, revision = repo_id.partition("@")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        raise InputError(f"no such file or directory: {repo_id}") from None
    try:
        # read the cache location now: huggingface_hub fixes its default at import time
        home = os.environ.get("HF_HOME")
        cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(home, "hub") if home else None)
        found = snapshot_download(
            repo_id, revision=revision or None, cache_dir=cache, local_files_only=True
        )
        return Path(found).resolve()
    except LocalEntryNotFoundError:
        at = f" at revision {revision}" if revision else ""
        flag = f" --revision {revision}" if revision else ""
        raise InputError(
            f"'{repo_id}'{at} is neither a path nor in the Hugging Face cache "
            "(HF_HUB_CACHE or HF_HOME); download it first, e.g. `hf download "
            f"{repo_id}{flag}`; compressor never downloads"
        ) from None
    except Exception as e:  # an invalid repo id, an unreadable cache
        raise InputError(
            f"'{repo_id}': cannot look it up in the Hugging Face cache ({e})"
        ) from None


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


def refuse_pickle(path: Path) -> None:
    """Refuse a pickle-based checkpoint: loading one can run arbitrary code."""
    if path.suffix in PICKLE_SUFFIXES:
        raise InputError(
            f"{path} is a pickle checkpoint, which compressor never loads (unpickling can run "
            "code); convert it to safetensors where you trust it, e.g. transformers' "
            "save_pretrained(OUT, safe_serialization=True)"
        )


def _resolve_path(path: Path, store=None) -> ResolvedInput:
    refuse_pickle(path)
    files = input_files(path)
    for reader in get_registry().readers:
        if reader.detect(path):
            source = reader.open(path)
            break
    else:
        raise InputError(f"{path}: no reader recognises this path")
    if not source.names():
        source.close()
        raise InputError(f"{path} holds no tensors; it is not a model, adapter or task vector")
    ext = External(path, files, source, reader.name)
    if store is not None:  # files hashed before and unchanged since (same size and mtime)
        ext.digests = store.known_digests(files)
        if len(ext.digests) == len(files):
            source.identified()  # no need to hash them again while reading
    return ResolvedInput(source, None, str(path), ext)


def input_files(path: Path) -> dict[str, Path]:
    """Every file of an input (relative path -> path), with its symbolic links checked."""
    if path.is_file():
        return {path.name: path}
    return directory_files(path, recursive=True)


def open_artifact(
    store, record, select: int | None = None, raw: tuple[str, ...] = ()
) -> TensorSource:
    """A stored artifact as a tensor source (decoded if it is an encoded form).

    ``select`` picks one adapter of an artifact that holds several (``NAME#k``).
    """
    if record.kind == "external":
        path = Path(record.path)
        if not path.exists():
            raise InputError(f"{record.label}: the external input is no longer at {path}")
        return _resolve_path(path).source
    return open_files(record, store.files(record.id), select, raw, _parent_opener(store, record))


def _parent_opener(store, record):
    """``open_parent(role, raw)`` for a stored artifact: its parent in that role, opened."""

    def open_parent(role: str, raw: tuple[str, ...] = ()) -> TensorSource:
        found = next((p for p in record.parents if p["role"] == role), None)
        if found is None:
            raise InputError(f"{record.label} has no {role} artifact in the store")
        try:
            parent = store.get(found["id"])
        except RefError:
            raise InputError(
                f"{record.label} is decoded with its {role} {found['label']}, which is no "
                "longer in the store"
            ) from None
        return open_artifact(store, parent, raw=raw)

    return open_parent


def open_copied_artifact(directory: Path, select: int | None = None) -> TensorSource:
    """An artifact's files copied out of a store (by relative path), opened without the
    catalog: its ``manifest.json`` says what they are and how they decode."""
    from compressor.store import ArtifactRecord
    from compressor.store.records import MANIFEST_FILE

    directory = Path(directory)
    try:
        doc = json.loads(read_checked(directory / MANIFEST_FILE, str(directory), MANIFEST_FILE))
    except (InputError, ValueError) as e:
        raise InputError(f"{directory} holds no readable {MANIFEST_FILE} ({e})") from None
    record = ArtifactRecord.from_manifest(doc)
    files = {rel: directory / rel for rel in doc["files"]}
    missing = [rel for rel, p in files.items() if not p.is_file()]
    if missing:
        raise InputError(f"{directory} lacks {missing[0]}, which its {MANIFEST_FILE} lists")
    return open_files(record, files, select)


def open_files(
    record,
    files: dict[str, Path],
    select: int | None = None,
    raw: tuple[str, ...] = (),
    open_parent=None,
) -> TensorSource:
    """An artifact's files (its manifest.json aside) as a source, decoded when encoded.

    ``open_parent(role, raw)`` opens the artifact's parents for decoders that need them."""
    from compressor.store.records import MANIFEST_FILE

    files = {rel: p for rel, p in files.items() if rel != MANIFEST_FILE}
    encoding = record.manifest.get("encoding")
    if record.content == "adapter" and not encoding:
        return PeftAdapter(Path(record.label), files=files, label=record.label)
    prefix = "adapter_model" if record.content == "adapter" else "model"
    manifest = record.manifest if select is None else {**record.manifest, "select": select}
    if select is not None and not encoding:
        raise RefError(f"{record.label} holds one artifact; '#{select}' selects nothing in it")
    as_stored = bool(encoding) and encoding in raw  # the encoded tensors themselves
    source = SafetensorsShards(
        record.label,
        shards_from_files(record.label, files, prefix),
        carried_files(files),
        "tensors" if as_stored else record.content,
        manifest,
        shard_names={p: rel for rel, p in files.items()},
    )
    if open_parent is not None:
        source.open_parent = open_parent
    if encoding and not as_stored:
        method = get_registry().decoder(encoding)
        if method is None:
            raise RefError(
                f"{record.label} is encoded by '{encoding}', and no installed plugin decodes it"
            )
        source = method.decode(source)
        if record.content == "adapter" and not isinstance(source, PeftAdapter):
            return PeftAdapter(Path(record.label), files=files, label=record.label, tensors=source)
    return source
