"""``demo``: train a small model on a real task, then run every method and the store on it.

The task is scikit-learn's handwritten digits (shipped with the package, nothing is
downloaded): a tiny ViT learns upright digits, expert A rotated ones, expert B digits
with inverted ink. Every result is scored on the three test sets, and the demo ends
with a table of stored size against accuracy, one line of reading per method.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
from pathlib import Path

import click

DOMAINS = ("upright", "rotated", "inverted")


def _step(store: Path, *args) -> None:
    """Print one command line, then run it in this process (progress bars on stderr)."""
    from compressor.cli import cli

    args = [str(a) for a in args]
    click.secho("\n$ compress " + " ".join(shlex.quote(a) for a in args), bold=True)
    cli.main(args=["--store", str(store), *args], prog_name="compress", standalone_mode=False)


def _scores(store: Path, ref: str, data: dict, base: Path | None) -> dict[str, float]:
    from compressor.api import evaluate

    out = {}
    for domain in DOMAINS:
        result = evaluate(
            ref,
            {"data": str(data[f"test-{domain}"])},
            base=str(base) if base else None,
            store=store,
        )
        out[domain] = result["accuracy"]
    return out


def _size(store: Path, ref: str) -> int:
    from compressor.store import open_store

    st = open_store(store)
    try:
        return st.resolve(ref).bytes
    finally:
        st.close()


EXPERT_DOMAINS = {"expert-a": "rotated", "expert-b": "inverted"}
TUNE_DOMAINS = {"sketch-tune-a": "rotated", "sketch-tune-b": "inverted"}


def _reading(name: str, table: dict) -> str:
    """One line saying what an artifact's accuracies mean against the base and the experts."""
    acc, base = table[name][0], table["base"][0]
    gain = {d: 100 * (acc[d] - base[d]) for d in DOMAINS}
    if name == "base":
        return "reads upright digits; rotated and inverted ones are near chance"
    if name in EXPERT_DOMAINS:
        d = EXPERT_DOMAINS[name]
        return f"{gain[d]:+.0f} points on {d} digits over the base: what fine-tuning bought"
    if name == "base-sketch":
        return f"the base as 4-bit codes into lookup tables: {gain['upright']:+.1f} points upright"
    if name in TUNE_DOMAINS:
        d = TUNE_DOMAINS[name]
        return f"{gain[d]:+.0f} points on {d} digits, training only the sketch's tables"
    if name == "sketch-tunes-merged":
        tuned = [
            (acc[d] - base[d]) / max(1e-9, table[t][0][d] - base[d])
            for t, d in TUNE_DOMAINS.items()
        ]
        return (
            f"the two tunes merged on their tables: keeps {100 * tuned[0]:.0f}% and "
            f"{100 * tuned[1]:.0f}% of their gains"
        )
    if name.startswith("base-width-"):
        return (
            f"the base at {name.removeprefix('base-width-')} of its FFN width, sampled from "
            f"NeuMeta's generator: {gain['upright']:+.1f} points upright"
        )
    kept = [
        (acc[d] - base[d]) / max(1e-9, table[e][0][d] - base[d]) for e, d in EXPERT_DOMAINS.items()
    ]
    if name.startswith("merged-half"):
        return f"half the FFN width of `merged`: {gain['rotated']:+.0f}/{gain['inverted']:+.0f} points over the base"
    if name.startswith("merged"):
        return f"one model for both: keeps {100 * kept[0]:.0f}% of A's and {100 * kept[1]:.0f}% of B's gain"
    return f"keeps {100 * kept[0]:.0f}% of expert A's gain on rotated digits"


def register(cli):
    @cli.command()
    @click.option(
        "--dir",
        "workdir",
        type=click.Path(file_okay=False, path_type=Path),
        help="Keep models, data, store and exports here (default: a temp dir, removed).",
    )
    def demo(workdir):
        """Train a tiny ViT and two experts on digits, then run every method and the store."""
        from compressor.demo.digits import build

        keep = workdir is not None
        work = Path(workdir) if keep else Path(tempfile.mkdtemp(prefix="compress-demo-"))
        work.mkdir(parents=True, exist_ok=True)
        store = work / "store"
        try:
            click.echo(
                f"Working in {work}" + ("" if keep else " (removed at the end; --dir DIR keeps it)")
            )
            try:
                paths = build(work, say=click.echo)
            except ImportError as e:
                raise click.ClickException(str(e)) from None
            base, data = paths["base"], paths
            for tag in ("a", "b"):
                _step(
                    store,
                    "apply",
                    "--plugin",
                    "task-vector",
                    "--base",
                    base,
                    paths[f"finetune-{tag}"],
                    "--name",
                    f"expert-{tag}",
                )
            _step(store, "eval", "expert-a", "--base", base, "-o", "data", data["test-rotated"])
            merges = (  # the two experts merged five ways
                ("merged", "task-arithmetic", "-o", "scale", "0.8"),
                ("merged-ties", "ties", "-o", "density", "0.3"),
                ("merged-dare", "dare-ties", "-o", "density", "0.5", "-o", "seed", "1"),
                ("merged-tsv", "tsv-m"),
                # the scale picked on data: each of the grid's scales scored, the best kept
                ("merged-iso", "iso-c", "-o", "scale", "auto", "-o", "val", data["train-rotated"]),
            )
            for name, plugin, *options in merges:
                _step(
                    store,
                    "merge",
                    "--plugin",
                    plugin,
                    "--base",
                    base,
                    "expert-a",
                    "expert-b",
                    *options,
                    "--name",
                    name,
                )
            stock = work / "model-stock.yml"  # a mergekit config, run as it is
            stock.write_text(
                f"merge_method: model_stock\nbase_model: {base}\n"
                "models:\n  - model: expert-a\n  - model: expert-b\ndtype: float32\n"
            )
            _step(store, "merge", "--config", stock, "--name", "merged-stock")
            plan = work / "plan.yaml"  # many runs as one job, on two worker processes
            plan.write_text(
                "steps:\n  - name: small-{e}-{d}\n"
                "    matrix: {e: [expert-a, expert-b], d: [0.1, 0.3]}\n"
                "    apply: {plugin: compeft, inputs: ['{e}'], options: {density: '{d}'}}\n"
                "  - name: soup-{d}\n    matrix: {d: [0.1, 0.3]}\n"
                f"    merge: {{plugin: ties, base: {base}, inputs: ['small-*-{{d}}'], split: 2}}\n"
            )
            _step(store, "run", plan, "-j", "2")
            _step(
                store,
                "apply",
                "--plugin",
                "compeft",
                "expert-a",
                "-o",
                "density",
                "0.3",
                "-o",
                "alpha",
                "auto",
                "--name",
                "expert-a-compeft",
            )
            _step(
                store,
                "apply",
                "--plugin",
                "tucker",
                "expert-a",
                "-o",
                "ratio",
                "4",
                "--name",
                "expert-a-tucker",
            )
            _step(
                store,
                "extract",
                "--plugin",
                "matformer",
                "merged",
                "-o",
                "ffn_ratio",
                "0.5",
                "--name",
                "merged-half",
            )
            _step(
                store,
                "apply",
                "--plugin",
                "sketchtune",
                base,
                "-o",
                "groups_per_row",
                "1",
                "--name",
                "base-sketch",
            )
            for tag, domain in (("a", "rotated"), ("b", "inverted")):
                _step(
                    store,
                    "train",
                    "--plugin",
                    "sketchtune",
                    "base-sketch",
                    "-o",
                    "data",
                    data[f"train-{domain}"],
                    "-o",
                    "steps",
                    "80",
                    "-o",
                    "lr",
                    "0.003",
                    "--name",
                    f"sketch-tune-{tag}",
                )
            _step(
                store,
                "merge",
                "--plugin",
                "task-arithmetic",
                "--base",
                "base-sketch",
                "sketch-tune-a",
                "sketch-tune-b",
                "--name",
                "sketch-tunes-merged",
            )
            _step(
                store,
                "train",
                "--plugin",
                "neumeta",
                base,
                "-o",
                "data",
                data["train-upright"],
                "-o",
                "steps",
                "80",
                "--name",
                "base-neumeta",
            )
            for width in ("0.5", "0.25"):
                _step(
                    store,
                    "sample",
                    "--plugin",
                    "neumeta",
                    "base-neumeta",
                    "-o",
                    "width",
                    width,
                    "--name",
                    f"base-width-{width}",
                )
            _step(store, "eval", "base-width-0.25", "-o", "data", data["test-upright"])
            _step(store, "store", "log", "merged-ties")
            _step(store, "store", "ls")
            _step(store, "export", "expert-a", work / "out" / "expert-a", "--base", base)
            _step(store, "store", "verify")
            click.echo("\nScoring every result on the three test sets (500 digits each) ...")
            rows = [
                ("base", str(base), None, sum(p.stat().st_size for p in base.glob("*.safetensors")))
            ]
            rows += [
                (n, n, base if n.startswith("expert") else None, _size(store, n))
                for n in (
                    "expert-a",
                    "expert-b",
                    "merged",
                    "merged-ties",
                    "merged-dare",
                    "merged-tsv",
                    "merged-iso",
                    "merged-stock",
                    "expert-a-compeft",
                    "expert-a-tucker",
                    "merged-half",
                    "base-sketch",
                    "sketch-tune-a",
                    "sketch-tune-b",
                    "sketch-tunes-merged",
                    "base-width-0.5",
                    "base-width-0.25",
                )
            ]
            table = {name: (_scores(store, ref, data, b), size) for name, ref, b, size in rows}
            click.echo("\n| artifact | stored | upright | rotated | inverted | reading |")
            click.echo("| --- | ---: | ---: | ---: | ---: | --- |")
            for name, (acc, size) in table.items():
                cells = " | ".join(f"{acc[d]:.3f}" for d in DOMAINS)
                click.echo(f"| {name} | {size / 1e3:.0f} KB | {cells} | {_reading(name, table)} |")
            click.echo(
                "\nStored sizes: experts and their compressed forms are task vectors (add them to "
                "the base with `export --base`); merges, cuts and sampled widths are whole models; "
                "sketch tunes and their merge hold only tables (they decode with base-sketch's "
                "codes)."
            )
            if keep:
                click.echo(f"Everything is kept in {work}")
        finally:
            if not keep:
                shutil.rmtree(work, ignore_errors=True)
