"""The hooks a plugin can implement. Each hands the plugin a callback."""

import pluggy

hookspec = pluggy.HookspecMarker("compressor")
hookimpl = pluggy.HookimplMarker("compressor")


@hookspec
def register_methods(register):
    """Register Method objects: ``register(method)``."""


@hookspec
def register_commands(cli):
    """Add click commands or groups to the ``compress`` CLI group."""


@hookspec
def register_sources(register):
    """Register input-format readers: ``register(reader)``.

    A reader has ``name``, ``detect(path) -> bool`` and ``open(path) -> TensorSource``.
    """
