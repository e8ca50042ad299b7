"""The demo's task: scikit-learn's handwritten digits, a tiny ViT, and two domain experts.

The base learns upright digits; expert A is fine-tuned on the digits rotated a
quarter turn, expert B on the digits with their ink inverted. Neither domain is
one the base reads well, so accuracy visibly moves with every method: experts
gain on their own domain, merges keep some of both, compressed experts keep
most of their expert's gain. Everything is built here in seconds; nothing is
downloaded (the digits ship inside scikit-learn).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DOMAINS = ("upright", "rotated", "inverted")


def _domain(x: torch.Tensor, domain: str) -> torch.Tensor:
    if domain == "rotated":
        return torch.rot90(x, 1, dims=(-2, -1))
    if domain == "inverted":
        return 1.0 - x
    return x


def load_digits_split(
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train x, train y, test x, test y): 8x8 digits scaled to [0, 1], 1,297 / 500."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "the demo's digits ship with scikit-learn: pip install 'compressor[demo]'"
        ) from None
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return x[500:], y[500:], x[:500], y[:500]


def _vit(seed: int):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config)


def _train(model, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            loss = model(pixel_values=x[idx].unsqueeze(1), labels=y[idx]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def build(work: Path, say=print) -> dict[str, Path]:
    """Train the base and the two experts; write each domain's test set as JSONL.

    Returns paths: ``base``, ``finetune-a``, ``finetune-b`` (model directories),
    ``test-<domain>`` and ``train-<domain>`` (data files; the training rows the experts
    learned from, for methods that tune on data).
    """
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    xtr, ytr, xte, yte = load_digits_split()
    paths: dict[str, Path] = {}
    for split, (x, y) in (("test", (xte, yte)), ("train", (xtr, ytr))):
        for domain in DOMAINS:
            path = write_rows(work / f"{split}-{domain}.jsonl", _domain(x, domain), y)
            paths[f"{split}-{domain}"] = path
    say("Training the base ViT on upright digits (1,297 images) ...")
    model = _vit(seed=0)
    _train(model, xtr, ytr, epochs=12, lr=3e-3, seed=0)
    model.save_pretrained(work / "base")
    paths["base"] = work / "base"
    for tag, domain in (("a", "rotated"), ("b", "inverted")):
        say(f"Fine-tuning expert {tag.upper()} on {domain} digits ...")
        expert = _vit(seed=0)
        expert.load_state_dict(model.state_dict())
        _train(expert, _domain(xtr, domain), ytr, epochs=5, lr=4e-4, seed=1)
        expert.save_pretrained(work / f"finetune-{tag}")
        paths[f"finetune-{tag}"] = work / f"finetune-{tag}"
    return paths


def write_rows(path: Path, x: torch.Tensor, y: torch.Tensor) -> Path:
    """Digit images and labels as JSONL rows ({"pixels": 8x8, "label": k})."""
    rows = (
        {"pixels": [[round(float(v), 4) for v in r] for r in img], "label": int(lab)}
        for img, lab in zip(x, y, strict=True)
    )
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)


def save_digits_resnet(path: Path, epochs: int = 8, seed: int = 0) -> Path:
    """A small transformers ResNet (basic blocks, 32 and 64 channels) trained on upright
    digits: a real 4-D conv model with BatchNorm, for the methods that morph channels."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    config = ResNetConfig(
        num_channels=1,
        embedding_size=16,
        hidden_sizes=[32, 64],
        depths=[1, 1],
        layer_type="basic",
        downsample_in_first_stage=False,
        num_labels=10,
    )
    model = ResNetForImageClassification(config)
    xtr, ytr, _, _ = load_digits_split()
    _train(model, xtr, ytr, epochs=epochs, lr=3e-3, seed=seed)
    model.save_pretrained(path)
    return Path(path)
