"""LoRA experts merged in their core space (Panariello et al., NeurIPS 2025, arXiv 2509.17786).

``-o space core`` on a merge whose experts are all PEFT LoRA adapters of one base. Per
adapted module, with ΔW_t = s_t·B_t·A_t (s_t the adapter's scaling, ranks r_t may differ):

- reference bases from the stacked factors: U_B, the left singular vectors of
  [s_1B_1 … s_TB_T] (out × R), and V_A, the right singular vectors of [A_1; …; A_T]
  (in × R), R = Σ r_t (the paper's SVD bases);
- each adapter as an R × R core M_t = U_Bᵀ·s_tB_t·A_t·V_A, so that ΔW_t = U_B·M_t·V_Aᵀ
  exactly (ΔW_t lies in both spans);
- the method's own rule applied to the cores as if they were the task vectors (its
  per-expert weights, scale and other options as in full space);
- the merged core M back as LoRA factors of rank k = min(``rank``, R) from M's SVD:
  B = U_B·P_k·S_k, A = Q_kᵀ·V_Aᵀ, written as a PEFT adapter (lora_alpha = r, scaling 1).

Rules that are linear in the task vectors (task arithmetic) give exactly the full-space
result; the others (TIES, TSV-M, Iso-C, ...) act on the cores, which is the paper's
recipe. Cost per module: two thin SVDs of the stacked factors and one R × R SVD, never
an out × in matrix; memory holds one module's factors of every adapter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from compressor.errors import MismatchError, OptionError, UsageError
from compressor.io.peft import CONFIG_FILE, PREFIX, PeftAdapter
from compressor.method import Manifest

if TYPE_CHECKING:
    import torch


def core_adapters(method, job) -> list[PeftAdapter]:
    """The experts as LoRA adapters of one base with the same adapted modules; else one
    clear line (a non-adapter expert, a module LoRA cannot merge here, two targets)."""
    if method.space != "delta":
        raise UsageError(
            f"method '{method.name}' merges weights, not task vectors; "
            "-o space core takes a task-vector merge (task-arithmetic, ties, tsv-m, ...)"
        )
    if job.options.get("scope") == "global":
        raise UsageError(
            "-o scope global ranks entries over the full-space task vectors; "
            "core space takes scope tensor"
        )
    adapters = []
    for source in job.inputs:
        if not isinstance(source, PeftAdapter):
            raise UsageError(
                f"{source.label} is not a LoRA adapter; -o space core merges PEFT LoRA "
                "adapters only (use -o space full)"
            )
        whole = sorted(source.replaced)
        if whole:
            raise UsageError(
                f"{source.label} also saves whole modules ({', '.join(whole[:3])}); core space "
                "merges LoRA factors only (use -o space full)"
            )
        other = [m.weight for m in source.modules.values() if m.layout != "linear"]
        if other:
            raise UsageError(
                f"{source.label} adapts {other[0]} with a {source.modules[other[0]].layout} "
                "factor; core space merges linear LoRA modules only (use -o space full)"
            )
        adapters.append(source)
    first = adapters[0]
    for a in adapters[1:]:
        if set(a.modules) != set(first.modules):
            only = sorted(set(a.modules) ^ set(first.modules))[0]
            raise MismatchError(
                f"{first.label} and {a.label} adapt different modules ({only} is in one "
                "only); core space needs adapters of the same target modules"
            )
        said = [x.config_data.get("base_model_name_or_path") for x in (first, a)]
        if all(said) and said[0] != said[1]:
            raise MismatchError(
                f"{first.label} and {a.label} are adapters of different bases "
                f"({said[0]} and {said[1]})"
            )
        if bool(a.config_data.get("fan_in_fan_out")) != bool(
            first.config_data.get("fan_in_fan_out")
        ):
            raise MismatchError(f"{first.label} and {a.label} lay out their factors differently")
    return adapters


def reference_bases(bs: list[torch.Tensor], as_: list[torch.Tensor]):
    """(U_B, V_A): orthonormal bases of the stacked B's columns and A's rows (float64)."""
    import torch

    u_b = torch.linalg.svd(torch.cat(bs, dim=1), full_matrices=False)[0]
    v_a = torch.linalg.svd(torch.cat(as_, dim=0), full_matrices=False)[2].T
    return u_b, v_a


def factors_of(core: torch.Tensor, u_b, v_a, rank: int):
    """LoRA factors (B, A) of U_B·core·V_Aᵀ at ``rank``, from the core's SVD."""
    import torch

    p, s, qh = torch.linalg.svd(core, full_matrices=False)
    k = min(rank, s.numel())
    return u_b @ (p[:, :k] * s[:k]), qh[:k] @ v_a.T


def run_core_space(method, job) -> Manifest:
    """The merge of LoRA adapters in their core space, written as a PEFT adapter."""
    import torch

    from compressor.merging.loop import TensorCall
    from compressor.merging.params import TensorParameters, layer_positions

    adapters = core_adapters(method, job)
    rank = job.options.get("rank")
    if isinstance(rank, list):
        raise OptionError("option 'rank' takes one value for the whole merge")
    base = job.base
    names = [n for n in base.names() if n in adapters[0].modules]
    missing = sorted(set(adapters[0].modules) - set(base.names()))
    if missing:
        raise MismatchError(f"{adapters[0].label} adapts {missing[0]}, which the base lacks")
    params = TensorParameters(job.options, method.per_expert, len(adapters))
    positions = job.positions or layer_positions(base.names())
    state = method.prepare(job, [])
    job.writer.prefix = "adapter_model"
    out_rank = {}
    total_rank = 0
    dtype = adapters[0].info(adapters[0].modules[names[0]].a).dtype if names else torch.float32
    for name in job.progress(names, desc=f"{method.name} (core space)"):
        mods = [a.modules[name] for a in adapters]
        dev = job.device  # the factors, bases and cores on the device
        as_ = [a.get(m.a).to(dev).double() for a, m in zip(adapters, mods, strict=True)]
        bs = [a.get(m.b).to(dev).double() * m.scaling for a, m in zip(adapters, mods, strict=True)]
        u_b, v_a = reference_bases(bs, as_)
        cores = [((u_b.T @ b) @ (a @ v_a)).float() for a, b in zip(as_, bs, strict=True)]  # R × R
        total_rank = cores[0].shape[0]
        shared, per = params.at(name, positions.get(name, 0.0))
        call = TensorCall(name, torch.zeros_like(cores[0]), cores, shared, per, state)
        merged = method.merge(call).double()
        b, a = factors_of(merged, u_b, v_a, rank or total_rank)
        module = name.removesuffix(".weight")
        out_rank[module] = b.shape[1]
        job.writer.write(f"{PREFIX}{module}.lora_A.weight", a.contiguous().to("cpu", dtype))
        job.writer.write(f"{PREFIX}{module}.lora_B.weight", b.contiguous().to("cpu", dtype))
    r = max(out_rank.values(), default=rank or 1)
    pattern = {m: k for m, k in out_rank.items() if k != r}
    config = dict(adapters[0].config_data)
    config.update(
        {
            "r": r,
            "lora_alpha": r,
            "rank_pattern": pattern,
            "alpha_pattern": pattern,
            "use_rslora": False,
            "use_dora": False,
            "lora_dropout": 0.0,
            "inference_mode": True,
            "target_modules": sorted({m.rsplit(".", 1)[-1] for m in out_rank}),
        }
    )
    job.writer.add_json(CONFIG_FILE, config)
    return Manifest(
        "adapter",
        metrics={
            "experts": len(adapters),
            "space": "core",
            "modules": len(out_rank),
            "core_rank": total_rank,
            "rank": r,
            **method.metrics(job, state),
        },
    )
