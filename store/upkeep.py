"""What a store keeps beside its catalog so a lost catalog comes back right.

Two things: *tombstones*, one small file per artifact removed with ``store rm``
(``STORE/removed/<id>.json``), so that ``store recover`` does not bring a removed
artifact back while its manifest blob waits for gc; and the *manifest scan* that
recover reads, which tells an intact manifest from a damaged blob that may have
been one. Choices: tombstones live in the store's directory, not in blob storage
(they are mutable and tiny; gc drops one once its manifest blob is gone); the scan
hashes every blob that is not plainly a safetensors file, so a manifest damaged
anywhere, its first byte included, is reported rather than skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

TOMBSTONES = "removed"
MANIFEST_FORMAT = "compressor-artifact/1"
MAX_MANIFEST_BYTES = 64 << 20


def write_tombstone(root: Path, artifact_id: str, manifest_blob: str | None, label: str) -> None:
    """Record that an artifact was removed (atomically: a whole file or none)."""
    folder = Path(root) / TOMBSTONES
    folder.mkdir(exist_ok=True)
    tmp = folder / f".{artifact_id}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"id": artifact_id, "label": label, "manifest": manifest_blob}))
    os.replace(tmp, folder / f"{artifact_id}.json")


def tombstones(root: Path) -> dict[str, dict]:
    """The removed artifacts' tombstones by id; an unreadable one still counts by its name."""
    folder = Path(root) / TOMBSTONES
    found = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            doc = {}
        found[path.stem] = doc if isinstance(doc, dict) else {}
    return found


def drop_stale_tombstones(root: Path, blobs) -> int:
    """Remove the tombstones whose manifest blob gc has deleted; return how many."""
    dropped = 0
    for artifact_id, doc in tombstones(root).items():
        manifest = doc.get("manifest")
        if not manifest or not blobs.exists(manifest):
            (Path(root) / TOMBSTONES / f"{artifact_id}.json").unlink(missing_ok=True)
            dropped += 1
    return dropped


@dataclass
class ManifestScan:
    """What recover found among the blobs: intact manifests and damaged blobs."""

    manifests: list[dict] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)


def scan_manifests(blobs) -> ManifestScan:
    """Every intact manifest document in blob storage (with ``_digest`` and ``_bytes``),
    and the digests of blobs whose bytes do not match their name and that are not
    plainly safetensors files (so may have been manifests)."""
    scan = ManifestScan()
    for digest in blobs.list():
        size = blobs.size(digest)
        if size > MAX_MANIFEST_BYTES:
            continue
        with blobs.open(digest) as f:
            head = f.read(9)
            if _safetensors_head(head, size):
                continue
            data = head + f.read()
        if hashlib.sha256(data).hexdigest() != digest:
            scan.damaged.append(digest)
            continue
        doc = _manifest(data)
        if doc is not None:
            scan.manifests.append({**doc, "_digest": digest, "_bytes": len(data)})
    return scan


def _safetensors_head(head: bytes, size: int) -> bool:
    """True when the first bytes are a safetensors length prefix and a JSON header start."""
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 8 + n <= size and head[8:9] == b"{"


def _manifest(data: bytes) -> dict | None:
    """The manifest document in a blob's bytes, or None when the blob is something else."""
    if not data.startswith(b"{") or MANIFEST_FORMAT.encode() not in data:
        return None
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        return None
    return doc


def manifest_blobs(doc: dict) -> set[str]:
    """The blobs a manifest names, its own included."""
    files = doc.get("files") if isinstance(doc.get("files"), dict) else {}
    named = {f.get("blob") for f in files.values() if isinstance(f, dict)}
    return {b for b in named if isinstance(b, str)} | {doc["_digest"]}
