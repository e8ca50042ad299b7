"""SketchTune: code packing, the sketch against independent calculations, tuning only the
tables, decoding a tune through its sketch, and every refusal."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import artifact_tensors, assert_refused, dir_tensors

from compressor.plugins.sketchtune import sketch_weight, swap_in_sketches
from compressor.plugins.sketchtune.quantize import (
    activation_order,
    assign_codes,
    decode_tables,
    inverse_hessian_factor,
    pack_codes,
    refit_tables,
    uniform_nearest,
    unpack_codes,
    weighted_kmeans,
)

OPTS = {"bits": 4, "groups_per_row": 1, "exponent": None, "damp": 0.01, "block_size": 16}
OPTS |= {"iters": 30, "act_order": False}


def _raw(ref: str) -> dict[str, torch.Tensor]:
    from compressor.app.refs import resolve
    from compressor.store import open_store

    store = open_store()
    try:
        with resolve(store, ref, raw=("sketchtune",)).source as src:
            return {n: src.get(n) for n in src.names()}
    finally:
        store.close()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_round_trip(bits):
    gen = torch.Generator().manual_seed(bits)
    for cols in (1, 7, 8, 13, 64):
        codes = torch.randint(2**bits, (5, cols), generator=gen, dtype=torch.uint8)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.shape == (5, -(-cols * bits // 8))
        assert torch.equal(unpack_codes(packed, bits, cols), codes)


def test_packing_layout_is_most_significant_bit_first():
    four = torch.tensor([[0xA, 0x3, 0xF]], dtype=torch.uint8)
    assert pack_codes(four, 4).tolist() == [[0xA3, 0xF0]]  # high nibble first
    two = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)
    assert pack_codes(two, 2).tolist() == [[0b01101100, 0b11000000]]
    three = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    bits = "".join(f"{c:03b}" for c in three[0].tolist())
    assert pack_codes(three, 3).tolist() == [[int(bits[i : i + 8], 2) for i in (0, 8, 16)]]


def test_plain_codes_are_the_nearest_table_entries():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    for hessian in (None, torch.eye(64)):  # H = I: U is diagonal, so no error moves
        tables, codes, values, _ = sketch_weight(w, hessian, OPTS)
        t = tables.float()[:, 0, :]  # one group per row
        nearest = (w[:, :, None] - t[:, None, :]).abs().argmin(-1)
        assert torch.equal(codes.long(), nearest)
        assert torch.equal(values, t.gather(1, nearest))


def test_kmeans_centroids_are_weighted_means_of_their_points():
    gen = torch.Generator().manual_seed(1)
    points, weights = torch.randn(6, 50, generator=gen), torch.rand(6, 50, generator=gen) + 0.1
    cents = weighted_kmeans(points, weights, 4, iters=200)
    assert torch.all(cents[:, 1:] >= cents[:, :-1])
    near = (points[:, :, None] - cents[:, None, :]).abs().argmin(-1)
    for r in range(6):
        for k in range(4):
            sel = near[r] == k
            if sel.any():
                mean = (points[r, sel] * weights[r, sel]).sum() / weights[r, sel].sum()
                assert float(cents[r, k]) == pytest.approx(float(mean), abs=1e-5)


def test_table_gradient_is_a_scatter_add_and_matches_finite_differences():
    gen = torch.Generator().manual_seed(2)
    tables = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
    codes = torch.randint(4, (3, 8), generator=gen, dtype=torch.uint8)
    upstream = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    (decode_tables(tables, codes) * upstream).sum().backward()
    expected = torch.zeros(3, 2, 4, dtype=torch.float64)
    for i in range(3):
        for j in range(8):
            expected[i, j // 4, int(codes[i, j])] += upstream[i, j]
    assert torch.allclose(tables.grad, expected)

    # through the module that training swaps in (checkpointed: Ŵ rebuilt in backward)
    linear = torch.nn.Linear(8, 3, bias=True).double()
    net = torch.nn.Sequential(linear)

    class Sketch:
        label = "test"
        layers = {"0.weight": {"shape": [3, 8]}}

        def infos(self):  # the checkpoint's names: the module's own
            return {"0.weight": None, "0.bias": None}

        def tables(self, name):
            return tables.detach().clone()

        def codes(self, name):
            return codes

    params = swap_in_sketches(net, Sketch())
    x = torch.randn(5, 8, generator=gen, dtype=torch.float64)

    def loss():
        return torch.tanh(net(x)).pow(2).sum()

    loss().backward()
    t = params["0.weight"]
    eps = 1e-6
    for index in [(0, 0, 1), (2, 1, 3), (1, 0, 0)]:
        with torch.no_grad():
            t[index] += eps
            up = float(loss())
            t[index] -= 2 * eps
            down = float(loss())
            t[index] += eps
        assert float(t.grad[index]) == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)
    assert not linear.bias.requires_grad and linear.bias.grad is None


def _gptq_reference(w, h, bits, group, order=None):
    """GPTQ written out column by column (no blocks), on the same static min/max grid,
    visiting the columns in ``order`` (each keeps its own group's grid)."""
    order = torch.arange(w.shape[1]) if order is None else order
    u, _ = inverse_hessian_factor(h[order][:, order], 0.01)
    nearest = uniform_nearest(w, bits, group)
    w = w[:, order].clone()
    q = torch.empty_like(w)
    for j in range(w.shape[1]):
        _, q[:, j : j + 1] = nearest(order[j : j + 1], w[:, j : j + 1])
        err = (w[:, j] - q[:, j]) / u[j, j]
        w[:, j + 1 :] -= err[:, None] * u[j, j + 1 :][None, :]
    out = torch.empty_like(q)
    out[:, order] = q
    return out


def test_error_feedback_in_blocks_equals_gptq_column_by_column_and_helps():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(400, 48, generator=gen) @ torch.randn(48, 48, generator=gen)  # correlated
    h = 2 * x.T @ x / 400
    w = torch.randn(16, 48, generator=gen)
    u, _ = inverse_hessian_factor(h, 0.01)
    _, blocked = assign_codes(w, u, uniform_nearest(w, 3, 16), block=16)
    assert torch.allclose(blocked, _gptq_reference(w, h, 3, 16), atol=1e-4)

    def out_err(q):
        d = w - q
        return float(torch.einsum("oi,ij,oj->", d, h, d))

    _, rtn = assign_codes(w, None, uniform_nearest(w, 3, 16))
    assert out_err(blocked) < out_err(rtn)
    plain = sketch_weight(w, None, {**OPTS, "bits": 2})[2]
    aware = sketch_weight(w, h, {**OPTS, "bits": 2})[2]
    assert out_err(aware) < out_err(plain)


def test_act_order_visits_the_largest_inputs_first_and_keeps_each_columns_grid():
    gen = torch.Generator().manual_seed(4)
    scale = torch.linspace(0.2, 5.0, 48)[torch.randperm(48, generator=gen)]  # uneven inputs
    x = torch.randn(400, 48, generator=gen) @ torch.randn(48, 48, generator=gen) * scale
    h = 2 * x.T @ x / 400
    w = torch.randn(16, 48, generator=gen)
    order = activation_order(h)
    assert torch.equal(order, torch.diagonal(h).argsort(descending=True))
    assert float(h[order[0], order[0]]) == float(torch.diagonal(h).max())
    u, _ = inverse_hessian_factor(h[order][:, order], 0.01)
    codes, q = assign_codes(w, u, uniform_nearest(w, 3, 16), block=16, order=order)
    assert torch.allclose(q, _gptq_reference(w, h, 3, 16, order), atol=1e-4)
    assert not torch.allclose(q, _gptq_reference(w, h, 3, 16), atol=1e-4)
    # codes come back in the columns' own order, on their own group's grid
    grid = uniform_nearest(w, 3, 16)
    for j in (0, 17, 47):
        _, own = grid(torch.tensor([j]), q[:, j : j + 1])
        assert torch.allclose(own[:, 0], q[:, j], atol=1e-6)
    # the sketch with act-order: the same tables' codes, fewer output errors than none
    opts = {**OPTS, "bits": 2, "refit": 0}
    with_order = sketch_weight(w, h, {**opts, "act_order": True})
    without = sketch_weight(w, h, opts)
    assert torch.allclose(with_order[0].float(), without[0].float(), atol=1e-3)  # same k-means
    assert with_order[3] != without[3]


def test_refit_tables_solve_the_output_least_squares_with_the_codes_fixed():
    """With the codes fixed, Ŵ is linear in the table entries; the refit equals the least
    squares solution of ‖(W − Ŵ)X‖ found by torch.linalg.lstsq over an explicit design
    matrix (float64), leaves an entry no column uses as it was, and lowers the error, more
    with more conjugate-gradient steps."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(300, 24, generator=gen) @ torch.randn(24, 24, generator=gen)
    h = 2 * x.T @ x / 300
    w = torch.randn(5, 24, generator=gen)
    groups, k = 2, 4
    codes = torch.randint(0, k, (5, 24), generator=gen, dtype=torch.uint8)
    codes[0, :12] = torch.tensor([0, 1, 2] * 4, dtype=torch.uint8)  # row 0, group 0: no 3
    tables = torch.randn(5, groups, k, generator=gen)
    fitted = refit_tables(w, codes, tables, h, steps=200)
    chol = torch.linalg.cholesky(h.double())  # ‖d X‖² ∝ d H dᵀ = ‖d L‖²
    for i in range(5):
        design = torch.zeros(24, groups * k, dtype=torch.float64)
        for j in range(24):
            design[j, (j // 12) * k + int(codes[i, j])] = 1
        used = design.sum(0) > 0
        a, b = (chol.T @ design[:, used]), chol.T @ w[i].double()
        want = torch.linalg.lstsq(a, b[:, None]).solution[:, 0]
        got = fitted[i].reshape(-1)
        torch.testing.assert_close(got[used].double(), want, rtol=2e-3, atol=2e-3)
        assert torch.equal(got[~used], tables[i].reshape(-1)[~used])
    assert fitted[0, 0, 3] == tables[0, 0, 3]

    def out_err(t):
        d = w - decode_tables(t, codes)
        return float(torch.einsum("oi,ij,oj->", d, h, d))

    assert out_err(fitted) < 0.5 * out_err(tables)
    errors = [out_err(refit_tables(w, codes, tables, h, steps=s)) for s in (0, 1, 4, 200)]
    assert errors[0] == pytest.approx(out_err(tables))
    assert errors == sorted(errors, reverse=True)


def test_sketch_export_loads_in_transformers_and_equals_the_decoded_tensors(run, models, tmp_path):
    from transformers import AutoModelForCausalLM

    base = models["base-fp32"]
    r = run("apply", "-p", "sketchtune", base, "-o", "groups_per_row", "2", "-n", "sk")
    assert r.exit_code == 0, r.output
    raw = _raw("sk")
    q = "model.layers.1.self_attn.q_proj"
    assert raw[f"{q}.sketch"].dtype == torch.float16
    assert tuple(raw[f"{q}.sketch"].shape) == (64, 2, 16)
    assert raw[f"{q}.codes"].dtype == torch.uint8 and tuple(raw[f"{q}.codes"].shape) == (64, 32)
    assert "model.embed_tokens.weight" in raw and "lm_head.weight" in raw  # dense
    assert f"{q}.weight" not in raw
    decoded = artifact_tensors("sk")
    by_hand = decode_tables(raw[f"{q}.sketch"].float(), unpack_codes(raw[f"{q}.codes"], 4, 64))
    assert torch.equal(decoded[f"{q}.weight"], by_hand)
    source = dir_tensors(base)
    assert set(decoded) == set(source)
    assert torch.equal(decoded["model.norm.weight"], source["model.norm.weight"])
    rel = (decoded[f"{q}.weight"] - source[f"{q}.weight"]).norm() / source[f"{q}.weight"].norm()
    assert 0 < float(rel) < 0.2

    show = json.loads(run("store", "show", "sk", "--json").stdout)
    m = show["metrics"]
    assert m["calibrated"] is False and m["sketched_tensors"] == 14
    shapes = [source[n].shape for n in show["manifest"]["layers"]]
    bits = sum(o * i * 4 + o * 2 * 16 * 16 for o, i in shapes)  # codes + fp16 tables
    assert m["bits_per_weight"] == pytest.approx(bits / sum(o * i for o, i in shapes))

    assert run("export", "sk", tmp_path / "out").exit_code == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    reference = AutoModelForCausalLM.from_pretrained(base).eval()
    reference.load_state_dict(decoded)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)


def test_calibrated_sketch_records_its_data(run, models, tmp_path):
    data = tmp_path / "calib.txt"
    data.write_text("\n".join(f"beautiful is better than ugly {i} times" for i in range(20)))
    base = models["base-fp32"]
    r = run("apply", "-p", "sketchtune", base, "-o", "data", data, "-o", "bits", "3", "-n", "c")
    assert r.exit_code == 0, r.output
    show = json.loads(run("store", "show", "c", "--json").stdout)
    cal = show["manifest"]["calibration"]
    assert cal["samples"] == 20 and cal["tokens"] > 20 and len(cal["digest"]) == 64
    assert show["metrics"]["calibrated"] is True
    errors = show["manifest"]["output_errors"]
    assert len(errors) == 14 and all(0 < e < 0.5 for e in errors.values())
    assert show["manifest"]["refit_steps"] == 16  # the default at 3 bits
    assert show["manifest"]["act_order"] is True  # the default with data
    r2 = run(
        "apply",
        "-p",
        "sketchtune",
        base,
        "-o",
        "data",
        data,
        "-o",
        "bits",
        "3",
        "-o",
        "refit",
        "0",
        "-n",
        "plain",
    )
    assert r2.exit_code == 0, r2.output
    plain = json.loads(run("store", "show", "plain", "--json").stdout)
    assert plain["manifest"]["refit_steps"] == 0
    assert plain["metrics"]["mean_output_error"] > show["metrics"]["mean_output_error"]


def test_tune_stores_only_tables_and_decodes_through_its_sketch(run, models, tmp_path):
    data = tmp_path / "train.txt"
    data.write_text("\n".join(f"now is better than never {i}" for i in range(16)))
    base = models["base-fp32"]
    assert run("apply", "-p", "sketchtune", base, "-o", "bits", "2", "-n", "sk").exit_code == 0
    args = ("-o", "data", data, "-o", "steps", "3", "-o", "lr", "0.01", "-o", "batch_size", "4")
    r = run("train", "-p", "sketchtune", "sk", *args, "-n", "tune")
    assert r.exit_code == 0, r.output
    tuned, sketch = _raw("tune"), _raw("sk")
    assert all(n.endswith(".sketch") for n in tuned) and len(tuned) == 14
    decoded = artifact_tensors("tune")
    q = "model.layers.0.mlp.down_proj"
    want = decode_tables(tuned[f"{q}.sketch"], unpack_codes(sketch[f"{q}.codes"], 2, 128))
    assert torch.equal(decoded[f"{q}.weight"], want)
    assert not torch.equal(tuned[f"{q}.sketch"], sketch[f"{q}.sketch"].float())  # it learned
    assert torch.equal(decoded["lm_head.weight"], dir_tensors(base)["lm_head.weight"])
    show = json.loads(run("store", "show", "tune", "--json").stdout)
    assert show["parents"][0]["label"] == "sk@1"
    assert show["metrics"]["trainable_parameters"] == sum(t.numel() for t in tuned.values())
    assert run("export", "tune", tmp_path / "out").exit_code == 0
    assert torch.equal(dir_tensors(tmp_path / "out")[f"{q}.weight"], want)
    # a tune of a tune still finds the codes two parents up
    assert run("train", "-p", "sketchtune", "tune", *args, "-n", "tune2").exit_code == 0
    assert artifact_tensors("tune2")[f"{q}.weight"].shape == (64, 128)
    # removing the sketch would strand its tunes: refused
    r = run("store", "rm", "sk")
    assert r.exit_code != 0


def test_bad_inputs(run, models, private_store, tmp_path):
    base = models["base-fp32"]
    for option, value, message in [
        ("bits", "5", "option 'bits' must be 2, 3 or 4; got '5'"),
        (
            "groups_per_row",
            "3",
            "groups_per_row 3 does not divide the 128 columns of 'model.layers.0.mlp.down_proj'",
        ),
        ("block_tune_lr", "0", "option 'block_tune_lr' must be positive; got '0'"),
    ]:
        command = ["apply", "-p", "sketchtune", base, "-o", option, value]
        assert_refused(run, private_store, command, message, code=2)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert_refused(
        run,
        private_store,
        ["apply", "-p", "sketchtune", base, "-o", "data", empty],
        f"{empty} holds no examples",
    )
    data = tmp_path / "train.txt"
    data.write_text("one line\n")
    assert_refused(
        run,
        private_store,
        ["apply", "-p", "sketchtune", base, "-o", "import", data, "-o", "data", data],
        "give -o import FILE or -o data CALIB, not both",
        code=2,
    )
    assert_refused(
        run,
        private_store,
        ["train", "-p", "sketchtune", base, "-o", "data", data],
        f"{base} is not a sketch; make one with `compress apply --plugin sketchtune`",
    )
    assert_refused(
        run,
        private_store,
        ["train", "-p", "sketchtune", base],
        "sketchtune training needs -o data PATH",
        code=2,
    )


@pytest.fixture
def two_tunes(run, models, tmp_path):
    """A 2-bit sketch of the tiny Llama and two tunes of it on different text."""
    base = models["base-fp32"]
    assert run("apply", "-p", "sketchtune", base, "-o", "bits", "2", "-n", "sk").exit_code == 0
    for i, words in enumerate(["errors should never pass silently", "flat is better than nested"]):
        data = tmp_path / f"t{i}.txt"
        data.write_text("\n".join(f"{words} {j}" for j in range(12)))
        args = ("-o", "data", data, "-o", "steps", "3", "-o", "lr", "0.02", "-o", "seed", str(i))
        assert run("train", "-p", "sketchtune", "sk", *args, "-n", f"tune{i}").exit_code == 0
    for ref in ("sk", "tune0", "tune1"):
        assert run("export", ref, tmp_path / ref).exit_code == 0
    return tmp_path


@pytest.mark.parametrize(
    "method, options",
    [
        ("task-arithmetic", ["-o", "weights", "0.7,0.4", "-o", "scale", "0.9"]),
        ("ties", ["-o", "density", "1.0"]),  # election and disjoint mean; trimming counts entries
    ],
)
def test_merging_tunes_on_tables_equals_merging_decoded_weights(run, two_tunes, method, options):
    d = two_tunes
    r = run("merge", "-p", method, "--base", "sk", "tune0", "tune1", *options, "-n", "tables")
    assert r.exit_code == 0, r.output
    stored = _raw("tables")
    assert all(n.endswith(".sketch") for n in stored) and len(stored) == 14  # only tables
    dense = [d / "tune0", d / "tune1"]
    r = run("merge", "-p", method, "--base", d / "sk", *dense, *options, "-n", "weights")
    assert r.exit_code == 0, r.output
    got, want = artifact_tensors("tables"), artifact_tensors("weights")
    assert set(got) == set(want)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name
    show = json.loads(run("store", "show", "tables", "--json").stdout)
    assert [p["role"] for p in show["parents"]] == ["base", "expert", "expert"]


def test_merging_a_model_that_is_no_tune_of_the_sketch_uses_decoded_weights(run, two_tunes, models):
    r = run(
        "merge", "-p", "task-arithmetic", "--base", "sk", "tune0", models["ft1-fp32"], "-n", "m"
    )
    assert r.exit_code == 0, r.output
    raw = _raw("m")
    assert "model.layers.0.mlp.down_proj.weight" in raw  # dense: the expert's codes differ


def test_import_of_the_released_format(run, models, tmp_path):
    base = models["base-fp32"]
    assert run("apply", "-p", "sketchtune", base, "-n", "ours").exit_code == 0
    raw = _raw("ours")
    released = {}
    for name, t in raw.items():
        if name.endswith(".sketch"):
            module = name.removesuffix(".sketch")
            cols = 128 if "down_proj" in module else 64
            codes = unpack_codes(raw[f"{module}.codes"], 4, cols)  # one code per byte
            released[module] = (t.clone(), codes)
    path = tmp_path / "sketched.pt"
    torch.save({"sketched_params": released}, path)
    r = run("apply", "-p", "sketchtune", base, "-o", "import", path, "-n", "imported")
    assert r.exit_code == 0, r.output
    got, want = artifact_tensors("imported"), artifact_tensors("ours")
    assert all(torch.equal(got[n], want[n]) for n in want)


class _Payload:
    """Unpickling this runs code: it would create a file named by the test."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_pickle_that_would_run_code_is_refused_and_never_run(
    run, models, private_store, tmp_path
):
    import pickle

    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"sketched_params": _Payload(target)}))
    assert_refused(
        run,
        private_store,
        ["apply", "-p", "sketchtune", models["base-fp32"], "-o", "import", path],
        f"{path} is not a plain tensor file: loading it needs arbitrary unpickling, which can "
        "run code, and compressor never does that",
    )
    assert not target.exists()


def test_block_tuning_fits_each_block_to_the_source_on_held_out_rows(run, models, tmp_path):
    """At 2 bits each block's tables are tuned to the source model's block outputs; the
    manifest's held-out errors are those of the stored tables, recomputed here from the
    exported models with transformers, and the start is the untuned sketch."""
    from transformers import AutoModelForCausalLM

    from compressor.io.sources import open_model_dir
    from compressor.plugins.sketchtune import calibration_batches

    data = tmp_path / "calib.txt"
    data.write_text("\n".join(f"errors should never pass silently {i} {i % 7}" for i in range(32)))
    base = models["base-fp32"]
    common = ("-o", "data", data, "-o", "bits", "2")
    assert run("apply", "-p", "sketchtune", base, *common, "-n", "tuned").exit_code == 0
    r = run("apply", "-p", "sketchtune", base, *common, "-o", "block_tune", "0", "-n", "plain")
    assert r.exit_code == 0, r.output
    tuned = json.loads(run("store", "show", "tuned", "--json").stdout)
    plain = json.loads(run("store", "show", "plain", "--json").stdout)
    assert tuned["manifest"]["block_tune_passes"] == 4  # the default at 2 bits
    assert tuned["manifest"]["block_tune_lr"] == 3e-4
    assert plain["manifest"]["block_tune_passes"] == 0 and plain["manifest"]["block_errors"] == {}
    errors = tuned["manifest"]["block_errors"]
    assert set(errors) == {"0", "1"}
    assert all(after <= before for before, after in errors.values())
    assert any(after < 0.9 * before for before, after in errors.values())
    assert tuned["metrics"]["mean_block_error"] == pytest.approx(
        sum(a for _, a in errors.values()) / 2
    )

    # layer 0 reads the embeddings in every run: its held-out error (the last of the four
    # batches of 8 rows) can be recomputed from the exported models alone
    with open_model_dir(base) as source:
        held_out = calibration_batches(source, str(data), 128, 512)[-1]
    reference = AutoModelForCausalLM.from_pretrained(base).eval()

    def layer0_error(ref: str) -> float:
        out = tmp_path / ref
        assert run("export", ref, out).exit_code == 0
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            got = model(**held_out, output_hidden_states=True).hidden_states[1]
            want = reference(**held_out, output_hidden_states=True).hidden_states[1]
        keep = held_out["attention_mask"].bool()
        return float(((got - want)[keep] ** 2).sum() / (want[keep] ** 2).sum())

    assert layer0_error("tuned") == pytest.approx(errors["0"][1], rel=1e-3)
    assert layer0_error("plain") == pytest.approx(errors["0"][0], rel=1e-3)


def test_block_tuning_with_one_calibration_batch_is_skipped_with_a_warning(run, models, tmp_path):
    data = tmp_path / "calib.txt"
    data.write_text("\n".join(f"flat is better than nested {i}" for i in range(8)))
    args = ("-o", "data", data, "-o", "bits", "2", "-n", "few")
    r = run("apply", "-p", "sketchtune", models["base-fp32"], *args)
    assert r.exit_code == 0, r.output
    assert (
        "Warning: sketchtune: block tuning holds out a quarter of the calibration batches "
        "(8 rows each), and 8 rows make only one: it is skipped (give 9 rows or more)\n"
    ) in r.stderr
    manifest = json.loads(run("store", "show", "few", "--json").stdout)["manifest"]
    assert manifest["block_tune_passes"] == 0 and manifest["block_errors"] == {}


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_a_block_run_in_chunks_of_rows_equals_the_block_run_whole(family, models, minilm, tmp_path):
    """Block tuning runs a batch through a block a few rows at a time (its memory): the
    rows of each argument cut by the batch dimension (masks, positions, rotary tables)
    give the outputs of the whole batch, for a Llama and a BERT block."""
    from compressor.io.sources import open_model_dir
    from compressor.models.blockwise import hidden_states, run_blockwise
    from compressor.plugins.sketchtune import SketchPlan, calibration_batches, row_chunks

    data = tmp_path / "calib.txt"
    data.write_text("\n".join("beautiful is better than ugly " * (1 + i % 5) for i in range(12)))
    path = models["base-fp32"] if family == "llama" else minilm["base"]
    checked = []

    def check(layer, block, calibration):
        for args, kwargs in calibration.inputs:
            with torch.no_grad():
                whole = hidden_states(block(*args, **kwargs))
                parts = [
                    hidden_states(block(*a, **kw))
                    for _rows, a, kw in row_chunks(args, kwargs, tokens=args[0].shape[1])
                ]
            assert len(parts) == args[0].shape[0] > 1  # one row a chunk
            assert torch.allclose(torch.cat(parts), whole, atol=1e-5)
            checked.append(layer)

    with open_model_dir(path) as source:
        plan = SketchPlan(source, 1)
        inputs = calibration_batches(source, str(data), 12, 64)
        suffixes = tuple(plan.suffixes())
        run_blockwise(plan.layout, inputs, lambda *a: None, suffixes, transform=check)
    assert len(checked) == 2 * plan.layout.num_layers  # 2 batches in every layer
