"""The multi-task suite and the bench that ranks merges on it (issue #32), on the smoke
variant: per-task heads, each scored as ``compress eval`` scores the expert."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "suite"))
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.fixture(scope="module")
def suite():
    import multitask

    return multitask.build(multitask.SMOKE, quiet=True)


@pytest.mark.slow
def test_each_task_has_its_own_head_and_the_scorer_agrees_with_eval(suite, private_store):
    import json

    from bench_merge_quality import TaskScorer

    from compressor.api import evaluate

    summary = json.loads((suite / "multitask.json").read_text())
    image_tasks = list(summary["tasks"]["image"])
    assert len(image_tasks) == 8 and len(summary["tasks"]["text"]) == 8
    sizes = {len(v) for v in summary["tasks"]["image"].values()}
    assert sizes == {10, 2, 3}  # digit, parity/high/prime, mod 3: heads of their own sizes
    scorer = TaskScorer(suite / "image", image_tasks[:3])
    ours = scorer.scores(None, "test")
    for task in image_tasks[:3]:
        data = suite / "image" / "data" / f"{task}-test.jsonl"
        theirs = evaluate(str(suite / "image" / "experts" / task), {"data": str(data)})
        assert ours[task] == pytest.approx(theirs["accuracy"])


@pytest.mark.slow
def test_the_bench_ranks_merges_with_absolute_and_normalized_accuracy(suite, tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_merge_quality.py"), "--smoke"]
    cmd += ["--parts", "image", "--methods", "task-arithmetic,iso-c", "--cache-dir", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| method |"))
    assert "| absolute | normalized |" in header and "rot90-digit" in header
    assert any(line.startswith("| task-arithmetic |") for line in lines)
    assert any(line.startswith("| **iso-c** (new) |") for line in lines)
    assert "task arithmetic keeps" in r.stdout
    assert (tmp_path / f"{suite.name}.json").exists()  # rows kept for the next run
