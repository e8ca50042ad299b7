"""The plugin host: entry points, COMPRESSOR_PLUGINS, hooks, clashes, listing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compressor.registry import get_registry, reset_registry

EXAMPLES = Path(__file__).parent / "plugin_example"


def install_plugin(site: Path, dist: str, module: str) -> None:
    """Make ``module`` an installed distribution with a compressor.plugins entry point."""
    site.mkdir(parents=True, exist_ok=True)
    shutil.copy(EXAMPLES / f"{module}.py", site)
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[compressor.plugins]\n{module} = {module}\n")


def test_builtins_load_through_entry_points():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="compressor.plugins")}
    assert eps["task_vector"] == "compressor.plugins.task_vector"
    reg = get_registry()
    assert reg.method_plugins == {  # keyed by (name, kind): one family, one method per kind
        ("task-vector", "compress"): "task_vector",
        ("task-arithmetic", "merge"): "task_arithmetic",
        ("compeft", "compress"): "compeft",
        ("ties", "merge"): "ties_dare",
        ("tsv-m", "merge"): "subspace",
        ("iso-c", "merge"): "subspace",
        ("iso-cts", "merge"): "subspace",
        ("wudi", "merge"): "subspace",
        ("dare-linear", "merge"): "ties_dare",
        ("dare-ties", "merge"): "ties_dare",
        ("breadcrumbs", "merge"): "ties_dare",
        ("breadcrumbs-ties", "merge"): "ties_dare",
        ("della", "merge"): "ties_dare",
        ("della-linear", "merge"): "ties_dare",
        ("sce", "merge"): "ties_dare",
        ("linear", "merge"): "interpolation",
        ("slerp", "merge"): "interpolation",
        ("nuslerp", "merge"): "interpolation",
        ("multislerp", "merge"): "interpolation",
        ("karcher", "merge"): "interpolation",
        ("nearswap", "merge"): "interpolation",
        ("model-stock", "merge"): "model_stock",
        ("arcee-fusion", "merge"): "arcee_fusion",
        ("passthrough", "merge"): "passthrough",
        ("lora-extract", "compress"): "lora_extract",
        ("atlas", "merge"): "atlas",
        ("matformer", "extract"): "matformer",
        ("matformer-train", "train"): "matformer",
        ("tucker", "compress"): "tucker",
        ("lora-tucker", "compress"): "lora_tucker",
        ("sketchtune", "compress"): "sketchtune",
        ("sketchtune", "train"): "sketchtune",
        ("neumeta", "train"): "neumeta",
        ("neumeta", "sample"): "neumeta",
    }


def test_register_methods(run):
    out = run("plugins").output
    assert "task-vector       compress  Store a fine-tune as its task vector" in out
    data = json.loads(run("plugins", "--json").stdout)
    ta = next(m for m in data["methods"] if m["name"] == "task-arithmetic")
    assert ta["kind"] == "merge" and ta["reference"].startswith("https://arxiv.org/")
    assert ta["options"][0] == {
        "name": "scale",
        "type": "float|auto",
        "default": 1.0,
        "help": "λ, the factor on the merged task vector; auto: the best of -o grid on -o val data",
    }
    shown = run("plugins", "show", "task-arithmetic").output
    assert "Reference: https://arxiv.org/abs/2212.04089" in shown
    assert "-o scale float|auto  (default 1.0)" in shown
    assert json.loads(run("plugins", "show", "task-vector", "--json").stdout)["needs_base"]


def test_register_sources():
    names = [r.name for r in get_registry().readers]
    assert names == ["peft-adapter", "hf-model-dir", "safetensors-file"]


def test_third_party_plugin_from_the_cli(tmp_path, models):
    """A plugin that lives only under tests/, installed as a distribution, run by `compress`."""
    site = tmp_path / "site"
    install_plugin(site, "compressor-scale", "compressor_scale")
    st = tmp_path / "model.st"
    shutil.copy(models["base-fp32"] / "model.safetensors", st)
    env = {**os.environ, "PYTHONPATH": str(site), "COMPRESSOR_STORE": str(tmp_path / "store")}
    cmd = [sys.executable, "-m", "compressor"]

    def compress(*args):
        return subprocess.run([*cmd, *map(str, args)], env=env, capture_output=True, text=True)

    listing = compress("plugins")
    assert "scale             compress  Multiply every float tensor by a factor" in listing.stdout
    assert "st-file" in listing.stdout
    assert compress("hello").stdout == "hello from compressor-scale\n"  # register_commands
    r = compress("apply", "-p", "scale", st, "-o", "factor", "2", "-n", "doubled", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["plugin"] == "scale" and rec["metrics"] == {"factor": 2.0}
    # the plugin's format opened model.st, not the built-in catch-all for any file
    external = json.loads(compress("store", "show", st, "--json").stdout)
    assert external["manifest"]["reader"] == "st-file"
    # a train method under its own verb; an encoding decoded for export, read raw by peek
    assert compress("train", "-p", "scale-train", st, "-n", "trained").returncode == 0
    assert compress("apply", "-p", "halve", st, "-n", "halved").returncode == 0
    r = compress("apply", "-p", "peek", "halved", "-n", "peeked", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["metrics"] == {"content_read": "tensors"}
    for ref in ("trained", "halved", "peeked"):
        assert compress("export", ref, tmp_path / f"{ref}.safetensors").returncode == 0
    original = load_file(st)
    name = "model.norm.weight"
    assert torch.equal(load_file(tmp_path / "halved.safetensors")[name], original[name])
    assert torch.equal(load_file(tmp_path / "peeked.safetensors")[name], original[name] * 0.5)
    assert torch.equal(load_file(tmp_path / "trained.safetensors")[name], original[name] * 1.5)
    shown = json.loads(compress("plugins", "show", "scale", "--json").stdout)
    assert shown["plugin"] == "compressor-scale:compressor_scale"

    env["COMPRESSOR_PLUGINS"] = ""  # no external plugins
    assert "scale" not in [
        line.split()[0] for line in compress("plugins").stdout.splitlines() if line
    ]
    r = compress("hello")
    assert r.returncode == 2 and "No such command 'hello'" in r.stderr
    env["COMPRESSOR_PLUGINS"] = "compressor-scale"
    assert "scale" in [line.split()[0] for line in compress("plugins").stdout.splitlines() if line]


def test_register_commands(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from compressor.cli import cli

    install_plugin(tmp_path / "site", "compressor-scale", "compressor_scale")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    reset_registry()
    get_registry().pm.hook.register_commands(cli=cli)
    try:
        assert CliRunner().invoke(cli, ["hello"]).output == "hello from compressor-scale\n"
    finally:
        cli.commands.pop("hello", None)


def test_misspelled_hook_fails_loudly(tmp_path, monkeypatch):
    install_plugin(tmp_path / "site", "compressor-typo", "compressor_typo")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    reset_registry()
    from compressor.errors import PluginError

    with pytest.raises(
        PluginError,
        match="plugin 'compressor-typo:compressor_typo' is broken: unknown hook 'register_method'",
    ):
        get_registry()


def test_two_methods_one_name(tmp_path, monkeypatch):
    install_plugin(tmp_path / "site", "compressor-clash", "compressor_clash")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    reset_registry()
    from compressor.errors import PluginError

    with pytest.raises(PluginError) as e:
        get_registry()
    assert str(e.value) == (
        "two methods are named 'task-vector': one from plugin 'task_vector', "
        "one from plugin 'compressor-clash:compressor_clash'"
    )


def test_broken_plugin_is_one_line_from_the_cli(tmp_path):
    site = tmp_path / "site"
    install_plugin(site, "compressor-clash", "compressor_clash")
    env = {**os.environ, "PYTHONPATH": str(site), "COMPRESSOR_STORE": str(tmp_path / "s")}
    r = subprocess.run(
        [sys.executable, "-m", "compressor", "plugins"], env=env, capture_output=True, text=True
    )
    assert r.returncode == 1
    assert r.stderr == (
        "Error: two methods are named 'task-vector': one from plugin "
        "'task_vector', one from plugin 'compressor-clash:compressor_clash'\n"
    )


def test_one_family_offers_one_method_per_verb(run, private_store, tmp_path):
    from conftest import assert_refused

    from compressor.plugins.sketchtune import Sketch, SketchTrain

    out = run("plugins", "show", "sketchtune").output
    assert f"sketchtune (compress, version {Sketch.version}," in out
    assert f"sketchtune (train, version {SketchTrain.version}," in out
    assert "compress train --plugin sketchtune MODEL -o data train.jsonl" in out
    docs = json.loads(run("plugins", "show", "sketchtune", "--json").stdout)
    assert [d["kind"] for d in docs] == ["compress", "train"]
    assert_refused(
        run,
        private_store,
        ["extract", "-p", "sketchtune", tmp_path],
        "plugin 'sketchtune' is a compress and a train method; use "
        "`compress apply --plugin sketchtune` or `compress train --plugin sketchtune`",
        code=2,
    )
