"""Rate-distortion of Tucker cores against truncated SVD of the same size (docs/benchmarks.md).

    python scripts/bench_tucker.py               # full suite (built if not cached)
    python scripts/bench_tucker.py --smoke
    python scripts/bench_tucker.py --write-docs

For the suite's real task vectors (the ResNet experts' 4-D conv kernels and
the MiniLM experts' 2-D weights), `compress apply -p tucker -o ratio C` is run
for several C. Beside it, each tensor the Tucker run factored is cut by
truncated SVD of its matricisation (out × in·kh·kw) to the largest rank whose
factors take no more bytes than that tensor's core and factors; the dense
tensors are the same on both sides. Errors are relative Frobenius errors over
the whole task vector, averaged over the experts.

Second table: the suite's four MiniLM LoRA adapters (rank 8 on query and
value, classifier saved whole) compressed jointly by `lora-tucker` at shared
ranks 4, 8 and 16: bytes against the four adapters' files, the relative error
of the updates, and each task's test accuracy with its decoded adapter.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "suite"))
sys.path.insert(0, str(HERE))

RATIOS = (4, 8, 16, 32)
LORA_RANKS = (4, 8, 16)


def svd_error(tau, budget: int) -> tuple[float, int]:
    """(squared error, bytes) of the best rank-k approximation with k·(m+n) ≤ budget entries."""
    import torch

    m = tau.reshape(tau.shape[0], -1).double()
    k = budget // (m.shape[0] + m.shape[1])
    sv2 = torch.linalg.svdvals(m).square()
    return float(sv2[k:].sum()), 4 * k * (m.shape[0] + m.shape[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated: rd, lora")
    args = ap.parse_args()

    import build as suite_build

    import compressor
    from compressor.app.refs import resolve
    from compressor.io.sources import open_model_dir

    suite = suite_build.build(suite_build.SMOKE if args.smoke else suite_build.FULL)
    work = Path(tempfile.mkdtemp(prefix="tucker-rd-"))
    store = compressor.open_store(work / "store")
    rows = []
    try:
        for kind, label in (
            ("image", "ResNet conv experts (4-D kernels)"),
            ("text", "MiniLM experts (2-D)"),
        ):
            base_dir = suite / kind / "base"
            experts = sorted((suite / kind / "experts").iterdir())
            for ratio in RATIOS:
                acc = {"t_err": 0.0, "t_bytes": 0, "s_err": 0.0, "s_bytes": 0, "dense": 0}
                for expert in experts:
                    rec = compressor.apply(
                        "tucker",
                        str(expert),
                        base=str(base_dir),
                        options={"ratio": ratio},
                        store=store,
                    )
                    meta = rec.manifest["tensors"]
                    with open_model_dir(base_dir) as base, open_model_dir(expert) as ft:
                        with resolve(store, rec.id).source as decoded:
                            norm2 = t_err2 = s_err2 = 0.0
                            s_bytes = 0
                            for name, m in meta.items():
                                tau = ft.get(name).float() - base.get(name).float()
                                norm2 += float(tau.square().sum())
                                if "ranks" not in m:
                                    s_bytes += 4 * tau.numel()
                                    continue
                                t_err2 += float((decoded.get(name) - tau).square().sum())
                                size = math.prod(m["ranks"]) + sum(
                                    s * r for s, r in zip(m["shape"], m["ranks"], strict=True)
                                )
                                e2, b = svd_error(tau, size)
                                s_err2 += e2
                                s_bytes += b
                    acc["t_err"] += math.sqrt(t_err2 / norm2) / len(experts)
                    acc["s_err"] += math.sqrt(s_err2 / norm2) / len(experts)
                    acc["t_bytes"] += rec.metrics["bytes"] / len(experts)
                    acc["s_bytes"] += s_bytes / len(experts)
                    acc["dense"] = 4 * sum(math.prod(m["shape"]) for m in meta.values())
                rows.append((label, ratio, acc))
                print(label, ratio, acc, flush=True)
        lora_rows = lora_table(suite, store) if "lora" not in args.skip else []
    finally:
        store.close()
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        "| task vectors | ratio asked | Tucker: MB | Tucker: rel. error | SVD: MB | SVD: rel. error | float32 MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, ratio, a in rows:
        lines.append(
            f"| {label} | {ratio} | {a['t_bytes'] / 1e6:.3f} | {a['t_err']:.3f} | "
            f"{a['s_bytes'] / 1e6:.3f} | {a['s_err']:.3f} | {a['dense'] / 1e6:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    lora = "\n".join(lora_rows)
    print(lora)
    if args.write_docs:
        from bench_foundation import write_docs_section

        if rows:
            write_docs_section("tucker-rd", table)
        if lora_rows:
            write_docs_section("tucker-lora", lora)


def _nbytes(f, key: str) -> int:
    t = f.get_tensor(key)
    return t.numel() * t.element_size()


def lora_table(suite: Path, store) -> list[str]:
    """Joint compression of the suite's LoRA adapters and each task's accuracy after decoding."""
    import compressor
    from compressor.api import evaluate

    tasks = sorted(p.name for p in (suite / "lora").iterdir())
    adapters = [str(suite / "lora" / t) for t in tasks]
    base = str(suite / "text" / "base")
    data = suite / "text" / "data"

    def accuracy(ref: str, task: str) -> float:
        opts = {"data": str(data / f"{task}-test.jsonl")}
        return evaluate(ref, opts, base=base, store=store)["accuracy"]

    head = ["adapters", "MB", "× smaller", "rel. error", *tasks, "average"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    accs = [accuracy(a, t) for a, t in zip(adapters, tasks, strict=True)]
    from safetensors import safe_open

    size = 0  # the adapters' tensor bytes (what lora-tucker's "bytes" counts on its side)
    for a in adapters:
        with safe_open(str(Path(a) / "adapter_model.safetensors"), "pt") as f:
            size += sum(_nbytes(f, k) for k in f.keys())
    cells = [f"{size / 1e6:.3f}", "1", "0", *(f"{x:.2f}" for x in accs), f"{sum(accs) / 4:.3f}"]
    lines.append("| the four adapters (rank 8) | " + " | ".join(cells) + " |")
    for rank in LORA_RANKS:
        rec = compressor.apply("lora-tucker", adapters, options={"rank": rank}, store=store)
        accs = [accuracy(f"{rec.id}#{k}", t) for k, t in enumerate(tasks, start=1)]
        m = rec.metrics
        cells = [
            f"{m['bytes'] / 1e6:.3f}",
            f"{size / m['bytes']:.1f}",
            f"{m['rel_error']:.3f}",
            *(f"{x:.2f}" for x in accs),
            f"{sum(accs) / 4:.3f}",
        ]
        lines.append(f"| lora-tucker, shared rank {rank} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()
