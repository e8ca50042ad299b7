"""Wall time and peak RSS of every merge method beside mergekit's, in one run.

    python scripts/bench_merge.py                 # ~210M parameters, float32, 2 experts
    python scripts/bench_merge.py --layers 2      # a quick smoke run
    python scripts/bench_merge.py --only ties,slerp
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

# (ours, mergekit's, our -o options, mergekit per-model parameters, global parameters,
#  whether the base is given, experts)
METHODS = (
    ("ties", "ties", ["-o", "density", "0.5"], {"weight": 1.0, "density": 0.5}, {}, True, 2),
    (
        "dare-ties",
        "dare_ties",
        ["-o", "density", "0.5"],
        {"weight": 1.0, "density": 0.5},
        {},
        True,
        2,
    ),
    ("task-arithmetic", "task_arithmetic", [], {"weight": 1.0}, {}, True, 2),
    (
        "dare-linear",
        "dare_linear",
        ["-o", "density", "0.5"],
        {"weight": 1.0, "density": 0.5},
        {},
        True,
        2,
    ),
    (
        "breadcrumbs",
        "breadcrumbs",
        ["-o", "density", "0.9"],
        {"weight": 1.0, "density": 0.9},
        {},
        True,
        2,
    ),
    (
        "breadcrumbs-ties",
        "breadcrumbs_ties",
        ["-o", "density", "0.9"],
        {"weight": 1.0, "density": 0.9},
        {},
        True,
        2,
    ),
    (
        "della",
        "della",
        ["-o", "density", "0.5"],
        {"weight": 1.0, "density": 0.5, "epsilon": 0.15},
        {},
        True,
        2,
    ),
    (
        "della-linear",
        "della_linear",
        ["-o", "density", "0.5"],
        {"weight": 1.0, "density": 0.5, "epsilon": 0.15},
        {},
        True,
        2,
    ),
    ("sce", "sce", ["-o", "select_topk", "0.5"], {}, {"select_topk": 0.5}, True, 2),
    ("linear", "linear", [], {"weight": 1.0}, {}, False, 2),
    ("slerp", "slerp", ["-o", "t", "0.5"], {}, {"t": 0.5}, True, 1),
    ("nuslerp", "nuslerp", [], {"weight": 1.0}, {}, False, 2),
    ("multislerp", "multislerp", [], {"weight": 1.0}, {}, False, 2),
    ("karcher", "karcher", [], {}, {}, False, 2),
    ("model-stock", "model_stock", [], {}, {}, True, 2),
    ("nearswap", "nearswap", ["-o", "t", "0.001"], {}, {"t": 0.001}, True, 1),
    ("arcee-fusion", "arcee_fusion", [], {}, {}, True, 1),
)


def compare(ours: Path, theirs: Path) -> tuple[float, int, int]:
    """(largest |ours − theirs|, entries differing by more than 1e-5, entries), tensor by tensor."""
    from compressor.io.sources import open_model_dir

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
    ap.add_argument("--only", help="comma-separated methods to run (default: every one)")
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
    only = set(args.only.split(",")) if args.only else None
    for ours_name, theirs_name, opts, per_model, shared, with_base, count in METHODS:
        if only and ours_name not in only:
            continue
        out = work / f"ours-{ours_name}"
        chosen = experts[:count]
        base = ["--base", str(work / "base")] if with_base else []
        ours = measure(
            [*compress, "merge", "-p", ours_name, *base, *chosen, *opts] + ["-n", ours_name]
        )
        measure([*compress, "export", ours_name, str(out)])
        config = work / f"{theirs_name}.yml"
        models = [{"model": e, **({"parameters": per_model} if per_model else {})} for e in chosen]
        if with_base and theirs_name in ("slerp", "nearswap", "arcee_fusion"):
            models.insert(0, {"model": str(work / "base")})
        config.write_text(
            json.dumps(
                {
                    "merge_method": theirs_name,
                    **({"base_model": str(work / "base")} if with_base else {}),
                    "models": models,
                    **({"parameters": shared} if shared else {}),
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
        diff = None if "dare" in ours_name or "della" in ours_name else compare(out, theirs_out)
        rows.append((ours_name, theirs_name, ours, theirs, diff))
        shutil.rmtree(out)
        shutil.rmtree(theirs_out)
        print(ours_name, ours, theirs, diff, flush=True)

    lines = [
        f"Synthetic Llama-style model: {n / 1e6:.0f}M parameters, float32, 400 MB shards; "
        f"{args.layers} layers, hidden {args.hidden}, FFN {args.ffn}, vocab {args.vocab}; two "
        f"fine-tunes (one for slerp, nearswap, arcee-fusion). Machine: {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}. "
        "Command: `python scripts/bench_merge.py`.",
        "",
        "| merge | ours: wall (s) | ours: peak RSS (GB) | mergekit: wall (s) | "
        "mergekit: peak RSS (GB) | time ours/mergekit | memory ours/mergekit | "
        "entries off by > 1e-5 (largest) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for ours_name, theirs_name, (ow, orss), (tw, trss), diff in rows:
        agree = "random (seeded)" if diff is None else f"{diff[1]} ({diff[0]:.1e})"
        lines.append(
            f"| {ours_name} (mergekit {theirs_name}) | {ow:.1f} | {orss:.2f} | {tw:.1f} | "
            f"{trss:.2f} | **{ow / tw:.2f}x** | **{orss / trss:.2f}x** | {agree} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        write_docs_section("merge-speed", table)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
