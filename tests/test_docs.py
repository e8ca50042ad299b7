"""The README's commands, generated sections and CI script stay true."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)[:2]


def test_readme_starts_with_demo_and_test_commands():
    demo, tests = _readme_commands()
    assert demo.endswith("compress demo") and "pip install" in demo
    assert tests == "bash scripts/install-dev.sh && .venv/bin/python -m pytest"
    install = (ROOT / "scripts" / "install-dev.sh").read_text()
    assert "-c scripts/constraints.txt -e '.[test]'" in install and "fortunes" in install
    assert "-c scripts/constraints.txt" in demo
    head = (ROOT / "README.md").read_text().split("## ")[0]
    assert head.count("```bash") == 2  # nothing else comes before them


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _readme_commands()[1] in ci


def test_generated_sections_are_fresh():
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_readme.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr


def test_constraints_pin_cpu_torch():
    lines = (ROOT / "scripts" / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in lines


def test_demo_runs_and_its_table_shows_accuracy_moving(run, tmp_path):
    r = run("demo", "--dir", tmp_path / "demo")
    assert r.exit_code == 0, r.output
    for step in (
        "apply --plugin task-vector",
        "merge --plugin task-arithmetic",
        "merge --plugin ties",
        "merge --plugin tsv-m",
        "merge --plugin iso-c",
        "apply --plugin compeft expert-a",
        "apply --plugin tucker expert-a",
        "extract --plugin matformer merged",
        "apply --plugin sketchtune",
        "train --plugin sketchtune base-sketch",
        "merge --plugin task-arithmetic --base base-sketch",
        "train --plugin neumeta",
        "sample --plugin neumeta base-neumeta -o width 0.5",
        "sample --plugin neumeta base-neumeta -o width 0.25",
        "store ls",
        "export expert-a",
        "store verify",
    ):
        assert f"$ compress {step}" in r.output
    rows = {}
    for line in r.output.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[2].replace(".", "").isdigit():
            rows[cells[0]] = [float(c) for c in cells[2:5]]
    assert {"base", "expert-a", "merged", "expert-a-compeft", "merged-half"} <= set(rows)
    assert {"merged-tsv", "merged-iso"} <= set(rows)
    assert rows["sketch-tune-a"][1] > rows["base"][1] + 0.3  # tables alone learn rotated digits
    assert rows["base-width-0.5"][0] > 0.5  # a sampled half-width ViT still reads digits
    moved = [
        n
        for n, acc in rows.items()
        if max(abs(a - b) for a, b in zip(acc, rows["base"], strict=True)) > 0.10
    ]
    assert moved, rows
    assert "Everything is kept in" in r.output
    assert (tmp_path / "demo" / "out" / "expert-a" / "config.json").exists()


def test_every_hook_is_documented_and_tested():
    """Each hookspec has an entry in the plugin guide and a test named after it (datasette's
    rule)."""
    import inspect

    from compressor import hookspecs

    hooks = [
        n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("register_")
    ]
    assert hooks, "no hookspecs found"
    guide = (ROOT / "docs" / "developing" / "writing-a-plugin.md").read_text()
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    for hook in hooks:
        assert f"`{hook}(" in guide, f"{hook} is not in the plugin guide"
        assert f"def test_{hook}(" in tests, f"no test is named after {hook}"


def test_methods_reference_lists_every_builtin():
    from compressor.registry import get_registry

    text = (ROOT / "docs" / "reference" / "methods.md").read_text()
    for (name, _), plugin in get_registry().method_plugins.items():
        if ":" not in plugin:
            assert f"\n## {name}\n" in text
