"""A broken plugin: the hook name is misspelled."""

from compressor import hookimpl


@hookimpl
def register_method(register):
    pass
