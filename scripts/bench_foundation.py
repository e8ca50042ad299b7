"""Wall time and peak RSS of `apply --plugin task-vector` and `merge --plugin task-arithmetic`
beside mergekit's task_arithmetic, on a synthetic Llama-style bf16 model (sharded).

    python scripts/bench_foundation.py                 # ~1.6B parameters (needs ~25 GB disk)
    python scripts/bench_foundation.py --layers 2      # a quick smoke run
    python scripts/bench_foundation.py --write-docs    # also update docs/benchmarks.md

Every command runs in its own process; peak RSS is that process's own maximum
resident set (from wait4), so the numbers are comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
MARK = "foundation"


def build_model(
    path: Path,
    layers: int,
    hidden: int,
    ffn: int,
    vocab: int,
    seed: int,
    base: Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    shard: str = "2GB",
) -> int:
    """Write a Llama-shaped checkpoint (bf16, 2 GB shards), or a perturbed copy of ``base``."""
    from compressor.io.sources import open_model_dir
    from compressor.io.writer import ArtifactWriter

    heads, kv_heads = hidden // 64, max(1, hidden // 256)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "dtype": str(dtype).removeprefix("torch."),
    }
    kv = kv_heads * 64
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.k_proj.weight": (kv, hidden),
                p + "self_attn.v_proj.weight": (kv, hidden),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "mlp.gate_proj.weight": (ffn, hidden),
                p + "mlp.up_proj.weight": (ffn, hidden),
                p + "mlp.down_proj.weight": (hidden, ffn),
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
            }
        )
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    gen = torch.Generator().manual_seed(seed)
    writer = ArtifactWriter(path, max_shard_size=shard)
    source = open_model_dir(base) if base else None
    total = 0
    for name, shape in shapes.items():
        if source is not None:
            t = source.get(name).float()
            t += torch.randn(shape, generator=gen) * (1e-3 * (1 + (hash(name) % 7)))
        elif len(shape) == 1:
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=gen) * 0.02
        writer.write(name, t.to(dtype))
        total += t.numel()
        del t
    writer.add_json("config.json", config)
    writer.finish()
    for f in path.glob(".*"):
        f.unlink()
    return total


LAUNCHER = """
import json, os, sys, time
t0 = time.monotonic()
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"wall": time.monotonic() - t0, "rss_kb": usage.ru_maxrss,
                  "code": os.waitstatus_to_exitcode(status)}))
"""


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run a command; return (wall seconds, peak RSS in GB) of that process alone.

    A small launcher process starts it, so the peak is not inflated by the
    memory of this (large) benchmark process at fork time.
    """
    r = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *cmd],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
    )
    result = json.loads(r.stdout.strip().splitlines()[-1])
    if result["code"] != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return result["wall"], result["rss_kb"] / 1024**2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-data" / "foundation")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the models and outputs")
    args = ap.parse_args()

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.monotonic()
    n = build_model(work / "base", args.layers, args.hidden, args.ffn, args.vocab, seed=0)
    for i in (1, 2):
        build_model(
            work / f"ft{i}",
            args.layers,
            args.hidden,
            args.ffn,
            args.vocab,
            seed=i,
            base=work / "base",
        )
    print(
        f"built base + 2 fine-tunes, {n / 1e9:.2f}B params each, bf16, "
        f"in {time.monotonic() - t0:.0f} s",
        file=sys.stderr,
    )

    compress = [sys.executable, "-m", "compressor", "--quiet", "--store", str(work / "store")]
    rows = []
    wall, rss = measure(
        [
            *compress,
            "apply",
            "-p",
            "task-vector",
            "--base",
            str(work / "base"),
            str(work / "ft1"),
            "-n",
            "tv",
        ]
    )
    rows.append(("apply task-vector (ours)", wall, rss, None))
    ours = measure(
        [
            *compress,
            "merge",
            "-p",
            "task-arithmetic",
            "--base",
            str(work / "base"),
            str(work / "ft1"),
            str(work / "ft2"),
            "-n",
            "merged",
        ]
    )
    config = work / "mergekit.yml"
    config.write_text(
        json.dumps(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(work / "base"),
                "models": [
                    {"model": str(work / f"ft{i}"), "parameters": {"weight": 1.0}} for i in (1, 2)
                ],
                "dtype": "float32",
                "out_dtype": "bfloat16",
            }
        )
    )
    mk = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent)) or "mergekit-yaml"
    theirs = measure(
        [
            mk,
            str(config),
            str(work / "mergekit-out"),
            "--no-copy-tokenizer",
            "--no-write-model-card",
            "--quiet",
        ],
        env={"HF_HUB_OFFLINE": "1"},
    )
    rows.append(("merge task-arithmetic, 2 experts (ours)", *ours, None))
    rows.append(("mergekit task_arithmetic, same inputs", *theirs, None))
    ratio = ("ours / mergekit", ours[0] / theirs[0], ours[1] / theirs[1], "ratio")

    lines = [
        f"Synthetic Llama-style model: {n / 1e9:.2f}B parameters, bf16, 2 GB shards; "
        f"{args.layers} layers, hidden {args.hidden}, FFN {args.ffn}, vocab {args.vocab}. "
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}. Command: `python scripts/bench_foundation.py`.",
        "",
        "| step | wall time (s) | peak RSS (GB) |",
        "| --- | ---: | ---: |",
    ]
    for label, w, r, _ in rows:
        lines.append(f"| {label} | {w:.1f} | {r:.2f} |")
    lines.append(f"| **{ratio[0]}** (merge) | **{ratio[1]:.2f}x** | **{ratio[2]:.2f}x** |")
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        write_docs_section(MARK, table)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def write_docs_section(mark: str, body: str, heading: str | None = None) -> None:
    """Replace the text between <!-- mark --> and <!-- /mark --> in the benchmarks page
    that holds it (docs/benchmarks/*.md), or append the section under ``heading`` to
    docs/benchmarks/foundation.md when no page holds the marks yet."""
    start, end = f"<!-- {mark} -->", f"<!-- /{mark} -->"
    pages = sorted((DOCS.parent / "benchmarks").glob("*.md"))
    page = next((p for p in pages if start in p.read_text()), None)
    if page is None:
        page = DOCS.parent / "benchmarks" / "foundation.md"
        text = page.read_text()
        page.write_text(text + f"\n## {heading or mark}\n\n{start}\n{body}\n{end}\n")
        return
    text = page.read_text()
    a, b = text.index(start) + len(start), text.index(end)
    page.write_text(text[:a] + "\n" + body + "\n" + text[b:])


if __name__ == "__main__":
    main()
