"""Content-addressed blob storage.

Every file of every artifact lives once, under the SHA-256 of its bytes. This
is the one place that knows where blobs are; a remote backend (an fsspec URL)
can implement the same four operations later.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

# unreferenced blobs younger than this are kept by gc: uploads awaiting their commit
GC_GRACE_SECONDS = 900


class LocalBlobStore:
    """Blobs as read-only files at ``ROOT/sha256/ab/<hex>``."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        """Where the blob with this digest lives (it may not exist)."""
        return self.root / "sha256" / digest[:2] / digest

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def put(self, src: Path, digest: str) -> None:
        """Move a finished, already hashed file into place atomically.

        If the blob exists already (same content), the source is dropped.
        """
        dest = self.path(digest)
        if dest.exists():
            os.unlink(src)
            os.utime(dest)  # stored again now: gc's grace period starts over
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(src, 0o444)
        os.utime(src)  # the time it was stored, for gc's grace period
        os.replace(src, dest)

    def stored_at(self, digest: str) -> float:
        """When the blob was last stored (seconds since the epoch)."""
        return self.path(digest).stat().st_mtime

    def list(self) -> Iterator[str]:
        """Digests of all blobs present."""
        base = self.root / "sha256"
        if not base.is_dir():
            return
        for sub in sorted(base.iterdir()):
            for f in sorted(sub.iterdir()):
                yield f.name

    def delete(self, digest: str) -> int:
        """Remove a blob; return the bytes freed."""
        p = self.path(digest)
        size = p.stat().st_size
        p.unlink()
        return size
