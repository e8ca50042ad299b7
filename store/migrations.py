"""The store's SQLite schema, as sqlite-utils migrations applied on open."""

from sqlite_utils.migrations import Migrations

migrations = Migrations("compressor.store")


@migrations()
def m001_initial(db):
    db["artifacts"].create(
        {
            "id": str,
            "name": str,
            "version": int,
            "kind": str,  # compress | merge | extract | sample | import | external
            "content": str,  # model | delta | adapter | tensors
            "plugin": str,
            "method_version": str,
            "params": str,  # JSON
            "metrics": str,  # JSON
            "manifest": str,  # JSON: what decoding and export need
            "bytes": int,
            "created": str,
            "path": str,  # external artifacts: where the input was found
        },
        pk="id",
    )
    db["artifacts"].create_index(["name", "version"], unique=True)
    db["files"].create(
        {"artifact": str, "path": str, "blob": str, "bytes": int},
        pk=("artifact", "path"),
        foreign_keys=[("artifact", "artifacts", "id")],
    )
    db["files"].create_index(["blob"])
    db["parents"].create(
        {"child": str, "position": int, "parent": str, "role": str},
        pk=("child", "position"),
    )
    db["parents"].create_index(["parent"])


@migrations()
def m002_name_versions(db):
    """The highest version each name ever had, so a removed version's number is never reused."""
    db["name_versions"].create({"name": str, "last": int}, pk="name")
    db.execute(
        "INSERT INTO name_versions (name, last) SELECT name, MAX(version) FROM artifacts "
        "WHERE name IS NOT NULL GROUP BY name"
    )


@migrations()
def m003_input_digests(db):
    """SHA-256 of input files by path, size and mtime: an unchanged input is not re-hashed."""
    db["input_digests"].create(
        {"path": str, "size": int, "mtime_ns": int, "digest": str}, pk="path"
    )


@migrations()
def m004_held_blobs(db):
    """Blobs `store recover --force` keeps from gc: a damaged manifest may have named them."""
    db["held_blobs"].create({"blob": str, "reason": str}, pk="blob")
