"""Objectives shared by evaluation and by methods that learn over the weights.

Each returns a *sum* over the batch and a count, so callers can average over
a whole data set exactly however they batch it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports happen inside the functions that use them
    import torch


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of class logits against integer labels."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.numel()


def prediction_entropy(logits: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed entropy of the predicted class distributions (test-time adaptation)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(), logits.shape[0]


def language_model_nll(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood over the unmasked tokens."""
    import torch.nn.functional as F

    shift_logits = logits[:, :-1].float()
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return loss, int((targets != -100).sum())


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings: the mean of the token states under the attention mask."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def embedding_agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cosine similarity between two batches of embeddings."""
    import torch.nn.functional as F

    return F.cosine_similarity(a.float(), b.float(), dim=-1).sum(), a.shape[0]


def disagreement(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed 1 − cosine similarity of two batches of embeddings (``agree``'s loss: 0 when
    every embedding points where its teacher's does, whatever their lengths)."""
    agreement, n = embedding_agreement(a, b)
    return n - agreement, n


def pooled_hidden(out, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """A sentence (or image) embedding from a model's output run with
    ``output_hidden_states``: its last hidden states averaged over the tokens under the
    attention mask (over every patch and token where there is none), in float32."""
    hidden = out.hidden_states[-1].float()
    if attention_mask is None:
        return hidden.mean(1)
    return mean_pool(hidden, attention_mask)
