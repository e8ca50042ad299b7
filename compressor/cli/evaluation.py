"""``eval``: score an artifact on data; the scores become the artifact's metrics."""

from __future__ import annotations

import click

from compressor.app.eval_options import EVAL_OPTIONS
from compressor.cli.run import option_pairs, strict_json


def _options_help() -> str:
    return "; ".join(f"{o.name}: {o.help}" for o in EVAL_OPTIONS)


def register(cli):
    @cli.command("eval")
    @click.argument("ref", metavar="REF")
    @option_pairs("Options (repeatable): " + _options_help() + ".")
    @click.option("--base", "-b", help="Evaluate REF (a task vector or adapter) added to BASE.")
    @click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
    @click.pass_obj
    def eval_(state, ref, options, base, as_json):
        """Score REF on a data file with transformers; store the scores as its metrics.

        Labelled JSONL rows ({"text": ..., "label": ...}, or "pixels" for image
        models) give accuracy and loss; text lines give a causal LM's perplexity;
        with -o reference REF, the mean cosine agreement of sentence embeddings.
        """
        from compressor.api import evaluate

        result = evaluate(ref, list(options), base=base, store=state.store, quiet=state.quiet)
        if as_json:
            click.echo(strict_json(result))
            return
        scores = "  ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in result.items()
            if k not in ("task", "data")
        )
        click.echo(f"{scores}  ({result['task']} on {result['data']})")
