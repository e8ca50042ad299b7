"""Wall time and peak RSS of `compress extract -p matformer` beside copying the same files.

    python scripts/bench_matformer.py                # ~1.5B-parameter Llama-style model, bf16
    python scripts/bench_matformer.py --layers 2     # a quick smoke run
    python scripts/bench_matformer.py --write-docs   # also update docs/benchmarks.md

A synthetic Llama-shaped checkpoint (random bf16 weights in 2 GB shards, as
transformers saves them) is cut to half-width FFNs, with the neurons in their
stored order and sorted by weight importance (which reads every FFN tensor
twice), and to a Mix'n'Match of skipped layers. The yardstick is `cp -r` of
the model directory into the same file system. Each command runs in its own
process, so the peak RSS is its own; the page cache is warm for all of them.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_foundation import build_model, measure, write_docs_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()

    compress = str(Path(sys.executable).with_name("compress"))
    work = Path(tempfile.mkdtemp(prefix="bench-matformer-", dir=os.environ.get("TMPDIR")))
    try:
        src = work / "model"
        print(f"building a {args.layers}-layer model ...", flush=True)
        params = build_model(src, args.layers, args.hidden, args.ffn, args.vocab, seed=0)
        from compressor.demo.models import save_word_tokenizer, zen_lines

        save_word_tokenizer(src, zen_lines(), args.vocab)  # for the calibration run
        calib = work / "calib.txt"
        calib.write_text("\n".join((zen_lines() * 2)[:32]) + "\n")
        size = sum(f.stat().st_size for f in src.iterdir() if f.suffix == ".safetensors")
        store = {"COMPRESSOR_STORE": str(work / "store")}
        skip = ",".join(
            str(i) for i in range(args.layers // 2, args.layers // 2 + args.layers // 6)
        )
        runs = [
            ("cp -r (the yardstick)", ["cp", "-r", str(src), str(work / "copy")]),
            ("ffn_ratio 0.5", ["-o", "ffn_ratio", "0.5"]),
            ("ffn_ratio 0.5, order weight", ["-o", "ffn_ratio", "0.5", "-o", "order", "weight"]),
            (
                f"ffn_ratio 0.25, skip_layers {skip}",
                ["-o", "ffn_ratio", "0.25", "-o", "skip_layers", skip],
            ),
            (
                "ffn_ratio 0.5, order activation (32 calibration rows, block by block)",
                ["-o", "ffn_ratio", "0.5", "-o", "order", "activation", "-o", "data", str(calib)],
            ),
        ]
        for f in src.glob(
            "*.safetensors"
        ):  # warm the page cache, so every run reads from memory alike
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
        rows = []
        copy_wall = None
        for label, cmd in runs:
            if cmd[0] != "cp":
                cmd = [compress, "--quiet", "extract", "-p", "matformer", str(src), *cmd]
            wall, rss = measure(cmd, env=store)
            copy_wall = copy_wall or wall
            rows.append((label, wall, wall / copy_wall, rss))
            print(f"{label}: {wall:.1f} s, {rss:.2f} GB", flush=True)
            shutil.rmtree(work / "copy", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    head = (
        f"{params / 1e9:.2f}B parameters ({args.layers} layers, hidden {args.hidden}, "
        f"d_ff {args.ffn}), bf16, {size / 1e9:.1f} GB in 2 GB shards; "
        f"{os.cpu_count()} cores, {platform.machine()}, torch {__import__('torch').__version__}"
    )
    lines = [head, "", "| run | wall s | × cp -r | peak RSS GB |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {label} | {w:.1f} | {r:.2f} | {m:.2f} |" for label, w, r, m in rows]
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        write_docs_section("matformer-speed", table)


if __name__ == "__main__":
    main()
