"""Streaming writer of sharded safetensors, hashed as written.

Tensors (or row blocks of one tensor) are written into the shard file as they
come, after a region reserved for the header; when the shard is full its
header is written into that region, padded with spaces (which the format
allows), and the file is hashed. Small shards, and the rare shard whose header
outgrows the reservation, are rewritten compactly instead, so small artifacts
carry no padding. Memory stays at one block; shard names follow the Hugging
Face convention once the shard count is known.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from compressor.io.safetensors import TensorInfo, encode_header, tensor_bytes
from compressor.sizes import DEFAULT_MAX_SHARD_SIZE, parse_size

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch

COPY_CHUNK = 1 << 23
HEADER_RESERVE = 1 << 17  # room for ~1000 tensor entries
COMPACT_BELOW = 1 << 26  # shards under 64 MB are rewritten without padding


@dataclass(frozen=True)
class StoredFile:
    """One finished file ready to commit to a store: where it is now, its hash and size."""

    relpath: str
    path: Path
    digest: str
    bytes: int


@dataclass
class _Shard:
    path: Path
    file: object  # open binary file, positioned after the reserved header region
    entries: list[TensorInfo] = field(default_factory=list)
    nbytes: int = 0


class ArtifactWriter:
    """Writes tensors into ``prefix.safetensors`` shards and other files in a directory.

    ``dtype`` casts floating-point tensors on the way out. Every shard's
    safetensors metadata holds ``format: pt`` (which transformers wants) and,
    for anything but a model, ``content`` (``delta``, ``adapter``, ...), so a
    file read back later says what its tensors are.
    """

    def __init__(
        self,
        directory: Path,
        *,
        prefix: str = "model",
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        dtype: torch.dtype | None = None,
        content: str = "model",
        hash_shards: bool = True,
    ):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_shard_bytes = parse_size(max_shard_size)
        self.dtype = dtype
        self.hash_shards = hash_shards  # off for exports: no store needs their digests
        self.metadata = (
            {"format": "pt"} if content == "model" else {"content": content, "format": "pt"}
        )
        self._shard: _Shard | None = None
        self._done_shards: list[tuple[Path, str, int, list[TensorInfo]]] = []
        self._files: dict[str, StoredFile] = {}
        self._names: set[str] = set()
        self._open_tensor: str | None = None

    # -- tensors --------------------------------------------------------------------

    def out_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a tensor of ``dtype`` is written as."""
        return self.dtype if self.dtype is not None and dtype.is_floating_point else dtype

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one whole tensor."""
        self.begin(name, tuple(tensor.shape), tensor.dtype)
        self.write_rows(tensor)
        self.end()

    def begin(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Start a tensor whose rows arrive in blocks through :meth:`write_rows`."""
        if self._open_tensor is not None:
            raise RuntimeError(f"tensor '{self._open_tensor}' is still open")
        if name in self._names:
            raise ValueError(f"tensor '{name}' written twice")
        dtype = self.out_dtype(dtype)
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        shard = self._shard
        if shard is not None and shard.entries and shard.nbytes + nbytes > self.max_shard_bytes:
            self._close_shard()
        if self._shard is None:
            path = self.dir / f".shard-{len(self._done_shards)}.data"
            f = open(path, "w+b")
            f.seek(8 + HEADER_RESERVE)
            self._shard = _Shard(path, f)
        self._names.add(name)
        self._open_tensor = name
        self._expect = TensorInfo(name, tuple(shape), dtype, 0, nbytes)
        self._written = 0

    def write_rows(self, block: torch.Tensor) -> None:
        """Append a block of rows (or the whole tensor) to the open tensor."""
        block = block.to(self._expect.dtype)
        raw = tensor_bytes(block)
        self._shard.file.write(raw)
        self._written += raw.nbytes

    def end(self) -> None:
        """Finish the open tensor; its byte count must match its shape."""
        info = self._expect
        if self._written != info.nbytes:
            raise RuntimeError(
                f"tensor '{info.name}': wrote {self._written} bytes, shape needs {info.nbytes}"
            )
        self._shard.entries.append(info)
        self._shard.nbytes += info.nbytes
        self._open_tensor = None

    def _close_shard(self) -> None:
        shard = self._shard
        index = len(self._done_shards)
        final = self.dir / f".shard-{index}.safetensors"
        header = encode_header(shard.entries, self.metadata)
        if shard.nbytes < COMPACT_BELOW or len(header) - 8 > HEADER_RESERVE:
            shard.file.close()
            digest, size = _hashed_copy([header], shard.path, final, skip=8 + HEADER_RESERVE)
            os.unlink(shard.path)
        else:
            shard.file.seek(0)
            shard.file.write(encode_header(shard.entries, self.metadata, pad_to=HEADER_RESERVE))
            shard.file.flush()
            os.fsync(shard.file.fileno())
            shard.file.close()
            os.replace(shard.path, final)
            digest, size = _hash_file(final) if self.hash_shards else ("", final.stat().st_size)
        self._done_shards.append((final, digest, size, shard.entries))
        self._shard = None

    # -- other files ----------------------------------------------------------------

    def add_file(self, relpath: str, source: Path | bytes) -> StoredFile:
        """Add a non-tensor file (config.json, tokenizer files, ...), copied and hashed."""
        dest = self.dir / relpath
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            digest, size = _hashed_copy([source], None, dest)
        else:
            digest, size = _hashed_copy([], Path(source), dest)
        self._files[relpath] = StoredFile(relpath, dest, digest, size)
        return self._files[relpath]

    def add_json(self, relpath: str, obj) -> None:
        """Add a JSON file written with sorted keys."""
        self.add_file(relpath, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    # -- finishing ------------------------------------------------------------------

    def entries(self) -> list[TensorInfo]:
        """Every tensor written so far into closed shards, in order."""
        return [e for *_, entries in self._done_shards for e in entries]

    def finish(self) -> list[StoredFile]:
        """Close the last shard, name shards the Hugging Face way, write the index."""
        if self._open_tensor is not None:
            raise RuntimeError(f"tensor '{self._open_tensor}' is still open")
        if self._shard is not None:
            self._close_shard()
        shards = self._done_shards
        weight_map = {}
        total = 0
        for i, (tmp, digest, size, entries) in enumerate(shards):
            if len(shards) == 1:
                relpath = f"{self.prefix}.safetensors"
            else:
                relpath = f"{self.prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            dest = self.dir / relpath
            os.replace(tmp, dest)
            self._files[relpath] = StoredFile(relpath, dest, digest, size)
            for e in entries:
                weight_map[e.name] = relpath
                total += e.nbytes
        if len(shards) > 1:
            self.add_json(
                f"{self.prefix}.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
            )
        return [self._files[k] for k in sorted(self._files)]


def _hash_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(COPY_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _hashed_copy(
    prefix: list[bytes], src: Path | None, dest: Path, skip: int = 0
) -> tuple[str, int]:
    """Write ``prefix`` then the bytes of ``src`` after ``skip`` to ``dest``; return SHA-256, size."""
    h = hashlib.sha256()
    size = 0
    with open(dest, "wb") as out:
        for chunk in prefix:
            h.update(chunk)
            out.write(chunk)
            size += len(chunk)
        if src is not None:
            with open(src, "rb") as f:
                f.seek(skip)
                while chunk := f.read(COPY_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return h.hexdigest(), size
