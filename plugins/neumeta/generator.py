"""Weights at any width: smoothing permutations, resampling along width axes, and the
coordinate-to-weight generator NeuMeta learns (Yang et al., ECCV 2024, arXiv 2410.11878).

A generated tensor at group widths ``w`` (full widths ``W``) is

    factor · (resample(P·source) + scale · INR(coordinates))

With ``resample pool`` (the paper's), ``P`` orders each group's neurons along a short
Hamiltonian path over their weights (so neighbours are alike), ``resample`` averages runs
of neighbours down to the target width (identity at full width) and ``factor`` is Π W/w
over the axes a tensor *reads* (merged neurons add up their contributions). With
``resample truncate``, ``P`` orders the neurons by importance (most important first) and
``resample`` keeps the first w (MatFormer's cut: no factor), so every width starts at the
importance cut and the INR learns to correct it. ``scale`` is the source tensor's
standard deviation, and
the INR (one small residual MLP per tensor family, last layer zero-initialised) maps the
Fourier features of (layer, position along each width axis, w/W per axis) to the values of
the tensor's fixed dimensions. At full width it starts exactly at the source. Imports torch.
"""

from __future__ import annotations

import math

import torch

from compressor.models.architectures import WidthLayout, WidthTensor

COORDINATES = (
    "per generated row: the tensor's layer / (layers - 1), then for each width axis in "
    "dim order the position (i + 0.5) / w and the size w / W; each value x becomes "
    "[x, sin(2^k·pi·x), cos(2^k·pi·x) for k < fourier]"
)


# -- smoothing permutations --------------------------------------------------------------


def neuron_features(layout: WidthLayout, tensors: dict[str, torch.Tensor], group: str):
    """One row per neuron of ``group``: its slices of every coupled weight, each tensor
    scaled to equal weight (by its std and the slice length)."""
    parts = []
    for name, spec in layout.tensors.items():
        if spec.statistic:
            continue
        for axis in spec.axes:
            if axis.group == group:
                t = tensors[name].float()
                rows = t.movedim(axis.dim, 0).reshape(t.shape[axis.dim], -1)
                scale = (t.std() if t.numel() > 1 else t.abs().mean()) + 1e-12
                parts.append(rows / (scale * math.sqrt(rows.shape[1])))
    return torch.cat(parts, dim=1)


def smoothing_order(features: torch.Tensor, how: str, seconds: float = 2.0) -> torch.Tensor:
    """A neuron order along a short Hamiltonian path over L1 distances of ``features``.

    ``greedy``: fast-tsp's nearest-neighbour walk from the neuron farthest from the mean
    (an end of the cloud; deterministic); ``tsp``: fast-tsp's local search for
    ``seconds`` over a tour with a dummy city at distance 0 from every neuron, cut there
    (shorter paths, but the result depends on the time it got); ``none``: the source
    order."""
    n = features.shape[0]
    if how == "none" or n < 3:
        return torch.arange(n)
    import fast_tsp

    dist = torch.cdist(features[None], features[None], p=1)[0]
    scaled = (dist / dist.max().clamp_min(1e-12) * 65_000).round().long()  # fast-tsp: < 2^16
    if how == "greedy":
        start = int((features - features.mean(0)).abs().sum(1).argmax())
        order = torch.cat([torch.tensor([start]), torch.arange(n)[torch.arange(n) != start]])
        walk = fast_tsp.greedy_nearest_neighbor(scaled[order][:, order].tolist())
        walk = walk[walk.index(0) :] + walk[: walk.index(0)]
        return order[torch.tensor(walk)]
    full = torch.zeros(n + 1, n + 1, dtype=torch.long)
    full[1:, 1:] = scaled
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rounded L1 distances may miss the triangle rule
        tour = fast_tsp.find_tour(full.tolist(), duration_seconds=seconds)
    start = tour.index(0)
    path = tour[start + 1 :] + tour[:start]
    return torch.tensor([c - 1 for c in path], dtype=torch.long)


def permute(t: torch.Tensor, spec: WidthTensor, perms: dict[str, torch.Tensor]) -> torch.Tensor:
    """``t`` with each width axis reordered by its group's permutation."""
    for axis in spec.axes:
        t = t.index_select(axis.dim, perms[axis.group])
    return t


# -- resampling ----------------------------------------------------------------------------


def importance_order(layout: WidthLayout, tensors: dict[str, torch.Tensor], group: str):
    """A group's neurons, most important first, by the L1 norm of the weights that write
    them (a ResNet's convolution filters, an FFN's input projections): L1 channel pruning's
    criterion. Ties keep the source order."""
    from compressor.plugins.matformer import most_important_first

    score = torch.zeros(layout.groups[group])
    for name, spec in layout.tensors.items():
        if spec.statistic or len(layout.source.info(name).shape) < 2:
            continue
        for axis in spec.axes:
            if axis.group == group and axis.pool == "mean":
                t = tensors[name].float().abs()
                score += t.movedim(axis.dim, 0).reshape(t.shape[axis.dim], -1).sum(1)
    return most_important_first(score)


def resample(
    t: torch.Tensor, spec: WidthTensor, widths: dict[str, int], how: str = "pool"
) -> torch.Tensor:
    """``t`` at ``widths`` along each width axis: neighbours averaged (pool) or the first
    neurons kept (truncate)."""
    if how == "pool":
        return pool(t, spec, widths)
    for axis in spec.axes:
        t = t.narrow(axis.dim, 0, widths[axis.group])
    return t


def pool(t: torch.Tensor, spec: WidthTensor, widths: dict[str, int]) -> torch.Tensor:
    """Average runs of neighbouring neurons down to ``widths`` along each width axis."""
    for axis in spec.axes:
        w = widths[axis.group]
        if t.shape[axis.dim] == w:
            continue
        moved = t.movedim(axis.dim, -1)
        flat = torch.nn.functional.adaptive_avg_pool1d(moved.reshape(-1, 1, moved.shape[-1]), w)
        t = flat.reshape(*moved.shape[:-1], w).movedim(-1, axis.dim)
    return t


def read_factor(spec: WidthTensor, widths: dict[str, int], full: dict[str, int]) -> float:
    """Π W/w over the axes this tensor reads: merged neurons' contributions add up."""
    factor = 1.0
    for axis in spec.axes:
        if axis.pool == "sum":
            factor *= full[axis.group] / widths[axis.group]
    return factor


# -- the generator -------------------------------------------------------------------------


def fourier(x: torch.Tensor, frequencies: int) -> torch.Tensor:
    """[x, sin(2^k·pi·x), cos(2^k·pi·x) for k < frequencies] along the last dimension."""
    scales = (2.0 ** torch.arange(frequencies, dtype=x.dtype, device=x.device)) * math.pi
    angles = x[..., None] * scales
    parts = [x, torch.sin(angles).flatten(-2), torch.cos(angles).flatten(-2)]
    return torch.cat(parts, dim=-1)


def coordinates(
    spec: WidthTensor,
    widths: dict[str, int],
    full: dict[str, int],
    num_layers: int,
    noise: float = 0.0,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """(rows, 1 + 2·axes) raw coordinates of a tensor's generated rows (see COORDINATES);
    ``noise`` moves each position by up to ±noise/2 of a neuron's cell."""
    axes = sorted(spec.axes, key=lambda a: a.dim)
    grids = []
    for axis in axes:
        w = widths[axis.group]
        pos = torch.arange(w, dtype=torch.float32) + 0.5
        if noise:
            pos = pos + noise * (torch.rand(w, generator=gen) - 0.5)
        grids.append((pos / w).clamp(0, 1))
    mesh = torch.meshgrid(*grids, indexing="ij") if len(grids) > 1 else (grids[0],)
    columns = [torch.full_like(mesh[0], spec.layer / max(1, num_layers - 1))]
    for axis, m in zip(axes, mesh, strict=True):
        columns += [m, torch.full_like(m, widths[axis.group] / full[axis.group])]
    return torch.stack([c.reshape(-1) for c in columns], dim=1)


class FamilyINR(torch.nn.Module):
    """A residual MLP from Fourier-encoded coordinates to a row of a tensor family's
    fixed dimensions; the output layer starts at zero (no correction)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, depth: int):
        super().__init__()
        self.inp = torch.nn.Linear(in_dim, hidden)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(
                torch.nn.SiLU(),
                torch.nn.Linear(hidden, hidden),
                torch.nn.SiLU(),
                torch.nn.Linear(hidden, hidden),
            )
            for _ in range(depth)
        )
        self.out = torch.nn.Linear(hidden, out_dim)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.inp(z)
        for block in self.blocks:
            h = h + block(h)
        return self.out(torch.nn.functional.silu(h))


def family_dims(layout: WidthLayout, fourier_k: int) -> dict[str, tuple[int, int]]:
    """{family: (input features, output values per row)} for a layout's tensors."""
    dims = {}
    for spec in layout.tensors.values():
        if spec.statistic:
            continue
        shape = layout.source.info(spec.name).shape
        fixed = [s for d, s in enumerate(shape) if d not in {a.dim for a in spec.axes}]
        in_dim = (1 + 2 * len(spec.axes)) * (1 + 2 * fourier_k)
        found = (in_dim, math.prod(fixed))
        if dims.setdefault(spec.family, found) != found:
            raise ValueError(f"tensor family {spec.family} has rows of two sizes")
    return dims


class WidthGenerator(torch.nn.Module):
    """One FamilyINR per tensor family; generates a layout's tensors at any widths."""

    def __init__(
        self, layout: WidthLayout, hidden: int, depth: int, fourier_k: int, how: str = "pool"
    ):
        super().__init__()
        self.layout = layout
        self.fourier_k = fourier_k
        self.resample = how  # pool (average neighbours) or truncate (keep the first)
        self.families = sorted(family_dims(layout, fourier_k).items())
        self.index = {name: k for k, (name, _) in enumerate(self.families)}
        self.inrs = torch.nn.ModuleList(
            FamilyINR(i, o, hidden, depth) for _, (i, o) in self.families
        )

    def correction(
        self, spec: WidthTensor, widths: dict, noise: float = 0.0, gen=None
    ) -> torch.Tensor:
        """The INR's output for a tensor at ``widths``, in the tensor's shape there."""
        layout = self.layout
        raw = coordinates(spec, widths, layout.groups, layout.num_layers, noise, gen)
        raw = raw.to(self.inrs[0].inp.weight.device)  # drawn on the CPU: a seed, one result
        rows = self.inrs[self.index[spec.family]](fourier(raw, self.fourier_k))
        shape = layout.shape(spec.name, widths)
        width_dims = sorted(a.dim for a in spec.axes)
        fixed_dims = [d for d in range(len(shape)) if d not in width_dims]
        order = width_dims + fixed_dims
        out = rows.reshape([shape[d] for d in order])
        return out.permute([order.index(d) for d in range(len(shape))])

    def tensor(
        self,
        spec: WidthTensor,
        source: torch.Tensor,
        scale: float,
        widths: dict,
        noise: float = 0.0,
        gen=None,
    ) -> torch.Tensor:
        """The generated tensor: factor · (resample(source) + scale · correction); a
        running statistic is the resampled source alone. ``source`` is already permuted."""
        source = source.to(self.inrs[0].inp.weight.device).float()
        base = resample(source, spec, widths, self.resample)
        if spec.statistic:
            return base
        factor = read_factor(spec, widths, self.layout.groups) if self.resample == "pool" else 1.0
        return factor * (base + scale * self.correction(spec, widths, noise, gen))

    def reconstruction(self) -> torch.Tensor:
        """Mean squared correction at full width (in units of each tensor's std): the
        reconstruction loss, zero when full width reproduces the (permuted) source."""
        total, count = 0.0, 0
        for spec in self.layout.tensors.values():
            if not spec.statistic:
                c = self.correction(spec, self.layout.groups)
                total, count = total + (c**2).sum(), count + c.numel()
        return total / max(count, 1)
