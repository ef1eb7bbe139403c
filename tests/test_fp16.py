"""fp16 kernels without a GPU: the plan executor's fp16 roundings, fp16 plans against the float64
reference with fp16 tolerances, the PTX they print (half2 FMAs with paired immediates, 2-byte
offsets, packed stores) compiled to sm_90 cubins without spills, and the config / CLI surface."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_helpers import run_main
from sparsert_cli.build import build_kernel, default_params, emit, make_plan
from sparsert_cli.compile import ptx_to_cubin
from sparsert_cli.config import config_from_dict
from sparsert_cli.errors import UserError
from sparsert_cli.interp import PlanExecutionError, execute
from sparsert_cli.patterns import pruned_weights, to_csr, uniform_weights
from sparsert_cli.families.immediate import PlanParams, build_plan, fit_vector_width, lower
from sparsert_cli.problem_shape import Epilogue, Geometry
from sparsert_cli.problems import Problem, builtin_problems
from sparsert_cli.render import parse_cuda
from sparsert_cli.render.cuda import print_cuda
from sparsert_cli.render.parse_ptx import check_printed
from sparsert_cli.render.ptx import f16_bits, print_ptx
from sparsert_cli.reference import check

HALF = {"fp16": ("fp16", "fp16"), "fp16acc32": ("fp16", "fp32")}


def f16(a):
    return np.asarray(a, dtype=np.float64).astype(np.float16).astype(np.float64)


def _plan(weight, geometry, params, precision, epilogue=Epilogue()):
    dtype, acc = HALF[precision]
    return build_plan(to_csr(weight), geometry, params, epilogue, dtype, acc)


# ------------------------------------------------------------------ executor roundings


def test_fp16_weights_are_rounded_like_the_immediates():
    geometry = Geometry(1, 1, 1, 8, 1)
    weight = np.full((1, 1, 1, 1), 1 / 3, dtype=np.float32)
    x = np.ones((1, 1, 1, 8))
    for precision in HALF:
        out = execute(_plan(weight, geometry, PlanParams(vector_width=2), precision), x)
        assert np.all(out == f16(1 / 3)), precision      # not the float32 1/3
    out32 = execute(build_plan(to_csr(weight), geometry, PlanParams()), x)
    assert np.all(out32 == np.float32(1 / 3))


def test_half_sums_round_after_every_fma():
    """2048 + 1 + 1 in fp16: each +1 is lost (spacing 2 at 2048); fp32 sums keep them."""
    geometry = Geometry(1, 3, 1, 2, 1)
    weight = np.array([[2048.0, 1.0, 1.0]], dtype=np.float32).reshape(1, 3, 1, 1)
    x = np.ones((1, 3, 1, 2))
    half = execute(_plan(weight, geometry, PlanParams(vector_width=2), "fp16"), x)
    wide = execute(_plan(weight, geometry, PlanParams(vector_width=2), "fp16acc32"), x)
    assert np.all(half == 2048.0)
    assert np.all(wide == 2050.0)


def test_fp16_plan_rejects_inputs_that_are_not_fp16_values():
    geometry = Geometry(1, 4, 1, 8, 2)
    plan = _plan(np.ones((2, 4, 1, 1), dtype=np.float32), geometry, PlanParams(), "fp16")
    with pytest.raises(PlanExecutionError, match="not fp16"):
        execute(plan, np.full((1, 4, 1, 8), 0.1))


def test_f16_bits_matches_numpy():
    for value in (0.0, 1.0, -2.5, 1 / 3, 6.0, 65504.0, 1e-7):
        assert f16_bits(value) == int(np.float16(value).view(np.uint16))


# ------------------------------------------------------------------ against float64


def _check_half(plan, weight, rng, gen):
    geo = plan.geometry
    x, res = gen.random_inputs(geo, plan.epilogue.residual, rng)
    x, res = f16(x), (f16(res) if res is not None else None)
    ir = lower(plan)
    out = execute(ir, x, res)
    check_printed(ir, print_ptx(ir))          # the PTX and CUDA say what was executed
    parse_cuda.check_printed(ir, print_cuda(ir))
    ref, mag = gen.reference_for(plan, weight, x, res)
    ok, err, message = check(out, ref, mag, "fp16", geo.taps)
    assert ok, (plan.params.name(), plan.precision, message)
    assert np.array_equal(out, f16(out)), "fp16 outputs must be fp16 values"
    return out, ref


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fp16_plans_match_float64_within_fp16_tolerance(gen, data):
    geometry = gen.draw_geometry(data)
    kind = data.draw(st.sampled_from(gen.PATTERN_KINDS), label="pattern")
    density = data.draw(st.sampled_from([0.05, 0.2, 0.5]), label="density")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    weight = gen.conv_weight(kind, geometry, density, rng)
    params = gen.draw_params(data)
    params = PlanParams(**{**params.__dict__,
                           "vector_width": data.draw(st.sampled_from([1, 2, 4, 8]), label="V")})
    epilogue = gen.draw_epilogue(data, geometry.out_channels, rng)
    precision = data.draw(st.sampled_from(sorted(HALF)), label="precision")
    try:
        plan = _plan(weight, geometry, params, precision, epilogue)
    except UserError:     # e.g. k_split partials beyond shared memory
        return
    _check_half(plan, weight, rng, gen)


@pytest.mark.parametrize("precision", sorted(HALF))
def test_fp16_tolerance_catches_a_wrong_weight(gen, precision):
    geometry = Geometry(1, 32, 1, 64, 16)
    weight = uniform_weights((16, 32, 1, 1), 0.5, 4)
    plan = _plan(weight, geometry, PlanParams(vector_width=8), precision)
    rng = np.random.default_rng(0)
    _check_half(plan, weight, rng, gen)
    wrong = weight.copy()
    row, col = np.argwhere(weight[:, :, 0, 0] != 0)[0]
    wrong[row, col] *= -1.0            # a sign error in one weight: far above fp16 rounding
    x = f16(rng.standard_normal((1, 32, 1, 64)))
    out = execute(_plan(wrong, geometry, PlanParams(vector_width=8), precision), x)
    ref, mag = gen.reference_for(plan, weight, x, None)
    assert not check(out, ref, mag, "fp16", 32)[0]


# ------------------------------------------------------------------ PTX and cubins


def _sass_free_checks(ptx: str, precision: str):
    assert "fma.rn.f32" not in ptx or precision == "fp16acc32"
    if precision == "fp16":
        assert re.search(r"fma\.rn\.f16(x2)? ", ptx)
    else:
        assert "cvt.f32.f16" in ptx and "fma.rn.f32" in ptx


@pytest.mark.parametrize("precision", sorted(HALF))
@pytest.mark.parametrize("params", [PlanParams(vector_width=8),
                                    PlanParams(vector_width=2, rows_per_group=3, k_split=3),
                                    PlanParams(vector_width=1, rows_per_group=16,
                                               col_threads=128, load_batch=3)],
                         ids=lambda p: p.name())
def test_fp16_gemm_compiles_without_spills(isolated_cache, precision, params):
    problem = Problem("g", "gemm", 29, 41, height=1, width=208)
    weight = uniform_weights(problem.weight_shape, 0.85, 5)
    plan = make_plan(problem, weight, params,
                     Epilogue(tuple([0.25] * 29), "relu6", residual=True), precision=precision)
    ptx = emit(plan, "ptx", "sm_90")
    _sass_free_checks(ptx, precision)
    width = plan.vector_width
    load = {1: "ld.global.nc.b16", 2: "ld.global.nc.b32", 4: "ld.global.nc.v2.b32",
            8: "ld.global.nc.v4.b32"}[width]
    assert load in ptx
    if precision == "fp16" and width > 1:
        # one weight = one paired immediate (w, w), folded by ptxas into HFMA2
        value = next(v for g in plan.groups for sl in g.slices for ld in sl for _, v in ld.uses)
        bits = f16_bits(value)
        assert f"0x{bits:04X}{bits:04X}" in ptx
    compiled = ptx_to_cubin(ptx, "sm_90")
    res = compiled.entry_resources(plan.entry)
    assert res.spills == 0, res


@pytest.mark.parametrize("precision", sorted(HALF))
def test_fp16_padded_conv_uses_two_byte_offsets(precision):
    problem = Problem("c", "conv3x3", 8, 4, height=6, width=5, padding=1)
    weight = pruned_weights(problem.weight_shape, 0.5, 1)
    plan = make_plan(problem, weight, PlanParams(rows_per_group=4), precision=precision)
    ptx = emit(plan, "ptx", "sm_90")
    geo = plan.geometry
    offsets = {int(m) for m in re.findall(r"ld\.global\.nc\.b16 %b\d+, \[%x?b?\d*\+(\d+)\]", ptx)}
    want = {geo.tap_offset(ld.tap) * 2 for g in plan.groups for sl in g.slices for ld in sl}
    assert offsets == want
    assert "st.global.b16" in ptx
    assert ptx_to_cubin(ptx, "sm_90").entry_resources(plan.entry).spills == 0


@pytest.mark.parametrize("precision", sorted(HALF))
@pytest.mark.parametrize("params", [PlanParams(vector_width=8, k_split=2),
                                    PlanParams(vector_width=2, rows_per_group=3),
                                    PlanParams(vector_width=1, k_split=3, rows_per_group=5)],
                         ids=lambda p: p.name())
def test_fp16_through_the_cuda_printer_compiles_and_parses_back(isolated_cache, precision,
                                                                  params):
    """fp16 falls out of the CUDA printer's tables (a half overlay); NVRTC compiles it and the
    printed C++ reads back into the IR the interpreter executes."""
    problem = Problem("g", "gemm", 13, 24, height=1, width=48)
    plan = make_plan(problem, uniform_weights(problem.weight_shape, 0.7, 2), params,
                     Epilogue(tuple([0.5] * 13), "relu6", residual=True), precision=precision)
    build, source = build_kernel(plan, "cuda", "sm_90", keep_source=True)
    assert build.resources.spills == 0 and "sparsert_h" in source
    assert ("= sparsert_hfma" in source) == (precision == "fp16")   # half2 sums, or fp32 ones
    parse_cuda.check_printed(lower(plan), source)


def test_fp16_kernels_refuse_old_arches(isolated_cache):
    problem = Problem("g", "gemm", 8, 8, height=1, width=32)
    plan = make_plan(problem, uniform_weights(problem.weight_shape, 0.5, 0), precision="fp16")
    for emitter in ("ptx", "cuda"):
        with pytest.raises(UserError, match="sm_80"):
            build_kernel(plan, emitter, "sm_75")


# ------------------------------------------------------------------ planner defaults


def test_half2_defaults_use_16_byte_vectors_and_keep_code_size():
    problems = builtin_problems()
    p = problems["mbv1_pw3"]
    geometry = Geometry(1, p.in_channels, p.height, p.width, p.out_channels)
    nnz = int(0.1 * p.m * p.k)
    assert default_params(geometry, nnz, precision="fp16").vector_width == 8
    assert default_params(geometry, nnz, precision="fp16acc32").vector_width == 4
    assert default_params(geometry, nnz, precision="bf16").vector_width == 4
    # fp32 over 784 columns takes tall groups of one column a thread (tall_params)
    assert default_params(geometry, nnz).vector_width == 1
    assert fit_vector_width(geometry, 8, "fp32") == 4          # 16 bytes is the widest load
    assert fit_vector_width(geometry, 8, "fp16") == 8


def test_shared_partials_are_sized_by_the_accumulator():
    geometry = Geometry(1, 64, 1, 256, 16)
    weight = uniform_weights((16, 64, 1, 1), 0.5, 0)
    params = PlanParams(rows_per_group=4, vector_width=8, col_threads=32, k_split=2)
    half = _plan(weight, geometry, params, "fp16")
    wide = _plan(weight, geometry, params, "fp16acc32")
    assert half.shared_bytes == 2 * 4 * 32 * 8 * 2
    assert wide.shared_bytes == 2 * half.shared_bytes


def test_precision_is_part_of_the_digest():
    geometry = Geometry(1, 16, 1, 32, 8)
    weight = uniform_weights((8, 16, 1, 1), 0.5, 0)
    digests = {build_plan(to_csr(weight), geometry, PlanParams(vector_width=2), Epilogue(), d, a)
               .digest() for d, a in [("fp32", "fp32"), ("fp16", "fp16"), ("fp16", "fp32")]}
    assert len(digests) == 3


# ------------------------------------------------------------------ config and CLI


def test_config_accumulate_defaults_to_dtype_and_rejects_bad_pairs():
    base = {"problems": ["mbv1_pw3"], "sparsity": 0.9}
    assert config_from_dict({**base, "dtype": "fp16"}, "c.yaml").precision == "fp16"
    assert config_from_dict({**base, "dtype": "fp16", "accumulate": "fp32"},
                            "c.yaml").precision == "fp16acc32"
    with pytest.raises(UserError, match="c.yaml: 'accumulate: fp16' needs 'dtype: fp16'"):
        config_from_dict({**base, "accumulate": "fp16"}, "c.yaml")
    assert config_from_dict({**base, "dtype": "fp16", "emit": "cuda"}, "c.yaml").emit == "cuda"
    with pytest.raises(UserError, match="'accumulate' must be one of"):
        config_from_dict({**base, "dtype": "fp16", "accumulate": "bf16"}, "c.yaml")


def test_bench_compile_only_fp16_verifies_on_the_cpu(repo, tmp_path, capsys, isolated_cache,
                                                     wide_terminal):
    out = tmp_path / "r.json"
    code, stdout, err = run_main(["bench", str(repo / "configs" / "ci.yaml"), "--dtype", "fp16",
                                  "--compile-only",
                                  "--out", str(out)], capsys)
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert doc["config"]["dtype"] == "fp16" and doc["config"]["accumulate"] == "fp16"
    assert doc["precision"] == "fp16"
    for case in doc["cases"]:
        assert case["verify_cpu"]["ok"], case
        assert case["compile"]["spill_bytes"] == 0


def test_gen_fp16_writes_a_float16_manifest(tmp_path, capsys, isolated_cache):
    weight = uniform_weights((16, 32), 0.8, 0)
    path = tmp_path / "w.npy"
    np.save(path, weight)
    out = tmp_path / "k"
    code, stdout, err = run_main(["gen", "--pattern", str(path), "--n", "64", "--dtype", "fp16",
                                  "-o", str(out), "--json"], capsys)
    assert code == 0, err
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["dtype"] == "fp16" and doc["accumulate"] == "fp16"
    assert {a["dtype"] for a in doc["arguments"]} == {"float16"}
    assert "fma.rn.f16x2" in (out / "kernel.ptx").read_text()


def test_gen_fp16_with_cuda_emitter_writes_kernel_cu(tmp_path, capsys, isolated_cache):
    path = tmp_path / "w.npy"
    np.save(path, uniform_weights((16, 32), 0.8, 0))
    out = tmp_path / "k"
    code, stdout, err = run_main(["gen", "--pattern", str(path), "--n", "64", "--dtype", "fp16",
                                  "--emit", "cuda", "-o", str(out), "--json"], capsys)
    assert code == 0, err
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["emitter"] == "cuda" and doc["dtype"] == "fp16"
    assert "sparsert_hfma2" in (out / "kernel.cu").read_text()


def test_bench_fp16_with_cuda_emitter_verifies_on_the_cpu(repo, tmp_path, capsys, isolated_cache,
                                                         wide_terminal):
    out = tmp_path / "r.json"
    code, _, err = run_main(["bench", str(repo / "configs" / "ci.yaml"), "--dtype", "fp16",
                             "--emit", "cuda", "--problems", "ci_3x3_s2_b2,ci_pw_batch2",
                             "--sparsity", "0.8", "--compile-only", "--out", str(out)], capsys)
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert doc["config"]["emit"] == "cuda" and doc["precision"] == "fp16"
    assert all(c["compile"]["ok"] and c["verify_cpu"]["ok"] for c in doc["cases"])


# ------------------------------------------------------------------ fp16 range (issue 14)


def _tiny_gemm(values, m=4, k=6):
    weight = np.zeros((m, k, 1, 1), dtype=np.float32)
    weight.ravel()[:len(values)] = values
    weight.ravel()[-1] = 0.5                    # one ordinary weight
    return Problem("g", "gemm", m, k, height=1, width=16), weight


@pytest.mark.parametrize("precision", list(HALF))
def test_fp16_weights_that_overflow_are_refused(precision):
    problem, weight = _tiny_gemm([1e6, -7e4, 60000.0])
    with pytest.raises(UserError, match=r"weights: 2 value\(s\) overflow fp16.*largest 1e\+06"):
        make_plan(problem, weight, precision=precision)
    assert make_plan(problem, weight).nnz == 4            # fp32 holds them
    with pytest.raises(UserError, match="overflow"):    # flushing never hides an overflow
        make_plan(problem, weight, precision=precision, allow_fp16_flush=True)


def test_fp16_weights_that_round_to_zero_need_the_opt_in_which_drops_them():
    problem, weight = _tiny_gemm([1e-9, 2e-8, 1e-6])     # 1e-6 stays (subnormal, nonzero)
    with pytest.raises(UserError, match=r"weights: 2 nonzero value\(s\) round to zero"):
        make_plan(problem, weight, precision="fp16")
    plan = make_plan(problem, weight, precision="fp16", allow_fp16_flush=True)
    assert plan.nnz == 2
    values = sorted(v for g in plan.groups for sl in g.slices for ld in sl for _, v in ld.uses)
    assert values == [np.float32(1e-6), 0.5]
    assert make_plan(problem, weight).nnz == 4
    # fp32 sums print fp32 immediates: tiny weights keep their value, nothing is dropped
    assert make_plan(problem, weight, precision="fp16acc32").nnz == 4


def test_fp16_bias_range_follows_where_the_bias_is_held():
    problem, weight = _tiny_gemm([1.0])
    big = Epilogue(bias=(1e5, 0.0, 0.0, 0.0))
    for precision in HALF:        # half2 sums add it in fp16; fp32 sums store it to fp16
        with pytest.raises(UserError, match=r"bias: 1 value\(s\) overflow fp16"):
            make_plan(problem, weight, epilogue=big, precision=precision)
    tiny = Epilogue(bias=(1e-9, 1.0, 0.0, 0.0))
    with pytest.raises(UserError, match="bias: 1 nonzero value"):
        make_plan(problem, weight, epilogue=tiny, precision="fp16")
    flushed = make_plan(problem, weight, epilogue=tiny, precision="fp16", allow_fp16_flush=True)
    assert flushed.epilogue.bias == (0.0, 1.0, 0.0, 0.0)
    kept = make_plan(problem, weight, epilogue=tiny, precision="fp16acc32")   # fp32 add
    assert kept.epilogue.bias == tiny.bias


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_nan_or_inf_weights_and_bias_are_refused_by_the_planner(precision):
    problem, weight = _tiny_gemm([np.nan, np.inf])
    with pytest.raises(UserError, match=r"weights: 2 NaN/Inf"):
        make_plan(problem, weight, precision=precision)
    problem, weight = _tiny_gemm([1.0])
    with pytest.raises(UserError, match=r"bias: 1 NaN/Inf"):
        make_plan(problem, weight, epilogue=Epilogue(bias=(np.nan, 0.0, 0.0, 0.0)),
                  precision=precision)


def test_gen_fp16_out_of_range_is_one_line_naming_the_file(tmp_path, capsys, isolated_cache):
    weight = np.zeros((8, 16), np.float32)
    weight[0, 1], weight[2, 3], weight[3, 3] = 1e6, 1e-9, 0.5
    np.save(tmp_path / "w.npy", weight)
    out = tmp_path / "k"
    for extra in ([], ["--accumulate", "fp32"], ["--allow-fp16-flush"]):
        code, _, err = run_main(["gen", "--pattern", str(tmp_path / "w.npy"), "--n", "8",
                                 "--dtype", "fp16", "-o", str(out), *extra], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert "w.npy: weights: 1 value(s) overflow fp16" in err and "1e+06" in err
        assert not out.exists()
    weight[0, 1] = 2.0
    np.save(tmp_path / "w.npy", weight)
    code, _, err = run_main(["gen", "--pattern", str(tmp_path / "w.npy"), "--n", "8",
                             "--dtype", "fp16", "-o", str(out)], capsys)
    assert code == 2 and "round to zero" in err and "--allow-fp16-flush" in err
    code, _, err = run_main(["gen", "--pattern", str(tmp_path / "w.npy"), "--n", "8",
                             "--dtype", "fp16", "-o", str(out), "--allow-fp16-flush"], capsys)
    assert code == 0 and "dropped 1 weight(s)" in err
    assert json.loads((out / "manifest.json").read_text())["nnz"] == 2
    np.save(tmp_path / "b.npy", np.array([1e5] + [0.0] * 7, np.float32))
    code, _, err = run_main(["gen", "--pattern", str(tmp_path / "w.npy"), "--n", "8",
                             "--dtype", "fp16", "-o", str(tmp_path / "k2"), "--bias",
                             str(tmp_path / "b.npy"), "--allow-fp16-flush"], capsys)
    assert code == 2 and "b.npy: bias: 1 value(s) overflow fp16" in err


def test_config_allow_fp16_flush_reaches_the_plans_and_the_records(monkeypatch):
    from sparsert_cli import bench

    base = {"problems": [{"id": "g", "op": "gemm", "m": 4, "k": 6, "n": 16}], "sparsity": 0.5,
            "dtype": "fp16"}
    with pytest.raises(UserError, match="c.yaml: 'allow_fp16_flush' must be true or false"):
        config_from_dict({**base, "allow_fp16_flush": "yes"}, "c.yaml")
    monkeypatch.setattr(bench, "generate", lambda problem, *a: _tiny_gemm([1e-9])[1])
    strict = config_from_dict(base, "c.yaml")
    with pytest.raises(UserError, match=r"c.yaml \[g @ 0.5\]: weights: 1 nonzero value"):
        bench.run_benchmark(strict, cache=None)
    lenient = config_from_dict({**base, "allow_fp16_flush": True}, "c.yaml")
    assert lenient.digest() != strict.digest()
    record, = bench.run_benchmark(lenient, cache=None)["cases"]
    assert record["nnz"] == 1 and record["fp16_flushed"] == 1


def test_bench_allow_fp16_flush_flag_drops_and_reports(tmp_path, capsys, monkeypatch):
    from sparsert_cli import bench

    monkeypatch.setattr(bench, "generate", lambda problem, *a: _tiny_gemm([1e-9])[1])
    path = tmp_path / "c.yaml"
    path.write_text("problems: [{id: g, op: gemm, m: 4, k: 6, n: 16}]\nsparsity: 0.5\n"
                    "dtype: fp16\n")
    out = tmp_path / "r.json"
    code, _, err = run_main(["bench", str(path), "--compile-only", "--out", str(out)], capsys)
    assert code == 2 and "round to zero" in err and not out.exists()
    code, _, err = run_main(["bench", str(path), "--compile-only", "--out", str(out),
                             "--allow-fp16-flush"], capsys)
    assert code == 0 and "dropped weights that round to zero in fp16: g@0.5 1" in err
    record, = json.loads(out.read_text())["cases"]
    assert record["nnz"] == 1 and record["fp16_flushed"] == 1
