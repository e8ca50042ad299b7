"""Content-addressed blob storage.

Every file of every artifact lives once, under the SHA-256 of its bytes. This is
the one place that knows where blobs are. Two backends share one interface
(``put``, ``open``, ``exists``, ``size``, ``list``, ``delete``, ``stored_at``):
the store's local directory, and any fsspec URL (``s3://bucket/prefix`` through
s3fs, ``gs://``, ``file://`` on a shared mount) for storage shared past one
machine. Both publish an object under its final key only whole.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from compressor.errors import StoreError, UsageError

# unreferenced blobs younger than this are kept by gc: uploads awaiting their commit
GC_GRACE_SECONDS = 900
READ_BLOCK = 1 << 20  # remote reads fetch at most this many bytes beyond what they asked for


def blob_key(digest: str) -> str:
    """A blob's place below the storage root: ``sha256/ab/<hex>``."""
    return f"sha256/{digest[:2]}/{digest}"


class LocalBlobStore:
    """Blobs as read-only files at ``ROOT/sha256/ab/<hex>``."""

    remote = False

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = str(self.root)

    def path(self, digest: str) -> Path:
        """Where the blob with this digest lives (it may not exist)."""
        return self.root / blob_key(digest)

    def local(self, digest: str) -> Path:
        """A local file holding the blob's bytes (here: the blob itself)."""
        return self.path(digest)

    def open(self, digest: str, ahead: bool = True):
        return open(self.path(digest), "rb")

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

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

    def sweep_uploads(self, cutoff: float) -> int:
        """Uploads a crash left behind (none here: local blobs are staged in ``tmp/``)."""
        return 0

    def prune_cache(self) -> int:
        """Damaged local copies of remote blobs (none here: there is no cache)."""
        return 0


class FsspecBlobStore:
    """Blobs as objects at ``URL/sha256/ab/<hex>`` on any fsspec filesystem.

    An upload goes to ``URL/tmp/<random>`` and is published by one server-side
    copy to its final key, so a crash never leaves a partial object there.
    Reads are ranged: :meth:`open` returns a seekable file that fetches only the
    bytes asked for. :meth:`local` copies a (small) blob into ``cache`` for code
    that needs a path; ``path`` names that copy, whose layout matches the local
    store's, so the blob's digest is still known from its name.
    """

    remote = True

    def __init__(self, url: str, cache: Path):
        self.url = url.rstrip("/")
        self.cache = Path(cache)
        self.fs, self.prefix = filesystem(self.url)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.mounted = "file" in protocols  # a directory (a shared mount): it has real dirs
        self.fetched = 0  # bytes read from the backend by this process (benchmarks)

    def check_reachable(self) -> None:
        """Raise StoreError in one line unless the URL's bucket (or mount) is there and
        this process may list it (a store's URL is checked once, when it is recorded)."""
        root = self.prefix if self.mounted else self.prefix.split("/", 1)[0]
        try:
            found = self.fs.exists(root) if not self.mounted else True
        except (OSError, ValueError) as e:
            raise StoreError(f"cannot reach the blob storage at {self.url}: {e}") from None
        if not found:
            raise StoreError(
                f"the blob storage at {self.url} cannot be used: its bucket '{root}' does not "
                "exist (create it first)"
            )

    def key(self, digest: str) -> str:
        return f"{self.prefix}/{blob_key(digest)}"

    def path(self, digest: str) -> Path:
        return self.cache / blob_key(digest)

    def local(self, digest: str) -> Path:
        """The blob copied to the local cache (once; a whole file, for small blobs)."""
        dest = self.path(digest)
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{digest}.{uuid.uuid4().hex[:8]}")
            self._call("fetch", digest, self.fs.get_file, self.key(digest), str(tmp))
            self.fetched += tmp.stat().st_size
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)
        return dest

    def open(self, digest: str, ahead: bool = True):
        """A seekable read-only file over the object; each read fetches its own range (and,
        with ``ahead``, up to READ_BLOCK bytes beyond it for the reads that follow)."""
        cache = (
            {"block_size": READ_BLOCK, "cache_type": "readahead"}
            if ahead
            else {"cache_type": "none"}
        )
        f = self._call("read", digest, self.fs.open, self.key(digest), "rb", **cache)
        return _CountedFile(f, self)

    def exists(self, digest: str) -> bool:
        return bool(self._call("check", digest, self.fs.exists, self.key(digest)))

    def size(self, digest: str) -> int:
        return int(self._call("check", digest, self.fs.info, self.key(digest))["size"])

    def put(self, src: Path, digest: str) -> None:
        """Upload a finished, already hashed file to a temporary key, then publish it
        under its final key by one copy. A blob already there is not uploaded again, but
        its modification time is refreshed, so gc's grace period starts over for it."""
        final = self.key(digest)
        if not self._refreshed(digest):
            tmp = f"{self.prefix}/tmp/{digest}.{uuid.uuid4().hex}"
            if self.mounted:  # object stores have no directories to make
                self.fs.makedirs(f"{self.prefix}/tmp", exist_ok=True)
                self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            self._call("store", digest, self.fs.put_file, str(src), tmp)
            try:  # a rename on a mount; on object storage a server-side copy, then delete
                self._call("store", digest, self.fs.mv, tmp, final)
            except BaseException:
                if self.fs.exists(tmp):  # else gc sweeps it
                    self.fs.rm_file(tmp)
                raise
        os.unlink(src)

    def _refreshed(self, digest: str) -> bool:
        """Give an existing object a new modification time; False if there is none.

        A mount touches the file; S3 copies the object onto itself with new metadata
        (server-side, no bytes move), which is how S3 renews LastModified. A backend
        with neither, or an object S3 will not copy, keeps its old time: the driver's
        commit still checks every blob is there, under the store lock gc takes
        exclusively, so a blob gc removed fails its step instead of the artifact."""
        key = self.key(digest)
        if not self.exists(digest):
            return False
        try:
            if self.mounted:
                self._call("refresh", digest, os.utime, key)
            elif hasattr(self.fs, "setxattr"):
                self._call("refresh", digest, self.fs.setxattr, key, stored=f"{time.time():.0f}")
        except StoreError:  # S3 will not copy an object over 5 GB onto itself
            if not self.exists(digest):
                return False  # gc removed it since: upload it again
        self.fs.invalidate_cache(key)
        return True

    def stored_at(self, digest: str) -> float:
        return _modified(self._call("check", digest, self.fs.info, self.key(digest)))

    def list(self) -> Iterator[str]:
        try:
            found = self.fs.find(f"{self.prefix}/sha256")
        except FileNotFoundError:
            return
        except OSError as e:
            raise StoreError(f"cannot list the blobs at {self.url}: {e}") from None
        for key in sorted(found):
            yield key.rsplit("/", 1)[-1]

    def delete(self, digest: str) -> int:
        size = self.size(digest)
        self._call("delete", digest, self.fs.rm_file, self.key(digest))
        self.path(digest).unlink(missing_ok=True)
        return size

    def prune_cache(self) -> int:
        """Delete cached copies whose bytes no longer match their name (fetched again when
        next needed); return how many."""
        from compressor.io.integrity import sha256_file

        pruned = 0
        for copy in sorted(self.cache.glob("sha256/*/*")):
            if copy.is_file() and sha256_file(copy) != copy.name:
                copy.unlink()
                pruned += 1
        return pruned

    def sweep_uploads(self, cutoff: float) -> int:
        """Delete temporary upload keys older than ``cutoff`` (left by a crashed worker)."""
        try:
            found = self.fs.find(f"{self.prefix}/tmp", detail=True)
        except (FileNotFoundError, OSError):
            return 0
        swept = 0
        for key, info in found.items():
            if _modified(info) < cutoff:
                self.fs.rm_file(key)
                swept += 1
        return swept

    def _call(self, what: str, digest: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise StoreError(f"blob {digest} is missing from {self.url}") from None
        except (OSError, ValueError) as e:
            raise StoreError(f"cannot {what} blob {digest} at {self.url}: {e}") from None


class _CountedFile:
    """An fsspec file that adds the bytes it fetched to its store's count when closed."""

    def __init__(self, f, owner: FsspecBlobStore):
        self.f = f
        self.owner = owner

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def read(self, n: int = -1) -> bytes:
        return self.f.read(n)

    def readinto(self, buf) -> int:
        return self.f.readinto(buf)

    def close(self) -> None:
        cache = getattr(self.f, "cache", None)
        self.owner.fetched += getattr(cache, "total_requested_bytes", 0)
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _modified(info: dict) -> float:
    """An fsspec info entry's modification time (s3fs, gcsfs and local name it differently)."""
    when = info.get("LastModified") or info.get("mtime") or info.get("updated") or 0
    if isinstance(when, str):
        from datetime import datetime

        when = datetime.fromisoformat(when.replace("Z", "+00:00"))
    return when.timestamp() if hasattr(when, "timestamp") else float(when)


def filesystem(url: str):
    """The fsspec filesystem and root path an URL names; one line when its extra is missing."""
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    try:
        import fsspec
    except ImportError:
        raise UsageError(
            f"blob storage at {url} needs fsspec: pip install 'compressor[s3]'"
        ) from None
    try:
        # other processes add and delete objects: no listing may be answered from a cache
        fs, root = fsspec.core.url_to_fs(url, use_listings_cache=False, skip_instance_cache=True)
    except ImportError:
        package = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}.get(scheme, scheme)
        extra = "pip install 'compressor[s3]'" if package == "s3fs" else f"pip install {package}"
        raise UsageError(f"blob storage at {url} needs {package}: {extra}") from None
    except ValueError as e:
        raise UsageError(f"blob storage URL {url}: {e}") from None
    return fs, root.rstrip("/")
