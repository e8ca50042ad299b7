"""Tensor sources and the writer against the safetensors library and transformers."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from compressor.errors import InputError
from compressor.io.peft import PeftAdapter
from compressor.io.safetensors import read_header
from compressor.io.sources import open_model_dir, open_safetensors_file, row_blocks
from compressor.io.writer import ArtifactWriter, parse_size

ALL_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
]


def _tensors():
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dt in enumerate(ALL_DTYPES):
        t = torch.randn(7, 5, generator=g) * 10
        out[f"t{i}.{str(dt)[6:]}"] = t.to(dt)
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.zeros(0, 4)
    return out


def test_reads_what_safetensors_writes(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "a.safetensors", metadata={"format": "pt"})
    src = open_safetensors_file(tmp_path / "a.safetensors")
    assert set(src.names()) == set(tensors)
    for name, t in tensors.items():
        info = src.info(name)
        assert info.shape == tuple(t.shape) and info.dtype == t.dtype
        assert torch.equal(src.get(name), t), name
    assert torch.equal(src.get("t0.float32", slice(2, 5)), tensors["t0.float32"][2:5])
    src.close()


def test_safetensors_reads_what_we_write(tmp_path):
    tensors = _tensors()
    w = ArtifactWriter(tmp_path / "out")
    for name, t in tensors.items():
        w.write(name, t)
    files = w.finish()
    assert [f.relpath for f in files] == ["model.safetensors"]
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert got.keys() == tensors.keys()
    for name in tensors:
        assert got[name].dtype == tensors[name].dtype and torch.equal(got[name], tensors[name])
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert files[0].digest == hashlib.sha256(files[0].path.read_bytes()).hexdigest()


def test_rows_written_in_blocks_equal_whole(tmp_path):
    t = torch.randn(1000, 33)
    w = ArtifactWriter(tmp_path / "o")
    w.begin("x", tuple(t.shape), t.dtype)
    for rows in row_blocks(open_info(t), max_elems=1000):
        w.write_rows(t[rows])
    w.end()
    w.finish()
    assert torch.equal(load_file(tmp_path / "o" / "model.safetensors")["x"], t)


def open_info(t):
    from compressor.io.safetensors import TensorInfo

    return TensorInfo("x", tuple(t.shape), t.dtype, 0, t.numel() * t.element_size())


def test_row_blocks_cover_the_tensor():
    from compressor.io.safetensors import TensorInfo

    info = TensorInfo("x", (10, 7), torch.float32, 0, 280)
    blocks = list(row_blocks(info, max_elems=21))
    assert blocks == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 10)]
    assert list(row_blocks(info)) == [None]


def test_same_content_same_bytes(tmp_path):
    digests = []
    for i in range(2):
        w = ArtifactWriter(tmp_path / f"o{i}", max_shard_size="2KB")
        for name, t in _tensors().items():
            w.write(name, t)
        digests.append([(f.relpath, f.digest) for f in w.finish()])
    assert digests[0] == digests[1]


def test_sharding_is_hugging_face_layout(tmp_path, models):
    src = open_model_dir(models["base-fp32"])
    w = ArtifactWriter(tmp_path / "sharded", max_shard_size="100KB")
    for name in src.names():
        w.write(name, src.get(name))
    w.add_file("config.json", models["base-fp32"] / "config.json")
    files = {f.relpath for f in w.finish()}
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert files == {*shards, "model.safetensors.index.json", "config.json"}
    assert index["metadata"]["total_size"] == sum(src.info(k).nbytes for k in src.names())
    for shard in shards:  # no shard over the limit unless one tensor is
        infos, meta = read_header(tmp_path / "sharded" / shard)
        assert meta == {"format": "pt"}
        assert sum(i.nbytes for i in infos.values()) <= 100_000 or len(infos) == 1
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    b = AutoModelForCausalLM.from_pretrained(models["base-fp32"])
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    reread = open_model_dir(tmp_path / "sharded")
    assert reread.names() == src.names() or set(reread.names()) == set(src.names())
    assert set(reread.files) == {"config.json"}


def test_metadata_says_format_and_content(tmp_path):
    """A model's shards say format pt only; anything else also says what it holds."""
    for content, expected in (
        ("model", {"format": "pt"}),
        ("delta", {"content": "delta", "format": "pt"}),
    ):
        w = ArtifactWriter(tmp_path / content, content=content)
        w.write("x", torch.ones(2))
        (f,) = w.finish()
        _, metadata = read_header(f.path)
        assert metadata == expected
        raw = f.path.read_bytes()
        header = raw[8 : 8 + int.from_bytes(raw[:8], "little")].decode()
        assert header.index('"__metadata__"') < header.index('"x"')  # sorted JSON


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1000") == 1000
    from compressor.errors import UsageError

    with pytest.raises(UsageError, match="invalid size 'lots'"):
        parse_size("lots")


def test_index_naming_a_missing_shard(tmp_path, models):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(models["base-fp32"], d)
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(
        InputError, match="the index names a missing shard 'model-00001-of-00002.safetensors'"
    ):
        open_model_dir(d)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="holds no .safetensors weights"):
        open_model_dir(tmp_path)


def test_peft_adapter_source(tmp_path, models):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models["base-fp32"])
    cfg = LoraConfig(
        r=8,
        lora_alpha=32,
        target_modules=["k_proj", "up_proj"],
        rank_pattern={"up_proj": 2},
        alpha_pattern={"up_proj": 4},
    )
    pm = get_peft_model(model, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    pm.save_pretrained(tmp_path / "ad")
    src = PeftAdapter(tmp_path / "ad")
    assert src.r == 8 and src.lora_alpha == 32 and not src.use_rslora
    assert sorted(src.target_modules) == ["k_proj", "up_proj"]
    name = "model.layers.1.mlp.up_proj.weight"
    mod = src.modules[name]
    assert mod.scaling == 4 / 2 and mod.shape == (128, 64)
    peft_layer = pm.base_model.model.model.layers[1].mlp.up_proj
    want = peft_layer.get_delta_weight("default")
    torch.testing.assert_close(src.delta(name), want)
    torch.testing.assert_close(src.delta(name, slice(10, 20)), want[10:20])
    k = "model.layers.0.self_attn.k_proj.weight"
    assert src.modules[k].scaling == 32 / 8
    torch.testing.assert_close(
        src.delta(k),
        pm.base_model.model.model.layers[0].self_attn.k_proj.get_delta_weight("default"),
    )


def test_not_an_adapter(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="only LoRA adapters are supported, not IA3"):
        PeftAdapter(tmp_path)


@pytest.mark.parametrize("reserve", [256, 1 << 14])
def test_large_shards_keep_a_padded_header(tmp_path, monkeypatch, reserve):
    """Big shards are written once, header padded in place; an overflowing header falls back."""
    import compressor.io.writer as writer_module

    monkeypatch.setattr(writer_module, "COMPACT_BELOW", 0)
    monkeypatch.setattr(writer_module, "HEADER_RESERVE", reserve)
    tensors = {f"layer.{i}.weight": torch.randn(4, 3) for i in range(20)}
    w = ArtifactWriter(tmp_path / "o")
    for name, t in tensors.items():
        w.write(name, t)
    (f,) = w.finish()
    data = f.path.read_bytes()
    assert f.digest == hashlib.sha256(data).hexdigest() and f.bytes == len(data)
    header_len = int.from_bytes(data[:8], "little")
    assert header_len == (reserve if reserve > 1000 else header_len)
    assert header_len % 8 == 0
    got = load_file(f.path)
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)
