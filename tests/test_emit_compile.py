"""Emitters and the compiler wrapper, without a GPU: every plan compiles to an sm_90 cubin through
both routes (PTX via nvJitLink, CUDA C++ via NVRTC) without spills, the emitted text prints the
plan exactly (hex immediates, immediate offsets, vector loads), and compile errors carry the log."""

from __future__ import annotations

import re
import struct
import tempfile

import numpy as np
import pytest

from sparsert_cli import build as B
from sparsert_cli.api import config_layers, plan_layers
from sparsert_cli.build import build_kernel, make_plan
from sparsert_cli.compile import (Resources, check_arch, cpp_to_cubin, parse_ptxas,
                                  ptx_to_cubin)
from sparsert_cli.config import load_config
from sparsert_cli.errors import CompileError
from sparsert_cli.patterns import pruned_weights, to_csr, uniform_weights
from sparsert_cli.families.immediate import INLINE_LIMIT, PlanParams, build_plan, lower
from sparsert_cli.problem_shape import Epilogue, Geometry
from sparsert_cli.problems import Problem
from sparsert_cli.render.cuda import print_cuda
from sparsert_cli.render.ptx import f32, print_ptx, ptx_version

pytestmark = pytest.mark.usefixtures("isolated_cache")

ELF = b"\x7fELF"


def emit_ptx(plan, arch="sm_90", **lower_options):
    return print_ptx(lower(plan, **lower_options), arch)


def emit_cuda(plan, **lower_options):
    return print_cuda(lower(plan, **lower_options))


def _ci_cases(repo):
    """(label, plan) of every ci.yaml case, planned as `bench` plans them."""
    layers = config_layers(load_config(repo / "configs" / "ci.yaml"))
    return [(layer.label, plan) for layer, (plan, _) in
            zip(layers, plan_layers(layers, gpu_name="NVIDIA H100 80GB HBM3"))]


def _compile(plan, emitter, **emit_kwargs):
    if emitter == "ptx":
        return ptx_to_cubin(emit_ptx(plan, "sm_90", **emit_kwargs), "sm_90")
    return cpp_to_cubin(emit_cuda(plan, **emit_kwargs), "sm_90")


def _assert_good_cubin(compiled, plan):
    assert compiled.cubin[:4] == ELF
    assert plan.entry.encode() in compiled.cubin
    res = compiled.entry_resources(plan.entry)
    assert plan.entry in compiled.resources, compiled.log
    assert res.registers > 0
    assert res.spills == 0, f"{res} for {plan.params.name()}"
    return res


# ---------------------------------------------------------------- every ci case, both emitters


@pytest.mark.slow
@pytest.mark.parametrize("emitter", ["ptx", "cuda"])
def test_every_ci_case_compiles_to_sm90_cubin_without_spills(repo, emitter):
    cases = _ci_cases(repo)
    assert len(cases) == 14
    for key, plan in cases:
        build, source = build_kernel(plan, emitter, "sm_90", cache=None, keep_source=True)
        assert build.cubin[:4] == ELF, key
        assert build.entry == plan.entry and build.entry in source
        assert build.resources.registers > 0, key
        assert build.resources.spills == 0, (key, build.resources)
        assert build.emitter == emitter and build.arch == "sm_90" and not build.cached


# ---------------------------------------------------------------- feature plans, both emitters


def _feature_plans():
    gemm = Problem("f_gemm", "gemm", 24, 40, height=1, width=96)
    conv = Problem("f_3x3", "conv3x3", 12, 6, height=9, width=7, padding=1, batch=2)
    conv_s2 = Problem("f_3x3_s2", "conv3x3", 10, 4, height=9, width=8, stride=2, padding=1)
    pw = Problem("f_pw_pad", "conv1x1", 8, 5, height=5, width=6, padding=1)
    w_gemm = pruned_weights(gemm.weight_shape, 0.8, 1)
    w_conv = uniform_weights(conv.weight_shape, 0.8, 2)
    w_s2 = uniform_weights(conv_s2.weight_shape, 0.7, 3)
    w_pw = uniform_weights(pw.weight_shape, 0.5, 4)
    bias = tuple(float(v) for v in np.linspace(-1, 1, 24).astype(np.float32))
    return {
        "k_split2_vec4": (gemm, w_gemm, PlanParams(rows_per_group=4, k_split=2), Epilogue()),
        "k_split3_masked": (conv, w_conv, PlanParams(rows_per_group=5, k_split=3), Epilogue()),
        "bias_relu6_residual": (gemm, w_gemm, PlanParams(rows_per_group=8),
                                Epilogue(bias=bias, activation="relu6", residual=True)),
        "k_split_epilogue": (gemm, w_gemm, PlanParams(rows_per_group=4, k_split=4,
                                                      vector_width=2),
                             Epilogue(bias=bias, activation="relu", residual=True)),
        "max_registers": (gemm, w_gemm, PlanParams(rows_per_group=2, max_registers=64),
                          Epilogue()),
        "masked_3x3_stride2": (conv_s2, w_s2, PlanParams(rows_per_group=3, load_batch=3),
                               Epilogue(residual=True, activation="relu")),
        "masked_1x1": (pw, w_pw, PlanParams(rows_per_group=8), Epilogue()),
    }


FEATURES = sorted(_feature_plans())


@pytest.mark.slow
@pytest.mark.parametrize("emitter", ["ptx", "cuda"])
@pytest.mark.parametrize("feature", FEATURES)
def test_feature_plans_compile_through_both_emitters(emitter, feature):
    problem, weight, params, epilogue = _feature_plans()[feature]
    plan = make_plan(problem, weight, params, epilogue)
    res = _assert_good_cubin(_compile(plan, emitter), plan)
    if params.max_registers:
        assert res.registers <= params.max_registers


@pytest.mark.slow
@pytest.mark.parametrize("emitter", ["ptx", "cuda"])
@pytest.mark.parametrize("feature", ["k_split3_masked", "bias_relu6_residual",
                                     "masked_3x3_stride2"])
def test_out_of_line_function_bodies_compile(emitter, feature):
    """inline_limit=0 forces the one-function-per-body layout that large kernels use."""
    problem, weight, params, epilogue = _feature_plans()[feature]
    plan = make_plan(problem, weight, params, epilogue)
    source = (emit_ptx(plan, inline_limit=0) if emitter == "ptx"
              else emit_cuda(plan, inline_limit=0))
    if emitter == "ptx":
        assert ".func g0p0(" in source and "call.uni g0p0," in source
    else:
        assert "__noinline__" in source
    _assert_good_cubin(_compile(plan, emitter, inline_limit=0), plan)


EDGE_GEOMETRIES = {
    "masked_3x3_b2": Geometry(batch=2, in_channels=3, height=5, width=7, out_channels=10,
                              kernel=3, padding=1),
    "gemm_vec4": Geometry(batch=1, in_channels=8, height=1, width=64, out_channels=9),
    "masked_3x3_1x1_input": Geometry(batch=2, in_channels=3, height=1, width=1,
                                     out_channels=4, kernel=3, padding=1),
}


@pytest.mark.slow
@pytest.mark.parametrize("emitter", ["ptx", "cuda"])
@pytest.mark.parametrize("kind", ["all_zero", "single_nonzero", "one_col_all"])
@pytest.mark.parametrize("geo_name", sorted(EDGE_GEOMETRIES))
def test_edge_patterns_compile_with_every_feature_on(gen, emitter, kind, geo_name):
    """Empty groups, empty k-split slices and a lone column must still print valid code."""
    geometry = EDGE_GEOMETRIES[geo_name]
    weight = gen.conv_weight(kind, geometry, 0.3, np.random.default_rng(7))
    params = PlanParams(rows_per_group=16, vector_width=4, col_threads=128, k_split=4,
                        load_batch=16, balance="contiguous")
    epilogue = Epilogue(bias=(0.25,) * geometry.out_channels, activation="relu6",
                        residual=True)
    plan = build_plan(to_csr(weight), geometry, params, epilogue)
    inline_limit = 0 if kind == "one_col_all" else INLINE_LIMIT
    _assert_good_cubin(_compile(plan, emitter, inline_limit=inline_limit), plan)


def test_max_registers_is_passed_to_both_emitters():
    problem, weight, params, epilogue = _feature_plans()["max_registers"]
    plan = make_plan(problem, weight, params, epilogue)
    assert ".maxnreg 64" in emit_ptx(plan)
    assert "__maxnreg__(64)" in emit_cuda(plan)


# ---------------------------------------------------------------- PTX text prints the plan


@pytest.mark.parametrize("value, text", [(0.5, "0f3F000000"), (1.0, "0f3F800000"),
                                         (-2.0, "0fC0000000"), (6.0, "0f40C00000"),
                                         (0.0, "0f00000000")])
def test_f32_hex_immediates(value, text):
    assert f32(value) == text


def _plan(problem, sparsity=0.7, seed=0, **params):
    weight = uniform_weights(problem.weight_shape, sparsity, seed)
    return make_plan(problem, weight, PlanParams(**params)), weight


def test_ptx_holds_every_weight_as_a_hex_immediate():
    plan, weight = _plan(Problem("g", "gemm", 9, 17, height=1, width=40))
    ptx = emit_ptx(plan)
    immediates = set(re.findall(r"(?:fma|mul)\.rn\.f32 [^;]*?, (0f[0-9A-F]{8})", ptx))
    expected = {f32(float(v)) for v in weight[weight != 0]}
    assert immediates == expected
    for v in weight[weight != 0][:5]:
        bits = struct.unpack("<I", struct.pack("<f", v))[0]
        assert f"0f{bits:08X}" in ptx


def test_ptx_multiplies_each_nonzero_once_per_vector_lane():
    plan, _ = _plan(Problem("g", "gemm", 16, 32, height=1, width=64), rows_per_group=4)
    assert plan.vector_width == 4
    ptx = emit_ptx(plan)
    fmas = len(re.findall(r"\b(?:fma|mul)\.rn\.f32\b", ptx))
    assert fmas == plan.nnz * plan.vector_width


def test_ptx_loads_use_immediate_offsets_of_each_tap():
    problem = Problem("c", "conv3x3", 6, 4, height=7, width=5, padding=1)
    plan, _ = _plan(problem, rows_per_group=3)
    ptx = emit_ptx(plan)
    offsets = re.findall(r"ld\.global\.nc\.f32 %b\d+, \[%xb\d+\+(\d+)\];", ptx)
    assert len(offsets) == plan.loads
    expected = sorted(plan.geometry.tap_offset(ld.tap) * 4
                      for g in plan.groups for sl in g.slices for ld in sl)
    assert sorted(int(o) for o in offsets) == expected
    assert not re.search(r"ld\.global[^;]*\[%\w+\+%", ptx), "register offsets in loads"


def test_ptx_uses_v4_loads_and_stores_when_vector_width_is_4():
    plan, _ = _plan(Problem("g", "gemm", 8, 16, height=1, width=64))
    assert plan.vector_width == 4
    ptx = emit_ptx(plan)
    loads = re.findall(r"ld\.global\.nc(\.v\d)?\.f32", ptx)
    assert len(loads) == plan.loads and set(loads) == {".v4"}
    assert "st.global.v4.f32" in ptx


def test_ptx_uses_scalar_loads_when_the_shape_forces_vector_width_1():
    plan, _ = _plan(Problem("g", "gemm", 8, 16, height=1, width=37), vector_width=4)
    assert plan.vector_width == 1
    ptx = emit_ptx(plan)
    assert ".v4" not in ptx and ".v2" not in ptx


def test_ptx_header_targets_the_arch_and_names_the_plan():
    plan, _ = _plan(Problem("g", "gemm", 8, 16, height=1, width=64))
    ptx = emit_ptx(plan, "sm_90")
    assert ".target sm_90\n" in ptx and ".version 8.0\n" in ptx
    assert f".visible .entry {plan.entry}(" in ptx
    assert plan.params.name() in ptx.splitlines()[0]
    assert ptx_version("sm_100") == "8.8" and ptx_version("sm_90a") == "8.0"


def test_ptx_epilogue_instructions_follow_the_plan():
    problem = Problem("g", "gemm", 4, 8, height=1, width=32)
    weight = uniform_weights(problem.weight_shape, 0.5, 0)
    bias = (0.5, 0.0, -1.0, 2.0)
    plan = make_plan(problem, weight, PlanParams(rows_per_group=4),
                     Epilogue(bias=bias, activation="relu6", residual=True))
    ptx = emit_ptx(plan)
    width = plan.vector_width
    assert len(re.findall(r"add\.f32 %a\d+, %a\d+, 0f", ptx)) == 3 * width    # bias 0 skipped
    assert f"0f{struct.unpack('<I', struct.pack('<f', -1.0))[0]:08X}" in ptx
    assert len(re.findall(r"max\.f32 [^;]*0f00000000", ptx)) == 4 * width
    assert len(re.findall(r"min\.f32 [^;]*0f40C00000", ptx)) == 4 * width
    assert len(re.findall(r"ld\.global\.nc[^;]*\[%res\+\d+\]", ptx)) == 4
    assert ".param .u64 arg_res" in ptx


def test_masked_plan_takes_a_zero_buffer_argument():
    plan, _ = _plan(Problem("c", "conv3x3", 4, 2, height=5, width=5, padding=1))
    assert plan.arguments == ("x", "y", "z")
    assert ".param .u64 arg_z" in emit_ptx(plan)
    assert "const float* __restrict__ z" in emit_cuda(plan)
    unpadded, _ = _plan(Problem("c", "conv3x3", 4, 2, height=5, width=5))
    assert unpadded.arguments == ("x", "y")
    assert "arg_z" not in emit_ptx(unpadded)


# ---------------------------------------------------------------- CUDA text prints the plan


def test_cuda_literals_round_trip_every_weight_exactly():
    problem = Problem("g", "gemm", 7, 11, height=1, width=30)
    weight = uniform_weights(problem.weight_shape, 0.5, 3)
    weight[0, :3, 0, 0] = np.array([1e-42, 3.0e38, -1.5], dtype=np.float32)   # denormal, huge
    plan = make_plan(problem, weight, PlanParams())
    source = emit_cuda(plan)
    # the first FMA of each row is a multiply (its sum starts there), the others fmaf
    literals = re.findall(r"(?:fmaf\([^,]+, |= b\d+(?:\.[xyzw])? \* )([-0-9a-fx.p+]+)f", source)
    assert len(literals) == plan.nnz * plan.vector_width
    values = {np.float32(float.fromhex(lit)) for lit in literals}
    assert values == set(weight[weight != 0].ravel().tolist())
    _assert_good_cubin(cpp_to_cubin(source), plan)


def test_cuda_source_declares_entry_and_launch_bounds():
    plan, _ = _plan(Problem("g", "gemm", 8, 16, height=1, width=64), k_split=2)
    source = emit_cuda(plan)
    assert f'extern "C" __global__ void __launch_bounds__({plan.col_threads * 2})' in source
    assert f"{plan.entry}(" in source
    assert "__syncthreads();" in source and "sparsert_partials" in source


# ---------------------------------------------------------------- compile errors and logs


def test_garbage_ptx_raises_compile_error_with_the_log():
    with pytest.raises(CompileError) as caught:
        ptx_to_cubin(".version 8.0\n.target sm_90\n.address_size 64\nthis is not ptx;\n")
    assert caught.value.log.strip(), "the ptxas log must travel with the error"
    assert "nvJitLink" in str(caught.value)
    assert "line 4" in caught.value.log            # ptxas points at the bad line
    assert caught.value.log.strip() in str(caught.value)


def test_bad_cuda_raises_compile_error_with_the_log():
    with pytest.raises(CompileError) as caught:
        cpp_to_cubin('extern "C" __global__ void k() { undeclared_thing(); }')
    assert "undeclared_thing" in caught.value.log
    assert "error" in caught.value.log


def test_build_kernel_saves_the_failing_source(monkeypatch, tmp_path):
    plan, _ = _plan(Problem("g", "gemm", 4, 4, height=1, width=8))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(B, "render_source", lambda ir, emitter, arch, *family: "not ptx at all\n")
    with pytest.raises(CompileError) as caught:
        build_kernel(plan, "ptx", "sm_90", cache=None)
    path = caught.value.source_path
    assert path and path.startswith(str(tmp_path)) and path.endswith(".ptx")
    assert open(path).read() == "not ptx at all\n"
    assert path in str(caught.value)


@pytest.mark.parametrize("arch", ["sm_35", "sm_999"])
def test_unsupported_arch_is_a_compile_error_in_both_routes(arch):
    plan, _ = _plan(Problem("g", "gemm", 4, 8, height=1, width=16))
    with pytest.raises(CompileError):
        cpp_to_cubin(emit_cuda(plan), arch)
    with pytest.raises(CompileError):
        ptx_to_cubin(emit_ptx(plan, arch), arch)


@pytest.mark.parametrize("arch", ["sm_90", "sm_80", "sm_100", "sm_90a"])
def test_check_arch_accepts_sm_names(arch):
    assert check_arch(arch) == arch


@pytest.mark.parametrize("arch", ["sm90", "sm_9", "compute_90", "SM_90", "sm_90 ", "sm_90\n", "gfx90a"])
def test_check_arch_rejects_other_names(arch):
    with pytest.raises(ValueError, match="sm_90"):
        check_arch(arch)


def test_compile_for_another_arch_yields_a_different_cubin():
    plan, _ = _plan(Problem("g", "gemm", 4, 8, height=1, width=16))
    a = ptx_to_cubin(emit_ptx(plan, "sm_90"), "sm_90").cubin
    b = ptx_to_cubin(emit_ptx(plan, "sm_80"), "sm_80").cubin
    assert a[:4] == b[:4] == ELF and a != b


# ---------------------------------------------------------------- parse_ptxas


NVJITLINK_INLINE_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'sparsert_k' for 'sm_90'
ptxas info    : Function properties for sparsert_k
ptxas         .     9040 bytes stack frame, 94836 bytes spill stores, 95292 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers
ptxas info    : Compile time = 7955.366 ms
info    : 0 bytes gmem
info    : Function properties for 'sparsert_k':
info    : used 40 registers, used 6 barriers, 9040 stack, 512 bytes smem, 544 bytes cmem[0]
"""

NVJITLINK_FUNC_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Function properties for g1p0
ptxas         .     2976 bytes stack frame, 100 bytes spill stores, 200 bytes spill loads
ptxas info    : Function properties for g0p0
ptxas         .     5000 bytes stack frame, 10 bytes spill stores, 20 bytes spill loads
ptxas info    : Compiling entry function 'sparsert_k' for 'sm_90'
ptxas info    : Function properties for sparsert_k
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 24 registers, used 0 barriers
info    : 0 bytes gmem
info    : Function properties for 'sparsert_k':
info    : used 32 registers, used 5 barriers, 5160 stack, 0 bytes smem, 544 bytes cmem[0]
"""

NVRTC_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'sparsert_k' for 'sm_90'
ptxas info    : Function properties for sparsert_k
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 30 registers, used 1 barriers, 1024 bytes smem, 368 bytes cmem[0]
"""


def test_a_link_nvjitlink_answered_from_its_cache_is_done_again_for_ptxas_log(monkeypatch):
    """CUDA 13.0's nvJitLink answers PTX it linked before from ~/.nv/ComputeCache with an info
    log of its own summary only (H100 run S15-9): no ptxas lines, so no spill counts. The link
    is done again with PTX the cache has not seen (a comment), and its log is parsed."""
    from sparsert_cli import compile as compile_mod

    start = NVJITLINK_INLINE_LOG.index("\ninfo    : 0 bytes gmem") + 1
    cached_log = NVJITLINK_INLINE_LOG[start:]
    assert parse_ptxas(cached_log) == {}
    seen = []

    def link(ptx, opts):
        seen.append(ptx)
        return b"cubin", cached_log if len(seen) == 1 else NVJITLINK_INLINE_LOG

    monkeypatch.setattr(compile_mod, "_link", link)
    ptx = (".version 8.0\n.target sm_90\n.address_size 64\n"
           ".visible .entry sparsert_k()\n{\n\tret;\n}\n")
    compiled = ptx_to_cubin(ptx, "sm_90")
    assert len(seen) == 2 and seen[0] == ptx and seen[1].startswith(ptx)
    assert "// sparsert: linked again" in seen[1] and seen[1] != ptx
    assert compiled.resources["sparsert_k"].spills == 94836 + 95292
    assert compiled.log == NVJITLINK_INLINE_LOG
    seen.clear()                                     # a full log first: linked once
    monkeypatch.setattr(compile_mod, "_link",
                        lambda ptx, opts: (seen.append(ptx), (b"c", NVJITLINK_INLINE_LOG))[1])
    assert ptx_to_cubin(ptx, "sm_90").resources["sparsert_k"].registers == 40
    assert len(seen) == 1


def test_parse_ptxas_prefers_nvjitlink_entry_summary():
    res = parse_ptxas(NVJITLINK_INLINE_LOG)
    assert res == {"sparsert_k": Resources(registers=40, stack_bytes=9040,
                                           spill_store_bytes=94836, spill_load_bytes=95292,
                                           shared_bytes=512)}
    assert res["sparsert_k"].spills == 94836 + 95292


def test_parse_ptxas_sums_spills_over_called_functions():
    res = parse_ptxas(NVJITLINK_FUNC_LOG)["sparsert_k"]
    assert res.registers == 32                   # callee-inclusive count from nvJitLink
    assert (res.spill_store_bytes, res.spill_load_bytes) == (110, 220)
    assert res.stack_bytes == 5000


def test_parse_ptxas_reads_nvrtc_used_registers_line():
    res = parse_ptxas(NVRTC_LOG)["sparsert_k"]
    assert (res.registers, res.shared_bytes, res.spills) == (30, 1024, 0)


def test_parse_ptxas_of_empty_log_is_empty():
    assert parse_ptxas("") == {}


def test_real_nvjitlink_log_reports_the_entry_and_spills_when_forced():
    """A register cap far below need makes ptxas spill: proves spills are actually parsed."""
    problem = Problem("g", "gemm", 32, 64, height=1, width=64)
    weight = uniform_weights(problem.weight_shape, 0.5, 0)
    plan = make_plan(problem, weight, PlanParams(rows_per_group=16, vector_width=4,
                                                 col_threads=32, max_registers=32))
    compiled = ptx_to_cubin(emit_ptx(plan, inline_limit=0))
    res = compiled.entry_resources(plan.entry)
    assert plan.entry in compiled.resources
    assert res.registers <= 32
    assert res.spills > 0
