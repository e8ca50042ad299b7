"""A sketch read back: its tables decoded to weights, and a model's linears swapped for
sketched ones whose tables train."""

from __future__ import annotations

import math

from compressor.errors import InputError
from compressor.io.safetensors import TensorInfo
from compressor.io.sources import DecodedSource, TensorSource
from compressor.plugins.sketchtune.config import ENCODING, _dtype, module_of


class _Tables(TensorSource):
    """A sketch's (or tune's) tables alone, float32, named ``NAME.sketch``: what merges
    of tunes read and write."""

    content = "model"

    def __init__(self, sketch: DecodedSketch):
        import torch

        self.sketch = sketch
        self.label = sketch.label
        self.files = sketch.raw.files
        self.manifest = {}
        self._infos = {}
        for name in sketch.layers:
            stored = f"{module_of(name)}.sketch"
            shape = tuple(sketch.raw.info(stored).shape)
            self._infos[stored] = TensorInfo(stored, shape, torch.float32, 0, 4 * math.prod(shape))

    def infos(self):
        return self._infos

    def numels(self):
        return [math.prod(i.shape) for i in self._infos.values()]

    def get(self, name: str, rows: slice | None = None):
        return self.sketch.raw.get(name, rows).float()


def _sketched_linear_class():
    """The table-gather linear module (built on first use: start-up imports no torch)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from compressor.plugins.sketchtune.quantize import decode_tables

    class SketchedLinear(torch.nn.Module):
        """y = x Ŵᵀ + b with Ŵ gathered from trainable tables by frozen codes; Ŵ is
        rebuilt in forward and again in backward, never kept."""

        def __init__(self, tables, codes, bias, transposed: bool):
            super().__init__()
            self.tables = tables
            self.register_buffer("codes", codes, persistent=False)
            self.bias = bias
            self.transposed = transposed  # GPT-2's Conv1D stores (in, out)

        def _run(self, x, tables):
            w = decode_tables(tables, self.codes).to(x.dtype)
            if self.transposed:
                out = x @ w
                return out + self.bias if self.bias is not None else out
            return torch.nn.functional.linear(x, w, self.bias)

        def forward(self, x):
            return checkpoint(self._run, x, self.tables, use_reentrant=False)

    return SketchedLinear


def swap_in_sketches(net, sketch: DecodedSketch) -> dict:
    """Replace each sketched linear of ``net`` by a table-gather module, on the device of
    the module it replaces; freeze the rest. Returns the trainable tables by weight name."""
    import torch

    from compressor.models.modeling import checkpoint_names

    cls = _sketched_linear_class()
    for p in net.parameters():
        p.requires_grad_(False)
    modules = dict(net.named_modules())
    own_name = {ckpt: param for param, ckpt in checkpoint_names(net, sketch).items()}
    tables = {}
    for name in sketch.layers:
        path = module_of(own_name.get(name, name))
        old = modules.get(path)
        if old is None:
            raise InputError(f"{sketch.label}: the model has no module '{path}'")
        parent_path, _, attr = path.rpartition(".")
        device = old.weight.device
        table = torch.nn.Parameter(sketch.tables(name).to(device))
        bias = getattr(old, "bias", None)
        if bias is not None:
            bias.requires_grad_(False)
        codes = sketch.codes(name).to(device)
        new = cls(table, codes, bias, type(old).__name__ == "Conv1D")
        setattr(modules[parent_path] if parent_path else net, attr, new)
        tables[name] = table
    return tables


class DecodedSketch(DecodedSource):
    """A sketch (or a tune of one) read back as the dense model, one weight at a time.

    A tune stores only its tables; codes and the dense rest come from the sketch it was
    tuned from (its ``input`` parent, followed through tunes of tunes).
    """

    content = "model"

    def __init__(self, raw: TensorSource):
        super().__init__(raw)
        self.root = _sketch_of(raw)  # the artifact holding codes and dense tensors
        self.layers = self.root.manifest["layers"]
        self.bits = self.root.manifest["bits"]
        for name in self.root.manifest["order"]:
            if name in self.layers:
                meta = self.layers[name]
                shape, dtype = tuple(meta["shape"]), _dtype(meta["dtype"])
                size = math.prod(shape) * dtype.itemsize
                self._infos[name] = TensorInfo(name, shape, dtype, 0, size)
            else:
                self._infos[name] = self.root.info(name)

    def encoded(self, name: str) -> bool:
        return name in self.layers

    def get(self, name: str, rows: slice | None = None):
        if not self.encoded(name):
            return self.root.get(name, rows)
        return super().get(name, rows)

    def tables(self, name: str):
        return self.raw.get(f"{module_of(name)}.sketch").float()

    def codes(self, name: str):
        from compressor.plugins.sketchtune.quantize import unpack_codes

        cols = self.layers[name]["shape"][1]
        return unpack_codes(self.root.get(f"{module_of(name)}.codes"), self.bits, cols)

    def _decode(self, name: str):
        from compressor.plugins.sketchtune.quantize import decode_tables

        out = decode_tables(self.tables(name), self.codes(name))
        return out.to(self._infos[name].dtype)

    def verify(self) -> None:
        self.raw.verify()
        if self.root is not self.raw:
            self.root.verify()

    def close(self) -> None:
        self.raw.close()
        if self.root is not self.raw:
            self.root.close()


def _sketch_of(raw: TensorSource) -> TensorSource:
    """The sketch a raw artifact's codes live in: itself, or the parent a tune (``input``)
    or a merge of tunes (``base``) was made from, recursively."""
    source = raw
    while source.manifest.get("tuned"):
        source = source.open_parent(source.manifest.get("codes_from", "input"), raw=(ENCODING,))
    return source
