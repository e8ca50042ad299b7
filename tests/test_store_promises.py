"""The store's promises under damage and misuse: one test per defect found by probing it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from conftest import artifact_tensors, assert_refused, store_snapshot
from safetensors.torch import load_file, save_file

from compressor.store import open_store


def _blob_of(store_dir, ref: str, relpath: str):
    st = open_store(store_dir)
    try:
        return st.files(st.resolve(ref).id)[relpath]
    finally:
        st.close()


def _flip(path, offset: int) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# -- 1. export --force never deletes what is not an export ---------------------------


def test_export_force_refuses_the_store_and_its_parents(run, tv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "store")
    for target in (tv, tv.parent):
        assert_refused(
            run,
            tv,
            ["export", "tv", target, "--force"],
            f"refusing to replace {target}: it holds the artifact store at {tv.resolve()}",
        )
    assert run("store", "verify").exit_code == 0


def test_export_force_refuses_cwd_and_home(run, tv, tmp_path, monkeypatch):
    work = tmp_path / "project"
    work.mkdir()
    (work / "compressor.json").write_text('{"format": "compressor-export"}')  # looks like ours
    monkeypatch.chdir(work)
    assert_refused(
        run,
        tv,
        ["export", "tv", ".", "--force"],
        "refusing to replace .: it is the current, the home or the root directory",
    )
    monkeypatch.setenv("HOME", str(work))
    assert_refused(
        run,
        tv,
        ["export", "tv", str(work), "--force"],
        f"refusing to replace {work}: it is the current, the home or the root directory",
    )


def test_export_force_replaces_an_earlier_export(run, tv, models, tmp_path):
    out = tmp_path / "out"
    assert run("--quiet", "export", "tv", out, "--base", models["base-fp32"]).exit_code == 0
    marker = json.loads((out / "compressor.json").read_text())
    assert marker["content"] == "model" and marker["ref"] == "tv@1"
    (out / "stale.txt").write_text("from the earlier export")
    assert run("--quiet", "export", "tv", out, "--force").exit_code == 0
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "compressor.json").read_text())["content"] == "delta"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def test_killed_export_staging_is_cleaned_and_old_export_restored(run, tv, tmp_path):
    out = tmp_path / "out"
    assert run("--quiet", "export", "tv", out).exit_code == 0
    dead = 2**22 + 12345  # no such process
    staged = tmp_path / f".out.tmp-{dead}-deadbeef"
    staged.mkdir()
    (staged / "model.safetensors").write_bytes(b"half")
    os.replace(out, tmp_path / f".out.old-{dead}-cafebabe")  # killed between the renames
    # the next export into the same folder cleans a killed export's leftovers, whatever
    # its own OUT (they stayed until an export into the same OUT): the stage goes, the old
    # export set aside comes back
    assert run("--quiet", "export", "tv", tmp_path / "other").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []
    assert (out / "compressor.json").is_file()
    (tmp_path / f".out.tmp-{dead}-0123abcd").mkdir()  # a stage whose OUT is not there
    alive = tmp_path / f".out.tmp-{os.getpid()}-0123abcd"  # a live export's: kept
    alive.mkdir()
    assert run("--quiet", "export", "tv", tmp_path / "third").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == [alive.name]


# -- 2. blobs are hash-checked as they are read ---------------------------------------


def test_damaged_weights_blob_refused_on_export_and_merge(run, tv, models, tmp_path):
    blob = _blob_of(tv, "tv", "model.safetensors")
    _flip(blob, blob.stat().st_size - 3)
    out = tmp_path / "out"
    assert_refused(
        run,
        tv,
        ["export", "tv", out],
        "tv@1: the stored file model.safetensors is damaged (its bytes do not match their "
        "hash); run `compress store verify`",
    )
    assert not out.exists()
    assert_refused(
        run,
        tv,
        ["merge", "-p", "task-arithmetic", "--base", models["base-fp32"], "tv"],
        "tv@1: the stored file model.safetensors is damaged (its bytes do not match their "
        "hash); run `compress store verify`",
    )


def test_damaged_shared_config_blob_refused(run, tv, models, tmp_path):
    blob = _blob_of(tv, "tv", "tokenizer_config.json")
    _flip(blob, 2)
    assert_refused(
        run,
        tv,
        ["export", "tv", tmp_path / "out", "--base", models["base-fp32"]],
        "tv@1: the stored file tokenizer_config.json is damaged (its bytes do not match their "
        "hash); run `compress store verify`",
    )


def test_eval_refuses_a_damaged_tokenizer_blob(run, tv, models, tmp_path):
    """eval linked carried files for transformers unchecked: one changed letter in
    tokenizer.json gave another perplexity, exit 0, where export refused the blob."""
    args = ["--quiet", "merge", "-p", "linear", models["ft1-fp32"], models["ft2-fp32"]]
    assert run(*args, "-n", "soup").exit_code == 0
    data = tmp_path / "lines.txt"
    data.write_text("the quick brown fox\njumps over the lazy dog\n")
    assert run("--quiet", "eval", "soup", "-o", "data", data).exit_code == 0
    blob = _blob_of(tv, "soup", "tokenizer.json")
    text = blob.read_bytes()
    at = text.index(b'"the"') + 1
    _flip(blob, at)
    assert_refused(
        run,
        tv,
        ["eval", "soup", "-o", "data", data],
        "soup@1: the stored file tokenizer.json is damaged (its bytes do not match their "
        "hash); run `compress store verify`",
    )


# -- 3. a lost catalog is damage, not a new store -------------------------------------


@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_lost_catalog_is_refused(run, tv, how):
    db = tv / "store.db"
    for suffix in ("-wal", "-shm"):
        (tv / f"store.db{suffix}").unlink(missing_ok=True)
    if how == "deleted":
        db.unlink()
    else:
        db.write_bytes(b"")
    blobs = sorted(p for p in (tv / "blobs").rglob("*") if p.is_file())
    message = (
        f"the store at {tv} holds blobs but its catalog (store.db) is missing or empty: it is "
        "damaged, not new; `compress store recover` rebuilds the catalog from the artifacts' "
        "manifests"
    )
    for args in (["store", "verify"], ["store", "gc"], ["store", "ls"]):
        r = run("--quiet", *args)
        assert (r.exit_code, r.output) == (1, f"Error: {message}\n")
    assert sorted(p for p in (tv / "blobs").rglob("*") if p.is_file()) == blobs


def test_gc_refuses_empty_catalog_with_blobs_unless_forced(run, tv):
    conn = sqlite3.connect(tv / "store.db")
    with conn:
        for table in ("files", "parents", "artifacts"):
            conn.execute(f"DELETE FROM {table}")
    conn.close()
    n = sum(1 for p in (tv / "blobs").rglob("*") if p.is_file())
    assert_refused(
        run,
        tv,
        ["store", "gc"],
        f"the catalog lists no artifact but {n} blob(s) are stored; if the catalog was lost, "
        f"run `compress store recover` instead; `store gc --force` deletes all {n} blob(s)",
    )
    r = run("--quiet", "store", "verify")
    assert r.exit_code == 1 and "the catalog lists none" in r.output
    assert run("store", "gc", "--force", "--grace", "0").output.startswith(f"Removed {n} blobs")


# -- 4. verify parses every catalog row -----------------------------------------------


def test_verify_finds_a_damaged_row_and_ls_says_which(run, tv):
    conn = sqlite3.connect(tv / "store.db")
    with conn:
        conn.execute("UPDATE artifacts SET params = '{\"a\": 1' WHERE name = 'tv'")
    conn.close()
    r = run("--quiet", "store", "verify")
    assert r.exit_code == 1
    assert "the catalog row of tv@1 is damaged: its params is not a JSON object" in r.output
    r = run("--quiet", "store", "ls")
    assert r.exit_code == 1
    assert r.output == (
        "Error: the catalog row of tv@1 is damaged: its params is not a JSON object "
        "(run `compress store verify`)\n"
    )


# -- 5. inputs are identified by a full hash ------------------------------------------


def test_large_inputs_differing_in_one_byte_are_two_inputs(run, models, tmp_path):
    from compressor.demo.models import save_tiny_llama

    a = save_tiny_llama(tmp_path / "a", hidden=256, layers=4, vocab=4096)  # ~30 MB
    b = tmp_path / "b"
    shutil.copytree(a, b)
    tensors = load_file(b / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][7, 11] += 1.0  # one entry away from the sampled bytes' positions
    save_file(tensors, b / "model.safetensors", metadata={"format": "pt"})
    assert (a / "model.safetensors").stat().st_size == (b / "model.safetensors").stat().st_size
    ids = []
    for expert in (a, b):
        r = run("--quiet", "apply", "-p", "task-vector", "--base", a, expert, "--json")
        assert r.exit_code == 0, r.output
        ids.append(json.loads(r.stdout)["parents"][1]["id"])
    assert ids[0] != ids[1]


# -- 6. version numbers are never reused ----------------------------------------------


def test_removed_newest_version_number_is_not_reused(run, tv, models):
    again = ["apply", "-p", "task-vector", "--base", models["base-fp32"], models["ft2-fp32"]]
    run("--quiet", *again, "-n", "tv")
    assert run("store", "rm", "tv@2").exit_code == 0
    r = run("--quiet", *again, "-n", "tv", "--json")
    assert json.loads(r.stdout)["version"] == 3
    r = run("store", "show", "tv@2")
    assert r.output == "Error: no artifact matches 'tv@2'\n"


# -- 7. pickles are never loaded ------------------------------------------------------


def _pickle_that_writes(path, marker):
    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    path.write_bytes(pickle.dumps({"w": Boom()}))


def test_pickle_inputs_refused(run, models, tv, tmp_path):
    marker = tmp_path / "executed"
    for suffix in (".bin", ".pt"):
        bad = tmp_path / f"weights{suffix}"
        _pickle_that_writes(bad, marker)
        assert_refused(
            run,
            tv,
            ["apply", "-p", "task-vector", "--base", models["base-fp32"], bad],
            f"{bad} is a pickle checkpoint, which compressor never loads (unpickling can run "
            "code); convert it to safetensors where you trust it, e.g. transformers' "
            "save_pretrained(OUT, safe_serialization=True)",
        )
    assert not marker.exists()


def test_eval_never_falls_back_to_a_pickle(run, models, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(models["base-fp32"], d)
    os.replace(d / "model.safetensors", d / "weights.safetensors")
    marker = tmp_path / "executed"
    _pickle_that_writes(d / "pytorch_model.bin", marker)
    data = tmp_path / "lines.txt"
    data.write_text("a b c d\ne f g h\n")
    r = run("--quiet", "eval", d, "-o", "data", data)
    assert not marker.exists()
    assert r.exit_code == 0, r.output  # the safetensors file it holds, by another name
    assert "perplexity" in r.output


def test_torch_floor_is_past_the_weights_only_bypass():
    from pathlib import Path

    import tomllib

    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    torch_req = [d for d in deps["project"]["dependencies"] if d.startswith("torch")]
    assert torch_req == ["torch>=2.6"]  # CVE-2025-32434 fixed in 2.6.0


# -- 8. symbolic links out of an input directory are refused --------------------------


def test_symlink_out_of_input_dir_refused(run, models, tv, tmp_path):
    d = tmp_path / "ft"
    shutil.copytree(models["ft1-fp32"], d)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not store me")
    (d / "tokenizer_config.json").unlink()
    (d / "tokenizer_config.json").symlink_to(secret)
    message = (
        f"{d}: tokenizer_config.json is a symbolic link to {secret}, outside the directory; "
        "copy the file in instead of linking it"
    )
    assert_refused(
        run, tv, ["apply", "-p", "task-vector", "--base", models["base-fp32"], d], message
    )
    assert_refused(run, tv, ["store", "import", d], message)


def test_hf_cache_symlinks_still_work(run, models, tmp_path):
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in sorted(models["ft1-fp32"].iterdir()):
        blob = repo / "blobs" / f.name.replace(".", "_")
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    r = run("--quiet", "apply", "-p", "task-vector", "--base", models["base-fp32"], snap)
    assert r.exit_code == 0, r.output


# -- 9. NaN and inf ------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1,nan"])
def test_non_finite_options_refused(run, models, tv, value):
    assert_refused(
        run,
        tv,
        [
            "merge",
            "-p",
            "task-arithmetic",
            "--base",
            models["base-fp32"],
            "tv",
            "-o",
            "weights",
            value,
        ],
        f"option 'weights' expects comma-separated finite numbers; got '{value}'",
        code=2,
    )


def test_non_finite_weights_refused_naming_the_tensor(run, models, tv, tmp_path):
    d = tmp_path / "ft"
    shutil.copytree(models["ft1-fp32"], d)
    tensors = load_file(d / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name][0, :5] = float("nan")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    assert_refused(
        run,
        tv,
        ["apply", "-p", "task-vector", "--base", models["base-fp32"], d],
        f"{d}: tensor {name} holds 5 NaN or infinite values; a method cannot give meaningful "
        "results from it",
    )


@pytest.mark.parametrize(
    "values, finite",
    [
        ([1.0, -2.0, 3.0], True),
        ([3e38, 3e38, 3e38, -1.0], True),  # the sum overflows; every entry is finite
        ([1.0, float("inf"), 2.0], False),
        ([float("inf"), float("-inf")], False),  # the sum is NaN
        ([0.0, float("nan")], False),
        ([], True),
    ],
)
def test_all_finite_against_an_entry_by_entry_check(values, finite):
    from compressor.io.deltas import all_finite

    t = torch.tensor(values, dtype=torch.float32)
    assert all_finite(t) is finite
    assert finite is all(math.isfinite(v) for v in values)


def test_json_is_strict(run, tv):
    conn = sqlite3.connect(tv / "store.db")
    with conn:
        conn.execute("UPDATE artifacts SET metrics = '{\"x\": NaN}' WHERE name = 'tv'")
    conn.close()
    for args in (["store", "ls", "--json"], ["store", "show", "tv", "--json"]):
        out = run(*args).output
        parsed = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
        assert parsed["metrics"]["x"] is None


# -- 10. raw internal exceptions become sentences -------------------------------------


def test_disk_full_is_a_sentence(run, tv, models, monkeypatch):
    import errno

    import compressor.io.writer as writer

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "/x/shard")

    monkeypatch.setattr(writer, "_hashed_copy", full)
    assert_refused(
        run,
        tv,
        ["merge", "-p", "task-arithmetic", "--base", models["base-fp32"], "tv"],
        "no space left on the device (/x/shard); free some space and run the command again",
    )


# -- 11. names, store location, read-only readers, headers, lora-tucker -------------


@pytest.mark.parametrize(
    "name, message",
    [
        ("tv\n", "invalid name 'tv\\n'"),
        ("", "invalid name ''"),
    ],
)
def test_bad_names(run, models, tv, name, message):
    assert_refused(
        run,
        tv,
        [
            "apply",
            "-p",
            "task-vector",
            "--base",
            models["base-fp32"],
            models["ft1-fp32"],
            "-n",
            name,
        ],
        f"{message}: use letters, digits, '.', '_' and '-', starting with a letter or digit, "
        "and not only hex digits (those are ids)",
    )


def test_underscore_directory_gets_a_valid_default_name(run, models, tmp_path):
    d = tmp_path / "_ft"
    shutil.copytree(models["ft1-fp32"], d)
    r = run("--quiet", "apply", "-p", "task-vector", "--base", models["base-fp32"], d, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["name"] == "ft.task-vector"


def test_empty_store_option_refused(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run("--store", "", "store", "ls")
    assert r.exit_code == 2 and "the store directory must not be empty" in r.output
    assert list(tmp_path.iterdir()) == []


def test_readers_take_no_write_lock(run, tv):
    (tv / "lock").unlink()
    shutil.rmtree(tv / "tmp")
    assert run("store", "ls").exit_code == 0
    assert run("store", "show", "tv").exit_code == 0
    assert not (tv / "lock").exists() and not (tv / "tmp").exists()


def test_header_of_a_million_tensors_refused_quickly(run, models, tv, tmp_path):
    bad = tmp_path / "many.safetensors"
    entry = '"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    raw = ("{" + ",".join(entry % i for i in range(100_001)) + "}").encode()
    bad.write_bytes(len(raw).to_bytes(8, "little") + raw)
    assert_refused(
        run,
        tv,
        ["apply", "-p", "task-vector", "--base", models["base-fp32"], bad],
        f"{bad} lists 100001 tensors; more than 100000 in one file is not a real checkpoint",
    )


def test_lora_tucker_warns_when_rank_outgrows_the_input(run, lora, private_store):
    adapter, _ = lora
    r = run("--quiet", "apply", "-p", "lora-tucker", adapter, "-o", "rank", "64")
    assert r.exit_code == 0, r.output
    assert "Warning: rank 64 stores" in r.stderr and "choose a smaller -o rank" in r.stderr


# -- self-describing artifacts: decode without store.db, recover a lost catalog ------


def test_artifact_files_decode_without_the_catalog(run, models, tv, tmp_path):
    from compressor.app.refs import open_copied_artifact

    r = run("--quiet", "apply", "-p", "compeft", "tv", "-o", "density", "0.2", "-n", "small")
    assert r.exit_code == 0, r.output
    want = artifact_tensors("small")  # decoded through the store
    st = open_store(tv)
    files = st.files(st.resolve("small").id)
    st.close()
    assert "manifest.json" in files
    copy = tmp_path / "copy"
    for rel, blob in files.items():
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(blob, copy / rel)
    shutil.rmtree(tv)  # no store.db, no blobs: only the copied files
    with open_copied_artifact(copy) as src:
        got = {n: src.get(n) for n in src.names()}
    assert got.keys() == want.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), n


def test_store_recover_rebuilds_a_lost_catalog(run, models, tv, tmp_path):
    base = models["base-fp32"]
    r = run("--quiet", "merge", "-p", "ties", "--base", base, "tv", "-n", "m", "--json")
    assert r.exit_code == 0, r.output
    run("--quiet", "apply", "-p", "task-vector", "--base", base, models["ft2-fp32"], "-n", "tv")
    run("store", "rm", "tv@2")
    before = {
        a["name"]: a for a in map(json.loads, run("store", "ls", "--json").stdout.splitlines())
    }
    lineage = json.loads(run("store", "log", "m", "--json").stdout)
    for f in ("store.db", "store.db-wal", "store.db-shm"):
        (tv / f).unlink(missing_ok=True)
    r = run("store", "recover")
    assert r.output == (
        f"Recovered 2 artifacts into {tv / 'store.db'}; 1 removed with `store rm` stay removed\n"
    )
    after = {
        a["name"]: a for a in map(json.loads, run("store", "ls", "--json").stdout.splitlines())
    }
    assert after == before
    assert json.loads(run("store", "log", "m", "--json").stdout) == lineage
    assert run("store", "verify").exit_code == 0
    assert_refused(
        run,
        tv,
        ["store", "recover"],
        "the catalog lists artifacts; recover rebuilds only a lost or empty catalog",
    )
    r = run(
        "--quiet",
        "apply",
        "-p",
        "task-vector",
        "--base",
        base,
        models["ft2-fp32"],
        "-n",
        "tv",
        "--json",
    )
    assert json.loads(r.stdout)["version"] == 3  # recovered versions are not reused either


def _lose_catalog(store) -> None:
    for f in ("store.db", "store.db-wal", "store.db-shm"):
        (store / f).unlink(missing_ok=True)


def test_recover_refuses_over_a_damaged_manifest_and_force_holds_its_blobs(run, models, tv):
    """A manifest with one flipped bit was skipped: recover said "Recovered 1" of 2, exit 0,
    and the next gc deleted the dropped artifact's blobs."""
    r = run("--quiet", "apply", "-p", "compeft", "tv", "-o", "density", "0.2", "-n", "small")
    assert r.exit_code == 0, r.output
    manifest = _blob_of(tv, "small", "manifest.json")
    st = open_store(tv)
    small_blobs = {p.name for p in st.files(st.resolve("small").id).values()}
    tv_blobs = {p.name for p in st.files(st.resolve("tv").id).values()}
    st.close()
    _lose_catalog(tv)
    _flip(manifest, 40)
    before = store_snapshot(tv)
    r = run("--quiet", "store", "recover")
    assert r.exit_code == 1
    assert r.output == (
        f"Error: 1 blob(s) do not match their hash and may be artifact manifests "
        f"({manifest.name[:12]}); nothing was recovered. `compress store recover --force` "
        "recovers the other artifacts and keeps every blob none of them names from gc\n"
    )
    assert store_snapshot(tv) == before
    r = run("store", "recover", "--force")
    assert r.exit_code == 0, r.output
    assert r.stdout == f"Recovered 1 artifacts into {tv / 'store.db'}\n"
    held = len(small_blobs - tv_blobs)
    assert (
        f"Warning: 1 damaged blob(s) may have been manifests; {held} blob(s) no recovered "
        "artifact names are kept from gc" in r.stderr
    )
    r = run("store", "gc", "--grace", "0")
    assert r.output.startswith("Removed 0 blobs")
    assert f"Kept {held} blob(s) held by `store recover --force`" in r.output
    for digest in small_blobs:
        assert (tv / "blobs" / "sha256" / digest[:2] / digest).exists()
    r = run("store", "gc", "--grace", "0", "--drop-held")
    assert r.output.startswith(f"Removed {held} blobs")


def test_a_removal_survives_a_recover_until_gc_drops_its_tombstone(run, models, tv):
    r = run("--quiet", "apply", "-p", "compeft", "tv", "-o", "density", "0.2", "-n", "small")
    assert r.exit_code == 0, r.output
    assert run("store", "rm", "small").exit_code == 0
    assert [p.name for p in (tv / "removed").iterdir()] != []
    _lose_catalog(tv)
    r = run("store", "recover")
    assert r.output.endswith("; 1 removed with `store rm` stay removed\n")
    assert [
        a["name"] for a in map(json.loads, run("store", "ls", "--json").stdout.splitlines())
    ] == ["tv"]
    assert run("store", "gc", "--grace", "0").exit_code == 0
    assert list((tv / "removed").iterdir()) == []


def test_unchanged_inputs_are_not_hashed_again_and_changed_ones_are(run, models, tmp_path):
    from compressor.app.refs import resolve

    ft = tmp_path / "ft"
    shutil.copytree(models["ft1-fp32"], ft)
    args = ["apply", "-p", "task-vector", "--base", models["base-fp32"], ft, "--json"]
    first = json.loads(run("--quiet", *args).stdout)["parents"][1]["id"]
    st = open_store()
    try:
        again = resolve(st, str(ft))
        assert set(again.external.digests) == set(again.external.files.values())  # all known
        again.source.close()
    finally:
        st.close()
    assert json.loads(run("--quiet", *args).stdout)["parents"][1]["id"] == first
    weights = ft / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 1  # same size, new content, new mtime
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert json.loads(run("--quiet", *args).stdout)["parents"][1]["id"] != first


# -- a store you may only read ------------------------------------------------------------


def _readable_copy(tv) -> Path:
    """The store copied to a directory every user can reach, owned by root, 0755/0644."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="ro-store-", dir="/tmp"))
    os.chmod(root, 0o755)
    shutil.copytree(tv, root / "store")
    for path in [root / "store", *(root / "store").rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return root


def _read_as_a_reader(run, store, out) -> list[tuple[int, str]]:
    return [
        (r.exit_code, r.output)
        for r in (
            run("--store", store, "store", "ls"),
            run("--store", store, "store", "verify"),
            run("--store", store, "--quiet", "export", "tv", out),
            run("--store", store, "--quiet", "store", "rm", "tv"),
        )
    ]


REFUSED_WRITE = (
    "is read-only here (its files or filesystem do not let this user write); reading it "
    "works, this command would write to it"
)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_another_users_store_can_be_read(run, tv):
    """As another uid: 'attempt to write a readonly database' for every reader."""
    root = _readable_copy(tv)
    store, out = root / "store", root / "out"
    os.chmod(root, 0o777)  # the reader may write its export beside the store
    _read_as_a_reader(run, shutil.copytree(store, root / "warm"), root / "warm-out")  # imports
    before = store_snapshot(store)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child becomes nobody and reads
        try:
            os.close(reader)
            os.setgid(65534)
            os.setuid(65534)
            results = _read_as_a_reader(run, store, out)
            os.write(writer, json.dumps(results).encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as f:
        results = json.loads(f.read() or "null")
    os.waitpid(pid, 0)
    assert results is not None
    (ls, ls_out), (verify, _), (export, _), (rm, rm_out) = results
    assert ls == 0 and "tv@1" in ls_out
    assert verify == 0 and export == 0 and (out / "model.safetensors").exists()
    assert (rm, rm_out) == (1, f"Error: the store at {store} {REFUSED_WRITE}\n")
    assert store_snapshot(store) == before
    shutil.rmtree(root)


def test_a_store_on_a_read_only_mount_can_be_read(run, tv, tmp_path):
    """On a read-only mount `store ls`, `store verify` and `export` failed: the catalog
    could not be opened."""
    import subprocess

    root = _readable_copy(tv)
    mount = root / "mnt"
    mount.mkdir()
    done = subprocess.run(["mount", "--bind", str(root / "store"), str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("bind mounts are not allowed here")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(mount)], check=True)
        (ls, ls_out), (verify, _), (export, _), (rm, rm_out) = _read_as_a_reader(
            run, mount, tmp_path / "out"
        )
    finally:
        import gc

        gc.collect()  # an in-process command's last catalog cursor may sit in a cycle
        subprocess.run(["umount", str(mount)], check=True)
    assert ls == 0 and "tv@1" in ls_out
    assert verify == 0 and export == 0 and (tmp_path / "out" / "model.safetensors").exists()
    assert (rm, rm_out) == (1, f"Error: the store at {mount} {REFUSED_WRITE}\n")
    shutil.rmtree(root)


def test_a_full_disk_is_named_as_such(run, models, tmp_path):
    """A full disk was reported as 'the catalog ... cannot be read: disk I/O error'."""
    import gc
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mount)])
    if done.returncode != 0:
        pytest.skip("tmpfs mounts are not allowed here")
    try:
        store = mount / "store"
        args = ["apply", "-p", "task-vector", "--base", models["base-fp32"], models["ft1-fp32"]]
        assert run("--store", store, "--quiet", *args, "-n", "tv").exit_code == 0
        before = store_snapshot(store)
        with open(mount / "filler", "wb") as f:  # the rest of the disk
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
        r = run("--store", store, "--quiet", "apply", "-p", "compeft", "tv", "-n", "small")
        assert (r.exit_code, r.output) == (
            1,
            f"Error: no space left on the device of the store at {store}; free some space "
            "and run the command again\n",
        )
        (mount / "filler").unlink()  # SQLite cannot even open a catalog on a full disk
        assert store_snapshot(store) == before
    finally:
        gc.collect()
        subprocess.run(["umount", str(mount)], check=True)
