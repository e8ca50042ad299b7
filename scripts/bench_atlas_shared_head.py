"""aTLAS and the fixed-rule merges on four MiniLM experts that share one head (docs/benchmarks/merging.md).

    python scripts/bench_atlas_shared_head.py               # full suite (built if not cached)
    python scripts/bench_atlas_shared_head.py --smoke       # quick check on the smoke suite
    python scripts/bench_atlas_shared_head.py --write-docs

Four experts share one 8-topic head; each learned two topics. A merged model
is scored on each task's test split (8-way argmax, so a model blind to a task
scores near 0) and on all topics at once. Rows: the base, each expert alone,
task arithmetic, TIES and DARE-TIES with λ chosen on the validation split from
a grid, and aTLAS with its default options learned from 4, 16 and 64 labelled
examples per class, and from 512 unlabelled training texts with the entropy
objective (its best epoch picked by the entropy on those texts: no labels). Every other row picks
its λ or its best epoch on the same validation split (all topics, 400 rows).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "suite"))
sys.path.insert(0, str(HERE))

LAMBDAS = {
    "task-arithmetic": (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0),
    "ties": (0.2, 0.3, 0.5, 0.7, 1.0, 1.5),
    "dare-ties": (0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
}
FIXED = {"ties": {"density": 0.2}, "dare-ties": {"density": 0.5, "seed": 0}}
SHOTS = (4, 16, 64)
ENTROPY_TEXTS = 512  # as many as the 64-shot rows, without their labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--only", help="comma-separated row kinds: fixed, atlas, entropy")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else {"fixed", "atlas", "entropy"}

    import build as suite_build
    from transformers.utils import logging

    import compressor
    from compressor.api import evaluate

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    suite = suite_build.build(suite_build.SMOKE if args.smoke else suite_build.FULL)
    text = suite / "text"
    data = text / "data"
    base = str(text / "base")
    tasks = list(suite_build.TEXT_TASKS)
    experts = [str(text / "experts" / t) for t in tasks]
    work = Path(tempfile.mkdtemp(prefix="merge-quality-"))
    store = compressor.open_store(work / "store")

    def acc(ref, split, on_base=None):
        return evaluate(ref, {"data": str(split)}, base=on_base, store=store)["accuracy"]

    def scores(ref) -> dict:
        row = {t: acc(ref, data / f"{t}-test.jsonl") for t in tasks}
        row["average"] = sum(row[t] for t in tasks) / len(tasks)
        row["all topics"] = acc(ref, data / "all-test.jsonl")
        return row

    rows = []
    try:
        if "fixed" in only:
            rows.append(("base", "", scores(base)))
            for t, e in zip(tasks, experts, strict=True):
                rows.append((f"expert {t} alone", "", scores(e)))
            for plugin, grid in LAMBDAS.items():
                best = None
                for lam in grid:
                    opts = {**FIXED.get(plugin, {}), "scale": lam}
                    rec = compressor.merge(plugin, experts, base=base, options=opts, store=store)
                    v = acc(rec.id, data / "all-val.jsonl")
                    if best is None or v > best[0]:
                        best = (v, lam, rec.id)
                extra = ", ".join(f"{k} {v}" for k, v in FIXED.get(plugin, {}).items())
                note = f"λ {best[1]} (val {best[0]:.3f})" + (f"; {extra}" if extra else "")
                rows.append((plugin, note, scores(best[2])))
        runs = []
        if "atlas" in only:
            runs += [(f"atlas, {s} shots/class (ce)", {"shots": s}) for s in SHOTS]
        if "entropy" in only:
            unlabelled = work / "train-texts.jsonl"
            lines = (data / "all-train.jsonl").read_text().splitlines()
            unlabelled.write_text(
                "".join(json.dumps({"text": json.loads(x)["text"]}) + "\n" for x in lines)
            )
            runs.append(
                (
                    f"atlas, entropy on {ENTROPY_TEXTS} unlabelled train texts",
                    {
                        "objective": "entropy",
                        "data": str(unlabelled),
                        "val": None,
                        "shots": ENTROPY_TEXTS,
                    },
                )
            )
        for label, extra in runs:
            opts = {
                "data": str(data / "all-train.jsonl"),
                "val": str(data / "all-val.jsonl"),
                **extra,
            }
            opts = {k: v for k, v in opts.items() if v is not None}
            t0 = time.time()
            rec = compressor.merge("atlas", experts, base=base, options=opts, store=store)
            took = time.time() - t0
            m = rec.metrics
            note = f"best epoch {m['best_epoch']}, {took:.0f} s"
            rows.append((label, note, scores(rec.id)))
            print(label, note, rows[-1][2], flush=True)
    finally:
        store.close()
        shutil.rmtree(work, ignore_errors=True)

    head = ["model", *tasks, "average", "all topics", "chosen on validation"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 2) + " --- |"]
    for label, note, r in rows:
        cells = [f"{r[t]:.3f}" for t in tasks] + [f"{r['average']:.3f}", f"{r['all topics']:.3f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {note} |")
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        from bench_foundation import write_docs_section

        write_docs_section("atlas-shared-head", table)


if __name__ == "__main__":
    main()
