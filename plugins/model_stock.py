"""model-stock: the base moved toward the experts' average by their angle (Jang et al. 2024)."""

from __future__ import annotations

from compressor.hookspecs import hookimpl
from compressor.merge import exact as mergekit_exact
from compressor.merge import rules as merge_rules
from compressor.merge.loop import TensorMerge
from compressor.method import Option


class ModelStock(TensorMerge):
    """θ = t·mean(θ_i) + (1 − t)·θ0, t = N cos θ / (1 + (N − 1) cos θ) from the experts'
    mean pairwise angle, per tensor or per row (mergekit's ``model_stock``)."""

    name = "model-stock"
    summary = "Model Stock: interpolate base → experts' average by their task vectors' angle"
    reference = "https://arxiv.org/abs/2403.19522"
    min_inputs = 2
    space = "weights"
    per_expert = frozenset()
    options = (
        Option("filter_wise", "bool", False, "one angle per row (filter) instead of per tensor"),
    )

    def merge(self, call):
        return merge_rules.model_stock(call.base, call.tensors, call.shared["filter_wise"])

    def merge_exact(self, call):
        """mergekit's steps in its compute dtype, the whole tensor at once (as mergekit)."""
        return mergekit_exact.model_stock(
            call.base, call.tensors, call.exact, call.shared["filter_wise"]
        )


@hookimpl
def register_methods(register):
    register(ModelStock())
