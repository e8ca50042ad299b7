"""Each bad input: one clear line, a non-zero exit, and the store exactly as it was."""

from __future__ import annotations

import shutil

import pytest
from conftest import store_snapshot
from safetensors.torch import load_file, save_file


@pytest.fixture
def populated(tv):
    """A store holding one task vector (conftest's ``tv``)."""
    return tv


def _expect(run, store, args, code, message):
    before = store_snapshot(store)
    r = run(*args)
    assert r.exit_code == code, r.output
    assert r.output == f"Error: {message}\n"
    assert store_snapshot(store) == before


def test_missing_path(run, models, populated, tmp_path):
    missing = tmp_path / "nope"
    _expect(
        run,
        populated,
        ["apply", "-p", "task-vector", "--base", models["base-fp32"], missing],
        1,
        f"no such file or directory: {missing}",
    )


def test_not_safetensors(run, models, populated, tmp_path):
    bogus = tmp_path / "model.safetensors"
    data = b"this is not a tensor file at all, just some text\n" * 4
    bogus.write_bytes(data)
    claimed = int.from_bytes(data[:8], "little")
    _expect(
        run,
        populated,
        ["apply", "-p", "task-vector", "--base", models["base-fp32"], bogus],
        1,
        f"{bogus} is not a safetensors file or its header is truncated "
        f"(header says {claimed} bytes, file has {len(data)})",
    )


def test_truncated_header(run, models, populated, tmp_path):
    src = models["ft1-fp32"] / "model.safetensors"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(src.read_bytes()[:100])
    size = int.from_bytes(src.read_bytes()[:8], "little")
    _expect(
        run,
        populated,
        ["apply", "-p", "task-vector", "--base", models["base-fp32"], cut],
        1,
        f"{cut} is not a safetensors file or its header is truncated "
        f"(header says {size} bytes, file has 100)",
    )


def test_truncated_data(run, models, populated, tmp_path):
    src = (models["ft1-fp32"] / "model.safetensors").read_bytes()
    cut = tmp_path / "short.safetensors"
    cut.write_bytes(src[:-1000])
    before = store_snapshot(populated)
    r = run("apply", "-p", "task-vector", "--base", models["base-fp32"], cut)
    assert r.exit_code == 1
    assert r.output.startswith(f"Error: {cut} is truncated: tensor '")
    assert r.output.count("\n") == 1
    assert store_snapshot(populated) == before


def test_corrupt_header_json(run, models, populated, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10).to_bytes(8, "little") + b"{not json}" + b"\0" * 16)
    before = store_snapshot(populated)
    r = run("apply", "-p", "task-vector", "--base", models["base-fp32"], bad)
    assert r.exit_code == 1
    assert r.output.startswith(f"Error: {bad} is not a safetensors file: corrupt header (")
    assert store_snapshot(populated) == before


def _variant(models, tmp_path, edit):
    out = tmp_path / "variant"
    shutil.copytree(models["ft1-fp32"], out)
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_different_shapes(run, models, populated, tmp_path):
    name = "model.layers.0.mlp.down_proj.weight"
    ft = _variant(models, tmp_path, lambda t: t.__setitem__(name, t[name][:, :64].clone()))
    base = models["base-fp32"]
    _expect(
        run,
        populated,
        ["apply", "-p", "task-vector", "--base", base, ft],
        1,
        f"base and expert differ: {name} is [64, 128] in {base} and [64, 64] in {ft}",
    )


def test_float_tensor_missing(run, models, populated, tmp_path):
    name = "model.norm.weight"
    ft = _variant(models, tmp_path, lambda t: t.pop(name))
    base = models["base-fp32"]
    _expect(
        run,
        populated,
        ["apply", "-p", "task-vector", "--base", base, ft],
        1,
        f"base and expert differ: {name} is in {base} but not in {ft}",
    )


@pytest.mark.parametrize("plugin", ["task-arithmetic", "ties", "dare-linear", "dare-ties"])
def test_extra_float_tensor(run, models, populated, tmp_path, plugin):
    import torch

    ft = _variant(models, tmp_path, lambda t: t.__setitem__("extra.weight", torch.ones(3)))
    base = models["base-fp32"]
    _expect(
        run,
        populated,
        ["merge", "-p", plugin, "--base", base, models["ft2-fp32"], ft],
        1,
        f"base and expert differ: extra.weight is in {ft} but not in {base}",
    )


BASE, FT = "{base}", "{ft}"
MERGE = ["merge", "-p", "task-arithmetic", "--base", BASE, FT]

USAGE_CASES = {
    "unknown plugin": (
        ["apply", "-p", "zip", "--base", BASE, FT],
        2,
        "unknown plugin 'zip' (available: compeft, lora-extract, lora-tucker, sketchtune, task-vector, tucker)",
    ),
    "plugin of another kind": (
        ["apply", "-p", "task-arithmetic", FT],
        2,
        "plugin 'task-arithmetic' is a merge method; use `compress merge --plugin task-arithmetic`",
    ),
    "unknown option": (
        [*MERGE, "-o", "lambda", "2"],
        2,
        "unknown option 'lambda' for method 'task-arithmetic' "
        "(options: grid, normalize, rank, scale, space, val, weights)",
    ),
    "ill-typed option": (
        [*MERGE, "-o", "scale", "big"],
        2,
        "option 'scale' expects a finite number or auto; got 'big'",
    ),
    "missing base": (
        ["apply", "-p", "task-vector", FT],
        2,
        "method 'task-vector' needs --base BASE",
    ),
    "no experts": (
        ["merge", "-p", "ties", "--base", BASE],
        2,
        "method 'ties' needs at least 1 expert; got none",
    ),
    "weights count not equal to experts": (
        ["merge", "-p", "ties", "--base", BASE, FT, FT, "-o", "weights", "1,2,3"],
        2,
        "option 'weights' has 3 values for 2 experts",
    ),
    "dare density out of range": (
        ["merge", "-p", "dare-ties", "--base", BASE, FT, "-o", "density", "0"],
        2,
        "option 'density' must be in (0, 1]; got '0'",
    ),
    "ties scope unknown": (
        ["merge", "-p", "ties", "--base", BASE, FT, "-o", "scope", "layer"],
        2,
        "option 'scope' must be one of tensor, global; got 'layer'",
    ),
    "ref matches nothing": (
        ["export", "nothing-here", "{tmp}/o"],
        1,
        "no artifact or path matches 'nothing-here'",
    ),
}


@pytest.mark.parametrize("case", USAGE_CASES)
def test_usage_and_ref_errors(run, models, populated, tmp_path, case):
    args, code, message = USAGE_CASES[case]
    paths = {"base": models["base-fp32"], "ft": models["ft1-fp32"], "tmp": tmp_path}
    _expect(run, populated, [a.format(**paths) for a in args], code, message)


def test_ref_version_missing(run, populated, tmp_path):
    _expect(run, populated, ["export", "tv@7", tmp_path / "o"], 1, "no artifact matches 'tv@7'")


def test_ref_matches_several(run, populated, tmp_path):
    import sqlite3

    # Random ids sharing 8 hex digits are too rare to wait for: add a row that does.
    conn = sqlite3.connect(populated / "store.db")
    (tv_id,) = conn.execute("SELECT id FROM artifacts WHERE name = 'tv'").fetchone()
    twin = tv_id[:8] + "f" * 24 if tv_id[8] != "f" else tv_id[:8] + "e" * 24
    conn.execute(
        "INSERT INTO artifacts (id, name, version, kind, content, params, metrics, manifest, "
        "bytes, created) VALUES (?, 'twin', 1, 'import', 'delta', '{}', '{}', '{}', 0, 'x')",
        [twin],
    )
    conn.commit()
    conn.close()
    _expect(
        run,
        populated,
        ["export", tv_id[:8], tmp_path / "o"],
        1,
        f"'{tv_id[:8]}' matches 2 artifacts ({', '.join(sorted([tv_id[:12], twin[:12]]))}); "
        "give more of the id",
    )
    assert run("export", tv_id[:9], tmp_path / "o").exit_code == 0


def test_export_into_non_empty_directory(run, populated, tmp_path):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _expect(
        run,
        populated,
        ["export", "tv", out],
        1,
        f"{out} exists and is not empty (use --force to replace it)",
    )
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces only an earlier export, never a directory of other files
    _expect(
        run,
        populated,
        ["export", "tv", out, "--force"],
        1,
        f"refusing to replace {out}: it is not an earlier export (no compressor.json; "
        "it holds keep.txt); remove it yourself or choose another directory",
    )
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_name(run, models, populated):
    _expect(
        run,
        populated,
        [
            "apply",
            "-p",
            "task-vector",
            "--base",
            models["base-fp32"],
            models["ft1-fp32"],
            "-n",
            "bad name/x",
        ],
        1,
        "invalid name 'bad name/x': use letters, digits, '.', '_' and '-', "
        "starting with a letter or digit, and not only hex digits (those are ids)",
    )


def test_bad_dtype(run, populated, tmp_path):
    _expect(
        run,
        populated,
        ["export", "tv", tmp_path / "x", "--dtype", "int3"],
        1,
        "unknown dtype 'int3' (choose from bf16, fp16, fp32, fp64)",
    )


def test_traceback_only_with_debug(run, models, populated, monkeypatch, tmp_path):
    from click.testing import CliRunner

    from compressor.cli import cli

    monkeypatch.setenv("COMPRESSOR_DEBUG", "1")
    r = CliRunner().invoke(cli, ["export", "nothing-here", str(tmp_path / "o")])
    assert r.exit_code == 1
    assert "Traceback" in r.output and "RefError" in r.output


def test_verb_without_methods_of_its_kind(run, models, populated):
    _expect(
        run,
        populated,
        ["extract", "-p", "task-vector", models["ft1-fp32"]],
        2,
        "plugin 'task-vector' is a compress method; use `compress apply --plugin task-vector`",
    )
    _expect(
        run,
        populated,
        ["sample", "-p", "nope", "tv"],
        2,
        "unknown plugin 'nope' (available: neumeta)",
    )


def test_too_many_inputs_for_a_one_input_method(run, models, populated):
    before = store_snapshot(populated)
    r = run("apply", "-p", "task-vector", "--base", models["base-fp32"], "a", "b")
    assert (r.exit_code, r.output) == (
        2,
        "Error: method 'task-vector' takes at most 1 input; got 2\n",
    )
    assert store_snapshot(populated) == before
