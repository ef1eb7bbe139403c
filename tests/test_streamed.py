"""The streamed family on the CPU: plans, the interpreter of its IR against float64, the printed
source parsed back (and mutations of it caught), the compile route, and bad tables caught."""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.sparse as sp

import sparsert_cli as sparsert
from sparsert_cli.families import family_of, get_family
from sparsert_cli.families.streamed import (StreamParams, StreamPlan, build_plan, candidates,
                                            default_params, lower)
from sparsert_cli.interp import PlanExecutionError, execute
from sparsert_cli.problem_shape import Epilogue, Geometry
from sparsert_cli.render import PrintedMismatch, stream



def sparse(shape, density, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) >= density] = 0
    return w


def _weight(geometry: Geometry, density: float, seed: int) -> sp.csr_matrix:
    return sp.random(geometry.out_channels, geometry.taps, density=density, random_state=seed,
                     format="csr", dtype=np.float32)


SHAPES = {
    "gemm_odd": (sparse((37, 53), 0.3, 1), dict(n=129)),
    "pw_batch2": (sparse((40, 24, 1, 1), 0.3, 4), dict(op="conv", input_shape=(2, 24, 9, 12))),
    "pw_stride2": (sparse((20, 12, 1, 1), 0.3, 5), dict(op="conv", input_shape=(1, 12, 11, 9),
                                                         stride=2)),
    "3x3_pad1": (sparse((24, 16, 3, 3), 0.2, 6), dict(op="conv", input_shape=(1, 16, 13, 10),
                                                       padding=1)),
    "3x3_s2_b2": (sparse((12, 8, 3, 3), 0.3, 7), dict(op="conv", input_shape=(2, 8, 9, 7),
                                                       stride=2, padding=1)),
    "3x3_pad0": (sparse((10, 6, 3, 3), 0.4, 8), dict(op="conv", input_shape=(1, 6, 8, 8))),
}
PRECISIONS = [("fp32", "fp32"), ("fp16", "fp16"), ("fp16", "fp32"), ("bf16", "fp32")]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_streamed_kernels_compile_and_match_float64_on_the_cpu(name, precision):
    weight, shape = SHAPES[name]
    rows = weight.shape[0]
    for params, epilogue in (
            (StreamParams(32, 2, 2, 3, 4), None),
            (StreamParams(64, 8, 1, 1, 2), {"bias": np.linspace(-1, 1, rows),
                                            "activation": "relu6", "residual": True}),
            (StreamParams(32, 1, 4, 7, 1), {"activation": "relu"}),
            (StreamParams(64, 2, 2, 3, 4, "smem"), {"bias": np.linspace(-1, 1, rows),
                                                    "residual": True}),
            (StreamParams(32, 8, 1, 2, 8, "smem"), None),
            (StreamParams(64, 1, 2, 3, 4, "ring"), {"bias": np.linspace(-1, 1, rows),
                                                    "activation": "relu"}),
            (StreamParams(32, 4, 4, 2, 2, "ring"), None),
            (StreamParams(32, 2, 2, 3, 4, "smem", 2), {"bias": np.linspace(-1, 1, rows),
                                                       "activation": "relu6", "residual": True}),
            (StreamParams(64, 1, 1, 1, 2, "smem", 3), None),
            (StreamParams(32, 4, 2, 2, 4, "shfl", 4), {"activation": "relu"})):
        kernel = sparsert.compile_kernel(weight, **shape, dtype=precision[0],
                                         accumulate=precision[1], tuned=False, cache=None,
                                         epilogue=epilogue, plan=params)
        assert kernel.cubin[:4] == b"\x7fELF" and kernel.family == "streamed"
        result = kernel.verify_cpu(seed=3)
        assert result["ok"], (name, precision, params, result)


def test_plans_balance_rows_and_keep_every_nonzero_in_tap_order():
    geometry = Geometry(1, 32, 6, 6, 40, 3, 1, 1)
    csr = _weight(geometry, 0.15, 0)
    plan = build_plan(csr, geometry, StreamParams(32, 1, 2, 5, 4))
    assert isinstance(plan, StreamPlan) and family_of(plan) is get_family("streamed")
    assert sorted(plan.row_out.tolist()) == list(range(40)) and plan.nnz == csr.nnz
    assert plan.workers % plan.params.warps == 0 and plan.grid[0] * 2 == plan.workers
    loads = [int(plan.seg[i, -1] - plan.seg[i, 0]) for i in range(len(plan.row_out))]
    per_worker = [sum(loads[plan.work[w]:plan.work[w + 1]]) for w in range(plan.workers)]
    assert max(per_worker) <= np.mean(per_worker) + max(loads) + 8
    for i in range(len(plan.row_out)):      # segments = kernel taps (r, s), in order
        for t in range(plan.segments):
            lo, hi = plan.seg[i, t], plan.seg[i, t + 1]
            assert (hi - lo) % 8 == 0       # padded to whole groups, with zero weights last
            real = plan.values[lo:hi] != 0
            assert np.all(real[:np.count_nonzero(real)])
            offsets = plan.offsets[lo:hi]
            assert np.all(np.diff(offsets[real]) > 0) and np.all(np.isin(offsets, offsets[real]))
            rs = offsets % (6 * 6)
            assert np.all((rs // 6) * 3 + rs % 6 == t)


def test_defaults_and_candidates_fit_every_builtin_problem():
    from sparsert_cli.build import geometry_for
    from sparsert_cli.problems import builtin_problems

    for problem in builtin_problems().values():
        geometry = geometry_for(problem)
        nnz = geometry.out_channels * geometry.taps // 10
        for precision in ("fp32", "fp16"):
            default = default_params(geometry, nnz, precision=precision)
            found = candidates(geometry, nnz, precision)
            assert found[0] == default and len(set(found)) == len(found) >= 3
            assert all(p.validate() is p for p in found)


def _ir(precision=("fp32", "fp32"), epilogue=Epilogue(), geometry=None, params=None):
    geometry = geometry or Geometry(1, 16, 7, 7, 12, 3, 1, 1)
    csr = _weight(geometry, 0.3, 1)
    if precision[0] == "fp16":
        csr.data = csr.data.astype(np.float16).astype(np.float32)
    plan = build_plan(csr, geometry, params or StreamParams(32, 1, 2, 3, 4), epilogue, *precision)
    return plan, lower(plan)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("stage", ["shfl", "smem", "ring"])
def test_printed_source_parses_back_to_its_ir(precision, stage):
    epi = Epilogue(bias=tuple(np.linspace(-2, 2, 12)), activation="relu6", residual=True)
    _, ir = _ir(precision, epi, params=StreamParams(32, 1, 2, 3, 4, stage))
    assert ir.stage == stage
    source = stream.print_stream(ir)
    stream.check_printed(ir, source)
    assert ("__shared__" in source) == (stage != "shfl") and ("__shfl_sync" in source) == (
        stage == "shfl") and ("ENTRIES" in source) == (stage == "ring")


@pytest.mark.parametrize("mutate, why", [
    (lambda s: re.sub(r"(sparsert_ent\[\d+\] = \{)(-?\d+)", lambda m: f"{m[1]}{int(m[2]) + 1}",
                      s), "offsets"),
    (lambda s: re.sub(r"z \+ \(-8\)", "z + (-7)", s, count=1), "bases"),
    (lambda s: s.replace("CHAINS = 4", "CHAINS = 2"), "chains"),
    (lambda s: s.replace("stage=shfl", "stage=smem"), "stage"),
    (lambda s: s.replace("x += inoff;", "x += outoff;"), "pointers"),
    (lambda s: re.sub(r"(sparsert_bias\[\d+\] = \{)(-?\d+)", lambda m: f"{m[1]}{int(m[2]) ^ 1}",
                      s), "bias"),
    (lambda s: s.replace("a[0][k] + a[c][k]", "a[0][k] - a[c][k]"), "not what its IR prints"),
    (lambda s: s.replace("if (act)", "if (1)"), "not what its IR prints"),
])
def test_a_printed_source_that_says_something_else_is_caught(mutate, why):
    epi = Epilogue(bias=tuple(np.linspace(-2, 2, 12)), activation="relu", residual=True)
    _, ir = _ir(epilogue=epi)
    source = stream.print_stream(ir)
    changed = mutate(source)
    assert changed != source
    with pytest.raises(PrintedMismatch, match=why):
        stream.check_printed(ir, changed)


def test_min_blocks_prints_launch_bounds_that_parse_back_and_keep_old_keys():
    from sparsert_cli.families.streamed.plan import StreamParams as P

    _, ir = _ir(params=StreamParams(32, 1, 2, 3, 4, "smem", min_blocks=3))
    assert ir.min_blocks == 3
    source = stream.print_stream(ir)
    stream.check_printed(ir, source)
    assert '__launch_bounds__(64, 3)' in source
    for changed, why in ((source.replace("__launch_bounds__(64, 3)", "__launch_bounds__(64, 2)"),
                          "min_blocks: 3 != 2"),
                         (source.replace("__launch_bounds__(64, 3)", "__launch_bounds__(64)"),
                          "min_blocks: 3 != 1")):
        with pytest.raises(PrintedMismatch, match=why):
            stream.check_printed(ir, changed)
    # one block per SM prints the kernel as before; its key and name do not mention it
    _, one = _ir(params=StreamParams(32, 1, 2, 3, 4, "smem"))
    assert "__launch_bounds__(64)\n" in stream.print_stream(one)
    assert "min_blocks" not in P().key() and P(min_blocks=2).key()["min_blocks"] == 2
    assert P.from_dict({"min_blocks": 2, "stage": "smem"}).name() == "s32v1w4r4c4mb2"
    with pytest.raises(sparsert.UserError, match="min_blocks must be in 1..8"):
        P(min_blocks=9).validate()
    with pytest.raises(sparsert.UserError, match=r"<= 2048 \(threads an SM holds\)"):
        P(col_threads=256, warps=4, min_blocks=3).validate()


TOKEN_PRECISIONS = [("fp32", None), ("fp16", "fp16"), ("fp16", "fp32"), ("bf16", None)]
TOKEN_PLANS = [(1, 1, "smem"), (2, 2, "smem"), (4, 1, "ring"), (4, 3, "shfl")]


def _token_kernel(seed, precision, width, slices, stage, scale=1.0, span=1.0, **epilogue):
    """(kernel, weight, bias, rng): a 24 x 40 Linear layer at 70% sparsity (weights N(0,
    scale^2)), N = 20, token-major with bias (-span to span), ReLU and a residual (`epilogue`'s
    fields added or replaced)."""
    rng = np.random.default_rng(seed)
    w = (scale * rng.standard_normal((24, 40))).astype(np.float32)
    w[rng.random(w.shape) < 0.7] = 0
    bias = np.linspace(-span, span, 24)
    kernel = sparsert.compile_kernel(
        w, op="gemm", n=20, dtype=precision[0], accumulate=precision[1], tuned=False,
        cache=None, arch="sm_90",
        plan=StreamParams(32, width, 2, 3, 4, stage, k_slices=slices),
        epilogue={"bias": bias, "activation": "relu", "residual": True, "token_major": True,
                  **epilogue})
    return kernel, w, bias, rng


@pytest.mark.parametrize("precision", TOKEN_PRECISIONS)
@pytest.mark.parametrize("width, slices, stage", TOKEN_PLANS)
def test_token_major_output_matches_dense_math_in_n_by_m_order(precision, width, slices, stage):
    """Linear layers write y[n, m] (and read their residual so): every precision and vector
    width, K-slices and stages; printed, parsed back, run by the interpreter, checked against
    float64 and against a plain N x M product computed here."""
    kernel, w, bias, rng = _token_kernel(3, precision, width, slices, stage)
    assert kernel.output_shape == (20, 24) and kernel.input_shape == (40, 20)
    assert "layout=tokens" in kernel.source and "  y += outoff * 24;" in kernel.source
    x, res = kernel.random_inputs(rng)
    out = kernel.run_cpu(x, res)
    ok, err, message = kernel.check(out, x, res)
    assert ok, message
    dense = np.maximum(x.T.astype(np.float64) @ w.T.astype(np.float64) + bias + res, 0)
    tol = 1e-5 if precision[0] == "fp32" else 3e-2
    assert np.abs(out - dense).max() <= tol * np.abs(dense).max()


@pytest.mark.parametrize("precision", TOKEN_PRECISIONS)
@pytest.mark.parametrize("width, slices, stage", TOKEN_PLANS)
def test_token_major_planes_give_each_stacked_layer_its_own_contiguous_block(precision, width,
                                                                             slices, stage):
    """planes=8 of 24 rows: y is 3 x N x 8 (row m, token n at m / 8 * 8N + 8n + m % 8), the
    residual read the same way; the staged tile (6 rows a block) straddles planes."""
    kernel, w, bias, rng = _token_kernel(4, precision, width, slices, stage, planes=8)
    assert kernel.output_shape == (3, 20, 8)
    assert "planes=8" in kernel.source and "  y += outoff * 8;" in kernel.source
    assert "prow = row / 8 * 160 + row % 8;" in kernel.source
    if slices == 1:
        assert "y0[(c0 + c) / 8 * 160 + (t0 + t) * 8 + (c0 + c) % 8]" in kernel.source
    x, res = kernel.random_inputs(rng)
    out = kernel.run_cpu(x, res)
    ok, err, message = kernel.check(out, x, res)
    assert ok, message
    planes = np.asarray(res, dtype=np.float64).reshape(3, 20, 8)
    res_mn = planes.transpose(0, 2, 1).reshape(24, 20)
    dense = np.maximum(w.astype(np.float64) @ x.reshape(40, 20).astype(np.float64)
                       + bias[:, None] + res_mn, 0)
    want = dense.reshape(3, 8, 20).transpose(0, 2, 1)
    tol = 1e-5 if precision[0] == "fp32" else 3e-2
    assert np.abs(out.reshape(3, 20, 8) - want).max() <= tol * np.abs(want).max()


def _gelu64(v):
    """Exact GELU by math.erf, element by element (independent of reference.gelu's erfc)."""
    import math

    return np.vectorize(lambda t: 0.5 * t * (1.0 + math.erf(t / math.sqrt(2.0))))(v)


# the statements GELU prints for each precision (fp32 sums; half2 pairs; one half)
GELU_LINES = {"fp32": "    a[0][0] = sparsert_gelu(a[0][0]);",
              "pair": "    a[0][0] = sparsert_f2h2(sparsert_gelu(sparsert_h2f((unsigned short)"
                      "(a[0][0] >> 16))), sparsert_gelu(sparsert_h2f((unsigned short)a[0][0])));",
              "half": "    a[0][0] = sparsert_f2h(sparsert_gelu(sparsert_h2f(a[0][0])));"}


@pytest.mark.parametrize("precision", [("fp32", None), ("fp16", "fp16"), ("fp16", "fp32"),
                                       ("bf16", None)])
@pytest.mark.parametrize("token_major", [False, True])
@pytest.mark.parametrize("width, slices, stage", [(1, 1, "smem"), (2, 2, "smem"), (4, 1, "ring"),
                                                  (4, 3, "shfl")])
def test_gelu_epilogue_matches_exact_gelu_of_the_sums(precision, token_major, width, slices,
                                                      stage):
    """GELU after bias and residual, in every precision, channel-major and token-major, with and
    without K-slices: printed (fp16 sums widened to fp32 for erff and rounded back), parsed
    back, run by the interpreter, checked against float64 and against an exact GELU of a plain
    product computed here, over pre-activations of both signs."""
    kernel, w, bias, rng = _token_kernel(5, precision, width, slices, stage, scale=0.3, span=2.0,
                                         activation="gelu", token_major=token_major)
    assert kernel.family == "streamed" and "activation=gelu" in kernel.source
    assert stream.GELU in kernel.source
    half_sums = precision[1] == "fp16"
    line = GELU_LINES["fp32" if not half_sums else "pair" if width > 1 else "half"]
    assert line in kernel.source
    stream.check_printed(stream._parse(kernel.source), kernel.source)
    x, res = kernel.random_inputs(rng)
    out = kernel.run_cpu(x, res)
    ok, err, message = kernel.check(out, x, res)
    assert ok, message
    res_mn = np.asarray(res, dtype=np.float64).reshape(kernel.output_shape)
    res_mn = res_mn.T if token_major else res_mn
    pre = (w.astype(np.float64) @ np.asarray(x, dtype=np.float64).reshape(40, 20)
           + bias[:, None] + res_mn)
    assert (pre < -1).sum() > 50 and (pre > 1).sum() > 50 and np.abs(pre).max() < 8
    dense = _gelu64(pre)
    dense = dense.T if token_major else dense
    got = np.asarray(out, dtype=np.float64).reshape(dense.shape)
    # fp32: relative to the largest output; 2-byte storage: its rounding (bf16: 2^-8 of |y|)
    # and fp16 sums' (~0.007 here), well within GELU - ReLU (0.17 at -0.75): ReLU would fail
    bound = (1e-5 * np.abs(dense).max() if precision[0] == "fp32"
             else 0.01 + 2.0 ** -7 * np.abs(dense))
    assert np.all(np.abs(got - dense) <= bound)
    assert np.any(np.abs(np.maximum(dense, 0) - dense) > 4 * bound)


def test_gelu_prints_checked_and_keeps_other_kernels_and_refuses_the_immediate_family():
    from sparsert_cli.build import layer_family
    from sparsert_cli.families.immediate.plan import build_plan as immediate_plan
    from sparsert_cli.reference import SLOPE, reference_and_magnitude

    epi = Epilogue(bias=tuple(np.linspace(-2, 2, 12)), activation="gelu", residual=True)
    _, ir = _ir(("fp16", "fp16"), epi, Geometry(1, 40, 1, 32, 12),
                StreamParams(32, 4, 2, 3, 4, "smem"))
    source = stream.print_stream(ir)
    stream.check_printed(ir, source)
    assert GELU_LINES["pair"].replace("[0][0]", "[0][1]") in source
    for changed, why in ((source.replace("activation=gelu", "activation=relu"),
                          "activation: 'gelu' != 'relu'"),
                         (source.replace("(a[0][1] >> 16)", "(a[0][1] >> 8)"),
                          "not what its IR prints"),
                         (source.replace(stream.GELU, stream.GELU.replace("erff", "erfcf")),
                          "not what its IR prints")):
        assert changed != source
        with pytest.raises(PrintedMismatch, match=why):
            stream.check_printed(ir, changed)
    # kernels without GELU print no helper (their sources, names and keys are as before)
    _, relu = _ir(("fp16", "fp16"), Epilogue(activation="relu"))
    assert "gelu" not in stream.print_stream(relu)
    assert Epilogue(activation="relu").key() == {"bias": None, "activation": "relu",
                                                "residual": False}
    # the magnitude carries GELU's largest slope; others' are as before
    w4, x4 = np.ones((1, 2, 1, 1)), np.array([-1.0, 3.0]).reshape(1, 2, 1, 1)
    for activation, scale in (("none", 1.0), ("relu", 1.0), ("relu6", 1.0), ("gelu", 1.13)):
        ref, mag = reference_and_magnitude(w4, x4, activation=activation)
        assert mag.item() == 4.0 * scale and SLOPE.get(activation, 1.0) == scale
    assert np.isclose(ref.item(), _gelu64(2.0))
    # "auto" plans GELU in the streamed family (conv or gemm); the immediate family refuses it
    assert layer_family(epi) == "streamed" and layer_family(Epilogue()) == "auto"
    assert layer_family(epi, "immediate") == "immediate"
    gemm = Geometry(1, 40, 1, 16, 12)
    csr = _weight(gemm, 0.3, 2)
    kernel = sparsert.compile_kernel(csr.toarray(), op="gemm", n=16, tuned=False, cache=None,
                                     arch="sm_90", epilogue={"activation": "gelu"})
    assert kernel.family == "streamed" and kernel.verify_cpu()["ok"]
    weight, shape = SHAPES["3x3_pad1"]
    conv = sparsert.compile_kernel(weight, **shape, tuned=False, cache=None, arch="sm_90",
                                   epilogue={"activation": "gelu", "bias": np.ones(24)})
    assert conv.family == "streamed" and conv.verify_cpu()["ok"]
    with pytest.raises(sparsert.UserError, match="^activation gelu is built by the streamed "
                                                 "family only$"):
        immediate_plan(csr, gemm, sparsert.PlanParams(rows_per_group=2), epi)
    with pytest.raises(sparsert.UserError, match="streamed family only"):
        sparsert.compile_kernel(csr.toarray(), op="gemm", n=16, tuned=False, cache=None,
                                arch="sm_90", family="immediate",
                                epilogue={"activation": "gelu"})
    with pytest.raises(sparsert.UserError, match="activation must be one of none, relu, relu6, "
                                                 "gelu, got 'swish'"):
        sparsert.compile_kernel(csr.toarray(), op="gemm", n=16, tuned=False, cache=None,
                                epilogue={"activation": "swish"})


def test_planes_are_printed_parsed_saved_and_refused_where_they_cannot_be(tmp_path):
    from sparsert_cli.problem_shape import Epilogue as E, from_token_layout, to_token_layout

    a = np.arange(24 * 5).reshape(24, 5)
    assert np.array_equal(from_token_layout(to_token_layout(a, 8), 24, 5, 8), a)
    assert np.array_equal(to_token_layout(a), a.T)
    assert to_token_layout(a, 8)[1, 2, 3] == a[8 + 3, 2]
    gemm = Geometry(1, 40, 1, 16, 12)
    csr = _weight(gemm, 0.3, 2)
    plan = build_plan(csr, gemm, StreamParams(32, 4, 2, 3, 4, "smem"),
                      E(token_major=True, planes=4))
    ir = lower(plan)
    source = stream.print_stream(ir)
    stream.check_printed(ir, source)
    with pytest.raises(PrintedMismatch, match="planes: 4 != 0"):
        stream.check_printed(ir, source.replace("; planes=4", ""))
    # digests: planes only when set
    assert "planes" not in E(token_major=True).key() and E(token_major=True, planes=4).key()[
        "planes"] == 4
    for epi, why in ((E(planes=4), "needs a token-major output"),
                     (E(token_major=True, planes=5), "needs a token-major output whose 12 rows"),
                     (E(token_major=True, planes=-4), "needs a token-major")):
        with pytest.raises(sparsert.UserError, match=why):
            build_plan(csr, gemm, StreamParams(32, 4, 2, 3, 4, "smem"), epi)
    for bad in (-1, 2.5, True, "4"):
        with pytest.raises(sparsert.UserError, match="planes must be an int"):
            sparsert.compile_kernel(csr.toarray(), op="gemm", n=16, tuned=False, cache=None,
                                    arch="sm_90", epilogue={"token_major": True, "planes": bad})
    kernel = sparsert.compile_kernel(csr.toarray(), op="gemm", n=16, tuned=False, cache=None,
                                     arch="sm_90", epilogue={"token_major": True, "planes": 4})
    assert kernel.family == "streamed" and kernel.output_shape == (3, 16, 4)
    assert [a["shape"] for a in kernel.arguments] == [[1, 40, 1, 16], [3, 16, 4]]
    kernel.save(tmp_path / "k")                 # the manifest keeps the planes
    again = sparsert.Kernel.from_dir(tmp_path / "k")
    assert again.entry == kernel.entry and again.output_shape == (3, 16, 4)


def test_token_major_is_checked_printed_and_refused_where_it_cannot_be(tmp_path):
    from sparsert_cli.families.immediate.plan import build_plan as immediate_plan
    from sparsert_cli.problem_shape import Epilogue as E

    epi = E(activation="relu", residual=True, token_major=True)
    gemm = Geometry(1, 40, 1, 16, 12)
    csr = _weight(gemm, 0.3, 2)
    # K-split: each column a scalar store
    plan = build_plan(csr, gemm, StreamParams(32, 4, 2, 3, 4, "smem", k_slices=2), epi)
    ir = lower(plan)
    source = stream.print_stream(ir)
    stream.check_printed(ir, source)
    assert plan.tile_rows == 0 and "sparsert_tile" not in source
    assert "y[24 + row]" in source and "__ldg(res + 36 + row)" in source
    for changed, why in ((source.replace("; layout=tokens", ""), "token_major: True != False"),
                         (source.replace("y[24 + row]", "y[12 + row]"), "not what its IR prints")):
        with pytest.raises(PrintedMismatch, match=why):
            stream.check_printed(ir, changed)
    # unsplit: block b stages rows [6b, 6b + 6) (2 warps x 3 rows) and writes them out per column
    plan = build_plan(csr, gemm, StreamParams(32, 4, 2, 3, 4, "smem"), epi)
    ir = lower(plan)
    source = stream.print_stream(ir)
    stream.check_printed(ir, source)
    assert plan.tile_rows == 6 and plan.grid == (2, 1, 1)
    for b in range(2):
        rows = plan.row_out[plan.work[2 * b]:plan.work[2 * b + 2]]
        assert set(rows) == set(range(6 * b, 6 * b + 6))
    assert "__shared__ float sparsert_tile[774];" in source      # 6 rows x (128 + 1)
    assert "y0[(t0 + t) * 12 + c0 + c] = sparsert_tile[c * 129 + t];" in source
    with pytest.raises(PrintedMismatch, match="tile_rows: 6 != 3"):
        stream.check_printed(ir, source.replace("tile_rows=6", "tile_rows=3"))
    from dataclasses import replace

    swapped = ir.row_out.copy()
    swapped[[0, -1]] = swapped[[-1, 0]]                 # a row in the other block's tile
    with pytest.raises(PlanExecutionError, match="outside its block's staged tile"):
        execute(replace(ir, row_out=swapped), np.zeros(gemm.input_elems),
                np.zeros(gemm.output_elems))
    # digests of channel-major plans do not change (kernels made before keep their names)
    assert "token_major" not in E().key() and E(token_major=True).key()["token_major"]
    with pytest.raises(sparsert.UserError, match="streamed family only"):
        immediate_plan(csr, gemm, sparsert.PlanParams(rows_per_group=2), epi)
    # the API: "auto" plans it in the streamed family; its arguments say N x M
    kernel = sparsert.compile_kernel(csr.toarray(), op="gemm", n=16, tuned=False, cache=None,
                                     arch="sm_90", epilogue={"token_major": True})
    assert kernel.family == "streamed" and kernel.output_shape == (16, 12)
    assert [a["shape"] for a in kernel.arguments] == [[1, 40, 1, 16], [16, 12]]
    kernel.save(tmp_path / "k")                 # the manifest keeps the layout
    again = sparsert.Kernel.from_dir(tmp_path / "k")
    assert again.entry == kernel.entry and again.output_shape == (16, 12)
    with pytest.raises(sparsert.UserError, match="streamed family only"):
        sparsert.compile_kernel(csr.toarray(), op="gemm", n=16, tuned=False, cache=None,
                                arch="sm_90", family="immediate",
                                epilogue={"token_major": True})
    conv = Geometry(1, 8, 6, 6, 12, 3, 1, 1)
    with pytest.raises(sparsert.UserError, match="token-major output is for GEMM views"):
        build_plan(_weight(conv, 0.3, 2), conv, StreamParams(32, 1, 2, 3, 4, "smem"), epi)


def test_the_interpreter_catches_bad_tables():
    from dataclasses import replace

    plan, ir = _ir()
    x = np.random.default_rng(0).standard_normal(ir.geometry.input_elems)
    execute(ir, x)
    offsets = ir.offsets.copy()
    offsets[0] += 10 ** 6
    with pytest.raises(PlanExecutionError, match="out of bounds"):
        execute(replace(ir, offsets=offsets), x)
    rows = ir.row_out.copy()
    rows[1] = rows[0]
    with pytest.raises(PlanExecutionError, match="49 outputs never written, 49 written more than once"):
        execute(replace(ir, row_out=rows), x)
    with pytest.raises(PlanExecutionError, match="worker ranges"):
        execute(replace(ir, work=ir.work[:-1]), x)
    with pytest.raises(PlanExecutionError, match="8 tap bases for 12 row entries of 1 x 9"):
        execute(replace(ir, bases=ir.bases[:-1]), x)      # was an IndexError
    with pytest.raises(PlanExecutionError, match="11 rows of 10 segment bounds"):
        execute(replace(ir, seg=ir.seg[:-1]), x)
    with pytest.raises(PlanExecutionError, match="grid has 2 slices for 1 K-slices"):
        execute(replace(ir, grid=ir.grid[:2] + (2,)), x)


def test_the_interpreter_runs_the_chain_order_fp16_rounds_in():
    """fp16 sums: the interpreter rounds per chain in the kernel's order, so its result differs
    from a straight float64 sum and depends on the chain count."""
    geometry = Geometry(1, 512, 1, 32, 4)
    rng = np.random.default_rng(2)
    dense = rng.standard_normal((4, 512)).astype(np.float16).astype(np.float32)
    x = rng.standard_normal(geometry.input_elems).astype(np.float16).astype(np.float64)
    outs = [execute(build_plan(sp.csr_matrix(dense), geometry, StreamParams(32, 2, 1, 4, c),
                               Epilogue(), "fp16", "fp16"), x) for c in (1, 8)]
    exact = (dense.astype(np.float64) @ x.reshape(512, 32)).ravel()
    assert not np.array_equal(outs[0], outs[1])
    assert np.max(np.abs(outs[0] - exact)) > 0


def test_a_large_layer_compiles_to_small_code_with_its_weights_as_data():
    geometry = Geometry(1, 768, 1, 128, 3072)
    csr = _weight(geometry, 0.1, 4)
    kernel = sparsert.compile_kernel(csr, n=128, tuned=False, cache=None,
                                     plan=StreamParams(32, 4, 8, 3, 4))
    assert kernel.resources.spill_store_bytes == 0
    # the module is the data (8 bytes per nonzero) plus a small loop
    assert 8 * csr.nnz < len(kernel.cubin) < 8 * csr.nnz + 200_000


def test_streamed_kernels_save_and_load(tmp_path):
    weight, shape = SHAPES["3x3_pad1"]
    kernel = sparsert.compile_kernel(weight, **shape, tuned=False, cache=None,
                                     plan=StreamParams(32, 1, 2, 3, 4))
    kernel.save(tmp_path / "k")
    again = sparsert.Kernel.from_dir(tmp_path / "k")
    assert again.entry == kernel.entry and again.family == "streamed"
    assert again.plan_params == kernel.plan_params and again.verify_cpu()["ok"]


def test_bad_streamed_parameters_are_user_errors():
    with pytest.raises(sparsert.UserError, match="chains"):
        StreamParams(chains=3).validate()
    with pytest.raises(sparsert.UserError, match="stage must be one of shfl, smem, ring"):
        StreamParams(stage="regs").validate()
    assert StreamParams(stage="ring").name().endswith("c4g")
    with pytest.raises(sparsert.UserError, match="unknown plan parameter 'rows_per_group'"):
        StreamParams.from_dict({"rows_per_group": 4})


@pytest.mark.parametrize("geometry, params", [
    (Geometry(1, 96, 1, 64, 80), StreamParams(32, 2, 4, 3, 4)),
    (Geometry(2, 16, 9, 9, 24, 3, 2, 1), StreamParams(64, 1, 2, 5, 2)),
    (Geometry(1, 16, 8, 8, 40, 3, 1, 0), StreamParams(32, 1, 1, 1, 8)),
    (Geometry(1, 96, 1, 64, 80), StreamParams(32, 2, 4, 3, 4, "smem", 4)),
    (Geometry(2, 16, 9, 9, 24, 3, 2, 1), StreamParams(64, 1, 2, 5, 2, "shfl", 3))])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cost_estimate_equals_the_built_plans_features(geometry, params, precision):
    from sparsert_cli.families.streamed import estimate, features
    from sparsert_cli.problem_shape import PRECISIONS

    csr = _weight(geometry, 0.2, 5)
    plan = build_plan(csr, geometry, params, Epilogue(), *PRECISIONS[precision])
    assert features(plan) == estimate(geometry, csr, params, precision)
    assert get_family("streamed").choosable


def test_a_plan_past_the_grid_or_int32_tables_is_refused_in_one_line():
    """grid.y holds the column tiles (<= 65535); the row and entry tables are int words."""
    from sparsert_cli import costmodel

    wide = Geometry(1, 2, 1, 1 << 22, 1)              # 131072 tiles of 32 columns
    csr = sp.csr_matrix(np.ones((1, 2), np.float32))
    with pytest.raises(sparsert.UserError, match="131072 column tiles exceed the grid's 65535"):
        build_plan(csr, wide, StreamParams(32, 1, 1, 1, 4))
    family, _ = costmodel.choose(wide, csr)           # the cost model falls back, never launches it
    assert family.name == "immediate"
    huge = Geometry(1, 2, 1, 1 << 25, 1)               # the default's 512-column tiles: 65536
    found = candidates(huge, 2)
    assert found and all(p.col_threads * p.vector_width >= 1024 for p in found)
    tall = Geometry(1, 1, 1, 1, 17_500_000, 11, 1, 5)  # 17.5M rows x 123 row words > 2^31
    with pytest.raises(sparsert.UserError, match="exceed the kernel's int32 indices"):
        build_plan(sp.csr_matrix((17_500_000, 121), dtype=np.float32), tall, StreamParams())


def test_the_interpreter_follows_the_irs_pointers_and_checks_what_the_loop_needs():
    """The kernel offsets x, y and res by the IR's pointer variables, reads every segment in
    whole groups of PAD entries and loads the residual on every thread (inactive ones too)."""
    from dataclasses import replace

    epi = Epilogue(residual=True)
    _, ir = _ir(epilogue=epi)
    rng = np.random.default_rng(0)
    x, res = rng.standard_normal(ir.geometry.input_elems), rng.standard_normal(
        ir.geometry.output_elems)
    execute(ir, x, res)
    with pytest.raises(PlanExecutionError, match="store out of bounds"):
        execute(replace(ir, pointers=(("x", "inoff"), ("y", "inoff"), ("res", "outoff"))), x, res)
    with pytest.raises(PlanExecutionError, match="residual load out of bounds"):
        execute(replace(ir, pointers=(("x", "inoff"), ("y", "outoff"), ("res", "inoff"))), x, res)
    geometry = Geometry(1, 16, 1, 40, 1)
    plan = build_plan(sp.csr_matrix(np.eye(1, 16, dtype=np.float32) * 2 + np.eye(1, 16, 5)),
                      geometry, StreamParams(32, 1, 1, 1, 4))
    ir = lower(plan)
    assert ir.seg.tolist() == [[0, 8]]
    x = rng.standard_normal(geometry.input_elems)
    execute(ir, x)
    with pytest.raises(PlanExecutionError, match="not whole groups of 8"):
        execute(replace(ir, seg=np.array([[0, 2]]), offsets=ir.offsets[:2],
                        values=ir.values[:2]), x)
    _, ir = _ir(geometry=Geometry(1, 16, 1, 40, 4), params=StreamParams(32, 2, 1, 1, 4))
    assert ir.vector_width == 2
    with pytest.raises(PlanExecutionError, match="misaligned vector store"):
        execute(replace(ir, pointers=(("x", "inoff"), ("y", "act"))), x)


def test_gen_and_inspect_take_streamed_parameters_and_refuse_the_other_familys(tmp_path, capsys):
    """`--plan chains=2` is a streamed parameter (gen validated --plan against the immediate
    family only), and gen / inspect show a streamed kernel's plan (they read row_groups)."""
    import json

    from cli_helpers import run_main
    from sparsert_cli.config import config_from_dict

    np.save(tmp_path / "w.npy", sparse((24, 16, 3, 3), 0.3, 6))
    gen = ["gen", "--pattern", str(tmp_path / "w.npy"), "--height", "9", "--width", "10",
           "--no-cache", "--no-tuned"]
    code, out, err = run_main(gen + ["--family", "streamed", "--plan", "chains=2", "-o",
                                     str(tmp_path / "k")], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "k" / "manifest.json").read_text())
    assert doc["family"] == "streamed" and doc["plan"]["chains"] == 2
    assert doc["source"] == "kernel.cu" and not (tmp_path / "k" / "kernel.ptx").exists()
    assert 'extern "C" __global__' in (tmp_path / "k" / "kernel.cu").read_text()   # CUDA C++
    code, out, err = run_main(["inspect", str(tmp_path / "k")], capsys)
    assert code == 0 and "workers" in out and "malformed" not in err, err
    for extra, words in ((["--family", "streamed", "--plan", "rows_per_group=4"],
                          "the streamed family takes no plan parameter(s) rows_per_group"),
                         (["--family", "immediate", "--plan", "chains=2"],
                          "the immediate family takes no plan parameter(s) chains"),
                         (["--plan", "chains=2", "--plan", "k_split=2"],
                          "no family takes the plan parameter(s) chains, k_split together"),
                         (["--plan", "chains=3"], "chains must be 1, 2, 4 or 8")):
        code, out, err = run_main(gen + extra + ["-o", str(tmp_path / "bad")], capsys)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()
    base = {"problems": [{"id": "g", "op": "gemm", "m": 8, "k": 12, "n": 16}], "sparsity": 0.5}
    config = config_from_dict({**base, "family": "streamed", "plan": {"chains": 2}}, "c.yaml")
    assert config.plan == {"chains": 2}
    with pytest.raises(sparsert.UserError, match="c.yaml: 'plan': the immediate family takes no"):
        config_from_dict({**base, "family": "immediate", "plan": {"chains": 2}}, "c.yaml")


def test_the_default_of_a_wide_layer_with_many_rows_stays_in_range():
    """Many column tiles leave one worker per tile: rows per worker was all 5000 rows, past
    MAX_ROWS_PER_WORKER, so the cost model (family auto) refused an ordinary GEMM."""
    from sparsert_cli import costmodel

    geometry = Geometry(1, 64, 1, 150_000, 5000)
    assert default_params(geometry, 32_000).rows_per_worker == 4096
    csr = _weight(geometry, 0.1, 0)
    family, params = costmodel.choose(geometry, csr)
    assert params.validate() is params


def test_the_accumulator_defaults_to_the_storage_types_as_in_the_immediate_family():
    """bf16 without `accumulate` sums in fp32 (precision bf16), like the immediate family's
    planner: both run the same layer checks (families.base.check_layer)."""
    from sparsert_cli.families.immediate import PlanParams
    from sparsert_cli.families.immediate import build_plan as immediate_plan

    geometry = Geometry(1, 16, 1, 32, 8)
    csr = _weight(geometry, 0.5, 0)
    for dtype in ("fp32", "fp16", "bf16"):
        streamed = build_plan(csr, geometry, StreamParams(), dtype=dtype)
        immediate = immediate_plan(csr, geometry, PlanParams(), dtype=dtype)
        assert streamed.precision == immediate.precision
    with pytest.raises(sparsert.UserError, match="weight is 8x16 but the shape needs 8x32"):
        build_plan(csr, Geometry(1, 32, 1, 32, 8), StreamParams())


def test_no_ring_candidate_for_7x7_convolutions():
    """The ring stage keeps two row headers of 2 + k*k words in registers: at 7x7 ptxas spills."""
    conv7 = Geometry(1, 3, 224, 224, 64, 7, 2, 3)
    conv3 = Geometry(1, 64, 14, 14, 64, 3, 1, 1)
    assert all(p.stage != "ring" for p in candidates(conv7, 900, "fp32", 32))
    assert any(p.stage == "ring" for p in candidates(conv3, 3600, "fp32", 32))


def test_k_slices_split_each_row_by_input_channel_and_print_a_checked_reduction():
    """Slice z holds the nonzeros of input channels [z*C/S, (z+1)*C/S) of every row, each slice
    padded per tap segment; the grid's z runs the slices; the source parses back (with its
    slice count) and a changed slice count or reduction is caught."""
    geometry = Geometry(1, 16, 7, 7, 12, 3, 1, 1)
    epi = Epilogue(bias=tuple(np.linspace(-2, 2, 12)), activation="relu", residual=True)
    plan, ir = _ir(epilogue=epi, geometry=geometry, params=StreamParams(32, 1, 2, 3, 4, "smem", 4))
    assert plan.k_slices == 4 and plan.grid[2] == 4 and plan.segments == 9
    assert plan.seg.shape == (12, 4 * 10) and plan.params.name().endswith("mk4")
    for i in range(12):
        for z in range(4):
            lo, hi = plan.seg[i, z * 10], plan.seg[i, z * 10 + 9]
            real = plan.values[lo:hi] != 0
            channels = plan.offsets[lo:hi][real] // 49
            assert np.all((channels >= 4 * z) & (channels < 4 * z + 4))
    assert plan.nnz == _weight(geometry, 0.3, 1).nnz
    source = stream.print_stream(ir)
    stream.check_printed(ir, source)
    assert "slices=4" in source and "atom.release.gpu.global.add.u32" in source
    # one thread per block publishes the partials and only the last block acquires them: no
    # per-thread __threadfence (each empties the SM's L1 under the blocks still running there)
    assert "__threadfence" not in source
    reduce = source[source.index("__shared__ unsigned sparsert_last"):]
    assert reduce.index("__syncthreads()") < reduce.index("threadIdx.x == 0 && threadIdx.y == 0") \
        < reduce.index("atom.release") < reduce.index("if (sparsert_last) {") \
        < reduce.index("fence.acq_rel.gpu") < reduce.index("__syncthreads()", reduce.index("fence"))
    assert source.count("fence.acq_rel.gpu") == 1 and source.count("atom.release") == 1
    assert "sparsert_part[2352]" in source       # 4 slices x 12 rows x 49 pixels, float sums
    for changed, why in ((source.replace("slices=4", "slices=2"), r"grid: \(2, 2, 4\) != "),
                         (source.replace("s < 4; ++s", "s < 3; ++s"), "not what its IR prints")):
        with pytest.raises(PrintedMismatch, match=why):
            stream.check_printed(ir, changed)
    # one slice prints the unsplit kernel: no workspace, no counters
    _, one = _ir(epilogue=epi, geometry=geometry, params=StreamParams(32, 1, 2, 3, 4, "smem"))
    assert "sparsert_part" not in stream.print_stream(one)


def test_k_slices_refuse_the_ring_stage_and_a_workspace_past_its_limit():
    with pytest.raises(sparsert.UserError, match="k_slices > 1 needs stage smem or shfl"):
        StreamParams(stage="ring", k_slices=2).validate()
    with pytest.raises(sparsert.UserError, match="k_slices must be in 1..16"):
        StreamParams(k_slices=17).validate()
    big = Geometry(32, 64, 56, 56, 256)             # 25.7M outputs x 4 B x 4 slices > 64 MiB
    with pytest.raises(sparsert.UserError, match="k-split workspace \\(392 MiB\\) exceeds 64 MiB"):
        build_plan(_weight(big, 0.01, 0), big, StreamParams(128, 4, 2, 8, 4, "smem", 4))
    # plans made before k_slices keep their keys; a split plan's key names it
    assert "k_slices" not in StreamParams().key()
    assert StreamParams(k_slices=2).key()["k_slices"] == 2
    assert StreamParams.from_dict({"k_slices": 2, "stage": "smem"}).name() == "s32v1w4r4c4mk2"


def test_the_default_splits_k_only_for_few_long_rows():
    from sparsert_cli.build import geometry_for
    from sparsert_cli.problems import builtin_problems

    problems = builtin_problems()
    slices = {name: default_params(geometry_for(problems[name]),
                                   geometry_for(problems[name]).out_channels
                                   * geometry_for(problems[name]).taps // 10).k_slices
              for name in ("rn50_c5_3x3", "rn50_c4_reduce", "bert_ffn_up", "mbv1_pw0")}
    assert slices == {"rn50_c5_3x3": 2, "rn50_c4_reduce": 1, "bert_ffn_up": 1, "mbv1_pw0": 1}


def test_the_default_block_height_spreads_the_workers_over_the_sms():
    """768 one-row workers in blocks of 8 occupy 96 of 132 SMs; blocks of 6 occupy 128 and the
    busiest SM holds 6 workers instead of 8. A count that blocks of 8 already spread keeps 8."""
    from sparsert_cli.build import geometry_for
    from sparsert_cli.families.streamed.plan import balanced_warps
    from sparsert_cli.problems import builtin_problems

    assert balanced_warps(768, 1, 8) == 6
    assert balanced_warps(1024, 1, 8) == 8           # 128 blocks of 8: already one per SM
    assert balanced_warps(256, 1, 4) == 2            # 64 blocks of 4 -> 128 blocks of 2
    assert balanced_warps(37, 7, 2) == 1             # 133 blocks: one SM would run two
    assert balanced_warps(16, 25, 2) == 2            # 200 or 400 blocks: the same busiest SM
    assert balanced_warps(1, 1, 8) == 8              # one worker: nothing to spread
    assert balanced_warps(109, 7, 8) == 8            # 7 instead of 8 per SM: under 15% better
    assert balanced_warps(2, 1, 8) == 8              # blocks of 1 are below half of 8
    problems = builtin_problems()

    def default(name: str) -> StreamParams:
        geometry = geometry_for(problems[name])
        return default_params(geometry, geometry.out_channels * geometry.taps // 10)

    assert default("bert_ffn_down").warps == 6
    assert default("bert_ffn_up").warps == 8
    assert default("rn50_c4_reduce").warps == 2
