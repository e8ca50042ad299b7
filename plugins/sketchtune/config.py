"""SketchTune's names, plan and option rules: which weights a model sketches and how."""

from __future__ import annotations

from typing import TYPE_CHECKING

from compressor.errors import InputError, OptionError
from compressor.io.sources import TensorSource

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    pass


ENCODING = "sketchtune"


def _bits(v: int) -> str | None:
    return None if v in (2, 3, 4) else "must be 2, 3 or 4"


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def module_of(weight_name: str) -> str:
    """The module a linear weight belongs to: ``...q_proj.weight`` → ``...q_proj``."""
    return weight_name.removesuffix(".weight")


class SketchPlan:
    """Which tensors of a source are sketched (every 2-D weight in the layer list)."""

    def __init__(self, source: TensorSource, groups: int):
        from compressor.models.architectures import FfnModel

        self.layout = FfnModel(source, "sketchtune")
        self.source = source
        self.by_layer: dict[int, list[str]] = {}
        self.layer_of: dict[str, int] = {}
        for name, info in source.infos().items():
            m = self.layout.layer_re.match(name)
            if m is None:
                continue
            layer = int(m.group(1))
            self.layer_of[name] = layer
            if name.endswith(".weight") and len(info.shape) == 2 and info.is_float:
                self.by_layer.setdefault(layer, []).append(name)
        self.linears = [n for layer in sorted(self.by_layer) for n in self.by_layer[layer]]
        if not self.linears:
            raise InputError(f"{source.label} has no linear weights in its layers to sketch")
        for name in self.linears:
            cols = source.info(name).shape[1]
            if cols % groups:
                raise OptionError(
                    f"groups_per_row {groups} does not divide the {cols} columns of "
                    f"'{module_of(name)}'"
                )

    def suffixes(self) -> list[str]:
        """The linear modules of a layer, as named inside it (``self_attn.q_proj``)."""
        return list(self.layer_linears(min(self.by_layer)))

    def layer_linears(self, layer: int) -> dict[str, str]:
        """Layer ``layer``'s sketched weights by module name inside the layer."""
        return {
            module_of(self.layout.layer_re.match(n).group(2)): n
            for n in self.by_layer.get(layer, [])
        }

    def layer_tensors(self, layer: int) -> list[str]:
        return [n for n, k in self.layer_of.items() if k == layer]


def refit_steps(opts: dict) -> int:
    """CG steps of the table refit: the option, else 16 at 3 and 4 bits and none at 2.

    Measured on MiniLM (docs/benchmarks.md): the refit gains 0.1-0.5 points of embedding
    agreement at 3 and 4 bits (and about doubles the time to sketch a large model); at 2 bits it lowers every layer's calibration error but
    also the held-out agreement (G2: 0.812 to 0.763), fitting 4-entry tables to the
    calibration text."""
    if opts.get("refit") is not None:
        return opts["refit"]
    return 16 if opts["bits"] >= 3 else 0


def block_tune_passes(opts: dict) -> int:
    """Passes of block tuning over the calibration batches: the option, else 4 at 2 bits
    and none at 3 and 4 (with data only).

    Measured on MiniLM (docs/benchmarks.md): at 2 bits it gains 2.7-3 points of embedding
    agreement (G4 0.838 to 0.865); at 3 bits 0.4 and at 4 bits 0.1-0.2, for 2-3x the
    sketching time."""
    if not opts.get("data"):
        return 0
    if opts.get("block_tune") is not None:
        return opts["block_tune"]
    return 4 if opts["bits"] == 2 else 0


def block_tune_lr(opts: dict) -> float:
    """Adam's learning rate on the tables in block tuning: the option, else 3e-4 at 2
    bits and 1e-4 at 3 and 4 (finer tables take smaller steps; the best of 3e-5 to 1e-3
    on MiniLM)."""
    if opts.get("block_tune_lr") is not None:
        return opts["block_tune_lr"]
    return 3e-4 if opts["bits"] == 2 else 1e-4


def kmeans_exponent(opts: dict) -> float:
    """The exponent on the k-means weights: the option, else 1 (obs) or 4 (cholesky).

    Measured on MiniLM (docs/benchmarks.md): obs with 1 is best at 4 bits; 1.5 gains a
    little at 2 bits but wrecks layers with outlier inputs (a BERT FFN output whose
    largest H diagonal is 170x the median: output error 0.94 against 0.04)."""
    if opts["exponent"] is not None:
        return opts["exponent"]
    return 1.0 if opts.get("saliency", "obs") == "obs" else 4.0
