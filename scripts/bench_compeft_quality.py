"""ComPEFT quality on the evaluation suite's MiniLM experts (docs/benchmarks.md).

    python scripts/bench_compeft_quality.py               # full suite (built if not cached)
    python scripts/bench_compeft_quality.py --smoke       # quick check on the smoke suite
    python scripts/bench_compeft_quality.py --write-docs

For each text expert: test accuracy uncompressed, and compressed with ComPEFT at
densities 0.05, 0.1, 0.2 with alpha 1, alpha auto, and the alpha of a small
grid that scores best on the validation split; the compression ratio beside
each (against the expert's float32 task vector, and against the fp32 model).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "suite"))
sys.path.insert(0, str(HERE))

DENSITIES = (0.05, 0.1, 0.2)
ALPHA_GRID = ("0.5", "1", "2", "4", "8", "16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()

    import build as suite_build
    from transformers.utils import logging

    import compressor
    from compressor.api import evaluate

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    suite = suite_build.build(suite_build.SMOKE if args.smoke else suite_build.FULL)
    text = suite / "text"
    base = str(text / "base")
    work = Path(tempfile.mkdtemp(prefix="compeft-quality-"))
    store = compressor.open_store(work / "store")
    rows = []
    try:
        for task in suite_build.TEXT_TASKS:
            test = str(text / "data" / f"{task}-test.jsonl")
            val = str(text / "data" / f"{task}-val.jsonl")
            expert = str(text / "experts" / task)
            tv = compressor.apply("task-vector", expert, base=base, name=f"{task}-tv", store=store)

            def acc(ref, data):
                return evaluate(ref, {"data": data}, base=base, store=store)["accuracy"]

            row = {
                "task": task,
                "base": evaluate(base, {"data": test}, store=store)["accuracy"],
                "expert": acc(tv.id, test),
            }
            for k in DENSITIES:
                results = {}
                for alpha in ("1", "auto", *ALPHA_GRID):
                    if alpha in results:
                        continue
                    c = compressor.apply(
                        "compeft",
                        tv.id,
                        name=f"{task}-{k}-{alpha}",
                        options={"density": k, "alpha": alpha},
                        store=store,
                    )
                    results[alpha] = (c, acc(c.id, val))
                best = max(ALPHA_GRID, key=lambda a: results[a][1])
                row[k] = {
                    "alpha 1": acc(results["1"][0].id, test),
                    "alpha auto": acc(results["auto"][0].id, test),
                    "best alpha": best,
                    "best": acc(results[best][0].id, test),
                    "bits_per_param": results["1"][0].metrics["bits_per_param"],
                    "ratio_fp32": 32 / results["1"][0].metrics["bits_per_param"],
                }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    finally:
        store.close()
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        f"Suite `{'smoke' if args.smoke else 'full'}`, text experts (test accuracy on the "
        "expert's own two topics, 8-way head). Ratio: 32 bits of a float32 task-vector entry "
        "over ComPEFT's measured bits per parameter.",
        "",
        "| expert | base | uncompressed | density | ratio | alpha 1 | alpha auto | "
        "best alpha on val (α) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        for k in DENSITIES:
            r = row[k]
            lines.append(
                f"| {row['task']} | {row['base']:.3f} | {row['expert']:.3f} | {k} | "
                f"{r['ratio_fp32']:.0f}x | {r['alpha 1']:.3f} | {r['alpha auto']:.3f} | "
                f"{r['best']:.3f} ({r['best alpha']}) |"
            )
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        from bench_foundation import write_docs_section

        write_docs_section("compeft-quality", table)


if __name__ == "__main__":
    main()
