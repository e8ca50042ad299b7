"""passthrough: one model's tensors as they are (or scaled); with a config's slices, layers
of several models stacked into one (frankenmerges; see ``compress merge --config``)."""

from __future__ import annotations

from compressor.errors import UsageError
from compressor.hookspecs import hookimpl
from compressor.merging.loop import TensorMerge
from compressor.method import Option


class Passthrough(TensorMerge):
    """Copies the one input's tensors, multiplied by ``scale`` where it is set."""

    name = "passthrough"
    summary = "Copy one model's tensors (scaled where set); stacks layer slices from a config"
    reference = "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#passthrough"
    needs_base = False
    max_inputs = 1
    space = "weights"
    elementwise = True
    per_expert = frozenset({"scale"})
    options = (Option("scale", "float", None, "factor on the tensors (default: none)"),)

    def run(self, job):
        if job.base is not None:
            raise UsageError("method 'passthrough' takes one model and no --base")
        return super().run(job)

    def merge(self, call):
        scale = call.per["scale"][0]
        tensor = call.tensors[0]
        return tensor if scale is None else tensor.mul_(scale)


@hookimpl
def register_methods(register):
    register(Passthrough())
