"""Wall time and peak RSS of `merge --plugin ties` and `dare-ties` beside mergekit's, in one run.

    python scripts/bench_merge.py                 # ~210M parameters, float32, 2 experts
    python scripts/bench_merge.py --layers 2      # a quick smoke run
    python scripts/bench_merge.py --write-docs    # also update docs/benchmarks.md

A synthetic Llama-style float32 model in 400 MB shards and two fine-tunes of it;
both tools merge the same files with the same options (density 0.5, weights 1,
λ 1) and write float32. Each command runs in its own process (peak RSS is its
own). The TIES outputs are then compared entry by entry: entries can differ
only where a trim threshold falls on tied magnitudes, which each tool breaks its
own way (we by position, mergekit by torch.argsort's order).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_foundation import ROOT, build_model, measure, write_docs_section  # noqa: E402

METHODS = (("ties", "ties"), ("dare-ties", "dare_ties"))
DENSITY = 0.5


def compare(ours: Path, theirs: Path) -> tuple[float, int, int]:
    """(largest |ours − theirs|, entries differing by more than 1e-5, entries), tensor by tensor."""
    from compressor.sources import open_model_dir

    a, b = open_model_dir(ours), open_model_dir(theirs)
    worst, differ, total = 0.0, 0, 0
    for name in a.names():
        d = (a.get(name).float() - b.get(name).float()).abs()
        worst = max(worst, float(d.max()))
        differ += int((d > 1e-5).sum())
        total += d.numel()
    return worst, differ, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-data" / "merge")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shape = (args.layers, args.hidden, args.ffn, args.vocab)
    t0 = time.monotonic()
    n = build_model(work / "base", *shape, seed=0, dtype=torch.float32, shard="400MB")
    for i in (1, 2):
        build_model(
            work / f"ft{i}", *shape, seed=i, base=work / "base", dtype=torch.float32, shard="400MB"
        )
    print(f"built base + 2 fine-tunes, {n / 1e6:.0f}M params, in {time.monotonic() - t0:.0f} s")

    compress = [sys.executable, "-m", "compressor", "--quiet", "--store", str(work / "store")]
    mk = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent)) or "mergekit-yaml"
    experts = [str(work / "ft1"), str(work / "ft2")]
    rows = []
    for ours_name, theirs_name in METHODS:
        out = work / f"ours-{ours_name}"
        opts = ["-o", "density", str(DENSITY)]
        ours = measure(
            [*compress, "merge", "-p", ours_name, "--base", str(work / "base"), *experts, *opts]
            + ["-n", ours_name]
        )
        measure([*compress, "export", ours_name, str(out)])
        config = work / f"{theirs_name}.yml"
        config.write_text(
            json.dumps(
                {
                    "merge_method": theirs_name,
                    "base_model": str(work / "base"),
                    "models": [
                        {"model": e, "parameters": {"weight": 1.0, "density": DENSITY}}
                        for e in experts
                    ],
                    "dtype": "float32",
                    "out_dtype": "float32",
                }
            )
        )
        theirs_out = work / f"mergekit-{theirs_name}"
        theirs = measure(
            [mk, str(config), str(theirs_out), "--no-copy-tokenizer", "--no-write-model-card"]
            + ["--quiet"],
            env={"HF_HUB_OFFLINE": "1"},
        )
        diff = compare(out, theirs_out) if ours_name == "ties" else None
        rows.append((ours_name, theirs_name, ours, theirs, diff))
        shutil.rmtree(out)
        shutil.rmtree(theirs_out)

    lines = [
        f"Synthetic Llama-style model: {n / 1e6:.0f}M parameters, float32, 400 MB shards; "
        f"{args.layers} layers, hidden {args.hidden}, FFN {args.ffn}, vocab {args.vocab}; two "
        f"fine-tunes, density {DENSITY}. Machine: {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}. "
        "Command: `python scripts/bench_merge.py`.",
        "",
        "| merge | ours: wall (s) | ours: peak RSS (GB) | mergekit: wall (s) | "
        "mergekit: peak RSS (GB) | time ours/mergekit | memory ours/mergekit |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for ours_name, theirs_name, (ow, orss), (tw, trss), _ in rows:
        lines.append(
            f"| {ours_name} (mergekit {theirs_name}) | {ow:.1f} | {orss:.2f} | {tw:.1f} | "
            f"{trss:.2f} | **{ow / tw:.2f}x** | **{orss / trss:.2f}x** |"
        )
    worst, differ, total = next(d for *_, d in rows if d is not None)
    lines += [
        "",
        f"Our TIES output against mergekit's: {differ} of {total} entries differ by more than "
        f"1e-5 (largest difference {worst:.2e}).",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        write_docs_section("merge-speed", table)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
