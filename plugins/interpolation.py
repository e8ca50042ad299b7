"""Merges that interpolate weights: linear, slerp, nuslerp, multislerp, karcher, nearswap.

Semantics follow mergekit 0.1.5's methods of the same names (the math is in
:mod:`compressor.merge.rules`). ``linear`` and ``karcher`` average every input,
the base included when ``--base`` is given (as mergekit adds ``base_model``);
``nuslerp`` and ``multislerp`` interpolate task vectors when there is a base and
the weights themselves when there is none.
"""

from __future__ import annotations

from compressor.hookspecs import hookimpl
from compressor.merge import rules as merge_rules
from compressor.merge.loop import WEIGHTS_OPTION, TensorMerge, expert_weights
from compressor.method import Option, positive


def _t(help: str) -> Option:
    return Option("t", "float", 0.5, help)


def _numbers(value) -> list[float]:
    """Every number an option's value holds: a scalar, a gradient, or -o/config rules."""
    if isinstance(value, dict):
        return _numbers(value.get("value"))
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _numbers(v)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


class Linear(TensorMerge):
    """A weighted average of the models (a model soup)."""

    name = "linear"
    summary = "Weighted average of the models: Σ w_i θ_i / Σ w_i (a model soup)"
    reference = "https://arxiv.org/abs/2203.05482"
    needs_base = False
    min_inputs = 1
    space = "weights"
    elementwise = True
    base_is_input = True
    options = (
        WEIGHTS_OPTION,
        Option("normalize", "bool", True, "divide by the sum of the weights"),
    )

    def merge(self, call):
        weights = expert_weights(call.per["weights"])
        return merge_rules.linear(call.tensors, weights, call.shared["normalize"])


class Slerp(TensorMerge):
    """Spherical interpolation from the base (t = 0) to the one expert (t = 1)."""

    name = "slerp"
    summary = "Spherical interpolation between the base (t=0) and one expert (t=1), per tensor"
    reference = "https://en.wikipedia.org/wiki/Slerp"
    max_inputs = 1
    space = "weights"
    per_expert = frozenset()
    options = (_t("interpolation factor: 0 is the base, 1 the expert; a gradient per layer"),)

    def prepare(self, job, views):
        outside = sorted({v for v in _numbers(job.options["t"]) if not 0 <= v <= 1})
        if outside:
            job.warn(
                f"slerp t {outside[0]:g} is outside [0, 1]: the merge extrapolates beyond "
                f"{'the base' if outside[0] < 0 else 'the expert'} (mergekit does the same)"
            )
        return None

    def merge(self, call):
        return merge_rules.slerp(call.shared["t"], call.base, call.tensors[0])


class Nuslerp(TensorMerge):
    """Slerp of two experts (of their task vectors when there is a base), t from weights."""

    name = "nuslerp"
    summary = "Slerp of two experts with t = w2/(w1+w2); of their task vectors given a base"
    reference = "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp"
    needs_base = False
    min_inputs = 2
    max_inputs = 2
    space = "weights"
    options = (
        WEIGHTS_OPTION,
        Option("row_wise", "bool", False, "slerp each row instead of each column"),
        Option("flatten", "bool", True, "slerp the whole flattened tensor"),
    )

    def merge(self, call):
        w = expert_weights(call.per["weights"])
        total = sum(w)
        t = 0.5 if abs(total) < 1e-6 else w[1] / total
        a, b = call.tensors
        opts = call.shared
        return merge_rules.nuslerp(t, a, b, opts["row_wise"], opts["flatten"], call.base)


class Multislerp(TensorMerge):
    """Barycentric spherical interpolation of any number of experts."""

    name = "multislerp"
    summary = "Spherical barycentric interpolation of several experts (task vectors given a base)"
    reference = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    needs_base = False
    space = "weights"
    options = (
        WEIGHTS_OPTION,
        Option("normalize_weights", "bool", True, "make the weights sum to 1"),
    )

    def merge(self, call):
        w = expert_weights(call.per["weights"])
        tensors = call.tensors
        if call.base is not None:
            tensors = [t - call.base for t in tensors]
        out = merge_rules.multislerp(tensors, w, call.shared["normalize_weights"])
        return out if call.base is None else out + call.base


class Karcher(TensorMerge):
    """The Karcher mean of the models' directions on the sphere, at their mean norm."""

    name = "karcher"
    summary = "Karcher (Riemannian) mean of the models on the hypersphere, at the mean norm"
    reference = "https://arxiv.org/abs/2603.04972"
    needs_base = False
    space = "weights"
    base_is_input = True
    per_expert = frozenset()
    options = (
        Option("max_iter", "int", 10, "iterations of the mean's fixed point", check=positive),
        Option("tol", "float", 1e-5, "stop when the tangent step is this small", check=positive),
    )

    def merge(self, call):
        return merge_rules.karcher(call.tensors, call.shared["max_iter"], call.shared["tol"])


class Nearswap(TensorMerge):
    """Take the expert's values where they are near the base's; blend by t/|Δ| elsewhere."""

    name = "nearswap"
    summary = "NearSwap: the expert's value where within ~t of the base, blended by t/|Δ| beyond"
    reference = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
    max_inputs = 1
    exact_by_cast = True  # its steps are mergekit's: in mergekit's dtype they round alike
    space = "weights"
    elementwise = True
    per_expert = frozenset()
    options = (Option("t", "float", 0.001, "similarity threshold (absolute difference)"),)

    def merge(self, call):
        return merge_rules.nearswap(call.shared["t"], call.base, call.tensors[0])


@hookimpl
def register_methods(register):
    for method in (Linear, Slerp, Nuslerp, Multislerp, Karcher, Nearswap):
        register(method())
