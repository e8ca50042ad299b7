"""Rank every merge on the multi-task suite: eight tasks, per-task heads (docs/benchmarks/merging.md).

    python scripts/bench_merge_quality.py                  # text and image, every method
    python scripts/bench_merge_quality.py --smoke          # the small suite (a quick check)
    python scripts/bench_merge_quality.py --parts image --methods ties,iso-c
    python scripts/bench_merge_quality.py --write-docs

The protocol of the merging papers: each method merges the eight experts' bodies
through ``compressor.merge`` (the heads are not merged); each task is scored with the
merged body under its own expert's head. A method's scale λ is picked from a grid by
the mean validation accuracy over the eight tasks and scored on test. Absolute
accuracy is the mean over tasks; normalized accuracy the mean of merged / expert per
task. Every method is merged once at λ = 1 and the grid applied to its Δ = θ − θ0 in
memory (the same tensors ``-o scale λ`` writes: the scale multiplies the merged Δ in
every method that has one). Methods without a scale (linear, model-stock, karcher,
multislerp) are scored as they are.

aTLAS rows learn their coefficients instead of a λ (no grid): from the full experts
(each with its head) and one data file per task, each task's rows run under its own
head. ``atlas 16-shot``: 16 labelled training rows per class of each task, Λ picked on
each task's labelled validation split (the paper's few-shot setting). ``atlas
unlabelled (entropy)`` and ``(agree)``: 64 training rows of each task with their labels
removed, for training and for picking Λ (test-time adaptation as AdaMerging, and
distillation of each expert on its rows); no label is read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "suite"))
sys.path.insert(0, str(HERE))
ROOT = HERE.parent

GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0)
METHODS = {  # row label -> (plugin, fixed options: the papers' or mergekit's defaults)
    "linear": ("linear", {}),
    "task-arithmetic": ("task-arithmetic", {}),
    "ties": ("ties", {"density": 0.2}),
    "dare-ties": ("dare-ties", {"density": 0.3, "seed": 0}),
    "dare-linear": ("dare-linear", {"density": 0.3, "seed": 0}),
    "breadcrumbs-ties": ("breadcrumbs-ties", {}),
    "della": ("della", {"density": 0.3, "seed": 0}),
    "sce": ("sce", {}),
    "model-stock": ("model-stock", {}),
    "karcher": ("karcher", {}),
    "multislerp": ("multislerp", {}),
    "tsv-m": ("tsv-m", {}),
    "iso-c": ("iso-c", {}),
    "iso-cts": ("iso-cts", {}),
    "wudi": ("wudi", {}),
    "tsv-m + svc": ("tsv-m", {"calibrate": "svc"}),
    "iso-c + svc": ("iso-c", {"calibrate": "svc"}),
    "iso-cts + svc": ("iso-cts", {"calibrate": "svc"}),
    "wudi + svc": ("wudi", {"calibrate": "svc"}),
}
UNSCALED = {"linear", "model-stock", "karcher", "multislerp"}
ATLAS = {  # row label -> (objective, labelled: shots per class; else unlabelled rows per task)
    "atlas 16-shot (ce)": ("ce", 16),
    "atlas unlabelled (entropy)": ("entropy", 64),
    "atlas unlabelled (agree)": ("agree", 64),
}
METHODS.update({label: ("atlas", {}) for label in ATLAS})
NEW = {
    label
    for label, (plugin, _) in METHODS.items()
    if plugin in ("tsv-m", "iso-c", "iso-cts", "wudi")
}
CACHE = ROOT / "bench-data" / "merge-quality"


class TaskScorer:
    """Each task's expert in memory; scores a body (name → tensor) under every task's head."""

    def __init__(self, part_dir: Path, tasks: list[str]):
        from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

        from compressor.io.sources import open_model_dir
        from compressor.learning.data import read_examples
        from compressor.learning.tasks import Task
        from compressor.models.modeling import checkpoint_names

        self.tasks = tasks
        self.entries = {}
        for task in tasks:
            path = part_dir / "experts" / task
            tokenizer = None
            if (path / "tokenizer_config.json").exists():
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(path)
                model = AutoModelForSequenceClassification.from_pretrained(path)
            else:
                model = AutoModelForImageClassification.from_pretrained(path)
            model.eval()
            objective = Task("ce", model.config, tokenizer, 64)
            splits = {}
            for split in ("val", "test"):
                data = part_dir / "data" / f"{task}-{split}.jsonl"
                splits[split] = objective.split(read_examples(data), str(data), 64)
            head = {k: v.clone() for k, v in model.state_dict().items() if "classifier" in k}
            self.entries[task] = (model, objective, splits, head)
            if not hasattr(self, "param_of"):  # one architecture: the same map for every task
                # checkpoint name → the model's parameter (transformers 5 renames ViT's)
                with open_model_dir(path) as source:
                    self.param_of = {c: p for p, c in checkpoint_names(model, source).items()}

    def scores(self, body: dict | None, split: str) -> dict[str, float]:
        """Accuracy per task of ``body`` (None: each expert as it is) on a split."""
        import torch

        out = {}
        if body is not None:
            unknown = [n for n in body if n not in self.param_of]
            if unknown:
                raise SystemExit(f"the merged body has tensors no task model takes: {unknown[:3]}")
            body = {self.param_of[n]: t for n, t in body.items()}
        for task, (model, objective, splits, _) in self.entries.items():
            saved = None
            if body is not None:
                saved = {k: v.clone() for k, v in model.state_dict().items() if k in body}
                result = model.load_state_dict(body, strict=False)
                assert not result.unexpected_keys, result.unexpected_keys
            with torch.inference_mode():
                m = objective.metrics(lambda x, model=model: model(**x).logits, splits[split])
            out[task] = m["accuracy"]
            if saved is not None:
                model.load_state_dict(saved, strict=False)
        return out


def read_tensors(store, ref: str) -> dict:
    from compressor.app.refs import resolve

    source = resolve(store, ref).source
    try:
        return {n: source.get(n).float() for n in source.names()}
    finally:
        source.close()


def body_copy(expert: Path, out: Path) -> str:
    """The expert without its head tensors (what is merged): the heads differ in shape,
    and a merge refuses tensors its base does not have."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(expert / "config.json", out / "config.json")
    tensors = load_file(expert / "model.safetensors")
    body = {k: v for k, v in tensors.items() if not k.startswith("classifier.")}
    save_file(body, out / "model.safetensors", metadata={"format": "pt"})
    return str(out)


def evaluate_part(
    part_dir: Path, tasks: list[str], methods: dict, store, work: Path, log, cache: dict, save
) -> list[dict]:
    """Rows for the methods (the experts' first); rows found in ``cache`` (label → row,
    from an earlier run on the same suite) are reused, new ones added to it and saved."""

    import compressor

    scorer = TaskScorer(part_dir, tasks)
    experts = [body_copy(part_dir / "experts" / t, work / part_dir.name / t) for t in tasks]
    base_path = str(part_dir / "base")
    base = read_tensors(store, base_path)
    expert_test = scorer.scores(None, "test")
    rows = [{"method": "experts (each on its own task)", "test": expert_test, "note": ""}]
    log(f"experts: {sum(expert_test.values()) / len(tasks):.3f}")
    for method, (plugin, fixed) in methods.items():
        if method in cache:
            rows.append(cache[method])
            continue
        t0 = time.monotonic()
        if method in ATLAS:
            rec = atlas_merge(part_dir, tasks, ATLAS[method], store, work, log)
        else:
            rec = compressor.merge(
                plugin, experts, base=base_path, options=dict(fixed), store=store
            )
        seconds = time.monotonic() - t0
        merged = read_tensors(store, rec.id)
        missing = set(base) - set(merged)
        if missing:
            raise SystemExit(f"{method}: the merge lacks {sorted(missing)[:3]}")
        delta = {n: merged[n] - base[n] for n in base}
        grid = (1.0,) if method in UNSCALED or method in ATLAS else GRID
        best = None
        val_curve = []
        for lam in grid:
            body = {n: base[n] + lam * delta[n] for n in base}
            val = scorer.scores(body, "val")
            mean = sum(val.values()) / len(tasks)
            val_curve.append((lam, mean))
            if best is None or mean > best[1]:
                best = (lam, mean)
        body = {n: base[n] + best[0] * delta[n] for n in base}
        test = scorer.scores(body, "test")
        note = "" if method in UNSCALED else f"λ {best[0]} (val {best[1]:.3f})"
        if method in ATLAS:
            note = f"learned Λ (val {best[1]:.3f}); " + ", ".join(
                f"{k} {v}" for k, v in rec.params.items() if k in ("objective", "shots", "epochs")
            )
        if fixed:
            note += ("; " if note else "") + ", ".join(f"{k} {v}" for k, v in fixed.items())
        rows.append(
            {"method": method, "test": test, "note": note, "seconds": seconds, "curve": val_curve}
        )
        cache[method] = rows[-1]
        save()
        absolute = sum(test.values()) / len(tasks)
        normalized = sum(test[t] / max(expert_test[t], 1e-9) for t in tasks) / len(tasks)
        log(f"{method}: abs {absolute:.3f} norm {normalized:.3f} {note} ({seconds:.0f} s merge)")
        del merged, delta, body
    return rows


def atlas_merge(part_dir: Path, tasks: list[str], how: tuple, store, work: Path, log):
    """aTLAS over the full experts, one data file per task (see the module's docstring)."""
    import compressor

    objective, count = how
    data = part_dir / "data"
    experts = [str(part_dir / "experts" / t) for t in tasks]
    options = {"objective": objective, "max_length": 64}
    if objective == "ce":
        train = [str(data / f"{t}-train.jsonl") for t in tasks]
        val = [str(data / f"{t}-val.jsonl") for t in tasks]
        options["shots"] = count
    else:  # labels removed: nothing the model is scored on is read
        train = []
        for t in tasks:
            rows = [json.loads(x) for x in (data / f"{t}-train.jsonl").read_text().splitlines()]
            out = work / part_dir.name / "unlabelled" / f"{t}.jsonl"
            out.parent.mkdir(parents=True, exist_ok=True)
            keep = [{k: v for k, v in r.items() if k != "label"} for r in rows[:count]]
            out.write_text("".join(json.dumps(r) + "\n" for r in keep))
            train.append(str(out))
        val = train
    options.update(data=",".join(train), val=",".join(val))
    log(f"atlas ({objective}): learning on {len(tasks)} files")
    return compressor.merge(
        "atlas", experts, base=str(part_dir / "base"), options=options, store=store
    )


def table(part: str, tasks: list[str], rows: list[dict]) -> str:
    experts = rows[0]["test"]
    head = ["method", "absolute", "normalized", *tasks, "λ on validation", "merge s"]
    lines = [
        "| " + " | ".join(head) + " |",
        "| --- |" + " ---: |" * (len(head) - 3) + " --- | ---: |",
    ]
    for row in rows:
        t = row["test"]
        absolute = sum(t.values()) / len(tasks)
        normalized = sum(t[k] / max(experts[k], 1e-9) for k in tasks) / len(tasks)
        name = f"**{row['method']}** (new)" if row["method"] in NEW else row["method"]
        seconds = f"{row['seconds']:.0f}" if "seconds" in row else ""
        cells = [f"{absolute:.3f}", f"{normalized:.1%}", *(f"{t[k]:.3f}" for k in tasks)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['note']} | {seconds} |")
    return f"**{part}**\n\n" + "\n".join(lines)


def summary(results: dict) -> str:
    """The goal's two numbers per part: the best new merge's normalized accuracy and its
    lead over the best of the merges that were there before."""
    out = []
    for part, (tasks, rows) in results.items():
        experts = rows[0]["test"]

        def norm(row, tasks=tasks, experts=experts):
            return sum(row["test"][k] / max(experts[k], 1e-9) for k in tasks) / len(tasks)

        ranked = sorted(rows[1:], key=norm, reverse=True)
        new = [r for r in ranked if r["method"] in NEW]
        old = [r for r in ranked if r["method"] not in NEW and r["method"] not in ATLAS]
        ta = next((r for r in rows if r["method"] == "task-arithmetic"), None)
        bits = []
        if ta:
            bits.append(f"task arithmetic keeps {norm(ta):.1%}")
        if new and old:
            bits.append(
                f"best new merge {new[0]['method']} {norm(new[0]):.1%} against the best "
                f"earlier one, {old[0]['method']}, {norm(old[0]):.1%} "
                f"({100 * (norm(new[0]) - norm(old[0])):+.1f} points)"
            )
        learned = [r for r in ranked if r["method"] in ATLAS]
        fixed = [r for r in ranked if r["method"] not in ATLAS]
        if learned and fixed:
            bits.append(
                f"best aTLAS row {learned[0]['method']} {norm(learned[0]):.1%} against the best "
                f"data-free merge, {fixed[0]['method']}, {norm(fixed[0]):.1%} "
                f"({100 * (norm(learned[0]) - norm(fixed[0])):+.1f} points)"
            )
        out.append(f"{part}: " + "; ".join(bits) + ".")
    return " ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--parts", default="text,image")
    ap.add_argument("--methods", help="comma-separated subset of the rows (their labels)")
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="recompute every row (else rows of an earlier run "
        "on the same suite, kept in bench-data/merge-quality/, are reused)",
    )
    ap.add_argument("--cache-dir", type=Path, default=CACHE, help="where rows are kept")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()

    import multitask
    import torch
    from transformers.utils import logging

    import compressor

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.manual_seed(0)
    suite = multitask.build(multitask.SMOKE if args.smoke else multitask.FULL)
    methods = METHODS
    if args.methods:
        methods = {m: METHODS.get(m, (m, {})) for m in args.methods.split(",")}
    cache_file = args.cache_dir / f"{suite.name}.json"
    cache = {} if args.fresh or not cache_file.exists() else json.loads(cache_file.read_text())

    def save():
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cache, indent=1))

    work = Path(tempfile.mkdtemp(prefix="merge-quality-"))
    results = {}
    try:
        with contextlib.closing(compressor.open_store(work / "store")) as store:
            for part in args.parts.split(","):
                tasks = list(multitask.text_labels() if part == "text" else multitask.IMAGE_TASKS)
                rows = evaluate_part(
                    suite / part,
                    tasks,
                    methods,
                    store,
                    work,
                    lambda s, p=part: print(f"[{p}] {s}", flush=True),
                    cache.setdefault(part, {}),
                    save,
                )
                results[part] = (tasks, rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = "\n\n".join(table(p, t, r) for p, (t, r) in results.items())
    text += "\n\n" + summary(results)
    print(text)
    if args.write_docs:
        from bench_foundation import write_docs_section

        write_docs_section("merge-quality", text)


if __name__ == "__main__":
    main()
