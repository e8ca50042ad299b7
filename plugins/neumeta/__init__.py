"""neumeta: learn a weight generator from a model, then sample the model at any width
(Yang et al., ECCV 2024, "Neural Metamorphosis", arXiv 2410.11878).

``compress train --plugin neumeta MODEL -o data train.jsonl`` learns an implicit neural
representation of MODEL's morphable part (``compressor.models.architectures.WidthLayout``: every
FFN's hidden neurons in the MatFormer families, every stage's channels in a ResNet of
basic blocks). Each group's neurons are first put in a smoothing order (a short
Hamiltonian path over their weights, fast-tsp), which leaves the model's function as it
was; then every step samples a width in the trained range, generates that model's width
tensors (``generator``), runs it on a batch and trains the generator on the task
loss plus a reconstruction loss at full width. The generator's output is a correction to
the smoothed source resampled to the width (last layer zero-initialised), so full width
starts exactly at the source and no width starts from noise: the paper's recipe, trained
from scratch, collapses (issue #15's re-implementation; Sommariva et al. 2025).

The artifact holds the generator, the permutations and a manifest; every other tensor is
read from MODEL, its parent. It decodes to the full-width model (``export``, ``eval``).
``compress sample --plugin neumeta ARTIFACT -o width 0.4`` writes a model at that width.
"""

from __future__ import annotations

from compressor.hookspecs import hookimpl
from compressor.plugins.neumeta.model import ENCODING, DecodedNeumeta, NeumetaModel
from compressor.plugins.neumeta.sample import NeumetaSample, reestimate_batch_norms
from compressor.plugins.neumeta.train import NeumetaTrain, smoothing_orders

__all__ = [
    "ENCODING",
    "DecodedNeumeta",
    "NeumetaModel",
    "NeumetaSample",
    "NeumetaTrain",
    "reestimate_batch_norms",
    "smoothing_orders",
]


@hookimpl
def register_methods(register):
    register(NeumetaTrain())
    register(NeumetaSample())
