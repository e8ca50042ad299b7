"""What a catalog row is: an artifact's record, its names, and the JSON columns' rules."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

from compressor.errors import StoreError

HEX_ID = re.compile(r"^[0-9a-f]{8,}$")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
JSON_COLUMNS = ("params", "metrics", "manifest")
MANIFEST_FILE = "manifest.json"  # every artifact's self-description, among its files
CONFIG_FILE = "config.json"  # the store's settings: where its blobs live
ARTIFACT_COLUMNS = (
    "id",
    "name",
    "version",
    "kind",
    "content",
    "plugin",
    "method_version",
    "bytes",
    "created",
    "path",
)


@dataclass
class _ExternalRow:
    """An external input as a manifest lists it (what ``_upsert_external`` needs)."""

    id: str
    path: str
    fingerprint: str
    content: str
    bytes: int
    reader: str | None = None


@dataclass
class ArtifactRecord:
    """One artifact row with its parents, as the CLI and API show it."""

    id: str
    name: str | None
    version: int | None
    kind: str
    content: str
    plugin: str | None
    method_version: str | None
    params: dict
    metrics: dict
    manifest: dict
    bytes: int
    created: str
    path: str | None = None
    parents: list[dict] = field(default_factory=list)

    @classmethod
    def from_manifest(cls, doc: dict) -> ArtifactRecord:
        """The record a ``manifest.json`` describes (parents without their labels)."""
        return cls(
            **{k: doc.get(k) for k in ("id", "name", "version", "kind", "content", "plugin")},
            method_version=doc.get("method_version"),
            params=doc.get("params") or {},
            metrics=doc.get("metrics") or {},
            manifest=doc.get("manifest") or {},
            bytes=doc.get("bytes") or 0,
            created=doc.get("created") or "",
            parents=[dict(p) for p in doc.get("parents", [])],
        )

    @property
    def label(self) -> str:
        """``name@version`` for stored artifacts, the path for external ones."""
        if self.name:
            return f"{self.name}@{self.version}"
        return self.path or self.id[:12]

    def to_json(self) -> dict:
        """The object ``--json`` prints."""
        return {
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "content": self.content,
            "plugin": self.plugin,
            "method_version": self.method_version,
            "bytes": self.bytes,
            "params": self.params,
            "metrics": self.metrics,
            "created": self.created,
            "path": self.path,
            "parents": self.parents,
        }


def check_name(name: str) -> str:
    """Return the name if it is a valid artifact name, else raise StoreError."""
    if not NAME_RE.fullmatch(name) or HEX_ID.match(name.lower()):
        raise StoreError(
            f"invalid name {name!r}: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, and not only hex digits (those are ids)"
        )
    return name


def derive_name(text: str, fallback: str = "artifact") -> str:
    """A valid artifact name made from a file name or label (``_ft`` -> ``ft``)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._") or fallback
    return name if not HEX_ID.match(name.lower()) else f"a{name}"


def _loads(row: dict, column: str) -> dict:
    """A JSON column of an artifacts row; damage is a StoreError naming the row."""
    try:
        value = json.loads(row[column] or "{}")
    except (ValueError, TypeError, RecursionError):
        value = None
    if not isinstance(value, dict):
        label = f"{row['name']}@{row['version']}" if row.get("name") else row["id"][:12]
        raise StoreError(
            f"the catalog row of {label} is damaged: its {column} is not a JSON object "
            "(run `compress store verify`)"
        )
    return value


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True)
