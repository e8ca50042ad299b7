"""The shared task objects: losses and metrics against direct calculations, and their refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from compressor.errors import InputError
from compressor.learning.data import read_examples
from compressor.learning.tasks import Task, objective_for

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts" / "suite"))
import build as suite_build  # noqa: E402


@pytest.fixture(scope="module")
def classifier():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    suite = suite_build.build(suite_build.SMOKE, quiet=True)
    model_dir = suite / "text" / "experts" / "arts"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    return model, AutoTokenizer.from_pretrained(model_dir), suite / "text" / "data"


def test_metrics_match_a_direct_calculation_at_any_batch_size(classifier):
    model, tok, data = classifier
    rows = read_examples(data / "arts-test.jsonl")
    assert objective_for(rows) == "ce"
    logits, labels = [], []
    with torch.no_grad():
        for e in rows:  # one row at a time: no padding anywhere
            x = tok(e.text, truncation=True, max_length=64, return_tensors="pt")
            logits.append(model(**x).logits[0])
            labels.append(e.label)
    logits, labels = torch.stack(logits), torch.tensor(labels)
    want_acc = float((logits.argmax(-1) == labels).float().mean())
    want_loss = float(torch.nn.functional.cross_entropy(logits, labels))
    probs = logits.softmax(-1)
    want_entropy = float(-(probs * probs.log()).sum(-1).mean())
    for size in (1, 3, 64):
        task = Task("ce", model.config, tok, max_length=64)
        got = task.metrics(lambda x: model(**x).logits, task.split(rows, "arts", size))
        assert got["examples"] == len(rows)
        assert got["accuracy"] == pytest.approx(want_acc)
        assert got["loss"] == pytest.approx(want_loss, rel=1e-4)
        assert task.score(got) == got["accuracy"]
        ent = Task("entropy", model.config, tok, max_length=64)
        got = ent.metrics(lambda x: model(**x).logits, ent.split(rows, "arts", size))
        assert got["entropy"] == pytest.approx(want_entropy, rel=1e-4)
        assert ent.score(got) == -got["entropy"]


def test_batch_loss_is_a_sum_with_its_count(classifier):
    model, tok, data = classifier
    rows = read_examples(data / "arts-test.jsonl")[:5]
    task = Task("ce", model.config, tok, max_length=64)
    x, y = task.batch(task.split(rows, "arts", 8), [4, 0, 2])
    assert y.tolist() == [rows[4].label, rows[0].label, rows[2].label]
    with torch.no_grad():
        total, n = task.loss(model(**x).logits, x, y)
        direct = torch.nn.functional.cross_entropy(model(**x).logits, y, reduction="sum")
    assert n == 3
    assert float(total) == pytest.approx(float(direct), rel=1e-5)


def test_refusals_name_the_file(classifier, tmp_path):
    model, tok, _ = classifier
    text = tmp_path / "lines.txt"
    text.write_text("one line\nanother line\n")
    rows = read_examples(text)
    with pytest.raises(InputError, match=r"^lines: objective 'ce' needs a 'label' on every row$"):
        Task("ce", model.config, tok).split(rows, "lines", 4)
    with pytest.raises(
        InputError, match=r"^unknown objective 'mse' \(one of ce, lm, entropy, agree\)$"
    ):
        Task("mse", model.config, tok)
