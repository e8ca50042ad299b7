"""Exact top-k magnitude selection over many tensors, streaming, in bounded memory.

For non-negative float32 values the IEEE bit pattern read as an integer is
ordered like the values. So the k-th largest |x| over a whole model is found
exactly from two histograms: one over the top 16 bits (sign, exponent and 7
mantissa bits) of every entry, then, inside the one bucket that holds the k-th
largest, one over the low 16 bits. Each pass streams blocks; memory is two
count arrays, whatever the model size. Keeping ``|x| >= threshold`` keeps at
least k entries (exactly k, plus exact ties).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch


HIGH_BUCKETS = 1 << 15  # the sign bit of |x| is always 0
LOW_BUCKETS = 1 << 16


def magnitude_bits(block: torch.Tensor) -> torch.Tensor:
    """|x| as float32, read as int32: ordered like the magnitudes."""
    import torch

    return block.detach().float().abs().contiguous().view(torch.int32)


class TopKThreshold:
    """Accumulates the histograms of a streaming two-pass k-th largest |x| search.

    Pass 1: ``add_high(block)`` for every block. Then ``start_refine(k)``.
    Pass 2: ``add_low(block)`` for every block. Then ``threshold()`` gives the
    int32 bit pattern t: keep the entries whose ``magnitude_bits >= t``.
    """

    def __init__(self):
        import torch

        self.high = torch.zeros(HIGH_BUCKETS, dtype=torch.int64)
        self.low = torch.zeros(LOW_BUCKETS, dtype=torch.int64)
        self.bucket = -1
        self.rank_in_bucket = 0
        self.above = 0  # after threshold(): entries strictly above it

    @property
    def total(self) -> int:
        return int(self.high.sum())

    def add_high(self, block: torch.Tensor) -> tuple[int, int]:
        """Count the block; return its lowest and highest bucket (-1, -1 when empty)."""
        import torch

        bits = magnitude_bits(block).reshape(-1)
        counts = torch.bincount(bits >> 16, minlength=HIGH_BUCKETS)
        self.high += counts.cpu()  # the histogram lives on the CPU, whatever the block's device
        used = counts.nonzero()
        return (int(used[0]), int(used[-1])) if used.numel() else (-1, -1)

    def start_refine(self, k: int) -> bool:
        """Fix the bucket of the k-th largest; False when k is 0 (keep nothing)."""
        import torch

        if k <= 0:
            self.bucket = HIGH_BUCKETS  # above every entry
            return False
        above = torch.flip(torch.cumsum(torch.flip(self.high, [0]), 0), [0])  # count >= bucket
        k = min(k, self.total)
        self.bucket = int((above >= k).nonzero().max())
        self.rank_in_bucket = k - (
            int(above[self.bucket + 1]) if self.bucket + 1 < HIGH_BUCKETS else 0
        )
        return True

    def add_low(self, block: torch.Tensor) -> None:
        import numpy as np
        import torch

        bits = magnitude_bits(block).reshape(-1).cpu().numpy()  # numpy masking: 2x faster
        lo = self.bucket << 16
        inside = bits[(bits >= lo) & (bits < lo + LOW_BUCKETS)]
        if inside.size:
            self.low += torch.from_numpy(np.bincount(inside - lo, minlength=LOW_BUCKETS))

    def threshold(self) -> int:
        """The int32 bit pattern of the k-th largest magnitude."""
        import torch

        if self.bucket >= HIGH_BUCKETS:
            self.above = 0
            return 0x7FFFFFFF
        above = torch.flip(torch.cumsum(torch.flip(self.low, [0]), 0), [0])
        low = int((above >= self.rank_in_bucket).nonzero().max())
        higher = int(self.high[self.bucket + 1 :].sum())
        self.above = higher + (int(above[low + 1]) if low + 1 < LOW_BUCKETS else 0)
        return (self.bucket << 16) | low


def topk_threshold_bits(blocks, k: int) -> int:
    """The threshold for in-memory blocks (two passes over the same list)."""
    finder = TopKThreshold()
    for b in blocks:
        finder.add_high(b)
    if finder.start_refine(k):
        for b in blocks:
            finder.add_low(b)
    return finder.threshold()
