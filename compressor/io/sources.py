"""Lazy tensor sources: names, shapes and dtypes up front, bytes on request.

A :class:`TensorSource` is what every method reads. The built-in readers (a
``.safetensors`` file, a Hugging Face model directory, single or sharded, and a
store artifact) are all :class:`SafetensorsShards` over a mapping of relative
paths to files; PEFT adapter directories are in :mod:`compressor.io.peft`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from compressor.errors import InputError
from compressor.io.integrity import (
    HashedFile,
    check_digest,
    expected_digest,
    read_checked,
    sha256_file,
    verify_reads,
)
from compressor.io.safetensors import TensorInfo, read_header, read_tensor

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch

INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")
DEFAULT_BLOCK_ELEMS = 1 << 22  # 4M elements: 16 MB in float32


class TensorSource:
    """Named tensors read lazily.

    ``content`` says what the tensors are: ``model`` (full weights), ``delta``
    (a task vector, relative to a base) or ``adapter`` (PEFT LoRA factors).
    ``files`` are the non-tensor files that travel with the weights.
    """

    label: str = ""
    content: str = "model"
    files: dict[str, Path]
    manifest: dict

    def infos(self) -> dict[str, TensorInfo]:
        """Every tensor's info, in storage order."""
        raise NotImplementedError

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Read one tensor, or a range of its first dimension."""
        raise NotImplementedError

    def names(self) -> list[str]:
        return list(self.infos())

    def info(self, name: str) -> TensorInfo:
        return self.infos()[name]

    def config(self) -> dict | None:
        """The parsed ``config.json`` carried with the weights, if any."""
        path = self.files.get("config.json")
        if not path:
            return None
        try:
            config = json.loads(read_checked(path, self.label, "config.json"))
        except RecursionError:
            raise InputError(f"{self.label}: config.json nests too deeply") from None
        except ValueError:
            raise InputError(f"{self.label}: config.json is not valid JSON") from None
        if not isinstance(config, dict):
            raise InputError(f"{self.label}: config.json is not a JSON object")
        return config

    def file_digest(self, path: Path) -> str | None:
        """The SHA-256 of one of this source's files when it was hashed while read, else None."""
        return None

    def tensor_file(self, name: str) -> Path | None:
        """The file a tensor is read from, when it is stored as it is (else None): two
        sources that read a tensor from one store blob share its exact bytes."""
        return None

    def open_parent(self, role: str, raw: tuple[str, ...] = ()) -> TensorSource:
        """The artifact this one was made from in ``role`` (``input``, ``base``...), opened
        through the store; for decoders of artifacts that store only what changed (a tuned
        sketch's tables). ``raw`` lists encodings to open as stored."""
        raise InputError(
            f"{self.label} is decoded with its {role} artifact, which is not at hand "
            "(open it in the store that holds both)"
        )

    def identified(self) -> None:
        """The input's digests are known already: reading need not hash it to identify it."""

    def verify(self) -> None:
        """Raise when a stored file read so far (hashed as read) is damaged; the rest is
        read now. Called before a result that used this source is published."""

    def close(self) -> None:
        """Release open file handles."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RewrittenConfig:
    """A ``config.json`` with changed values, written to a temporary file that lives as
    long as this object: the file a source carries in place of its own."""

    def __init__(self, config: dict):
        import tempfile

        self._tmp = tempfile.TemporaryDirectory(prefix="compress-config-")
        self.path = Path(self._tmp.name) / "config.json"
        self.path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def row_blocks(info: TensorInfo, max_elems: int = DEFAULT_BLOCK_ELEMS) -> Iterator[slice | None]:
    """Split a tensor into blocks of whole rows of at most ``max_elems`` elements.

    Small tensors and tensors without rows come as one block (``None``).
    """
    if len(info.shape) < 2 or info.numel <= max_elems:
        yield None
        return
    rows = info.shape[0]
    per_row = info.numel // rows
    step = max(1, max_elems // per_row)
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


class DecodedSource(TensorSource):
    """An encoded artifact read back tensor by tensor: the base of every method's decoder.

    A subclass sets ``content`` (what the decoded tensors are) and ``_infos``, and
    implements ``_decode(name)`` (one tensor whole, cached while its rows are read);
    ``encoded(name)`` says which tensors are stored as they are, under
    ``stored_name(name)`` in the raw artifact. Hash checks and digests go to the raw files.
    """

    content = "tensors"

    def __init__(self, raw: TensorSource):
        self.raw = raw
        self.label = raw.label
        self.files = raw.files
        self.manifest = raw.manifest
        self._infos: dict[str, TensorInfo] = {}
        self._cache: tuple[str, torch.Tensor] | None = None

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def encoded(self, name: str) -> bool:
        """Whether the tensor is stored encoded (else it is read as it is)."""
        return True

    def stored_name(self, name: str) -> str:
        """Where a tensor stored as it is lies in the raw artifact."""
        return name

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        if not self.encoded(name):
            return self.raw.get(self.stored_name(name), rows)
        if self._cache is None or self._cache[0] != name:
            self._cache = (name, self._decode(name))
        t = self._cache[1]
        return t if rows is None else t[rows]

    def _decode(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def verify(self) -> None:
        self.raw.verify()

    def file_digest(self, path: Path) -> str | None:
        return self.raw.file_digest(path)

    def open_parent(self, role: str, raw: tuple[str, ...] = ()) -> TensorSource:
        return self.raw.open_parent(role, raw)

    def close(self) -> None:
        self.raw.close()


class DecodedDelta(DecodedSource):
    """An encoded task vector read back as dense float32 τ̂.

    The manifest lists the tensor ``order`` with each one's ``shape`` under
    ``tensors``, and the ``carried`` ones (stored as they are).
    """

    content = "delta"

    def __init__(self, raw: TensorSource):
        import torch

        super().__init__(raw)
        meta = raw.manifest["tensors"]
        for name in raw.manifest["order"]:
            shape = tuple(meta[name]["shape"])
            self._infos[name] = TensorInfo(name, shape, torch.float32, 0, 4 * math.prod(shape))
        self._carried = set(raw.manifest.get("carried", []))
        for name in self._carried:
            self._infos[name] = raw.info(name)

    def encoded(self, name: str) -> bool:
        return name not in self._carried


def copy_tensor(writer, source: TensorSource, name: str, out_name: str | None = None) -> None:
    """Stream one tensor from ``source`` into ``writer`` block by block (renamed if asked)."""
    info = source.info(name)
    writer.begin(out_name or name, info.shape, info.dtype)
    for rows in row_blocks(info):
        writer.write_rows(source.get(name, rows))
    writer.end()


def block_shape(info: TensorInfo, rows: slice | None) -> tuple[int, ...]:
    """The shape of a row block of a tensor (the whole shape for ``None``)."""
    if rows is None:
        return info.shape
    return (rows.stop - rows.start, *info.shape[1:])


class SafetensorsShards(TensorSource):
    """Tensors spread over one or more safetensors files (HF layout or a single file)."""

    def __init__(
        self,
        label: str,
        shards: list[Path],
        files: dict[str, Path] | None = None,
        content: str = "model",
        manifest: dict | None = None,
        shard_names: dict[Path, str] | None = None,
    ):
        self.label = label
        self.content = content
        self.files = files or {}
        self.manifest = manifest or {}
        self._infos: dict[str, TensorInfo] = {}
        self._where: dict[str, Path] = {}
        self.metadata: dict[str, str] = {}
        for shard in shards:
            infos, metadata = read_header(shard)
            self.metadata.update(metadata)
            for name, info in infos.items():
                if name in self._infos:
                    raise InputError(f"{label}: tensor '{name}' appears in two shards")
                self._infos[name] = info
                self._where[name] = shard
        self._handles: dict[Path, HashedFile] = {}
        self._verified: set[Path] = set()
        self._shards = list(shards)
        self._shard_names = shard_names or {}
        self._identified = False
        if manifest is None and content == "model" and "content" in self.metadata:
            self.content = self.metadata["content"]  # a file we wrote says what it holds

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def tensor_file(self, name: str) -> Path | None:
        return self._where.get(name)

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        info = self._infos.get(name)
        if info is None:
            raise InputError(f"{self.label} has no tensor '{name}'")
        path = self._where[name]
        f = self._handles.get(path)
        if f is None:  # a blob is hashed to be checked, an input file to be identified
            blob = expected_digest(path) is not None
            hashing = verify_reads() if blob else not self._identified
            f = self._handles[path] = HashedFile(path, hashing)
        return read_tensor(f, info, rows)

    def digest(self, shard: Path) -> str | None:
        """The SHA-256 of one shard, hashed while it was read (the rest read now, a remote
        blob's skipped ranges included); None for an input not hashed (identified already)."""
        f = self._handles.get(shard)
        if f is not None:
            return f.finish()
        return sha256_file(shard) if shard.is_file() else None

    def file_digest(self, path: Path) -> str | None:
        if path not in self._shards or (self._identified and path not in self._handles):
            return None
        f = self._handles.get(path)
        if f is not None and not f.hashing:
            return None
        return self.digest(path)

    def identified(self) -> None:
        self._identified = True

    def verify(self) -> None:
        if not verify_reads():
            return
        for shard in self._shards:
            if shard in self._verified or expected_digest(shard) is None:
                continue
            rel = self._shard_names.get(shard, shard.name)
            digest = self.digest(shard)
            if digest is not None:
                check_digest(shard, digest, self.label, rel)
            self._verified.add(shard)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()


def shards_from_files(label: str, files: dict[str, Path], prefix: str = "model") -> list[Path]:
    """Find the weight shards among a directory's files, via the index when sharded."""
    index = files.get(f"{prefix}.safetensors.index.json")
    if index is not None:
        try:
            weight_map = json.loads(Path(index).read_text())["weight_map"]
        except RecursionError:
            raise InputError(f"{label}: {prefix}.safetensors.index.json nests too deeply") from None
        except (ValueError, KeyError, TypeError):
            raise InputError(
                f"{label}: {prefix}.safetensors.index.json is not a valid index"
            ) from None
        shards = []
        for rel in dict.fromkeys(weight_map.values()):
            if rel not in files:
                raise InputError(f"{label}: the index names a missing shard '{rel}'")
            shards.append(files[rel])
        return shards
    if f"{prefix}.safetensors" in files:
        return [files[f"{prefix}.safetensors"]]
    found = [p for rel, p in files.items() if rel.endswith(".safetensors") and "/" not in rel]
    if len(found) == 1:
        return found
    if not found:
        pickles = [rel for rel in files if "/" not in rel and rel.endswith((".bin", ".pt", ".pth"))]
        hint = (
            f" ({pickles[0]} is a pickle checkpoint, which compressor never loads; convert it "
            "to safetensors where you trust it, e.g. save_pretrained(OUT, safe_serialization=True))"
            if pickles
            else ""
        )
        raise InputError(f"{label} holds no .safetensors weights{hint}")
    raise InputError(f"{label} holds several .safetensors files and no index")


def directory_files(path: Path, recursive: bool = True) -> dict[str, Path]:
    """The regular files of a model directory by relative path (hidden ones left out).

    Subfolders (a sentence-transformers model's ``1_Pooling/``) come along as
    ``cp -r`` would take them. A symbolic link is followed only when it stays
    inside the directory, or points into the blob folder of a Hugging Face cache
    repository (the layout ``snapshots/REV/FILE -> ../../blobs/HASH``).
    """
    root = Path(path)
    real_root = root.resolve()
    allowed = [real_root]
    if real_root.parent.name == "snapshots":
        allowed.append(real_root.parent.parent / "blobs")
    out: dict[str, Path] = {}
    for p in sorted(root.rglob("*") if recursive else root.iterdir()):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_symlink():
            target = p.resolve()
            if not any(target == a or a in target.parents for a in allowed):
                raise InputError(
                    f"{root}: {rel.as_posix()} is a symbolic link to {target}, outside the "
                    "directory; copy the file in instead of linking it"
                )
        if p.is_file():
            out[rel.as_posix()] = p
    return out


def carried_files(files: dict[str, Path]) -> dict[str, Path]:
    """The files (config, tokenizer, module folders, ...) that travel with a model's weights:
    all but the top-level weights, which a method reads and rewrites."""
    return {
        rel: p
        for rel, p in files.items()
        if "/" in rel
        or not (rel.endswith(WEIGHT_SUFFIXES) or rel.endswith(".safetensors.index.json"))
    }


def open_safetensors_file(path: Path) -> SafetensorsShards:
    """A single ``.safetensors`` file as a source."""
    return SafetensorsShards(str(path), [path])


def open_model_dir(path: Path) -> SafetensorsShards:
    """A Hugging Face model directory (single file or sharded with an index)."""
    files = directory_files(path)
    if "adapter_model.safetensors" in files and "adapter_config.json" not in files:
        raise InputError(
            f"{path} holds adapter_model.safetensors but no adapter_config.json; "
            "a PEFT adapter needs its config (PEFT's save_pretrained writes both)"
        )
    shards = shards_from_files(str(path), files)
    source = SafetensorsShards(str(path), shards, carried_files(files))
    marker = files.get("compressor.json")  # a directory we exported says what it holds
    if marker is not None:
        try:
            content = json.loads(Path(marker).read_text()).get("content")
        except (ValueError, AttributeError, RecursionError):
            content = None
        if isinstance(content, str) and content != "model":
            source.content = content
    return source


class SourceReader:
    """An input format: ``detect(path)`` says whether it applies, ``open(path)`` reads it.

    A ``catch_all`` reader (the built-in "any directory", "any file") is tried only
    after every specific one, so a plugin's format for a new suffix is chosen first.
    """

    def __init__(self, name: str, summary: str, detect, open, catch_all: bool = False):
        self.name = name
        self.summary = summary
        self.detect = detect
        self.open = open
        self.catch_all = catch_all
