"""task-arithmetic: θ = θ0 + λ Σ_t w_t τ_t (Ilharco et al. 2023; mergekit's task_arithmetic)."""

from __future__ import annotations

from compressor.alignment import TaskVectorView
from compressor.hookspecs import hookimpl
from compressor.merging import SCALE_OPTION, WEIGHTS_OPTION, expert_weights
from compressor.method import Manifest, Method
from compressor.sources import row_blocks


class TaskArithmetic(Method):
    """Adds the weighted, scaled sum of the experts' task vectors to the base."""

    name = "task-arithmetic"
    kind = "merge"
    summary = "Add the scaled sum of the experts' task vectors to the base: θ0 + λ Σ w_t τ_t"
    reference = "https://arxiv.org/abs/2212.04089"
    version = "1"
    needs_base = True
    max_inputs = None
    options = (SCALE_OPTION, WEIGHTS_OPTION)

    def run(self, job):
        weights = expert_weights(job)
        scale = job.options["scale"]
        views = [TaskVectorView(job.base, e, job.warn) for e in job.inputs]
        for name in job.progress(job.base.names(), desc="task-arithmetic"):
            info = job.base.info(name)
            if not info.is_float:
                job.writer.write(name, job.base.get(name))
                continue
            job.writer.begin(name, info.shape, info.dtype)
            for rows in row_blocks(info):
                base = job.base.get(name, rows).float()
                mixed = None
                for w, view in zip(weights, views, strict=True):
                    d = view.delta(name, rows, base)
                    if d is not None:
                        mixed = d.mul_(w) if mixed is None else mixed.add_(d, alpha=w)
                if mixed is not None:
                    base += mixed.mul_(scale)
                job.writer.write_rows(base.to(info.dtype))
            job.writer.end()
        return Manifest("model", metrics={"experts": len(job.inputs)})


@hookimpl
def register_methods(register):
    register(TaskArithmetic())
