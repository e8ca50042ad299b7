"""`compress eval` on every part of the smoke suite, against independent calculations."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import store_snapshot

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts" / "suite"))
import build as suite_build  # noqa: E402


@pytest.fixture(scope="session")
def suite() -> Path:
    return suite_build.build(suite_build.SMOKE, quiet=True)


def _rows(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def _eval_json(run, *args):
    r = run("--quiet", "eval", *args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.splitlines()[-1])


def _text_accuracy(model, tokenizer, rows):
    enc = tokenizer(
        [r["text"] for r in rows],
        padding=True,
        truncation=True,
        max_length=128,
        return_tensors="pt",
    )
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1)
    return int((pred == torch.tensor([r["label"] for r in rows])).sum()) / len(rows)


def test_classify_text_expert(run, suite):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    expert = suite / "text" / "experts" / "tech"
    data = suite / "text" / "data" / "tech-test.jsonl"
    got = _eval_json(run, expert, "-o", "data", data, "-o", "batch_size", "5")
    model = AutoModelForSequenceClassification.from_pretrained(expert).eval()
    want = _text_accuracy(model, AutoTokenizer.from_pretrained(expert), _rows(data))
    assert got["task"] == "classify" and got["examples"] == len(_rows(data))
    assert got["accuracy"] == pytest.approx(want, abs=1e-9)
    assert got["loss"] > 0
    listed = run("store", "ls", "--all").output
    assert "accuracy:tech-test=" in listed  # stored on the (external) artifact


def test_classify_lora_adapter_with_base(run, suite):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base, adapter = suite / "text" / "base", suite / "lora" / "civic"
    data = suite / "text" / "data" / "civic-test.jsonl"
    got = _eval_json(run, adapter, "--base", base, "-o", "data", data)
    model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(base), adapter
    ).eval()
    want = _text_accuracy(model, AutoTokenizer.from_pretrained(base), _rows(data))
    assert got["accuracy"] == pytest.approx(want, abs=1e-9)


def test_classify_images(run, suite):
    from transformers import ResNetForImageClassification

    expert = suite / "image" / "experts" / "invert"
    data = suite / "image" / "data" / "invert-test.jsonl"
    got = _eval_json(run, expert, "-o", "data", data)
    rows = _rows(data)
    model = ResNetForImageClassification.from_pretrained(expert).eval()
    with torch.no_grad():
        x = torch.tensor([r["pixels"] for r in rows]).unsqueeze(1)
        pred = model(pixel_values=x).logits.argmax(-1)
    want = int((pred == torch.tensor([r["label"] for r in rows])).sum()) / len(rows)
    assert got["accuracy"] == pytest.approx(want, abs=1e-9)


def test_perplexity_of_causal_lm(run, suite):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = suite / "lm" / "experts" / "computers"
    data = suite / "lm" / "data" / "computers-test.txt"
    got = _eval_json(run, model_dir, "-o", "data", data, "-o", "batch_size", "4")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    nll, n = 0.0, 0
    with torch.no_grad():
        for line in data.read_text().splitlines():  # one line at a time: no padding at all
            ids = tok(line, truncation=True, max_length=128, return_tensors="pt")["input_ids"]
            out = model(input_ids=ids, labels=ids)
            k = ids.shape[1] - 1
            nll += float(out.loss) * k
            n += k
    assert got["task"] == "lm" and got["tokens"] == n
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_embedding_agreement(run, suite, minilm):
    data = suite / "lm" / "data" / "songs-poems-test.txt"
    same = _eval_json(run, minilm["base"], "-o", "data", data, "-o", "reference", minilm["base"])
    assert same["task"] == "embed" and same["cosine"] == pytest.approx(1.0, abs=1e-5)
    other = _eval_json(run, minilm["ft"], "-o", "data", data, "-o", "reference", minilm["base"])
    assert 0.5 < other["cosine"] < 0.99999


def test_store_artifact_with_base_and_metrics_in_show(run, suite):
    base, expert = suite / "text" / "base", suite / "text" / "experts" / "arts"
    assert run("apply", "-p", "task-vector", "--base", base, expert, "-n", "arts").exit_code == 0
    data = suite / "text" / "data" / "arts-test.jsonl"
    direct = _eval_json(run, expert, "-o", "data", data)
    via_tv = _eval_json(run, "arts", "--base", base, "-o", "data", data)
    assert via_tv["accuracy"] == direct["accuracy"]
    shown = json.loads(run("store", "show", "arts", "--json").stdout)
    assert shown["metrics"]["accuracy:arts-test"] == direct["accuracy"]
    text = run("--quiet", "eval", "arts", "--base", base, "-o", "data", data).output
    assert text.startswith("accuracy ") and f"(classify on {data})" in text


def test_users_own_jsonl_with_string_labels(run, suite, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text(
        json.dumps({"text": "The compiler crashed on my laptop again.", "label": "computers"})
        + "\n"
        + json.dumps({"text": "Parliament passed the bill last night.", "label": "politics"})
        + "\n"
    )
    got = _eval_json(run, suite / "text" / "experts" / "tech", "-o", "data", data)
    assert got["examples"] == 2 and 0 <= got["accuracy"] <= 1


@pytest.fixture
def guarded(private_store, run):
    run("store", "ls")  # create the store so the snapshot has something to compare
    return private_store


def _fails(run, store, args, message):
    before = store_snapshot(store)
    r = run("eval", *args)
    assert r.exit_code in (1, 2), r.output
    assert r.output == f"Error: {message}\n"
    assert store_snapshot(store) == before


DATA_ERRORS = {
    "malformed JSON": (
        '{"text": "fine", "label": 0}\n{"text": "broken", "label": \n',
        "{data} line 2: not valid JSON (Expecting value)",
    ),
    "row without text": (
        '{"text": "fine", "label": 0}\n\n{"label": 1}\n',
        "{data} line 3: no 'text' (or 'pixels') field",
    ),
    "label outside classes": (
        '{"text": "a", "label": 0}\n{"text": "b", "label": 8}\n',
        "{data} line 2: label 8 is outside the model's 8 classes (0-7)",
    ),
    "unknown label name": (
        '{"text": "a", "label": "cooking"}\n',
        "{data} line 1: label 'cooking' is not one of the model's labels (art, computers, "
        "men-women, people, politics, science, songs-poems, work)",
    ),
}


@pytest.mark.parametrize("case", DATA_ERRORS)
def test_bad_data_names_the_line(run, suite, guarded, tmp_path, case):
    content, message = DATA_ERRORS[case]
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    _fails(run, guarded, [suite / "text" / "base", "-o", "data", data], message.format(data=data))


def test_not_a_loadable_model(run, guarded, tmp_path, models):
    import shutil

    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    shutil.copy(models["base-fp32"] / "model.safetensors", weights_only)
    data = tmp_path / "d.txt"
    data.write_text("hello world\n")
    before = store_snapshot(guarded)
    r = run("eval", weights_only, "-o", "data", data)
    assert r.exit_code == 1
    assert r.output.startswith(
        f"Error: {weights_only} is not a model transformers can load for 'lm': "
    )
    assert r.output.count("\n") == 1
    assert store_snapshot(guarded) == before


def test_task_vector_without_base(run, models, guarded, tmp_path):
    run("apply", "-p", "task-vector", "--base", models["base-fp32"], models["ft1-fp32"], "-n", "tv")
    data = tmp_path / "d.txt"
    data.write_text("hello world\n")
    _fails(
        run,
        guarded,
        ["tv", "-o", "data", data],
        "tv holds a task vector, not a model; give --base BASE to evaluate it added to its base",
    )


def test_missing_data_option(run, suite, guarded):
    _fails(run, guarded, [suite / "text" / "base"], "eval needs -o data PATH")


def test_classify_needs_labels(run, suite, guarded, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\n')
    _fails(
        run,
        guarded,
        [suite / "text" / "base", "-o", "data", data, "-o", "task", "classify"],
        f"{data}: task 'classify' needs a 'label' on every row",
    )
