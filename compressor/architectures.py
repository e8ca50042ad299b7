"""Architecture knowledge, in one place: where each family keeps its layers and FFN tensors,
which dimension of each tensor indexes the hidden neurons, and which config keys hold the
widths and the layer count. Read by every method that reshapes a model (MatFormer's cuts
and nested training today; NeuMeta's and SketchTune's choice of layers next).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:
    import torch


GRANULARITIES = (0.125, 0.25, 0.5, 1.0)
# config entries that hold one value per layer: filtered when layers are skipped
PER_LAYER_KEYS = ("intermediate_size", "layer_types", "activation_sparsity_pattern")
# Gemma 3n's per-layer input tensors hold one chunk per layer along one dimension
PER_LAYER_TENSORS = {"embed_tokens_per_layer.weight": 1, "per_layer_model_projection.weight": 0}


@dataclass(frozen=True)
class Member:
    """One FFN tensor: which dimension indexes the hidden neurons and what it does."""

    rest: str  # the name after "<layers>.<i>."
    dim: int
    role: str  # "in" feeds the neurons, "out" reads them, "bias" is the in-projection's bias
    fused: bool = False  # [gate; up] stacked along dim, d_ff each


_LLAMA_MLP = (
    Member("mlp.gate_proj.weight", 0, "in"),
    Member("mlp.up_proj.weight", 0, "in"),
    Member("mlp.gate_up_proj.weight", 0, "in", fused=True),
    Member("mlp.gate_proj.bias", 0, "bias"),
    Member("mlp.up_proj.bias", 0, "bias"),
    Member("mlp.down_proj.weight", 1, "out"),
)


@dataclass(frozen=True)
class FfnLayout:
    """Where an architecture family keeps its layers and FFN tensors, and its config keys."""

    family: str
    model_types: tuple[str, ...]
    layers: str  # the name of the layer list: tensors are "<prefix>.<layers>.<i>.<rest>"
    members: tuple[Member, ...]
    width_key: str = "intermediate_size"
    layers_key: str = "num_hidden_layers"
    per_layer_widths: bool = False  # the config takes a list of widths


LAYOUTS = (
    FfnLayout(
        "llama",
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"),
        "layers",
        _LLAMA_MLP,
    ),
    FfnLayout("gemma3n", ("gemma3n", "gemma3n_text"), "layers", _LLAMA_MLP, per_layer_widths=True),
    FfnLayout(
        "bert",
        ("bert", "roberta", "vit"),
        "layer",
        (
            Member("intermediate.dense.weight", 0, "in"),
            Member("intermediate.dense.bias", 0, "bias"),
            Member("output.dense.weight", 1, "out"),
        ),
    ),
    FfnLayout(
        "gpt2",
        ("gpt2",),
        "h",
        (  # Conv1D stores weights as (in, out)
            Member("mlp.c_fc.weight", 1, "in"),
            Member("mlp.c_fc.bias", 0, "bias"),
            Member("mlp.c_proj.weight", 0, "out"),
        ),
        width_key="n_inner",
        layers_key="n_layer",
    ),
)
SUPPORTED = sorted(t for layout in LAYOUTS for t in layout.model_types)


class FfnModel:
    """A source model's layout: its config, layers, FFN tensors and their widths."""

    def __init__(self, source, method: str = "matformer"):
        """``method`` names who asks, in the messages."""
        config = source.config()
        if config is None:
            raise InputError(f"{source.label} has no config.json; {method} needs one")
        self.source = source
        self.config = config
        self.text = config.get("text_config") or config  # Gemma 3n keeps its text model here
        model_type = self.text.get("model_type") or config.get("model_type")
        layout = next((lay for lay in LAYOUTS if model_type in lay.model_types), None)
        if layout is None:
            raise InputError(
                f"{method} does not know the architecture '{model_type}' of {source.label}; "
                f"supported: {', '.join(SUPPORTED)}"
            )
        self.layout = layout
        self.model_type = model_type
        pattern = re.compile(rf"^(|.*\.){re.escape(layout.layers)}\.(\d+)\.(.+)$")
        rests = {m.rest: m for m in layout.members}
        self.ffn: dict[int, dict[str, Member]] = {}  # layer -> tensor name -> member
        self.prefix = None
        for name in source.names():
            m = pattern.match(name)
            if m and m.group(3) in rests:
                if self.prefix not in (None, m.group(1)):
                    raise InputError(f"{source.label}: FFN tensors under two layer lists")
                self.prefix = m.group(1)
                self.ffn.setdefault(int(m.group(2)), {})[name] = rests[m.group(3)]
        if not self.ffn:
            raise InputError(f"{source.label} has no {layout.family}-style FFN tensors")
        self.layer_re = re.compile(rf"^{re.escape(self.prefix + layout.layers)}\.(\d+)\.(.+)$")
        self.num_layers = self.text.get(layout.layers_key) or len(self.ffn)
        if sorted(self.ffn) != list(range(self.num_layers)):
            raise InputError(
                f"{source.label}: FFN tensors found for {len(self.ffn)} layers, "
                f"the config says {self.num_layers}"
            )
        self.d_ff = [self._width(layer) for layer in range(self.num_layers)]

    def _width(self, layer: int) -> int:
        name, member = next((n, m) for n, m in self.ffn[layer].items() if m.role != "bias")
        size = self.source.info(name).shape[member.dim]
        return size // 2 if member.fused else size

    def neuron_cost(self, layer: int) -> int:
        """Parameters that one hidden neuron of this layer's FFN costs."""
        infos = self.source.infos()
        return sum(infos[name].numel for name in self.ffn[layer]) // self.d_ff[layer]

    def out_tensors(self) -> dict[int, tuple[str, Member]]:
        """Per layer, the tensor that reads the FFN's hidden neurons (the down projection)."""
        return {
            i: next((n, m) for n, m in members.items() if m.role == "out")
            for i, members in self.ffn.items()
        }

    def out_modules(self, net) -> dict[int, torch.nn.Module]:
        """Per layer, the module of ``net`` whose input is the FFN's hidden activations."""
        modules = dict(net.named_modules())
        found = {}
        for i, (name, _) in self.out_tensors().items():
            found[i] = modules.get(name.removesuffix(".weight"))
            if found[i] is None:
                raise InputError(f"{self.source.label}: no module for {name}")
        return found

    def kv_sharing(self) -> list[str | None]:
        """Gemma 3n: per layer None, 'store' (later layers read its KV) or 'reuse'."""
        if self.layout.family != "gemma3n":
            return [None] * self.num_layers
        from transformers import Gemma3nTextConfig

        return list(Gemma3nTextConfig.from_dict(self.text).kv_sharing_modes)


def width_at(d_ff: int, fraction_kept: float) -> int:
    """The FFN width at a granularity: the rule extraction and nested training share."""
    return max(1, round(fraction_kept * d_ff))
