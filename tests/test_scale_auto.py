"""``-o scale auto -o val FILE``: the scale that scores best on validation data, the Δ
computed once, every score in the manifest (issue #32)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import artifact_tensors, assert_refused

from compressor.demo.models import zen_lines

GRID = (0.2, 0.5, 1.0, 1.5)


@pytest.fixture
def val(tmp_path):
    path = tmp_path / "val.txt"
    path.write_text("\n".join(zen_lines()) + "\n")
    return path


def _manifest(run, ref):
    r = run("store", "show", ref, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


@pytest.mark.parametrize("plugin", ["task-arithmetic", "iso-c"])
def test_the_chosen_scale_is_the_best_of_the_grid(run, models, val, plugin):
    base, experts = models["base-fp32"], [models["ft1-fp32"], models["ft2-fp32"]]
    common = ["--quiet", "merge", "-p", plugin, "--base", base, *experts]
    grid = ",".join(map(str, GRID))
    r = run(*common, "-o", "scale", "auto", "-o", "val", val, "-o", "grid", grid, "-n", "auto")
    assert r.exit_code == 0, r.output
    # each scale merged and scored the long way: one merge and one eval per scale
    by_hand = []
    for scale in GRID:
        assert run(*common, "-o", "scale", str(scale), "-n", f"s{scale}").exit_code == 0
        r = run("--quiet", "eval", f"s{scale}", "-o", "data", val, "--json")
        by_hand.append(json.loads(r.output)["perplexity"])
    best = GRID[by_hand.index(min(by_hand))]
    shown = _manifest(run, "auto")
    picked = shown["manifest"]["scale_auto"]
    assert picked["grid"] == list(GRID)
    assert picked["chosen"] == best == shown["metrics"]["scale"]
    assert picked["metric"] == "perplexity" and picked["higher_is_better"] is False
    for got, want in zip(picked["scores"], by_hand, strict=True):
        assert got == pytest.approx(want, rel=1e-4)
    a, b = artifact_tensors("auto"), artifact_tensors(f"s{best}")
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_bad_requests_are_refused_with_the_store_unchanged(
    run, models, val, private_store, tmp_path
):
    base, experts = models["base-fp32"], [models["ft1-fp32"], models["ft2-fp32"]]
    merge = ["merge", "-p", "ties", "--base", base, *experts]
    assert_refused(
        run,
        private_store,
        [*merge, "-o", "scale", "auto"],
        "-o scale auto needs -o val FILE: the data each scale is scored on",
        code=2,
    )
    assert_refused(
        run,
        private_store,
        [*merge, "-o", "val", val],
        "option 'val' applies to -o scale auto only",
        code=2,
    )
    assert_refused(
        run,
        private_store,
        [*merge, "-o", "grid", "0.5,1"],
        "option 'grid' applies to -o scale auto only",
        code=2,
    )
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text('{"text": "a line", "label": 1}\n{"text": "another", "label": 0}\n')
    assert_refused(  # a causal LM has no classification head to score labelled rows
        run,
        private_store,
        [*merge, "-o", "scale", "auto", "-o", "val", labelled],
        f"-o val {labelled} cannot score this merge: {base} has no weights for score.weight "
        "(a 'classify' model needs them)",
    )
    assert_refused(
        run,
        private_store,
        ["merge", "-p", "linear", base, *experts, "-o", "scale", "auto"],
        "unknown option 'scale' for method 'linear' (options: normalize, weights)",
        code=2,
    )
