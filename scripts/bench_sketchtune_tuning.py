"""Fine-tuning a sketch's tables beside PEFT LoRA at equal trainable parameters.

    python scripts/bench_sketchtune_tuning.py               # the full suite
    python scripts/bench_sketchtune_tuning.py --write-docs  # also update docs/benchmarks.md
    python scripts/bench_sketchtune_tuning.py --only text --seeds 0,1,2  # means over seeds
    python scripts/bench_sketchtune_tuning.py --arms "lora;512"  # arms whose names hold these

Two tasks of the evaluation suite: the text task (MiniLM with an 8-topic head, every
topic's training rows; accuracy on the test rows) and the LM task (the suite's Llama on
one topic's lines; perplexity on its held-out lines). Arms, all trained by the same loop
(``compressor.learning.training.Trainer``, AdamW, clipping 1.0, the same rows in the same order):

- LoRA (PEFT) at rank 8·G on every linear of the layer list, on the fp32 base;
- QLoRA-like: the same LoRA on a base rounded to 4 bits (RTN, groups of 64 columns);
- SketchTune: a 4-bit sketch with G tables per row (calibrated on the training text),
  tables tuned, codes frozen. Trainable entries Σ rows·G·16 = LoRA's r·(in + out) at
  r = 8·G on square layers. Twice: calibrated by default (128 rows), and on 512 rows
  with block tuning (the better base the README recommends; the same size). Each sketch
  is made once; every fit tunes a fresh copy of its tables.

Each arm's learning rate is the best of its grid on the validation rows at the first
seed (LoRA 3e-4 and 1e-3; the sketch 3e-4, 1e-3 and 3e-3: its best was the top of
1e-4-3e-4); with ``--seeds``, the others train again at that rate in their own row
order, and val and test are means. Heads stay frozen
in every arm (only the adapter or the tables learn). Base size: what must be stored
beside the trainable part (fp32; 4-bit codes with fp16 scales; the sketch).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "suite"))
import build as suite_build  # noqa: E402
from bench_foundation import write_docs_section  # noqa: E402

from compressor.learning.data import read_examples  # noqa: E402
from compressor.learning.tasks import Task  # noqa: E402
from compressor.learning.training import Trainer, row_batches  # noqa: E402
from compressor.plugins.sketchtune.quantize import assign_codes, uniform_nearest  # noqa: E402

LRS = {"lora": (3e-4, 1e-3), "qlora-like": (3e-4, 1e-3), "sketch": (3e-4, 1e-3, 3e-3)}


def train(net, params, task, split, steps: int, lr: float, batch: int, seed: int) -> None:
    torch.manual_seed(seed)
    trainer = Trainer(params, lr=lr, weight_decay=0.0, clip=1.0)
    net.train()
    for pick in row_batches(len(split.rows), batch, steps, seed):
        x, y = task.batch(split, pick)

        def piece(x=x, y=y):
            total, n = task.loss(net(**x).logits, x, y)
            return total / max(n, 1), 1

        trainer.step([piece])
    net.eval()


def lora_arm(base: Path, rank: int, head: str, quantise: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if head == "lm" else AutoModelForSequenceClassification
    net = cls.from_pretrained(base)
    linears = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    layered = [n for n in linears if ".layers." in n or ".layer." in n]
    if quantise:
        with torch.no_grad():
            for n in layered:
                w = net.get_submodule(n).weight
                gs = min(64, w.shape[1])
                w.copy_(assign_codes(w.float(), None, uniform_nearest(w.float(), 4, gs))[1])
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=layered, lora_dropout=0.0)
    net = get_peft_model(net, config)
    params = [p for p in net.parameters() if p.requires_grad]
    weights = sum(
        net.get_submodule(n).base_layer.weight.numel()
        for n in (f"base_model.model.{x}" for x in layered)
    )
    other = sum(p.numel() for p in net.parameters() if not p.requires_grad) - weights
    base_bytes = other * 4 + (weights * (4 + 20 / 64) / 8 if quantise else weights * 4)
    return net, params, base_bytes


def sketch_arm(base: Path, groups: int, data: Path, store: Path, samples: int = 128, **extra):
    """The sketch's net and tables; the sketch is made once in ``store``, and every fit
    tunes a fresh copy of its tables (training never writes to the store)."""
    from compressor import api
    from compressor.app.refs import resolve
    from compressor.models.modeling import source_model
    from compressor.plugins.sketchtune import swap_in_sketches
    from compressor.store import open_store

    if not store.exists():
        opts = {"groups_per_row": groups, "data": str(data), "samples": samples, "max_length": 64}
        api.apply("sketchtune", str(base), options=opts | extra, store=store, name="sketch")
    st = open_store(store)
    sketch = resolve(st, "sketch").source
    ctx = source_model(sketch, "saved")
    net, _ = ctx.__enter__()
    params = list(swap_in_sketches(net, sketch).values())
    return net, params, st.resolve("sketch").bytes - sum(p.numel() for p in params) * 2


def fit(make, task, splits, steps: int, lr: float, seed: int, work: Path):
    """Train one arm at one learning rate and seed: (val, test, trainable, base bytes, s)."""
    train_split, val_split, test_split = splits
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        net, params, base_bytes = make(Path(tmp))
        train(net, params, task, train_split, steps, lr, 16, seed=seed)

        def fwd(x, net=net):
            return net(**x).logits

        v, t = task.metrics(fwd, val_split), task.metrics(fwd, test_split)
    trainable = sum(p.numel() for p in params)
    return v, t, trainable, base_bytes, time.perf_counter() - t0


def run_task(label, base, head, rows, val, test, steps, arms, work, seeds=(0,)):
    """One task's table: each arm's learning rate picked on the validation rows at the
    first seed, then the arm trained again at that rate for every other seed (the order
    of the training rows); val and test are the means over the seeds."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    config = AutoConfig.from_pretrained(base)
    objective = "lm" if head == "lm" else "ce"
    key = "accuracy" if objective == "ce" else "perplexity"
    task = Task(objective, config, tok, max_length=64)
    splits = (
        task.split(rows, "train", 16),
        task.split(val, "val", 32),
        task.split(test, "test", 32),
    )
    by_seed = len(seeds) > 1
    lines = [
        "",
        f"**{label}** ({steps} steps of 16 rows"
        + (f"; means over training-order seeds {', '.join(map(str, seeds))}" if by_seed else "")
        + "):",
        "",
        "| arm | trainable | base stored | lr | val | test |"
        + (" test by seed |" if by_seed else "")
        + " time (s) |",
        "| --- | ---: | ---: | --- | --- | --- |" + (" --- |" if by_seed else "") + " ---: |",
    ]
    for name, make in arms:
        best = None
        for lr in LRS[name.split()[0]]:
            got = fit(make, task, splits, steps, lr, seeds[0], work)
            if best is None or task.score(got[0]) > task.score(best[1][0]):
                best = (lr, got)
        lr, (v, t, trainable, base_bytes, took) = best
        vals, tests = [v[key]], [t[key]]
        for seed in seeds[1:]:
            v, t, *_ = fit(make, task, splits, steps, lr, seed, work)
            vals.append(v[key])
            tests.append(t[key])
        lines.append(
            f"| {name} | {trainable:,} | {base_bytes / 1e6:.1f} MB | {lr:g} | "
            f"{sum(vals) / len(vals):.4f} | {sum(tests) / len(tests):.4f} |"
            + (f" {' / '.join(f'{x:.4f}' for x in tests)} |" if by_seed else "")
            + f" {took:.0f} |"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--only", choices=("text", "lm"), help="one task")
    ap.add_argument("--arms", help="only the arms whose name contains one of these (';' list)")
    ap.add_argument(
        "--seeds", default="0", help="training-order seeds (comma list); lr picked at the first"
    )
    args = ap.parse_args()
    seeds = tuple(int(x) for x in args.seeds.split(","))
    suite = suite_build.build(suite_build.SMOKE if args.smoke else suite_build.FULL)
    work = Path(tempfile.mkdtemp(prefix="bench-sketchtune-"))
    g, rank = args.groups, 8 * args.groups
    lines = []
    for label, base, head, data_dir, stem, calib in (
        (
            "text task: MiniLM, 8 topics",
            suite / "text" / "base",
            "ce",
            suite / "text" / "data",
            "all",
            None,
        ),
        (
            "LM task: suite Llama on computers",
            suite / "lm" / "base",
            "lm",
            suite / "lm" / "data",
            "computers",
            None,
        ),
    ):
        if args.only and args.only != ("text" if head == "ce" else "lm"):
            continue
        if head == "ce":
            rows = read_examples(data_dir / "all-train.jsonl")
            val, test = (
                read_examples(data_dir / "all-val.jsonl"),
                read_examples(data_dir / "all-test.jsonl"),
            )
            calib = work / "calib.txt"
            calib.write_text("\n".join(r.text for r in rows[:512]) + "\n")
        else:
            rows = read_examples(data_dir / f"{stem}-train.txt")
            held = read_examples(data_dir / f"{stem}-test.txt")
            val, test = held, held
            calib = data_dir / f"{stem}-train.txt"
        key = "text" if head == "ce" else "lm"
        arms = [
            (f"lora r{rank} (fp32 base)", lambda tmp, b=base, h=head: lora_arm(b, rank, h, False)),
            (
                f"qlora-like r{rank} (RTN 4-bit base)",
                lambda tmp, b=base, h=head: lora_arm(b, rank, h, True),
            ),
            (
                f"sketch G{g} (4-bit)",
                lambda tmp, b=base, c=calib, s=work / f"sketch-{key}": sketch_arm(b, g, c, s),
            ),
            (
                f"sketch G{g} (4-bit; 512 calibration rows, block tuning)",
                lambda tmp, b=base, c=calib, s=work / f"sketch-{key}-512": sketch_arm(
                    b, g, c, s, samples=512, block_tune=4
                ),
            ),
        ]
        if args.arms:
            arms = [arm for arm in arms if any(want in arm[0] for want in args.arms.split(";"))]
        lines += run_task(label, base, head, rows, val, test, args.steps, arms, work, seeds)
    text = "\n".join(lines).strip()
    print(text)
    if args.write_docs:
        write_docs_section(
            "sketchtune-tuning",
            f"Measured by `python scripts/bench_sketchtune_tuning.py --write-docs` "
            f"({torch.get_num_threads()} threads).\n\n" + text,
            heading="SketchTune fine-tuning beside LoRA and a QLoRA-like arm",
        )


if __name__ == "__main__":
    main()
