"""``store``: list, inspect, import, remove, collect and verify artifacts."""

from __future__ import annotations

from pathlib import Path

import click

from compressor.cli.run import format_bytes, print_record, strict_json
from compressor.errors import RefError, StoreError
from compressor.store.blobs import GC_GRACE_SECONDS


def _metrics_brief(metrics: dict, limit: int = 3) -> str:
    """The metrics worth a glance: eval scores (NAME:DATA) first, losses last."""
    keys = sorted(metrics, key=lambda k: (":" not in k, k.startswith("loss"), k))[:limit]
    return ", ".join(
        f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}"
        for k in keys
    )


def lineage(store, artifact_id: str, role: str | None = None, seen=None) -> dict:
    """The artifact and, recursively, its parents, as nested dicts."""
    seen = set() if seen is None else seen
    record = store.get(artifact_id)
    node = {"role": role, **record.to_json(), "label": record.label, "parents": []}
    if artifact_id in seen:
        return node
    seen.add(artifact_id)
    for p in record.parents:
        try:
            node["parents"].append(lineage(store, p["id"], p["role"], seen))
        except RefError:  # removed with --force: keep the gap visible
            node["parents"].append(
                {"role": p["role"], "id": p["id"], "label": "(removed)", "parents": []}
            )
    return node


def _print_tree(node: dict, prefix: str = "", last: bool = True, top: bool = True) -> None:
    what = node.get("plugin") or node.get("kind") or ""
    line = f"{node['label']}  {node['id'][:12]}  {node.get('kind', '')}"
    if node.get("plugin"):
        line += f" {what}"
    params = {k: v for k, v in (node.get("params") or {}).items() if v is not None}
    if params:
        line += "  " + " ".join(f"{k}={v}" for k, v in params.items())
    if top:
        click.echo(line)
    else:
        click.echo(f"{prefix}{'└── ' if last else '├── '}{node['role']}: {line}")
    child_prefix = prefix if top else prefix + ("    " if last else "│   ")
    for i, p in enumerate(node["parents"]):
        _print_tree(p, child_prefix, i == len(node["parents"]) - 1, top=False)


def register(cli):
    @cli.group()
    def store():
        """Inspect and maintain the artifact store."""

    @store.command("ls")
    @click.option("--all", "show_all", is_flag=True, help="Include external inputs.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
    @click.pass_obj
    def ls(state, show_all, as_json):
        """List artifacts, oldest first."""
        for r in state.store.list(include_external=show_all):
            if as_json:
                click.echo(strict_json(r.to_json()))
            else:
                click.echo(
                    f"{r.label:<28} {r.id[:12]}  {r.kind:<8} {r.plugin or '-':<16} "
                    f"{format_bytes(r.bytes):>9}  {_metrics_brief(r.metrics)}"
                )

    @store.command()
    @click.argument("ref")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.pass_obj
    def show(state, ref, as_json):
        """Show one artifact: parameters, metrics, files and parents."""
        r = state.store.resolve(ref)
        files = state.store.files(r.id)
        if as_json:
            click.echo(
                strict_json(
                    {**r.to_json(), "manifest": r.manifest, "files": sorted(files)}, indent=2
                )
            )
            return
        click.echo(f"{r.label}  (id {r.id})")
        for key in ("kind", "content", "plugin", "method_version", "created", "path"):
            value = getattr(r, key)
            if value:
                click.echo(f"  {key}: {value}")
        click.echo(f"  bytes: {r.bytes} ({format_bytes(r.bytes)})")
        for title, d in (("params", r.params), ("metrics", r.metrics)):
            if d:
                click.echo(f"  {title}:")
                for k, v in d.items():
                    click.echo(f"    {k}: {v}")
        for line in r.manifest.get("summary", []):
            click.echo(f"  {line}")
        if files:
            click.echo("  files: " + ", ".join(files))
        for p in r.parents:
            click.echo(f"  parent ({p['role']}): {p['label']}  {p['id'][:12]}")

    @store.command()
    @click.argument("ref")
    @click.option("--json", "as_json", is_flag=True, help="Print the tree as JSON.")
    @click.pass_obj
    def log(state, ref, as_json):
        """Show the lineage tree of an artifact: what it was made from, and how."""
        tree = lineage(state.store, state.store.resolve(ref).id)
        if as_json:
            click.echo(strict_json(tree, indent=2))
        else:
            _print_tree(tree)

    @store.command("import")
    @click.argument("path", type=click.Path(exists=True, path_type=Path))
    @click.option("--name", "-n", help="Artifact name (default: the file or directory name).")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_obj
    def import_(state, path, name, as_json):
        """Copy a model, adapter or .safetensors file into the store."""
        from compressor.api import import_path

        print_record(import_path(path, name=name, store=state.store), as_json)

    @store.command()
    @click.argument("ref")
    @click.option("--force", is_flag=True, help="Remove even if other artifacts were made from it.")
    @click.pass_obj
    def rm(state, ref, force):
        """Remove an artifact (its blobs go at the next `store gc`)."""
        r = state.store.resolve(ref)
        state.store.remove(r.id, force=force)
        click.echo(f"Removed {r.label} ({r.id[:12]})")

    @store.command()
    @click.option(
        "--force", is_flag=True, help="Delete blobs even when the catalog lists no artifact."
    )
    @click.option(
        "--grace",
        type=click.FloatRange(min=0),
        default=GC_GRACE_SECONDS,
        show_default=True,
        help="Keep unreferenced blobs stored fewer seconds ago (uploads a plan has not "
        "committed yet); 0 deletes them.",
    )
    @click.option(
        "--drop-held",
        is_flag=True,
        help="Also delete the blobs `store recover --force` kept because a damaged "
        "manifest may have named them.",
    )
    @click.pass_obj
    def gc(state, force, grace, drop_held):
        """Delete blobs no artifact references and temp files of dead processes."""
        result = state.store.gc(force=force, grace=grace, drop_held=drop_held)
        click.echo(
            f"Removed {result['blobs_removed']} blobs ({format_bytes(result['bytes_freed'])}) "
            f"and {result['tmp_dirs_removed']} abandoned temp directories"
        )
        if result["blobs_kept_young"]:
            click.echo(
                f"Kept {result['blobs_kept_young']} unreferenced blob(s) stored less than "
                f"{grace:g} s ago (--grace 0 deletes them)"
            )
        if result["blobs_held"]:
            click.echo(
                f"Kept {result['blobs_held']} blob(s) held by `store recover --force` "
                "(--drop-held deletes them)"
            )

    @store.command()
    @click.option(
        "--force",
        is_flag=True,
        help="Recover what can be recovered when some blobs are damaged; every blob no "
        "recovered artifact names is then kept from gc (`store gc --drop-held` frees them).",
    )
    @click.pass_obj
    def recover(state, force):
        """Rebuild a lost catalog (store.db) from the manifests stored with every artifact."""
        from compressor.store import open_store

        st = open_store(state.store_dir, recovering=True, blobs=state.blobs)
        try:
            result = st.recover(force=force)
        finally:
            st.close()
        notes = []
        if result["missing_blobs"]:
            notes.append(f"{result['missing_blobs']} of their blobs are missing")
        if result["removed"]:
            notes.append(f"{result['removed']} removed with `store rm` stay removed")
        click.echo(
            f"Recovered {result['artifacts']} artifacts into {st.root / 'store.db'}"
            + "".join(f"; {n}" for n in notes)
        )
        if result["damaged"]:
            click.echo(
                f"Warning: {result['damaged']} damaged blob(s) may have been manifests; "
                f"{result['held']} blob(s) no recovered artifact names are kept from gc "
                "(`compress store gc --drop-held` deletes them)"
                + (
                    f"; {result['lost_parents']} recovered artifact(s) name a parent that "
                    "was not recovered"
                    if result["lost_parents"]
                    else ""
                ),
                err=True,
            )

    @store.command()
    @click.pass_obj
    def verify(state):
        """Re-hash every blob; exit 1 if anything is missing or damaged."""
        problems = state.store.verify()
        for p in problems:
            click.echo(p)
        if problems:
            raise StoreError(f"{len(problems)} problem(s) found in {state.store.root}")
        orphans = state.store.unreferenced_blobs()
        click.echo("OK: every blob matches its hash, every catalog row parses")
        if orphans:
            click.echo(f"({len(orphans)} blob(s) belong to no artifact; `store gc` deletes them)")
