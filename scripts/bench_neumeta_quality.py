"""NeuMeta on the evaluation suite: accuracy against width, beside the baselines, and cost.

    python scripts/bench_neumeta_quality.py               # full suite (built if not cached)
    python scripts/bench_neumeta_quality.py --smoke       # quick check on the smoke suite
    python scripts/bench_neumeta_quality.py --write-docs
    python scripts/bench_neumeta_quality.py --only image  # or text

Text: the suite's "tech" expert (MiniLM fully fine-tuned on two fortunes topics), FFN
widths, scored on its 100 test rows. At each width (1/8 ... 1): NeuMeta trained on the
expert's training rows at widths 1/4-1 and sampled there; MatFormer extraction of the
source by activation order (256 training texts); the source after nested
`matformer-train` (granularities 1/8, 1/4, 1/2, 1; the same steps), cut in stored order;
and the activation-order cut fine-tuned at that width for the same number of steps.
Image: the suite's digits ResNet, stage channel widths. NeuMeta the same way (BatchNorm
statistics re-estimated on 256 training rows at every width); MatFormer does not cut
ResNets, so the extraction baseline is L1 channel pruning (the channels whose filters
have the largest L1 norm, per stage, BatchNorm re-estimated the same way), and the
fine-tuned baseline that pruned model trained at its width for the same steps.
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

WIDTHS = (0.125, 0.25, 0.375, 0.5, 0.75, 1.0)
TRAINED = "0.25,1"
TEXT_EXPERT = "tech"  # the suite's MiniLM fine-tuned on two topics (computers, science)
CALIBRATION_ROWS = 256


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _train_generator(store, model: str, options: dict):
    """Train NeuMeta on ``model``; the artifact and its cost (time, sizes)."""
    import compressor

    t0 = time.time()
    gen = compressor.train("neumeta", model, options=options, store=store)
    cost = {
        "train_s": time.time() - t0,
        "inr": gen.metrics["inr_parameters"],
        "width_params": gen.metrics["width_parameters"],
    }
    return gen, cost


def text_task(suite: Path, work: Path, store, steps: int) -> tuple[dict, list[str], dict]:
    import compressor
    from compressor.api import evaluate

    data = suite / "text" / "data"
    base = str(suite / "text" / "experts" / TEXT_EXPERT)  # a trained classifier: the source
    train = str(data / f"{TEXT_EXPERT}-train.jsonl")
    test = {"data": str(data / f"{TEXT_EXPERT}-test.jsonl"), "max_length": 64}
    calib = work / "calibration.txt"
    calib.write_text(
        "".join(r["text"].replace("\n", " ") + "\n" for r in _rows(Path(train))[:CALIBRATION_ROWS])
    )
    common = {"data": train, "steps": steps, "max_length": 64}
    scores, notes = {}, []
    scores["source", 1.0] = evaluate(base, test, store=store)["accuracy"]

    def cut(model: str, width: float, order: str) -> str:
        opts = {"ffn_ratio": width, "order": order}
        if order == "activation":
            opts.update(data=str(calib), max_length=64)
        return compressor.extract("matformer", model, options=opts, store=store).id

    gen, cost = _train_generator(store, base, {**common, "widths": TRAINED})
    notes.append(f"NeuMeta {steps} steps of 16 rows at widths {TRAINED}: {cost['train_s']:.0f} s")
    t0 = time.time()
    nested = compressor.train(
        "matformer-train",
        base,
        options={**common, "granularities": "0.125,0.25,0.5,1", "lr": 1e-4},
        store=store,
    ).id
    notes.append(f"nested matformer-train {steps} steps: {time.time() - t0:.0f} s")
    print(notes, flush=True)
    sample_s = []
    for w in WIDTHS:
        t0 = time.time()
        ref = compressor.sample("neumeta", gen.id, options={"width": w}, store=store).id
        sample_s.append(time.time() - t0)
        scores["neumeta", w] = evaluate(ref, test, store=store)["accuracy"]
        cut_ref = cut(base, w, "activation")
        scores["extract", w] = evaluate(cut_ref, test, store=store)["accuracy"]
        scores["nested", w] = evaluate(cut(nested, w, "none"), test, store=store)["accuracy"]
        tuned = compressor.train(
            "matformer-train",
            cut_ref,
            options={**common, "granularities": "1", "lr": 1e-4},
            store=store,
        ).id
        scores["fine-tuned", w] = evaluate(tuned, test, store=store)["accuracy"]
        print(w, {k: v for k, v in scores.items() if k[1] == w}, flush=True)
    cost["sample_s"] = sum(sample_s) / len(sample_s)
    return scores, notes, cost


def _accuracy(model, rows) -> float:
    import torch

    x = torch.tensor([r["pixels"] for r in rows], dtype=torch.float32).unsqueeze(1)
    y = torch.tensor([r["label"] for r in rows])
    model.eval()
    with torch.no_grad():
        return float((model(pixel_values=x).logits.argmax(-1) == y).float().mean())


def _recalibrate(model, rows) -> None:
    import torch

    from compressor.plugins.neumeta import reestimate_batch_norms

    x = torch.tensor([r["pixels"] for r in rows[:CALIBRATION_ROWS]]).unsqueeze(1)
    reestimate_batch_norms(model, ({"pixel_values": chunk} for chunk in x.split(64)))


def pruned_resnet(directory: Path, width: float):
    """L1 channel pruning: per stage, the channels whose writing filters have the largest
    L1 norm (summed over the stage's convolutions), every coupled tensor sliced."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    from compressor.io.sources import open_model_dir
    from compressor.models.architectures import WidthLayout

    source = open_model_dir(directory)
    layout = WidthLayout(source)
    widths = layout.widths_at(width)
    keep = {}
    for group, full in layout.groups.items():
        score = torch.zeros(full)
        for name, spec in layout.tensors.items():
            for axis in spec.axes:
                if (
                    axis.group == group
                    and axis.pool == "mean"
                    and name.endswith("convolution.weight")
                ):
                    t = source.get(name).float()
                    score += t.abs().movedim(axis.dim, 0).reshape(full, -1).sum(1)
        keep[group] = score.argsort(descending=True)[: widths[group]].sort().values
    state = {}
    for name in source.names():
        t = source.get(name)
        for axis in getattr(layout.tensors.get(name), "axes", ()):
            t = t.index_select(axis.dim, keep[axis.group])
        state[name] = t
    model = ResNetForImageClassification(ResNetConfig.from_dict(layout.resized_config(widths)))
    model.load_state_dict(state)
    source.close()
    return model


def _fine_tune(model, rows, steps: int, seed: int = 0) -> None:
    import torch

    from compressor.learning.training import row_batches

    x = torch.tensor([r["pixels"] for r in rows]).unsqueeze(1)
    y = torch.tensor([r["label"] for r in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    model.train()
    for pick in row_batches(len(rows), 16, steps, seed):
        loss = model(pixel_values=x[pick], labels=y[pick]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def image_task(suite: Path, work: Path, store, steps: int) -> tuple[dict, list[str], dict]:
    from transformers import ResNetForImageClassification

    import compressor

    data = suite / "image" / "data"
    base = suite / "image" / "base"
    train_rows, test_rows = _rows(data / "clean-train.jsonl"), _rows(data / "clean-test.jsonl")
    scores, notes = {}, []
    scores["source", 1.0] = _accuracy(ResNetForImageClassification.from_pretrained(base), test_rows)
    opts = {"data": str(data / "clean-train.jsonl"), "steps": steps, "lr": 3e-3, "widths": TRAINED}
    gen, cost = _train_generator(store, str(base), opts)
    notes.append(f"NeuMeta {steps} steps of 16 rows at widths {TRAINED}: {cost['train_s']:.0f} s")
    sample_s = []
    for w in WIDTHS:
        t0 = time.time()
        ref = compressor.sample(
            "neumeta",
            gen.id,
            options={"width": w, "data": str(data / "clean-train.jsonl")},
            store=store,
        ).id
        sample_s.append(time.time() - t0)
        out = work / f"image-{w}"
        compressor.export(ref, out, store=store)
        scores["neumeta", w] = _accuracy(
            ResNetForImageClassification.from_pretrained(out), test_rows
        )
        pruned = pruned_resnet(base, w)
        _recalibrate(pruned, train_rows)
        scores["extract", w] = _accuracy(pruned, test_rows)
        _fine_tune(pruned, train_rows, steps)
        _recalibrate(pruned, train_rows)
        scores["fine-tuned", w] = _accuracy(pruned, test_rows)
        print(w, {k: v for k, v in scores.items() if k[1] == w}, flush=True)
    cost["sample_s"] = sum(sample_s) / len(sample_s)
    return scores, notes, cost


ROWS = {
    "text": [
        ("neumeta", "NeuMeta, sampled"),
        ("extract", "MatFormer extraction of the source (activation order)"),
        ("nested", "nested matformer-train, then cut"),
        ("fine-tuned", "activation cut, fine-tuned at the width"),
    ],
    "image": [
        ("neumeta", "NeuMeta, sampled (BatchNorm re-estimated)"),
        ("extract", "L1 channel pruning of the source (BatchNorm re-estimated)"),
        ("fine-tuned", "L1 pruning, fine-tuned at the width"),
    ],
}


def table(task: str, scores: dict, notes: list[str], cost: dict) -> list[str]:
    cols = " | ".join(f"{w:g}" for w in WIDTHS)
    lines = [
        f"{task}: accuracy at each width fraction (source at full width: "
        f"{scores['source', 1.0]:.3f}; " + "; ".join(notes) + "):",
        "",
        f"| model | {cols} |",
        "| --- |" + " ---: |" * len(WIDTHS),
    ]
    for key, label in ROWS[task]:
        lines.append(f"| {label} | " + " | ".join(f"{scores[key, w]:.3f}" for w in WIDTHS) + " |")
    lines += [
        "",
        f"Cost: generator {cost['inr']:,} parameters for {cost['width_params']:,} width "
        f"parameters ({cost['inr'] / cost['width_params']:.1%}); training {cost['train_s']:.0f} "
        f"s on this machine; sampling {cost['sample_s']:.1f} s per width (in-process, with "
        "the commit).",
        "",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--only", choices=("text", "image"))
    ap.add_argument("--text-steps", type=int, default=60)
    ap.add_argument("--image-steps", type=int, default=600)
    args = ap.parse_args()

    import build as suite_build
    from transformers.utils import logging

    import compressor

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    suite = suite_build.build(suite_build.SMOKE if args.smoke else suite_build.FULL)
    work = Path(tempfile.mkdtemp(prefix="neumeta-quality-"))
    store = compressor.open_store(work / "store")
    lines = []
    try:
        if args.only in (None, "image"):
            steps = 20 if args.smoke else args.image_steps
            lines += table("image", *image_task(suite, work, store, steps))
            print("\n".join(lines), flush=True)
        if args.only in (None, "text"):
            steps = 10 if args.smoke else args.text_steps
            lines += table("text", *text_task(suite, work, store, steps))
    finally:
        store.close()
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines))
    if args.write_docs:
        from bench_foundation import write_docs_section

        write_docs_section("neumeta-quality", "\n".join(lines), heading="## NeuMeta")


if __name__ == "__main__":
    main()
