"""The store: versions, references, lineage, rm, gc, verify, import, migrations."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from conftest import store_snapshot

from compressor.errors import RefError, StoreError
from compressor.store import open_store
from compressor.store.migrations import migrations


@pytest.fixture
def two_versions(run, models):
    base, ft = models["base-fp32"], models["ft1-fp32"]
    for _ in range(2):
        r = run("apply", "-p", "task-vector", "--base", base, ft, "-n", "tv")
        assert r.exit_code == 0, r.output
    r = run(
        "merge", "-p", "task-arithmetic", "--base", base, "tv@1", "tv", "-n", "merged", "--json"
    )
    return json.loads(r.stdout)


def test_versions_and_refs(two_versions, private_store):
    store = open_store(private_store)
    v1, v2 = store.resolve("tv@1"), store.resolve("tv@2")
    assert (v1.version, v2.version) == (1, 2)
    assert store.resolve("tv").id == v2.id
    assert store.resolve(v1.id[:8]).id == v1.id
    assert store.resolve(v1.id.upper()[:10]).id == v1.id
    # same content hashes the same: both versions share their blobs
    assert store.files(v1.id).keys() == store.files(v2.id).keys()
    # same content, same blobs; only each artifact's own manifest.json differs
    same = [rel for rel in store.files(v1.id) if rel != "manifest.json"]
    assert [store.files(v1.id)[r] for r in same] == [store.files(v2.id)[r] for r in same]
    assert store.files(v1.id)["manifest.json"] != store.files(v2.id)["manifest.json"]
    with pytest.raises(RefError, match="the version after '@' must be a number"):
        store.resolve("tv@x")
    store.close()


def test_lineage_json(run, two_versions):
    r = run("store", "log", "merged", "--json")
    tree = json.loads(r.stdout)
    assert tree["label"] == "merged@1"
    assert [(p["role"], p["label"]) for p in tree["parents"]][1:] == [
        ("expert", "tv@1"),
        ("expert", "tv@2"),
    ]
    base = tree["parents"][0]
    assert base["role"] == "base" and base["kind"] == "external"
    grand = tree["parents"][1]["parents"]
    assert [p["role"] for p in grand] == ["base", "input"]
    assert grand[0]["id"] == base["id"]  # the same base, recorded once by fingerprint


def test_lineage_text(run, two_versions, models):
    out = run("store", "log", "merged").output.splitlines()
    assert (
        out[0].startswith("merged@1  ")
        and "merge task-arithmetic  normalize=False scale=1.0" in out[0]
    )
    assert out[1].startswith("├── base: " + str(models["base-fp32"]))
    assert out[2].startswith("├── expert: tv@1")
    assert out[3].startswith("│   ├── base: ")
    assert out[-1].startswith("    └── input: " + str(models["ft1-fp32"]))


def test_ls_show(run, two_versions):
    lines = run("store", "ls").output.splitlines()
    assert [line.split()[0] for line in lines] == ["tv@1", "tv@2", "merged@1"]
    assert len(run("store", "ls", "--all").output.splitlines()) == 5  # + base and fine-tune
    rows = [json.loads(x) for x in run("store", "ls", "--json").stdout.splitlines()]
    assert {
        "id",
        "name",
        "version",
        "kind",
        "plugin",
        "bytes",
        "params",
        "metrics",
        "parents",
    } <= rows[0].keys()
    shown = json.loads(run("store", "show", "merged", "--json").stdout)
    assert shown["files"] == [
        "config.json",
        "generation_config.json",
        "manifest.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert shown["params"] == {"normalize": False, "scale": 1.0, "weights": None}
    text = run("store", "show", "tv@1").output
    assert "plugin: task-vector" in text and "parent (base):" in text


def test_rm_refuses_to_orphan(run, two_versions, private_store):
    before = store_snapshot(private_store)
    r = run("store", "rm", "tv@1")
    assert r.exit_code == 1
    assert r.output == (
        "Error: cannot remove tv@1: 1 artifact(s) were made from it (merged@1); "
        "use --force to remove it anyway\n"
    )
    assert store_snapshot(private_store) == before
    assert run("store", "rm", "merged").exit_code == 0
    assert run("store", "rm", "tv@1").exit_code == 0
    assert [x.split()[0] for x in run("store", "ls").output.splitlines()] == ["tv@2"]


def test_rm_force_keeps_lineage_gap(run, two_versions):
    assert run("store", "rm", "tv@1", "--force").exit_code == 0
    tree = json.loads(run("store", "log", "merged", "--json").stdout)
    assert tree["parents"][1]["label"] == "(removed)"


def test_gc_removes_only_unreferenced(run, two_versions, private_store):
    store = open_store(private_store)
    merged_blobs = set(store.files(store.resolve("merged").id).values())
    store.close()
    r = run("store", "gc", "--grace", "0")
    assert r.output.startswith("Removed 0 blobs")
    run("store", "rm", "merged")
    r = run("store", "gc", "--grace", "0")
    assert r.exit_code == 0
    # config files are shared with tv; the weights and merged's manifest.json are not
    assert r.output.startswith("Removed 2 blobs")
    assert sum(p.exists() for p in merged_blobs) == len(merged_blobs) - 2
    assert run("store", "verify").exit_code == 0


def test_verify_finds_damage(run, two_versions, private_store):
    assert (
        run("store", "verify").output
        == "OK: every blob matches its hash, every catalog row parses\n"
    )
    store = open_store(private_store)
    blob = store.files(store.resolve("tv@1").id)["model.safetensors"]
    store.close()
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    r = run("store", "verify")
    assert r.exit_code == 1
    assert f"blob {blob.name} does not match its hash" in r.output
    assert r.output.endswith("Error: 1 problem(s) found in " + str(private_store) + "\n")


def test_import_copies_and_reads_back(run, models, private_store, tmp_path):
    src = models["ft2-bf16"]
    r = run("store", "import", src, "-n", "ft2", "--json")
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    assert rec["kind"] == "import" and rec["content"] == "model"
    assert [p["role"] for p in rec["parents"]] == ["source"]
    out = tmp_path / "out"
    assert run("export", "ft2", out).exit_code == 0
    # the export's own marker beside what the source held
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [p.name for p in src.iterdir()] + ["compressor.json"]
    )
    for f in ("config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (src / f).read_bytes()
    from safetensors.torch import load_file

    want, got = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # an imported model serves as a base by name
    r = run("apply", "-p", "task-vector", "--base", "ft2", models["ft1-bf16"], "-n", "d")
    assert r.exit_code == 0, r.output


def test_external_input_moved_away(run, models, tmp_path):
    import shutil

    ft = tmp_path / "ft"
    shutil.copytree(models["ft1-fp32"], ft)
    run("apply", "-p", "task-vector", "--base", models["base-fp32"], ft, "-n", "tv")
    tree = json.loads(run("store", "log", "tv", "--json").stdout)
    ext_id = tree["parents"][1]["id"]
    shutil.rmtree(ft)
    r = run("export", ext_id[:10], tmp_path / "o")
    assert r.exit_code == 1
    assert r.output == f"Error: {ft}: the external input is no longer at {ft}\n"


def test_invalid_name_is_refused_before_anything_is_written(private_store, tmp_path):
    store = open_store(private_store)
    with pytest.raises(StoreError, match="invalid name"):
        store.commit([], kind="import", content="model", name="-x")
    store.close()


def test_migrations_from_blank_and_reopen(tmp_path):
    store = open_store(tmp_path / "s")
    tables = set(store.db.table_names())
    assert {"artifacts", "files", "parents", "_sqlite_migrations"} <= tables
    assert [m.name for m in migrations.applied(store.db)] == [
        "m001_initial",
        "m002_name_versions",
        "m003_input_digests",
        "m004_held_blobs",
    ]
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    again = open_store(tmp_path / "s")  # reopening applies nothing twice
    assert [m.name for m in migrations.applied(again.db)] == [
        "m001_initial",
        "m002_name_versions",
        "m003_input_digests",
        "m004_held_blobs",
    ]
    again.close()


def test_migrates_each_earlier_schema(tmp_path):
    """A store left at any earlier migration is brought up to date on open."""
    import sqlite_utils

    names = [m.name for m in migrations._migrations]
    for i, name in enumerate(names):
        path = tmp_path / f"s{i}"
        path.mkdir()
        db = sqlite_utils.Database(path / "store.db")
        migrations.apply(db, stop_before=name)
        db.conn.close()
        store = open_store(path)
        assert [m.name for m in migrations.applied(store.db)] == names
        store.close()


def test_store_location(tmp_path, monkeypatch, run):
    monkeypatch.setenv("COMPRESSOR_STORE", str(tmp_path / "env-store"))
    run("store", "ls")
    assert (tmp_path / "env-store" / "store.db").exists()
    run("--store", tmp_path / "flag-store", "store", "ls")
    assert (tmp_path / "flag-store" / "store.db").exists()
    monkeypatch.delenv("COMPRESSOR_STORE")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    from compressor.store import default_store_dir

    assert default_store_dir().name == "compressor"


def test_wal_files_not_in_snapshot_are_sqlite_only(private_store, run):
    run("store", "ls")
    names = {p.name for p in private_store.iterdir()}
    assert names <= {"store.db", "store.db-wal", "store.db-shm", "blobs", "tmp", "lock"}


def test_sqlite_rows_are_json(two_versions, private_store):
    conn = sqlite3.connect(private_store / "store.db")
    for params, metrics in conn.execute("SELECT params, metrics FROM artifacts"):
        json.loads(params), json.loads(metrics)
    conn.close()
