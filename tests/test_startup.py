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
heavy = sorted(m for m in ("torch", "transformers", "tensorly") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args", [["--help"], ["plugins"], ["store", "ls"], ["plugins", "show", "ties"]]
)
def test_no_torch_at_start_up(args, private_store):
    r = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "HEAVY=\n" in r.stderr, r.stderr


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
