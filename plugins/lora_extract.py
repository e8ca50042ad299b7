"""lora-extract: a PEFT LoRA adapter that approximates a fine-tune (mergekit-extract-lora).

Each changed linear weight's task vector Δ = θt − θ0 becomes its rank-r truncated
SVD, B·A with B = U_r·√S_r and A = √S_r·V_rᵀ (``distribute_scale``, mergekit's
default; else B = U_r, A = S_r·V_rᵀ), and lora_alpha = r so PEFT's scaling is 1.
Changed embeddings and the LM head, norms, and linears whose bias changed go to
``modules_to_save`` at full precision, as mergekit does; unchanged modules are
left out. One tensor at a time.
"""

from __future__ import annotations

from compressor.alignment import TaskVectorView
from compressor.hookspecs import hookimpl
from compressor.method import Manifest, Method, Option, positive
from compressor.peft_adapter import CONFIG_FILE, PREFIX


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _is_embedding(name: str) -> bool:
    return "embed" in name or name.endswith(("lm_head.weight", "wte.weight", "wpe.weight"))


class LoraExtract(Method):
    """Write a PEFT LoRA adapter of rank ``rank`` that approximates a fine-tune of the base."""

    name = "lora-extract"
    kind = "compress"
    summary = "A PEFT LoRA adapter approximating a fine-tune: truncated SVD of each linear's Δ"
    reference = "https://github.com/arcee-ai/mergekit/blob/main/mergekit/scripts/extract_lora.py"
    version = "1"
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
        import torch

        base, view = job.base, TaskVectorView(job.base, job.inputs[0], job.warn)
        rank, split = job.options["rank"], job.options["distribute_scale"]
        config = base.config() or {}
        transposed = config.get("model_type") == "gpt2"  # Conv1D weights are in × out
        infos = {n: base.info(n) for n in base.names()}
        members: dict[str, list[str]] = {}  # module → its float tensors
        for n, i in infos.items():
            if i.is_float:
                members.setdefault(_module(n), []).append(n)
        full = set()  # modules saved whole
        for name, info in infos.items():  # changed 1-D tensors: norms, biases
            if info.is_float and len(info.shape) == 1 and _changed(view.delta(name)):
                full.add(_module(name))
        job.writer.prefix = "adapter_model"
        targets, saved, errors, ranks = [], [], [], {}
        lora_params = full_params = 0
        for name in job.progress(list(infos), desc="lora-extract"):
            info = infos[name]
            module = _module(name)
            if not info.is_float:
                continue
            if module in saved:
                continue  # written whole with its module
            d = None if module in full else view.delta(name)
            if module in full or (_is_embedding(name) and _changed(d)):
                saved.append(module)
                full.add(module)
                for other in members[module]:  # every tensor of it, as fine-tuned
                    b = base.get(other).float()
                    od = view.delta(other, None, b)
                    t = b if od is None else b.add_(od)
                    job.writer.write(f"{PREFIX}{other}", t.to(infos[other].dtype))
                    full_params += infos[other].numel
                continue
            if len(info.shape) != 2 or not name.endswith(".weight") or not _changed(d):
                continue
            delta = d.t() if transposed else d
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            r = min(rank, s.numel())
            if r != rank:
                ranks[module] = r
            if split:
                root = s[:r].sqrt()
                a, b = root[:, None] * vh[:r], u[:, :r] * root
            else:
                a, b = s[:r, None] * vh[:r], u[:, :r].clone()
            tail = float(s[r:].square().sum().sqrt())
            errors.append(tail / max(float(s.square().sum().sqrt()), 1e-30))
            job.writer.write(f"{PREFIX}{module}.lora_A.weight", a.contiguous().to(info.dtype))
            job.writer.write(f"{PREFIX}{module}.lora_B.weight", b.contiguous().to(info.dtype))
            targets.append(module)
            lora_params += a.numel() + b.numel()
        job.writer.add_json(
            CONFIG_FILE,
            {
                "peft_type": "LORA",
                "base_model_name_or_path": config.get("_name_or_path") or None,
                "r": rank,
                "lora_alpha": rank,
                "rank_pattern": ranks,
                "alpha_pattern": ranks,
                "use_rslora": False,
                "target_modules": targets,
                "modules_to_save": saved or None,
                "lora_dropout": 0.0,
                "fan_in_fan_out": transposed,
                "bias": "none",
                "inference_mode": True,
                "task_type": None,
            },
        )
        return Manifest(
            "adapter",
            metrics={
                "modules": len(targets),
                "modules_to_save": len(saved),
                "lora_params": lora_params,
                "full_params": full_params,
                "mean_rel_error": sum(errors) / len(errors) if errors else 0.0,
                "max_rel_error": max(errors, default=0.0),
            },
        )


def _changed(d) -> bool:
    import torch

    return d is not None and bool(torch.count_nonzero(d))


@hookimpl
def register_methods(register):
    register(LoraExtract())
