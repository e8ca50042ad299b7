"""Speed of the subspace merges (TSV-M, Iso-C, Iso-CTS, WUDI) and of core-space LoRA merges.

    python scripts/bench_subspace.py --part speed     # the 218M trio and one layer of the 1.5B shape
    python scripts/bench_subspace.py --part core      # 8 LoRAs of rank 16 on MiniLM: core vs full
    python scripts/bench_subspace.py --part routes    # cheaper routes against the full SVD
    python scripts/bench_subspace.py --write-docs     # all three, into docs/benchmarks/merging.md

speed: wall time and peak RSS of each merge (its own process) on the 218M-parameter
float32 trio of scripts/bench_merge.py (base + 2 fine-tunes, 10 layers) and on one layer
of the 1.5B shape (hidden 2048, FFN 5632, vocab 32000, bf16), TIES beside them. The
whole-model time of the 1.5B shape (30 layers) and of a Llama-2-7B shape (32 layers,
hidden 4096, FFN 11008) is extrapolated from the measured layer by each method's flop
count per layer (an SVD of m × n costs ∝ m·n·min(m, n); a WUDI step ∝ its product).
WUDI runs 10 of its 300 Adam steps; its time is scaled to 300 (each step costs the same):
t₃₀₀ = t_io + 30·(t₁₀ − t_io), with t_io the TIES row's time (reading, writing, start-up).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_foundation import ROOT, build_model, measure, write_docs_section  # noqa: E402

METHODS = (  # (label, plugin, options)
    ("ties (for scale)", "ties", ["-o", "density", "0.2"]),
    ("tsv-m", "tsv-m", []),
    ("iso-c", "iso-c", []),
    ("iso-c, polar newton-schulz", "iso-c", ["-o", "polar", "newton-schulz"]),
    ("iso-cts", "iso-cts", []),
    ("wudi (10 of 300 steps, scaled)", "wudi", ["-o", "steps", "10"]),
)
WUDI_SCALE = 30  # 300 / 10 steps


def layer_weights(hidden: int, ffn: int, kv: int) -> list[tuple[int, int]]:
    """(out, in) of one Llama layer's seven linear weights."""
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden)] + [
        (ffn, hidden),
        (ffn, hidden),
        (hidden, ffn),
    ]


def layer_cost(method: str, weights, experts: int) -> float:
    """Relative flops of one layer: SVDs ∝ m·n·min(m,n) per SVD, WUDI ∝ its step product."""
    total = 0.0
    for out, inp in weights:
        svd = out * inp * min(out, inp)
        if method == "wudi":
            total += min(out * inp * inp, 2 * experts * out * out * inp)
        elif method == "tsv-m":
            total += experts * svd + 2 * svd  # each τ, then the two stacked bases
        elif method == "iso-cts":
            total += (1 + experts) * svd + 2 * svd
        elif method == "iso-c":
            total += svd
        else:
            total += out * inp * experts  # elementwise
    return total


def part_speed(work: Path) -> str:
    compress = [sys.executable, "-m", "compressor", "--quiet", "--store", str(work / "store")]
    lines = [
        "| merge | 218M trio: wall (s) | peak RSS (GB) | 1.5B shape, one layer: wall (s) | "
        "peak RSS (GB) | 1.5B whole (extrapolated, min) | 7B whole (extrapolated, h) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    shapes = {
        "trio": ((10, 1024, 4096, 32000), torch.float32, "400MB"),
        "1.5B": ((1, 2048, 5632, 32000), torch.bfloat16, "2GB"),
    }
    results: dict[str, dict[str, tuple[float, float]]] = {}
    for tag, (shape, dtype, shard) in shapes.items():
        root = work / tag
        build_model(root / "base", *shape, seed=0, dtype=dtype, shard=shard)
        for i in (1, 2):
            build_model(
                root / f"ft{i}", *shape, seed=i, base=root / "base", dtype=dtype, shard=shard
            )
        for index, (label, plugin, opts) in enumerate(METHODS):
            cmd = [*compress, "merge", "-p", plugin, "--base", str(root / "base")]
            cmd += [str(root / "ft1"), str(root / "ft2"), *opts, "-n", f"{tag}-{index}"]
            wall, rss = measure(cmd)
            if plugin == "wudi":
                io = results[METHODS[0][0]][tag][0]
                wall = io + WUDI_SCALE * (wall - io)
            results.setdefault(label, {})[tag] = (wall, rss)
            print(tag, label, f"{wall:.1f} s", f"{rss:.2f} GB", flush=True)
        shutil.rmtree(root)
        shutil.rmtree(work / "store", ignore_errors=True)
    small = layer_weights(2048, 5632, 512)
    large = layer_weights(4096, 11008, 4096)
    for label, plugin, _ in METHODS:
        (tw, trss), (lw, lrss) = results[label]["trio"], results[label]["1.5B"]
        per_layer = lw  # one layer plus the embeddings' mean (cheap)
        whole_15 = per_layer * 30 / 60
        ratio = layer_cost(plugin, large, 2) / layer_cost(plugin, small, 2)
        whole_7 = per_layer * ratio * 32 / 3600
        lines.append(
            f"| {label} | {tw:.1f} | {trss:.2f} | {lw:.1f} | {lrss:.2f} | {whole_15:.0f} | "
            f"{whole_7:.1f} |"
        )
    return "\n".join(lines)


def part_core(work: Path) -> str:
    from compressor.demo.models import minilm_dir, save_random_lora

    base = minilm_dir()
    targets = ("query", "key", "value", "dense")
    adapters = [
        str(
            save_random_lora(
                base, work / f"lora{i}", i, targets, 16, std=0.02, auto_class="AutoModel"
            )
        )
        for i in range(8)
    ]
    compress = [sys.executable, "-m", "compressor", "--quiet", "--store", str(work / "store")]
    lines = [
        "| merge | full space: wall (s) | peak RSS (GB) | core space: wall (s) | peak RSS (GB) "
        "| core / full time |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for plugin, opts in (
        ("task-arithmetic", []),
        ("ties", ["-o", "density", "0.2"]),
        ("tsv-m", []),
        ("iso-c", []),
    ):
        row = []
        for space in ("full", "core"):
            cmd = [*compress, "merge", "-p", plugin, "--base", str(base), *adapters, *opts]
            cmd += ["-o", "space", space, "-n", f"{plugin}-{space}"]
            row.append(measure(cmd))
        (fw, frss), (cw, crss) = row
        lines.append(
            f"| {plugin} | {fw:.1f} | {frss:.2f} | {cw:.1f} | {crss:.2f} | **{cw / fw:.2f}x** |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines)


def part_routes(work: Path) -> str:
    """The cheaper routes on real task vectors (the multi-task suite's eight MiniLM experts)
    and their time on one weight of the 1.5B shape."""
    sys.path.insert(0, str(HERE / "suite"))
    import multitask
    from safetensors.torch import load_file

    from compressor.plugins.subspace.rules import iso_merge, newton_schulz_polar, polar, tsv_merge

    suite = multitask.build(multitask.FULL) / "text"
    base = load_file(suite / "base" / "model.safetensors")
    experts = [load_file(p / "model.safetensors") for p in sorted((suite / "experts").iterdir())]
    names = [n for n in base if base[n].dim() == 2 and "embeddings" not in n]
    worst = {"randomized, 2 power steps": 0.0, "randomized, 8 power steps": 0.0, "ns": 0.0}
    fell_back = 0
    for name in names:
        taus = [e[name].double() - base[name].double() for e in experts]
        full = tsv_merge(taus)
        k = min(taus[0].shape) // len(taus)
        for niter, key in ((2, "randomized, 2 power steps"), (8, "randomized, 8 power steps")):
            parts = [torch.svd_lowrank(t, q=k + 10, niter=niter) for t in taus]
            u = torch.cat([p[0][:, :k] for p in parts], 1)
            s = torch.cat([p[1][:k] for p in parts])
            v = torch.cat([p[2][:, :k].T for p in parts], 0)
            approx = polar(u) @ torch.diag(s) @ polar(v)
            worst[key] = max(worst[key], float((approx - full).norm() / full.norm()))
        if newton_schulz_polar(sum(taus)) is None:
            fell_back += 1
        else:
            a, b = iso_merge(taus), iso_merge(taus, "newton-schulz")
            worst["ns"] = max(worst["ns"], float((a - b).norm() / a.norm()))
    gen = torch.Generator().manual_seed(0)
    weight = sum(torch.randn(2048, 5632, generator=gen) * 1e-3 for _ in range(2))
    t0 = time.monotonic()
    torch.linalg.svd(weight.double(), full_matrices=False)
    svd_s = time.monotonic() - t0
    t0 = time.monotonic()
    newton_schulz_polar(weight.double())
    ns_s = time.monotonic() - t0
    return "\n".join(
        [
            f"On the eight MiniLM experts' {len(names)} weights (worst relative difference of Δ "
            "from the float64 full-SVD result):",
            "",
            "| route | worst relative difference | used |",
            "| --- | ---: | --- |",
            f"| TSV-M, randomized SVD (q = k + 10), 2 power steps | "
            f"{worst['randomized, 2 power steps']:.1e} | no |",
            f"| TSV-M, randomized SVD (q = k + 10), 8 power steps | "
            f"{worst['randomized, 8 power steps']:.1e} | no |",
            f"| Iso-C, polar by Newton–Schulz (float32) | {worst['ns']:.1e} "
            f"({fell_back} of {len(names)} fell back to the SVD) | `-o polar newton-schulz` |",
            "",
            f"One 2048 × 5632 weight (the 1.5B shape's MLP) on this machine: float64 SVD "
            f"{svd_s:.1f} s, Newton–Schulz {ns_s:.1f} s ({svd_s / ns_s:.1f}x).",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--part", choices=("speed", "core", "routes"), action="append")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-data" / "subspace")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    parts = args.part or ["routes", "core", "speed"]
    fns = {"speed": part_speed, "core": part_core, "routes": part_routes}
    machine = f"Machine: 2 cores, torch {torch.__version__}."
    for part in parts:
        work = args.workdir / part
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        t0 = time.monotonic()
        body = (
            fns[part](work)
            + f"\n\n{machine} Command: `python scripts/bench_subspace.py --part {part}` ({time.monotonic() - t0:.0f} s)."
        )
        print(body, flush=True)
        shutil.rmtree(work, ignore_errors=True)
        if args.write_docs:
            write_docs_section(f"subspace-{part}", body)


if __name__ == "__main__":
    main()
