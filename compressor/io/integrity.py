"""Hashes taken while files are read: damaged store blobs are caught, inputs identified.

A store blob lives at ``.../sha256/ab/<hex>``, named by the SHA-256 of its bytes,
so whoever reads one knows what it must hash to. :class:`HashedFile` hashes a
file as its bytes are read (in any order: a gap is hashed when a later read
skips over it), so verifying a blob costs the one pass the read makes anyway;
:meth:`HashedFile.finish` hashes what was never read and returns the digest.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from compressor.errors import InputError, StoreError

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch

_BLOB_NAME = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 23
RANGED_CATCH_UP = 1 << 20  # a remote blob's gap hashed on the way (a header); more waits for finish


def verify_reads() -> bool:
    """Whether store blobs are hash-checked as read (``COMPRESSOR_VERIFY_READS=0`` turns it
    off: to salvage what a damaged store still holds, or to measure what checking costs)."""
    return os.environ.get("COMPRESSOR_VERIFY_READS", "1") != "0"


def expected_digest(path: Path) -> str | None:
    """The SHA-256 a store blob must have (its name), or None for any other file."""
    path = Path(path)
    name = path.name
    if (
        _BLOB_NAME.match(name)
        and path.parent.name == name[:2]
        and path.parent.parent.name == "sha256"
    ):
        return name
    return None


_REMOTE_BLOBS: dict[Path, object] = {}  # cache root -> the remote blob store it mirrors


def register_remote_blobs(cache: Path, blobs) -> None:
    """Blob paths below ``cache`` name objects of ``blobs`` (an FsspecBlobStore): a path
    not copied there yet is read from the backend, by ranges."""
    _REMOTE_BLOBS[Path(cache)] = blobs


def open_read(path: Path, ahead: bool = True):
    """``(file, size, ranged)`` for a path to read: a local file, or a remote blob's object
    (``ranged``: reads fetch only their bytes, so skipping over a gap costs nothing; without
    ``ahead`` not a byte more, for reads that are not followed by the next bytes)."""
    path = Path(path)
    digest = expected_digest(path)
    if digest is not None and not path.is_file():
        blobs = _REMOTE_BLOBS.get(path.parent.parent.parent)
        if blobs is not None:
            return blobs.open(digest, ahead), blobs.size(digest), True
    return open(path, "rb"), path.stat().st_size, False


class DamagedBlobError(StoreError):
    """A stored file's bytes no longer match their hash."""


def damaged(label: str, relpath: str) -> DamagedBlobError:
    return DamagedBlobError(
        f"{label}: the stored file {relpath} is damaged (its bytes do not match their hash); "
        "run `compress store verify`"
    )


def check_digest(path: Path, digest: str, label: str, relpath: str) -> None:
    """Raise when ``path`` is a store blob and ``digest`` (of its bytes) is not its name."""
    want = expected_digest(path)
    if want is not None and want != digest and verify_reads():
        raise damaged(label, relpath)


def read_checked(path: Path, label: str, relpath: str) -> bytes:
    """A small file's bytes, checked against its hash when it is a store blob."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {relpath} of {label}: {e.strerror}") from None
    check_digest(path, hashlib.sha256(data).hexdigest(), label, relpath)
    return data


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


class HashedFile:
    """An open binary file whose bytes are hashed as they are read."""

    def __init__(self, path: Path, hashing: bool = True):
        self.path = Path(path)
        self.hashing = hashing
        self.name = str(path)
        self.file, self.size, self.ranged = open_read(path)
        self._hash = hashlib.sha256()
        self._done = 0  # bytes [0, _done) are in the hash
        self._digest: str | None = None

    def read_into(self, offset: int, buf: torch.Tensor) -> int:
        """Read ``buf.numel()`` bytes at ``offset`` into a uint8 tensor; return the count."""
        if self.hashing and offset > self._done:
            if self.ranged and offset - self._done > RANGED_CATCH_UP:
                self.hashing = False  # fetching the gap now moves it twice; finish hashes it all
            else:
                self._catch_up(offset)
        self.file.seek(offset)
        n = self.file.readinto(buf.numpy()) if buf.numel() else 0
        end = offset + n
        if self.hashing and self._digest is None and offset <= self._done < end:
            self._hash.update(buf.numpy()[self._done - offset : n])
            self._done = end
        return n

    def _catch_up(self, upto: int) -> None:
        self.file.seek(self._done)
        while self._done < upto:
            block = self.file.read(min(CHUNK, upto - self._done))
            if not block:
                break
            self._hash.update(block)
            self._done += len(block)

    def finish(self) -> str | None:
        """Hash whatever was not read yet; return the file's SHA-256, or None when the
        file is not hashed (an input already identified). A remote blob read in part is
        fetched whole here, once: every byte that goes into a result is checked, at the
        cost of moving the bytes the ranged reads skipped."""
        if self._digest is None and not self.hashing and self.ranged and verify_reads():
            self.hashing, self._done, self._hash = True, 0, hashlib.sha256()
        if not self.hashing:
            return None
        if self._digest is None:
            self._catch_up(self.size)
            self._digest = self._hash.hexdigest()
        return self._digest

    def close(self) -> None:
        self.file.close()
