"""First contact (#12): what a new user meets in the first hour, each with a test."""

from __future__ import annotations

import json
import shutil

import torch
from conftest import artifact_tensors, assert_refused, dir_tensors


def test_exported_task_vector_file_is_read_as_a_task_vector(run, models, tv, tmp_path):
    tau = tmp_path / "tau.safetensors"
    assert run("--quiet", "export", "tv", tau).exit_code == 0
    base = models["base-fp32"]
    for ref, name in (("tv", "from-store"), (str(tau), "from-file")):
        r = run("--quiet", "merge", "-p", "task-arithmetic", "--base", base, ref, "-n", name)
        assert r.exit_code == 0, r.output
    a, b = artifact_tensors("from-store"), artifact_tensors("from-file")
    for n in a:
        assert torch.equal(a[n], b[n]), n
    want = dir_tensors(models["ft1-fp32"])  # base + τ is the fine-tune again
    for n, t in a.items():
        torch.testing.assert_close(t, want[n], rtol=0, atol=2e-7)
    assert_refused(
        run,
        tv,
        ["merge", "-p", "task-arithmetic", "--base", tau, "tv"],
        f"{tau} holds a task vector, not a model; a base must be a full model",
        code=2,
    )


def test_directory_export_of_a_task_vector_is_not_loadable_as_a_model(run, models, tv, tmp_path):
    out = tmp_path / "tau"
    assert run("--quiet", "export", "tv", out).exit_code == 0
    assert not (out / "config.json").exists()
    assert json.loads((out / "compressor.json").read_text())["content"] == "delta"
    r = run(
        "--quiet", "merge", "-p", "task-arithmetic", "--base", models["base-fp32"], out, "--json"
    )
    assert r.exit_code == 0, r.output
    merged = artifact_tensors(json.loads(r.stdout)["id"])
    want = dir_tensors(models["ft1-fp32"])
    torch.testing.assert_close(merged["model.norm.weight"], want["model.norm.weight"])


def test_unmarked_file_from_another_tool_is_still_a_model(run, models, tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file(dir_tensors(models["ft1-fp32"]), plain)  # no metadata at all
    r = run("--quiet", "apply", "-p", "task-vector", "--base", models["base-fp32"], plain)
    assert r.exit_code == 0, r.output


def test_sentence_transformers_modules_survive_export(run, minilm, tmp_path):
    from sentence_transformers import SentenceTransformer

    args = ["apply", "-p", "task-vector", "--base", minilm["base"], minilm["ft"], "-n", "st"]
    assert run("--quiet", *args).exit_code == 0
    out = tmp_path / "out"
    assert run("--quiet", "export", "st", out, "--base", minilm["base"]).exit_code == 0
    assert (out / "1_Pooling" / "config.json").is_file()
    model = SentenceTransformer(str(out), device="cpu")
    emb = model.encode(["hello world"])
    assert emb.shape == (1, 384)


def test_hub_id_resolves_from_the_local_cache(run, models, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny-llama"
    snap = repo / "snapshots" / "0123456789abcdef"
    shutil.copytree(models["ft1-fp32"], snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = run(
        "--quiet",
        "apply",
        "-p",
        "task-vector",
        "--base",
        models["base-fp32"],
        "org/tiny-llama",
        "--json",
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["parents"][1]["label"] == str(snap.resolve())


def test_store_import_and_external_removal_by_label(run, models, private_store):
    r = run("store", "import", models["ft1-fp32"], "-n", "ft")
    assert (
        r.output.startswith("Created ft@1")
        and "imported from" in r.output
        and "None" not in r.output
    )
    run("store", "rm", "ft")
    assert run("store", "rm", str(models["ft1-fp32"])).output.startswith(
        f"Removed {models['ft1-fp32']}"
    )


def test_plugins_say_which_verbs_have_no_method(run):
    # every verb has a built-in method now (sample came with NeuMeta): no such line
    assert "No installed method for" not in run("plugins").output


def test_plugins_show_is_plain_text_with_an_example(run):
    for name in ("compeft", "ties", "matformer", "lora-tucker"):
        out = run("plugins", "show", name).output
        assert "``" not in out and ":func:" not in out, name
        assert "\nExample:\n  compress " in out


def test_tucker_warns_when_tensors_stay_dense(run, models):
    args = [
        "--quiet",
        "apply",
        "-p",
        "tucker",
        "--base",
        models["base-fp32"],
        models["ft1-fp32"],
        "-o",
        "rel_error",
        "0.001",
    ]
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert (
        "tensors stay dense" in r.stderr
        and "where rel_error 0.001 needs ranks no smaller than dense" in r.stderr
    )


def test_default_store_is_the_platform_data_dir(monkeypatch, tmp_path):
    import platformdirs

    from compressor.store import default_store_dir

    monkeypatch.delenv("COMPRESSOR_STORE")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert default_store_dir() == tmp_path / "data" / "compressor"
    old = tmp_path / "config" / "compressor"
    old.mkdir(parents=True)
    (old / "store.db").write_bytes(b"x")
    assert default_store_dir() == old  # an earlier release's store stays in use
    assert platformdirs is not None
