"""The artifact catalog: SQLite rows over content-addressed blobs.

Writers put files in a per-process temp directory, move finished blobs into
place under a shared lock, then add all rows in one ``BEGIN IMMEDIATE``
transaction. Readers never see half an artifact; ``gc`` takes the lock
exclusively so it never deletes a blob that is about to be committed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import sqlite_utils

from compressor.errors import RefError, StoreError
from compressor.io.integrity import expected_digest, register_remote_blobs
from compressor.io.writer import StoredFile
from compressor.store.blobs import FsspecBlobStore, LocalBlobStore
from compressor.store.migrations import migrations
from compressor.store.records import (
    CONFIG_FILE,
    HEX_ID,
    JSON_COLUMNS,
    MANIFEST_FILE,
    ArtifactRecord,
    _dumps,
    _loads,
    _now,
    check_name,
)
from compressor.store.upkeep import MANIFEST_FORMAT, Upkeep, write_tombstone


class Store(Upkeep):
    """An on-disk artifact store: ``store.db``, ``blobs/`` and ``tmp/``."""

    view = False  # a worker's in-memory slice of the catalog (see :meth:`worker_view`)
    read_only = False  # opened by a process that may not write it (see :meth:`check_writable`)

    def __init__(self, root: Path, recovering: bool = False, blobs: str | None = None):
        self.root = Path(root)
        self.blobs = self._blob_store(blobs)
        self.tmp_root = self.root / "tmp"
        self.lock_path = self.root / "lock"
        db_path = self.root / "store.db"
        lost = not db_path.exists() or db_path.stat().st_size == 0
        self.created_catalog = lost
        if lost and not recovering and next(self.blobs.list(), None) is not None:
            raise StoreError(
                f"the store at {self.root} holds blobs but its catalog (store.db) is missing or "
                "empty: it is damaged, not new; `compress store recover` rebuilds the catalog "
                "from the artifacts' manifests"
            )
        if lost:
            try:
                self.tmp_root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create the store at {self.root}: {e.strerror}") from None
        self.read_only = not lost and not _writable(self.root, db_path)
        try:
            if self.read_only:
                self.conn = _read_only_connection(db_path)
            else:
                self.conn = sqlite3.connect(db_path, timeout=120, isolation_level=None)
            self.conn.execute("PRAGMA busy_timeout = 120000")
            self.db = sqlite_utils.Database(self.conn)
            if not self.read_only and migrations.pending(self.db):
                with self.lock(exclusive=True):
                    if self.conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                        self.conn.execute("PRAGMA journal_mode = WAL")
                    migrations.apply(self.db)
        except sqlite3.DatabaseError as e:
            if getattr(self, "conn", None) is not None:
                self.conn.close()  # a store that failed to open holds no file open
            raise _catalog_error(e, db_path, "cannot be read") from None

    def close(self) -> None:
        self.conn.close()

    def _blob_store(self, url: str | None):
        """The store's blob storage: its ``blobs/`` directory, or the fsspec URL its
        config names. A URL given to a store that has none is recorded in its config,
        unless blobs are stored locally already (a store keeps one blob storage)."""
        config_path = self.root / CONFIG_FILE
        try:
            config = json.loads(config_path.read_text()) if config_path.exists() else {}
        except (OSError, ValueError) as e:
            raise StoreError(f"the store's {config_path} cannot be read: {e}") from None
        if url and "://" not in url:
            url = str(Path(url).expanduser().resolve())
        url = url.rstrip("/") if url else url
        configured = config.get("blobs")
        if url and configured and url != configured:
            raise StoreError(f"the store at {self.root} keeps its blobs at {configured}, not {url}")
        local = self.root / "blobs"
        if url and not configured and next(LocalBlobStore(local).list(), None) is not None:
            raise StoreError(
                f"the store at {self.root} keeps its blobs in {local}; its blob storage is "
                "chosen when it is created (use a new --store for --blobs)"
            )
        blobs = _blob_backend(self.root, url or configured)
        if blobs.remote and not configured:  # recorded once the URL opened (extra installed)
            blobs.check_reachable()
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = config_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**config, "blobs": url}, indent=2) + "\n")
            os.replace(tmp, config_path)
        return blobs

    @classmethod
    def worker_view(cls, root: Path, blobs: str | None, rows: dict[str, list[dict]]) -> Store:
        """A plan worker's store: the catalog rows its step reads (:meth:`catalog_slice`)
        in memory, blobs from the driver's storage, temp space under ``root``. It never
        opens ``store.db`` and cannot commit; with remote blobs ``root`` is any scratch
        directory of the worker's machine."""
        st = cls.__new__(cls)
        st.view = True
        st.root = Path(root)
        st.root.mkdir(parents=True, exist_ok=True)
        st.blobs = _blob_backend(st.root, blobs)
        st.tmp_root = st.root / "tmp"
        st.lock_path = st.root / "lock"
        st.conn = sqlite3.connect(":memory:", isolation_level=None)
        st.db = sqlite_utils.Database(st.conn)
        migrations.apply(st.db)
        for table, table_rows in rows.items():
            st.db[table].insert_all(table_rows)
        return st

    def catalog_slice(self, ids: list[str], paths: list[str] = ()) -> dict[str, list[dict]]:
        """The rows a worker's step over these artifacts reads: the artifacts and their
        ancestors (decoding opens parents), the artifacts made from all of them together
        (the step may remake one: reuse), and the digests known for files under ``paths``."""
        keep: set[str] = set()
        frontier = list(ids)
        while frontier:
            artifact_id = frontier.pop()
            if artifact_id not in keep:
                keep.add(artifact_id)
                frontier += [
                    r[0]
                    for r in self.conn.execute(
                        "SELECT parent FROM parents WHERE child = ?", [artifact_id]
                    )
                ]
        if ids:
            made = set(self.children(ids[0]))
            for artifact_id in ids[1:]:
                made &= set(self.children(artifact_id))
            keep |= made
        marks = ",".join("?" * len(keep))
        rows = {
            "artifacts": self.db.query(
                f"SELECT * FROM artifacts WHERE id IN ({marks})", list(keep)
            ),
            "files": self.db.query(f"SELECT * FROM files WHERE artifact IN ({marks})", list(keep)),
            "parents": self.db.query(f"SELECT * FROM parents WHERE child IN ({marks})", list(keep)),
            "input_digests": [
                r
                for p in paths
                for r in self.db.query(
                    "SELECT * FROM input_digests WHERE path = ? OR path LIKE ?", [p, f"{p}/%"]
                )
            ],
        }
        return {table: list(found) for table, found in rows.items()}

    # -- locking and temp space -------------------------------------------------

    def check_writable(self) -> None:
        """Refuse a write to a store this process may only read."""
        if self.read_only:
            raise StoreError(
                f"the store at {self.root} is read-only here (its files or filesystem do not "
                "let this user write); reading it works, this command would write to it"
            )

    @contextlib.contextmanager
    def lock(self, exclusive: bool) -> Iterator[None]:
        """Hold the store lock: shared while committing, exclusive for gc."""
        self.check_writable()
        with open(self.lock_path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def tmp_dir(self) -> Iterator[Path]:
        """A private temp directory, removed on exit; a crash leaves it for gc.

        The directory's ``.lock`` stays locked while its process lives, which is
        how gc tells an abandoned directory from a busy one.
        """
        d = self.tmp_root / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with self.lock(exclusive=False):  # gc must not see it before it is locked
            d.mkdir(parents=True)
            lock = open(d / ".lock", "w")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
            lock.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.check_writable()
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
        except sqlite3.OperationalError as e:
            raise _catalog_error(e, self.root / "store.db", "cannot be written") from None

    # -- writing ------------------------------------------------------------------

    def commit(
        self,
        files: list[StoredFile],
        *,
        kind: str,
        content: str,
        name: str | None,
        plugin: str | None = None,
        method_version: str | None = None,
        params: dict | None = None,
        metrics: dict | None = None,
        manifest: dict | None = None,
        parents: list[tuple[str, str]] = (),
        externals: list = (),
    ) -> ArtifactRecord:
        """Move the files into blobs and add the artifact in one transaction.

        ``parents`` are (artifact id, role) pairs; ``externals`` are input paths
        (objects with id, path, fingerprint, content, bytes) recorded alongside.
        """
        if self.view:
            raise StoreError("a plan worker's view of the catalog cannot commit")
        if name is not None:
            check_name(name)
        artifact_id = uuid.uuid4().hex
        row = {
            "id": artifact_id,
            "name": name,
            "version": None,
            "kind": kind,
            "content": content,
            "plugin": plugin,
            "method_version": method_version,
            "params": _dumps(params or {}),
            "metrics": _dumps(metrics or {}),
            "manifest": _dumps(manifest or {}),
            "bytes": sum(f.bytes for f in files),
            "created": _now(),
            "path": None,
        }
        with self.lock(exclusive=False):
            self._publish(files)
            with self._transaction():
                for ext in externals:
                    self._upsert_external(ext, row["created"])
                if name is not None:
                    last = self.conn.execute(
                        "SELECT last FROM name_versions WHERE name = ?", [name]
                    ).fetchone()
                    row["version"] = (last[0] if last else 0) + 1
                    self.conn.execute(
                        "INSERT OR REPLACE INTO name_versions (name, last) VALUES (?, ?)",
                        [name, row["version"]],
                    )
                described = self._put_manifest(row, files, parents, externals)
                self.db["artifacts"].insert(row)
                self.db["files"].insert_all(
                    {"artifact": artifact_id, "path": f.relpath, "blob": f.digest, "bytes": f.bytes}
                    for f in [*files, described]
                )
                self.db["parents"].insert_all(
                    {"child": artifact_id, "position": i, "parent": pid, "role": role}
                    for i, (pid, role) in enumerate(parents)
                )
        return self.get(artifact_id)

    def publish(self, files: list[StoredFile]) -> list[StoredFile]:
        """Move finished files into blobs without cataloguing them (a plan's worker does
        this; the driver commits the returned files later). Until then they are
        unreferenced blobs, which gc keeps for its grace period."""
        with self.lock(exclusive=False):
            self._publish(files)
        return [StoredFile(f.relpath, self.blobs.path(f.digest), f.digest, f.bytes) for f in files]

    def _publish(self, files: list[StoredFile]) -> None:
        """Store finished files; a file already published (a worker's, named by its
        digest, wherever that worker kept it) must be in blob storage."""
        for f in files:
            if expected_digest(Path(f.path)) != f.digest:
                self.blobs.put(f.path, f.digest)
            elif not self.blobs.exists(f.digest):
                raise StoreError(f"blob {f.digest} of {f.relpath} is missing: it was never stored")

    def find_same(
        self, kind: str, plugin: str, method_version: str | None, params: dict, parents
    ) -> ArtifactRecord | None:
        """The newest artifact made by the same method version from the same parents (ids and
        roles, in order) with the same parameters: a plan step that would remake it reuses it."""
        rows = self.conn.execute(
            "SELECT id FROM artifacts WHERE kind = ? AND plugin = ? AND method_version IS ? "
            "AND params = ? ORDER BY created DESC",
            [kind, plugin, method_version, _dumps(params or {})],
        ).fetchall()
        want = [(pid, role) for pid, role in parents]
        for (artifact_id,) in rows:
            have = self.conn.execute(
                "SELECT parent, role FROM parents WHERE child = ? ORDER BY position", [artifact_id]
            ).fetchall()
            if [tuple(r) for r in have] == want:
                return self.get(artifact_id)
        return None

    def _put_manifest(self, row: dict, files, parents, externals) -> StoredFile:
        """Store the artifact's self-description as its ``manifest.json`` blob.

        It holds everything its catalog rows hold (and the blobs of its other files),
        so its files decode without ``store.db`` and ``store recover`` can rebuild
        the rows. Metrics added later by ``eval`` live in the catalog only.
        """
        doc = {
            "format": MANIFEST_FORMAT,
            **{k: v for k, v in row.items() if k not in JSON_COLUMNS},
            **{k: json.loads(row[k]) for k in JSON_COLUMNS},
            "files": {f.relpath: {"blob": f.digest, "bytes": f.bytes} for f in files},
            "parents": [{"id": pid, "role": role} for pid, role in parents],
            "externals": [
                {
                    "id": e.id,
                    "path": str(e.path),
                    "fingerprint": e.fingerprint,
                    "content": e.content,
                    "bytes": e.bytes,
                    "reader": getattr(e, "reader", None),
                }
                for e in externals
            ],
        }
        data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
        digest = hashlib.sha256(data).hexdigest()
        tmp = self.tmp_root / f"manifest-{row['id']}.json"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        self.blobs.put(tmp, digest)
        return StoredFile(MANIFEST_FILE, self.blobs.path(digest), digest, len(data))

    def known_digests(self, files: dict[str, Path]) -> dict[Path, str]:
        """SHA-256 of the input files hashed before, for those unchanged since (size, mtime)."""
        out = {}
        for p in files.values():
            row = self.conn.execute(
                "SELECT size, mtime_ns, digest FROM input_digests WHERE path = ?", [str(p)]
            ).fetchone()
            st = p.stat()
            if row and row[0] == st.st_size and row[1] == st.st_mtime_ns:
                out[p] = row[2]
        return out

    def _upsert_external(self, ext, created: str | None = None) -> None:
        """Record an input path by its fingerprint (not copied), inside a transaction.

        A new one is dated ``created`` (the artifact first made from it), else now;
        the digests of its files are kept by path, size and mtime for the next read."""
        ext.fingerprint  # noqa: B018 - computing it fills ext.digests
        for p, digest in getattr(ext, "digests", {}).items():
            st = Path(p).stat()
            self.conn.execute(
                "INSERT OR REPLACE INTO input_digests (path, size, mtime_ns, digest) "
                "VALUES (?, ?, ?, ?)",
                [str(p), st.st_size, st.st_mtime_ns, digest],
            )
        if self.db["artifacts"].count_where("id = ?", [ext.id]):
            self.conn.execute("UPDATE artifacts SET path = ? WHERE id = ?", [str(ext.path), ext.id])
            return
        reader = getattr(ext, "reader", None)
        self.db["artifacts"].insert(
            {
                "id": ext.id,
                "kind": "external",
                "content": ext.content,
                "params": "{}",
                "metrics": "{}",
                "manifest": _dumps({"fingerprint": ext.fingerprint, "reader": reader}),
                "bytes": ext.bytes,
                "created": created or _now(),
                "path": str(ext.path),
            }
        )

    def set_metrics(
        self, artifact_id: str, metrics: dict, externals: list = (), requests: dict | None = None
    ) -> None:
        """Merge metrics into an artifact's record (e.g. after ``eval``); ``requests`` (data
        name -> digest of what was scored) go into its catalog manifest's ``scored``."""
        with self._transaction():
            for ext in externals:
                self._upsert_external(ext)
            row = self._row(artifact_id)
            current = _loads(row, "metrics")
            current.update(metrics)
            manifest = _loads(row, "manifest")
            if requests:
                manifest["scored"] = {**manifest.get("scored", {}), **requests}
            self.conn.execute(
                "UPDATE artifacts SET metrics = ?, manifest = ? WHERE id = ?",
                [_dumps(current), _dumps(manifest), artifact_id],
            )

    # -- reading ------------------------------------------------------------------

    def _row(self, artifact_id: str) -> dict:
        rows = list(self.db["artifacts"].rows_where("id = ?", [artifact_id]))
        if not rows:
            raise RefError(f"no artifact has id {artifact_id}")
        return rows[0]

    def get(self, artifact_id: str) -> ArtifactRecord:
        """The full record of one artifact, parents included."""
        row = self._row(artifact_id)
        parents = []
        for p in self.db.query(
            "SELECT p.role, p.parent, a.name, a.version, a.path FROM parents p "
            "LEFT JOIN artifacts a ON a.id = p.parent WHERE p.child = ? ORDER BY p.position",
            [artifact_id],
        ):
            label = f"{p['name']}@{p['version']}" if p["name"] else p["path"] or "(removed)"
            parents.append({"role": p["role"], "id": p["parent"], "label": label})
        parsed = {c: _loads(row, c) for c in JSON_COLUMNS}
        return ArtifactRecord(
            id=row["id"],
            name=row["name"],
            version=row["version"],
            kind=row["kind"],
            content=row["content"],
            plugin=row["plugin"],
            method_version=row["method_version"],
            params=parsed["params"],
            metrics=parsed["metrics"],
            manifest=parsed["manifest"],
            bytes=row["bytes"] or 0,
            created=row["created"],
            path=row["path"],
            parents=parents,
        )

    def resolve(self, ref: str) -> ArtifactRecord:
        """Find the artifact a REF names: ``NAME``, ``NAME@VERSION`` or an id prefix."""
        name, _, version = ref.partition("@")
        if version:
            if not version.isdigit():
                raise RefError(f"'{ref}': the version after '@' must be a number")
            if int(version) >= 1 << 63:  # past SQLite's integers: no artifact has it
                raise RefError(f"no artifact matches '{ref}'")
            rows = list(
                self.db["artifacts"].rows_where("name = ? AND version = ?", [name, int(version)])
            )
            if not rows:
                raise RefError(f"no artifact matches '{ref}'")
            return self.get(rows[0]["id"])
        rows = list(
            self.db["artifacts"].rows_where("name = ?", [ref], order_by="version DESC", limit=1)
        )
        if rows:
            return self.get(rows[0]["id"])
        if HEX_ID.match(ref.lower()):
            rows = list(
                self.db["artifacts"].rows_where("id LIKE ?", [ref.lower() + "%"], order_by="id")
            )
            if len(rows) == 1:
                return self.get(rows[0]["id"])
            if len(rows) > 1:
                ids = ", ".join(r["id"][:12] for r in rows[:5])
                raise RefError(
                    f"'{ref}' matches {len(rows)} artifacts ({ids}); give more of the id"
                )
        rows = list(  # an external input, by the path `store ls --all` shows
            self.db["artifacts"].rows_where(
                "kind = 'external' AND path = ?", [str(Path(ref).expanduser().resolve())]
            )
        )
        if len(rows) == 1:
            return self.get(rows[0]["id"])
        raise RefError(f"no artifact or path matches '{ref}'")

    def external_at(self, path: str) -> str | None:
        """The id of the external input last recorded at this absolute path, if any."""
        row = self.conn.execute(
            "SELECT id FROM artifacts WHERE kind = 'external' AND path = ? "
            "ORDER BY created DESC LIMIT 1",
            [path],
        ).fetchone()
        return row[0] if row else None

    def files(self, artifact_id: str) -> dict[str, Path]:
        """Relative path -> blob path for every file of an artifact.

        With remote blob storage, safetensors files stay there (their tensors are read
        by byte ranges); the small files beside them are copied to a local cache."""
        return {
            r["path"]: (
                self.blobs.path(r["blob"])
                if r["path"].endswith(".safetensors")
                else self.blobs.local(r["blob"])
            )
            for r in self.db["files"].rows_where("artifact = ?", [artifact_id], order_by="path")
        }

    def list(self, include_external: bool = False) -> list[ArtifactRecord]:
        """All artifacts, oldest first; external inputs only when asked."""
        where = None if include_external else "kind != 'external'"
        return [
            self.get(r["id"])
            for r in self.db["artifacts"].rows_where(where, order_by="created, name, version")
        ]

    def children(self, artifact_id: str) -> list[str]:
        return [r["child"] for r in self.db["parents"].rows_where("parent = ?", [artifact_id])]

    # -- maintenance --------------------------------------------------------------

    def remove(self, artifact_id: str, force: bool = False) -> None:
        """Delete an artifact's rows; its blobs go at the next gc."""
        children = self.children(artifact_id)
        if children and not force:
            labels = ", ".join(self.get(c).label for c in children[:5])
            raise StoreError(
                f"cannot remove {self.get(artifact_id).label}: {len(children)} artifact(s) "
                f"were made from it ({labels}); use --force to remove it anyway"
            )
        label = self.get(artifact_id).label
        manifest = self.conn.execute(
            "SELECT blob FROM files WHERE artifact = ? AND path = ?", [artifact_id, MANIFEST_FILE]
        ).fetchone()
        with self._transaction():
            self.conn.execute("DELETE FROM files WHERE artifact = ?", [artifact_id])
            self.conn.execute("DELETE FROM parents WHERE child = ?", [artifact_id])
            self.conn.execute("DELETE FROM artifacts WHERE id = ?", [artifact_id])
        # after the rows: a crash in between brings the artifact back at a recover, never loses it
        write_tombstone(self.root, artifact_id, manifest[0] if manifest else None, label)


def _blob_backend(root: Path, url: str | None) -> LocalBlobStore | FsspecBlobStore:
    """The blobs of the store at ``root``: its ``blobs/`` directory, or objects at ``url``."""
    if not url:
        return LocalBlobStore(root / "blobs")
    remote = FsspecBlobStore(url, root / "blobcache")
    register_remote_blobs(remote.cache, remote)
    return remote


def _catalog_error(e: sqlite3.DatabaseError, db_path: Path, what: str) -> StoreError:
    """SQLite's error as a sentence: a full disk says so (SQLite says "disk I/O error"
    when it cannot grow its WAL), anything else names the catalog."""
    try:
        full = shutil.disk_usage(db_path.parent).free < (1 << 20)
    except OSError:
        full = False
    if full and ("disk I/O" in str(e) or "full" in str(e)):
        return StoreError(
            f"no space left on the device of the store at {db_path.parent}; free some space "
            "and run the command again"
        )
    return StoreError(f"the catalog {db_path} {what}: {e}")


def _writable(root: Path, db_path: Path) -> bool:
    """Whether this process may write the store: its directory and catalog (a read-only
    mount or another user's files say no)."""
    return os.access(root, os.W_OK) and os.access(db_path, os.W_OK)


def _read_only_connection(db_path: Path) -> sqlite3.Connection:
    """The catalog opened for reading only: ``mode=ro`` (which sees a WAL's commits where
    its -shm file can be read), else ``immutable=1`` where SQLite cannot even create the
    WAL index (a read-only mount without one: the store's last writer checkpointed)."""
    from urllib.parse import quote

    uri = f"file:{quote(str(db_path.resolve()))}"
    try:
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None)
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        return sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None)


def open_store(
    root: Path | str | None = None, recovering: bool = False, blobs: str | None = None
) -> Store:
    """Open (creating and migrating) the store at ROOT, $COMPRESSOR_STORE, or the user data dir.

    ``recovering`` opens a store whose catalog was lost, for :meth:`Store.recover`;
    ``blobs`` (an fsspec URL) is where a new store keeps its blobs.
    """
    return Store(Path(root) if root else default_store_dir(), recovering, blobs)


@contextlib.contextmanager
def opened_store(store: Store | str | Path | None) -> Iterator[Store]:
    """The given store, or the store at a path (or the default), closed afterwards."""
    if isinstance(store, Store):
        yield store
        return
    opened = open_store(store)
    try:
        yield opened
    finally:
        opened.close()


def default_store_dir() -> Path:
    """$COMPRESSOR_STORE, else the platform's user data directory (``~/.local/share/compressor``
    on Linux); a store made by an earlier release in ``~/.config/compressor`` is kept in use."""
    env = os.environ.get("COMPRESSOR_STORE")
    if env:
        return Path(env)
    import platformdirs

    new = Path(platformdirs.user_data_dir("compressor", appauthor=False))
    old = Path(platformdirs.user_config_dir("compressor", appauthor=False))
    if not new.exists() and (old / "store.db").is_file():
        return old
    return new
