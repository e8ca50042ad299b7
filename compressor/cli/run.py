"""``apply``, ``merge``, ``extract`` and ``sample``: run a method, commit an artifact."""

from __future__ import annotations

import json
import math

import click

from compressor.sizes import DEFAULT_MAX_SHARD_SIZE


def strict_json(obj, indent: int | None = None) -> str:
    """JSON text a strict parser accepts: NaN and infinities become null."""

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), indent=indent, sort_keys=True, allow_nan=False)


def print_record(record, as_json: bool) -> None:
    """The short human summary (or ``--json`` object) of a new artifact."""
    if as_json:
        click.echo(strict_json(record.to_json()))
        return
    how = (
        f"by {record.plugin}"
        if record.plugin
        else f"{record.kind}ed from {record.params.get('path')}"
    )
    click.echo(
        f"Created {record.label} (id {record.id[:12]}): {record.content} {how}, "
        f"{format_bytes(record.bytes)}"
    )
    if record.metrics:
        click.echo("  metrics: " + metrics_text(record.metrics))


def metrics_text(metrics: dict, n: int | None = None) -> str:
    """``name=value, ...`` of the first ``n`` metrics (all: None), floats to 6 digits:
    one format for `apply`'s line and `run`'s table."""
    items = list(metrics.items())[:n]
    return ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in items)


def format_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def option_pairs(help: str):
    """The repeatable ``-o KEY VALUE`` option."""
    return click.option(
        "-o", "--option", "options", type=(str, str), multiple=True, metavar="KEY VALUE", help=help
    )


def _plugin_option(required: bool = True):
    return click.option(
        "--plugin", "-p", required=required, help="The method to run (see `compress plugins`)."
    )


_common = [
    _plugin_option(),
    option_pairs("A method option; repeatable. `compress plugins show NAME` lists them."),
    click.option("--name", "-n", help="Artifact name (a new version if it exists)."),
    click.option("--json", "as_json", is_flag=True, help="Print the artifact as one JSON object."),
    click.option(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        show_default=True,
        help="Largest safetensors shard, e.g. 5GB or 500MB.",
    ),
]


def _with_common(f, plugin_required: bool = True):
    for decorator in reversed(_common):
        if decorator is _common[0] and not plugin_required:
            decorator = _plugin_option(required=False)
        f = decorator(f)
    return f


def _run(ctx, kind, plugin, inputs, base, options, name, as_json, max_shard_size):
    from compressor.api import run_method

    state = ctx.obj
    record = run_method(
        kind,
        plugin,
        inputs,
        base=base,
        options=list(options),
        name=name,
        store=state.store,
        quiet=state.quiet,
        max_shard_size=max_shard_size,
    )
    print_record(record, as_json)


def register(cli):
    @cli.command()
    @_with_common
    @click.option("--base", "-b", help="Base model REF, for methods that work on task vectors.")
    @click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
    @click.pass_context
    def apply(ctx, plugin, options, name, as_json, max_shard_size, base, inputs):
        """Compress an INPUT (a model, task vector or adapter) with a method.

        Most methods take one INPUT; some (lora-tucker) compress several together.
        """
        _run(ctx, "compress", plugin, list(inputs), base, options, name, as_json, max_shard_size)

    @cli.command()
    @lambda f: _with_common(f, plugin_required=False)
    @click.option(
        "--base",
        "-b",
        help="The base model REF the experts share (methods on task vectors need it).",
    )
    @click.option(
        "--config",
        "config",
        type=click.Path(dir_okay=False),
        help="Run a mergekit YAML config as it is (instead of --plugin, --base and EXPERTs).",
    )
    @click.argument("experts", nargs=-1, metavar="EXPERT...")
    @click.pass_context
    def merge(ctx, plugin, options, name, as_json, max_shard_size, base, config, experts):
        """Merge EXPERTs (models, task vectors, adapters) into one model.

        With --config, run a mergekit config (every document a stage, stored by name).
        """
        if config is None:
            if plugin is None:
                raise click.UsageError("Missing option '--plugin' / '-p'.")
            _run(ctx, "merge", plugin, list(experts), base, options, name, as_json, max_shard_size)
            return
        given = [f for f, v in (("--plugin", plugin), ("--base", base), ("-o", options)) if v]
        if experts:
            given.append("EXPERT arguments")
        if given:
            raise click.UsageError(f"--config takes no {', '.join(given)}: the config says them")
        from compressor.app.mergekit import run_config

        state = ctx.obj
        records = run_config(
            config, name=name, store=state.store, quiet=state.quiet, max_shard_size=max_shard_size
        )
        for record in records:
            print_record(record, as_json)

    @cli.command()
    @_with_common
    @click.argument("model", metavar="MODEL")
    @click.pass_context
    def extract(ctx, plugin, options, name, as_json, max_shard_size, model):
        """Cut a smaller model out of MODEL."""
        _run(ctx, "extract", plugin, [model], None, options, name, as_json, max_shard_size)

    @cli.command()
    @_with_common
    @click.argument("model", metavar="MODEL")
    @click.pass_context
    def train(ctx, plugin, options, name, as_json, max_shard_size, model):
        """Train MODEL (or an artifact learned from it) on data with a method."""
        _run(ctx, "train", plugin, [model], None, options, name, as_json, max_shard_size)

    @cli.command()
    @_with_common
    @click.argument("artifact", metavar="ARTIFACT")
    @click.pass_context
    def sample(ctx, plugin, options, name, as_json, max_shard_size, artifact):
        """Sample weights from a learned ARTIFACT."""
        _run(ctx, "sample", plugin, [artifact], None, options, name, as_json, max_shard_size)
