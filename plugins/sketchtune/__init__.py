"""sketchtune: linear weights as b-bit codes into per-(row, group) lookup tables, then
fine-tune only the tables (Zhang et al. ICML 2025, arXiv 2410.06364).

``compress apply --plugin sketchtune MODEL`` learns the sketch of every linear weight in
the model's layer list (attention and MLP projections; embeddings, norms, biases and the
head stay dense in the source dtype). Row i of W is split into G contiguous column groups;
group (i, g) gets a table of 2^b values and each weight a b-bit code, Ŵij = T[i, g(j),
cij]. With calibration data the model runs block by block (``compressor.models.blockwise``):
each linear's H = 2XᵀX/N from its real inputs, the tables by weighted k-means (column
weights (1/[H⁻¹]_jj)^p, the OBS saliency, rather than LeanQuant's U_jj^-4 from the
Cholesky factor U of H⁻¹: docs/benchmarks/sketchtune.md says why), codes
assigned column block by column block with GPTQ error feedback, the tables refitted to
each layer's output, at 2 bits each block's tables tuned to the source model's block
outputs (:func:`tune_block_tables`), and block k+1 calibrated on the outputs of the
sketched block k. Without data H = I: plain k-means per group.

``compress train --plugin sketchtune SKETCH`` tunes the tables alone: codes frozen, each
table entry's gradient the sum of dŴ over the weights that map to it (a gather; no
kernel), one layer's dense weight rebuilt at a time in forward and again in backward. The
tuned artifact holds only the tables; its codes and dense rest are read from the sketch.

Stored per linear ``NAME``: ``NAME.sketch`` (fp16, rows × groups × 2^b; float32 in a
tune) and ``NAME.codes`` (uint8, each row's codes packed most significant bit first:
for 4 bits two per byte, high nibble first; see ``quantize``).
"""

from __future__ import annotations

from compressor.hookspecs import hookimpl
from compressor.plugins.sketchtune.calibrate import calibration_batches, row_chunks
from compressor.plugins.sketchtune.config import ENCODING, SketchPlan
from compressor.plugins.sketchtune.decoded import DecodedSketch, swap_in_sketches
from compressor.plugins.sketchtune.sketch import Sketch, sketch_weight
from compressor.plugins.sketchtune.train import SketchTrain

__all__ = [
    "ENCODING",
    "DecodedSketch",
    "Sketch",
    "SketchPlan",
    "SketchTrain",
    "calibration_batches",
    "row_chunks",
    "sketch_weight",
    "swap_in_sketches",
]


@hookimpl
def register_methods(register):
    register(Sketch())
    register(SketchTrain())
