"""NeuMeta against width, beside the cuts it competes with, at equal training budget.

    python scripts/bench_neumeta_quality.py                 # both tasks, every variant
    python scripts/bench_neumeta_quality.py --only image    # or text
    python scripts/bench_neumeta_quality.py --variants truncate,truncate+sandwich
    python scripts/bench_neumeta_quality.py --smoke         # a quick check of the script
    python scripts/bench_neumeta_quality.py --write-docs

Image: the demo's digits ResNet (basic blocks, stages of 32 and 64 channels) trained on
1,297 digits, scored on the 500 held out. Text: the multi-task suite's "tech" expert
(MiniLM fine-tuned on three fortunes topics: computers, science, linux), scored on every
text of those topics outside its training and validation rows (1,080). NeuMeta variants
are trained once each on the training rows at the widths 1/4, 1/2, 3/4 and 1 only
(``-o grid 4``), then sampled at every width of the table: 1/8 lies below the trained
range, 3/8 and 5/8 between trained widths, so those three are widths it never saw.
Beside them: the untrained cut at each width (MatFormer extraction by activation order
for the text, L1 channel pruning for the ResNet, BatchNorm re-estimated like NeuMeta's
samples), that cut fine-tuned at its width for the same number of steps (one model per
width), and for the text MatFormer's nested training (granularities 1/8-1, the same
steps) then cut.
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

WIDTHS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0)
UNTRAINED = {0.125, 0.375, 0.625}  # below, or between, the trained grid 1/4, 1/2, 3/4, 1
TEXT_EXPERT = "tech"
CALIBRATION_ROWS = 256
VARIANTS = {  # label -> NeuMeta options beyond data, steps, widths 0.25,1 and grid 4
    "pool": {"resample": "pool"},
    "truncate": {"resample": "truncate"},
    "truncate+sandwich": {"resample": "truncate", "sandwich": True},
    "truncate lr/10": {"resample": "truncate", "lr_scale": 0.1},
    "truncate+sandwich lr/10": {"resample": "truncate", "sandwich": True, "lr_scale": 0.1},
}
FINE_TUNED = (0.125, 0.25, 0.5, 0.75)  # widths the one-model-per-width baseline trains at


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def neumeta_rows(store, model: str, common: dict, variants: list[str], score, sample_opts):
    """Train each variant once and score its samples at every width."""
    import compressor

    scores, notes = {}, []
    for label in variants:
        opts = {**common, "widths": "0.25,1", "grid": 4, **VARIANTS[label]}
        opts["lr"] = opts["lr"] * opts.pop("lr_scale", 1.0)
        t0 = time.time()
        gen = compressor.train("neumeta", model, options=opts, store=store)
        seconds = time.time() - t0
        notes.append(
            f"NeuMeta {label}: {gen.metrics['inr_parameters']:,} generator parameters, "
            f"{seconds:.0f} s"
        )
        for w in WIDTHS:
            ref = compressor.sample("neumeta", gen.id, options={"width": w, **sample_opts},
                                    store=store).id  # fmt: skip
            scores[f"neumeta {label}", w] = score(ref)
        print(label, {w: scores[f"neumeta {label}", w] for w in WIDTHS}, flush=True)
    return scores, notes


def text_task(work: Path, store, steps: int, variants: list[str], smoke: bool, baselines: bool):
    import multitask

    import compressor
    from compressor.api import evaluate

    suite = multitask.build(multitask.SMOKE if smoke else multitask.FULL) / "text"
    data = suite / "data"
    base = str(suite / "experts" / TEXT_EXPERT)
    train = str(data / f"{TEXT_EXPERT}-train.jsonl")
    seen = {
        r["text"]
        for split in ("train", "val")
        for r in _rows(data / f"{TEXT_EXPERT}-{split}.jsonl")
    }
    held = [
        {"text": t, "label": label}
        for label, f in enumerate(multitask.TOPIC_TASKS[TEXT_EXPERT])
        for t in multitask.read_fortunes(f)
        if t not in seen
    ]
    test = {"data": _write(work / "text-test.jsonl", held), "max_length": 64}
    calib = work / "calibration.txt"
    calib.write_text(
        "".join(r["text"].replace("\n", " ") + "\n" for r in _rows(Path(train))[:CALIBRATION_ROWS])
    )

    def score(ref):
        return evaluate(ref, test, store=store)["accuracy"]

    common = {"data": train, "steps": steps, "max_length": 64, "lr": 1e-4}
    scores = {("source", 1.0): score(base)}
    notes = [f"{len(held)} test rows, {steps} steps of 16 rows"]
    found, more = neumeta_rows(store, base, common, variants, score, {})
    scores.update(found)
    notes += more

    def cut(model: str, width: float, order: str) -> str:
        opts = {"ffn_ratio": width, "order": order}
        if order == "activation":
            opts.update(data=str(calib), max_length=64)
        return compressor.extract("matformer", model, options=opts, store=store).id

    for w in WIDTHS:
        scores["extract", w] = score(cut(base, w, "activation"))
    if baselines:
        t0 = time.time()
        nested = compressor.train(
            "matformer-train", base,
            options={**common, "granularities": "0.125,0.25,0.5,1"}, store=store,
        ).id  # fmt: skip
        notes.append(f"nested matformer-train {time.time() - t0:.0f} s")
        for w in WIDTHS:
            scores["nested", w] = score(cut(nested, w, "none"))
        for w in FINE_TUNED:
            tuned = compressor.train(
                "matformer-train", cut(base, w, "activation"),
                options={**common, "granularities": "1"}, store=store,
            ).id  # fmt: skip
            scores["fine-tuned", w] = score(tuned)
    return scores, notes


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


def _fine_tune(model, rows, steps: int, lr: float, seed: int = 0) -> None:
    import torch

    from compressor.learning.training import row_batches

    x = torch.tensor([r["pixels"] for r in rows]).unsqueeze(1)
    y = torch.tensor([r["label"] for r in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for pick in row_batches(len(rows), 16, steps, seed):
        loss = model(pixel_values=x[pick], labels=y[pick]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def image_task(work: Path, store, steps: int, variants: list[str], smoke: bool, baselines: bool):
    from transformers import ResNetForImageClassification

    import compressor
    from compressor.demo.digits import load_digits_split, save_digits_resnet, write_rows

    xtr, ytr, xte, yte = load_digits_split()
    base = save_digits_resnet(work / "resnet", epochs=2 if smoke else 8)
    train_path = write_rows(work / "digits-train.jsonl", xtr, ytr)
    train_rows, test_rows = _rows(train_path), _rows(write_rows(work / "t.jsonl", xte, yte))

    def score(ref):
        out = work / f"image-{ref}"
        compressor.export(ref, out, store=store)
        return _accuracy(ResNetForImageClassification.from_pretrained(out), test_rows)

    lr = 3e-3
    scores = {
        ("source", 1.0): _accuracy(ResNetForImageClassification.from_pretrained(base), test_rows)
    }
    notes = [f"{len(test_rows)} test rows, {steps} steps of 16 rows"]
    common = {"data": str(train_path), "steps": steps, "lr": lr}
    found, more = neumeta_rows(store, str(base), common, variants, score, {"data": str(train_path)})
    scores.update(found)
    notes += more
    for w in WIDTHS:
        pruned = pruned_resnet(base, w)
        _recalibrate(pruned, train_rows)
        scores["extract", w] = _accuracy(pruned, test_rows)
        if baselines and w in FINE_TUNED:
            _fine_tune(pruned, train_rows, steps, lr)
            _recalibrate(pruned, train_rows)
            scores["fine-tuned", w] = _accuracy(pruned, test_rows)
    return scores, notes


BASELINES = {
    "text": [
        ("extract", "MatFormer extraction of the source (activation order)"),
        ("nested", "nested matformer-train, then cut"),
        ("fine-tuned", "activation cut, fine-tuned at the width"),
    ],
    "image": [
        ("extract", "L1 channel pruning of the source (BatchNorm re-estimated)"),
        ("fine-tuned", "L1 pruning, fine-tuned at the width"),
    ],
}


def table(task: str, scores: dict, notes: list[str], variants: list[str]) -> list[str]:
    cols = " | ".join(f"{w:g}" + ("*" if w in UNTRAINED else "") for w in WIDTHS)
    lines = [
        f"{task}: accuracy at each width fraction (source at full width "
        f"{scores['source', 1.0]:.3f}; " + "; ".join(notes) + "; * a width NeuMeta never "
        "trained at):",
        "",
        f"| model | {cols} |",
        "| --- |" + " ---: |" * len(WIDTHS),
    ]
    rows = [(f"neumeta {v}", f"NeuMeta, {v}") for v in variants] + BASELINES[task]
    for key, label in rows:
        if not any((key, w) in scores for w in WIDTHS):
            continue
        cells = [f"{scores[key, w]:.3f}" if (key, w) in scores else "" for w in WIDTHS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--only", choices=("text", "image"))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-baselines", action="store_true", help="skip the trained baselines")
    ap.add_argument("--text-steps", type=int, default=60)
    ap.add_argument("--image-steps", type=int, default=600)
    args = ap.parse_args()

    from transformers.utils import logging

    import compressor

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    variants = args.variants.split(",")
    work = Path(tempfile.mkdtemp(prefix="neumeta-quality-"))
    store = compressor.open_store(work / "store")
    lines = []
    baselines = not args.no_baselines
    try:
        if args.only in (None, "image"):
            steps = 20 if args.smoke else args.image_steps
            found = image_task(work, store, steps, variants, args.smoke, baselines)
            lines += table("image", *found, variants)
            print("\n".join(lines), flush=True)
        if args.only in (None, "text"):
            steps = 4 if args.smoke else args.text_steps
            found = text_task(work, store, steps, variants, args.smoke, baselines)
            lines += table("text", *found, variants)
    finally:
        store.close()
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines))
    if args.write_docs:
        from bench_foundation import write_docs_section

        write_docs_section("neumeta-quality", "\n".join(lines), heading="## NeuMeta")


if __name__ == "__main__":
    main()
