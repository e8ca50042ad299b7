"""The artifact store: content-addressed blobs and a SQLite catalog of lineage.

The names load on first use (PEP 562): the catalog brings sqlite-utils, and with it
pandas where that is installed (0.3 s), which a command that never opens the store
(``compress --help``) must not pay.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_WHERE = {
    "ArtifactRecord": "compressor.store.records",
    "Store": "compressor.store.catalog",
    "StoredFile": "compressor.store.catalog",
    "check_name": "compressor.store.records",
    "default_store_dir": "compressor.store.catalog",
    "derive_name": "compressor.store.records",
    "open_store": "compressor.store.catalog",
    "opened_store": "compressor.store.catalog",
    "sha256_file": "compressor.io.integrity",
}

__all__ = [
    "ArtifactRecord",
    "Store",
    "StoredFile",
    "check_name",
    "default_store_dir",
    "derive_name",
    "open_store",
    "opened_store",
    "sha256_file",
]

if TYPE_CHECKING:
    from compressor.io.integrity import sha256_file
    from compressor.store.catalog import (
        Store,
        StoredFile,
        default_store_dir,
        open_store,
        opened_store,
    )
    from compressor.store.records import ArtifactRecord, check_name, derive_name


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'compressor.store' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
