"""Architecture knowledge, in one place: where each family keeps its layers and FFN tensors,
which dimension of each tensor indexes the hidden neurons, and which config keys hold the
widths and the layer count. Read by every method that reshapes a model (MatFormer's cuts
and nested training today; NeuMeta's and SketchTune's choice of layers next).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from compressor.errors import InputError
from compressor.io.contents import describe_content

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
        if source.content != "model":  # an adapter or a task vector: add it to its base first
            raise InputError(
                f"{source.label} holds {describe_content(source.content)}, not a model; "
                f"{method} needs a full model (export it onto its base first: "
                "`compress export REF OUT --base BASE`)"
            )
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

    def out_modules(self, net, param_of: dict | None = None) -> dict[int, torch.nn.Module]:
        """Per layer, the module of ``net`` whose input is the FFN's hidden activations
        (found through the checkpoint names, which transformers renames for some
        architectures: ViT; ``param_of`` maps them to ``net``'s parameters when the caller
        has the map already)."""
        from compressor.models.modeling import checkpoint_names

        modules = dict(net.named_modules())
        if param_of is None:
            param_of = {c: p for p, c in checkpoint_names(net, self.source).items()}
        found = {}
        for i, (name, _) in self.out_tensors().items():
            found[i] = modules.get(param_of.get(name, name).removesuffix(".weight"))
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


# -- widths that morph: NeuMeta's generated part ---------------------------------------------


@dataclass(frozen=True)
class WidthAxis:
    """One dimension of a tensor that a width group indexes.

    ``pool`` says how neurons merge when the group narrows: "mean" for the neurons' own
    parameters (rows of an in-projection, a channel's filters and norms), "sum" where a
    tensor reads the group (a down projection's columns, the next conv's in-channels), so
    merged neurons add up their contributions.
    """

    group: str
    dim: int
    pool: str  # "mean" | "sum"


@dataclass(frozen=True)
class WidthTensor:
    """A tensor whose shape follows one or more width groups."""

    name: str
    family: str  # tensors of one family share a generator (and their fixed dims)
    layer: int
    axes: tuple[WidthAxis, ...]
    statistic: bool = False  # a normalisation's running statistics: resampled, not learned


class WidthLayout:
    """The part of a model that changes with its width: groups of coupled neurons or
    channels, each with its full width, and the tensors each group indexes.

    Transformers (the MatFormer families): one group per FFN, its hidden neurons.
    transformers' ResNet (basic blocks): one group per stage, its channels, coupled
    through the stage's residual stream, its shortcut and the next stage's input.
    """

    def __init__(self, source, method: str = "neumeta"):
        self.source = source
        self.config = source.config() or {}  # FfnModel refuses a model without one
        self.groups: dict[str, int] = {}
        self.tensors: dict[str, WidthTensor] = {}
        if self.config.get("model_type") == "resnet":
            self._resnet(source, method)
        else:
            self._ffn(FfnModel(source, method), method)
        self.num_layers = 1 + max(t.layer for t in self.tensors.values())

    def _ffn(self, model: FfnModel, method: str) -> None:
        if model.layout.family == "gemma3n":
            raise InputError(f"{method} does not morph Gemma 3n yet (its per-layer inputs)")
        self.ffn = model
        for layer, members in model.ffn.items():
            group = f"ffn.{layer}"
            self.groups[group] = model.d_ff[layer]
            for name, member in members.items():
                if member.fused:
                    raise InputError(
                        f"{model.source.label}: {method} does not morph fused gate-up "
                        f"projections ({name}) yet"
                    )
                pool = "sum" if member.role == "out" else "mean"
                axis = WidthAxis(group, member.dim, pool)
                self.tensors[name] = WidthTensor(name, member.rest, layer, (axis,))

    def _resnet(self, source, method: str) -> None:
        if self.config.get("layer_type", "bottleneck") != "basic":
            raise InputError(
                f"{source.label}: {method} morphs ResNets of basic blocks; this one has "
                f"'{self.config.get('layer_type')}' layers"
            )
        self.ffn = None
        sizes = list(self.config["hidden_sizes"])
        depths = list(self.config["depths"])
        for s, width in enumerate(sizes):
            self.groups[f"stage.{s}"] = width
        pattern = re.compile(
            r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.(shortcut|layer\.[01])\."
            r"(convolution|normalization)\.(weight|bias|running_mean|running_var)$"
        )
        infos = source.infos()
        blocks = [sum(depths[:s]) for s in range(len(depths))]  # first block of each stage
        for name in infos:
            m = pattern.match(name)
            if name == "classifier.1.weight":
                axis = WidthAxis(f"stage.{len(sizes) - 1}", 1, "sum")
                self.tensors[name] = WidthTensor(name, "classifier", sum(depths), (axis,))
                continue
            if not m:
                continue
            s, j, part, module, param = int(m[1]), int(m[2]), m[3], m[4], m[5]
            axes = [WidthAxis(f"stage.{s}", 0, "mean")]
            reads_previous = j == 0 and part in ("shortcut", "layer.0")
            if module == "convolution" and not (reads_previous and s == 0):
                group = f"stage.{s - 1}" if reads_previous else f"stage.{s}"
                axes.append(WidthAxis(group, 1, "sum"))
            fixed = "x".join(str(d) for d in infos[name].shape[len(axes) :])
            family = f"{part}.{module}.{param}/{len(axes)}/{fixed}"
            statistic = param.startswith("running_")
            self.tensors[name] = WidthTensor(
                name, family, blocks[s] + j, tuple(axes), statistic=statistic
            )
        for s in range(len(sizes)):
            if f"resnet.encoder.stages.{s}.layers.0.shortcut.convolution.weight" not in infos:
                raise InputError(
                    f"{source.label}: stage {s} of this ResNet has no shortcut convolution "
                    f"(its channels are the previous stage's); {method} cannot morph it"
                )
        self.downsample_first = bool(self.config.get("downsample_in_first_stage", True))
        self.embedding = int(self.config["embedding_size"])

    def widths_at(self, fraction: float) -> dict[str, int]:
        """Every group's width at a fraction of its full width (MatFormer's rounding)."""
        return self.fit({g: width_at(w, fraction) for g, w in self.groups.items()})

    def fit(self, widths: dict[str, int]) -> dict[str, int]:
        """Widths the architecture can take: a ResNet's first stage (stride 1) may not
        match the stem's channels, or transformers would build it without the shortcut
        the source has; it moves one channel up."""
        if self.ffn is None and not self.downsample_first and widths["stage.0"] == self.embedding:
            widths = {**widths, "stage.0": widths["stage.0"] + 1}
        return widths

    def shape(self, name: str, widths: dict[str, int]) -> tuple[int, ...]:
        """The shape of a width tensor at the given group widths."""
        shape = list(self.source.info(name).shape)
        for axis in self.tensors[name].axes:
            shape[axis.dim] = widths[axis.group]
        return tuple(shape)

    def resized_config(self, widths: dict[str, int]) -> dict:
        """The source's config.json with its width keys set to ``widths``."""
        import json

        config = json.loads(json.dumps(self.config))
        if self.ffn is None:
            config["hidden_sizes"] = [widths[f"stage.{s}"] for s in range(len(self.groups))]
            return config
        values = {widths[f"ffn.{i}"] for i in range(len(self.groups))}
        if len(values) > 1:
            raise InputError(
                f"{self.ffn.layout.family} models take one FFN width for every layer; "
                f"got {sorted(values)}"
            )
        text = config.get("text_config") or config
        text[self.ffn.layout.width_key] = values.pop()
        return config
