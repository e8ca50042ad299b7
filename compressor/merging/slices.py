"""Layers restacked from slices of models (a mergekit config's ``slices``): which source
layer each output layer reads, the layer positions gradients run over, and the checks
that the slices fit the models they name."""

from __future__ import annotations

from compressor.errors import InputError, UsageError
from compressor.io.sources import RewrittenConfig, TensorSource
from compressor.merging.params import is_pre_layers, layer_index, renamed


def check_slices(layout, by_ref: dict, where: str) -> None:
    """Refuse a layer range past a model's layers, and models whose tensors differ in
    shape (two architectures stack into a model that cannot load)."""
    shapes: dict[str, tuple] = {}  # a tensor's name at layer 0 -> (shape, the model's label)
    counts: dict[str, int] = {}  # a model's layer count, once it is checked
    for base_src, others, _, _ in layout:
        for ref, start, end, _, ws in [s for s in [base_src, *others] if s is not None]:
            source = by_ref[ref]
            new = ref not in counts
            if new:
                indices = [i for i in map(layer_index, source.names()) if i is not None]
                counts[ref] = max(indices) + 1 if indices else 0
            if end > counts[ref]:
                raise UsageError(
                    f"{ws}: layer_range [{start}, {end}] goes past the last layer of "
                    f"{source.label}, which has {counts[ref]} layers"
                )
            if new:
                _check_shapes(source, shapes, where)


def _check_shapes(source, shapes: dict, where: str) -> None:
    """Record the model's tensor shapes by name at layer 0; refuse one that differs."""
    for name in source.names():
        i = layer_index(name)
        key = name if i is None else renamed(name, 0)
        shape = list(source.info(name).shape)
        seen = shapes.setdefault(key, (shape, source.label))
        if seen[0] != shape:
            raise InputError(
                f"{where}: the slices' models differ: {key} is {seen[0]} in {seen[1]} "
                f"and {shape} in {source.label}"
            )


def stacked(layout, by_ref: dict, layers: int, where: str):
    """Stacked sources for the slices: the base (or None) and one per expert position,
    with each output tensor's layer position t within its slice."""
    check_slices(layout, by_ref, where)
    n_experts = len(layout[0][1])
    first_slice, last_slice = layout[0], layout[-1]

    def stack(pick):
        mapping = {}
        for entry in layout:
            src = pick(entry)
            source = by_ref[src[0]]
            start, out_start = src[1], entry[2]
            for name in source.names():
                i = layer_index(name)
                if i is None:
                    owner = first_slice if is_pre_layers(name) else last_slice
                    if entry is owner:
                        mapping[name] = (source, name)
                elif start <= i < src[2]:
                    out = renamed(name, out_start + i - start)
                    mapping[out] = (source, name)
        first = by_ref[pick(first_slice)[0]]
        return StackedSource(mapping, first, layers)

    base = stack(lambda e: e[0]) if layout[0][0] is not None else None
    experts = [stack(lambda e, k=k: e[1][k]) for k in range(n_experts)]
    positions = {}
    for _, _, out_start, length in layout:
        for off in range(length):
            positions[out_start + off] = off / (length - 1) if length > 1 else 1.0
    reference = base or experts[0]
    t = {}
    for name in reference.names():
        i = layer_index(name)
        t[name] = 0.0 if i is None else positions[i]
    return base, experts, t


class StackedSource(TensorSource):
    """Output tensors read from layers of other sources (a slice config's restacking);
    ``config.json`` says the new layer count."""

    def __init__(self, mapping: dict, first: TensorSource, layers: int):
        self.mapping = mapping
        self.label = first.label
        self.content = "model"
        self.manifest = {}
        self._first = first
        self.files = dict(first.files)
        config = first.config()
        if config is not None and config.get("num_hidden_layers") != layers:
            config["num_hidden_layers"] = layers
            for key in ("layer_types",):  # per-layer lists follow the count
                if isinstance(config.get(key), list):
                    config[key] = (config[key] * layers)[:layers]
            self._config = RewrittenConfig(config)
            self.files["config.json"] = self._config.path
        self._infos = {out: src.info(name) for out, (src, name) in mapping.items()}

    def infos(self):
        return self._infos

    def get(self, name, rows=None):
        source, in_name = self.mapping[name]
        return source.get(in_name, rows)
