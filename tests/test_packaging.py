"""One distribution, one top-level import name, and no top-level `store`/`plugins` imports."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_wheel_has_one_top_level_package(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "*.egg-info", "__pycache__", "bench-data"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("compressor-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"compressor"}
    for module in (
        "compressor/plugins/task_vector.py",
        "compressor/plugins/sketchtune/quantize.py",
        "compressor/plugins/neumeta/generator.py",
        "compressor/plugins/subspace/rules.py",
        "compressor/store/catalog.py",
        "compressor/cli/store.py",
        *(f"compressor/{p}/__init__.py" for p in ("io", "models", "learning", "merging", "app")),
        "compressor/demo/models.py",
    ):
        assert module in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "compress = compressor.cli:main" in text
    assert "task_vector = compressor.plugins.task_vector" in text


def test_no_top_level_store_or_plugins_imports():
    """ruff's banned-api rule (pyproject.toml) keeps `import store` out."""
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    r = subprocess.run(
        [ruff, "check", "--select", "TID251", str(ROOT)], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stdout
    bad = ROOT / "tests" / "_banned_probe.py"
    try:
        bad.write_text("import store\nfrom plugins import task_vector\n")
        r = subprocess.run(
            [ruff, "check", "--select", "TID251", str(bad)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert r.returncode == 1 and r.stdout.count("TID251") == 2
    finally:
        bad.unlink()


def test_every_plugin_module_has_an_entry_point():
    """A module (or a method's folder) under plugins/ without an entry point would never
    load: the guard."""
    import tomllib

    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][
        "compressor.plugins"
    ]
    registered = {v.removeprefix("compressor.plugins.") for v in eps.values()}
    modules = {p.stem for p in (ROOT / "plugins").glob("*.py") if p.stem != "__init__"}
    modules |= {p.parent.name for p in (ROOT / "plugins").glob("*/__init__.py")}
    assert modules - registered == set(), "plugins without an entry point"
    assert registered - modules == set(), "entry points naming no module"
