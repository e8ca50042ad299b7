"""What checking blob hashes on read costs: `compress export` of the 1.6B model of
bench_foundation.py from the store, with the check on (the default) and off
(COMPRESSOR_VERIFY_READS=0), beside `cp -r` of the same blobs, in one run.

    python scripts/bench_verify.py                 # ~1.6B parameters, bf16 (needs ~10 GB disk)
    python scripts/bench_verify.py --layers 2      # a quick smoke run
    python scripts/bench_verify.py --write-docs    # also update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from bench_foundation import build_model, measure, write_docs_section

ROOT = Path(__file__).resolve().parent.parent
MARK = "verify-reads"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    compress = str(Path(sys.executable).parent / "compress")
    with tempfile.TemporaryDirectory(dir=ROOT.parent) as tmp:
        tmp = Path(tmp)
        n = build_model(tmp / "base", args.layers, 2048, 8192, 32000, seed=0)
        store = tmp / "store"
        env = {"COMPRESSOR_STORE": str(store)}
        measure([compress, "--quiet", "store", "import", str(tmp / "base"), "-n", "m"], env)
        rows = {
            "cp -r of the source directory": [],
            "export, hashes checked": [],
            "export, unchecked": [],
        }
        for i in range(args.repeats):
            for label, cmd, extra in (
                (
                    "cp -r of the source directory",
                    ["cp", "-r", str(tmp / "base"), str(tmp / f"cp{i}")],
                    {},
                ),
                (
                    "export, hashes checked",
                    [compress, "--quiet", "export", "m", str(tmp / f"on{i}")],
                    {},
                ),
                (
                    "export, unchecked",
                    [compress, "--quiet", "export", "m", str(tmp / f"off{i}")],
                    {"COMPRESSOR_VERIFY_READS": "0"},
                ),
            ):
                rows[label].append(measure(cmd, {**env, **extra}))
                for d in tmp.glob(f"*{i}"):
                    shutil.rmtree(d)
    best = {k: min(v) for k, v in rows.items()}
    on, off = best["export, hashes checked"][0], best["export, unchecked"][0]
    lines = [
        f"Synthetic Llama-style model: {n / 1e9:.2f}B parameters, bf16, 2 GB shards ({args.layers} "
        f"layers). Best of {args.repeats}. Machine: {torch.get_num_threads()} threads, Python "
        f"{platform.python_version()}, torch {torch.__version__}. Command: "
        "`python scripts/bench_verify.py`.",
        "",
        "| step | wall time (s) | peak RSS (GB) |",
        "| --- | ---: | ---: |",
        *[f"| {k} | {w:.1f} | {r:.2f} |" for k, (w, r) in best.items()],
        f"| **checked / unchecked** | **{on / off:.2f}x** | |",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        write_docs_section(MARK, table, "Reading from the store: hash checks")


if __name__ == "__main__":
    main()
