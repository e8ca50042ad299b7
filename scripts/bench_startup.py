"""Start-up cost: wall time of `compress --help`, `compress plugins` and `compress store ls`
beside a bare `python -c 'import click'` and `mergekit-yaml --help`, in one run.

    python scripts/bench_startup.py               # median of 7 runs each
    python scripts/bench_startup.py --write-docs  # also update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import write_docs_section  # noqa: E402

MARK = "startup"


def wall(cmd: list[str], env: dict, repeats: int) -> float:
    """Median wall seconds of a command (output discarded)."""
    times = []
    for _ in range(repeats):
        t0 = time.monotonic()
        subprocess.run(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True
        )
        times.append(time.monotonic() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as store:
        env = {**os.environ, "COMPRESSOR_STORE": store}
        subprocess.run([bin_dir / "compress", "store", "ls"], env=env, check=True)
        rows = {
            "python -c 'import click'": [sys.executable, "-c", "import click"],
            "compress --help": [str(bin_dir / "compress"), "--help"],
            "compress plugins": [str(bin_dir / "compress"), "plugins"],
            "compress store ls": [str(bin_dir / "compress"), "store", "ls"],
            "mergekit-yaml --help": [str(bin_dir / "mergekit-yaml"), "--help"],
        }
        times = {k: wall(v, env, args.repeats) for k, v in rows.items()}
    floor = times["python -c 'import click'"]
    lines = [
        f"Median of {args.repeats} runs each, one after another on the 2-core reference machine. "
        "Command: `python scripts/bench_startup.py`.",
        "",
        "| command | wall time (s) | / import click |",
        "| --- | ---: | ---: |",
        *[f"| `{k}` | {t:.2f} | {t / floor:.1f}x |" for k, t in times.items()],
    ]
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        write_docs_section(MARK, table, "Start-up")


if __name__ == "__main__":
    main()
