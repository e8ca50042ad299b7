"""lora-extract: a PEFT LoRA adapter that approximates a fine-tune (mergekit-extract-lora).

Each changed linear weight's task vector Δ = θt − θ0 becomes its rank-r truncated
SVD, B·A with B = U_r·√S_r and A = √S_r·V_rᵀ (``distribute_scale``, mergekit's
default; else B = U_r, A = S_r·V_rᵀ), and lora_alpha = r so PEFT's scaling is 1.
A linear whose bias changed keeps its weight as factors and carries the bias's Δ
as ``lora_B.bias`` with ``lora_bias: true`` (PEFT ≥ 0.14 loads it; mergekit writes
the same tensor), so BERT, RoBERTa, ViT and GPT-2 fine-tunes extract to real
factors. Changed embeddings, the LM head and norms go to ``modules_to_save`` at
full precision, with a warning naming them; unchanged modules are left out. One
tensor at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compressor.hookspecs import hookimpl
from compressor.io.deltas import TaskVectorView
from compressor.io.peft import CONFIG_FILE, PREFIX
from compressor.method import Manifest, Method, Option, positive


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _is_embedding(name: str) -> bool:
    return "embed" in name or name.endswith(("lm_head.weight", "wte.weight", "wpe.weight"))


class LoraExtract(Method):
    """Write a PEFT LoRA adapter of rank ``rank`` that approximates a fine-tune of the base."""

    name = "lora-extract"
    kind = "compress"
    uses_device = True  # each linear's truncated SVD
    summary = "A PEFT LoRA adapter approximating a fine-tune: truncated SVD of each linear's Δ"
    reference = "https://github.com/arcee-ai/mergekit/blob/main/mergekit/scripts/extract_lora.py"
    version = "2"
    needs_base = True
    options = (
        Option(
            "rank",
            "int",
            16,
            "LoRA rank r (at most the smaller side of each weight)",
            check=positive,
        ),
        Option(
            "distribute_scale",
            "bool",
            True,
            "split the singular values between A and B as √S (mergekit's default)",
        ),
    )

    def run(self, job):
        base, view = job.base, TaskVectorView(job.base, job.inputs[0], job.warn)
        rank, split = job.options["rank"], job.options["distribute_scale"]
        config = base.config() or {}
        transposed = config.get("model_type") == "gpt2"  # Conv1D weights are in × out
        infos = {n: base.info(n) for n in base.names()}
        members: dict[str, list[str]] = {}  # module → its float tensors
        for n, i in infos.items():
            if i.is_float:
                members.setdefault(_module(n), []).append(n)
        linears = {
            _module(n)
            for n, i in infos.items()
            if i.is_float and len(i.shape) == 2 and n.endswith(".weight") and not _is_embedding(n)
        }
        full = set()  # modules saved whole: changed norms (and embeddings, below)
        biased = set()  # linears whose bias changed: the Δ bias rides on lora_B
        for name, info in infos.items():  # changed 1-D tensors: norms, biases
            if info.is_float and len(info.shape) == 1 and _changed(view.delta(name)):
                module = _module(name)
                is_bias = module in linears and name.endswith(".bias")
                (biased if is_bias else full).add(module)
        job.writer.prefix = "adapter_model"
        out = _Written()
        for name in job.progress(list(infos), desc="lora-extract"):
            info = infos[name]
            module = _module(name)
            if not info.is_float or module in out.saved:
                continue  # written whole with its module already
            d = None if module in full else view.delta(name)
            if module in full or (_is_embedding(name) and _changed(d)):
                self._save_whole(job, base, view, module, members[module], infos, out)
                full.add(module)
            elif module in linears and name.endswith(".weight"):
                if _changed(d) or module in biased:
                    self._factor(job, module, d, info, transposed, rank, split, out)  # on device
                if module in biased:
                    bias = f"{module}.bias"
                    delta_bias = view.delta(bias)
                    job.writer.write(
                        f"{PREFIX}{module}.lora_B.bias", delta_bias.to(infos[bias].dtype)
                    )
                    out.lora_params += delta_bias.numel()
        if out.saved:
            job.warn(
                f"{len(out.saved)} module(s) changed where LoRA factors cannot hold the change "
                f"(norms, embeddings) and are saved whole in modules_to_save: "
                f"{', '.join(out.saved[:4])}{' ...' if len(out.saved) > 4 else ''}"
            )
        job.writer.add_json(
            CONFIG_FILE,
            {
                "peft_type": "LORA",
                "base_model_name_or_path": config.get("_name_or_path") or None,
                "r": rank,
                "lora_alpha": rank,
                "rank_pattern": out.ranks,
                "alpha_pattern": out.ranks,
                "use_rslora": False,
                "target_modules": out.targets,
                "modules_to_save": out.saved or None,
                "lora_dropout": 0.0,
                "fan_in_fan_out": transposed,
                "bias": "none",
                "lora_bias": bool(biased),
                "inference_mode": True,
                "task_type": None,
            },
        )
        errors = out.errors
        return Manifest(
            "adapter",
            metrics={
                "modules": len(out.targets),
                "modules_to_save": len(out.saved),
                "lora_params": out.lora_params,
                "full_params": out.full_params,
                "mean_rel_error": sum(errors) / len(errors) if errors else 0.0,
                "max_rel_error": max(errors, default=0.0),
            },
        )

    @staticmethod
    def _save_whole(job, base, view, module, names, infos, out) -> None:
        """Every tensor of the module, as fine-tuned, under modules_to_save."""
        out.saved.append(module)
        for other in names:
            b = base.get(other).float()
            od = view.delta(other, None, b)
            t = b if od is None else b.add_(od)
            job.writer.write(f"{PREFIX}{other}", t.to(infos[other].dtype))
            out.full_params += infos[other].numel

    @staticmethod
    def _factor(job, module, d, info, transposed, rank, split, out) -> None:
        """The rank-r truncated SVD of the weight's Δ (zero when only the bias changed)."""
        import torch

        if d is None:
            d = torch.zeros(info.shape)
        delta = (d.t() if transposed else d).to(job.device)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.numel())
        if r != rank:
            out.ranks[module] = r
        if split:
            root = s[:r].sqrt()
            a, b = root[:, None] * vh[:r], u[:, :r] * root
        else:
            a, b = s[:r, None] * vh[:r], u[:, :r].clone()
        tail = float(s[r:].square().sum().sqrt())
        out.errors.append(tail / max(float(s.square().sum().sqrt()), 1e-30))
        job.writer.write(f"{PREFIX}{module}.lora_A.weight", a.contiguous().to("cpu", info.dtype))
        job.writer.write(f"{PREFIX}{module}.lora_B.weight", b.contiguous().to("cpu", info.dtype))
        out.targets.append(module)
        out.lora_params += a.numel() + b.numel()


@dataclass
class _Written:
    """What the adapter holds so far: its config's lists and the manifest's counts."""

    targets: list = field(default_factory=list)
    saved: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    ranks: dict = field(default_factory=dict)
    lora_params: int = 0
    full_params: int = 0


def _changed(d) -> bool:
    import torch

    return d is not None and bool(torch.count_nonzero(d))


@hookimpl
def register_methods(register):
    register(LoraExtract())
