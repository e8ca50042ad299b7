"""aTLAS on the smoke suite's MiniLM experts and the tiny Llama: composition, learning, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import artifact_tensors, assert_refused, dir_tensors
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts" / "suite"))
import multitask as _multitask  # noqa: E402, F401

import build as suite_build  # noqa: E402

QUICK = ("-o", "epochs", "2", "-o", "max_length", "32", "-o", "batch_size", "16")


@pytest.fixture(scope="module")
def text():
    suite = suite_build.build(suite_build.SMOKE, quiet=True) / "text"
    return {
        "base": suite / "base",
        "experts": [suite / "experts" / t for t in ("tech", "arts")],
        "train": suite / "data" / "all-train.jsonl",
        "val": suite / "data" / "all-val.jsonl",
    }


def _atlas(run, base, experts, *options, name="at"):
    args = ["merge", "-p", "atlas", "--base", base, *experts, *options, "-n", name, "--json"]
    r = run("--quiet", *args)
    assert r.exit_code == 0, r.output
    return json.loads(next(line for line in r.stdout.splitlines() if line.startswith("{")))


def _coefficients(name: str) -> tuple[dict, dict]:
    from compressor.store import open_store

    st = open_store()
    rec = st.resolve(name)
    path = st.files(rec.id)["atlas_coefficients.safetensors"]
    with safe_open(path, "pt") as f:
        out = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    st.close()
    return out


def test_merged_model_is_base_plus_learned_combination(run, text):
    rec = _atlas(
        run,
        text["base"],
        text["experts"],
        "-o",
        "data",
        text["train"],
        "-o",
        "shots",
        "2",
        "-o",
        "lr",
        "0.2",
        *QUICK,
    )
    lam, meta = _coefficients("at")
    assert json.loads(meta["experts"]) == [str(e) for e in text["experts"]]
    base = dir_tensors(text["base"])
    experts = [dir_tensors(e) for e in text["experts"]]
    got = artifact_tensors("at")
    moved = 0
    for name, theta0 in base.items():
        if name not in lam:
            assert torch.equal(got[name], theta0), name
            continue
        coef = lam[name]
        assert coef.shape == (2, 1)
        want = theta0 + sum(float(coef[t, 0]) * (e[name] - theta0) for t, e in enumerate(experts))
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6, msg=name)
        moved += int(coef.abs().max() > 0)
    assert rec["metrics"]["blocks"] == len(lam) > 90
    # Λ starts at 0 and the best epoch is kept: the base's score unless training helped
    if rec["metrics"]["best_epoch"] > 0:
        assert moved > 0
        assert rec["metrics"]["val_accuracy"] > rec["metrics"]["base_val_accuracy"]
    else:
        assert moved == 0


def test_stored_score_is_the_written_models_score(run, text):
    rec = _atlas(
        run,
        text["base"],
        text["experts"],
        "-o",
        "data",
        text["train"],
        "-o",
        "val",
        text["val"],
        "-o",
        "shots",
        "4",
        "-o",
        "lr",
        "0.3",
        *QUICK,
    )
    r = run("--quiet", "eval", "at", "-o", "data", text["val"], "-o", "max_length", "32", "--json")
    assert r.exit_code == 0, r.output
    scored = json.loads(r.stdout.splitlines()[-1])
    assert scored["accuracy"] == pytest.approx(rec["metrics"]["val_accuracy"])
    assert rec["metrics"]["val_accuracy"] >= rec["metrics"]["base_val_accuracy"]
    assert rec["metrics"]["train_examples"] == 4 * 8


def test_groups_give_each_tensor_that_many_coefficients(run, text):
    expert = text["experts"][0]
    _atlas(
        run,
        text["base"],
        [expert],
        "-o",
        "data",
        text["train"],
        "-o",
        "shots",
        "2",
        "-o",
        "groups",
        "3",
        "-o",
        "lr",
        "0.3",
        *QUICK,
    )
    lam, meta = _coefficients("at")
    assert meta["groups"] == "3"
    base, tuned, got = dir_tensors(text["base"]), dir_tensors(expert), artifact_tensors("at")
    name = "bert.encoder.layer.0.attention.self.query.weight"
    tau = tuned[name] - base[name]
    ratio = ((got[name] - base[name])[tau.abs() > 1e-4] / tau[tau.abs() > 1e-4]).reshape(-1)
    values = lam[name][0]
    # every entry's coefficient is one of the tensor's three
    nearest = (ratio[:, None] - values[None, :]).abs().min(dim=1).values
    assert float(nearest.max()) < 1e-2 * max(1.0, float(values.abs().max()))
    assert lam[name].shape == (1, 3)


def test_blocks_limits_what_is_learned(run, text):
    _atlas(
        run,
        text["base"],
        text["experts"],
        "-o",
        "data",
        text["train"],
        "-o",
        "shots",
        "2",
        "-o",
        "blocks",
        r"layer\.5\.|classifier",
        *QUICK,
    )
    lam, _ = _coefficients("at")
    assert lam and all("layer.5." in n or "classifier" in n for n in lam)
    base, got = dir_tensors(text["base"]), artifact_tensors("at")
    for name, t in base.items():
        if name not in lam:
            assert torch.equal(got[name], t), name


def test_show_summarises_lambda(run, text):
    _atlas(
        run,
        text["base"],
        text["experts"],
        "-o",
        "data",
        text["train"],
        "-o",
        "shots",
        "2",
        "-o",
        "lr",
        "0.3",
        *QUICK,
    )
    out = run("store", "show", "at").output
    for e in text["experts"]:
        line = next(x for x in out.splitlines() if x.strip().startswith(f"Λ {e}:"))
        assert "mean" in line and "min" in line and "max" in line and "largest:" in line


def test_entropy_objective_on_unlabelled_rows(run, text, tmp_path):
    rows = [json.loads(x) for x in text["train"].read_text().splitlines()][:24]
    data = tmp_path / "unlabelled.jsonl"
    data.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    rec = _atlas(
        run,
        text["base"],
        text["experts"],
        "-o",
        "data",
        data,
        "-o",
        "objective",
        "entropy",
        *QUICK,
    )
    assert "val_neg_entropy" in rec["metrics"]
    assert rec["metrics"]["val_neg_entropy"] >= rec["metrics"]["base_val_neg_entropy"]


def test_default_step_is_one_full_batch_gradient(run, text, tmp_path):
    """40 rows (two chunks through the model) make one AdamW step per epoch; Adam's first
    step moves each coefficient by lr against the sign of the full-batch gradient."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [json.loads(x) for x in text["train"].read_text().splitlines()][::4][:40]
    assert len(rows) == 40
    data = tmp_path / "unlabelled.jsonl"
    data.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    lr = 0.002
    args = ("-o", "data", data, "-o", "objective", "entropy", "-o", "max_length", "32")
    rec = _atlas(run, text["base"], text["experts"], *args, "-o", "epochs", "1", "-o", "lr", lr)
    assert rec["metrics"]["best_epoch"] == 1  # a small step down the gradient lowers the loss
    lam, _ = _coefficients("at")

    # independent: d(mean entropy)/dΛ_tb at Λ = 0 is <dL/dθ_b, τ_tb>
    tok = AutoTokenizer.from_pretrained(text["base"])
    model = AutoModelForSequenceClassification.from_pretrained(text["base"]).eval()
    x = tok(
        [r["text"] for r in rows], padding=True, truncation=True, max_length=32, return_tensors="pt"
    )
    logp = model(**x).logits.log_softmax(-1)
    (-(logp.exp() * logp).sum(-1).mean()).backward()
    base = dir_tensors(text["base"])
    experts = [dir_tensors(e) for e in text["experts"]]
    grads = dict(model.named_parameters())
    g = {
        (name, t): float((grads[name].grad * (e[name] - base[name])).sum())
        for name in lam
        for t, e in enumerate(experts)
    }
    clip = min(1.0, 1.0 / (sum(v * v for v in g.values()) ** 0.5 + 1e-6))  # clip_grad_norm_
    checked = 0
    for (name, t), gt in g.items():
        gc = gt * clip
        want = -lr * gc / (abs(gc) + 1e-8)  # Adam's bias-corrected first step
        assert float(lam[name][t, 0]) == pytest.approx(want, rel=1e-3, abs=1e-9), name
        checked += abs(want) > lr / 2
    assert checked > 100

    # mini-batches of 16 make three steps in that epoch instead: coefficients move further
    _atlas(
        run,
        text["base"],
        text["experts"],
        *args,
        "-o",
        "epochs",
        "1",
        "-o",
        "lr",
        lr,
        "-o",
        "batch_size",
        "16",
        name="mini",
    )
    lam_mini, _ = _coefficients("mini")
    assert max(float(c.abs().max()) for c in lam_mini.values()) > 2.5 * lr


def test_language_model_objective_on_the_tiny_llama(run, models, tmp_path):
    from compressor.demo.models import zen_lines

    data = tmp_path / "text.txt"
    data.write_text("\n".join(zen_lines()[:16]) + "\n")
    rec = _atlas(
        run,
        models["base-fp32"],
        [models["ft1-fp32"], models["ft2-fp32"]],
        "-o",
        "data",
        data,
        "-o",
        "objective",
        "lm",
        "-o",
        "lr",
        "0.2",
        *QUICK,
    )
    assert rec["metrics"]["val_neg_loss"] >= rec["metrics"]["base_val_neg_loss"]
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    assert run("export", "at", out).exit_code == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size


def test_malformed_data_line_is_named(run, text, private_store, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = text["train"].read_text().splitlines()
    bad.write_text("\n".join([good[0], good[1], '{"text": "unfinished', good[2]]) + "\n")
    args = ["merge", "-p", "atlas", "--base", text["base"], *text["experts"], "-o", "data", bad]
    assert_refused(
        run, private_store, args, f"{bad} line 3: not valid JSON (Unterminated string starting at)"
    )


def test_label_outside_the_models_classes(run, text, private_store, tmp_path):
    bad = tmp_path / "labels.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 9}\n')
    args = ["merge", "-p", "atlas", "--base", text["base"], *text["experts"], "-o", "data", bad]
    assert_refused(
        run, private_store, args, f"{bad} line 2: label 9 is outside the model's 8 classes (0-7)"
    )


def test_other_bad_inputs(run, text, models, private_store, tmp_path):
    base, experts, train = text["base"], text["experts"], text["train"]
    merge = ["merge", "-p", "atlas", "--base", base]
    assert_refused(run, private_store, [*merge, *experts], "atlas needs -o data PATH", code=2)
    unlabelled = tmp_path / "u.jsonl"
    unlabelled.write_text('{"text": "a"}\n')
    assert_refused(
        run,
        private_store,
        [*merge, *experts, "-o", "data", unlabelled, "-o", "objective", "ce"],
        f"{unlabelled}: objective 'ce' needs a 'label' on every row",
    )
    assert_refused(
        run,
        private_store,
        [*merge, *experts, "-o", "data", train, "-o", "blocks", "nothing"],
        "no parameter tensor matching 'nothing' differs between the base and the experts",
    )
    assert_refused(
        run,
        private_store,
        [*merge, *experts, "-o", "data", train, "-o", "blocks", "(("],
        "option 'blocks' is not a valid regular expression (missing ), unterminated "
        "subpattern at position 1); got '(('",
        code=2,
    )
    assert_refused(
        run,
        private_store,
        [*merge, models["ft1-fp32"], "-o", "data", train],
        f"base and expert differ: lm_head.weight is in {models['ft1-fp32']} but not in {base}",
    )


# -- issue #34: agree, each expert's own head, ViT ------------------------------------


def _pooled(model, tok, texts, max_length=32):
    """Mean-pooled last hidden states, computed directly with transformers."""
    x = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**x, output_hidden_states=True).hidden_states[-1]
    mask = x["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


def test_agree_on_a_headless_encoder_with_unlabelled_text(run, minilm, tmp_path):
    """The real MiniLM (a BertModel, no head) and two fine-tunes, plain text lines: agree
    is the default; the stored score is the mean over experts of the cosine between the
    written model's pooled embeddings and each expert's, computed here independently."""
    from transformers import AutoModel, AutoTokenizer

    from compressor.demo.models import save_finetune, zen_lines

    experts = [minilm["ft"], save_finetune(minilm["base"], tmp_path / "ft2", seed=9, strength=0.02)]
    lines = zen_lines()[:12]
    data = tmp_path / "text.txt"
    data.write_text("\n".join(lines) + "\n")
    rec = _atlas(run, minilm["base"], experts, "-o", "data", data, "-o", "lr", "0.5", *QUICK)
    assert rec["metrics"]["val_cosine"] >= rec["metrics"]["base_val_cosine"]
    r = run("store", "show", "at", "--json")
    assert json.loads(r.stdout)["manifest"]["objective"] == "agree"

    out = tmp_path / "merged"
    assert run("export", "at", out).exit_code == 0
    tok = AutoTokenizer.from_pretrained(minilm["base"])

    def mean_cosine(candidate):
        got = _pooled(AutoModel.from_pretrained(candidate).eval(), tok, lines)
        cos = []
        for e in experts:
            want = _pooled(AutoModel.from_pretrained(e).eval(), tok, lines)
            cos.append(torch.nn.functional.cosine_similarity(got, want, dim=-1).mean())
        return float(sum(cos) / len(cos))

    assert rec["metrics"]["val_cosine"] == pytest.approx(mean_cosine(out), abs=2e-5)
    assert rec["metrics"]["base_val_cosine"] == pytest.approx(mean_cosine(minilm["base"]), abs=2e-5)


@pytest.fixture(scope="module")
def multitask():
    import multitask as suite

    return suite.build(suite.SMOKE, quiet=True)


@pytest.mark.slow
@pytest.mark.parametrize("part", ["text", "image"])
def test_each_expert_learns_under_its_own_head(run, multitask, part, tmp_path):
    """The multi-task suite's setting (a base without heads, experts with heads of their
    own sizes), ViT included: one data file per expert, each scored under its expert's
    head; the stored score is the mean of each task's accuracy of the written body under
    that task's head, computed here with transformers."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    tasks = sorted(p.name for p in (multitask / part / "experts").iterdir())[:3]
    experts = [multitask / part / "experts" / t for t in tasks]
    data = multitask / part / "data"
    train = ",".join(str(data / f"{t}-train.jsonl") for t in tasks)
    val = ",".join(str(data / f"{t}-val.jsonl") for t in tasks)
    rec = _atlas(
        run, multitask / part / "base", experts,
        "-o", "data", train, "-o", "val", val, "-o", "shots", "2", "-o", "lr", "0.2", *QUICK,
    )  # fmt: skip
    assert rec["metrics"]["val_accuracy"] >= rec["metrics"]["base_val_accuracy"]
    body = artifact_tensors("at")
    assert not any(n.startswith("classifier.") for n in body)  # each task keeps its head
    auto = AutoModelForSequenceClassification if part == "text" else AutoModelForImageClassification
    accuracies = []
    for task, expert in zip(tasks, experts, strict=True):
        model = auto.from_pretrained(expert).eval()
        own = dir_tensors(expert)
        merged = {n: body.get(n, t) for n, t in own.items()}
        model = type(model).from_pretrained(None, config=model.config, state_dict=merged).eval()
        rows = [json.loads(x) for x in (data / f"{task}-val.jsonl").read_text().splitlines()]
        if part == "text":
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(expert)
            x = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=32,
                    return_tensors="pt")  # fmt: skip
        else:
            pixels = torch.tensor([r["pixels"] for r in rows], dtype=torch.float32)
            x = {"pixel_values": pixels.unsqueeze(1) if pixels.dim() == 3 else pixels}
        labels = [model.config.label2id.get(str(r["label"]), r["label"]) for r in rows]
        with torch.no_grad():
            pred = model(**x).logits.argmax(-1)
        accuracies.append(float((pred == torch.tensor(labels)).float().mean()))
    assert rec["metrics"]["val_accuracy"] == pytest.approx(sum(accuracies) / len(accuracies))


def test_own_heads_need_a_file_per_expert(run, multitask, private_store):
    experts = [multitask / "text" / "experts" / t for t in ("tech", "arts")]
    args = ["merge", "-p", "atlas", "--base", multitask / "text" / "base", *experts]
    args += ["-o", "data", multitask / "text" / "data" / "tech-train.jsonl"]
    assert_refused(
        run,
        private_store,
        args,
        "the experts carry their own heads (classifier.bias, classifier.weight): give one "
        "data file per expert (-o data a.jsonl,b.jsonl,...), each scored under its expert's "
        "head, or -o objective agree",
        code=2,
    )
    three = ",".join([str(multitask / "text" / "data" / "tech-train.jsonl")] * 3)
    assert_refused(
        run,
        private_store,
        [*args[:-1], three],
        "option 'data' names 3 files for 2 experts: give one file, or one per expert",
        code=2,
    )


def test_a_headless_model_refuses_labels_for_ce_with_one_line(run, minilm, private_store, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "a b", "label": 0}\n{"text": "c d", "label": 1}\n')
    args = ["merge", "-p", "atlas", "--base", minilm["base"], minilm["ft"], "-o", "data", data]
    assert_refused(
        run,
        private_store,
        args,
        f"{minilm['base']} is a BertModel, with no classification head for objective 'ce': "
        "give labelled rows to a classifier, or use -o objective agree",
    )


def test_val_files_must_match_data_files_and_rows_must_exist(run, models, private_store, tmp_path):
    from compressor.demo.models import zen_lines

    text = tmp_path / "text.txt"
    text.write_text("\n".join(zen_lines()[:4]) + "\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    merge = ["merge", "-p", "atlas", "--base", models["base-fp32"]]
    experts = [models["ft1-fp32"], models["ft2-fp32"]]
    assert_refused(
        run,
        private_store,
        [*merge, *experts, "-o", "data", f"{text},{text}", "-o", "val", text],
        "option 'val' names 1 file(s) and 'data' 2: give as many",
        code=2,
    )
    assert_refused(
        run,
        private_store,
        [*merge, *experts, "-o", "data", f"{text},{empty}", "-o", "objective", "lm"],
        f"{empty} holds no examples",
    )
