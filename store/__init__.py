"""The artifact store: content-addressed blobs and a SQLite catalog of lineage."""

from compressor.integrity import sha256_file
from compressor.store.catalog import (
    ArtifactRecord,
    Store,
    StoredFile,
    check_name,
    default_store_dir,
    derive_name,
    open_store,
    opened_store,
)

__all__ = [
    "check_name",
    "ArtifactRecord",
    "Store",
    "StoredFile",
    "default_store_dir",
    "derive_name",
    "open_store",
    "opened_store",
    "sha256_file",
]
