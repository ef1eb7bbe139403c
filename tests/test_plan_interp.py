"""The core correctness property: a plan, executed by the CPU interpreter the way the generated
kernel runs, equals the float64 convolution reference, and writes every output exactly once.

The interpreter walks the kernel's thread/column mapping, masks, slices and epilogue; if it agrees
with the reference for every geometry and parameter choice, the plan is right and any GPU mismatch
is an emitter bug.
"""

from __future__ import annotations

import zlib
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsert_cli import interp
from sparsert_cli.build import make_plan
from sparsert_cli.errors import UserError
from sparsert_cli.patterns import pruned_weights, to_csr, uniform_weights
from sparsert_cli.families.immediate import lower
from sparsert_cli.families.immediate.plan import (Load, PlanParams, RowGroup, build_plan, fit_params,
                                                  fit_vector_width)
from sparsert_cli.problem_shape import MAX_STATIC_SHARED, Epilogue, Geometry
from sparsert_cli.problems import Problem
from sparsert_cli.render import parse_cuda
from sparsert_cli.render.cuda import print_cuda
from sparsert_cli.render.parse_ptx import check_printed
from sparsert_cli.render.ptx import print_ptx


def _build_or_none(weight, geometry, params, epilogue):
    """build_plan, or None when the drawn parameters exceed static shared memory (a documented
    UserError, checked separately)."""
    try:
        return build_plan(to_csr(weight), geometry, params, epilogue)
    except UserError as exc:
        assert "shared memory" in exc.message, exc.message
        return None


def _check_plan(gen, plan, weight, rng):
    x, res = gen.random_inputs(plan.geometry, plan.epilogue.residual, rng)
    ir = lower(plan)
    out = interp.execute(ir, x, res)          # raises unless every output is written once
    assert out.shape == (plan.geometry.output_elems,)
    check_printed(ir, print_ptx(ir))          # and the PTX and CUDA say what was executed
    parse_cuda.check_printed(ir, print_cuda(ir))
    ref, mag = gen.reference_for(plan, weight, x, res)
    gen.assert_matches_float64(out, ref, mag)


# ---------------------------------------------------------------- the property


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_plan_execution_matches_float64_reference(gen, data):
    geometry = gen.draw_geometry(data)
    kind = data.draw(st.sampled_from(gen.PATTERN_KINDS), label="pattern")
    density = data.draw(st.sampled_from([0.02, 0.1, 0.3, 0.7, 1.0]), label="density")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    weight = gen.conv_weight(kind, geometry, density, rng)
    params = gen.draw_params(data)
    epilogue = gen.draw_epilogue(data, geometry.out_channels, rng)
    plan = _build_or_none(weight, geometry, params, epilogue)
    if plan is None:
        return
    assert plan.nnz == np.count_nonzero(weight)
    _check_plan(gen, plan, weight, rng)


EDGE_GEOMETRIES = {
    "gemm_odd": Geometry(batch=1, in_channels=13, height=1, width=37, out_channels=11),
    "gemm_vec": Geometry(batch=1, in_channels=8, height=1, width=64, out_channels=9),
    "pw_b3_s2": Geometry(batch=3, in_channels=5, height=7, width=9, out_channels=6, stride=2),
    "pw_pad1": Geometry(batch=2, in_channels=4, height=5, width=3, out_channels=7, padding=1),
    "c3_p1": Geometry(batch=2, in_channels=3, height=5, width=7, out_channels=10, kernel=3,
                      padding=1),
    "c3_s2_p1": Geometry(batch=1, in_channels=4, height=9, width=6, out_channels=5, kernel=3,
                         stride=2, padding=1),
    "c3_p0_min": Geometry(batch=1, in_channels=2, height=3, width=3, out_channels=3, kernel=3),
    "c3_1x1_input": Geometry(batch=2, in_channels=3, height=1, width=1, out_channels=4,
                             kernel=3, padding=1),
}

EDGE_PARAMS = [
    PlanParams(rows_per_group=1, vector_width=1, col_threads=32, k_split=1, load_batch=1),
    PlanParams(rows_per_group=16, vector_width=4, col_threads=128, k_split=4, load_batch=16,
               balance="contiguous"),
    PlanParams(rows_per_group=3, vector_width=2, col_threads=64, k_split=3, load_batch=5),
    PlanParams(rows_per_group=2, vector_width=2, col_threads=32, k_split=2, load_batch=3,
               grid_order="groups"),
]


@pytest.mark.parametrize("kind", [
    "random", "empty_rows", "empty_cols", "single_row", "single_col", "dense_row",
    "one_col_all", "single_nonzero", "all_zero", "dense"])
@pytest.mark.parametrize("geo_name", sorted(EDGE_GEOMETRIES))
def test_edge_patterns_match_reference_for_every_edge_geometry(gen, geo_name, kind):
    geometry = EDGE_GEOMETRIES[geo_name]
    rng = np.random.default_rng(zlib.crc32(f"{geo_name}/{kind}".encode()))
    weight = gen.conv_weight(kind, geometry, 0.3, rng)
    bias = tuple(float(v) for v in rng.standard_normal(geometry.out_channels).astype(np.float32))
    for i, params in enumerate(EDGE_PARAMS):
        epilogue = Epilogue(bias=bias if i != 0 else None,
                            activation=("none", "relu", "relu6")[i % 3], residual=i == 1)
        plan = _build_or_none(weight, geometry, params, epilogue)
        assert plan is not None
        _check_plan(gen, plan, weight, rng)


def test_every_row_appears_in_exactly_one_group():
    weight = pruned_weights((45, 30, 1, 1), 0.8, 2)
    geometry = Geometry(1, 30, 1, 50, 45)
    for balance in ("nnz", "contiguous"):
        plan = build_plan(to_csr(weight), geometry, PlanParams(rows_per_group=4, balance=balance))
        rows = sorted(r for g in plan.groups for r in g.rows)
        assert rows == list(range(45))
        assert max(len(g.rows) for g in plan.groups) <= 4
        assert len(plan.groups) == -(-45 // 4)


def test_k_split_slices_partition_each_groups_taps():
    weight = uniform_weights((16, 64, 1, 1), 0.7, 1)
    plan = build_plan(to_csr(weight), Geometry(1, 64, 1, 32, 16),
                      PlanParams(rows_per_group=4, k_split=3))
    for group in plan.groups:
        assert len(group.slices) == 3
        taps = [ld.tap for sl in group.slices for ld in sl]
        assert taps == sorted(set(taps)), "slices must be disjoint runs of sorted taps"
    assert plan.block == (plan.col_threads, 3, 1)
    assert plan.shared_bytes == 3 * plan.rows_max * plan.col_threads * plan.vector_width * 4


# ---------------------------------------------------------------- load balancing


def _group_imbalance(weight, balance):
    m, k = weight.shape[:2]
    plan = build_plan(to_csr(weight), Geometry(1, k, 1, 64, m),
                      PlanParams(rows_per_group=8, balance=balance))
    nnz = np.array([g.nnz for g in plan.groups], dtype=float)
    return nnz.max() / nnz.mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nnz_balance_evens_out_pruned_like_groups(seed):
    weight = pruned_weights((256, 256, 1, 1), 0.9, seed)
    balanced = _group_imbalance(weight, "nnz")
    contiguous = _group_imbalance(weight, "contiguous")
    assert balanced < 1.1
    assert contiguous > 1.5
    assert contiguous > 1.4 * balanced


def test_nnz_balance_spreads_empty_rows_over_groups():
    weight = np.zeros((16, 8, 1, 1), dtype=np.float32)
    weight[:8] = 1.0           # 8 full rows, 8 empty rows, 4 rows per group
    plan = build_plan(to_csr(weight), Geometry(1, 8, 1, 32, 16),
                      PlanParams(rows_per_group=4, balance="nnz"))
    assert sorted(g.nnz for g in plan.groups) == [16, 16, 16, 16]


# ---------------------------------------------------------------- digest and identity


def test_digest_changes_when_one_weight_value_changes():
    weight = uniform_weights((12, 20, 1, 1), 0.7, 0)
    geometry = Geometry(1, 20, 1, 33, 12)
    plan = build_plan(to_csr(weight), geometry, PlanParams())
    same = build_plan(to_csr(weight.copy()), geometry, PlanParams())
    assert plan.digest() == same.digest() and plan.entry == same.entry
    changed = weight.copy()
    index = np.flatnonzero(changed)[5]
    changed.ravel()[index] = np.nextafter(changed.ravel()[index], np.float32(np.inf))
    other = build_plan(to_csr(changed), geometry, PlanParams())
    assert other.digest() != plan.digest()
    assert other.entry != plan.entry


def test_digest_changes_with_params_geometry_and_epilogue():
    weight = uniform_weights((12, 20, 1, 1), 0.7, 0)
    base = build_plan(to_csr(weight), Geometry(1, 20, 1, 33, 12), PlanParams())
    digests = {base.digest(),
               build_plan(to_csr(weight), Geometry(1, 20, 1, 34, 12), PlanParams()).digest(),
               build_plan(to_csr(weight), Geometry(1, 20, 1, 33, 12),
                          PlanParams(load_batch=4)).digest(),
               build_plan(to_csr(weight), Geometry(1, 20, 1, 33, 12), PlanParams(),
                          Epilogue(activation="relu")).digest()}
    assert len(digests) == 4


def test_grid_order_groups_swaps_the_grid_and_computes_the_same_outputs(gen):
    """Row groups on blockIdx.x: the grid's axes swap, bx/by read the other block ids, and
    the interpreter (which runs by over the groups and bx over the tiles) gets the same output
    as the tiles order; the printed texts say which block id is which."""
    rng = np.random.default_rng(7)
    geometry = Geometry(2, 12, 5, 7, 10)
    weight = uniform_weights((10, 12, 1, 1), 0.6, 3)
    params = PlanParams(rows_per_group=3, vector_width=2, col_threads=32, k_split=2)
    tiles = build_plan(to_csr(weight), geometry, params)
    groups = build_plan(to_csr(weight), geometry, replace(params, grid_order="groups"))
    assert groups.grid == (tiles.grid[1], tiles.grid[0], 1) and tiles.grid[0] > 1
    assert groups.params.name() == tiles.params.name() + "g"
    assert groups.entry != tiles.entry
    ir = lower(groups)
    assert ir.groups_on_x and (ir.tiles, ir.groups) == (lower(tiles).tiles, lower(tiles).groups)
    assert "mov.u32 %bx, %ctaid.y;" in print_ptx(ir)
    assert "bx = blockIdx.y, by = blockIdx.x;" in print_cuda(ir)
    x, _ = gen.random_inputs(geometry, False, rng)
    np.testing.assert_array_equal(interp.execute(ir, x), interp.execute(lower(tiles), x))
    _check_plan(gen, groups, weight, rng)


def test_grid_order_tiles_keeps_the_keys_and_names_of_older_plans():
    """Plans made before grid_order existed keep their database keys, digests and kernel names."""
    params = PlanParams(rows_per_group=4)
    assert "grid_order" not in params.key() and params.name() == "r4v4t64k1b8n"
    assert replace(params, grid_order="groups").key()["grid_order"] == "groups"
    assert PlanParams.from_dict({"grid_order": "groups"}).grid_order == "groups"


def test_too_many_tiles_for_the_grids_y_axis_is_user_error():
    geometry = Geometry(1, 4, 1, 32 * 65536, 2)
    weight = to_csr(uniform_weights((2, 4, 1, 1), 1.0, 0))
    params = PlanParams(rows_per_group=1, vector_width=1, col_threads=32, grid_order="groups")
    with pytest.raises(UserError, match="grid's y axis.*grid_order tiles"):
        build_plan(weight, geometry, params)
    assert build_plan(weight, geometry, replace(params, grid_order="tiles")).grid[0] == 65536


def test_entry_name_is_a_valid_symbol_with_the_params_name():
    plan = build_plan(to_csr(uniform_weights((4, 4, 1, 1), 0.5, 0)), Geometry(1, 4, 1, 8, 4),
                      PlanParams(max_registers=64))
    assert plan.entry.startswith(f"sparsert_{plan.params.name()}_")
    assert plan.entry.replace("_", "").isalnum()
    assert plan.params.name().endswith("m64")


# ---------------------------------------------------------------- parameter validation


@pytest.mark.parametrize("bad, words", [
    (dict(rows_per_group=0), "rows_per_group"),
    (dict(rows_per_group=65), "rows_per_group"),
    (dict(vector_width=3), "vector_width"),
    (dict(vector_width=16), "vector_width"),
    (dict(col_threads=48), "col_threads"),
    (dict(col_threads=1024), "col_threads"),
    (dict(k_split=0), "k_split"),
    (dict(k_split=17), "k_split"),
    (dict(col_threads=512, k_split=4), "col_threads * k_split"),
    (dict(load_batch=0), "load_batch"),
    (dict(load_batch=33), "load_batch"),
    (dict(balance="random"), "balance"),
    (dict(max_registers=16), "max_registers"),
    (dict(max_registers=256), "max_registers"),
    (dict(grid_order="rows"), "grid_order"),
])
def test_plan_params_out_of_range_is_user_error(bad, words):
    with pytest.raises(UserError) as caught:
        PlanParams(**bad).validate()
    assert words in caught.value.message


@pytest.mark.parametrize("doc, words", [
    ({"rows": 4}, "unknown plan parameter 'rows'"),
    ({"rows_per_group": "4"}, "rows_per_group"),
    ({"rows_per_group": True}, "rows_per_group"),
    ({"balance": 1}, "balance"),
    ({"k_split": 2.0}, "k_split"),
    ({"grid_order": 1}, "grid_order"),
])
def test_plan_params_from_dict_rejects_unknown_names_and_wrong_types(doc, words):
    with pytest.raises(UserError, match=words):
        PlanParams.from_dict(doc)


def test_plan_params_from_dict_accepts_every_field():
    params = PlanParams.from_dict({"rows_per_group": 2, "vector_width": 2, "col_threads": 96,
                                   "k_split": 2, "load_batch": 3, "balance": "contiguous",
                                   "max_registers": 128})
    assert params.name() == "r2v2t96k2b3cm128"


def test_build_plan_rejects_mismatched_weight_bias_and_activation():
    geometry = Geometry(1, 6, 1, 8, 4)
    csr = to_csr(np.ones((4, 6, 1, 1), dtype=np.float32))
    with pytest.raises(UserError, match="4x5"):
        build_plan(to_csr(np.ones((4, 5, 1, 1), dtype=np.float32)), geometry, PlanParams())
    with pytest.raises(UserError, match="bias has 3 values for 4 rows"):
        build_plan(csr, geometry, PlanParams(), Epilogue(bias=(1.0, 2.0, 3.0)))
    with pytest.raises(UserError, match="activation"):
        build_plan(csr, geometry, PlanParams(), Epilogue(activation="gelu"))


@pytest.mark.parametrize("geometry", [
    Geometry(1, 4, 1, 8, 4, padding=-1), Geometry(1, 4, 2, 2, 4, kernel=3),
    Geometry(0, 4, 1, 8, 4), Geometry(1, 4, 1, 8, 4, stride=0)])
def test_impossible_geometry_is_user_error(geometry):
    with pytest.raises(UserError, match="impossible shape"):
        geometry.validate()


def test_shared_memory_overflow_is_user_error_with_advice():
    weight = uniform_weights((64, 64, 1, 1), 0.5, 0)
    params = PlanParams(rows_per_group=64, vector_width=4, col_threads=128, k_split=4)
    with pytest.raises(UserError, match="shared memory.*lower k_split"):
        build_plan(to_csr(weight), Geometry(1, 64, 1, 4096, 64), params)
    assert MAX_STATIC_SHARED == 48 * 1024


def test_fit_params_clamps_to_the_shape():
    geometry = Geometry(1, 8, 1, 6, 3)          # N=6: vector 2, one warp, 3 rows
    params = fit_params(geometry, PlanParams(rows_per_group=8, vector_width=4, col_threads=256))
    assert (params.vector_width, params.col_threads, params.rows_per_group) == (2, 32, 3)
    assert fit_vector_width(Geometry(1, 4, 3, 3, 4, kernel=3, padding=1), 4) == 1
    assert fit_vector_width(Geometry(2, 3, 4, 4, 2), 4) == 4       # 16 pixels, 48 elems/image
    assert fit_vector_width(Geometry(1, 3, 2, 3, 2), 4) == 2       # 6 pixels


# ---------------------------------------------------------------- the check can fail


def _small_plan(epilogue=Epilogue()):
    problem = Problem("p", "conv3x3", 6, 3, height=5, width=6, padding=1, batch=2)
    weight = uniform_weights(problem.weight_shape, 0.6, 9)
    return make_plan(problem, weight, PlanParams(rows_per_group=2), epilogue), weight


def _replace_group(plan, index, group):
    groups = list(plan.groups)
    groups[index] = group
    return replace(plan, groups=tuple(groups))


def test_corrupted_weight_value_is_caught_by_the_check(gen):
    plan, weight = _small_plan()
    rng = np.random.default_rng(0)
    _check_plan(gen, plan, weight, rng)             # the honest plan passes
    group = plan.groups[0]
    load = group.slices[0][0]
    slot, value = load.uses[0]
    bad_load = replace(load, uses=((slot, value * 1.001),) + load.uses[1:])
    bad_slice = (bad_load,) + group.slices[0][1:]
    bad = _replace_group(plan, 0, replace(group, slices=(bad_slice,) + group.slices[1:]))
    assert bad.digest() != plan.digest()
    with pytest.raises(AssertionError, match="outputs off"):
        _check_plan(gen, bad, weight, rng)


def test_corrupted_tap_is_caught_by_the_check(gen):
    plan, weight = _small_plan()
    group = plan.groups[1]
    load = group.slices[0][0]
    bad_slice = (replace(load, tap=(load.tap + 1) % plan.geometry.taps),) + group.slices[0][1:]
    bad = _replace_group(plan, 1, replace(group, slices=(bad_slice,) + group.slices[1:]))
    with pytest.raises(AssertionError, match="outputs off"):
        _check_plan(gen, bad, weight, np.random.default_rng(1))


def test_dropped_group_leaves_outputs_unwritten():
    plan, _ = _small_plan()
    bad = replace(plan, groups=plan.groups[1:])
    x = np.zeros(plan.geometry.input_elems)
    with pytest.raises(interp.PlanExecutionError, match="never written"):
        interp.execute(bad, x)


def test_duplicated_row_is_written_twice():
    plan, _ = _small_plan()
    bad = replace(plan, groups=plan.groups + plan.groups[:1])
    with pytest.raises(interp.PlanExecutionError, match="more than once"):
        interp.execute(bad, np.zeros(plan.geometry.input_elems))


def test_out_of_range_tap_is_an_out_of_bounds_load():
    geometry = Geometry(1, 4, 1, 16, 2)
    plan = build_plan(to_csr(np.ones((2, 4, 1, 1), dtype=np.float32)), geometry,
                      PlanParams(vector_width=1))
    group = plan.groups[0]
    bad = _replace_group(plan, 0, RowGroup(group.rows, ((Load(99, ((0, 1.0),)),),)))
    with pytest.raises(interp.PlanExecutionError, match="out-of-bounds"):
        interp.execute(bad, np.zeros(geometry.input_elems))


def test_misaligned_vector_load_is_reported():
    geometry = Geometry(1, 4, 1, 16, 2)
    plan = build_plan(to_csr(np.ones((2, 4, 1, 1), dtype=np.float32)), geometry,
                      PlanParams(vector_width=4))
    assert plan.vector_width == 4
    bad = replace(plan, geometry=replace(geometry, width=17))     # rows no longer 16B aligned
    with pytest.raises(interp.PlanExecutionError):
        interp.execute(bad, np.zeros(bad.geometry.input_elems))


def test_execute_requires_the_residual_and_the_right_input_size():
    plan, _ = _small_plan(Epilogue(residual=True))
    with pytest.raises(interp.PlanExecutionError, match="residual"):
        interp.execute(plan, np.zeros(plan.geometry.input_elems))
    with pytest.raises(interp.PlanExecutionError, match="elements"):
        interp.execute(plan, np.zeros(plan.geometry.input_elems + 1),
                       np.zeros(plan.geometry.output_elems))
