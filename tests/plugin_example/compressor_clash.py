"""A plugin whose method name clashes with a built-in."""

from compressor import Method, hookimpl


class Clash(Method):
    name = "task-vector"
    kind = "compress"
    summary = "clashes"


@hookimpl
def register_methods(register):
    register(Clash())
