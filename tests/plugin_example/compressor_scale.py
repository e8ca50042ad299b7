"""A complete third-party plugin: methods of three kinds (one of them an encoding, one
reading that encoding raw), one command, one input format."""

from pathlib import Path

import click

from compressor import (
    DecodedSource,
    Manifest,
    Method,
    Option,
    SourceReader,
    hookimpl,
    open_safetensors_file,
    row_blocks,
)


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


def _scaled(job, source, factor: float) -> None:
    for name in source.names():
        info = source.info(name)
        t = source.get(name)
        job.writer.write(name, t * factor if info.is_float else t)


class ScaleTrain(Method):
    """A stand-in for a learning method: its kind is train."""

    name = "scale-train"
    kind = "train"
    summary = "Pretend to train: scale every float tensor"
    options = (Option("factor", "float", 1.5, "what to multiply by"),)

    def run(self, job):
        _scaled(job, job.inputs[0], job.options["factor"])
        return Manifest("model")


class Halve(Method):
    """An encoding: stores every float tensor halved; decoding doubles it back."""

    name = "halve"
    kind = "compress"
    summary = "Store float tensors halved (an encoding that decodes exactly)"

    def run(self, job):
        _scaled(job, job.inputs[0], 0.5)
        return Manifest("model", extra={"encoding": "halve"})

    def decode(self, raw):
        return Doubled(raw)


class Doubled(DecodedSource):
    """A ``halve`` artifact read back: every float tensor doubled."""

    content = "model"

    def __init__(self, raw):
        super().__init__(raw)
        self._infos = dict(raw.infos())

    def encoded(self, name):
        return self._infos[name].is_float

    def _decode(self, name):
        return self.raw.get(name) * 2


class Peek(Method):
    """Reads a ``halve`` artifact as stored (raw), not decoded, and copies it."""

    name = "peek"
    kind = "compress"
    summary = "Copy the stored tensors of a halve artifact"
    reads_raw = ("halve",)

    def run(self, job):
        _scaled(job, job.inputs[0], 1.0)
        return Manifest("tensors", metrics={"content_read": job.inputs[0].content})


@hookimpl
def register_methods(register):
    register(Scale())
    register(ScaleTrain())
    register(Halve())
    register(Peek())


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
