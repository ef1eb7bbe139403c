"""Pair windows (KernelIR.pair_windows): stride-1 3x3 convolutions with 2-byte storage take column
pairs. Every load reads an aligned pair, the odd windows are PRMT shifts of two pairs, and padding
pairs lie wholly outside the image. Without a GPU: the interpreter against float64 and against the
one-column kernel (the same FMAs in the same order per column), both printers read back, edits of
the printed shift caught, and where the defaults take them."""

from __future__ import annotations

import re

import numpy as np
import pytest

from sparsert_cli import storage
from sparsert_cli.api import plan_for, problem_layer
from sparsert_cli.errors import UserError
from sparsert_cli.families.immediate import PlanParams, build_plan, fit_vector_width, lower
from sparsert_cli.families.immediate.plan import pair_windows
from sparsert_cli.interp import PlanExecutionError, execute
from sparsert_cli.ir import Shift
from sparsert_cli.patterns import pruned_weights, to_csr
from sparsert_cli.problem_shape import PRECISIONS, Epilogue, Geometry
from sparsert_cli.reference import check
from sparsert_cli.render import PrintedMismatch, parse_cuda
from sparsert_cli.render.cuda import print_cuda
from sparsert_cli.render.parse_ptx import check_printed
from sparsert_cli.render.ptx import print_ptx

HALF = ("fp16", "fp16acc32", "bf16")


def _round(values, dtype):
    return np.asarray(storage.rounded(np.asarray(values, dtype=np.float64), dtype),
                      dtype=np.float64)


def _plan(weight, geometry, precision, epilogue=Epilogue(), **params):
    dtype, accumulate = PRECISIONS[precision]
    return build_plan(to_csr(weight), geometry, PlanParams(**params), epilogue, dtype, accumulate)


def _inputs(geometry, residual, dtype, seed):
    rng = np.random.default_rng(seed)
    x = _round(rng.standard_normal(geometry.input_elems), dtype)
    res = (_round(rng.standard_normal(geometry.output_elems), dtype) if residual else None)
    return x, res


def test_which_shapes_take_pairs():
    ok = Geometry(1, 4, 6, 8, 3, kernel=3, stride=1, padding=1)
    assert pair_windows(ok, "fp16") and pair_windows(ok, "bf16")
    assert not pair_windows(ok, "fp32")
    for bad in (Geometry(1, 4, 6, 7, 3, kernel=3, stride=1, padding=1),     # odd width
                Geometry(1, 4, 6, 8, 3, kernel=3, stride=2, padding=1),     # stride 2
                Geometry(1, 4, 6, 8, 3, kernel=3, stride=1, padding=0)):    # no padding
        assert not pair_windows(bad, "fp16")
    # only the immediate family asks for them (the streamed family keeps one column)
    assert fit_vector_width(ok, 8, "fp16", windows=True) == 2
    assert fit_vector_width(ok, 8, "fp16") == 1
    assert fit_vector_width(ok, 1, "fp16", windows=True) == 1


@pytest.mark.parametrize("precision", HALF)
@pytest.mark.parametrize("batch,height,width", [(1, 6, 8), (2, 5, 4), (1, 3, 2)])
def test_pairs_equal_the_one_column_kernel_and_float64(gen, precision, batch, height, width):
    geometry = Geometry(batch, 9, height, width, 10, kernel=3, stride=1, padding=1)
    weight = pruned_weights((10, 9, 3, 3), 0.75, 4)
    bias = tuple(float(v) for v in np.linspace(-1, 1, 10))
    epilogue = Epilogue(bias, "relu6", residual=True)
    dtype = PRECISIONS[precision][0]
    x, res = _inputs(geometry, True, dtype, 1)
    outs = []
    for width_, load_batch in ((1, 8), (2, 8), (2, 1), (2, 4)):
        plan = _plan(weight, geometry, precision, epilogue, rows_per_group=3,
                     vector_width=width_, col_threads=32, load_batch=load_batch)
        ir = lower(plan)
        assert ir.pair_windows == (width_ == 2) and plan.vector_width == width_
        check_printed(ir, print_ptx(ir))
        parse_cuda.check_printed(ir, print_cuda(ir))
        outs.append(execute(ir, x, res))
    for out in outs[1:]:   # same FMAs in the same order per column: bit for bit
        assert np.array_equal(out, outs[0])
    ref, mag = gen.reference_for(plan, weight, x.reshape(batch, 9, height, width),
                                 res.reshape(batch, 10, height, width))
    ok, _, message = check(outs[1], ref, mag, dtype, geometry.taps)
    assert ok, message


@pytest.mark.parametrize("precision", HALF)
def test_pairs_with_a_k_split_match_float64(gen, precision):
    geometry = Geometry(1, 12, 6, 6, 8, kernel=3, stride=1, padding=1)
    weight = pruned_weights((8, 12, 3, 3), 0.8, 9)
    plan = _plan(weight, geometry, precision, rows_per_group=4, vector_width=2,
                 col_threads=32, k_split=2)
    ir = lower(plan)
    assert ir.pair_windows and any(b.shifts for body in ir.phases[0] for b in body.batches)
    check_printed(ir, print_ptx(ir))
    parse_cuda.check_printed(ir, print_cuda(ir))
    dtype = PRECISIONS[precision][0]
    x, _ = _inputs(geometry, False, dtype, 2)
    out = execute(ir, x)
    ref, mag = gen.reference_for(plan, weight, x.reshape(1, 12, 6, 6), None)
    ok, _, message = check(out, ref, mag, dtype, geometry.taps)
    assert ok, message


def test_pair_loads_are_aligned_pairs_and_shifts_are_prmt():
    geometry = Geometry(1, 4, 6, 8, 4, kernel=3, stride=1, padding=1)
    weight = np.ones((4, 4, 3, 3), dtype=np.float32)
    ir = lower(_plan(weight, geometry, "fp16", rows_per_group=4, vector_width=2,
                     col_threads=32))
    ptx = print_ptx(ir)
    offsets = [int(v) for v in re.findall(r"ld\.global\.nc\.b32 %b\d+, \[%xb\d+\+(-?\d+)\]", ptx)]
    assert offsets and all(v % 4 == 0 for v in offsets)     # 2-byte elements, even columns
    # every (c, r) with all three taps: pairs L, C, R and the two shifts
    assert len(offsets) == 4 * 3 * 3
    assert ptx.count("prmt.b32") == 4 * 3 * 2
    assert "sub.s32 %iw, %iw, 2;" in ptx     # the corner one column left of ow - padding


def test_an_edited_shift_is_caught_by_both_readers():
    geometry = Geometry(1, 4, 6, 8, 4, kernel=3, stride=1, padding=1)
    weight = pruned_weights((4, 4, 3, 3), 0.5, 3)
    ir = lower(_plan(weight, geometry, "fp16", rows_per_group=2, vector_width=2,
                     col_threads=32))
    ptx = print_ptx(ir)
    assert "0x5432" in ptx
    with pytest.raises(PrintedMismatch):
        check_printed(ir, ptx.replace("0x5432", "0x5410", 1))
    swapped = re.sub(r"prmt\.b32 (%s\d+), (%b\d+), (%b\d+),", r"prmt.b32 \1, \3, \2,", ptx,
                     count=1)
    assert swapped != ptx
    with pytest.raises(PrintedMismatch):
        check_printed(ir, swapped)
    cuda = print_cuda(ir)
    edited = re.sub(r"__byte_perm\(b(\d+), b(\d+),", r"__byte_perm(b\2, b\1,", cuda, count=1)
    assert edited != cuda
    with pytest.raises(PrintedMismatch):
        parse_cuda.check_printed(ir, edited)


def test_a_shift_in_a_kernel_without_pairs_is_refused():
    geometry = Geometry(1, 4, 6, 8, 4, kernel=3, stride=1, padding=1)
    weight = pruned_weights((4, 4, 3, 3), 0.5, 3)
    ir = lower(_plan(weight, geometry, "fp16", rows_per_group=2, vector_width=1,
                     col_threads=32))
    body = ir.phases[0][0]
    batch = body.batches[0]
    bad_body = body._replace(batches=(batch._replace(shifts=(Shift(0, 0),)),)
                             + body.batches[1:])
    bad = ir.__class__(**{**ir.__dict__, "phases": ((bad_body,) + ir.phases[0][1:],)})
    with pytest.raises(PlanExecutionError, match="pair windows"):
        execute(bad, np.zeros(geometry.input_elems))


@pytest.mark.parametrize("problem,sparsity,want", [
    ("rn50_c3_3x3", 0.9, "r2v2t224"), ("rn50_c2_3x3", 0.9, "r4v2t224"),
    ("rn50_c3_3x3", 0.95, "r2v2t224"),
    ("rn50_c4_3x3", 0.9, "r2v1t224")])         # 196 columns: one tile already holds them
def test_2_byte_defaults_take_pairs_over_more_than_one_tile(problem, sparsity, want):
    """fp16 (S17-1) and the widened sums (bf16 S18-5: rn50_c3_3x3 r2v2t224 4.10 us against
    r4v1t224 4.58, rn50_c2_3x3 r4v2t224 3.79 against r16v1t96 4.20; fp16acc32 follows bf16)
    take pairs; fp32 has no pairs."""
    for precision in ("fp16", "bf16", "fp16acc32"):
        plan, tuned = plan_for(problem_layer(problem, sparsity, precision=precision),
                               tuned=False)
        assert not tuned and plan.params.name().startswith(want), precision
    plan, _ = plan_for(problem_layer(problem, sparsity, precision="fp32"), tuned=False)
    assert plan.vector_width == 1, plan.params.name()


def test_a_pair_plan_the_shape_cannot_take_narrows_to_one_column():
    geometry = Geometry(1, 4, 6, 7, 4, kernel=3, stride=1, padding=1)    # odd width
    weight = pruned_weights((4, 4, 3, 3), 0.5, 3)
    plan = _plan(weight, geometry, "fp16", vector_width=2, col_threads=32)
    assert plan.vector_width == 1 and not lower(plan).pair_windows
    with pytest.raises(UserError):
        _plan(weight, geometry, "fp16", vector_width=3)


@pytest.mark.parametrize("precision", HALF)
def test_the_cost_model_counts_pairs_and_shifts(precision):
    """features() of a built pair plan equals estimate() from the weight alone, and counts the
    lowering's own pairs and shifts (not one load a tap)."""
    from sparsert_cli.families.immediate.tuning import estimate, features

    geometry = Geometry(1, 16, 8, 8, 12, kernel=3, stride=1, padding=1)
    weight = pruned_weights((12, 16, 3, 3), 0.8, 6)
    plan = _plan(weight, geometry, precision, rows_per_group=4, vector_width=2, col_threads=32)
    ir = lower(plan)
    pairs = sum(len(b.loads) for body in ir.phases[0] for b in body.batches)
    got = features(plan)
    assert got["loads"] == pairs > plan.loads
    assert got == estimate(geometry, to_csr(weight), plan.params, precision)


def test_pairs_stop_where_bodies_leave_the_entry_and_the_tuner_keeps_one_column():
    """Past INLINE_LIMIT nonzeros (rn50_c3_3x3 at 80%) the fp16 default keeps one column; where
    it takes pairs, the one-column rule plan is among the candidates."""
    from sparsert_cli.families.immediate.tuning import candidates

    plan, _ = plan_for(problem_layer("rn50_c3_3x3", 0.8, precision="fp16"), tuned=False)
    assert plan.vector_width == 1, plan.params.name()
    layer = problem_layer("rn50_c2_3x3", 0.9, precision="fp16")
    names = [p.name() for p in candidates(layer.geometry, 3686, "fp16", limit=12)]
    assert names[0].startswith("r4v2t224") and "r16v1t96k1b8n" in names[:3]
