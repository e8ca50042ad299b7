"""compress merge --config runs mergekit configs as they are: outputs equal mergekit-yaml's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_refused, dir_tensors

from compressor.app.mergekit import METHODS
from compressor.demo.models import (
    save_fast_tokenizer,
    save_finetune,
    save_stepped_finetune,
    save_tiny_llama,
    save_word_tokenizer,
    zen_lines,
)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """A 4-layer tiny Llama base and three fine-tunes, in one directory (configs use ./NAME)."""
    root = tmp_path_factory.mktemp("zoo")
    base = save_tiny_llama(root / "base", seed=0, layers=4)
    for i in (1, 2, 3):
        save_finetune(base, root / f"e{i}", seed=i)
    return root


def _mergekit_yaml(zoo: Path, config: str, out: Path, *flags: str) -> dict:
    (zoo / "mk.yml").write_text(config)
    exe = Path(sys.executable).with_name("mergekit-yaml")
    r = subprocess.run(
        [str(exe), "mk.yml", str(out), *flags], cwd=zoo, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return dir_tensors(out)


def _ours(run, zoo: Path, config: str, tmp_path: Path, name="m") -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "merge.yml"
    path.write_text(config.replace("./", f"{zoo}/"))
    r = run("--quiet", "merge", "--config", path, "-n", name)
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    assert run("export", name, out).exit_code == 0
    return dir_tensors(out)


SLERP = """
merge_method: slerp
base_model: ./base
models:
  - model: ./base
  - model: ./e1
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
"""

TIES = """
merge_method: ties
base_model: ./base
models:
  - model: ./e1
    parameters: {density: 0.5, weight: 0.7}
  - model: ./e2
    parameters:
      density: [0.2, 0.8]
      weight:
        - filter: mlp
          value: 1.5
        - value: 0.4
  - model: ./base
parameters:
  normalize: true
  int8_mask: true
dtype: float32
"""

MODEL_STOCK = """
merge_method: model_stock
base_model: ./base
models:
  - model: ./e1
  - model: ./e2
  - model: ./e3
parameters:
  filter_wise: false
dtype: float32
"""

PASSTHROUGH = """
slices:
  - sources:
      - model: ./e1
        layer_range: [0, 3]
  - sources:
      - model: ./e2
        layer_range: [1, 4]
merge_method: passthrough
dtype: float32
"""

LINEAR_SLICES = """
slices:
  - sources:
      - model: ./e1
        layer_range: [0, 2]
        parameters: {weight: 0.3}
      - model: ./e2
        layer_range: [2, 4]
        parameters: {weight: 0.7}
  - sources:
      - model: ./e1
        layer_range: [2, 4]
        parameters: {weight: [1, 0]}
      - model: ./e3
        layer_range: [0, 2]
        parameters: {weight: 0.5}
merge_method: linear
dtype: float32
"""


@pytest.mark.parametrize(
    "config",
    [SLERP, TIES, MODEL_STOCK, PASSTHROUGH, LINEAR_SLICES],
    ids=["slerp-gradient", "ties-per-model", "model-stock", "passthrough-slices", "linear-slices"],
)
def test_config_matches_mergekit_yaml(run, zoo, tmp_path, config):
    theirs = _mergekit_yaml(zoo, config, tmp_path / "mk")
    ours = _ours(run, zoo, config, tmp_path)
    assert ours.keys() == theirs.keys()
    off = {}
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype, name
        wrong = int(((ours[name] - theirs[name]).abs() > 1e-5).sum())
        if wrong:
            off[name] = wrong
    # TIES keeps exactly k entries; where the k-th and (k+1)-th largest |τ| are equal (once
    # in these models) mergekit-exact mode takes argsort's one, as mergekit does
    assert off == {}
    mk_config = json.loads((tmp_path / "mk" / "config.json").read_text())
    our_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert our_config["num_hidden_layers"] == mk_config["num_hidden_layers"]


def test_passthrough_frankenmerge_loads_in_transformers(run, zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    ours = _ours(run, zoo, PASSTHROUGH, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 6
    e2 = dir_tensors(zoo / "e2")
    name = "model.layers.5.mlp.up_proj.weight"  # e2's layer 3
    assert torch.equal(ours[name], e2["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(model.state_dict()[name], ours[name])


def test_della_config_keeps_mergekits_statistics_and_our_seed(run, zoo, tmp_path):
    """DELLA is random in both tools: the kept fraction and L1 rescale agree; ours is seeded
    (the same config twice gives the same bytes)."""
    config = """
merge_method: della_linear
base_model: ./base
models:
  - model: ./e1
    parameters: {density: 0.4, epsilon: 0.2, weight: 1.0}
parameters: {lambda: 1.0}
dtype: float32
"""
    theirs = _mergekit_yaml(zoo, config, tmp_path / "mk")
    ours = _ours(run, zoo, config, tmp_path)
    again = _ours(run, zoo, config, tmp_path / "again", name="m2")
    base, e1 = dir_tensors(zoo / "base"), dir_tensors(zoo / "e1")
    name = "model.layers.2.mlp.down_proj.weight"
    tau = e1[name] - base[name]
    for merged in (ours, theirs):
        kept = (merged[name] - base[name]) != 0
        assert abs(kept.float().mean().item() - 0.4) < 0.02
        torch.testing.assert_close(
            (merged[name] - base[name]).abs().sum(), tau.abs().sum(), rtol=1e-3, atol=0
        )
    assert all(torch.equal(ours[n], again[n]) for n in ours)


def test_multi_document_config_runs_stage_by_stage_with_lineage(run, zoo, tmp_path):
    config = f"""
name: soup
merge_method: linear
models:
  - model: {zoo}/e1
    parameters: {{weight: 1}}
  - model: {zoo}/e2
    parameters: {{weight: 1}}
dtype: float32
---
merge_method: slerp
base_model: {zoo}/base
models:
  - model: soup
parameters: {{t: 0.5}}
dtype: float32
"""
    path = tmp_path / "multi.yml"
    path.write_text(config)
    r = run("--quiet", "merge", "--config", path, "-n", "final", "--json")
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["name"] for x in records] == ["soup", "final"]
    soup_id = records[0]["id"]
    assert any(p["id"] == soup_id for p in records[1]["parents"])
    # the same two steps by hand give the same tensors
    assert (
        run("--quiet", "merge", "-p", "linear", zoo / "e1", zoo / "e2", "-n", "s2").exit_code == 0
    )
    assert (
        run("--quiet", "merge", "-p", "slerp", "--base", zoo / "base", "s2", "-n", "f2").exit_code
        == 0
    )
    assert run("export", "final", tmp_path / "a").exit_code == 0
    assert run("export", "f2", tmp_path / "b").exit_code == 0
    a, b = dir_tensors(tmp_path / "a"), dir_tensors(tmp_path / "b")
    assert all(torch.equal(a[n], b[n]) for n in a)


def _refuses(run, store, tmp_path, config: str, message: str, code: int = 2):
    path = tmp_path / "bad.yml"
    path.write_text(config)
    assert_refused(run, store, ["merge", "--config", path], message.format(path=path), code=code)


@pytest.mark.parametrize(
    "config, message",
    [
        (
            "merge_method: ties\nbase_model: B\nmodels: [{model: E1}]\nchat_template: x\n",
            "{path}: chat_template 'x' is neither a template name (alpaca, chatml, exaone, "
            "llama3, mistral, auto) nor a Jinja template",
        ),
        (
            "merge_method: ram\nbase_model: B\nmodels: [{model: E1}]\n",
            "{path}: merge_method 'ram' is not supported (supported: arcee_fusion, breadcrumbs, "
            "breadcrumbs_ties, dare_linear, dare_ties, della, della_linear, iso_c, iso_cts, "
            "karcher, linear, model_stock, multislerp, nearswap, nuslerp, passthrough, sce, "
            "slerp, task_arithmetic, ties, tsv_m, wudi)",
        ),
        (
            "merge_method: slerp\nbase_model: B\nmodels: [{model: E1, parameters: {t: 0.5}}]\n",
            "{path}: models[0]: parameters: parameter 't' applies to the whole merge, not to one "
            "model",
        ),
        (
            "merge_method: ties\nbase_model: B\nmodels: [{model: E1, parameters: {density: 2}}]\n",
            "{path}: models[0]: parameters: parameter 'density' must be in (0, 1]; got '2'",
        ),
        (
            "merge_method: ties\nbase_model: B\nmodels: [{model: E1}]\nslices: []\n",
            "{path}: give exactly one of models or slices",
        ),
        ("merge_method: ties\nmodels: [\n", "{path} is not valid YAML (line 3)"),
        (
            "merge_method: linear\nmodels: [{model: E1}]\n---\nmerge_method: linear\n"
            "models: [{model: E1}]\n",
            "{path} (document 1) needs a name: later stages refer to it by name",
        ),
        (
            "slices:\n  - sources:\n      - {model: E1, layer_range: [2, 1]}\n"
            "merge_method: passthrough\n",
            "{path}: slices[0].sources[0]: layer_range must be [start, end] with 0 <= start < end",
        ),
    ],
    ids=[
        "unknown key",
        "unknown method",
        "shared per model",
        "bad value",
        "models and slices",
        "bad yaml",
        "unnamed stage",
        "bad layer range",
    ],
)
def test_bad_configs_are_refused(run, private_store, tmp_path, config, message):
    code = 1 if "YAML" in message else 2
    _refuses(run, private_store, tmp_path, config, message, code=code)


IGNORED_WEIGHT = {
    "slerp": "base_model: ./base\nparameters: {t: 0.3}\nmodels:\n  - model: ./base\n  - model: ./e1",
    "karcher": "models:\n  - model: ./e1\n  - model: ./e2",
    "model_stock": "base_model: ./base\nmodels:\n  - model: ./e1\n  - model: ./e2",
    "nearswap": "base_model: ./base\nparameters: {t: 0.001}\nmodels:\n  - model: ./e1",
    "sce": "base_model: ./base\nmodels:\n  - model: ./e1\n  - model: ./e2",
    "arcee_fusion": "base_model: ./base\nmodels:\n  - model: ./e1",
}


@pytest.mark.parametrize("method", sorted(IGNORED_WEIGHT))
def test_a_parameter_the_method_ignores_is_a_warning(run, zoo, tmp_path, method):
    """mergekit runs `weight` on these methods and ignores it (9 of its own configs use it);
    we refused them. Now: a warning naming the parameter and the method, and the result
    of the config without it."""
    plain = f"merge_method: {method}\ndtype: float32\n{IGNORED_WEIGHT[method]}\n"
    weighted = plain.replace("model: ./e1", "model: ./e1\n    parameters: {weight: 0.7}")
    assert weighted != plain
    path = tmp_path / "w.yml"
    path.write_text(weighted.replace("./", f"{zoo}/"))
    r = run("--quiet", "merge", "--config", path, "-n", "w")
    assert r.exit_code == 0, r.output
    ours = METHODS[method]
    assert f"Warning: {path}: models[" in r.stderr
    assert f"parameter 'weight' is ignored by {ours}, as in mergekit" in r.stderr
    assert run("export", "w", tmp_path / "w").exit_code == 0
    want = _ours(run, zoo, plain, tmp_path / "plain", name="p")
    got = dir_tensors(tmp_path / "w")
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_a_layer_range_past_the_models_layers_is_refused(run, private_store, zoo, tmp_path):
    """[0, 99] on a 4-layer model wrote num_hidden_layers 99 over 4 layers; transformers
    filled 95 with random weights."""
    config = (
        f"slices:\n  - sources:\n      - {{model: {zoo}/e1, layer_range: [0, 99]}}\n"
        "merge_method: passthrough\n"
    )
    _refuses(
        run,
        private_store,
        tmp_path,
        config,
        f"{{path}}: slices[0].sources[0]: layer_range [0, 99] goes past the last layer of "
        f"{zoo}/e1, which has 4 layers",
    )


def test_slices_of_two_architectures_are_refused(run, private_store, zoo, tmp_path):
    """hidden 64 and hidden 32 stacked into a model that cannot load, exit 0."""
    narrow = save_tiny_llama(tmp_path / "narrow", seed=5, layers=4, hidden=32)
    config = (
        f"slices:\n  - sources:\n      - {{model: {zoo}/e1, layer_range: [0, 2]}}\n"
        f"  - sources:\n      - {{model: {narrow}, layer_range: [2, 4]}}\n"
        "merge_method: passthrough\n"
    )
    _refuses(
        run,
        private_store,
        tmp_path,
        config,
        f"{{path}}: the slices' models differ: lm_head.weight is [512, 64] in "
        f"{zoo}/e1 and [512, 32] in {narrow}",
        code=1,
    )


def test_differing_tokenizers_without_a_source_are_refused(run, private_store, zoo, tmp_path):
    other = shutil.copytree(zoo / "e1", tmp_path / "other")
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zzz-new-token"] = 10_000
    (other / "tokenizer.json").write_text(json.dumps(tok))
    config = f"merge_method: linear\nmodels: [{{model: {zoo}/e1}}, {{model: {other}}}]\n"
    _refuses(
        run,
        private_store,
        tmp_path,
        config,
        "{path}: the models' tokenizers differ (tokenizer.json); set tokenizer_source (base, "
        "union or one of the models) to merge them",
    )


def test_tokenizers_differing_only_in_runtime_settings_are_one_tokenizer(run, zoo, tmp_path):
    """Padding and truncation settings, a max length, a chat template: they do not change
    token ids, and a merge of such models was refused as "the models' tokenizers differ"."""
    other = shutil.copytree(zoo / "e2", tmp_path / "other")
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["padding"] = {"strategy": "BatchLongest", "direction": "Left", "pad_id": 0}
    tok["truncation"] = {"max_length": 77, "strategy": "LongestFirst", "stride": 0}
    (other / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    cfg.update(model_max_length=77, padding_side="left", chat_template="{{ 'x' }}" * 4)
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    config = tmp_path / "c.yml"
    config.write_text(f"merge_method: linear\nmodels: [{{model: {zoo}/e1}}, {{model: {other}}}]\n")
    r = run("--quiet", "merge", "--config", config, "-n", "same")
    assert r.exit_code == 0, r.output
    assert run("export", "same", tmp_path / "out").exit_code == 0
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (
        zoo / "e1" / "tokenizer.json"
    ).read_bytes()  # the first model's tokenizer, as mergekit copies it


@pytest.fixture(scope="module")
def polyglot(tmp_path_factory) -> Path:
    """A tiny Llama base and two fine-tunes whose word-level tokenizers differ: each has
    words the others lack, and all share most of the base's."""
    root = tmp_path_factory.mktemp("polyglot")
    lines = zen_lines()
    base = save_tiny_llama(root / "base", seed=0, layers=2)
    save_finetune(base, root / "e1", seed=1)
    save_word_tokenizer(root / "e1", lines[5:] + ["alpha beta gamma shared"], 512)
    save_finetune(base, root / "e2", seed=2)
    save_word_tokenizer(root / "e2", lines[8:] + ["delta epsilon shared beta"], 512)
    return root


TOKENIZER_CONFIGS = {
    "ties-union": """
merge_method: ties
base_model: ./base
models:
  - model: ./e1
    parameters: {density: 0.5, weight: 0.6}
  - model: ./e2
    parameters: {density: 0.7, weight: 0.4}
tokenizer_source: union
dtype: float32
""",
    "linear-model-tokenizer": """
merge_method: linear
models:
  - model: ./e1
    parameters: {weight: 0.3}
  - model: ./e2
    parameters: {weight: 0.7}
  - model: ./base
    parameters: {weight: 0.5}
tokenizer_source: ./e1
dtype: float32
""",
    "task-arithmetic-base": """
merge_method: task_arithmetic
base_model: ./base
models:
  - model: ./e1
    parameters: {weight: 0.5}
  - model: ./e2
    parameters: {weight: 0.5}
tokenizer_source: base
dtype: float32
""",
    "slices-union-padded": """
slices:
  - sources:
      - {model: ./e1, layer_range: [0, 2], parameters: {weight: 0.3}}
      - {model: ./base, layer_range: [0, 2], parameters: {weight: 0.7}}
  - sources:
      - {model: ./e2, layer_range: [0, 2], parameters: {weight: 0.6}}
      - {model: ./e1, layer_range: [0, 2], parameters: {weight: 0.4}}
merge_method: linear
tokenizer: {source: union, pad_to_multiple_of: 64}
dtype: float32
""",
}


def _by_token(tensors: dict, vocab: dict[str, int], tokens: list[str]) -> dict:
    """Token-indexed tensors reordered by token (the tools may number tokens differently),
    padding rows kept after them."""
    order = torch.tensor([vocab[t] for t in tokens])
    out = {}
    for name, t in tensors.items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            t = torch.cat([t[order], t[len(vocab) :]])
        out[name] = t
    return out


@pytest.mark.parametrize("config", list(TOKENIZER_CONFIGS))
def test_differing_tokenizers_match_mergekit_yaml(run, polyglot, tmp_path, config):
    """Every row of every tensor equals mergekit's, token by token; the output's tokenizer
    has mergekit's tokens and config.json its vocab_size; transformers loads both."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = TOKENIZER_CONFIGS[config]
    theirs = _mergekit_yaml(polyglot, text, tmp_path / "mk")
    ours = _ours(run, polyglot, text, tmp_path)
    mk_vocab = AutoTokenizer.from_pretrained(tmp_path / "mk").get_vocab()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    our_vocab = tokenizer.get_vocab()
    assert set(our_vocab) == set(mk_vocab)
    tokens = sorted(mk_vocab)
    theirs, ours = _by_token(theirs, mk_vocab, tokens), _by_token(ours, our_vocab, tokens)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].shape == theirs[name].shape, name
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-5, msg=name)
    mk_config = json.loads((tmp_path / "mk" / "config.json").read_text())
    our_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert our_config["vocab_size"] == mk_config["vocab_size"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = tokenizer("beautiful is better than ugly alpha", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == our_config["vocab_size"]
    record = json.loads(run("store", "show", "m", "--json").stdout)
    wanted = {"ties-union": "union", "linear-model-tokenizer": f"{polyglot}/e1"}
    wanted |= {"task-arithmetic-base": "base", "slices-union-padded": "union"}
    assert record["manifest"]["tokenizer_source"] == wanted[config]


def test_union_rows_follow_mergekits_rule_by_hand(run, polyglot, tmp_path):
    """A linear merge over the union, computed by hand: a token only e1 has gets e1's row in
    both models, so the merge keeps it; a shared token mixes each model's own row."""
    from transformers import AutoTokenizer

    config = """
merge_method: linear
models:
  - model: ./e1
    parameters: {weight: 0.25}
  - model: ./e2
    parameters: {weight: 0.75}
tokenizer_source: union
dtype: float32
"""
    ours = _ours(run, polyglot, config, tmp_path)
    out = AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()
    v1 = AutoTokenizer.from_pretrained(polyglot / "e1").get_vocab()
    v2 = AutoTokenizer.from_pretrained(polyglot / "e2").get_vocab()
    e1, e2 = dir_tensors(polyglot / "e1"), dir_tensors(polyglot / "e2")
    name = "model.embed_tokens.weight"
    assert "alpha" in v1 and "alpha" not in v2 and "delta" in v2 and "delta" not in v1
    assert torch.allclose(ours[name][out["alpha"]], e1[name][v1["alpha"]], atol=1e-6)
    assert torch.allclose(ours[name][out["delta"]], e2[name][v2["delta"]], atol=1e-6)
    mixed = 0.25 * e1[name][v1["shared"]] + 0.75 * e2[name][v2["shared"]]
    assert torch.allclose(ours[name][out["shared"]], mixed, atol=1e-6)
    assert ours[name].shape[0] == len(out) == len(set(v1) | set(v2))


@pytest.mark.parametrize(
    "config, message",
    [
        (
            "merge_method: linear\nmodels: [{model: ./e1}, {model: ./e2}]\n"
            "tokenizer_source: /nowhere/other\n",
            "{path}: tokenizer_source '/nowhere/other' is not one of the models",
        ),
        (
            "merge_method: linear\nmodels: [{model: ./e1}, {model: ./e2}]\n"
            "tokenizer: {source: union, tokens: {x: {source: ./e1}}}\n",
            "{path}: tokenizer: key 'tokens' is not supported by compress merge --config",
        ),
        (
            "merge_method: linear\nmodels: [{model: ./e1}, {model: ./e2}]\n"
            "tokenizer: {pad_to_multiple_of: 0}\n",
            "{path}: tokenizer.pad_to_multiple_of must be a positive integer",
        ),
        (
            "merge_method: linear\nmodels: [{model: ./e1}, {model: ./e2}]\n"
            "tokenizer: {source: union}\ntokenizer_source: base\n",
            "{path}: give tokenizer_source or tokenizer, not both",
        ),
    ],
    ids=["unknown model", "tokens", "bad padding", "both keys"],
)
def test_bad_tokenizer_settings_are_refused(
    run, private_store, polyglot, tmp_path, config, message
):
    _refuses(run, private_store, tmp_path, config.replace("./", f"{polyglot}/"), message)


def test_config_and_plugin_together_are_refused(run, private_store, tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("merge_method: linear\nmodels: [{model: E1}]\n")
    run("store", "ls")
    r = run("merge", "--config", path, "-p", "ties")
    assert r.exit_code == 2
    assert r.output.strip().endswith("--config takes no --plugin: the config says them")


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "beautiful is better"},
    {"role": "assistant", "content": "than ugly"},
    {"role": "user", "content": "explicit?"},
]
LITERAL = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


@pytest.mark.parametrize("template", ["chatml", "llama3", "alpaca", "mistral", "literal"])
def test_chat_template_renders_as_mergekit_yaml_writes_it(run, zoo, tmp_path, template):
    """chat_template was refused (6 of the 15 refused real configs set it)."""
    from transformers import AutoTokenizer

    value = json.dumps(LITERAL) if template == "literal" else template
    config = (
        f"merge_method: linear\nchat_template: {value}\ndtype: float32\n"
        "models:\n  - model: ./e1\n    parameters: {weight: 0.5}\n"
        "  - model: ./e2\n    parameters: {weight: 0.5}\n"
    )
    _mergekit_yaml(zoo, config, tmp_path / "mk")
    _ours(run, zoo, config, tmp_path / "ours")
    conversation = CONVERSATION[1:] if template == "mistral" else CONVERSATION
    want, got = (
        AutoTokenizer.from_pretrained(d).apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        for d in (tmp_path / "mk", tmp_path / "ours" / "out")
    )
    assert got == want and "beautiful is better" in got


def test_chat_template_auto_takes_the_template_most_models_carry(run, zoo, tmp_path):
    models = {}
    for name, template in (("a", LITERAL), ("b", LITERAL), ("c", "{{ 'other' }}" * 3)):
        models[name] = shutil.copytree(zoo / "e1", tmp_path / name)
        path = models[name] / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": template}))
    config = tmp_path / "auto.yml"
    config.write_text(
        "merge_method: linear\nchat_template: auto\ndtype: float32\nmodels:\n"
        + "".join(f"  - model: {models[n]}\n" for n in ("c", "a", "b"))
    )
    r = run("--quiet", "merge", "--config", config, "-n", "auto")
    assert r.exit_code == 0, r.output
    assert run("export", "auto", tmp_path / "out").exit_code == 0
    saved = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == LITERAL.strip()


def test_model_plus_lora_equals_mergekit_yaml(run, zoo, tmp_path):
    """model+lora references were refused (3 of the 15 refused real configs)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(zoo / "e1"), lora_config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(zoo / "lora")
    config = """
merge_method: linear
dtype: float32
models:
  - model: ./e1+./lora
    parameters: {weight: 0.6}
  - model: ./e2
    parameters: {weight: 0.4}
"""
    cache = str(tmp_path / "lora-cache")
    want = _mergekit_yaml(zoo, config, tmp_path / "mk", "--lora-merge-cache", cache)
    got = _ours(run, zoo, config, tmp_path / "ours")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=2e-6, msg=name)
    plain = _ours(run, zoo, config.replace("+./lora", ""), tmp_path / "plain", name="p")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (got[q] - plain[q]).abs().max() > 1e-3  # the adapter is in the merge
    log = json.loads(run("store", "log", "m", "--json").stdout)
    assert [p["label"] for p in log["parents"]] == [f"{zoo}/e1", f"{zoo}/e2", f"{zoo}/lora"]


def test_a_hub_model_at_a_revision_comes_from_that_snapshot(run, zoo, tmp_path, monkeypatch):
    """`revision` (model: org/name@rev, or the mapping form) was refused."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    for commit, src in (("a" * 40, "e1"), ("b" * 40, "e2")):
        shutil.copytree(zoo / src, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "refs" / "v2").write_text("b" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    body = "merge_method: linear\ndtype: float32\nmodels:\n  - model: {model}\n  - model: ./e3\n"
    at_rev = _ours(run, zoo, body.format(model="org/tiny@v2"), tmp_path / "rev", name="r")
    mapping = "{model: {path: org/tiny, revision: v2}}"
    as_map = _ours(run, zoo, body.format(model=mapping), tmp_path / "map", name="q")
    direct = _ours(run, zoo, body.format(model="./e2"), tmp_path / "dir", name="d")
    main = _ours(run, zoo, body.format(model="org/tiny"), tmp_path / "main", name="n")
    assert all(
        torch.equal(at_rev[n], direct[n]) and torch.equal(as_map[n], direct[n]) for n in direct
    )
    assert not all(torch.equal(main[n], direct[n]) for n in direct)
    path = tmp_path / "missing.yml"
    path.write_text(body.format(model="org/tiny@v9"))
    r = run("--quiet", "merge", "--config", path)
    assert r.exit_code == 1
    assert r.output == (
        "Error: 'org/tiny' at revision v9 is neither a path nor in the Hugging Face cache "
        "(HF_HUB_CACHE or HF_HOME); download it first, e.g. `hf download org/tiny "
        "--revision v9`; compressor never downloads\n"
    )


def test_modules_merge_each_module_with_its_own_parameters(run, tmp_path):
    """`modules` was refused (1 of the 15 refused real configs, a vision-language merge):
    each module's parameters apply under its weight prefix, and a gradient runs over
    that module's own layers (vision: 2, text: 4)."""
    from safetensors.torch import save_file

    def model(seed):
        g = torch.Generator().manual_seed(seed)
        tensors = {
            f"language_model.model.layers.{i}.mlp.weight": torch.randn(4, 4, generator=g)
            for i in range(4)
        }
        tensors |= {
            f"vision_tower.vision_model.layers.{i}.fc.weight": torch.randn(3, 3, generator=g)
            for i in range(2)
        }
        path = tmp_path / f"m{seed}.safetensors"
        save_file(tensors, path)
        return path, tensors

    (p1, t1), (p2, t2) = model(1), model(2)
    config = tmp_path / "modules.yml"
    config.write_text(
        f"""
merge_method: linear
dtype: float32
modules:
  text_decoder:
    models:
      - {{model: {p1}, parameters: {{weight: 0.3}}}}
      - {{model: {p2}, parameters: {{weight: 0.7}}}}
  vision_tower:
    models:
      - {{model: {p2}, parameters: {{weight: 1}}}}
      - {{model: {p1}, parameters: {{weight: [0, 1]}}}}
"""
    )
    r = run("--quiet", "merge", "--config", config, "-n", "vl")
    assert r.exit_code == 0, r.output
    assert run("export", "vl", tmp_path / "vl.safetensors").exit_code == 0
    from safetensors.torch import load_file

    got = load_file(tmp_path / "vl.safetensors")
    for i in range(4):
        name = f"language_model.model.layers.{i}.mlp.weight"
        torch.testing.assert_close(got[name], 0.3 * t1[name] + 0.7 * t2[name])
    for i, w1 in ((0, 0.0), (1, 1.0)):  # t over the vision tower's two layers: 0, then 1
        name = f"vision_tower.vision_model.layers.{i}.fc.weight"
        torch.testing.assert_close(got[name], (w1 * t1[name] + t2[name]) / (w1 + 1))
    config.write_text(
        config.read_text().replace(
            f"model: {p1}, parameters: {{weight: [0", "model: ./x, parameters: {weight: [0"
        )
    )
    r = run("--quiet", "merge", "--config", config)
    assert (r.exit_code, r.output) == (
        2,
        f"Error: {config}: modules.vision_tower: every module must merge the same models\n",
    )


@pytest.fixture(scope="module")
def padded(tmp_path_factory) -> Path:
    """mergekit's padded-tokenizer case: a BPE tokenizer of 100 tokens and 20 added ones
    over a model of 100 embedding rows (tokens 100-119 have no row), and a fine-tune."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("padded")
    base = save_tiny_llama(root / "base", seed=0, layers=2, vocab=100)
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    tok.train_from_iterator(
        zen_lines(), trainers.BpeTrainer(vocab_size=100, special_tokens=specials)
    )
    tok.add_tokens([f"<extra_{i}>" for i in range(20)])
    assert tok.get_vocab_size() == 120
    for f in base.glob("*token*"):
        f.unlink()
    save_fast_tokenizer(base, tok)
    save_finetune(base, root / "ft", seed=1)
    return root


@pytest.mark.parametrize("source", ["base", "union"])
def test_a_tokenizer_padded_past_the_embeddings_merges_as_mergekit_yaml(
    run, padded, tmp_path, source
):
    """Refused before ("tokens at or past its vocab_size ... not supported"); mergekit cuts
    the base's tokenizer back to its embedding rows."""
    from transformers import AutoTokenizer

    text = (
        f"merge_method: linear\nbase_model: ./base\ntokenizer_source: {source}\ndtype: float32\n"
        "models:\n  - model: ./base\n    parameters: {weight: 0.4}\n"
        "  - model: ./ft\n    parameters: {weight: 0.6}\n"
    )
    theirs = _mergekit_yaml(padded, text, tmp_path / "mk")
    ours = _ours(run, padded, text, tmp_path)
    mk_vocab = AutoTokenizer.from_pretrained(tmp_path / "mk").get_vocab()
    our_vocab = AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()
    assert set(our_vocab) == set(mk_vocab) and len(our_vocab) == 100
    tokens = sorted(mk_vocab)
    theirs, ours = _by_token(theirs, mk_vocab, tokens), _by_token(ours, our_vocab, tokens)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-5, msg=name)


def test_a_linear_of_the_base_alone_is_the_base(run, zoo, tmp_path):
    """`linear` whose only model is the base failed ("needs at least 1 expert"); mergekit
    returns that model."""
    text = (
        "merge_method: linear\nbase_model: ./base\ndtype: float32\n"
        "models:\n  - model: ./base\n    parameters: {weight: 0.5}\n"
    )
    theirs = _mergekit_yaml(zoo, text, tmp_path / "mk")
    ours = _ours(run, zoo, text, tmp_path)
    base = dir_tensors(zoo / "base")
    assert ours.keys() == theirs.keys() == base.keys()
    assert all(torch.equal(ours[n], base[n]) and torch.equal(theirs[n], base[n]) for n in base)


def test_a_padded_model_as_the_tokenizer_source_keeps_its_tokens(run, padded, tmp_path):
    """mergekit-yaml fails on this one (KeyError in its permutation); ours keeps the
    source's 120 tokens, rows 100-119 zero (no model has them: mergekit's rule)."""
    text = (
        "merge_method: linear\nbase_model: ./base\ntokenizer_source: ./ft\ndtype: float32\n"
        "models:\n  - model: ./base\n    parameters: {weight: 0.4}\n"
        "  - model: ./ft\n    parameters: {weight: 0.6}\n"
    )
    ours = _ours(run, padded, text, tmp_path)
    base, ft = dir_tensors(padded / "base"), dir_tensors(padded / "ft")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert ours[name].shape[0] == 120
        want = 0.4 * base[name] + 0.6 * ft[name]
        torch.testing.assert_close(ours[name][:100], want, rtol=0, atol=1e-6)
        assert not ours[name][100:].any()


@pytest.fixture(scope="module")
def adamw_bf16(tmp_path_factory) -> Path:
    """A bf16 tiny Llama and three fine-tunes whose updates are whole multiples of 1e-3
    (AdamW's early steps): thousands of entries share a magnitude, so tie order shows."""
    root = tmp_path_factory.mktemp("adamw")
    base = save_tiny_llama(root / "base", seed=0, layers=2, dtype=torch.bfloat16)
    for i in (1, 2, 3):
        save_stepped_finetune(base, root / f"e{i}", seed=i)
    return root


BF16_CONFIGS = {
    "ties": "parameters: {density: 0.5, weight: 1.0}\nmodels: [e1, e2, e3]",
    "breadcrumbs_ties": "parameters: {density: 0.6, gamma: 0.02, weight: 1.0}\nmodels: [e1, e2]",
    "task_arithmetic": "parameters: {weight: 0.7}\nmodels: [e1, e2, e3]",
    "sce": "parameters: {select_topk: 0.5}\nmodels: [e1, e2, e3]",
    "model_stock": "models: [e1, e2, e3]",
    "arcee_fusion": "models: [e1, base]",
    "nearswap": "parameters: {t: 0.001}\nmodels: [e1, base]",
}


@pytest.mark.parametrize("method", sorted(BF16_CONFIGS))
def test_bf16_configs_equal_mergekit_yaml_bit_for_bit(run, adamw_bf16, tmp_path, method):
    """mergekit computes in the config's dtype and picks trims by argsort; we computed in
    float32: arcee_fusion picked differently on ~10% of entries, TIES-family merges on up to
    1.2%. mergekit-exact mode (the default for configs) gives mergekit's bits; the key
    mergekit_exact: false gives float32 arithmetic, which differs."""
    *params, models = BF16_CONFIGS[method].split("\n")
    names = models.removeprefix("models: [").removesuffix("]").split(", ")
    text = (
        f"merge_method: {method}\nbase_model: ./base\ndtype: bfloat16\n"
        + "".join(f"{p}\n" for p in params)
        + "models:\n"
        + "".join(f"  - model: ./{n}\n" for n in names)
    )
    theirs = _mergekit_yaml(adamw_bf16, text, tmp_path / "mk")
    ours = _ours(run, adamw_bf16, text, tmp_path / "exact")
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name].dtype == torch.bfloat16
        if method == "arcee_fusion":  # mergekit writes it in float32 (its mask's dtype)
            theirs[name] = theirs[name].to(torch.bfloat16)
        assert torch.equal(ours[name], theirs[name]), name
    loose = _ours(run, adamw_bf16, text + "mergekit_exact: false\n", tmp_path / "loose", "l")
    assert any(not torch.equal(loose[n], theirs[n]) for n in theirs)
