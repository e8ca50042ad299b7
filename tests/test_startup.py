"""Cheap start-up: commands that only read the CLI, the plugins or the store load no torch
(sqlite-utils brings numpy along; that costs tens of milliseconds, torch seconds)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import sys
from compressor.cli import main
sys.argv = ["compress", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
heavy = ("torch", "transformers", "tensorly", "pandas", "sqlite_utils")
print("HEAVY=" + ",".join(sorted(m for m in heavy if m in sys.modules)), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args", [["--help"], ["plugins"], ["store", "ls"], ["plugins", "show", "ties"]]
)
def test_no_torch_at_start_up(args, private_store):
    """And `--help` and `plugins` no store either: sqlite-utils brings pandas where it is
    installed (0.3 s; `compress --help` took 12.8x a bare `import click`)."""
    r = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    heavy = r.stderr.rsplit("HEAVY=", 1)[1].strip()
    allowed = {"sqlite_utils", "pandas"} if args[0] == "store" else set()
    assert set(filter(None, heavy.split(","))) <= allowed, r.stderr


def test_import_compressor_is_lazy():
    code = (
        "import sys, compressor; assert 'torch' not in sys.modules; "
        "print(compressor.Method.__name__, 'torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["Method", "False"], r.stderr
    r = subprocess.run(
        [sys.executable, "-c", "import compressor, json; print(json.dumps(dir(compressor)))"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert {"apply", "merge", "export", "open_store", "Method"} <= set(json.loads(r.stdout))
