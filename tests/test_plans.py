"""compress run PLAN.yaml: a DAG of steps on worker processes or Ray, the same blobs as
the commands run one by one, reuse on a second run, failures kept to their dependents."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PLAN, assert_refused, plan_blobs, run_plan, store_snapshot

from compressor.demo.models import save_finetune, save_tiny_llama, zen_lines


def test_plan_equals_the_commands_one_by_one(run, fleet, private_store, tmp_path):
    """Twelve steps on two worker processes: the same blob hashes and scores as the twelve
    commands run by hand into another store."""
    code, results = run_plan(run, fleet / "plan.yaml", "-j", "2")
    assert code == 0, results
    assert [r["status"] for r in results] == ["done"] * 12
    by_hand = tmp_path / "by-hand"
    base = str(fleet / "base")
    for d in ("0.05", "0.1"):
        for i in range(1, 5):
            expert = str(fleet / "experts" / f"e{i}")
            args = ["apply", "-p", "compeft", "--base", base, expert, "-o", "density", d]
            assert run("--store", by_hand, "--quiet", *args, "-n", f"small-e{i}-{d}").exit_code == 0
        smalls = [f"small-e{i}-{d}" for i in range(1, 5)]
        args = ["merge", "-p", "ties", "--base", base, *smalls, "-o", "density", "0.5"]
        assert run("--store", by_hand, "--quiet", *args, "-n", f"merged-{d}").exit_code == 0
        data = str(fleet / "test.txt")
        assert run("--store", by_hand, "eval", f"merged-{d}", "-o", "data", data).exit_code == 0
    assert plan_blobs(private_store) == plan_blobs(by_hand)
    assert results[-1]["metrics"]["perplexity:test"] > 1
    assert run("store", "verify").exit_code == 0


def test_plan_run_again_reuses_every_step(run, fleet, private_store):
    assert run_plan(run, fleet / "plan.yaml", "-j", "2")[0] == 0
    before = store_snapshot(private_store)
    code, results = run_plan(run, fleet / "plan.yaml")
    assert code == 0
    assert [r["status"] for r in results] == ["reused"] * 12
    assert results[8]["artifact"] == "merged-0.05@1"
    after = store_snapshot(private_store)
    assert after["files"] == before["files"]
    for table in ("artifacts", "files", "parents"):
        assert after["rows"][table] == before["rows"][table]
    # the table's metrics are written as `apply` writes them (6 significant digits)
    table = run("--quiet", "run", str(fleet / "plan.yaml")).output
    row = next(line for line in table.splitlines() if line.startswith("merged-0.05 "))
    metrics = results[8]["metrics"]
    first = list(metrics.items())[:3]
    want = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in first)
    assert row.endswith("  " + want), row


def test_failed_step_blocks_only_the_steps_that_read_it(run, fleet, private_store, tmp_path):
    """An expert that holds NaN fails its steps when they run; the merges that read them
    are blocked, every other step finishes."""
    from safetensors.torch import load_file, save_file

    root = shutil.copytree(fleet, tmp_path / "fleet")
    bad = root / "experts" / "e5"
    shutil.copytree(root / "experts" / "e1", bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    plan = root / "plan.yaml"
    plan.write_text(PLAN.replace("./", f"{root}/").replace("test.txt", f"{root}/test.txt"))
    r = run("--quiet", "run", str(plan))
    assert r.exit_code == 1, r.output
    rows = {line.split()[0]: line.split()[1] for line in r.output.splitlines()[1:-1]}
    assert [rows[f"small-e{i}-0.05"] for i in range(1, 5)] == ["done"] * 4
    assert [rows[f"small-e5-{d}"] for d in ("0.05", "0.1")] == ["failed"] * 2
    assert rows["merged-0.05"] == rows["merged-0.1"] == "blocked"
    assert rows["score-0.05"] == rows["score-0.1"] == "blocked"
    assert r.output.splitlines()[-1] == (
        f"Error: 6 of 14 steps did not finish (small-e5-0.05: {bad}: tensor model.norm.weight "
        "holds 1 NaN or infinite value; a method cannot give meaningful results from it)"
    )


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_bad_step_is_refused_before_any_work(run, fleet, private_store, tmp_path, dry_run):
    """A step with a bad option was reported only after the workers started (26-45 s)."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        PLAN.replace("./", f"{fleet}/")
        .replace("test.txt", f"{fleet}/test.txt")
        .replace("[0.05, 0.1]", "[0.05, 2]")
    )
    args = ["run", str(plan), *(["--dry-run"] if dry_run else [])]
    assert_refused(
        run,
        private_store,
        args,
        f"{plan}: step 'small-e1-2': option 'density' must be in (0, 1]; got '2'",
        code=2,
    )


@pytest.mark.parametrize(
    "step, message",
    [
        ("{name: m, merge: {plugin: nope, inputs: [x]}}", "unknown plugin 'nope' (available: "),
        (
            "{name: m, merge: {plugin: ties, inputs: [x], options: {scale: big}}}",
            "option 'scale' expects a finite number or auto; got 'big'",
        ),
        ("{name: m, merge: {plugin: ties, inputs: [x]}}", "method 'ties' needs --base BASE"),
        (
            "{name: m, merge: {plugin: slerp, base: x, inputs: [x, x]}}",
            "method 'slerp' takes at most 1 expert; got 2",
        ),
        ("{name: m, eval: {ref: x}}", "eval needs -o data PATH"),
        (
            "{name: m, export: {ref: x, out: o, dtype: int4}}",
            "unknown dtype 'int4' (choose from bf16, fp16, fp32, fp64)",
        ),
    ],
    ids=["plugin", "option", "base", "count", "eval data", "dtype"],
)
def test_each_kind_of_bad_step_is_refused_up_front(run, private_store, tmp_path, step, message):
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"steps: [{step}]\n")
    r = run("--quiet", "run", str(plan), "--dry-run")
    assert r.exit_code in (1, 2)
    assert r.output.startswith(f"Error: {plan}: step 'm': {message}"), r.output


def test_a_merge_step_without_a_base_is_refused_before_its_inputs_are_hashed(
    lora, private_store, tmp_path
):
    """`linear` of a model and an adapter with no base hashed the model (84 s on a real
    one) before saying the adapter needs a base: a plan step (reuse) hashes its inputs up
    front. Refused now after reading headers only (the bytes this process reads)."""
    from compressor import api
    from compressor.app.runs import PlanStep
    from compressor.errors import UsageError

    adapter, _ = lora
    big = save_tiny_llama(tmp_path / "big", seed=0, layers=4, hidden=256, vocab=4096)
    size = (big / "model.safetensors").stat().st_size
    assert size > 10_000_000

    def read_bytes() -> int:
        text = Path("/proc/self/io").read_text()
        return int(next(line for line in text.splitlines() if line.startswith("rchar")).split()[1])

    before = read_bytes()
    with pytest.raises(UsageError, match="is not a full model; method 'linear' needs --base"):
        api.run_method(
            "merge",
            "linear",
            [str(big), str(adapter)],
            store=private_store,
            plan=PlanStep(publish=False),
        )
    assert read_bytes() - before < size / 4


def test_two_workers_never_hash_one_new_expert_at_once(fleet, private_store, tmp_path):
    """In plan order an expert's two densities come one after the other; on two workers
    the second waits for the first's commit (which records the expert's digest) while
    another expert's step can run, rather than both workers reading and hashing it."""
    from compressor.app.executors import LocalExecutor, run_steps
    from compressor.app.plans import load_plan
    from compressor.store import open_store

    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN.replace("./", f"{fleet}/").split("  - name: merged")[0])
    started = []  # each submitted step, with the steps in flight beside it

    class Recorded(LocalExecutor):
        def submit(self, task):
            started.append((task["name"], [n for n, done in flight.items() if not done]))
            flight[task["name"]] = False
            return super().submit(task)

    flight: dict[str, bool] = {}
    store = open_store(private_store)
    executor = Recorded(store.root, 2)

    def event(res, _done, _total):
        flight[res.name] = True

    try:
        results = run_steps(executor, store, load_plan(plan), event)
    finally:
        executor.close()
        store.close()
    assert [r.status for r in results] == ["done"] * 8
    assert [name for name, _ in started[:2]] == ["small-e1-0.05", "small-e2-0.05"]

    def expert(step: str) -> str:
        return step.split("-")[1]

    for i, (name, beside) in enumerate(started):
        hashing = {expert(b) for b in beside}
        if expert(name) in hashing:  # only when every step still to start would share one
            assert all(expert(later) in hashing for later, _ in started[i + 1 :]), started


def test_a_steps_result_reaches_the_driver_without_torch(fleet, private_store, tmp_path):
    """What a worker returns for an apply step over two paths unpickles in a process that
    has not imported torch, and leaves it so (the driver commits from records; importing
    torch to read a result cost it 0.5 s while the workers waited)."""
    import pickle

    from compressor.app.executors import run_task, task_of
    from compressor.app.plans import load_plan
    from compressor.store import open_store

    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN.replace("./", f"{fleet}/").split("  - name: merged")[0])
    store = open_store(private_store)
    try:
        out = run_task(str(private_store), task_of(load_plan(plan)[0], {}, store))
    finally:
        store.close()
    assert "ok" in out, out
    result = tmp_path / "result.pickle"
    result.write_bytes(pickle.dumps(out))
    check = (
        "import pickle, sys\n"
        f"out = pickle.loads(open({str(result)!r}, 'rb').read())\n"
        "externals = out['ok'].fields['externals']\n"
        "assert len(externals) == 2 and all(len(e.fingerprint) == 64 for e in externals)\n"
        "print('torch' in sys.modules)\n"
    )
    got = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert (got.returncode, got.stdout) == (0, "False\n"), got.stderr[-2000:]


def test_threads_per_worker(run, fleet, private_store, tmp_path):
    """--threads sets each worker's torch threads (default: the cores shared among the
    workers); the steps' results do not depend on it."""
    import os

    from compressor.app.executors import LocalExecutor

    assert LocalExecutor(private_store, 2).threads == max(1, (os.cpu_count() or 1) // 2)
    assert LocalExecutor(private_store, 1).threads == os.cpu_count()
    assert LocalExecutor(private_store, 2, threads=3).threads == 3
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN.replace("./", f"{fleet}/").split("  - name: merged")[0])
    code, results = run_plan(run, plan, "-j", "2", "--threads", "1")
    assert code == 0 and [r["status"] for r in results] == ["done"] * 8
    other = tmp_path / "other"
    r = run("--store", other, "--quiet", "run", str(plan), "--threads", "2")
    assert r.exit_code == 0, r.output
    assert plan_blobs(private_store) == plan_blobs(other)


def test_dry_run_prints_the_order_and_touches_no_store(run, fleet, private_store):
    r = run("run", str(fleet / "plan.yaml"), "--dry-run")
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert len(lines) == 12
    assert lines[0] == (
        f"  1. small-e1-0.05: apply compeft {fleet}/experts/e1 (base {fleet}/base) density=0.05"
    )
    assert lines[8].startswith("  9. merged-0.05: merge ties <small-e1-0.05>, <small-e2-0.05>")
    assert lines[8].endswith("after small-e1-0.05, small-e2-0.05, small-e3-0.05, small-e4-0.05")
    assert not private_store.exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("- a\n", "{path}: a plan is a mapping with a non-empty list of steps"),
        (
            "steps: [{name: a, apply: {plugin: x, inputs: [m]}}]\nextra: 1\n",
            "{path}: key 'extra' is not a plan key (steps)",
        ),
        (
            "steps: [{name: a, apply: {plugin: x, inputs: [m]}, merge: {plugin: y}}]\n",
            "{path}: steps[0] needs exactly one of apply, merge, extract, train, sample, eval, "
            "export",
        ),
        (
            "steps: [{name: a, apply: {plugin: x, inputs: [m], opts: {}}}]\n",
            "{path}: steps[0]: apply takes no 'opts' (keys: base, inputs, options, plugin)",
        ),
        (
            "steps: [{name: a, apply: {plugin: x, inputs: [m]}}, {name: a, eval: {ref: a}}]\n",
            "{path}: two steps are named 'a'",
        ),
        (
            "steps: [{name: 'a-{x}', apply: {plugin: x, inputs: [m]}}]\n",
            "{path}: steps[0]: '{{x}}' is not a matrix key",
        ),
        (
            "steps: [{name: a, merge: {plugin: x, inputs: [b]}}, "
            "{name: b, merge: {plugin: x, inputs: [a]}}]\n",
            "{path}: the steps depend on each other in a cycle (a, b)",
        ),
        (
            "steps: [{name: a, matrix: {e: ./nowhere/*}, apply: {plugin: x, inputs: ['{e}']}}]\n",
            "{path}: steps[0]: matrix.e: './nowhere/*' matches no file",
        ),
        (
            "steps: [{name: a, apply: {plugin: x, inputs: [zz-*]}}]\n",
            "{path}: step 'a': 'zz-*' matches no step and no file",
        ),
        (
            "steps: [{name: 'bad name', apply: {plugin: x, inputs: [m]}}]\n",
            "{path}: steps[0]: 'bad name' is not a valid artifact name",
        ),
        ("steps: [\n", "{path} is not valid YAML (line 2)"),
        (
            "steps: [{name: a, merge: {plugin: ties, inputs: [m], split: 0}}]\n",
            "{path}: steps[0]: split must be a whole number of parts (1 or more)",
        ),
    ],
    ids=[
        "not a mapping",
        "plan key",
        "two verbs",
        "verb key",
        "same name",
        "template",
        "cycle",
        "matrix glob",
        "input glob",
        "name",
        "yaml",
        "split",
    ],
)
def test_bad_plans_are_refused(run, private_store, tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code = 1 if "YAML" in message else 2
    assert_refused(run, private_store, ["run", str(path)], message.format(path=path), code=code)


def test_gc_keeps_an_upload_awaiting_its_commit(run, fleet, private_store, tmp_path):
    """A worker's published blob that no artifact lists yet survives gc's grace period."""
    from compressor.store import StoredFile, open_store, sha256_file

    assert run("store", "import", str(fleet / "base")).exit_code == 0
    f = tmp_path / "upload.bin"
    f.write_bytes(b"a shard a worker stored")
    digest = sha256_file(f)
    st = open_store(private_store)
    st.publish([StoredFile("model.safetensors", f, digest, f.stat().st_size)])
    st.close()
    r = run("store", "gc")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [
        "Removed 0 blobs (0 B) and 0 abandoned temp directories",
        "Kept 1 unreferenced blob(s) stored less than 900 s ago (--grace 0 deletes them)",
    ]
    assert run("store", "gc", "--grace", "0").output.startswith("Removed 1 blobs")


SPLIT_PLAN = """
steps:
  - name: parts
    merge: {plugin: ties, base: ./base, inputs: [./experts/e1, ./experts/e2, ./experts/e3],
            options: {density: 0.5}, split: 3}
  - name: score
    eval: {ref: parts, options: {data: test.txt}}
"""


def test_merge_split_in_parts_equals_the_merge_in_one(run, fleet, private_store, tmp_path):
    """A TIES merge split in three tensor groups on two workers: one artifact with three
    shards and an index, the same tensors and kept fraction as the merge run whole, an
    export transformers loads; run again, it is reused."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    plan = fleet / "split.yaml"
    plan.write_text(SPLIT_PLAN)
    code, results = run_plan(run, plan, "-j", "2")
    assert code == 0, results
    assert [r["status"] for r in results] == ["done", "done"]
    files = run("store", "show", "parts", "--json")
    shown = json.loads(files.stdout)
    assert shown["files"] == [
        "config.json",
        "generation_config.json",
        "manifest.json",
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert shown["manifest"]["parts"] == 3
    whole = tmp_path / "whole"
    experts = [str(fleet / "experts" / f"e{i}") for i in (1, 2, 3)]
    args = ["--store", whole, "--quiet", "merge", "-p", "ties", "--base", str(fleet / "base")]
    assert run(*args, *experts, "-o", "density", "0.5", "-n", "whole").exit_code == 0
    assert run("--quiet", "export", "parts", tmp_path / "parts-out").exit_code == 0
    args = ["--store", whole, "--quiet", "export", "whole", tmp_path / "whole-out"]
    assert run(*args).exit_code == 0
    from compressor.store import open_store

    store = open_store(private_store)
    stored = store.files(store.resolve("parts").id)
    store.close()
    index = json.loads(stored["model.safetensors.index.json"].read_text())
    assert sorted(set(index["weight_map"].values())) == [
        f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)
    ]
    want = {}
    with safe_open(tmp_path / "whole-out" / "model.safetensors", "pt") as f:
        want = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "parts-out").state_dict()
    assert set(index["weight_map"]) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    conn = sqlite3.connect(whole / "store.db")
    (metrics,) = conn.execute("SELECT metrics FROM artifacts WHERE name = 'whole'").fetchone()
    conn.close()
    kept = json.loads(metrics)["kept"]
    assert shown["metrics"]["kept"] == pytest.approx(kept, rel=1e-9)
    assert shown["metrics"]["experts"] == 3
    assert results[1]["metrics"]["perplexity:test"] > 1
    assert run("store", "verify").exit_code == 0
    code, again = run_plan(run, plan)
    assert [r["status"] for r in again] == ["reused", "reused"]


def test_split_ties_global_keeps_the_ties_at_the_cut_once(run, models, private_store, tmp_path):
    """TIES over each whole τ (``scope global``) split in three parts equals the merge run
    whole on bf16 experts, whose τs hold many entries equal to the cut: each part keeps
    only the tied entries earlier parts left (before, every part kept its own share:
    kept 0.528 for 0.5, and 11 of 21 tensors differed)."""
    from safetensors.torch import load_file

    base, e1, e2 = models["base-bf16"], models["ft1-bf16"], models["ft2-bf16"]
    plan = tmp_path / "plan.yaml"
    options = "{density: 0.5, scope: global}"
    plan.write_text(
        f"steps:\n  - name: parts\n    merge: {{plugin: ties, base: {base}, "
        f"inputs: [{e1}, {e2}], options: {options}, split: 3}}\n"
    )
    code, results = run_plan(run, plan)
    assert code == 0, results
    args = ["--quiet", "merge", "-p", "ties", "--base", base, e1, e2, "-n", "whole"]
    assert run(*args, "-o", "density", "0.5", "-o", "scope", "global").exit_code == 0
    for name in ("parts", "whole"):
        assert run("--quiet", "export", name, tmp_path / name).exit_code == 0
    want, got = load_file(tmp_path / "whole" / "model.safetensors"), {}
    for shard in (tmp_path / "parts").glob("*.safetensors"):
        got.update(load_file(shard))
    assert sorted(got) == sorted(want)
    assert [n for n in want if not torch.equal(got[n], want[n])] == []
    assert results[0]["metrics"]["kept"] == pytest.approx(0.5, abs=1e-6)


def test_split_refused_for_a_method_that_is_not_per_tensor(run, fleet, private_store, tmp_path):
    plan = tmp_path / "plan.yaml"
    e1, e2 = fleet / "experts" / "e1", fleet / "experts" / "e2"
    plan.write_text(
        f"steps:\n  - name: fused\n    merge: {{plugin: atlas, base: {fleet / 'base'}, "
        f"inputs: [{e1}, {e2}], split: 2}}\n"
    )
    r = run("--quiet", "run", str(plan))
    assert r.exit_code == 1
    assert r.output.splitlines()[-1] == (
        "Error: 1 of 1 steps did not finish (fused: method 'atlas' cannot be split by tensor "
        "(it is not a merge of each tensor on its own))"
    )


@pytest.mark.slow
def test_ray_executor_gives_the_same_blobs(run, fleet, private_store, tmp_path):
    """On a real local Ray cluster (2 CPUs): the blobs the local executor makes."""
    code, results = run_plan(run, fleet / "plan.yaml", "--executor", "ray", "-j", "2")
    assert code == 0, results
    assert [r["status"] for r in results] == ["done"] * 12
    local = tmp_path / "local"
    assert run("--store", local, "--quiet", "run", str(fleet / "plan.yaml")).exit_code == 0
    assert plan_blobs(private_store) == plan_blobs(local)
    assert run("store", "verify").exit_code == 0


# -- faults: killed workers and a killed driver ----------------------------------------


@pytest.fixture(scope="module")
def slow_fleet(tmp_path_factory) -> Path:
    """Experts large enough (a 4-layer, 256-wide Llama) that a step runs long enough to
    be killed in the middle."""
    root = tmp_path_factory.mktemp("slow-fleet")
    base = save_tiny_llama(root / "base", seed=0, layers=4, hidden=256)
    for i in range(1, 4):
        save_finetune(base, root / "experts" / f"e{i}", seed=i)
    return root


def _compress(store: Path, *args) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("compress")
    return subprocess.Popen(
        [str(exe), "--store", str(store), "--quiet", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _killrun_plan(slow_fleet: Path, tmp_path: Path, steps: int, kills: int, find_workers, *args):
    """Run a plan of ``steps`` ComPEFT steps and SIGKILL ``kills`` workers while they run
    steps; the plan must still complete with every step done exactly once."""
    plan = tmp_path / "plan.yaml"
    densities = ", ".join(f"0.{i + 10}" for i in range(steps // 3))
    plan.write_text(
        "steps:\n  - name: s-{e}-{d}\n"
        f"    matrix: {{e: {slow_fleet}/experts/*, d: [{densities}]}}\n"
        f"    apply: {{plugin: compeft, base: {slow_fleet}/base, inputs: ['{{e}}'], "
        "options: {density: '{d}'}}\n"
    )
    store = tmp_path / "store"
    proc = _compress(store, "run", str(plan), "--json", "--retries", str(kills + 3), *args)
    killed = set()
    deadline = time.monotonic() + 600
    while len(killed) < kills and proc.poll() is None and time.monotonic() < deadline:
        for pid in find_workers(store, proc.pid):
            if pid not in killed:
                time.sleep(0.05)  # into the step, not at its first line
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed.add(pid)
                break
        time.sleep(0.01)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert len(killed) >= kills
    results = json.loads(out)
    assert [r["status"] for r in results] == ["done"] * steps
    conn = sqlite3.connect(store / "store.db")
    names = [r[0] for r in conn.execute("SELECT name FROM artifacts WHERE kind != 'external'")]
    conn.close()
    assert sorted(names) == sorted(r["name"] for r in results)  # each committed once
    verify = subprocess.run(
        [str(Path(sys.executable).with_name("compress")), "--store", str(store), "store", "verify"],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout


def _local_workers(store: Path, driver: int) -> list[int]:
    """The plan's worker processes (spawned children of the driver) while one of them is in
    a step: it holds a temp directory in the store named by its pid."""
    import psutil

    tmp = store / "tmp"
    busy = tmp.is_dir() and any(d.name.split("-")[0].isdigit() for d in tmp.iterdir())
    if not busy:
        return []
    try:
        family = psutil.Process(driver).children()
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in family:
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "spawn_main" in cmd and "resource_tracker" not in cmd:
            out.append(p.pid)
    return out


@pytest.mark.slow
def test_killed_local_workers_steps_run_again(slow_fleet, tmp_path):
    """20 SIGKILLed workers mid-step: every step is retried, the plan completes, each
    artifact is committed once, nothing partial is visible, the store verifies."""
    _killrun_plan(slow_fleet, tmp_path, 36, 20, _local_workers, "-j", "2")


def _ray_workers(store: Path, driver: int) -> list[int]:
    """The plan's Ray worker processes running a step (Ray titles them ray::run_ray_task)."""
    import psutil

    out = []
    try:
        family = psutil.Process(driver).children(recursive=True)  # this plan's cluster only
    except psutil.NoSuchProcess:
        return []
    for p in family:
        try:
            if " ".join(p.cmdline()).startswith("ray::run_ray_task"):
                out.append(p.pid)
        except psutil.Error:
            continue
    return out


@pytest.mark.slow
def test_killed_ray_workers_tasks_run_again(slow_fleet, tmp_path):
    _killrun_plan(slow_fleet, tmp_path, 24, 20, _ray_workers, "--executor", "ray", "-j", "2")


@pytest.mark.slow
def test_killed_driver_rerun_skips_what_was_committed(slow_fleet, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "steps:\n  - name: s-{e}-{d}\n"
        f"    matrix: {{e: {slow_fleet}/experts/*, d: [0.1, 0.2, 0.3]}}\n"
        f"    apply: {{plugin: compeft, base: {slow_fleet}/base, inputs: ['{{e}}'], "
        "options: {density: '{d}'}}\n"
    )
    store = tmp_path / "store"
    proc = _compress(store, "run", str(plan), "-j", "1")
    committed = 0
    while committed < 3 and proc.poll() is None:
        time.sleep(0.05)
        if (store / "store.db").exists():
            conn = sqlite3.connect(store / "store.db")
            try:
                committed = conn.execute(
                    "SELECT COUNT(*) FROM artifacts WHERE kind = 'compress'"
                ).fetchone()[0]
            except sqlite3.OperationalError:
                committed = 0
            conn.close()
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    again = _compress(store, "run", str(plan), "--json")
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-2000:]
    statuses = [r["status"] for r in json.loads(out)]
    assert statuses.count("reused") >= 3 and set(statuses) <= {"done", "reused"}
    conn = sqlite3.connect(store / "store.db")
    names = [r[0] for r in conn.execute("SELECT name FROM artifacts WHERE kind = 'compress'")]
    conn.close()
    assert len(names) == len(set(names)) == 9


def test_a_ray_worker_dies_with_its_driver_even_while_native_code_holds_the_gil():
    """Ray workers outlived a SIGKILLed driver by seconds, finishing their steps. A worker
    of a cluster the driver started now watches it from a separate process: here the
    'worker' sits in a C call that holds the GIL (where a watching thread never runs) and
    is killed the moment its driver is gone."""
    import psutil

    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import ctypes, sys\n"
            "from compressor.app.executors import exit_without\n"
            f"exit_without({driver.pid})\n"
            "print('watching', flush=True)\n"
            "ctypes.PyDLL(None).sleep(600)  # holds the GIL for ten minutes\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker.stdout.readline() == "watching\n"
    helpers = psutil.Process(worker.pid).children()
    driver.kill()  # not reaped yet: a zombie counts as gone
    try:
        assert worker.wait(timeout=120) == -signal.SIGKILL
    finally:
        worker.kill()
        driver.wait()
    psutil.wait_procs(helpers, timeout=120)  # the watcher does not linger either
    assert not [h for h in helpers if h.is_running() and h.status() != psutil.STATUS_ZOMBIE]


def test_ray_executor_without_ray_names_the_extra(run, fleet, private_store, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    assert_refused(
        run,
        private_store,
        ["run", str(fleet / "plan.yaml"), "--executor", "ray"],
        "the ray executor needs Ray: pip install 'compressor[ray]'",
        code=2,
    )


@pytest.mark.slow
def test_ray_step_wider_than_the_cluster_is_refused(run, fleet, private_store):
    """On a running cluster of 1 CPU a step of 2 threads could never be scheduled."""
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert_refused(
            run,
            private_store,
            ["run", str(fleet / "plan.yaml"), "--executor", "ray", "--threads", "2"],
            "a step of 2 threads needs 2 CPUs; the Ray cluster has 1",
            code=2,
        )
    finally:
        ray.shutdown()


def test_ray_memory_hint_counts_stored_and_path_inputs(run, fleet, private_store):
    """The memory a step's Ray task asks for: twice its largest input, a stored artifact's
    bytes from the catalog rows its task carries, or a path's safetensors files."""
    from compressor.app.executors import memory_hint, task_of
    from compressor.app.plans import Step
    from compressor.store import open_store

    expert = fleet / "experts" / "e1"
    args = ["--quiet", "apply", "-p", "compeft", "--base", fleet / "base", expert, "-n", "small"]
    assert run(*args).exit_code == 0
    store = open_store(private_store)
    try:
        small = store.resolve("small")
        step = Step(name="m", verb="merge", plugin="linear", inputs=["small"])
        assert memory_hint(task_of(step, {}, store)) == 2 * small.bytes + (256 << 20)
        step = Step(name="m", verb="merge", plugin="linear", inputs=["small", str(expert)])
        size = (expert / "model.safetensors").stat().st_size
        assert size > small.bytes
        assert memory_hint(task_of(step, {}, store)) == 2 * size + (256 << 20)
    finally:
        store.close()


def test_eval_step_scores_again_when_its_data_changes(run, fleet, private_store, tmp_path):
    """An eval step reuses scores only of the same request: the same data file content and
    options. Changing the file's lines, or an option, scores again; the same file again
    does not."""
    data = tmp_path / "held-out.txt"
    data.write_text("\n".join(zen_lines()[:6]) + "\n")
    plan = tmp_path / "plan.yaml"
    text = (
        f"steps:\n  - name: score\n    eval: {{ref: {fleet / 'experts' / 'e1'}, "
        "options: {data: held-out.txt}}\n"
    )
    plan.write_text(text)
    code, first = run_plan(run, plan)
    assert code == 0 and first[0]["status"] == "done", first
    direct = run("--quiet", "eval", fleet / "experts" / "e1", "-o", "data", data, "--json")
    assert json.loads(direct.stdout)["perplexity"] == first[0]["metrics"]["perplexity:held-out"]
    assert run_plan(run, plan)[1][0]["status"] == "reused"
    data.write_text("\n".join(zen_lines()[6:12]) + "\n")
    code, changed = run_plan(run, plan)
    assert changed[0]["status"] == "done"
    assert (
        changed[0]["metrics"]["perplexity:held-out"] != first[0]["metrics"]["perplexity:held-out"]
    )
    plan.write_text(text.replace("data: held-out.txt", "data: held-out.txt, max_length: 8"))
    assert run_plan(run, plan)[1][0]["status"] == "done"
    assert run_plan(run, plan)[1][0]["status"] == "reused"
