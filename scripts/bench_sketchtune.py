"""Wall time and peak RSS of `compress apply -p sketchtune` beside round-to-nearest.

    python scripts/bench_sketchtune.py                 # the 1.5B shape, 4 of its 30 layers
    python scripts/bench_sketchtune.py --layers 30     # the whole 1.48B model (slow on 2 cores)
    python scripts/bench_sketchtune.py --write-docs    # also update docs/benchmarks.md
    python scripts/bench_sketchtune.py --layers 1 --calibrated-only --bits 2 -o block_tune 0

A synthetic Llama-shaped checkpoint (hidden 2048, d_ff 5632, vocab 32000, bf16, the
shape bench_matformer.py cuts at 1.48B) is sketched at 4 bits (``--bits``), 4 tables per
row, without data and with 128 calibration rows of 128 tokens (block by block, true-sequential). The
yardstick is round-to-nearest at 4 bits with groups of 64 columns, streamed tensor by
tensor into a safetensors artifact by the same writer (the cheapest way to 4 bits).
Peak RSS does not grow with the layer count (one layer, the embeddings and the
calibration states are in memory); time grows linearly with it, so Mparam/s of the
layers measured holds for the whole model. Each command runs in its own process.
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

RTN = """
import sys
from pathlib import Path
from compressor.plugins.sketchtune.quantize import assign_codes, pack_codes, uniform_nearest
from compressor.io.sources import open_model_dir
from compressor.io.writer import ArtifactWriter
src = open_model_dir(Path(sys.argv[1]))
out = ArtifactWriter(Path(sys.argv[2]))
for name in src.names():
    t = src.get(name)
    if name.endswith("proj.weight") and ".layers." in name:
        codes, _ = assign_codes(t.float(), None, uniform_nearest(t.float(), 4, 64))
        out.write(name + ".codes", pack_codes(codes, 4))
    else:
        out.write(name, t)
out.finish()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--calibrated-only", action="store_true", help="skip the RTN and no-data runs")
    ap.add_argument("--bits", type=int, default=4, help="bits of the sketches (2, 3 or 4)")
    ap.add_argument(
        "-o",
        dest="options",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="a sketchtune option for the calibrated run (repeatable)",
    )
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()

    compress = str(Path(sys.executable).with_name("compress"))
    work = Path(tempfile.mkdtemp(prefix="bench-sketchtune-", dir=os.environ.get("TMPDIR")))
    try:
        src = work / "model"
        print(f"building a {args.layers}-layer model ...", flush=True)
        params = build_model(src, args.layers, args.hidden, args.ffn, args.vocab, seed=0)
        from compressor.demo.models import save_word_tokenizer, zen_lines

        save_word_tokenizer(src, zen_lines(), args.vocab)
        calib = work / "calib.txt"
        lines = zen_lines()
        calib.write_text(
            "\n".join(" ".join(lines[i % len(lines)] for i in range(k, k + 12)) for k in range(128))
            + "\n"
        )
        per_layer = (params - 2 * args.vocab * args.hidden) / args.layers
        layer_params = per_layer * args.layers
        store = {"COMPRESSOR_STORE": str(work / "store")}
        sketch = [
            compress,
            "--quiet",
            "apply",
            "-p",
            "sketchtune",
            str(src),
            "-o",
            "groups_per_row",
            "4",
            "-o",
            "bits",
            str(args.bits),
        ]
        extra = [x for key, value in args.options for x in ("-o", key, value)]
        shown = "".join(f", {key} {value}" for key, value in args.options)
        runs = [
            (
                "round-to-nearest 4-bit, g64 (the yardstick)",
                [sys.executable, "-c", RTN, str(src), str(work / "rtn")],
            ),
            (f"sketch {args.bits}-bit G4, no data", sketch),
            (
                f"sketch {args.bits}-bit G4, 128 calibration rows x 128 tokens{shown}",
                [
                    *sketch,
                    *extra,
                    "-o",
                    "data",
                    str(calib),
                    "-o",
                    "samples",
                    "128",
                    "-o",
                    "max_length",
                    "128",
                ],
            ),
        ]
        if args.calibrated_only:
            runs = runs[2:]
        rows = []
        base_wall = None
        for label, cmd in runs:
            wall, rss = measure(cmd, env=store)
            base_wall = base_wall or wall
            rows.append((label, wall, wall / base_wall, layer_params / wall / 1e6, rss))
            print(f"{label}: {wall:.1f} s, {rss:.2f} GB", flush=True)
            shutil.rmtree(work / "rtn", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    head = (
        f"{args.layers} layers of the 1.48B shape (hidden {args.hidden}, d_ff {args.ffn}, "
        f"vocab {args.vocab}), bf16: {params / 1e9:.2f}B parameters, {layer_params / 1e6:.0f}M "
        f"of them in the layers' linears and norms; {os.cpu_count()} cores, {platform.machine()}"
    )
    out = [head, "", "| run | wall s | × first run | Mparam/s (layers) | peak RSS GB |"]
    out += ["| --- | ---: | ---: | ---: | ---: |"]
    out += [f"| {a} | {w:.1f} | {r:.1f} | {m:.2f} | {g:.2f} |" for a, w, r, m, g in rows]
    table = "\n".join(out)
    print(table)
    if args.write_docs:
        write_docs_section("sketchtune-speed", table, heading="SketchTune: speed and memory")


if __name__ == "__main__":
    main()
