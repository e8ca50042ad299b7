"""TSV-M, Iso-C, Iso-CTS and WUDI against float64 calculations written here from their
definitions (issue #32), on a tiny Llama and four experts."""

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
    """Each τ's top ⌊r/T⌋ triplets (those of nonzero σ: numerical rank, float32 data)."""
    k = min(taus[0].shape) // len(taus)
    parts = [_svd(t) for t in taus]
    ks = [min(k, int(torch.linalg.matrix_rank(t.float()))) for t in taus]
    u = torch.cat([p[0][:, :n] for p, n in zip(parts, ks, strict=True)], dim=1)
    s = torch.cat([p[1][:n] for p, n in zip(parts, ks, strict=True)])
    v = torch.cat([p[2][:n].T for p, n in zip(parts, ks, strict=True)], dim=1)
    return _orthogonal(u) @ torch.diag(s) @ _orthogonal(v).T


def iso_reference(taus):
    u, s, vh = _svd(sum(taus))
    return s.mean() * (u @ vh)


def iso_cts_reference(taus, fraction=0.8):
    """The sum's top directions + each τ's top directions outside them, flat spectrum."""
    r, n = min(taus[0].shape), len(taus)
    common = int(r * fraction)
    common = r - round((r - common) / n) * n  # the rest splits evenly over the tasks
    per_task = (r - common) // n
    u, s, vh = _svd(sum(taus))
    uc = u[:, :common]
    us, ss, vs = [uc], [s[:common]], [vh[:common].T]
    for t in taus:
        ut, st, vht = _svd(t - uc @ uc.T @ t)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vs.append(vht[:per_task].T)
    flat = torch.cat(ss).mean()
    return flat * _orthogonal(torch.cat(us, dim=1)) @ _orthogonal(torch.cat(vs, dim=1)).T


def wudi_reference(taus, steps=300, lr=1e-5):
    """Adam (β 0.9, 0.999; ε 1e-8), written out, on Σ_t ‖(Δ − τ_t) τ_tᵀ‖² / ‖τ_t‖² from Στ_t."""
    delta = sum(taus).clone()
    m, v = torch.zeros_like(delta), torch.zeros_like(delta)
    for k in range(1, steps + 1):
        g = sum(2 * ((delta - t) @ t.T) @ t / (t**2).sum() for t in taus)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g**2
        m_hat, v_hat = m / (1 - 0.9**k), v / (1 - 0.999**k)
        delta = delta - lr * m_hat / (v_hat.sqrt() + 1e-8)
    return delta


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


RULES = [
    ("tsv-m", tsv_reference),
    ("iso-c", iso_reference),
    ("iso-cts", iso_cts_reference),
    ("wudi", wudi_reference),
]


@pytest.mark.parametrize("plugin, rule", RULES)
@pytest.mark.parametrize("weights, scale", [((1, 1, 1, 1), 1.0), ((1, 0.5, 2, 1), 0.7)])
def test_merge_equals_its_definition_in_float64(run, four, plugin, rule, weights, scale):
    base, experts = four
    args = ["--quiet", "merge", "-p", plugin, "--base", base, *experts, "-n", "m"]
    args += ["-o", "weights", ",".join(map(str, weights)), "-o", "scale", str(scale)]
    r = run(*args)
    assert r.exit_code == 0, r.output
    got, want = artifact_tensors("m"), _expected(base, experts, rule, weights, scale)
    assert got.keys() == want.keys()
    for name in want:  # WUDI runs Adam in float32, as its authors do
        atol = 1e-5 if plugin == "wudi" else 1e-6
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=atol, msg=name)
    q = "model.layers.0.self_attn.q_proj.weight"
    ta = dir_tensors(base)[q] + sum(dir_tensors(e)[q] - dir_tensors(base)[q] for e in experts)
    assert (got[q] - ta).abs().max() > 1e-3  # not task arithmetic in disguise


@pytest.mark.parametrize(
    "config_name, plugin, params, options",
    [
        ("iso_c", "iso-c", "{lambda: 0.8}", ["scale", "0.8"]),
        ("iso_cts", "iso-cts", "{common_space_fraction: 0.6}", ["common", "0.6"]),
        ("wudi", "wudi", "{iter_num: 20, lr: 1.0e-4}", ["steps", "20", "lr", "1e-4"]),
        (
            "tsv_m",
            "tsv-m",
            "{calibrate: svc, svc_alpha: 0.5}",
            ["calibrate", "svc", "svc_alpha", "0.5"],
        ),
    ],
)
def test_a_config_runs_them_under_their_names(
    run, four, tmp_path, config_name, plugin, params, options
):
    base, experts = four
    config = tmp_path / "c.yml"
    config.write_text(
        f"merge_method: {config_name}\nbase_model: {base}\ndtype: float32\n"
        f"parameters: {params}\nmodels:\n" + "".join(f"  - model: {e}\n" for e in experts)
    )
    assert run("--quiet", "merge", "--config", config, "-n", "cfg").exit_code == 0
    pairs = [x for k, v in zip(options[::2], options[1::2], strict=True) for x in ("-o", k, v)]
    args = ["--quiet", "merge", "-p", plugin, "--base", base, *experts, *pairs]
    assert run(*args, "-n", "cli").exit_code == 0
    a, b = artifact_tensors("cfg"), artifact_tensors("cli")
    assert all(torch.equal(a[n], b[n]) for n in b)


def test_wudi_with_more_steps_and_iso_cts_with_another_split(run, four):
    """The options reach the rules: WUDI far from its start, Iso-CTS with half common."""
    base, experts = four
    for plugin, opts, rule in (
        ("wudi", ["steps", "40", "lr", "1e-3"], lambda taus: wudi_reference(taus, 40, 1e-3)),
        ("iso-cts", ["common", "0.5"], lambda taus: iso_cts_reference(taus, 0.5)),
    ):
        pairs = [x for k, v in zip(opts[::2], opts[1::2], strict=True) for x in ("-o", k, v)]
        r = run("--quiet", "merge", "-p", plugin, "--base", base, *experts, *pairs, "-n", plugin)
        assert r.exit_code == 0, r.output
        got, want = artifact_tensors(plugin), _expected(base, experts, rule, (1,) * 4, 1.0)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("plugin", ["tsv-m", "iso-c", "iso-cts", "wudi"])
def test_one_expert_is_refused(run, four, private_store, plugin):
    base, experts = four
    assert_refused(
        run,
        private_store,
        ["merge", "-p", plugin, "--base", base, experts[0]],
        f"method '{plugin}' needs at least 2 experts; got 1",
        code=2,
    )


def test_iso_c_by_newton_schulz_matches_the_svd(run, four):
    """The matrix-product route to U·Vᵀ lands within 1e-5 of the SVD's."""
    base, experts = four
    args = ["--quiet", "merge", "-p", "iso-c", "--base", base, *experts]
    assert run(*args, "-n", "svd").exit_code == 0
    assert run(*args, "-o", "polar", "newton-schulz", "-n", "ns").exit_code == 0
    a, b, t0 = artifact_tensors("svd"), artifact_tensors("ns"), dir_tensors(base)
    for name in a:
        da, db = a[name].double() - t0[name].double(), b[name].double() - t0[name].double()
        if da.norm() > 0:
            assert float((da - db).norm() / da.norm()) < 1e-5, name


def test_low_rank_task_vectors_keep_only_their_nonzero_directions():
    """A rank-2 sum: Iso-C is mean(σ₁, σ₂)·U₂V₂ᵀ, not the null space's arbitrary vectors."""
    from compressor.plugins.subspace.rules import iso_cts_merge, iso_merge

    g = torch.Generator().manual_seed(0)
    taus = [
        torch.randn(12, 1, generator=g, dtype=torch.float64)
        @ torch.randn(1, 9, generator=g, dtype=torch.float64)
        for _ in range(2)
    ]
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    want = s[:2].mean() * u[:, :2] @ vh[:2]
    torch.testing.assert_close(iso_merge(taus), want)
    torch.testing.assert_close(iso_merge(taus, "newton-schulz"), want, rtol=1e-5, atol=1e-6)
    assert torch.linalg.matrix_rank(iso_cts_merge(taus)) == 2


def svc_reference(factors, taus, alpha):
    """SVC from its definition, one singular direction of Δ = U·diag(s)·Vᵀ at a time."""
    u, s, vh = factors
    delta = (u * s) @ vh
    out = torch.zeros_like(delta)
    for r in range(s.numel()):
        m = u[:, r] @ delta
        ratios = []
        for t in taus:
            a = u[:, r] @ t
            ratios.append(float(m @ a / (a @ a)))
        eta = sum(max(x, alpha) for x in ratios) / len(ratios)
        out += (s[r] / eta) * torch.outer(u[:, r], vh[r])
    return out


def tsv_factors_reference(taus):
    k = min(taus[0].shape) // len(taus)
    parts = [_svd(t) for t in taus]
    u = _orthogonal(torch.cat([p[0][:, :k] for p in parts], dim=1))
    vh = _orthogonal(torch.cat([p[2][:k] for p in parts], dim=0))
    return u, torch.cat([p[1][:k] for p in parts]), vh


def iso_factors_reference(taus):
    u, s, vh = _svd(sum(taus))  # Iso-C's Δ has one σ: its basis is the sum's
    return u, s.mean().expand(s.numel()), vh


@pytest.mark.parametrize(
    "plugin, factors, alpha",
    [
        ("iso-c", iso_factors_reference, 0.25),
        ("tsv-m", tsv_factors_reference, 1.0),
        ("wudi", lambda taus: _svd(wudi_reference(taus)), 0.25),  # float32 Adam, then SVC
    ],
)
def test_singular_value_calibration_follows_its_definition(run, four, plugin, factors, alpha):
    """-o calibrate svc, with the authors' α: 1 for TSV-M, 1/T for the others."""
    base, experts = four
    args = ["--quiet", "merge", "-p", plugin, "--base", base, *experts, "-o", "calibrate", "svc"]
    assert run(*args, "-n", "svc").exit_code == 0
    got = artifact_tensors("svc")
    want = _expected(
        base, experts, lambda taus: svc_reference(factors(taus), taus, alpha), (1,) * 4, 1.0
    )
    for name in want:
        atol = 1e-5 if plugin == "wudi" else 1e-6
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=atol, msg=name)
