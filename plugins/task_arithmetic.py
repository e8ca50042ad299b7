"""task-arithmetic: θ = θ0 + λ Σ_t w_t τ_t (Ilharco et al. 2023; mergekit's task_arithmetic)."""

from __future__ import annotations

from compressor.hookspecs import hookimpl
from compressor.merging import exact as mergekit_exact
from compressor.merging.loop import (
    SCALE_OPTION,
    WEIGHTS_OPTION,
    TensorMerge,
    expert_weights,
    weighted_sum,
)
from compressor.method import Option


class TaskArithmetic(TensorMerge):
    """Adds the weighted, scaled sum of the experts' task vectors to the base."""

    name = "task-arithmetic"
    summary = "Add the scaled sum of the experts' task vectors to the base: θ0 + λ Σ w_t τ_t"
    reference = "https://arxiv.org/abs/2212.04089"
    version = "1"
    elementwise = True
    options = (
        SCALE_OPTION,
        WEIGHTS_OPTION,
        Option("normalize", "bool", False, "divide Σ w_t τ_t by Σ w_t (mergekit's normalize)"),
    )

    def merge(self, call):
        normalize = "weights" if call.shared["normalize"] else "none"
        mixed = weighted_sum(call.tensors, call.per["weights"], normalize)
        if mixed is None:
            return call.base
        return call.base.add_(mixed, alpha=call.shared["scale"])

    def merge_exact(self, call):
        """mergekit's task arithmetic in its compute dtype (a merge config's default)."""
        return mergekit_exact.task_arithmetic(
            call.base,
            call.tensors,
            call.exact,
            expert_weights(call.per["weights"]),
            lambda t, delta: delta,
            consensus=False,
            normalize=call.shared["normalize"],
            scale=call.shared["scale"],
        )[0]


@hookimpl
def register_methods(register):
    register(TaskArithmetic())
