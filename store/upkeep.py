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

import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from compressor.errors import StoreError
from compressor.io.integrity import CHUNK
from compressor.store.blobs import GC_GRACE_SECONDS
from compressor.store.records import (
    ARTIFACT_COLUMNS,
    JSON_COLUMNS,
    MANIFEST_FILE,
    _dumps,
    _ExternalRow,
    _loads,
)

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
    listed: list[str] = field(default_factory=list)  # every blob's digest


def scan_manifests(blobs) -> ManifestScan:
    """Every intact manifest document in blob storage (with ``_digest`` and ``_bytes``),
    and the digests of blobs whose bytes do not match their name and that are not
    plainly safetensors files (so may have been manifests)."""
    scan = ManifestScan(listed=list(blobs.list()))
    for digest in scan.listed:
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


class Upkeep:
    """The store's upkeep, mixed into :class:`compressor.store.catalog.Store`: gc, verify,
    recover (and their helpers). It uses the store's connection, lock and blob storage."""

    def gc(
        self, force: bool = False, grace: float = GC_GRACE_SECONDS, drop_held: bool = False
    ) -> dict:
        """Delete unreferenced blobs and temp directories of dead processes.

        A blob stored less than ``grace`` seconds ago is kept even when no artifact
        lists it: it may be a plan worker's upload its driver has not committed yet.
        Blobs ``recover --force`` held (a damaged manifest may have named them) are
        kept unless ``drop_held``. With an empty catalog and blobs present the store
        looks damaged, not emptied, and gc refuses unless ``force``.
        """
        freed = blobs = tmps = young = 0
        cutoff = time.time() - grace
        with self.lock(exclusive=True):
            known = self.conn.execute("SELECT COUNT(*) FROM artifacts").fetchone()[0]
            stored = list(self.blobs.list())
            present = len(stored)
            if not known and present and not force:
                raise StoreError(
                    f"the catalog lists no artifact but {present} blob(s) are stored; if the "
                    "catalog was lost, run `compress store recover` instead; `store gc --force` "
                    f"deletes all {present} blob(s)"
                )
            for d in sorted(self.tmp_root.iterdir()):
                if _abandoned(d):
                    shutil.rmtree(d, ignore_errors=True)
                    tmps += 1
            tmps += self.blobs.sweep_uploads(cutoff)
            used = {r[0] for r in self.conn.execute("SELECT DISTINCT blob FROM files")}
            if drop_held:
                self.conn.execute("DELETE FROM held_blobs")
            held = {r[0] for r in self.conn.execute("SELECT blob FROM held_blobs")}
            used |= held
            for digest in stored:
                if digest in used:
                    continue
                if grace > 0 and self.blobs.stored_at(digest) > cutoff:
                    young += 1
                    continue
                freed += self.blobs.delete(digest)
                blobs += 1
            drop_stale_tombstones(self.root, self.blobs)
        return {
            "blobs_removed": blobs,
            "bytes_freed": freed,
            "tmp_dirs_removed": tmps,
            "blobs_kept_young": young,
            "blobs_held": len(held),
        }

    def verify(self) -> list[str]:
        """Re-hash every referenced blob; return a list of problems (empty if sound)."""
        problems = []
        check = self.conn.execute("PRAGMA integrity_check").fetchone()[0]
        if check != "ok":
            problems.append(f"store.db integrity check: {check}")
        for row in self.db["artifacts"].rows:
            for column in JSON_COLUMNS:
                try:
                    _loads(row, column)
                except StoreError as e:
                    problems.append(str(e).removesuffix(" (run `compress store verify`)"))
        for r in self.db.query("SELECT DISTINCT blob, bytes FROM files ORDER BY blob"):
            digest = r["blob"]
            if not self.blobs.exists(digest):
                problems.append(f"missing blob {digest}")
            elif (size := self.blobs.size(digest)) != r["bytes"]:
                problems.append(f"blob {digest} has {size} bytes, expected {r['bytes']}")
            elif self._hash_blob(digest) != digest:
                problems.append(f"blob {digest} does not match its hash")
        self.blobs.prune_cache()  # a damaged local copy of a remote blob is dropped, not reported
        unknown = self.unreferenced_blobs()
        if unknown and not self.conn.execute("SELECT 1 FROM files LIMIT 1").fetchone():
            problems.append(
                f"{len(unknown)} blob(s) are stored but the catalog lists none: the catalog "
                "may have been lost (`compress store recover` rebuilds it)"
            )
        return problems

    def recover(self, force: bool = False) -> dict:
        """Rebuild a lost catalog from the ``manifest.json`` blobs its artifacts left.

        Names, versions, parameters, metrics at creation, files and lineage come back;
        metrics added later by ``eval`` do not (they lived in the catalog only), and an
        artifact removed with ``store rm`` stays removed (its tombstone). A damaged blob
        that may have been a manifest stops the recovery, the store left as it was,
        unless ``force``: then the other artifacts come back and every blob none of
        them names is held from gc, since the damaged manifest may have named it.
        """
        with self.lock(exclusive=True):
            if self.conn.execute("SELECT COUNT(*) FROM artifacts").fetchone()[0]:
                raise StoreError(
                    "the catalog lists artifacts; recover rebuilds only a lost or empty catalog"
                )
            scan = scan_manifests(self.blobs)
            if scan.damaged and not force:
                self._forget_created_catalog()
                shown = ", ".join(d[:12] for d in scan.damaged[:3])
                more = f" and {len(scan.damaged) - 3} more" if len(scan.damaged) > 3 else ""
                raise StoreError(
                    f"{len(scan.damaged)} blob(s) do not match their hash and may be artifact "
                    f"manifests ({shown}{more}); nothing was recovered. `compress store recover "
                    "--force` recovers the other artifacts and keeps every blob none of them "
                    "names from gc"
                )
            removed = tombstones(self.root)
            docs = [d for d in scan.manifests if d.get("id") not in removed]
            docs.sort(key=lambda d: d.get("created") or "")
            with self._transaction():
                missing = sum(map(self._insert_recovered, docs))
                for doc in scan.manifests:  # a removed version's number is not reused either
                    self._note_version(doc)
                named = set().union(*map(manifest_blobs, scan.manifests))
                held = [d for d in scan.listed if d not in named] if scan.damaged else []
                self.db["held_blobs"].insert_all(
                    {"blob": d, "reason": "recover --force: a damaged manifest may name it"}
                    for d in held
                )
            ids = {d["id"] for d in docs}
            dangling = sum(any(p.get("id") not in ids for p in d.get("parents", [])) for d in docs)
        return {
            "artifacts": len(docs),
            "missing_blobs": missing,
            "removed": len(scan.manifests) - len(docs),
            "damaged": len(scan.damaged),
            "held": len(held),
            "lost_parents": dangling if scan.damaged else 0,
        }

    def _insert_recovered(self, doc: dict) -> int:
        """One manifest's rows; returns how many of its blobs are missing."""
        for ext in doc.get("externals", []):
            self._upsert_external(_ExternalRow(**ext), doc.get("created"))
        row = {k: doc.get(k) for k in ARTIFACT_COLUMNS}
        row.update({k: _dumps(doc.get(k) or {}) for k in JSON_COLUMNS})
        self.db["artifacts"].insert(row)
        files = dict(doc["files"])
        files[MANIFEST_FILE] = {"blob": doc["_digest"], "bytes": doc["_bytes"]}
        self.db["files"].insert_all(
            {"artifact": doc["id"], "path": rel, **f} for rel, f in files.items()
        )
        self.db["parents"].insert_all(
            {"child": doc["id"], "position": i, "parent": p["id"], "role": p["role"]}
            for i, p in enumerate(doc.get("parents", []))
        )
        return sum(not self.blobs.exists(f["blob"]) for f in files.values())

    def _note_version(self, doc: dict) -> None:
        if doc.get("name"):
            self.conn.execute(
                "INSERT INTO name_versions (name, last) VALUES (?, ?) ON CONFLICT(name) "
                "DO UPDATE SET last = MAX(last, excluded.last)",
                [doc["name"], doc["version"]],
            )

    def _forget_created_catalog(self) -> None:
        """Remove the empty catalog this open created, so a refused recover leaves no trace."""
        if self.created_catalog:
            self.conn.close()
            for suffix in ("", "-wal", "-shm"):
                (self.root / f"store.db{suffix}").unlink(missing_ok=True)
            self.conn = sqlite3.connect(":memory:", isolation_level=None)

    def _hash_blob(self, digest: str) -> str:
        """SHA-256 of a blob's bytes as its storage holds them, read in chunks."""
        h = hashlib.sha256()
        with self.blobs.open(digest) as f:
            while block := f.read(CHUNK):
                h.update(block)
        return h.hexdigest()

    def unreferenced_blobs(self) -> list[str]:
        """Digests of blobs no artifact lists (left by `store rm` until the next gc)."""
        used = {r[0] for r in self.conn.execute("SELECT DISTINCT blob FROM files")}
        return [d for d in self.blobs.list() if d not in used]


def _abandoned(tmp: Path) -> bool:
    """True when no live process holds the temp directory's lock."""
    lock = tmp / ".lock"
    if not lock.exists():
        return True
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True
