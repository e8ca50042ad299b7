"""task-vector: store an expert as its task vector τ = θt − θ0 (Ilharco et al. 2023)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from compressor.hookspecs import hookimpl
from compressor.io.deltas import TaskVectorView
from compressor.io.sources import block_shape, row_blocks
from compressor.method import Manifest, Method

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    pass


class TaskVector(Method):
    """τ = θt − θ0 per float tensor, in float32; non-float tensors carried as they are."""

    name = "task-vector"
    kind = "compress"
    summary = "Store a fine-tune as its task vector τ = θt − θ0 (float32), tensor by tensor"
    reference = "https://arxiv.org/abs/2212.04089"
    version = "1"
    needs_base = True

    def run(self, job):
        import torch

        view = TaskVectorView(job.base, job.inputs[0], job.warn)
        carried, dtypes = [], {}
        numel, sq = 0, 0.0
        for name in job.progress(job.base.names(), desc="task-vector"):
            info = job.base.info(name)
            if not info.is_float:
                job.writer.write(name, view.carried(name))
                carried.append(name)
                continue
            own = view.expert_dtype(name)
            if own is not None and own != info.dtype:
                dtypes[name] = str(own).removeprefix("torch.")
            job.writer.begin(name, info.shape, torch.float32)
            for rows in row_blocks(info):
                d = view.delta(name, rows)
                if d is None:
                    d = torch.zeros(block_shape(info, rows))
                sq += float(torch.linalg.vector_norm(d)) ** 2
                job.writer.write_rows(d)
            job.writer.end()
            numel += info.numel
        return Manifest(
            "delta",
            metrics={"params": numel, "l2_norm": sq**0.5},
            extra={"carried": carried, "dtypes": dtypes},
        )


@hookimpl
def register_methods(register):
    register(TaskVector())
