"""Weight quantisation building blocks: code packing, weighted 1-D k-means, GPTQ-style
error feedback, and the grids they assign codes on.

SketchTune's sketches (per row-group lookup tables learned by weighted k-means) and the
uniform baselines they are measured against (round-to-nearest and GPTQ with a per-group
min/max grid) share one code-assignment loop: columns are visited left to right in
blocks, each column's rounding error is divided by the diagonal of U (the upper Cholesky
factor of H⁻¹) and pushed onto the columns not yet assigned (Frantar et al. 2022,
https://arxiv.org/abs/2210.17323). With ``U`` None (no calibration data, H = I) no error
moves and each weight simply takes its nearest grid value.

Packed codes: each row's codes as one bit stream, most significant bit first, padded
with zero bits to a whole byte at the end of the row. For 4 bits that is two codes per
byte, the first in the high nibble; for 2 bits four per byte, the first in the top two
bits; for 3 bits eight codes fill three bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch

# nearest(indices of some columns, weights of those columns) -> (codes, grid values)
Nearest = Callable[["torch.Tensor", "torch.Tensor"], tuple["torch.Tensor", "torch.Tensor"]]


def packed_width(cols: int, bits: int) -> int:
    """Bytes per row of ``cols`` packed ``bits``-bit codes."""
    return -(-cols * bits // 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) codes below 2**bits → (rows, packed_width) uint8, MSB first per row."""
    import torch

    rows, cols = codes.shape
    shifts = torch.arange(bits - 1, -1, -1, dtype=torch.uint8)
    stream = ((codes.to(torch.uint8)[..., None] >> shifts) & 1).reshape(rows, cols * bits)
    pad = packed_width(cols, bits) * 8 - cols * bits
    if pad:
        stream = torch.cat([stream, stream.new_zeros(rows, pad)], dim=1)
    place = (1 << torch.arange(7, -1, -1, dtype=torch.int32)).to(torch.uint8)
    return (stream.reshape(rows, -1, 8) * place).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The inverse of :func:`pack_codes`: (rows, cols) uint8 codes."""
    import torch

    rows = packed.shape[0]
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    stream = ((packed[..., None] >> shifts) & 1).reshape(rows, -1)[:, : cols * bits]
    place = (1 << torch.arange(bits - 1, -1, -1, dtype=torch.int32)).to(torch.uint8)
    return (stream.reshape(rows, cols, bits) * place).sum(-1, dtype=torch.int32).to(torch.uint8)


def inverse_hessian_factor(
    h: torch.Tensor, damp: float, order: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U the upper Cholesky factor of (H + λ·mean diag·I)⁻¹, dead the columns
    no calibration input ever reached (their H row is zero; they are set to 1 on the
    diagonal, as GPTQ does). Damping grows tenfold until H is positive definite.

    ``order``: U is that of H with its rows and columns in that order (what
    ``assign_codes`` takes with the same order); ``dead`` stays in the columns' order."""
    import torch

    dead = torch.diagonal(h) == 0
    # one copy at a time: a 5632-column H is 127 MB in float32
    h = h.float().clone() if order is None else h.float()[order[:, None], order]
    h.diagonal()[dead if order is None else dead[order]] = 1
    mean = float(torch.diag(h).mean())
    added = 0.0
    for attempt in range(6):
        lam = damp * 10**attempt * mean
        h.diagonal().add_(lam - added)  # in place: no identity matrix beside H
        added = lam
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            del chol
            u, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return u, dead
    raise ValueError("the calibration Hessian is not positive definite even with damping")


def weighted_kmeans(
    points: torch.Tensor, weights: torch.Tensor, k: int, iters: int = 30
) -> torch.Tensor:
    """Per row of ``points`` (rows, n), ``k`` centroids minimising Σ w·(p − c)², sorted.

    Lloyd iterations from the row's quantiles, all rows at once; 1-D, so assignment is a
    binary search among the midpoints. A centroid that loses all its points stays put.
    """
    import torch

    rows, n = points.shape
    weights = weights.expand(rows, n).contiguous()
    ordered = points.sort(dim=1).values
    at = ((torch.arange(k, dtype=torch.float64) + 0.5) / k * n).long().clamp(max=n - 1)
    at = at.to(points.device)
    centroids = ordered[:, at].contiguous()
    for _ in range(iters):
        mids = ((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous()
        cluster = torch.searchsorted(mids, points.contiguous())
        num = torch.zeros(rows, k, device=points.device).scatter_add_(1, cluster, points * weights)
        den = torch.zeros(rows, k, device=points.device).scatter_add_(1, cluster, weights)
        moved = torch.where(den > 0, num / den.clamp(min=1e-30), centroids)
        moved = moved.sort(dim=1).values
        if torch.equal(moved, centroids):
            break
        centroids = moved
    return centroids


def activation_order(hessian: torch.Tensor) -> torch.Tensor:
    """Columns by decreasing H diagonal (GPTQ's act-order, AutoGPTQ's ``desc_act``): the
    columns with the largest inputs are quantised first, while every other column can
    still take up their error."""
    return hessian.diagonal().float().argsort(descending=True)


def assign_codes(
    weight: torch.Tensor,
    u: torch.Tensor | None,
    nearest: Nearest,
    block: int = 128,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8) and quantised values of ``weight`` (out × in, float32), column by
    column with GPTQ error feedback through ``u``; ``u`` None: plain nearest values.

    ``order``: visit the columns in that order; ``u`` is then the factor of H with its
    rows and columns in that order. The grid stays that of each column's own group
    (static groups), so codes and values come back in the columns' own order."""
    import torch

    out, cols = weight.shape
    at = torch.arange(cols, device=weight.device) if order is None else order
    if order is not None:
        w = weight[:, order]  # a copy already
    else:
        w = weight if u is None else weight.clone()  # error feedback writes into w
    codes = torch.empty(out, cols, dtype=torch.uint8, device=weight.device)
    values = torch.empty(out, cols, device=weight.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        if u is None:
            c, values[:, i1:i2] = nearest(at[i1:i2], w[:, i1:i2])
            codes[:, i1:i2] = c.to(torch.uint8)
            continue
        w1 = w[:, i1:i2].clone()
        errors = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c, q = nearest(at[i1 + i : i1 + i + 1], w1[:, i : i + 1])
            codes[:, i1 + i], values[:, i1 + i] = c[:, 0].to(torch.uint8), q[:, 0]
            err = (w1[:, i] - q[:, 0]) / u1[i, i]
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            errors[:, i] = err
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    if order is not None:
        codes[:, order], values[:, order] = codes.clone(), values.clone()
    return codes, values


def refit_tables(
    weight: torch.Tensor,
    codes: torch.Tensor,
    tables: torch.Tensor,
    hessian: torch.Tensor,
    steps: int = 16,
) -> torch.Tensor:
    """Tables that lower the layer's output error tr((W − Ŵ) H (W − Ŵ)ᵀ) with the codes
    fixed (GPTVQ's codebook update, https://arxiv.org/abs/2402.15319).

    Ŵ is linear in each row's G·2^b table entries t: Ŵ_i = S_i t_i, S_i the one-hot map
    from columns to entries. Each row's normal equations (S_iᵀ H S_i + λ) t_i = S_iᵀ H w_i
    + λ t_i⁰ are solved by ``steps`` of Jacobi-preconditioned conjugate gradients from the
    current tables, all rows at once. A product with the system is one decode, one
    (out × in) @ H and one scatter-add: ~2 s a step on 2 cores for 2048 rows of 5632
    columns. The ridge λ (1e-4 of the mean diagonal of H) keeps an entry no column uses
    at its value. Started from the current tables, CG can only lower the error."""
    import torch

    out, groups, k = tables.shape
    cols = weight.shape[1]
    entries = groups * k
    device = tables.device
    index = (torch.arange(cols, device=device) // (cols // groups))[None, :] * k + codes.long()
    h = hessian.float()

    def gather(x):  # out × E: Sᵀ x per row, x out × in
        return torch.zeros(out, entries, device=device).scatter_add_(1, index, x)

    lam = 1e-4 * float(torch.diagonal(h).mean())
    diag = gather(torch.diagonal(h).expand(out, cols)) + lam  # the diagonal of the system

    def system(t):  # (Sᵀ H S + λ) t, every row
        return gather(decode_tables(t.reshape(out, groups, k), codes) @ h) + lam * t

    x = tables.reshape(out, entries).float().clone()
    r = gather(weight.float() @ h) + lam * x - system(x)
    z = r / diag
    p, rz = z.clone(), (r * z).sum(1, keepdim=True)
    for _ in range(steps):
        ap = system(p)
        pap = (p * ap).sum(1, keepdim=True)
        alpha = torch.where(pap > 0, rz / pap.clamp(min=1e-30), 0)
        x += alpha * p
        r -= alpha * ap
        z = r / diag
        rz_next = (r * z).sum(1, keepdim=True)
        p = z + torch.where(rz > 0, rz_next / rz.clamp(min=1e-30), 0) * p
        rz = rz_next
    return x.reshape(out, groups, k)


def table_nearest(tables: torch.Tensor, group_cols: int) -> Nearest:
    """Nearest entries of per-(row, group) lookup tables (out × groups × 2^b)."""

    def nearest(at: torch.Tensor, w: torch.Tensor):
        t = tables[:, at // group_cols, :]  # out × cols × 2^b
        c = (w[:, :, None] - t).abs().argmin(-1)
        return c, t.gather(-1, c[..., None])[..., 0]

    return nearest


def uniform_nearest(weight: torch.Tensor, bits: int, group_cols: int) -> Nearest:
    """Round-to-nearest on an asymmetric min/max grid per (row, group of columns), the grid
    of GPTQ and of plain round-to-nearest with groups (scales fixed from ``weight``)."""
    out, cols = weight.shape
    top = 2**bits - 1
    g = weight.reshape(out, cols // group_cols, group_cols)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = ((hi - lo) / top).clamp(min=1e-12)
    zero = (-lo / scale).round()

    def nearest(at: torch.Tensor, w: torch.Tensor):
        s, z = scale[:, at // group_cols], zero[:, at // group_cols]
        c = (w / s + z).round().clamp(0, top)
        return c, (c - z) * s

    return nearest


def decode_tables(tables: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Ŵ[i, j] = tables[i, j // (in/groups), codes[i, j]]: differentiable in ``tables``
    (the gradient of an entry is the sum of dŴ over the weights that map to it)."""
    import torch

    out, groups, k = tables.shape
    cols = codes.shape[1]
    row = torch.arange(out, device=tables.device)[:, None] * groups
    group = (torch.arange(cols, device=tables.device) // (cols // groups))[None, :]
    index = (row + group) * k + codes.long()
    return tables.reshape(-1)[index]
