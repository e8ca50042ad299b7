"""Run a model over calibration batches one block (decoder or encoder layer) at a time.

Only the tensors outside the layer list (embeddings, final norm, head) and one layer's
tensors are in memory at once, so calibration (MatFormer's activation order, GPTQ-style
Hessians) fits a model far larger than RAM. The model is built by transformers with a
single layer; that layer's weights are replaced by layer k's, read from the source, for
each k in turn. The inputs layer 0 receives are captured once per batch (hidden states
and the keyword arguments the model hands every layer: masks, positions, rotary
embeddings), and layer k's outputs feed layer k+1. With ``transform(k, layer, calibration)``,
layer k is run twice: once to hand its modules' inputs to ``on_input``, then, after
``transform`` has changed it (quantised its weights, say), again to compute what layer
k+1 receives (true-sequential calibration).

This needs an architecture whose layers all take the same keyword arguments and whose
checkpoint names are the model's own; :func:`supports` says whether a model qualifies
(callers fall back to the whole model otherwise).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from compressor.errors import InputError
from compressor.models.architectures import FfnModel

if TYPE_CHECKING:
    import torch

BLOCKWISE_FAMILIES = ("llama", "bert")  # tested; others run through the whole model


class _Captured(Exception):
    """Raised by the hook on layer 0 once it has the layer's inputs."""


@dataclass
class Calibration:
    """What layer k is calibrated on: ``inputs``, each batch's positional and keyword
    arguments as the (possibly changed) layers before it computed them, and ``targets``,
    what the unchanged layer k computes for each batch: from the source model's own
    hidden states (``run_blockwise(..., source_targets=True)``), else from ``inputs``."""

    inputs: list[tuple[tuple, dict]]
    targets: list


def hidden_states(out):
    """A layer's output hidden states (layers return them alone or first in a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def supports(layout: FfnModel) -> bool:
    """Whether the model can run block by block (else use the whole model)."""
    text = layout.text
    kinds = text.get("layer_types")
    uniform = not isinstance(kinds, list) or len(set(kinds)) <= 1
    return layout.layout.family in BLOCKWISE_FAMILIES and uniform and layout.model_type != "vit"


@contextlib.contextmanager
def _one_layer_model(layout: FfnModel, head: str, device: str = "cpu") -> Iterator:
    """A transformers model of the source's architecture with a single layer, real weights
    outside the layers, in the checkpoint's dtype, on ``device``."""
    import torch
    import transformers

    from compressor.models.modeling import _auto_class, _quiet_transformers

    _quiet_transformers()
    config = json.loads(json.dumps(layout.config))
    config[layout.layout.layers_key] = 1
    for key in ("layer_types",):
        if isinstance(config.get(key), list):
            config[key] = config[key][:1]
    with tempfile.TemporaryDirectory(prefix="compressor-blockwise-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        cfg = transformers.AutoConfig.from_pretrained(tmp)
    cls = _auto_class(cfg, head)
    dtype = next((i.dtype for i in layout.source.infos().values() if i.is_float), torch.float32)
    net = cls.from_config(cfg, dtype=dtype) if hasattr(cls, "from_config") else cls(cfg)
    net = net.to(dtype).eval()
    layer_prefix = f"{layout.prefix}{layout.layout.layers}.0."
    names = layout.source.infos()
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.startswith(layer_prefix):
                continue
            if name in names:
                tensor.copy_(layout.source.get(name))
    yield net.to(device)


def _layer_module(net, layout: FfnModel):
    modules = dict(net.named_modules())
    return modules[f"{layout.prefix}{layout.layout.layers}.0"]


def run_blockwise(
    layout: FfnModel,
    batches: list[dict],
    on_input: Callable[[int, str, int, torch.Tensor], None],
    suffixes: tuple[str, ...],
    head: str = "saved",
    transform: Callable[[int, torch.nn.Module, Calibration], None] | None = None,
    progress=None,
    source_targets: bool = False,
    device: str = "cpu",
) -> None:
    """Run ``batches`` (model keyword arguments) through the model layer by layer.

    ``on_input(layer, suffix, batch, x)`` receives the input of every module of layer
    ``layer`` whose name (after ``<layers>.<k>.``) is in ``suffixes``; ``transform(k,
    layer_module, calibration)`` may then change layer k before its outputs go on to layer
    k+1; it runs with gradients enabled and gets a :class:`Calibration`. With
    ``source_targets`` the source model's own hidden states are carried beside the changed
    ones (one more forward of each layer), so a transform can fit layer k to what the
    source model computes there, making up for what the changed layers before it lost.

    The layer runs on ``device`` (``batches`` must be there too); each layer's weights are
    read on the CPU and copied in, so the device holds one layer and the captured states.
    """
    import torch

    progress = progress or (lambda it, **kw: it)
    source = layout.source
    with _one_layer_model(layout, head, device) as net:
        block = _layer_module(net, layout)
        captured: list[tuple[tuple, dict]] = []

        def capture(_module, args, kwargs):
            captured.append((args, kwargs))
            raise _Captured

        handle = block.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.no_grad():
                for x in batches:
                    try:
                        net(**x, use_cache=False)  # a cache would grow with every layer run
                    except _Captured:
                        pass
        finally:
            handle.remove()
        if len(captured) != len(batches):
            raise InputError(f"{source.label}: the model never reached its first layer")
        modules = dict(block.named_modules())
        missing = [s for s in suffixes if s not in modules]
        if missing:
            raise InputError(f"{source.label}: layers have no module '{missing[0]}'")
        state = {"batch": 0, "layer": 0, "collect": True}

        def hook_for(suffix):
            def hook(_module, args):
                if state["collect"]:
                    on_input(state["layer"], suffix, state["batch"], args[0].detach())

            return hook

        def run_layer(inputs: list) -> list:
            outs = []
            for b, (args, kwargs) in enumerate(inputs):
                state["batch"] = b
                with torch.no_grad():
                    out = block(*args, **kwargs)
                outs.append(hidden_states(out))
            return outs

        def fed(outs: list, inputs: list) -> list:  # what the next layer receives
            return [((h, *a[1:]), kw) for h, (a, kw) in zip(outs, inputs, strict=True)]

        handles = [modules[s].register_forward_pre_hook(hook_for(s)) for s in suffixes]
        own = block.state_dict()
        source_stream = None  # the source model's inputs to layer k, once a layer changed
        try:
            for k in progress(range(layout.num_layers), desc="calibrate", unit="layer"):
                prefix = f"{layout.prefix}{layout.layout.layers}.{k}."
                with torch.no_grad():
                    for rest, tensor in own.items():
                        name = prefix + rest
                        if name in source.infos():
                            tensor.copy_(source.get(name))
                state["layer"], state["collect"] = k, True
                outs = run_layer(captured)
                if transform is not None:  # layer k changed: k+1 sees the changed layer's outputs
                    state["collect"] = False
                    targets = outs if source_stream is None else run_layer(source_stream)
                    transform(k, block, Calibration(list(captured), targets))
                    if source_targets:
                        source_stream = fed(targets, source_stream or captured)
                    outs = run_layer(captured)
                captured[:] = fed(outs, captured)
        finally:
            for h in handles:
                h.remove()
