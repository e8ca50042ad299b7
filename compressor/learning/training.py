"""The shared floor for methods that learn: one AdamW step with gradient accumulation and
clipping, best-on-validation bookkeeping, and running a model over composed parameters.

aTLAS (coefficients over task vectors) and MatFormer's nested training (the whole model)
step through :class:`Trainer`; SketchTune's table tuning and NeuMeta's generator next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LossPiece = Callable[[], "tuple[torch.Tensor, int]"]


def training_options(
    steps: int, lr: float | None, trained: str, agree: bool = False, lr_note: str = ""
) -> tuple:
    """The options of a method that learns from ``-o data``: data, objective, steps, lr,
    batch_size and max_length (``trained`` says what the learning rate moves; ``agree``:
    the method can also match the source model's pooled hidden states)."""
    from compressor.method import Option, positive

    explained = (
        "ce on labelled rows, lm on text, agree: match the source model's pooled hidden "
        "states (auto: ce when rows have labels, else lm for a causal LM, agree for a "
        "model without a head)"
        if agree
        else "ce on labelled rows, lm on text (auto: ce when rows have labels)"
    )
    choices = ("auto", "ce", "lm", "agree") if agree else ("auto", "ce", "lm")
    return (
        Option("data", "str", None, "training rows: JSONL text/pixels with labels, or text (lm)"),
        Option("objective", "choice", "auto", explained, choices=choices),
        Option("steps", "int", steps, "optimizer steps", check=positive),
        Option("lr", "float", lr, f"AdamW learning rate of {trained}{lr_note}", check=positive),
        Option("batch_size", "int", 16, "rows per step", check=positive),
        Option("max_length", "int", 128, "tokens per text", check=positive),
    )


def row_batches(rows: int, size: int, steps: int, seed: int):
    """``steps`` lists of ``size`` row indices: seeded shuffles of all rows, one after
    another, so every row is seen once before any is seen twice."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < size:
            order += torch.randperm(rows, generator=gen).tolist()
        pick, order = order[:size], order[size:]
        yield pick


class Trainer:
    """AdamW over ``params`` with clipping; :meth:`step` accumulates gradient over pieces.

    Each piece returns (loss, count) and is back-propagated at once, so only one piece's
    graph is alive at a time (chunked accumulation bounds memory). With ``mean_over_count``
    the pieces' losses are sums and the gradient is divided by their total count (one
    full-batch gradient however the batch was chunked); otherwise each loss is already a
    mean and the gradients add up (MatFormer's sum over granularities).
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.01, clip: float | None = 1.0):
        import torch

        self.params = [p for p in params if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.clip = clip

    def step(self, pieces: Iterable[LossPiece], mean_over_count: bool = False) -> tuple[float, int]:
        """One optimizer step; returns (the summed loss values, the summed counts)."""
        import torch

        self.optimizer.zero_grad()
        total, count = 0.0, 0
        for piece in pieces:
            loss, n = piece()
            loss.backward()
            total, count = total + float(loss.detach()), count + n
        if mean_over_count:
            for p in self.params:
                if p.grad is not None:
                    p.grad /= max(count, 1)
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        return total, count


@dataclass
class BestOnValidation:
    """The best state seen by a validation score (higher is better), and the history."""

    state: object
    score: float
    history: list[dict] = field(default_factory=list)

    def offer(self, state_fn: Callable[[], object], score: float, **record) -> bool:
        """Record one evaluation; keep ``state_fn()`` when it beats the best. True if kept."""
        self.history.append({**record, "score": score})
        if score > self.score:
            self.state, self.score = state_fn(), score
            return True
        return False


def show_loss(bar, **values: float) -> None:
    """Put the latest loss (and scores) on a progress bar, when it is a real one."""
    if hasattr(bar, "set_postfix"):
        bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()})


def functional_forward(model, params: dict, inputs: dict):
    """Run ``model`` with ``params`` in place of its own (composed or generated weights)."""
    import torch

    return torch.func.functional_call(model, params, args=(), kwargs=inputs)
