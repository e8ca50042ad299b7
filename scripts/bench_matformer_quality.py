"""How much of a model survives MatFormer cuts, on the evaluation suite (docs/benchmarks.md).

    python scripts/bench_matformer_quality.py               # full suite (built if not cached)
    python scripts/bench_matformer_quality.py --smoke       # quick check on the smoke suite
    python scripts/bench_matformer_quality.py --write-docs

Two tables. Classification: the suite's MiniLM with its 8-topic head is
fine-tuned on all topics twice with the same budget: plainly (`matformer-train
-o granularities 1`) and nested (granularities 1/8, 1/4, 1/2, 1). The plain
model is cut at each ratio with neurons in stored order, by weight importance
and by activation importance (256 training texts), the nested one in stored
order; each cut is scored on the 400 test rows of all topics. Embeddings: the
pretrained MiniLM (no training) cut the same three ways, scored by cosine
agreement of its mean-pooled sentence embeddings with the uncut model's.
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

RATIOS = (0.125, 0.25, 0.5, 1.0)
ORDERS = ("none", "weight", "activation")
CALIBRATION_ROWS = 256


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()

    import build as suite_build
    from transformers.utils import logging

    import compressor
    from compressor.api import evaluate
    from compressor.demo.models import minilm_dir

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    suite = suite_build.build(suite_build.SMOKE if args.smoke else suite_build.FULL)
    data = suite / "text" / "data"
    steps = 10 if args.smoke else args.steps
    work = Path(tempfile.mkdtemp(prefix="matformer-quality-"))
    store = compressor.open_store(work / "store")
    calib = work / "calibration.txt"
    train_rows = [json.loads(x) for x in (data / "all-train.jsonl").read_text().splitlines()]
    calib.write_text(
        "".join(r["text"].replace("\n", " ") + "\n" for r in train_rows[::6][:CALIBRATION_ROWS])
    )
    texts = work / "test-texts.txt"
    test_rows = [json.loads(x) for x in (data / "all-test.jsonl").read_text().splitlines()]
    texts.write_text("".join(r["text"].replace("\n", " ") + "\n" for r in test_rows))

    def cut(model: str, ratio: float, order: str) -> str:
        opts = {"ffn_ratio": ratio, "order": order}
        if order == "activation":
            opts.update(data=str(calib), max_length=64)
        return compressor.extract("matformer", model, options=opts, store=store).id

    classify, embed, notes = {}, {}, []
    try:
        trained = {}
        for label, grans in (("plain", "1"), ("nested", "0.125,0.25,0.5,1")):
            t0 = time.time()
            opts = {
                "data": str(data / "all-train.jsonl"),
                "granularities": grans,
                "steps": steps,
                "lr": 1e-4,
                "max_length": 64,
            }
            base = str(suite / "text" / "base")
            trained[label] = compressor.train("matformer-train", base, options=opts, store=store).id
            notes.append(f"{label}: {steps} steps of 16 rows in {time.time() - t0:.0f} s")
            print(notes[-1], flush=True)
        test = {"data": str(data / "all-test.jsonl"), "max_length": 64}
        for ratio in RATIOS:
            for order in ORDERS:
                ref = cut(trained["plain"], ratio, order)
                classify[("fine-tuned", order, ratio)] = evaluate(ref, test, store=store)[
                    "accuracy"
                ]
            ref = cut(trained["nested"], ratio, "none")
            classify[("nested", "none", ratio)] = evaluate(ref, test, store=store)["accuracy"]
            print(ratio, {k: v for k, v in classify.items() if k[2] == ratio}, flush=True)
        minilm = str(minilm_dir())
        for ratio in RATIOS:
            for order in ORDERS:
                ref = cut(minilm, ratio, order)
                opts = {"data": str(texts), "reference": minilm, "max_length": 64}
                embed[(order, ratio)] = evaluate(ref, opts, store=store)["cosine"]
            print(ratio, {k: v for k, v in embed.items() if k[1] == ratio}, flush=True)
    finally:
        store.close()
        shutil.rmtree(work, ignore_errors=True)

    cols = " | ".join(f"d_ff·{r:g}" for r in RATIOS)
    lines = [
        "Classification accuracy, 8 topics, 400 test rows (" + "; ".join(notes) + "):",
        "",
        f"| model | neuron order | {cols} |",
        "| --- | --- |" + " ---: |" * len(RATIOS),
    ]
    for model, order in [("fine-tuned", o) for o in ORDERS] + [("nested", "none")]:
        cells = " | ".join(f"{classify[(model, order, r)]:.3f}" for r in RATIOS)
        lines.append(f"| {model} | {order} | {cells} |")
    lines += [
        "",
        "Pretrained MiniLM, cosine agreement of sentence embeddings with the uncut model "
        "(400 test texts):",
        "",
        f"| neuron order | {cols} |",
        "| --- |" + " ---: |" * len(RATIOS),
    ]
    for order in ORDERS:
        cells = " | ".join(f"{embed[(order, r)]:.3f}" for r in RATIOS)
        lines.append(f"| {order} | {cells} |")
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        from bench_foundation import write_docs_section

        write_docs_section("matformer-quality", table)


if __name__ == "__main__":
    main()
