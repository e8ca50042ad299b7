"""The fault catalogue: every bad input, the command it goes to, the one line it must get,
and the store left exactly as it was. One row per case; the rows are the specification.

Placeholders in a row: ``{base}``, ``{ft}`` (tiny Llama fp32 base and fine-tune), ``{bad}``
(the directory of crafted bad inputs), ``{out}`` (a fresh output path), ``{store}``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct

import pytest
from conftest import store_snapshot
from safetensors.torch import load_file, save_file

TV = ["apply", "-p", "task-vector", "--base", "{base}"]
TA = ["merge", "-p", "task-arithmetic", "--base", "{base}", "tv"]


def _st(path, header: dict | bytes, data: bytes = b"") -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.fixture(scope="module")
def bad(tmp_path_factory, models):
    """Crafted bad inputs, made once."""
    d = tmp_path_factory.mktemp("bad")
    (d / "text.safetensors").write_bytes(b"x" * 100)
    (d / "tiny.safetensors").write_bytes(b"abc")
    _st(d / "json.safetensors", b"{not json}")
    _st(d / "list.safetensors", b"[1, 2]")
    _st(d / "nested.safetensors", b"[" * 100_000 + b"]" * 100_000)
    _st(d / "meta.safetensors", {"__metadata__": {"a": 1}})
    _st(d / "metalist.safetensors", {"__metadata__": [1]})
    _st(d / "dtype.safetensors", {"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"x")
    _st(
        d / "shape.safetensors",
        {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}},
        b"x" * 4,
    )
    _st(d / "neg.safetensors", {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}})
    _st(d / "noff.safetensors", {"a": {"dtype": "F32", "shape": [1]}}, b"x" * 4)
    _st(
        d / "short.safetensors",
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
        b"x" * 8,
    )
    _st(
        d / "overlap.safetensors",
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        b"\0" * 12,
    )
    _st(
        d / "huge.safetensors",
        {"a": {"dtype": "F32", "shape": [10**30], "data_offsets": [0, 4]}},
        b"x" * 4,
    )
    for suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        (d / f"weights{suffix}").write_bytes(pickle.dumps({"w": 1}))
    (d / "empty").mkdir()
    (d / "onlybin").mkdir()
    shutil.copy(models["ft1-fp32"] / "config.json", d / "onlybin")
    (d / "onlybin" / "pytorch_model.bin").write_bytes(pickle.dumps({}))
    (d / "two").mkdir()
    for n in ("a", "b"):
        shutil.copy(models["ft1-fp32"] / "model.safetensors", d / "two" / f"{n}.safetensors")
    link = d / "link"
    shutil.copytree(models["ft1-fp32"], link)
    (link / "tokenizer_config.json").unlink()
    (link / "tokenizer_config.json").symlink_to("/etc/hostname")
    nan = d / "nan"
    shutil.copytree(models["ft1-fp32"], nan)
    t = load_file(nan / "model.safetensors")
    t["model.norm.weight"][:3] = float("inf")
    save_file(t, nan / "model.safetensors", metadata={"format": "pt"})
    shape = d / "wide"
    shutil.copytree(models["ft1-fp32"], shape)
    t = load_file(shape / "model.safetensors")
    t["model.norm.weight"] = t["model.norm.weight"].repeat(2)
    save_file(t, shape / "model.safetensors", metadata={"format": "pt"})
    missing = d / "missing"
    shutil.copytree(models["ft1-fp32"], missing)
    t = load_file(missing / "model.safetensors")
    del t["model.norm.weight"]
    save_file(t, missing / "model.safetensors", metadata={"format": "pt"})
    adapter = d / "adapter"
    adapter.mkdir()
    save_file(
        {"x.lora_A.weight": __import__("torch").ones(1, 1)}, adapter / "adapter_model.safetensors"
    )
    for name, config in {
        "ad-json": "{oops",
        "ad-list": "[1]",
        "ad-r": json.dumps({"peft_type": "LORA", "r": "abc"}),
        "ad-alpha": json.dumps({"peft_type": "LORA", "lora_alpha": [1]}),
        "ad-pattern": json.dumps({"peft_type": "LORA", "alpha_pattern": [1]}),
        "ad-ia3": json.dumps({"peft_type": "IA3"}),
        "ad-dora": json.dumps({"peft_type": "LORA", "use_dora": True}),
        "ad-nested": "[" * 100_000 + "]" * 100_000,
    }.items():
        (d / name).mkdir()
        shutil.copy(adapter / "adapter_model.safetensors", d / name)
        (d / name / "adapter_config.json").write_text(config)
    import torch

    lora = "base_model.model.model.layers.0.self_attn.q_proj"
    for name, b_rank, r in (("ad-ranks", 8, 4), ("ad-r-says", 4, 16), ("ad-good", 4, 4)):
        (d / name).mkdir()
        save_file(
            {
                f"{lora}.lora_A.weight": torch.ones(4, 64),
                f"{lora}.lora_B.weight": torch.ones(64, b_rank),
            },
            d / name / "adapter_model.safetensors",
        )
        (d / name / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["q_proj"]})
        )
    deep = d / "deep-index"
    deep.mkdir()
    shutil.copy(models["ft1-fp32"] / "model.safetensors", deep / "model-00001-of-00001.safetensors")
    shutil.copy(models["ft1-fp32"] / "config.json", deep)
    (deep / "model.safetensors.index.json").write_text("[" * 100_000 + "]" * 100_000)
    deep = shutil.copytree(models["ft1-fp32"], d / "deep-config")
    (deep / "config.json").write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    save_file({}, d / "empty.safetensors")
    eight = shutil.copytree(models["ft1-fp32"], d / "float8")
    t = load_file(eight / "model.safetensors")
    t = {k: v.to(torch.float8_e4m3fn) for k, v in t.items()}
    save_file(t, eight / "model.safetensors", metadata={"format": "pt"})
    (d / "two-names.yml").write_text(
        "name: a\nmerge_method: linear\nmodels: [{model: m}]\n---\n"
        "name: a\nmerge_method: linear\nmodels: [{model: a}]\n"
    )
    (d / "noweights").mkdir()
    (d / "noweights" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (d / "lines.txt").write_text("a b c\n")
    (d / "notempty").mkdir()
    (d / "notempty" / "mine.txt").write_text("mine")
    return d


NOT_ST = "is not a safetensors file"
CASES = [
    # -- missing and unreadable inputs
    ("missing path", TV + ["{bad}/nope"], "no such file or directory: {bad}/nope", 1),
    (
        "missing base",
        ["apply", "-p", "task-vector", "--base", "{bad}/nope", "{ft}"],
        "no such file or directory: {bad}/nope",
        1,
    ),
    ("empty ref", TV + [""], "an empty reference names nothing", 1),
    (
        "text file",
        TV + ["{bad}/text.safetensors"],
        f"{{bad}}/text.safetensors {NOT_ST} or its header is truncated (header says 8680820740569200760 bytes, file has 100)",
        1,
    ),
    (
        "3-byte file",
        TV + ["{bad}/tiny.safetensors"],
        f"{{bad}}/tiny.safetensors {NOT_ST} (only 3 bytes)",
        1,
    ),
    (
        "header not JSON",
        TV + ["{bad}/json.safetensors"],
        f"{{bad}}/json.safetensors {NOT_ST}: corrupt header (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))",
        1,
    ),
    (
        "header a list",
        TV + ["{bad}/list.safetensors"],
        f"{{bad}}/list.safetensors {NOT_ST}: corrupt header (header is not a JSON object)",
        1,
    ),
    (
        "header nests deeply",
        TV + ["{bad}/nested.safetensors"],
        f"{{bad}}/nested.safetensors {NOT_ST}: its header nests too deeply",
        1,
    ),
    (
        "metadata not strings",
        TV + ["{bad}/meta.safetensors"],
        "{bad}/meta.safetensors has corrupt metadata: __metadata__ must map strings to strings",
        1,
    ),
    (
        "metadata a list",
        TV + ["{bad}/metalist.safetensors"],
        "{bad}/metalist.safetensors has corrupt metadata: __metadata__ must map strings to strings",
        1,
    ),
    (
        "unknown dtype",
        TV + ["{bad}/dtype.safetensors"],
        "{bad}/dtype.safetensors has a corrupt header entry for tensor 'a'",
        1,
    ),
    (
        "size not shape",
        TV + ["{bad}/shape.safetensors"],
        "{bad}/shape.safetensors: tensor 'a' has a size that does not match its shape",
        1,
    ),
    (
        "negative shape",
        TV + ["{bad}/neg.safetensors"],
        "{bad}/neg.safetensors has a corrupt header entry for tensor 'a'",
        1,
    ),
    (
        "no offsets",
        TV + ["{bad}/noff.safetensors"],
        "{bad}/noff.safetensors has a corrupt header entry for tensor 'a'",
        1,
    ),
    (
        "truncated data",
        TV + ["{bad}/short.safetensors"],
        "{bad}/short.safetensors is truncated: tensor 'a' ends at byte 86, file has 78",
        1,
    ),
    (
        "overlapping tensors",
        TV + ["{bad}/overlap.safetensors"],
        "{bad}/overlap.safetensors has overlapping tensors: 'a' and 'b' share bytes",
        1,
    ),
    (
        "overflowing shape",
        TV + ["{bad}/huge.safetensors"],
        "{bad}/huge.safetensors: tensor 'a' has a size that does not match its shape",
        1,
    ),
    # -- pickles are never loaded
    *[
        (
            f"pickle {s}",
            TV + [f"{{bad}}/weights{s}"],
            f"{{bad}}/weights{s} is a pickle checkpoint, which compressor never loads (unpickling can run code); convert it to safetensors where you trust it, e.g. transformers' save_pretrained(OUT, safe_serialization=True)",
            1,
        )
        for s in (".bin", ".pt", ".pth", ".ckpt", ".pkl")
    ],
    (
        "pickle as base",
        ["apply", "-p", "task-vector", "--base", "{bad}/weights.bin", "{ft}"],
        "{bad}/weights.bin is a pickle checkpoint, which compressor never loads (unpickling can run code); convert it to safetensors where you trust it, e.g. transformers' save_pretrained(OUT, safe_serialization=True)",
        1,
    ),
    (
        "dir with only a .bin",
        TV + ["{bad}/onlybin"],
        "{bad}/onlybin holds no .safetensors weights (pytorch_model.bin is a pickle checkpoint, which compressor never loads; convert it to safetensors where you trust it, e.g. save_pretrained(OUT, safe_serialization=True))",
        1,
    ),
    ("empty dir", TV + ["{bad}/empty"], "{bad}/empty holds no .safetensors weights", 1),
    (
        "two weight files",
        TV + ["{bad}/two"],
        "{bad}/two holds several .safetensors files and no index",
        1,
    ),
    (
        "link out of the dir",
        TV + ["{bad}/link"],
        "{bad}/link: tokenizer_config.json is a symbolic link to /etc/hostname, outside the directory; copy the file in instead of linking it",
        1,
    ),
    (
        "import link out",
        ["store", "import", "{bad}/link"],
        "{bad}/link: tokenizer_config.json is a symbolic link to /etc/hostname, outside the directory; copy the file in instead of linking it",
        1,
    ),
    # -- inputs that do not line up
    (
        "inf in weights",
        TV + ["{bad}/nan"],
        "{bad}/nan: tensor model.norm.weight holds 3 NaN or infinite values; a method cannot give meaningful results from it",
        1,
    ),
    (
        "different shape",
        TV + ["{bad}/wide"],
        "base and expert differ: model.norm.weight is [64] in {base} and [128] in {bad}/wide",
        1,
    ),
    (
        "float tensor missing",
        TV + ["{bad}/missing"],
        "base and expert differ: model.norm.weight is in {base} but not in {bad}/missing",
        1,
    ),
    (
        "delta as base",
        ["merge", "-p", "task-arithmetic", "--base", "tv", "{ft}"],
        "tv@1 holds a task vector, not a model; a base must be a full model",
        2,
    ),
    # -- adapters
    (
        "adapter config not JSON",
        TV + ["{bad}/ad-json"],
        "{bad}/ad-json: adapter_config.json is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))",
        1,
    ),
    (
        "adapter config a list",
        TV + ["{bad}/ad-list"],
        "{bad}/ad-list: adapter_config.json is not a JSON object",
        1,
    ),
    (
        "adapter r a word",
        TV + ["{bad}/ad-r"],
        "{bad}/ad-r: adapter_config.json key 'r' must be an integer, not 'abc'",
        1,
    ),
    (
        "adapter alpha a list",
        TV + ["{bad}/ad-alpha"],
        "{bad}/ad-alpha: adapter_config.json key 'lora_alpha' must be a number, not [1]",
        1,
    ),
    (
        "adapter pattern a list",
        TV + ["{bad}/ad-pattern"],
        "{bad}/ad-pattern: adapter_config.json key 'alpha_pattern' must be an object",
        1,
    ),
    (
        "adapter IA3",
        TV + ["{bad}/ad-ia3"],
        "{bad}/ad-ia3: only LoRA adapters are supported, not IA3",
        1,
    ),
    ("adapter DoRA", TV + ["{bad}/ad-dora"], "{bad}/ad-dora: DoRA adapters are not supported", 1),
    (
        "adapter config nests",
        TV + ["{bad}/ad-nested"],
        "{bad}/ad-nested: adapter_config.json nests too deeply",
        1,
    ),
    (
        "adapter without weights",
        TV + ["{bad}/noweights"],
        "{bad}/noweights: PEFT adapter without adapter_model.safetensors",
        1,
    ),
    (
        "adapter factors of two ranks",
        ["merge", "-p", "task-arithmetic", "--base", "{base}", "{bad}/ad-ranks"],
        "{bad}/ad-ranks: 'model.layers.0.self_attn.q_proj' has an A factor of rank 4 and a B "
        "factor of shape [64, 8]; the factors do not fit together",
        1,
    ),
    (
        "adapter r contradicts its factors",
        ["merge", "-p", "task-arithmetic", "--base", "{base}", "{bad}/ad-r-says"],
        "{bad}/ad-r-says: adapter_config.json gives 'model.layers.0.self_attn.q_proj' rank 16, "
        "but its factors have rank 4",
        1,
    ),
    (
        "a model with no tensors",
        TV + ["{bad}/empty.safetensors"],
        "{bad}/empty.safetensors holds no tensors; it is not a model, adapter or task vector",
        1,
    ),
    (
        "float8 expert against a float32 base",
        TV + ["{bad}/float8"],
        "base and expert differ: lm_head.weight is torch.float32 in {base} and "
        "torch.float8_e4m3fn in {bad}/float8 (a float8 checkpoint is quantized: dequantize it "
        "first)",
        1,
    ),
    (
        "two config documents with one name",
        ["merge", "--config", "{bad}/two-names.yml"],
        "{bad}/two-names.yml: two documents are named 'a'; each stage needs its own",
        2,
    ),
    (
        "index nests deeply",
        TV + ["{bad}/deep-index"],
        "{bad}/deep-index: model.safetensors.index.json nests too deeply",
        1,
    ),
    (
        "config nests deeply",
        ["eval", "{bad}/deep-config", "-o", "data", "{bad}/lines.txt"],
        "{bad}/deep-config: config.json nests too deeply",
        1,
    ),
    (
        "eval an adapter without base",
        ["eval", "{bad}/ad-good", "-o", "data", "{bad}/lines.txt"],
        "{bad}/ad-good holds a PEFT adapter, not a model; give --base BASE to evaluate it added "
        "to its base",
        1,
    ),
    (
        "extract from an adapter",
        ["extract", "-p", "matformer", "{bad}/ad-good"],
        "{bad}/ad-good holds a PEFT adapter, not a model; matformer needs a full model (export "
        "it onto its base first: `compress export REF OUT --base BASE`)",
        1,
    ),
    # -- click's own usage errors: one line, no usage block
    (
        "run with no workers",
        ["run", "-j", "0", "{bad}/lines.txt"],
        "Invalid value for '-j' / '--jobs': 0 is not in the range x>=1.",
        2,
    ),
    (
        "run a directory",
        ["run", "{bad}"],
        "Invalid value for 'PLAN': File '{bad}' is a directory.",
        2,
    ),
    (
        "empty store directory",
        ["--store", "", "store", "ls"],
        "Invalid value for --store: the store directory must not be empty",
        2,
    ),
    ("no such option", ["store", "ls", "--bogus"], "No such option '--bogus'.", 2),
    # -- plugins and options
    (
        "unknown plugin",
        ["apply", "-p", "nope", "{ft}"],
        "unknown plugin 'nope' (available: compeft, lora-extract, lora-tucker, sketchtune, task-vector, tucker)",
        2,
    ),
    (
        "merge plugin to apply",
        ["apply", "-p", "ties", "{ft}"],
        "plugin 'ties' is a merge method; use `compress merge --plugin ties`",
        2,
    ),
    (
        "sample from what no generator made",
        ["sample", "-p", "neumeta", "tv", "-o", "width", "0.5"],
        "tv@1 is not a NeuMeta generator; train one with "
        "`compress train --plugin neumeta MODEL -o data PATH`",
        1,
    ),
    (
        "unknown option",
        TA + ["-o", "nope", "1"],
        "unknown option 'nope' for method 'task-arithmetic' "
        "(options: grid, normalize, rank, scale, space, val, weights)",
        2,
    ),
    (
        "option a word",
        TA + ["-o", "scale", "big"],
        "option 'scale' expects a finite number or auto; got 'big'",
        2,
    ),
    (
        "option nan",
        TA + ["-o", "scale", "nan"],
        "option 'scale' expects a finite number or auto; got 'nan'",
        2,
    ),
    (
        "option inf",
        TA + ["-o", "scale", "inf"],
        "option 'scale' expects a finite number or auto; got 'inf'",
        2,
    ),
    (
        "option -inf",
        TA + ["-o", "scale", "-inf"],
        "option 'scale' expects a finite number or auto; got '-inf'",
        2,
    ),
    (
        "option overflow",
        TA + ["-o", "scale", "1e999"],
        "option 'scale' expects a finite number or auto; got '1e999'",
        2,
    ),
    (
        "list with nan",
        TA + ["-o", "weights", "1,nan"],
        "option 'weights' expects comma-separated finite numbers; got '1,nan'",
        2,
    ),
    (
        "bad choice",
        ["apply", "-p", "compeft", "tv", "-o", "scope", "everything"],
        "option 'scope' must be one of global, tensor; got 'everything'",
        2,
    ),
    (
        "density above 1",
        ["merge", "-p", "ties", "--base", "{base}", "tv", "-o", "density", "2"],
        "option 'density' must be in (0, 1]; got '2'",
        2,
    ),
    (
        "no base for merge method",
        ["apply", "-p", "task-vector", "{ft}"],
        "method 'task-vector' needs --base BASE",
        2,
    ),
    ("eval without data", ["eval", "{base}"], "eval needs -o data PATH", 2),
    # -- names and references
    (
        "name with newline",
        TV + ["{ft}", "-n", "x\n"],
        "invalid name 'x\\n': use letters, digits, '.', '_' and '-', starting with a letter or digit, and not only hex digits (those are ids)",
        1,
    ),
    (
        "empty name",
        TV + ["{ft}", "-n", ""],
        "invalid name '': use letters, digits, '.', '_' and '-', starting with a letter or digit, and not only hex digits (those are ids)",
        1,
    ),
    (
        "name starts with dash",
        TV + ["{ft}", "-n", "-x"],
        "invalid name '-x': use letters, digits, '.', '_' and '-', starting with a letter or digit, and not only hex digits (those are ids)",
        1,
    ),
    (
        "name only hex",
        TV + ["{ft}", "-n", "deadbeef"],
        "invalid name 'deadbeef': use letters, digits, '.', '_' and '-', starting with a letter or digit, and not only hex digits (those are ids)",
        1,
    ),
    ("unknown ref", ["export", "nope", "{out}"], "no artifact or path matches 'nope'", 1),
    (
        "version not a number",
        ["export", "tv@x", "{out}"],
        "'tv@x': the version after '@' must be a number",
        1,
    ),
    ("no such version", ["export", "tv@9", "{out}"], "no artifact matches 'tv@9'", 1),
    (
        "selection not a number",
        ["export", "tv#x", "{out}"],
        "'tv#x': the part after '#' must be a number (which adapter)",
        1,
    ),
    (
        "selection of a single",
        ["export", "tv#1", "{out}"],
        "tv@1 holds one artifact; '#1' selects nothing in it",
        1,
    ),
    (
        "hub id not cached",
        TV + ["nobody/not-a-model"],
        "'nobody/not-a-model' is neither a path nor in the Hugging Face cache (HF_HUB_CACHE or HF_HOME); download it first, e.g. `hf download nobody/not-a-model`; compressor never downloads",
        1,
    ),
    (
        "rm input with children",
        ["store", "rm", "{ft}"],
        "cannot remove {ft}: 1 artifact(s) were made from it (tv@1); use --force to remove it anyway",
        1,
    ),
    (
        "rm unknown path",
        ["store", "rm", "{bad}/empty"],
        "no artifact or path matches '{bad}/empty'",
        1,
    ),
    # -- outputs
    (
        "export into non-empty dir",
        ["export", "tv", "{bad}/notempty"],
        "{bad}/notempty exists and is not empty (use --force to replace it)",
        1,
    ),
    (
        "force into non-export",
        ["export", "tv", "{bad}/notempty", "--force"],
        "refusing to replace {bad}/notempty: it is not an earlier export (no compressor.json; it holds mine.txt); remove it yourself or choose another directory",
        1,
    ),
    (
        "force into the store",
        ["export", "tv", "{store}", "--force"],
        "refusing to replace {store}: it holds the artifact store at {store}",
        1,
    ),
    (
        "force into store parent",
        ["export", "tv", "{store}/..", "--force"],
        "refusing to replace {store}/..: it holds the artifact store at {store}",
        1,
    ),
    (
        "base for a model",
        ["export", "{ft}", "{out}", "--base", "{base}"],
        "{ft} is a full model; --base applies to task vectors, adapters and compressed experts",
        2,
    ),
    (
        "bad dtype",
        ["export", "tv", "{out}", "--dtype", "int4"],
        "unknown dtype 'int4' (choose from bf16, fp16, fp32, fp64)",
        1,
    ),
    (
        "shard size infinite",
        ["export", "tv", "{out}", "--max-shard-size", "inf"],
        "invalid size 'inf' (examples: 5GB, 500MB, 2GiB)",
        2,
    ),
    (
        "shard size nan",
        ["export", "tv", "{out}", "--max-shard-size", "nan"],
        "invalid size 'nan' (examples: 5GB, 500MB, 2GiB)",
        2,
    ),
    (
        "version past SQLite's integers",
        ["export", "tv@99999999999999999999999", "{out}"],
        "no artifact matches 'tv@99999999999999999999999'",
        1,
    ),
    (
        "bad shard size",
        ["export", "tv", "{out}", "--max-shard-size", "lots"],
        "invalid size 'lots' (examples: 5GB, 500MB, 2GiB)",
        2,
    ),
]


@pytest.fixture(scope="module")
def template(tmp_path_factory, models):
    """A store holding the task vector ``tv``, copied for each case."""
    from compressor import apply

    root = tmp_path_factory.mktemp("template") / "store"
    apply(
        "task-vector", str(models["ft1-fp32"]), base=str(models["base-fp32"]), name="tv", store=root
    )
    return root


def test_catalogue_is_large_enough():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fault(case, run, models, bad, template, private_store, tmp_path, monkeypatch):
    _, args, message, code = case
    shutil.copytree(template, private_store)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    values = {
        "base": models["base-fp32"],
        "ft": models["ft1-fp32"],
        "bad": bad,
        "out": tmp_path / "out",
        "store": private_store,
    }
    args = [a.format(**values) for a in args]
    before = store_snapshot(private_store)
    outside = sorted(os.listdir(bad))
    r = run("--quiet", *args)
    assert (r.exit_code, r.output) == (code, f"Error: {message.format(**values)}\n")
    assert store_snapshot(private_store) == before
    assert sorted(os.listdir(bad)) == outside
    assert not (tmp_path / "out").exists()
