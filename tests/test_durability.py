"""Crash safety (SIGKILL mid-write) and concurrent writers on one store."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compressor.app.refs import open_artifact
from compressor.demo.models import save_finetune, save_tiny_llama
from compressor.store import open_store


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """A ~20M-parameter Llama and a fine-tune: big enough that writing takes a while."""
    root = tmp_path_factory.mktemp("medium")
    base = save_tiny_llama(root / "base", hidden=384, layers=6, vocab=8000, dtype=torch.float32)
    return base, save_finetune(base, root / "ft", seed=1)


def _compress(store, *args, **kw):
    env = {**os.environ, "COMPRESSOR_STORE": str(store)}
    return subprocess.Popen(
        [sys.executable, "-m", "compressor", "--quiet", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def _write_started(store_dir, p, timeout=120.0):
    """Wait until run ``p`` has created its temp directory in the store: the write began.

    Returns the moment it appeared, or None when the process ended first.
    """
    tmp_root = store_dir / "tmp"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tmp_root.is_dir() and any(d.name.startswith(f"{p.pid}-") for d in tmp_root.iterdir()):
            return time.monotonic()
        if p.poll() is not None:
            return None
        time.sleep(0.002)
    raise AssertionError("the run never started writing")


@pytest.mark.slow
def test_sigkill_at_random_moments(medium, tmp_path):
    base, ft = medium
    store_dir = tmp_path / "store"
    rng = random.Random(1234)
    apply = [
        "apply",
        "-p",
        "task-vector",
        "--base",
        base,
        ft,
        "-n",
        "tv",
        "--max-shard-size",
        "10MB",
    ]
    # how long the write takes (its temp directory appearing to the process ending), warm;
    # kill times are drawn relative to what each run is seen doing, not to wall-clock guesses
    for _ in range(2):
        p = _compress(store_dir, *apply)
        began = _write_started(store_dir, p)
        assert p.wait() == 0, p.stderr.read()
        assert began is not None
        window = time.monotonic() - began
    expected_files = None
    runs = 2
    for i in range(22):
        p = _compress(store_dir, *apply)
        if i % 4 == 0:  # anywhere from start-up on, including before the write
            time.sleep(rng.uniform(0, 0.3))
        else:  # after the write began: mostly mid-write, sometimes after the commit
            assert _write_started(store_dir, p) is not None, p.stderr.read()
            time.sleep(rng.uniform(0, 1.2 * window))
        p.send_signal(signal.SIGKILL)
        p.wait()
        runs += 1
        store = open_store(store_dir)
        try:
            assert store.verify() == []
            listed = store.list()
            # a run killed after its commit is listed; one killed before is not, and no
            # partial artifact ever is: each listed one has every file and reads back whole
            assert [r.version for r in listed] == list(range(1, len(listed) + 1))
            for r in listed:
                files = store.files(r.id)
                expected_files = expected_files or set(files)
                assert set(files) == expected_files
                with open_artifact(store, r) as src:
                    assert len(src.names()) == 2 + 6 * 9 + 1  # embed, head, 6 layers, norm
        finally:
            store.close()
    assert len(listed) < runs, "no kill landed before a commit; the test proved nothing"
    store = open_store(store_dir)
    assert store.gc()["tmp_dirs_removed"] > 0  # some kills landed mid-write
    referenced = {p.name for r in store.list() for p in store.files(r.id).values()}
    assert set(store.blobs.list()) == referenced
    assert list(store.tmp_root.iterdir()) == []
    assert store.verify() == []
    store.close()


WRITER = """
import sys, compressor
store, base, ft = sys.argv[1:4]
for _ in range(10):
    compressor.apply("task-vector", ft, base=base, name="shared", store=store)
"""


@pytest.mark.slow
def test_four_concurrent_writers(models, tmp_path):
    store_dir = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                str(store_dir),
                str(models["base-fp32"]),
                str(models[f"ft{1 + i % 2}-fp32"]),
            ],
            stderr=subprocess.PIPE,
        )
        for i in range(4)
    ]
    for p in procs:
        assert p.wait() == 0, p.stderr.read().decode()
    store = open_store(store_dir)
    try:
        listed = store.list()
        assert len(listed) == 40
        assert sorted(r.version for r in listed) == list(range(1, 41))
        assert store.verify() == []
        externals = [r for r in store.list(include_external=True) if r.kind == "external"]
        assert len(externals) == 3  # base and two fine-tunes, each recorded once
    finally:
        store.close()
    r = subprocess.run(
        [sys.executable, "-m", "compressor", "--store", str(store_dir), "store", "ls", "--json"],
        capture_output=True,
        text=True,
    )
    assert len([json.loads(x) for x in r.stdout.splitlines()]) == 40


def _timed(store_dir, *args) -> float:
    start = time.monotonic()
    p = _compress(store_dir, *args)
    assert p.wait() == 0, p.stderr.read()
    return time.monotonic() - start


@pytest.mark.slow
def test_sigkill_during_export_force_and_gc(medium, tmp_path):
    """A killed `export --force` leaves OUTDIR whole (or its old export set aside, which the
    next export puts back); a killed gc leaves every listed artifact readable."""
    from compressor.io.outdir import clean_stale

    base, ft = medium
    store_dir = tmp_path / "store"
    out = tmp_path / "out"
    _timed(store_dir, "apply", "-p", "task-vector", "--base", base, ft, "-n", "tv")
    window = _timed(store_dir, "export", "tv", out)
    rng = random.Random(99)
    for _ in range(12):
        p = _compress(store_dir, "export", "tv", out, "--force")
        time.sleep(rng.uniform(0, 1.2 * window))
        p.send_signal(signal.SIGKILL)
        p.wait()
        clean_stale(out)  # what the next export into OUT does first
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []
        assert json.loads((out / "compressor.json").read_text())["content"] == "delta"
        from safetensors import safe_open

        with safe_open(out / "model.safetensors", "pt") as f:
            assert len(list(f.keys())) == 2 + 6 * 9 + 1
    _timed(store_dir, "apply", "-p", "task-vector", "--base", ft, base, "-n", "x")
    _timed(store_dir, "store", "rm", "x")
    gc_window = _timed(store_dir, "store", "gc")
    for i in range(4):
        _timed(store_dir, "apply", "-p", "task-vector", "--base", ft, base, "-n", f"y{i}")
        _timed(store_dir, "store", "rm", f"y{i}")
        p = _compress(store_dir, "store", "gc")
        time.sleep(rng.uniform(0, 1.5 * gc_window))
        p.send_signal(signal.SIGKILL)
        p.wait()
        store = open_store(store_dir)
        try:
            assert store.verify() == []
            with open_artifact(store, store.resolve("tv")) as src:
                assert len(src.names()) == 2 + 6 * 9 + 1
        finally:
            store.close()


def _sigint_as_a_shell_leaves_it() -> None:
    """In the child, before exec: SIGINT at its default. A child inherits an ignored
    SIGINT (a test worker that ran Ray in-process ignores it), and Python then installs
    no handler of its own, so Ctrl-C would do nothing at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_a_long_native_call_within_the_grace():
    """Ctrl-C during `merge -p atlas` did not stop it for 2.5 minutes on a loaded machine:
    KeyboardInterrupt waits for the native call under way to return. Here the call is a
    matmul of tens of seconds; the process ends with 130 after the second's grace, the
    matmul unfinished."""
    script = (
        "import torch\n"
        "from compressor.cli import stop_on_interrupt\n"
        "stop_on_interrupt()\n"
        "a = torch.randn(8000, 8000)\n"
        "print('ready', flush=True)\n"
        "for _ in range(20):\n"
        "    a @ a\n"
        "print('finished', flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_as_a_shell_leaves_it,
    )
    assert proc.stdout.readline() == "ready\n"
    time.sleep(0.5)  # inside the first matmul
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "finished" not in out and err.endswith("Aborted (interrupted).\n")


def test_ctrl_c_during_atlas_leaves_the_store_as_it_was(tmp_path):
    """SIGINT in the middle of learning aTLAS coefficients: the command ends, nothing is
    committed, the catalog and blobs are as they were."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "scripts" / "suite"))
    import build as suite_build

    text = suite_build.build(suite_build.SMOKE, quiet=True) / "text"
    store = tmp_path / "store"
    exe = Path(sys.executable).with_name("compress")
    subprocess.run(
        [str(exe), "--store", str(store), "store", "ls"], check=True, capture_output=True
    )
    before = _catalog_and_blobs(store)
    proc = subprocess.Popen(
        [
            str(exe),
            "--store",
            str(store),
            "--quiet",
            "merge",
            "-p",
            "atlas",
            "--base",
            str(text / "base"),
            str(text / "experts" / "tech"),
            str(text / "experts" / "arts"),
            "-o",
            "data",
            str(text / "data" / "all-train.jsonl"),
            "-o",
            "epochs",
            "10000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_as_a_shell_leaves_it,
    )
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:  # until it works in the store
        if (store / "tmp").is_dir() and any((store / "tmp").iterdir()):
            break
        time.sleep(0.05)
    time.sleep(2)  # into the learning loop
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # not stopped: no orphan to load the rest of the suite
            proc.kill()
    assert proc.returncode in (1, 130), err[-2000:]
    assert _catalog_and_blobs(store) == before


def _catalog_and_blobs(store) -> tuple:
    import sqlite3

    conn = sqlite3.connect(store / "store.db")
    rows = sorted(conn.execute("SELECT id, name, kind FROM artifacts"))
    conn.close()
    blobs = (
        sorted(p.name for p in (store / "blobs").rglob("*") if p.is_file())
        if (store / "blobs").exists()
        else []
    )
    return rows, blobs
