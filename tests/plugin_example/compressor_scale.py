"""A complete third-party plugin: one method, one command, one input format."""

from pathlib import Path

import click

from compressor import Manifest, Method, Option, hookimpl
from compressor.sources import SourceReader, open_safetensors_file, row_blocks


class Scale(Method):
    """Multiplies every floating-point tensor by a factor."""

    name = "scale"
    kind = "compress"
    summary = "Multiply every float tensor by a factor"
    reference = "https://example.org/scale"
    version = "0.1"
    options = (Option("factor", "float", 0.5, "what to multiply by"),)

    def run(self, job):
        source = job.inputs[0]
        for name in job.progress(source.names(), desc="scale"):
            info = source.info(name)
            job.writer.begin(name, info.shape, info.dtype)
            for rows in row_blocks(info):
                block = source.get(name, rows)
                if info.is_float:
                    block = block * job.options["factor"]
                job.writer.write_rows(block)
            job.writer.end()
        return Manifest("model", metrics={"factor": job.options["factor"]})


@hookimpl
def register_methods(register):
    register(Scale())


@hookimpl
def register_commands(cli):
    @cli.command()
    def hello():
        """Say hello from the plugin."""
        click.echo("hello from compressor-scale")


@hookimpl
def register_sources(register):
    register(
        SourceReader(
            "st-file",
            "safetensors saved with a .st suffix",
            lambda path: Path(path).suffix == ".st",
            open_safetensors_file,
        )
    )
