"""Joint Tucker-2 compression of LoRA adapters: shared factors, one small core per update.

The updates ΔW_k = s_k·B_k·A_k of one module across many adapters (``share
adapters``), or of one module type across the layers (``share layers``), are
stacked and written as ΔW_k ≈ U·C_k·Vᵀ with U (out × R) and V (in × R) shared
by the whole group and C_k (R × R) per update: Tucker-2 over the stack (FLoRA,
Si et al. 2024). Everything is computed from the small A and B factors: U and
V are eigenvectors of Σ_k ΔW_k·ΔW_kᵀ and Σ_k ΔW_kᵀ·ΔW_k written in the span of
the B's (the A's), refined by HOOI sweeps; errors come from the same small
matrices (‖ΔW_k − U·C_k·Vᵀ‖² = ‖ΔW_k‖² − ‖C_k‖² for orthonormal U, V).
Decoding gives each input back as a PEFT adapter of rank R (B' = U·C_k,
A' = Vᵀ, lora_alpha = R so the scaling is 1).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from compressor.errors import InputError, RefError
from compressor.hookspecs import hookimpl
from compressor.io.peft import PeftAdapter
from compressor.io.safetensors import TensorInfo
from compressor.io.sources import DecodedSource, TensorSource
from compressor.method import Manifest, Method, Option, non_negative, positive

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch


class LoraTucker(Method):
    """Compress PEFT LoRA adapters together; ``NAME#k`` is the k-th adapter decoded."""

    name = "lora-tucker"
    kind = "compress"
    uses_device = True  # the shared factors and cores (float64)
    needs_float64 = True
    summary = "LoRA adapters compressed jointly: shared Tucker-2 factors, a small core per update"
    reference = "https://arxiv.org/abs/2405.14739"
    version = "1"
    max_inputs = None
    options = (
        Option(
            "rank",
            "int",
            0,
            "rank R of the shared factors (0: the largest rank among the inputs)",
            check=non_negative,
        ),
        Option(
            "share",
            "choice",
            "auto",
            "stack one module across the adapters, or one module type across layers "
            "(auto: adapters when there are several, else layers)",
            choices=("auto", "adapters", "layers"),
        ),
        Option("iterations", "int", 5, "HOOI sweeps after the HOSVD start", check=positive),
    )

    def run(self, job):
        adapters = list(job.inputs)
        for a in adapters:
            if not isinstance(a, PeftAdapter):
                raise InputError(
                    f"{a.label} is not a PEFT LoRA adapter; lora-tucker takes adapters"
                )
        modules = _check_alike(adapters)
        share = job.options["share"]
        if share == "auto":
            share = "adapters" if len(adapters) > 1 else "layers"
        rank = job.options["rank"] or max(
            a.info(a.modules[m].a).shape[0] for a in adapters for m in modules
        )
        groups: dict[str, list[tuple[int, str]]] = {}
        for m in modules:
            key = m if share == "adapters" else re.sub(r"\.\d+\.", ".*.", m)
            for i in range(len(adapters)):
                groups.setdefault(key, []).append((i, m))
        meta_groups, err2, norm2, worst = {}, 0.0, 0.0, (0.0, None)
        stored = 0
        for g, (key, members) in enumerate(job.progress(list(groups.items()), desc="lora-tucker")):
            factors = [_factors(adapters[i], m, job.device) for i, m in members]
            u, v, cores = _tucker2(factors, rank, job.options["iterations"])
            job.writer.write(f"g{g}.U", u.contiguous().cpu())
            job.writer.write(f"g{g}.V", v.contiguous().cpu())
            stored += 4 * (u.numel() + v.numel())
            for (i, m), core, (b, a) in zip(members, cores, factors, strict=True):
                job.writer.write(f"a{i}.{m}.C", core.float().contiguous().cpu())
                stored += 4 * core.numel()
                n2 = _norm2(b, a)
                e2 = max(n2 - float(core.square().sum()), 0.0)
                norm2, err2 = norm2 + n2, err2 + e2
                rel = math.sqrt(e2 / n2) if n2 else 0.0
                if rel >= worst[0]:
                    worst = (rel, f"{adapters[i].label}: {m}")
            meta_groups[key] = {"index": g, "members": [[i, m] for i, m in members]}
        source_bytes = 0
        described = []
        for i, a in enumerate(adapters):
            for key in a.replaced.values():  # whole modules the adapter replaces stay dense
                job.writer.write(f"a{i}.{key}", a.get(key))
            source_bytes += sum(a.info(n).nbytes for n in a.infos())
            described.append(
                {
                    "label": a.label,
                    "config": _decoded_config(a.config_data, rank),
                    "modules": {m: [a.modules[m].a, a.modules[m].b] for m in modules},
                    "replaced": sorted(a.replaced.values()),
                }
            )
        if norm2 == 0:
            raise InputError("the adapters' updates are all zero: nothing to compress")
        stored += sum(a.info(k).nbytes for a in adapters for k in a.replaced.values())
        if stored > source_bytes:
            span = sum(a.info(a.modules[m].a).shape[0] for a in adapters for m in modules[:1])
            job.warn(
                f"rank {rank} stores {stored / source_bytes:.1f}x the bytes of the adapters it "
                f"compresses; their updates span at most rank {span} per module, and factors "
                "past that hold zeros (choose a smaller -o rank)"
            )
        return Manifest(
            "adapter",
            metrics={
                "adapters": len(adapters),
                "rank": rank,
                "bytes": stored,
                "source_bytes": source_bytes,
                "ratio": source_bytes / stored,
                "rel_error": math.sqrt(err2 / norm2),
                "worst_rel_error": worst[0],
                "worst_update": worst[1],
            },
            extra={
                "encoding": "lora-tucker",
                "share": share,
                "rank": rank,
                "groups": meta_groups,
                "adapters": described,
                "summary": [
                    f"{len(adapters)} adapters, {len(groups)} groups sharing rank-{rank} factors "
                    f"({share}); select one as NAME#1 … NAME#{len(adapters)}"
                ],
            },
        )

    def decode(self, source: TensorSource) -> TensorSource:
        adapters = source.manifest["adapters"]
        k = source.manifest.get("select")
        if k is None:
            if len(adapters) > 1:
                raise RefError(
                    f"{source.label} holds {len(adapters)} adapters compressed together; name one "
                    f"as {source.label}#1 … {source.label}#{len(adapters)} "
                    "(compress export writes them all)"
                )
            k = 1
        if not 1 <= k <= len(adapters):
            raise RefError(f"{source.label} holds adapters #1 … #{len(adapters)}; there is no #{k}")
        entry = adapters[k - 1]
        return PeftAdapter(
            source.label,
            files=source.files,
            label=f"{source.label}#{k}",
            tensors=DecodedLoraTucker(source, k - 1),
            config=entry["config"],
        )


def _check_alike(adapters: list[PeftAdapter]) -> list[str]:
    """The adapted modules, the same in every adapter with the same shapes; linear only."""
    first = adapters[0]
    names = sorted(first.modules)
    for a in adapters:
        if sorted(a.modules) != names:
            only = sorted(set(a.modules) ^ set(names))
            raise InputError(
                f"{a.label} and {first.label} adapt different modules (e.g. '{only[0]}'); "
                "joint compression needs the same target modules"
            )
        for m in names:
            mine, theirs = a.modules[m], first.modules[m]
            if mine.layout != "linear":
                raise InputError(f"{a.label}: '{m}' is a {mine.layout} LoRA; only linear ones")
            if mine.shape != theirs.shape:
                raise InputError(
                    f"'{m}' has shape {list(mine.shape)} in {a.label} and {list(theirs.shape)} "
                    f"in {first.label}: the adapters are for different base models"
                )
    return names


def _factors(
    adapter: PeftAdapter, module: str, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s·B, A) in float64 on ``device``, ΔW = (s·B)·A in PEFT's (out × in) orientation."""
    m = adapter.modules[module]
    b, a = adapter.get(m.b).to(device), adapter.get(m.a).to(device)
    return b.double() * m.scaling, a.double()


def _norm2(b: torch.Tensor, a: torch.Tensor) -> float:
    """‖B·A‖²_F = tr((BᵀB)(AAᵀ)) without forming B·A."""
    return float(((b.T @ b) * (a @ a.T)).sum())


def _top_space(basis: torch.Tensor, grams: list[torch.Tensor], rank: int) -> torch.Tensor:
    """The top-``rank`` eigenvectors of Σ grams (each in ``basis`` coordinates), as columns."""
    import torch

    total = sum(grams)
    vals, vecs = torch.linalg.eigh((total + total.T) / 2)
    top = vecs[:, vals.argsort(descending=True)[:rank]]
    return basis @ top


def _tucker2(factors, rank: int, iterations: int):
    """Shared U, V and the cores C_k = Uᵀ·ΔW_k·V for updates ΔW_k = B_k·A_k."""
    import torch

    qb, _ = torch.linalg.qr(torch.cat([b for b, _ in factors], dim=1))  # span of every ΔW's columns
    qa, _ = torch.linalg.qr(torch.cat([a.T for _, a in factors], dim=1))  # ... and rows
    wanted, rank = rank, min(rank, qb.shape[1], qa.shape[1])
    bq = [qb.T @ b for b, _ in factors]  # ΔW_k in the bases: (qbᵀB_k)(A_k qa)
    aq = [a @ qa for _, a in factors]
    # HOSVD: U from Σ ΔW ΔWᵀ, V from Σ ΔWᵀ ΔW
    u = _top_space(qb, [b @ (a @ a.T) @ b.T for b, a in zip(bq, aq, strict=True)], rank)
    v = _top_space(qa, [a.T @ (b.T @ b) @ a for b, a in zip(bq, aq, strict=True)], rank)
    for _ in range(iterations):  # HOOI: each factor from the updates projected on the other
        proj = [(b, a @ qa.T @ v) for b, a in zip(bq, aq, strict=True)]  # ΔW V in qb coordinates
        u = _top_space(qb, [b @ av @ av.T @ b.T for b, av in proj], rank)
        proj = [(u.T @ qb @ b, a) for b, a in zip(bq, aq, strict=True)]  # Uᵀ ΔW, in qa coords
        v = _top_space(qa, [a.T @ ub.T @ ub @ a for ub, a in proj], rank)
    if rank < wanted:  # the updates span less than R: zero columns keep every adapter at rank R
        u = torch.nn.functional.pad(u, (0, wanted - rank))
        v = torch.nn.functional.pad(v, (0, wanted - rank))
    cores = [(u.T @ b) @ (a @ v) for b, a in factors]  # float64: the error is ‖ΔW‖² − ‖C‖²
    return u.float(), v.float(), cores


def _decoded_config(config: dict, rank: int) -> dict:
    out = dict(config)
    out.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
    return out


class DecodedLoraTucker(DecodedSource):
    """One adapter of a lora-tucker artifact as PEFT's A and B factors of rank R."""

    content = "adapter"

    def __init__(self, raw: TensorSource, index: int):
        import torch

        super().__init__(raw)
        entry = raw.manifest["adapters"][index]
        self.index = index
        self._where: dict[str, tuple[str, str]] = {}  # key -> (module, "A" | "B")
        self._group = {  # module -> the index of the group whose U and V it shares
            m: g["index"]
            for g in raw.manifest["groups"].values()
            for i, m in g["members"]
            if i == index
        }
        for m, (a_key, b_key) in entry["modules"].items():
            g = self._group[m]
            out, r = raw.info(f"g{g}.U").shape
            n = raw.info(f"g{g}.V").shape[0]
            self._infos[a_key] = TensorInfo(a_key, (r, n), torch.float32, 0, 4 * r * n)
            self._infos[b_key] = TensorInfo(b_key, (out, r), torch.float32, 0, 4 * out * r)
            self._where[a_key], self._where[b_key] = (m, "A"), (m, "B")
        for key in entry["replaced"]:
            self._infos[key] = raw.info(f"a{index}.{key}")

    def encoded(self, name: str) -> bool:
        return name in self._where

    def stored_name(self, name: str) -> str:
        return f"a{self.index}.{name}"

    def _decode(self, name: str) -> torch.Tensor:
        module, part = self._where[name]
        g = self._group[module]
        if part == "A":
            return self.raw.get(f"g{g}.V").T.contiguous()
        return self.raw.get(f"g{g}.U") @ self.raw.get(f"a{self.index}.{module}.C")


@hookimpl
def register_methods(register):
    register(LoraTucker())
