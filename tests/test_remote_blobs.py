"""Blobs in object storage: a store whose blobs live on a real S3 endpoint (moto's
standalone server on 127.0.0.1, as s3fs's own tests use) runs a plan, exports, reads
tensors by byte ranges, and `store verify`/`store gc` see what happened to the objects."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import assert_refused, plan_blobs, run_plan

pytest.importorskip("s3fs")
boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

BUCKET = "experts"


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on a free port of 127.0.0.1 with one bucket, for this module."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    _client(url).create_bucket(Bucket=BUCKET)
    yield url
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch, request):
    """The environment s3fs (and our worker processes) read the endpoint from; a prefix of
    the bucket for this test; a boto3 client to look at the objects independently."""
    for key, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    prefix = request.node.name.replace("[", "-").replace("]", "")
    return {"url": f"s3://{BUCKET}/{prefix}", "prefix": prefix, "client": _client(s3_endpoint)}


def _client(endpoint: str):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


def _objects(s3) -> dict[str, int]:
    """Key below the test's prefix -> size, as S3 itself lists them."""
    found = s3["client"].list_objects_v2(Bucket=BUCKET, Prefix=s3["prefix"] + "/")
    return {o["Key"][len(s3["prefix"]) + 1 :]: o["Size"] for o in found.get("Contents", [])}


def _referenced(store: Path) -> set[str]:
    import sqlite3

    conn = sqlite3.connect(store / "store.db")
    used = {r[0] for r in conn.execute("SELECT DISTINCT blob FROM files")}
    conn.close()
    return used


def test_plan_with_blobs_on_s3_equals_a_local_store(run, fleet, s3, private_store, tmp_path):
    """The twelve-step plan on two workers with the store's blobs on S3: every blob is an
    object there (none in the local directory), the same blobs and scores as the plan run
    into a local store, and verify passes."""
    code, results = run_plan(run, fleet / "plan.yaml", "-j", "2")
    assert code == 0, results  # the local store, for comparison
    remote = tmp_path / "remote-store"
    r = run("--store", remote, "--blobs", s3["url"], "--quiet", "run", str(fleet / "plan.yaml"))
    assert r.exit_code == 0, r.output
    assert plan_blobs(remote) == plan_blobs(private_store)
    assert json.loads((remote / "config.json").read_text()) == {"blobs": s3["url"]}
    assert not (remote / "blobs").exists()
    objects = _objects(s3)
    assert {k.rsplit("/", 1)[-1] for k in objects if k.startswith("sha256/")} == _referenced(remote)
    assert not [k for k in objects if k.startswith("tmp/")]  # every upload was published
    assert run("--store", remote, "store", "verify").exit_code == 0
    # the store remembers where its blobs are: no --blobs needed from now on
    r = run("--store", remote, "store", "ls")
    assert r.exit_code == 0 and "merged-0.1@1" in r.output


def test_export_from_s3_loads_in_transformers(run, models, s3, private_store, tmp_path):
    from transformers import AutoModelForCausalLM

    args = ["--blobs", s3["url"], "--quiet", "merge", "-p", "linear", models["ft1-fp32"]]
    assert run(*args, models["ft2-fp32"], "-n", "soup").exit_code == 0
    assert run("--quiet", "export", "soup", tmp_path / "out").exit_code == 0
    assert run("--quiet", "export", "soup", tmp_path / "out.safetensors").exit_code == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    from safetensors.torch import load_file

    ft1 = load_file(models["ft1-fp32"] / "model.safetensors")
    ft2 = load_file(models["ft2-fp32"] / "model.safetensors")
    single = load_file(tmp_path / "out.safetensors")
    for name, tensor in model.state_dict().items():
        want = (ft1[name] + ft2[name]) / 2
        assert (tensor - want).abs().max() < 1e-6, name
        assert (single[name] - want).abs().max() < 1e-6, name


def _model_on_s3(run, tmp_path, s3) -> None:
    """A 4-layer model of 256 wide (~14 MB), stored on S3 as ``copy``."""
    from compressor.demo.models import save_tiny_llama

    model = save_tiny_llama(tmp_path / "big", seed=0, layers=4, hidden=256, vocab=4096)
    args = ["--blobs", s3["url"], "--quiet", "merge", "-p", "linear", model, model]
    assert run(*args, "-n", "copy").exit_code == 0


def test_reading_one_tensor_fetches_only_its_byte_range(run, tmp_path, s3, private_store):
    """A 4-layer model of 256 wide (~14 MB) stored on S3: reading one tensor moves its own
    bytes plus the header and one read-ahead block, never the file, and copies nothing."""
    from compressor.app.refs import resolve
    from compressor.store import open_store
    from compressor.store.blobs import READ_BLOCK

    _model_on_s3(run, tmp_path, s3)
    store = open_store(private_store)
    try:
        source = resolve(store, "copy").source
        name = "model.layers.2.mlp.down_proj.weight"
        info = source.info(name)
        shard = source.tensor_file(name)
        size = store.blobs.size(shard.name)
        assert size > 10_000_000
        store.blobs.fetched = 0
        tensor = source.get(name)
        source.close()
        fetched = store.blobs.fetched
    finally:
        store.close()
    assert tensor.shape == info.shape
    header = info.offset  # at most the header lies before it
    assert info.nbytes <= fetched <= info.nbytes + READ_BLOCK + 8 + header
    assert fetched < size / 4
    assert not shard.exists()  # read in place, not copied to the cache


def test_a_damaged_object_read_in_part_is_caught_before_anything_is_committed(
    run, tmp_path, s3, private_store
):
    """A slice of layers 2-3 of a model on S3 whose layer-3 weight has one flipped byte: the
    ranged reads skipped the rest of the blob and stopped hashing, and the merge stored a
    weight off by 7.5e35 with exit 0. The blob is now hashed whole before the commit."""
    from compressor.app.refs import resolve
    from compressor.store import open_store

    _model_on_s3(run, tmp_path, s3)
    store = open_store(private_store)
    try:
        source = resolve(store, "copy").source
        info = source.info("model.layers.3.mlp.down_proj.weight")
        digest = source.tensor_file("model.layers.3.mlp.down_proj.weight").name
        source.close()
    finally:
        store.close()
    key = f"{s3['prefix']}/sha256/{digest[:2]}/{digest}"
    body = bytearray(s3["client"].get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[info.offset + 5] ^= 0x40
    s3["client"].put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    config = tmp_path / "slice.yml"
    config.write_text(
        "slices:\n  - sources:\n      - model: copy\n        layer_range: [2, 4]\n"
        "merge_method: passthrough\ndtype: float32\n"
    )
    assert_refused(
        run,
        private_store,
        ["merge", "--config", config, "-n", "slice"],
        "copy@1: the stored file model.safetensors is damaged (its bytes do not match their "
        "hash); run `compress store verify`",
    )


def test_verify_catches_a_deleted_and_a_damaged_object(run, models, s3, private_store):
    args = [
        "--blobs",
        s3["url"],
        "--quiet",
        "apply",
        "-p",
        "compeft",
        "--base",
        models["base-fp32"],
    ]
    assert run(*args, models["ft1-fp32"], "-n", "small").exit_code == 0
    assert (
        run("--quiet", "merge", "-p", "linear", models["ft1-fp32"], models["ft2-fp32"]).exit_code
        == 0
    )
    assert run("store", "verify").exit_code == 0
    import sqlite3

    conn = sqlite3.connect(private_store / "store.db")
    shards = [
        r[0]
        for r in conn.execute(
            "SELECT blob FROM files WHERE path = 'model.safetensors' ORDER BY artifact"
        )
    ]
    conn.close()
    deleted, damaged = shards[0], shards[1]
    client = s3["client"]
    client.delete_object(Bucket=BUCKET, Key=f"{s3['prefix']}/sha256/{deleted[:2]}/{deleted}")
    key = f"{s3['prefix']}/sha256/{damaged[:2]}/{damaged}"
    data = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[-1] ^= 0xFF
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    r = run("store", "verify")
    assert r.exit_code == 1
    lines = r.output.splitlines()
    assert f"missing blob {deleted}" in lines
    assert f"blob {damaged} does not match its hash" in lines
    assert lines[-1] == f"Error: 2 problem(s) found in {private_store}"


def test_damaged_object_is_refused_when_read_whole(run, models, s3, private_store, tmp_path):
    args = ["--blobs", s3["url"], "--quiet", "merge", "-p", "linear", models["ft1-fp32"]]
    assert run(*args, models["ft2-fp32"], "-n", "soup").exit_code == 0
    conn = __import__("sqlite3").connect(private_store / "store.db")
    (blob,) = conn.execute("SELECT blob FROM files WHERE path = 'model.safetensors'").fetchone()
    conn.close()
    key = f"{s3['prefix']}/sha256/{blob[:2]}/{blob}"
    data = bytearray(s3["client"].get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[-1] ^= 0xFF
    s3["client"].put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    r = run("--quiet", "export", "soup", tmp_path / "out")
    assert r.exit_code == 1
    assert r.output == (
        "Error: soup@1: the stored file model.safetensors is damaged (its bytes do not match "
        "their hash); run `compress store verify`\n"
    )
    assert not (tmp_path / "out").exists()


def test_gc_deletes_removed_objects_keeps_young_uploads_sweeps_old_temps(
    run, models, s3, private_store
):
    from compressor.store import StoredFile, open_store, sha256_file

    args = ["--blobs", s3["url"], "--quiet", "merge", "-p", "linear", models["ft1-fp32"]]
    assert run(*args, models["ft2-fp32"], "-n", "soup").exit_code == 0
    soup_blobs = _referenced(private_store)
    assert run("store", "rm", "soup").exit_code == 0
    # a worker's upload its driver has not committed yet
    store = open_store(private_store)
    pending = private_store / "tmp" / "pending.bin"
    pending.write_bytes(b"uploaded by a worker, not committed yet")
    digest = sha256_file(pending)
    store.publish([StoredFile("x.bin", pending, digest, pending.stat().st_size)])
    store.close()
    # an upload a crashed worker left under its temporary key
    s3["client"].put_object(Bucket=BUCKET, Key=f"{s3['prefix']}/tmp/abc.123", Body=b"partial")
    r = run("store", "gc")
    assert r.exit_code == 0, r.output
    objects = _objects(s3)
    assert f"sha256/{digest[:2]}/{digest}" in objects  # young: kept
    assert "tmp/abc.123" in objects  # young too
    r = run("store", "gc", "--grace", "0")
    assert r.exit_code == 0, r.output
    assert _objects(s3) == {}
    assert soup_blobs  # the removed artifact's objects went with the rest


@pytest.mark.parametrize("backend", ["s3", "shared directory", "the store's own"])
def test_storing_a_blob_again_restarts_its_grace_period(
    run, models, private_store, tmp_path, request, backend
):
    """A worker whose output is a blob already stored (unreferenced, from a removed
    artifact) renews its time, so gc keeps it until the driver commits; a blob left alone
    as long is removed. S3 renews LastModified by a copy onto itself, no bytes moved."""
    import time

    from compressor.store import StoredFile, open_store, sha256_file

    blobs = {
        "s3": lambda: ["--blobs", request.getfixturevalue("s3")["url"]],
        "shared directory": lambda: ["--blobs", tmp_path / "mount"],
        "the store's own": list,
    }[backend]()
    args = [*blobs, "--quiet", "merge", "-p", "linear", models["ft1-fp32"]]
    assert run(*args, models["ft2-fp32"], "-n", "soup").exit_code == 0  # a catalog, not empty

    def publish(text: str) -> str:
        store = open_store(private_store)
        upload = private_store / "tmp" / "upload.bin"
        upload.write_text(text)
        digest = sha256_file(upload)
        store.publish([StoredFile("x.bin", upload, digest, upload.stat().st_size)])
        store.close()
        return digest

    again, alone = publish("stored again by a worker"), publish("left alone")
    time.sleep(4)
    assert publish("stored again by a worker") == again
    r = run("store", "gc", "--grace", "3")
    assert r.exit_code == 0, r.output
    store = open_store(private_store)
    assert (store.blobs.exists(again), store.blobs.exists(alone)) == (True, False)
    store.close()


def test_store_with_local_blobs_refuses_a_blobs_url(run, models, s3, private_store):
    assert (
        run("--quiet", "merge", "-p", "linear", models["ft1-fp32"], models["ft2-fp32"]).exit_code
        == 0
    )
    assert_refused(
        run,
        private_store,
        ["--blobs", s3["url"], "store", "ls"],
        f"the store at {private_store} keeps its blobs in {private_store / 'blobs'}; its blob "
        "storage is chosen when it is created (use a new --store for --blobs)",
    )


def test_store_refuses_another_blobs_url_than_its_own(run, s3, private_store):
    assert run("--blobs", s3["url"], "store", "ls").exit_code == 0
    other = s3["url"] + "-other"
    assert_refused(
        run,
        private_store,
        ["--blobs", other, "store", "ls"],
        f"the store at {private_store} keeps its blobs at {s3['url']}, not {other}",
    )


def test_blobs_url_of_a_missing_bucket_is_refused(run, s3, private_store):
    r = run("--blobs", "s3://no-such-bucket/x", "store", "ls")
    assert (r.exit_code, r.output) == (
        1,
        "Error: the blob storage at s3://no-such-bucket/x cannot be used: its bucket "
        "'no-such-bucket' does not exist (create it first)\n",
    )
    assert not private_store.exists()


@pytest.mark.parametrize(
    "url, message",
    [
        ("gs://bucket/x", "blob storage at gs://bucket/x needs gcsfs: pip install gcsfs"),
        ("nope://bucket/x", "blob storage URL nope://bucket/x: Protocol not known: nope"),
    ],
)
def test_blobs_url_without_its_filesystem_is_one_line(run, private_store, url, message):
    r = run("--blobs", url, "store", "ls")
    assert (r.exit_code, r.output) == (2, f"Error: {message}\n")
    assert not private_store.exists()


def test_a_worker_elsewhere_needs_no_catalog(run, fleet, s3, private_store, tmp_path):
    """Each step run by a worker whose directory is not the store's (another machine's
    scratch space: no store.db, no blobs) from the task the driver hands it, then
    committed by the driver: the same blobs and scores as `compress run` on a local store,
    and the worker's directory never held a catalog."""
    import time

    from compressor.app.executors import commit_result, run_task, task_of
    from compressor.app.plans import load_plan
    from compressor.store import open_store

    elsewhere = tmp_path / "worker-machine"
    store = open_store(private_store, blobs=s3["url"])
    ids = {}
    try:
        for step in load_plan(fleet / "plan.yaml"):
            task = task_of(step, ids, store)
            out = run_task(str(elsewhere), task)
            res = commit_result(store, step, out, time.monotonic(), 1)
            assert res.status == "done", res.error
            ids[step.name] = res.artifact_id
    finally:
        store.close()
    assert not (elsewhere / "store.db").exists() and not (elsewhere / "blobs").exists()
    local = tmp_path / "local-store"
    r = run("--store", local, "--quiet", "run", str(fleet / "plan.yaml"), "-j", "2")
    assert r.exit_code == 0, r.output
    assert plan_blobs(private_store) == plan_blobs(local)
    assert run("store", "verify").exit_code == 0


def test_blobs_in_a_shared_directory(run, models, private_store, tmp_path):
    """A plain directory (a shared mount) as blob storage, through fsspec's local
    filesystem: objects under its sha256/, none under the store, uploads renamed into
    place, the export equal to the one from a store with local blobs."""
    shared = tmp_path / "mount" / "blobs"
    args = ["--quiet", "merge", "-p", "linear", models["ft1-fp32"], models["ft2-fp32"]]
    assert run("--blobs", shared, *args, "-n", "soup").exit_code == 0
    assert json.loads((private_store / "config.json").read_text()) == {"blobs": str(shared)}
    assert not (private_store / "blobs").exists()
    stored = sorted(p.name for p in (shared / "sha256").rglob("*") if p.is_file())
    assert stored == sorted(_referenced(private_store))
    assert not list((shared / "tmp").iterdir())
    assert run("store", "verify").exit_code == 0
    assert run("--quiet", "export", "soup", tmp_path / "a.safetensors").exit_code == 0
    local = tmp_path / "local"
    assert run("--store", local, *args, "-n", "soup").exit_code == 0
    assert (
        run("--store", local, "--quiet", "export", "soup", tmp_path / "b.safetensors").exit_code
        == 0
    )
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_damaged_cached_copy_is_refused_then_dropped_by_verify(
    run, models, s3, private_store, tmp_path
):
    """The local copy of a remote config.json is damaged: reading it is refused like a damaged
    blob; `store verify` (the objects are sound) drops the copy, and the next read fetches it."""
    args = ["--blobs", s3["url"], "--quiet", "merge", "-p", "linear", models["ft1-fp32"]]
    assert run(*args, models["ft2-fp32"], "-n", "soup").exit_code == 0
    assert run("--quiet", "export", "soup", tmp_path / "first").exit_code == 0
    config_copy = next(
        p
        for p in (private_store / "blobcache").rglob("*")
        if p.is_file() and p.read_bytes().startswith(b"{") and b"LlamaForCausalLM" in p.read_bytes()
    )
    config_copy.chmod(0o644)
    config_copy.write_bytes(config_copy.read_bytes().replace(b"Llama", b"Llamb"))
    r = run("--quiet", "export", "soup", tmp_path / "second")
    assert r.exit_code == 1
    assert r.output == (
        "Error: soup@1: the stored file config.json is damaged (its bytes do not match their "
        "hash); run `compress store verify`\n"
    )
    assert run("store", "verify").exit_code == 0
    assert not config_copy.exists()
    assert run("--quiet", "export", "soup", tmp_path / "second").exit_code == 0
    assert (tmp_path / "second" / "config.json").read_bytes() == (
        tmp_path / "first" / "config.json"
    ).read_bytes()
