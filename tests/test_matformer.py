"""MatFormer extraction: slicing, importance order, skipped layers, architectures, errors."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import artifact_tensors, assert_refused, dir_tensors

TEXT = ["the quick brown fox jumps over the lazy dog", "errors should never pass silently"]


def _tiny(kind: str, path: Path) -> Path:
    """A tiny randomly initialised model of one supported architecture, saved for transformers."""
    import transformers as tf

    torch.manual_seed(0)
    small = dict(vocab_size=128, pad_token_id=0, max_position_embeddings=64)
    if kind == "gpt2":
        model = tf.GPT2LMHeadModel(
            tf.GPT2Config(
                vocab_size=128, n_embd=32, n_layer=3, n_head=2, bos_token_id=0, eos_token_id=0
            )
        )
    elif kind == "roberta":
        cfg = tf.RobertaConfig(
            **{**small, "pad_token_id": 1},
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=64,
        )
        model = tf.RobertaModel(cfg)
    elif kind == "vit":
        cfg = tf.ViTConfig(
            image_size=16,
            patch_size=4,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=3,
        )
        model = tf.ViTForImageClassification(cfg)
    elif kind == "gemma3n_text":
        cfg = tf.Gemma3nTextConfig(
            **small,
            vocab_size_per_layer_input=128,
            hidden_size=32,
            hidden_size_per_layer_input=4,
            intermediate_size=[64] * 6,
            num_hidden_layers=6,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
            sliding_window=8,
            num_kv_shared_layers=2,  # layers 4-5 reuse the KV that layers 2-3 store
            laurel_rank=4,
            altup_num_inputs=2,
            activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.0, 0.0],
        )
        model = tf.Gemma3nForCausalLM(cfg)
    else:  # the Llama family
        cfg = tf.AutoConfig.for_model(
            kind,
            **small,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
        )
        model = tf.AutoModelForCausalLM.from_config(cfg)
    model.eval().save_pretrained(path)
    return path


def _outputs(path: Path, kind: str) -> torch.Tensor:
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(path)
    model = getattr(tf, config.architectures[0]).from_pretrained(path).eval()
    torch.manual_seed(1)
    if kind == "vit":
        x = {"pixel_values": torch.randn(2, 3, 16, 16)}
    else:
        x = {"input_ids": torch.randint(2, 128, (2, 12))}
    with torch.no_grad():
        return model(**x)[0]


def _extract(run, model, *options, name="sub"):
    """Run the extraction; its record as ``store show --json`` gives it (with the manifest)."""
    r = run("--quiet", "extract", "-p", "matformer", model, *options, "-n", name)
    assert r.exit_code == 0, r.output
    r = run("store", "show", name, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _export(run, name, out: Path) -> Path:
    r = run("--quiet", "export", name, out)
    assert r.exit_code == 0, r.output
    return out


ARCHITECTURES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "gemma3n_text",
    "roberta",
    "vit",
    "gpt2",
]


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_every_architecture_keeps_its_function_at_full_width_and_loads_cut(run, kind, tmp_path):
    src = _tiny(kind, tmp_path / "src")
    want = _outputs(src, kind)
    _extract(run, src, "-o", "ffn_ratio", "1.0", "-o", "order", "weight", name="full")
    got = _outputs(_export(run, "full", tmp_path / "full"), kind)
    assert (got - want).abs().max() < 1e-5
    rec = _extract(run, src, "-o", "ffn_ratio", "0.5", name="half")
    out = _export(run, "half", tmp_path / "half")
    config = json.loads((out / "config.json").read_text())
    key = "n_inner" if kind == "gpt2" else "intermediate_size"
    expected = {"gemma3n_text": [32] * 6, "gpt2": 64}.get(kind, 32)  # GPT-2: d_ff = 4·32
    assert config[key] == expected
    assert _outputs(out, kind).shape == want.shape  # loads in transformers and runs
    assert rec["metrics"]["params"] == sum(t.numel() for t in dir_tensors(out).values())


def test_minilm_full_width_in_importance_order_gives_the_same_embeddings(run, minilm, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm["base"])
    x = tok(TEXT, padding=True, return_tensors="pt")

    real = x["attention_mask"].bool()  # padded positions are not outputs

    def hidden(path):
        with torch.no_grad():
            return AutoModel.from_pretrained(path).eval()(**x).last_hidden_state[real]

    want = hidden(minilm["base"])
    for order in ("none", "weight"):
        _extract(run, minilm["base"], "-o", "ffn_ratio", "1", "-o", "order", order, name=order)
        got = hidden(_export(run, order, tmp_path / order))
        assert (got - want).abs().max() < 1e-5, order


def test_prefix_slice_and_weight_order_match_an_independent_calculation(run, models, tmp_path):
    src = models["base-fp32"]
    base = dir_tensors(src)
    d_ff = base["model.layers.0.mlp.up_proj.weight"].shape[0]
    m = d_ff // 4
    for order in ("none", "weight"):
        rec = _extract(run, src, "-o", "ffn_ratio", "0.25", "-o", "order", order, name=order)
        got = dir_tensors(_export(run, order, tmp_path / order))
        for i in range(2):
            p = f"model.layers.{i}.mlp."
            gate, up, down = (base[p + f"{k}_proj.weight"] for k in ("gate", "up", "down"))
            if order == "none":
                keep = torch.arange(m)
            else:
                fed = (gate.square().sum(1) + up.square().sum(1)).sqrt()
                score = fed * down.square().sum(0).sqrt()
                keep = torch.argsort(score, descending=True)[:m]
                assert rec["manifest"]["permutation"][str(i)][:m] == keep.tolist()
            assert torch.equal(got[p + "gate_proj.weight"], gate[keep])
            assert torch.equal(got[p + "up_proj.weight"], up[keep])
            assert torch.equal(got[p + "down_proj.weight"], down[:, keep])
        others = [n for n in base if ".mlp." not in n]
        assert all(torch.equal(got[n], base[n]) for n in others)


def test_activation_order_sorts_by_mean_activation_times_output_norm(run, minilm, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    data = tmp_path / "calib.txt"
    data.write_text("\n".join(TEXT * 3) + "\n")
    rec = _extract(
        run,
        minilm["base"],
        "-o",
        "ffn_ratio",
        "0.5",
        "-o",
        "order",
        "activation",
        "-o",
        "data",
        data,
        "-o",
        "batch_size",
        "4",
        name="act",
    )
    # independent: the intermediate module's output over the real tokens of each row
    model = AutoModel.from_pretrained(minilm["base"]).eval()
    tok = AutoTokenizer.from_pretrained(minilm["base"])
    layer = model.encoder.layer[2]
    seen = []
    handle = layer.intermediate.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        for text in TEXT * 3:  # one row at a time: no padding
            model(**tok([text], return_tensors="pt"))
    handle.remove()
    h = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).abs().mean(0)
    score = h * layer.output.dense.weight.detach().square().sum(0).sqrt()
    want = torch.argsort(score, descending=True)
    got = torch.tensor(rec["manifest"]["permutation"]["2"])
    assert torch.equal(got[:768].sort().values, want[:768].sort().values)


def test_skipping_layers_equals_deleting_them_from_the_model(run, tmp_path):
    import transformers as tf

    src = _tiny("llama", tmp_path / "src")
    _extract(run, src, "-o", "skip_layers", "1", name="skip")
    out = _export(run, "skip", tmp_path / "skip")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    got = dir_tensors(out)
    base = dir_tensors(src)
    assert torch.equal(
        got["model.layers.1.mlp.up_proj.weight"], base["model.layers.2.mlp.up_proj.weight"]
    )
    assert not any(n.startswith("model.layers.2.") for n in got)
    # independent: the source model with its layer 1 deleted in memory
    ref = tf.AutoModelForCausalLM.from_pretrained(src).eval()
    del ref.model.layers[1]
    for i, layer in enumerate(ref.model.layers):
        layer.self_attn.layer_idx = i
    x = torch.randint(2, 128, (2, 12))
    with torch.no_grad():
        want = ref(input_ids=x, use_cache=False).logits
        cut = tf.AutoModelForCausalLM.from_pretrained(out).eval()
        assert (cut(input_ids=x, use_cache=False).logits - want).abs().max() < 1e-5


def test_gemma3n_mix_n_match_widths_and_skipped_layers(run, tmp_path):
    src = _tiny("gemma3n_text", tmp_path / "src")
    rec = _extract(
        run,
        src,
        "-o",
        "skip_layers",
        "1",
        "-o",
        "widths",
        "8,16,32,64,64",
        "-o",
        "order",
        "weight",
        name="e2b",
    )
    out = _export(run, "e2b", tmp_path / "e2b")
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == [8, 16, 32, 64, 64]
    assert config["num_hidden_layers"] == 5
    assert config["activation_sparsity_pattern"] == [0.95, 0.0, 0.0, 0.0, 0.0]
    assert len(config["layer_types"]) == 5
    got, base = dir_tensors(out), dir_tensors(src)
    per = base["model.embed_tokens_per_layer.weight"]
    keep = torch.cat([torch.arange(i * 4, i * 4 + 4) for i in (0, 2, 3, 4, 5)])
    assert torch.equal(got["model.embed_tokens_per_layer.weight"], per[:, keep])
    proj = base["model.per_layer_model_projection.weight"]
    assert torch.equal(got["model.per_layer_model_projection.weight"], proj[keep])
    assert _outputs(out, "gemma3n_text").shape == (2, 12, 128)
    assert rec["metrics"]["layers"] == 5


def test_target_params_picks_the_largest_fitting_widths(run, minilm, tmp_path):
    src = _tiny("gemma3n_text", tmp_path / "src")
    full = _extract(run, src, "-o", "ffn_ratio", "1", name="full")["metrics"]["params"]
    eighth = _extract(run, src, "-o", "ffn_ratio", "0.125", name="eighth")["metrics"]["params"]
    target = (full + eighth) // 2
    rec = _extract(run, src, "-o", "target_params", target, name="fit")
    widths = rec["manifest"]["widths"]
    assert widths == sorted(widths) and set(widths) <= {8, 16, 32, 64}
    assert rec["metrics"]["params"] <= target
    # independent: every other non-decreasing choice that fits has no more parameters
    per_neuron = (full - eighth) // (6 * (64 - 8))
    fixed = full - per_neuron * 6 * 64
    best = max(
        fixed + per_neuron * sum(seq)
        for seq in itertools.combinations_with_replacement((8, 16, 32, 64), 6)
        if fixed + per_neuron * sum(seq) <= target
    )
    assert rec["metrics"]["params"] == best
    # one integer intermediate_size (BERT): one width for all layers
    rec = _extract(run, minilm["base"], "-o", "target_params", 20_000_000, name="bert")
    assert set(rec["manifest"]["widths"]) == {768}  # 1536 is too big, 768 fits


def test_bad_inputs(run, private_store, minilm, tmp_path):
    src = _tiny("gemma3n_text", tmp_path / "g3n")
    bert = str(minilm["base"])
    ext = ["extract", "-p", "matformer"]
    assert_refused(
        run,
        private_store,
        [*ext, bert, "-o", "ffn_ratio", "0"],
        "option 'ffn_ratio' must be in (0, 1]; got '0'",
        code=2,
    )
    assert_refused(
        run,
        private_store,
        [*ext, bert, "-o", "ffn_ratio", "1.5"],
        "option 'ffn_ratio' must be in (0, 1]; got '1.5'",
        code=2,
    )
    assert_refused(
        run,
        private_store,
        [*ext, bert, "-o", "widths", "768,768"],
        "widths lists 2 widths; the extracted model has 6 layers (one width per kept layer)",
        code=2,
    )
    assert_refused(
        run,
        private_store,
        [*ext, src, "-o", "widths", "8,8,8,8,8,65"],
        "width 65 of layer 5 is outside 1..64 (its d_ff)",
        code=2,
    )
    assert_refused(
        run,
        private_store,
        [*ext, bert, "-o", "skip_layers", "0,1,2,3,4,5"],
        "skip_layers drops all 6 layers; keep at least one",
        code=2,
    )
    assert_refused(
        run,
        private_store,
        [*ext, src, "-o", "skip_layers", "3"],
        "layer 3 takes part in Gemma 3n's KV sharing (its KV is read by later layers) "
        "and cannot be skipped; layers 2-5 must stay",
        code=2,
    )
    assert_refused(
        run,
        private_store,
        [*ext, bert, "-o", "widths", "768,768,768,768,768,1536"],
        "bert takes one intermediate_size for all layers; widths must be equal "
        "(got 768, 768, 768, 768, 768, 1536)",
        code=2,
    )
    assert_refused(
        run,
        private_store,
        [*ext, bert, "-o", "order", "activation", "-o", "ffn_ratio", "0.5"],
        "order activation needs -o data PATH (calibration rows)",
        code=2,
    )
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5"}))
    from safetensors.torch import save_file

    save_file({"shared.weight": torch.zeros(4, 4)}, t5 / "model.safetensors")
    assert_refused(
        run,
        private_store,
        [*ext, t5, "-o", "ffn_ratio", "0.5"],
        f"matformer does not know the architecture 't5' of {t5}; supported: bert, gemma, "
        "gemma2, gemma3_text, gemma3n, gemma3n_text, gpt2, llama, mistral, phi3, qwen2, "
        "qwen3, roberta, vit",
    )


@pytest.fixture(scope="module")
def suite_text():
    import sys

    sys.path.insert(0, str(Path(__file__).parent.parent / "scripts" / "suite"))
    import build as suite_build

    return suite_build.build(suite_build.SMOKE, quiet=True) / "text"


def test_masking_neurons_is_what_extraction_computes(run, suite_text, tmp_path):
    """Nested training masks the neurons past d_ff·g; the cut model at g computes the same."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from compressor.io.sources import open_model_dir
    from compressor.models.architectures import FfnModel as Model
    from compressor.plugins.matformer import MaskedWidths

    base = suite_text / "base"
    _extract(run, base, "-o", "ffn_ratio", "0.25", name="q")
    cut = AutoModelForSequenceClassification.from_pretrained(_export(run, "q", tmp_path / "q"))
    full = AutoModelForSequenceClassification.from_pretrained(base).eval()
    tok = AutoTokenizer.from_pretrained(base)
    x = tok(TEXT, padding=True, return_tensors="pt")
    with open_model_dir(base) as source:
        masks = MaskedWidths(full, Model(source))
    masks.g = 0.25
    with torch.no_grad():
        assert (full(**x).logits - cut.eval()(**x).logits).abs().max() < 1e-5
        masks.remove()
        assert (full(**x).logits - cut(**x).logits).abs().max() > 1e-3


def test_nested_training_makes_the_quarter_width_work(run, models, tmp_path):
    """Same budget, same data: trained nested, the quarter-width cut predicts text better."""
    from compressor.demo.models import zen_lines

    data = tmp_path / "zen.txt"
    data.write_text("\n".join(zen_lines()) + "\n")
    common = ["-o", "data", data, "-o", "steps", "30", "-o", "lr", "3e-3", "-o", "batch_size", "8"]
    for name, grans in (("nested", "0.25,1"), ("plain", "1")):
        r = run(
            "--quiet",
            "train",
            "-p",
            "matformer-train",
            models["base-fp32"],
            *common,
            "-o",
            "granularities",
            grans,
            "-n",
            name,
        )
        assert r.exit_code == 0, r.output
    nested = json.loads(run("store", "show", "nested", "--json").stdout)["metrics"]
    assert nested["loss_last_0.25"] < nested["loss_first_0.25"]
    assert nested["loss_last_1"] < nested["loss_first_1"]
    loss = {}
    for name in ("nested", "plain"):
        _extract(run, name, "-o", "ffn_ratio", "0.25", name=f"{name}-q")
        r = run("--quiet", "eval", f"{name}-q", "-o", "data", data, "--json")
        loss[name] = json.loads(r.stdout.splitlines()[-1])["loss"]
    assert loss["nested"] < loss["plain"]


def test_train_bad_inputs(run, private_store, suite_text, minilm, tmp_path):
    train = ["train", "-p", "matformer-train"]
    data = suite_text / "data" / "all-train.jsonl"
    assert_refused(
        run,
        private_store,
        [*train, suite_text / "base"],
        "matformer-train needs -o data PATH",
        code=2,
    )
    assert_refused(
        run,
        private_store,
        [*train, suite_text / "base", "-o", "data", data, "-o", "granularities", "0,1"],
        "option 'granularities' must be fractions in (0, 1]; got '0,1'",
        code=2,
    )
    assert_refused(
        run,
        private_store,
        [*train, minilm["base"], "-o", "data", data],
        f"{minilm['base']} is a BertModel; labelled rows need a classification head",
    )


@pytest.mark.parametrize("kind", ["llama", "minilm"])
def test_blockwise_calibration_equals_the_whole_model(kind, models, minilm, tmp_path):
    """Layer by layer with one layer in memory gives the whole model's activation scores."""
    from compressor.io.sources import open_model_dir
    from compressor.models.architectures import FfnModel
    from compressor.models.blockwise import supports
    from compressor.plugins.matformer import activation_importance

    path = {"llama": models["base-fp32"], "minilm": minilm["base"]}[kind]
    data = tmp_path / "calib.txt"
    data.write_text("\n".join(TEXT * 2) + "\n")
    opts = {"data": str(data), "batch_size": 3, "max_length": 32}

    class Job:
        progress = staticmethod(lambda it, **kw: it)

    with open_model_dir(path) as source:
        layout = FfnModel(source)
        assert supports(layout)
        whole = activation_importance(layout, opts, Job, blockwise=False)
        layered = activation_importance(layout, opts, Job, blockwise=True)
    assert whole.keys() == layered.keys()
    for i in whole:
        torch.testing.assert_close(layered[i], whole[i], rtol=1e-5, atol=1e-6)


def test_training_a_vit_writes_its_weights_under_the_checkpoint_names(run, tmp_path):
    """ViT's modules are renamed by transformers 5 on load: the trained weights go back to
    the checkpoint's names (each FFN's tensors change), and the result cuts and loads."""
    import transformers

    vit = _tiny("vit", tmp_path / "vit")
    gen = torch.Generator().manual_seed(0)
    data = tmp_path / "rows.jsonl"
    data.write_text(
        "".join(
            json.dumps({"pixels": torch.rand(3, 16, 16, generator=gen).tolist(), "label": i % 3})
            + "\n"
            for i in range(12)
        )
    )
    args = ["train", "-p", "matformer-train", vit, "-o", "data", data, "-o", "steps", "2"]
    r = run("--quiet", *args, "-o", "lr", "1e-2", "-o", "batch_size", "4", "-n", "vt")
    assert r.exit_code == 0, r.output
    before, after = dir_tensors(vit), artifact_tensors("vt")
    assert before.keys() == after.keys()
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert any("intermediate.dense.weight" in n for n in changed)
    assert any("output.dense.weight" in n for n in changed)
    _extract(run, "vt", "-o", "ffn_ratio", "0.5", name="vt-half")
    out = tmp_path / "half"
    assert run("export", "vt-half", out).exit_code == 0
    model = transformers.ViTForImageClassification.from_pretrained(out)
    assert model(pixel_values=torch.rand(1, 3, 16, 16)).logits.shape == (1, 3)
