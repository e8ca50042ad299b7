"""Our merges against mergekit's at a half-precision dtype, method by method.

mergekit computes a config's merge in its ``dtype``; by default ``compress merge --config``
does the same (mergekit-exact), and ``mergekit_exact: false`` computes in float32 and casts
once. This prints, for each method, the share of output entries that differ from mergekit's
and the largest difference, in both modes, on tiny Llamas (a base and three fine-tunes
whose AdamW-like updates leave many equal magnitudes).

    python scripts/bench_mergekit_dtype.py [--dtype bfloat16] [--hidden 64]
    python scripts/bench_mergekit_dtype.py --write-docs   # also update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


METHODS = [
    ("task_arithmetic", {"weight": 1.0}),
    ("ties", {"weight": 1.0, "density": 0.5}),
    ("breadcrumbs", {"weight": 1.0, "density": 0.8, "gamma": 0.05}),
    ("breadcrumbs_ties", {"weight": 1.0, "density": 0.6, "gamma": 0.02}),
    ("linear", {"weight": 1.0}),
    ("sce", {}),
    ("arcee_fusion", {}),
    ("model_stock", {}),
    ("slerp", {"t": 0.3}),
    ("nearswap", {"t": 0.001}),
    ("nuslerp", {"weight": 1.0}),
    ("multislerp", {"weight": 1.0}),
    ("karcher", {}),
]
TWO = {"arcee_fusion", "slerp", "nearswap"}  # methods of the base and one model
NO_BASE = {"karcher", "nuslerp", "multislerp"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    from click.testing import CliRunner
    from mergekit.merge_methods.api import merge_state_dicts

    from compressor.cli import cli
    from compressor.demo.models import save_stepped_finetune, save_tiny_llama

    root = Path(tempfile.mkdtemp(prefix="bench-dtype-"))
    base = save_tiny_llama(root / "base", seed=0, dtype=dtype, hidden=args.hidden)
    experts = [save_stepped_finetune(base, root / f"e{i}", seed=i) for i in (1, 2, 3)]
    states = {"base": _tensors(base), **{f"e{i}": _tensors(e) for i, e in enumerate(experts, 1)}}
    lines = [
        f"{args.dtype} configs on a tiny Llama (hidden {args.hidden}) and three fine-tunes "
        "whose updates are multiples of 1e-3 (many equal magnitudes): the share of output "
        "entries that differ from mergekit's (its `merge_state_dicts`, written in the "
        "config's dtype) and the largest difference. Command: "
        "`python scripts/bench_mergekit_dtype.py`.",
        "",
        "| method | mergekit-exact (default) | `mergekit_exact: false` (float32) |",
        "| --- | ---: | ---: |",
    ]
    for method, params in METHODS:
        ids = (
            ["e1"] if method in TWO else ["e1", "e2"] if method == "nuslerp" else ["e1", "e2", "e3"]
        )
        with_base = method not in NO_BASE
        theirs = merge_state_dicts(
            {k: states[k] for k in (["base"] if with_base else []) + ids},
            method,
            base="base" if with_base else None,
            parameters=params,
        )
        row = []
        for exact in (True, False):
            config = root / f"{method}-{exact}.yml"
            config_lines = [f"merge_method: {method}", f"dtype: {args.dtype}"]
            if with_base:
                config_lines.append(f"base_model: {base}")
            if not exact:
                config_lines.append("mergekit_exact: false")
            config_lines.append(f"parameters: {json.dumps(params)}")
            config_lines.append("models:")
            config_lines += [f"  - model: {root / i}" for i in ids]
            if method in TWO:
                config_lines.append(f"  - model: {base}")
            config.write_text("\n".join(config_lines) + "\n")
            store = root / f"store-{method}-{exact}"
            runner = CliRunner()
            r = runner.invoke(
                cli, ["--store", str(store), "--quiet", "merge", "--config", str(config), "-n", "m"]
            )
            assert r.exit_code == 0, r.output
            out = root / f"out-{method}-{exact}"
            r = runner.invoke(cli, ["--store", str(store), "export", "m", str(out)])
            assert r.exit_code == 0, r.output
            ours = _tensors(out)
            differ = total = 0
            worst = 0.0
            for name, t in theirs.items():  # as mergekit-yaml writes it: in the config's dtype
                d = (ours[name].float() - t.to(dtype).float()).abs()
                differ += int((d > 0).sum())
                total += d.numel()
                worst = max(worst, float(d.max()))
            row.append(f"{100 * differ / total:8.3f}% ({worst:.3g})")
        lines.append(f"| {method} | {row[0].strip()} | {row[1].strip()} |")
    body = "\n".join(lines)
    print(body)
    if args.write_docs:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_foundation import write_docs_section

        write_docs_section(
            "mergekit-dtype", body, "Merge configs in half precision beside mergekit"
        )


if __name__ == "__main__":
    main()
