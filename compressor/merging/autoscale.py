"""``-o scale auto``: the merge's scale λ picked on validation data, the Δ computed once.

Every float tensor's merged Δ (the rule's result at λ = 1, less the base) is computed
once and held in memory; for each λ of the grid the model θ0 + λ·Δ is built in memory
(:class:`~compressor.io.deltas.ScaledDelta`) and scored by the job's scorer (``eval``'s
metric on ``-o val``: accuracy, or perplexity for text lines); the best λ is written.
The base alone (λ = 0) is scored first, so a file the model cannot score is refused
before any merging. The grid, every score and the base's are in the manifest.

Memory: the base model and its Δ, in float32, plus one model being scored: this is the
one merge path that holds a whole model, because scoring needs one.
"""

from __future__ import annotations

from compressor.errors import InputError, OptionError, UsageError
from compressor.method import Manifest


def check_scale_auto(method, job) -> list[float]:
    """The grid, after refusing what scale auto cannot do; one line each."""
    if job.base is None or method.base_is_input or method.space != "delta":
        raise UsageError(f"method '{method.name}' has no task-vector scale to pick")
    if job.part is not None or job.compute_dtype is not None:
        raise UsageError("-o scale auto runs the whole merge in float32, not in parts or configs")
    grid = job.options.get("grid")
    if not grid or any(not isinstance(g, float | int) for g in grid):
        raise OptionError("option 'grid' takes one list of scales for the whole merge")
    return sorted({float(g) for g in grid})


def run_scale_auto(method, job) -> Manifest:
    from compressor.io.deltas import ScaledDelta
    from compressor.merging.loop import TensorCall, on_device

    grid = check_scale_auto(method, job)
    base, reference, views, params, positions, state = method.prepared(job)
    try:
        metric, base_score, higher = job.score(ScaledDelta(base, {}, 0.0))
    except InputError as e:
        raise InputError(f"-o val {job.options['val']} cannot score this merge: {e}") from None
    deltas = {}
    for name in job.progress(reference.names(), desc=f"{method.name} (Δ at λ 1)"):
        if not reference.info(name).is_float:
            continue
        shared, per = params.at(name, positions.get(name, 0.0))
        shared = {**shared, "scale": 1.0}
        b = base.get(name).float()
        tensors = [read(name, None, b) for read in views]
        b, tensors = on_device(b, tensors, job.device)  # the Δ kept on the CPU
        merged = method.merge(TensorCall(name, b.clone(), tensors, shared, per, state))
        deltas[name] = merged.sub_(b).cpu()
        del b, tensors
    scores = []
    for scale in job.progress(grid, desc="scale auto"):
        _, value, _ = job.score(ScaledDelta(base, deltas, scale))
        scores.append(value)
    pick = max if higher else min
    best = grid[scores.index(pick(scores))]  # the first (smallest) scale of the best score
    chosen = ScaledDelta(base, deltas, best)
    for name in job.progress(reference.names(), desc="write"):
        job.writer.write(name, chosen.get(name))
    return Manifest(
        "model",
        metrics={
            "experts": len(job.inputs),
            "scale": best,
            f"val_{metric}": scores[grid.index(best)],
            **method.metrics(job, state),
        },
        extra={
            "scale_auto": {
                "metric": metric,
                "higher_is_better": higher,
                "grid": grid,
                "scores": scores,
                "base": base_score,
                "chosen": best,
            }
        },
    )
