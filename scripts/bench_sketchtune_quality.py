"""Quality of SketchTune's sketches beside round-to-nearest and GPTQ at equal bits per weight.

    python scripts/bench_sketchtune_quality.py              # MiniLM and the suite's causal LM
    python scripts/bench_sketchtune_quality.py --write-docs # also update docs/benchmarks.md
    python scripts/bench_sketchtune_quality.py --models minilm --bits 4 --samples 512 \
        --arms "GPTQ g64;sketch G4" --write-docs            # more calibration, some arms

Every linear weight in the layer list of two real models is quantised at 4, 3 and 2 bits
by: round-to-nearest on a min/max grid per group of columns (RTN), GPTQ on the same grid
(error feedback through the Cholesky factor of H⁻¹, block by block, true-sequential:
``compressor.plugins.sketchtune.quantize.assign_codes``, which a test checks against GPTQ written out column
by column; llmcompressor does not install beside torch 2.13 here), and sketches with 1, 2
and 4 tables per row (calibrated, and once without data). Bits per weight count the
scales: RTN/GPTQ b + (16 + b)/group (an fp16 scale and a b-bit zero per group); sketches
b + 16·2^b·G/in (fp16 tables). Scores: MiniLM (all-MiniLM-L6-v2, the real pretrained
encoder) by the mean cosine of its sentence embeddings against the fp32 model's on
held-out text; the suite's causal LM expert by perplexity on its held-out text.
Calibration: 128 training lines (``--samples``; max 128 tokens) taken in turn from each
topic's training file, Hessians from the model quantised so far.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "suite"))
import build as suite_build  # noqa: E402
from bench_foundation import write_docs_section  # noqa: E402

from compressor.io.sources import open_model_dir  # noqa: E402
from compressor.plugins.sketchtune import (  # noqa: E402
    SketchPlan,
    block_tune_lr,
    block_tune_passes,
    calibrate_sequentially,
    calibration_batches,
    sketch_weight,
    tune_layer,
)
from compressor.plugins.sketchtune.quantize import (  # noqa: E402
    activation_order,
    assign_codes,
    inverse_hessian_factor,
    uniform_nearest,
)

# the plugin's defaults; an arm overrides any of them by key
SKETCH = {
    "exponent": None,
    "damp": 0.01,
    "block_size": 128,
    "iters": 30,
    "saliency": "obs",
    "refit": None,
    "act_order": True,
    "block_tune": None,
    "block_tune_lr": None,
}


def quantised(source, arm: dict, calib) -> tuple[dict, float]:
    """{weight name: Ŵ} for every linear of the layer list under one arm, and its bits/weight."""
    plan = SketchPlan(source, arm.get("groups", 1))
    out, bits = {}, 0.0
    pending = {}  # name -> (tables, codes) of the block being sketched
    opts = {**SKETCH, **{key: arm[key] for key in SKETCH if key in arm}}
    opts |= {"bits": arm["bits"], "groups_per_row": arm.get("groups", 1), "data": "calibrated"}

    def one(name, weight, hessian):
        nonlocal bits
        o, i = weight.shape
        if arm["kind"] == "sketch":
            tables, codes, approx, _ = sketch_weight(weight, hessian, opts)
            pending[name] = (tables, codes)
            bits += o * i * arm["bits"] + o * arm["groups"] * 16 * 2 ** arm["bits"]
        else:
            gs = min(arm["group"], i)
            grid = uniform_nearest(weight.float(), arm["bits"], gs)
            u = order = None
            if arm["kind"] == "gptq":
                order = activation_order(hessian) if arm.get("act_order") else None
                u = inverse_hessian_factor(hessian, 0.01, order)[0]
            approx = assign_codes(weight.float(), u, grid, order=order)[1]
            bits += o * i * arm["bits"] + o * (i // gs) * (16 + arm["bits"])
        out[name] = approx.to(weight.dtype)
        return out[name]

    if arm["kind"] == "rtn" or (arm["kind"] == "sketch" and not arm.get("calibrated", True)):
        for name in plan.linears:
            one(name, source.get(name), None)
    else:
        sequential = arm.get("sequential", True)
        passes = block_tune_passes(opts) if arm["kind"] == "sketch" else 0

        def tune(layer, block, calibration, masks, _hessian):
            got = tune_layer(
                plan, layer, block, calibration, masks, pending, passes, block_tune_lr(opts)
            )
            for name, w in (got[1] if got else {}).items():
                out[name] = w.to(out[name].dtype)

        calibrate_sequentially(
            plan,
            calib,
            one,
            lambda k: pending.clear(),
            sequential=sequential,
            tune=tune if passes else None,
        )
    weights = sum(math.prod(source.info(n).shape) for n in plan.linears)
    return out, bits / weights


def minilm_scorer(path: Path, texts: list[str]):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    mask = enc["attention_mask"].unsqueeze(-1).float()

    def embed():
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        return (h * mask).sum(1) / mask.sum(1)

    reference = embed()

    def score(weights: dict) -> float:
        model.load_state_dict({**state, **weights})
        got = embed()
        model.load_state_dict(state)
        return float(torch.nn.functional.cosine_similarity(got, reference, dim=-1).mean())

    return score, "cosine vs fp32", 1.0


def lm_scorer(path: Path, texts: list[str]):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def perplexity() -> float:
        nll, n = 0.0, 0
        with torch.no_grad():
            for line in texts:
                ids = tok(line, truncation=True, max_length=128, return_tensors="pt")["input_ids"]
                if ids.shape[1] < 2:
                    continue
                k = ids.shape[1] - 1
                nll += float(model(input_ids=ids, labels=ids).loss) * k
                n += k
        return math.exp(nll / n)

    base = perplexity()

    def score(weights: dict) -> float:
        model.load_state_dict({**state, **weights})
        got = perplexity()
        model.load_state_dict(state)
        return got

    return score, "perplexity", base


ARMS = [("RTN g64", {"kind": "rtn", "group": 64}), ("RTN g32", {"kind": "rtn", "group": 32})]
ARMS += [("GPTQ g64", {"kind": "gptq", "group": 64}), ("GPTQ g32", {"kind": "gptq", "group": 32})]
ARMS += [("GPTQ g32, act-order", {"kind": "gptq", "group": 32, "act_order": True})]
ARMS += [("sketch G1, no data", {"kind": "sketch", "groups": 1, "calibrated": False})]
ARMS += [("sketch G1, LeanQuant U_jj^-4", {"kind": "sketch", "groups": 1, "saliency": "cholesky"})]
ARMS += [(f"sketch G{g}", {"kind": "sketch", "groups": g}) for g in (1, 2, 4)]
ARMS += [
    (f"sketch G{g}, no act-order", {"kind": "sketch", "groups": g, "act_order": False})
    for g in (1, 4)
]
ARMS += [  # the refit is the default at 3 and 4 bits: these arms differ at 2 only
    (f"sketch G{g}, refit", {"kind": "sketch", "groups": g, "refit": 16, "bits_only": (2,)})
    for g in (1, 2, 4)
]
ARMS += [("sketch G4, damp 0.1", {"kind": "sketch", "groups": 4, "damp": 0.1})]
ARMS += [  # block tuning is the default at 2 bits: these arms leave it out there
    (
        f"sketch G{g}, no block tuning",
        {"kind": "sketch", "groups": g, "block_tune": 0, "bits_only": (2,)},
    )
    for g in (1, 4)
]
ARMS += [  # and these add it at 3 and 4 bits
    (
        f"sketch G{g}, block tuning",
        {"kind": "sketch", "groups": g, "block_tune": 4, "bits_only": (3, 4)},
    )
    for g in (1, 4)
]
ARMS += [
    (
        "sketch G4, damp 0.1, block tuning",
        {"kind": "sketch", "groups": 4, "damp": 0.1, "block_tune": 4, "bits_only": (3, 4)},
    )
]
ARMS += [
    (
        "sketch G4, damp 0.1, refit",
        {"kind": "sketch", "groups": 4, "damp": 0.1, "refit": 16, "bits_only": (2,)},
    )
]


def mixed_calibration(data: Path, out: Path) -> Path:
    """The training lines of every topic, interleaved (the first 128 cover them all, as
    held-out text does): calibration on one topic fits 2-bit tables to that topic."""
    topics = [p.read_text().splitlines() for p in sorted(data.glob("*-train.txt"))]
    lines = [line for row in zip(*topics, strict=False) for line in row if line.strip()]
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration-mixed.txt").write_text("\n".join(lines) + "\n")
    return out / "calibration-mixed.txt"


def packed(lines_file: Path, tokenizer, tokens: int) -> Path:
    """The same lines joined (space-separated) into rows of at least ``tokens`` tokens."""
    rows, row, n = [], [], 0
    for line in lines_file.read_text().splitlines():
        row.append(line)
        n += len(tokenizer(line, add_special_tokens=False)["input_ids"])
        if n >= tokens:
            rows.append(" ".join(row))
            row, n = [], 0
    out = lines_file.with_name(f"calibration-packed-{tokens}.txt")
    out.write_text("\n".join(rows) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--arms", help="only the arms of these names (a list separated by ';')")
    ap.add_argument("--samples", type=int, default=128, help="calibration lines")
    ap.add_argument("--pack", type=int, help="join calibration lines into rows of this many tokens")
    ap.add_argument("--models", default="minilm,lm", help="minilm, lm or both")
    ap.add_argument("--smoke", action="store_true", help="the smoke suite (quick, untrained LM)")
    args = ap.parse_args()
    if args.write_docs and args.pack:
        ap.error("--pack runs are not written to the docs")
    from compressor.demo.models import minilm_dir

    suite = suite_build.build(suite_build.SMOKE if args.smoke else suite_build.FULL)
    data = suite / "lm" / "data"
    calib_file = mixed_calibration(data, HERE.parent / "bench-data" / "sketchtune")
    held_out = [x for x in (data / "all-test.txt").read_text().splitlines() if x.strip()]
    models = [
        ("MiniLM (real, BERT; 384 and 1536 columns)", minilm_dir(), minilm_scorer),
        (
            "suite causal LM expert (Llama, 128 and 256 columns)",
            suite / "lm" / "experts" / "computers",
            lm_scorer,
        ),
    ]
    chosen = args.models.split(",")
    models = [m for m, key in zip(models, ("minilm", "lm"), strict=True) if key in chosen]
    wanted = [want.strip() for want in args.arms.split(";")] if args.arms else []
    unknown = sorted(set(wanted) - {name for name, _ in ARMS})
    if unknown:
        ap.error(f"no arm named {', '.join(map(repr, unknown))}")
    arms = [(name, arm) for name, arm in ARMS if not wanted or name in wanted]
    lines = []
    for label, path, make_scorer in models:
        source = open_model_dir(path)
        rows_file = calib_file
        if args.pack:
            from transformers import AutoTokenizer

            rows_file = packed(calib_file, AutoTokenizer.from_pretrained(path), args.pack)
        calib = calibration_batches(source, str(rows_file), args.samples, 128)
        score, what, full = make_scorer(path, held_out)
        lines += [
            "",
            f"**{label}**: {what}; the fp32 model scores {full:.4f}. Calibration: "
            f"{calib.rows} lines, {calib.tokens:,} tokens.",
            "",
            "| bits | arm | bits/weight | score | time (s) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for b in [int(x) for x in args.bits.split(",")]:
            for name, arm in arms:
                if b not in arm.get("bits_only", (b,)):
                    continue
                t0 = time.perf_counter()
                weights, bpw = quantised(source, {**arm, "bits": b}, calib)
                took = time.perf_counter() - t0
                s = score(weights)
                lines.append(f"| {b} | {name} | {bpw:.2f} | {s:.4f} | {took:.1f} |")
                print(lines[-1], flush=True)
        source.close()
    text = "\n".join(lines).strip()
    print(text)
    if args.write_docs:
        default = args.samples == 128
        command = shlex.join(["python", "scripts/bench_sketchtune_quality.py", *sys.argv[1:]])
        write_docs_section(
            "sketchtune-quality" + ("" if default else f"-{args.samples}"),
            f"Measured by `{command}` ({torch.get_num_threads()} threads).\n\n" + text,
            heading="SketchTune quality: sketches beside RTN and GPTQ at equal bits per weight",
        )


if __name__ == "__main__":
    main()
