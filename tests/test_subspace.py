"""TSV-M and Iso-C against float64 calculations written here from their definitions
(issue #32), on a tiny Llama and four experts."""

from __future__ import annotations

import pytest
import torch
from conftest import artifact_tensors, assert_refused, dir_tensors

from compressor.demo.models import save_finetune


@pytest.fixture(scope="module")
def four(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("four")
    base = models["base-fp32"]
    extra = [save_finetune(base, root / f"e{i}", seed=10 + i, strength=0.05) for i in (3, 4)]
    return base, [models["ft1-fp32"], models["ft2-fp32"], *extra]


def _svd(m):
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u, s, vh


def _orthogonal(m):
    """argmin ‖Q − M‖ over Q with orthonormal columns (or rows): the polar factor."""
    u, _, vh = _svd(m)
    return u @ vh


def tsv_reference(taus):
    k = min(taus[0].shape) // len(taus)
    parts = [_svd(t) for t in taus]
    u = torch.cat([p[0][:, :k] for p in parts], dim=1)
    s = torch.cat([p[1][:k] for p in parts])
    v = torch.cat([p[2][:k].T for p in parts], dim=1)  # right singular vectors as columns
    return _orthogonal(u) @ torch.diag(s) @ _orthogonal(v).T


def iso_reference(taus):
    u, s, vh = _svd(sum(taus))
    return s.mean() * (u @ vh)


def _expected(base, experts, rule, weights, scale):
    b = dir_tensors(base)
    fts = [dir_tensors(e) for e in experts]
    out = {}
    for name, t0 in b.items():
        taus = [(ft[name].double() - t0.double()) * w for ft, w in zip(fts, weights, strict=True)]
        token = "embed" in name or name.endswith("lm_head.weight")
        delta = rule(taus) if t0.dim() == 2 and not token else torch.stack(taus).mean(0)
        out[name] = (t0.double() + scale * delta).float()
    return out


@pytest.mark.parametrize("plugin, rule", [("tsv-m", tsv_reference), ("iso-c", iso_reference)])
@pytest.mark.parametrize("weights, scale", [((1, 1, 1, 1), 1.0), ((1, 0.5, 2, 1), 0.7)])
def test_merge_equals_its_definition_in_float64(run, four, plugin, rule, weights, scale):
    base, experts = four
    args = ["--quiet", "merge", "-p", plugin, "--base", base, *experts, "-n", "m"]
    args += ["-o", "weights", ",".join(map(str, weights)), "-o", "scale", str(scale)]
    r = run(*args)
    assert r.exit_code == 0, r.output
    got, want = artifact_tensors("m"), _expected(base, experts, rule, weights, scale)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    q = "model.layers.0.self_attn.q_proj.weight"
    ta = dir_tensors(base)[q] + sum(dir_tensors(e)[q] - dir_tensors(base)[q] for e in experts)
    assert (got[q] - ta).abs().max() > 1e-3  # not task arithmetic in disguise


def test_a_config_runs_them_under_their_names(run, four, tmp_path):
    base, experts = four
    config = tmp_path / "iso.yml"
    config.write_text(
        f"merge_method: iso_c\nbase_model: {base}\ndtype: float32\nparameters: {{lambda: 0.8}}\n"
        "models:\n" + "".join(f"  - model: {e}\n" for e in experts)
    )
    assert run("--quiet", "merge", "--config", config, "-n", "cfg").exit_code == 0
    args = ["--quiet", "merge", "-p", "iso-c", "--base", base, *experts, "-o", "scale", "0.8"]
    assert run(*args, "-n", "cli").exit_code == 0
    a, b = artifact_tensors("cfg"), artifact_tensors("cli")
    assert all(torch.equal(a[n], b[n]) for n in b)


@pytest.mark.parametrize("plugin", ["tsv-m", "iso-c"])
def test_one_expert_is_refused(run, four, private_store, plugin):
    base, experts = four
    assert_refused(
        run,
        private_store,
        ["merge", "-p", plugin, "--base", base, experts[0]],
        f"method '{plugin}' needs at least 2 experts; got 1",
        code=2,
    )
