"""Fused pointwise -> depthwise kernels (families/immediate/fuse.py) on the CPU: the interpreter,
block by block with a poisoned scratch buffer, against the float64 reference for MobileNet v1's
pairs at 90% sparsity in every precision; groupings that would read another block's channels
are refused; the printed PTX parses back to the ChainIR (and a printer that drops the barrier,
the coherent loads or a binding is caught); every target compiles to an sm_90 cubin without
spills; the public API."""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import numpy as np
import pytest
import scipy.sparse as sp

from sparsert_cli import build as B
from sparsert_cli.cache import KernelCache
from sparsert_cli.compile import ptx_to_cubin
from sparsert_cli.errors import UserError
from sparsert_cli.families.immediate import PlanParams, build_plan, lower
from sparsert_cli.families.immediate.fuse import (FusedPlan, check_chain, depthwise_csr,
                                                  fuse_params, lower_fused, plan_fused)
from sparsert_cli.interp import PlanExecutionError, execute
from sparsert_cli.ir import Batch, ChainIR, Load
from sparsert_cli.problem_shape import PRECISIONS, Epilogue, Geometry
from sparsert_cli.reference import check, pointwise_depthwise_reference
from sparsert_cli.render import PrintedMismatch, cuda, ptx
from sparsert_cli.render.parse_ptx import check_printed
from sparsert_cli.storage import rounded

# MobileNet v1 (224x224, batch 1): (M, C, H) of the pointwise, the depthwise's stride
TARGETS = [(256, 128, 28, 1), (256, 256, 28, 2), (512, 256, 14, 1), (512, 512, 14, 1),
           (512, 512, 14, 2), (1024, 512, 7, 1)]
PRECISIONS_ALL = ("fp32", "fp16", "bf16", "fp16acc32")


def _id(target) -> str:
    m, c, h, s = target
    return f"pw{m}x{c}@{h}-dw-s{s}"


@lru_cache(maxsize=None)
def layers(m: int, c: int, seed: int = 0, density: float = 0.1):
    """(pointwise M x C weight, depthwise M x 3 x 3 weight, pointwise bias, depthwise bias):
    uniform random pattern, BN-like biases, values scaled to keep the outputs near 1."""
    rng = np.random.default_rng([seed, m, c])
    pw = (rng.standard_normal((m, c)) / np.sqrt(density * c)).astype(np.float32)
    pw[rng.random((m, c)) >= density] = 0
    dw = (rng.standard_normal((m, 3, 3)) / 3).astype(np.float32)
    b1 = tuple(float(v) for v in (0.1 * rng.standard_normal(m)).astype(np.float32))
    b2 = tuple(float(v) for v in (0.1 * rng.standard_normal(m)).astype(np.float32))
    return pw, dw, b1, b2


@lru_cache(maxsize=None)
def fused(target, precision: str, dw_activation: str = "relu", rows: int | None = None
          ) -> FusedPlan:
    m, c, h, stride = target
    pw, dw, b1, b2 = layers(m, c)
    return plan_fused(sp.csr_matrix(pw), Geometry(1, c, h, h, m), depthwise_csr(dw, m), stride,
                      Epilogue(b1, "relu"), Epilogue(b2, dw_activation), precision, rows)


def _input(target, precision, seed=1):
    m, c, h, _ = target
    x = np.random.default_rng(seed).standard_normal((1, c, h, h))
    return rounded(x, PRECISIONS[precision][0])


def _reference(target, precision, x, dw_activation="relu"):
    m, c, h, stride = target
    pw, dw, b1, b2 = layers(m, c)
    return pointwise_depthwise_reference(pw.reshape(m, c, 1, 1), dw, x, stride,
                                         PRECISIONS[precision][0], b1, "relu", b2,
                                         dw_activation)


# ---------------------------------------------------------------- interpreter vs float64


@pytest.mark.parametrize("precision", PRECISIONS_ALL)
@pytest.mark.parametrize("target", TARGETS, ids=_id)
def test_interpreter_matches_float64(target, precision):
    plan = fused(target, precision)
    chain = lower_fused(plan)
    assert chain.grid[0] == 1 and all(s.tiles == 1 for s in chain.stages)
    x = _input(target, precision)
    out = execute(chain, x)
    ref, mag = _reference(target, precision, x)
    ok, err, message = check(out, ref, mag, PRECISIONS[precision][0], 9)
    assert ok, message
    assert np.count_nonzero(ref) > ref.size // 4       # the ReLUs leave real outputs


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_check_fails_two_swapped_channels(precision):
    """The pointwise's tolerance carried through the depthwise still sees a depthwise that
    reads the wrong one of two channels."""
    target = TARGETS[2]
    m, c, h, stride = target
    plan = fused(target, precision, "none")
    x = _input(target, precision)
    out = execute(lower_fused(plan), x)
    pw, dw, b1, b2 = layers(m, c)
    wrong = pw.copy()
    wrong[[3, 4]] = wrong[[4, 3]]
    bias = list(b1)
    bias[3], bias[4] = bias[4], bias[3]
    ref, mag = pointwise_depthwise_reference(wrong.reshape(m, c, 1, 1), dw, x, stride,
                                             PRECISIONS[precision][0], bias, "relu", b2, "none")
    ok, _, message = check(out, ref, mag, PRECISIONS[precision][0], 9)
    assert not ok and "off" in message


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_chain_equals_its_stages_run_as_kernels(precision):
    """Per block with poison or whole kernels one after the other: the same numbers."""
    target = TARGETS[1]
    chain = lower_fused(fused(target, precision))
    x = _input(target, precision)
    first, second = chain.stages
    t = rounded(execute(first, x), PRECISIONS[precision][0])
    assert np.array_equal(execute(chain, x), execute(second, t))


# ---------------------------------------------------------------- refused groupings


def test_a_depthwise_over_other_groups_is_refused():
    plan = fused(TARGETS[4], "fp32")
    dw = plan.depthwise
    rotated = replace(dw, groups=dw.groups[1:] + dw.groups[:1])
    with pytest.raises(UserError, match="row group 0 of the depthwise reads channel"):
        lower_fused(replace(plan, depthwise=rotated))


def test_a_depthwise_over_one_other_row_is_refused():
    plan = fused(TARGETS[5], "fp16")
    dw = plan.depthwise
    groups = list(dw.groups)
    a, b = groups[3], groups[4]         # the last rows of two groups swap places
    groups[3] = replace(a, rows=a.rows[:-1] + b.rows[-1:])
    groups[4] = replace(b, rows=b.rows[:-1] + a.rows[-1:])
    csr = depthwise_csr(layers(1024, 512)[1], 1024)
    from sparsert_cli.families.immediate.plan import row_group
    groups = [row_group(csr, g.rows) for g in groups]
    with pytest.raises(UserError, match="row group 3 of the depthwise reads channel"):
        lower_fused(replace(plan, depthwise=replace(dw, groups=tuple(groups))))


@pytest.mark.parametrize("change, message", [
    ("threads", "column threads differ"),
    ("tiles", "tiles: it must take one"),
    ("k_split", "k_split 1"),
    ("groups_order", "grid order tiles"),
    ("width", "vector width 4 does not fit"),
    ("precision", "precisions differ"),
])
def test_unfusable_plans_are_refused(change, message):
    plan = fused(TARGETS[2], "fp32")
    pw, dw = plan.pointwise, plan.depthwise
    if change == "threads":
        dw = replace(dw, params=replace(dw.params, col_threads=pw.col_threads + 32))
    elif change == "tiles":
        pw = replace(pw, params=replace(pw.params, col_threads=32))
    elif change == "k_split":
        pw = replace(pw, params=replace(pw.params, k_split=2))
    elif change == "groups_order":
        dw = replace(dw, params=replace(dw.params, grid_order="groups"))
    elif change == "width":
        dw = replace(dw, params=replace(dw.params, vector_width=4))
    else:
        dw = replace(dw, dtype="fp16", accumulate="fp16")
    with pytest.raises(UserError, match=message):
        lower_fused(FusedPlan(pw, dw))


def test_only_batch1_pointwise_layers_fuse():
    m, c = 32, 16
    pw, dw, b1, b2 = layers(m, c)
    for geometry in (Geometry(2, c, 8, 8, m), Geometry(1, c, 8, 8, m, kernel=1, stride=2)):
        with pytest.raises(UserError, match="batch-1 1x1"):
            plan_fused(sp.csr_matrix(pw), geometry, depthwise_csr(dw, m), 1)
    with pytest.raises(UserError, match="no residual"):
        plan_fused(sp.csr_matrix(pw), Geometry(1, c, 8, 8, m), depthwise_csr(dw, m), 1,
                   dw_epilogue=Epilogue(residual=True))
    with pytest.raises(UserError, match="stride 1 or 2"):
        plan_fused(sp.csr_matrix(pw), Geometry(1, c, 8, 8, m), depthwise_csr(dw, m), 3)
    with pytest.raises(UserError, match="C x 3 x 3"):
        depthwise_csr(np.ones((m, 5, 5)), m)


# ---------------------------------------------------------------- the interpreter's poison


def _foreign_load(chain: ChainIR) -> ChainIR:
    """Stage 2's body 0 with its first load moved to a channel group 1 writes (by hand: the
    lowering refuses to make such a kernel)."""
    first, second = chain.stages
    geo = second.geometry
    body = second.phases[0][0]
    mine = sorted({f.offset // geo.height // geo.width for f in first.phases[0][0].outputs})
    other = sorted({f.offset // geo.height // geo.width for f in first.phases[0][1].outputs})
    batch = body.batches[0]
    load = batch.loads[0]
    channel = (load.offset - body.bases[load.tap].r * geo.width - body.bases[load.tap].s) \
        // (geo.height * geo.width)
    assert channel in mine
    moved = Load(load.tap, load.offset + (other[0] - channel) * geo.height * geo.width)
    batch = Batch((moved,) + batch.loads[1:], batch.fmas, batch.shifts)
    body = body._replace(batches=(batch,) + body.batches[1:])
    second = replace(second, phases=((body,) + second.phases[0][1:],))
    return replace(chain, stages=(first, second))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_poison_catches_a_load_of_another_blocks_channel(precision):
    target = TARGETS[4]
    chain = lower_fused(fused(target, precision))
    bad = _foreign_load(chain)
    with pytest.raises(UserError, match="row group 0 of the depthwise reads channel"):
        check_chain(*bad.stages)
    x = _input(target, precision)
    with pytest.raises(PlanExecutionError, match="no earlier stage of this block wrote"):
        execute(bad, x)
    # run as two whole kernels, the same stages read a finished t: nothing to see there
    t = rounded(execute(bad.stages[0], x), PRECISIONS[precision][0])
    assert np.all(np.isfinite(execute(bad.stages[1], t)))


# ---------------------------------------------------------------- printed PTX


@pytest.mark.parametrize("precision", PRECISIONS_ALL)
@pytest.mark.parametrize("dependent", [False, True])
def test_printed_ptx_parses_back_to_the_chain(precision, dependent):
    chain = lower_fused(fused(TARGETS[0], precision), dependent_launch=dependent)
    text = ptx.print_ptx(chain)
    check_printed(chain, text)
    lines = text.split("\n")
    loads = [ln.strip().split()[0] for ln in lines if "ld.global" in ln]
    assert any(op.startswith("ld.global.nc") for op in loads)
    assert any(not op.startswith("ld.global.nc") for op in loads)
    assert text.count("griddepcontrol.wait;") == (1 if dependent else 0)
    assert text.count("bar.sync 0;") == 1
    first, second = (lines.index(ptx.stage_marker(i)) for i in (0, 1))
    stage2 = lines[second:]
    assert "\tld.param.u64 %x, [arg_t];" in stage2 and "\tld.param.u64 %y, [arg_t];" in \
        lines[first:second]


def test_function_bodies_parse_back():
    chain = lower_fused(fused(TARGETS[3], "bf16"))
    assert not chain.stages[0].inline
    check_printed(chain, ptx.print_ptx(chain))


def test_keyed_ir_stays_as_it_was():
    """A KernelIR prints and parses as before: coherent loads are off unless a chain sets them."""
    plan = build_plan(sp.csr_matrix(layers(32, 16)[0]), Geometry(1, 16, 8, 8, 32),
                      PlanParams(rows_per_group=4))
    ir = lower(plan)
    assert not ir.coherent_loads
    text = ptx.print_ptx(ir)
    assert "ld.global.nc" in text and "// stage" not in text
    check_printed(ir, text)
    with pytest.raises(PrintedMismatch, match="expected ld.global.nc"):
        check_printed(ir, text.replace("ld.global.nc", "ld.global"))


@pytest.mark.parametrize("mutation, message", [
    ("no_barrier", "without a block barrier"),
    ("incoherent", "expected ld.global"),
    ("scratch_to_y", "bindings"),
    ("wrong_stage_marker", "stage markers"),
    ("early_ret", "before the end of the entry"),
])
def test_printer_mistakes_are_caught(monkeypatch, mutation, message):
    chain = lower_fused(fused(TARGETS[0], "fp16"))
    if mutation == "no_barrier":
        monkeypatch.setitem(ptx.RULES, "barrier", "")
        text = ptx.print_ptx(chain)
    elif mutation == "incoherent":
        monkeypatch.setitem(ptx.RULES, "load_coherent", ptx.RULES["load"])
        text = ptx.print_ptx(chain)
    elif mutation == "scratch_to_y":
        bindings = ((("x", "x"), ("y", "y")),) + chain.bindings[1:]
        text = ptx.print_ptx(replace(chain, bindings=bindings))
    elif mutation == "early_ret":       # the kernel would end before its depthwise stage
        text = ptx.print_ptx(chain).replace(ptx.stage_marker(1),
                                            "\tret;\n" + ptx.stage_marker(1))
    else:
        text = ptx.print_ptx(chain).replace(ptx.stage_marker(1), "\t// stage 2")
    with pytest.raises(PrintedMismatch, match=message):
        check_printed(chain, text)


def test_cuda_printer_refuses_chains():
    plan = fused(TARGETS[0], "fp32")
    with pytest.raises(UserError, match="fused kernels print only as PTX"):
        cuda.print_cuda(lower_fused(plan))
    with pytest.raises(UserError, match="fused kernels print only as PTX"):
        B.emit_fused(plan, "cuda")


# ---------------------------------------------------------------- cubins


# every target in fp16 and fp32; the widened precisions (bf16, fp16acc32: the same plans as
# fp32 with conversions) on the two whose code is the largest
BUILDS = ([(t, p) for t in TARGETS for p in ("fp16", "fp32")]
          + [(t, p) for t in (TARGETS[3], TARGETS[5]) for p in ("bf16", "fp16acc32")])


@pytest.mark.slow
@pytest.mark.parametrize("target, precision", BUILDS,
                         ids=[f"{_id(t)}-{p}" for t, p in BUILDS])
def test_every_target_compiles_without_spills(target, precision):
    plan = fused(target, precision)
    chain = lower_fused(plan, dependent_launch=True)
    compiled = ptx_to_cubin(ptx.print_ptx(chain), "sm_90", ("-Xptxas=--split-compile=2",))
    assert compiled.cubin[:4] == b"\x7fELF"
    assert chain.entry in compiled.resources, compiled.log
    res = compiled.entry_resources(chain.entry)
    assert res.registers > 0
    assert res.spills == 0 and res.stack_bytes == 0, (plan.pointwise.params.name(), res)


def test_fuse_params_one_tile_for_every_target():
    for target in TARGETS:
        m, c, h, stride = target
        for precision in PRECISIONS_ALL:
            params, dw_width = fuse_params(Geometry(1, c, h, h, m), stride, m * c // 10,
                                           precision)
            dw_columns = (h // stride) ** 2
            assert params.col_threads * params.vector_width >= h * h
            assert params.col_threads * dw_width >= dw_columns
            assert params.col_threads % 32 == 0 and params.col_threads <= 1024
            assert params.col_threads - 32 < max(-(-h * h // params.vector_width),
                                                 -(-dw_columns // dw_width))


# ---------------------------------------------------------------- build and API


def test_build_fused_caches_and_checks_the_printed_text(tmp_path):
    plan = fused(TARGETS[0], "fp16")
    cache = KernelCache(tmp_path / "cache")
    build, source = B.build_fused(plan, "sm_90", cache, keep_source=True)
    assert not build.cached and build.resources.spills == 0 and build.entry == plan.entry
    again, _ = B.build_fused(plan, "sm_90", cache)
    assert again.cached and again.cubin == build.cubin and again.key == build.key
    other, _ = B.build_fused(plan, "sm_90", cache, dependent_launch=True)
    assert not other.cached and other.key != build.key and other.dependent_launch
    assert fused(TARGETS[0], "fp16", rows=4).digest() != plan.digest()
    with pytest.raises(UserError, match="sm_90 or newer"):
        B.build_fused(plan, "sm_80", None, dependent_launch=True)
    assert source == B.emit_fused(plan)


def test_api_fused_kernel_runs_on_the_cpu(isolated_cache):
    import sparsert_cli as sparsert

    m, c = 64, 32
    pw, dw, b1, b2 = layers(m, c)
    kernel = sparsert.fuse_pointwise_depthwise(
        pw, dw.reshape(m, 1, 3, 3), input_shape=(c, 10, 10), stride=2, dtype="fp16",
        pw_epilogue={"bias": b1, "activation": "relu"}, dw_epilogue={"bias": b2},
        arch="sm_90", verify=True, dependent_launch=True)
    assert kernel.verified["ok"], kernel.verified
    assert [a["name"] for a in kernel.arguments] == ["x", "y", "t", "z"]
    assert kernel.output_shape == (1, m, 5, 5) and kernel.scratch_shape == (1, m, 10, 10)
    assert kernel.resources.spills == 0 and kernel.grid == (1, len(kernel.plan.pointwise.groups),
                                                            1)
    assert "griddepcontrol.wait;" in kernel.source
    x = kernel.random_inputs(np.random.default_rng(3))
    assert kernel.check(kernel.run_cpu(x), x)[0]
    again = sparsert.fuse_pointwise_depthwise(
        sp.csr_matrix(pw), dw, input_shape=(1, c, 10, 10), stride=2, dtype="fp16",
        pw_epilogue={"bias": b1, "activation": "relu"}, dw_epilogue={"bias": b2},
        arch="sm_90", dependent_launch=True)
    assert again.cached and again.entry == kernel.entry


@pytest.mark.parametrize("kwargs, message", [
    ({"input_shape": (2, 32, 10, 10)}, "batch 1"),
    ({"stride": 3}, "stride must be 1 or 2"),
    ({"stride": 2.0}, "stride must be 1 or 2"),
    ({"dw_epilogue": {"activation": "gelu"}}, "activation none, relu or relu6, not gelu"),
    ({"pw_epilogue": {"activation": "gelu"}}, "activation none, relu or relu6, not gelu"),
    ({"vector_width": 3}, "vector_width must be 1, 2, 4 or 8"),
    ({"depthwise_pairs": "yes"}, "depthwise_pairs must be"),
    ({"dw_weight": np.ones((64, 5, 5))}, "C x 3 x 3"),
    ({"dw_epilogue": {"residual": True}}, "no residual"),
    ({"dtype": "fp8"}, "no kernel stores fp8"),
    ({"rows_per_group": 0}, "rows_per_group"),
    ({"pw_weight": np.ones((64, 32, 3, 3))}, "batch-1 1x1"),
    ({"input_shape": (16, 10, 10)}, "channels"),
])
def test_api_refuses_bad_input(isolated_cache, kwargs, message):
    import sparsert_cli as sparsert

    pw, dw, _, _ = layers(64, 32)
    args = {"pw_weight": pw, "dw_weight": dw, "input_shape": (32, 10, 10), "arch": "sm_90",
            **kwargs}
    with pytest.raises(UserError, match=message):
        sparsert.fuse_pointwise_depthwise(args.pop("pw_weight"), args.pop("dw_weight"), **args)


def test_compile_pairs_builds_many_at_once_like_one_by_one(tmp_path):
    """sparsify_'s fused pairs compile together (build_all's process pool): each kernel is the
    one fuse_pointwise_depthwise builds, a refused pair is a UserError in its place, every
    compile reports once, and a second call is all cache hits."""
    from sparsert_cli.fused import compile_pairs, fuse_pointwise_depthwise

    specs = []
    for m, c, stride in ((32, 16, 1), (48, 32, 2)):
        pw, dw, b1, b2 = layers(m, c)
        specs.append(dict(pw_weight=pw, dw_weight=dw, input_shape=(c, 8, 8), stride=stride,
                          pw_epilogue={"bias": b1, "activation": "relu"},
                          dw_epilogue={"bias": b2, "activation": "relu6"}, dtype="fp16"))
    bad = {**specs[0], "stride": 3}
    cache = KernelCache(tmp_path / "cache")
    done = []
    got = compile_pairs([specs[0], bad, specs[1]], arch="sm_90", cache=cache,
                        dependent_launch=True, jobs=2, on_done=done.append)
    assert isinstance(got[1], UserError) and "stride must be 1 or 2" in got[1].message
    assert sorted(done) == [0, 1, 2]            # the refused pair reports too
    for kernel, spec in ((got[0], specs[0]), (got[2], specs[1])):
        alone = fuse_pointwise_depthwise(**spec, arch="sm_90", cache=False,
                                         dependent_launch=True)
        assert not kernel.cached and kernel.entry == alone.entry and kernel.dependent_launch
        assert kernel.source == alone.source and kernel.resources == alone.resources
        assert kernel.verify_cpu()["ok"]
    again = compile_pairs(specs, arch="sm_90", cache=cache, dependent_launch=True, jobs=2)
    assert all(k.cached for k in again) and [k.entry for k in again] == [got[0].entry,
                                                                          got[2].entry]
