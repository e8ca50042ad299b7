"""``export``: write an artifact out as a loadable directory or a .safetensors file."""

from __future__ import annotations

from pathlib import Path

import click

from compressor.sizes import DEFAULT_MAX_SHARD_SIZE


def register(cli):
    @cli.command()
    @click.argument("ref", metavar="REF")
    @click.argument("out", metavar="OUTDIR", type=click.Path(path_type=Path))
    @click.option("--base", "-b", help="Add a task vector or adapter to this base model.")
    @click.option("--dtype", help="Cast floating-point tensors (bf16, fp16, fp32).")
    @click.option(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        show_default=True,
        help="Largest safetensors shard, e.g. 5GB or 500MB.",
    )
    @click.option("--force", is_flag=True, help="Replace OUTDIR if it exists and is not empty.")
    @click.pass_context
    def export(ctx, ref, out, base, dtype, max_shard_size, force):
        """Write REF to OUTDIR (a model directory), or to a file ending in .safetensors.

        With --base, a task vector or adapter is added to the base and written
        as a full model that transformers loads.
        """
        from compressor.api import export as export_artifact

        state = ctx.obj
        path = export_artifact(
            ref,
            out,
            base=base,
            dtype=dtype,
            max_shard_size=max_shard_size,
            force=force,
            store=state.store,
            quiet=state.quiet,
        )
        click.echo(f"Exported {ref} to {path}")
