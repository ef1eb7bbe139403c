"""The streamed family's tile stage (families/streamed/plan.py TileLayout) on the CPU: kernels
of every tile shape class compiled with NVRTC, their printed source parsed back to the IR, and
the IR executed by the interpreter against the float64 reference; refusals, defaults and the
launch contract (dynamic shared memory)."""

from __future__ import annotations

import numpy as np
import pytest

import sparsert_cli as sparsert
from sparsert_cli.errors import UserError
from sparsert_cli.families import lower
from sparsert_cli.families.streamed import StreamParams, candidates, default_params
from sparsert_cli.families.streamed.plan import (TILE_LEAD, build_plan, tile_layout,
                                                 tile_refusal)
from sparsert_cli.interp import execute
from sparsert_cli.interp_base import PlanExecutionError
from sparsert_cli.problem_shape import Epilogue, Geometry
from sparsert_cli.render import PrintedMismatch
from sparsert_cli.render.stream import check_printed, print_stream


def sparse(shape, density, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) >= density] = 0
    return w


TILE = StreamParams(stage="tile", vector_width=2, warps=2, rows_per_worker=2)
EPI = {"bias": np.linspace(-1, 1, 12), "activation": "relu", "residual": True}
CASES = {   # (M, C, H, W), batch, epilogue, plan changes
    "even": ((12, 16, 14, 14), 1, None, {}),
    "odd_height_width": ((12, 8, 7, 7), 1, EPI, {}),
    "odd_height_even_width": ((12, 6, 5, 6), 2, {"activation": "relu6"}, {"chains": 8}),
    "even_height_odd_width": ((12, 6, 6, 9), 1, {"activation": "gelu", "bias": np.ones(12)},
                              {"chains": 2, "warps": 3}),
    "long_rows": ((12, 64, 4, 4), 2, EPI, {"rows_per_worker": 1, "warps": 4}),   # runs of 32
    "empty_rows": ((12, 8, 6, 6), 1, None, {"warps": 1, "rows_per_worker": 5}),
    # one pixel a thread (width 1)
    "single_odd": ((12, 8, 7, 7), 2, EPI, {"vector_width": 1}),
    "single_even_gelu": ((12, 6, 6, 10), 1, {"activation": "gelu", "bias": np.ones(12)},
                         {"vector_width": 1, "chains": 8}),
    "single_relu6": ((12, 40, 3, 5), 1, {"activation": "relu6"}, {"vector_width": 1}),
    # a block's entries past MAX_STAGED_ENTRY_BYTES: its warps stream them in chunks
    "streamed_entries": ((12, 512, 3, 3), 1, EPI, {"warps": 3, "rows_per_worker": 1}),
    # row vectors (ROW_VECTORS: at most 8 rows of 7 pixels), session 25
    "rv_7x7": ((12, 16, 7, 7), 1, EPI, {"vector_width": 8, "warps": 4, "rows_per_worker": 1}),
    "rv_8x7_b2_gelu": ((12, 8, 8, 7), 2, {"activation": "gelu", "bias": np.ones(12)},
                       {"vector_width": 8}),
    "rv_5x6_relu6": ((12, 8, 5, 6), 1, {"activation": "relu6"}, {"vector_width": 8,
                                                                 "warps": 3}),
    "rv_1x1_b3": ((12, 8, 1, 1), 3, EPI, {"vector_width": 8, "warps": 1}),
    "rv_long_rows": ((12, 64, 4, 4), 1, EPI, {"vector_width": 8, "rows_per_worker": 1}),
    "rv_streamed_entries": ((12, 512, 3, 3), 1, EPI, {"vector_width": 8, "warps": 3,
                                                      "rows_per_worker": 1}),
}


def _kernel(name):
    (m, c, h, w), batch, epi, plan = CASES[name]
    weight = sparse((m, c, 3, 3), 0.6 if name.removeprefix("rv_") in ("long_rows",
                                                                       "streamed_entries")
                    else 0.2, len(name))
    if name == "empty_rows":
        weight[3:9] = 0
    return sparsert.compile_kernel(weight, op="conv", input_shape=(batch, c, h, w), padding=1,
                                   dtype="fp16", epilogue=epi, tuned=False, cache=None,
                                   plan=StreamParams(**{**TILE.__dict__, **plan}))


@pytest.mark.parametrize("name", sorted(CASES))
def test_tile_kernels_verify_and_print_back(name):
    kernel = _kernel(name)
    assert kernel.plan_params.stage == "tile"
    assert kernel.plan_params.vector_width == (1 if name.startswith("single") else
                                               8 if name.startswith("rv_") else 2)
    assert kernel.grid[1] == kernel.geometry.batch
    ir = lower(kernel.plan)
    check_printed(ir, print_stream(ir))                     # the printed kernel is its IR
    verified = kernel.verify(3).verified
    assert verified["ok"], verified
    assert kernel.dynamic_shared_bytes == tile_layout(kernel.geometry,
                                                      kernel.plan_params.vector_width).bytes
    assert kernel.manifest()["dynamic_shared_bytes"] == kernel.dynamic_shared_bytes
    source = print_stream(ir)
    staged = kernel.plan.staged_entries
    assert (staged == 0) == name.endswith("streamed_entries")
    # a row-vector kernel copies its image with cp.async as well
    assert ("cp.async.cg.shared.global" in source) == bool(staged) or name.startswith("rv_")
    assert ("sparsert_stage[" in source) != bool(staged)
    if staged:      # the static array holds the largest block's run, and the cubin says so
        assert f"int2 sparsert_block_ent[{staged}];" in source
        assert kernel.resources.shared_bytes >= 8 * staged


def test_block_entries_and_staging_rule():
    from sparsert_cli.families.streamed import plan as sp

    # three workers in blocks of two: rows 0-1 (entries 0..24), row 2 (24..40), none
    work, seg = np.array([0, 1, 2, 3, 3]), np.array([[0, 8], [8, 24], [24, 40]])
    assert sp.block_entries(work, seg, 2) == 24
    g = Geometry(1, 8, 7, 7, 12, 3, 1, 1)
    assert sp.staged_entries(g, "tile", 1, work, seg, 2) == 24
    assert sp.staged_entries(g, "smem", 1, work, seg, 2) == 24
    assert sp.staged_entries(g, "smem", 1, work, seg, 2, tile_rows=4) == 0
    assert sp.staged_entries(g, "shfl", 1, work, seg, 2) == 0
    assert sp.staged_entries(g, "ring", 1, work, seg, 2) == 0
    big = np.array([[0, sp.MAX_STAGED_ENTRY_BYTES // 8 + 8]])
    assert sp.staged_entries(g, "tile", 1, np.array([0, 1]), big, 1) == 0
    # beside a large image, what fits the block's 227 KB
    wide = Geometry(1, 390, 14, 14, 12, 3, 1, 1)      # a 195-KB image
    room = (sp.TILE_BLOCK_BYTES - tile_layout(wide, 2).bytes) // 8
    assert 0 < room < sp.MAX_STAGED_ENTRY_BYTES // 8
    assert sp.staged_entries(wide, "tile", 2, np.array([0, 1]), np.array([[0, room]]), 1) == room
    assert sp.staged_entries(wide, "tile", 2, np.array([0, 1]),
                             np.array([[0, room + 8]]), 1) == 0


def test_dependent_launch_stages_entries_before_the_wait():
    """The entries and the first row header are read before griddepcontrol.wait (constant
    data), the image after it; no L2 prefetch loop beside the copy."""
    from dataclasses import replace

    ir = replace(lower(_kernel("odd_height_width").plan), dependent_launch=True)
    source = print_stream(ir)
    check_printed(ir, source)
    wait = source.index("griddepcontrol.wait")
    assert source.index("cp.async.cg.shared.global") < wait < source.index("the zero-padded image")
    assert source.index("nrow = __ldg(R)") < wait
    assert "prefetch.global.L2" not in source and "sparsert_span" in source
    assert source.index("cp.async.wait_all") < source.index("__syncthreads()")


def test_interpreter_matches_reference_with_fp16_rounding():
    """Element-wise: the interpreter's fp16 sums against float64 within the fp16 bound, and an
    unwritten output (NaN) would fail."""
    kernel = _kernel("even")
    rng = np.random.default_rng(5)
    x, res = kernel.random_inputs(rng)
    out = kernel.run_cpu(x, res)
    ok, err, message = kernel.check(out, x, res)
    assert ok and not np.isnan(out).any(), message
    assert err > 0                                          # fp16 sums are rounded


def test_tampered_tables_are_caught():
    kernel = _kernel("odd_height_width")
    ir = lower(kernel.plan)
    source = print_stream(ir)
    bad = source.replace("stage=tile", "stage=smem", 1)
    with pytest.raises(PrintedMismatch):
        check_printed(ir, bad)
    from dataclasses import replace
    offsets = ir.offsets.copy()
    offsets[0] = tile_layout(ir.geometry).halves            # past the tile
    with pytest.raises(PlanExecutionError, match="outside the tile"):
        execute(replace(ir, offsets=offsets), *kernel.random_inputs(np.random.default_rng(0)))


def test_tile_layout_and_offsets():
    g = Geometry(1, 4, 7, 7, 8, 3, 1, 1)
    lay = tile_layout(g)
    assert (lay.half, lay.row, lay.rows, lay.pixels, lay.threads) == (4, 8, 10, 28, 32)
    assert lay.bytes == 2 * (TILE_LEAD + 4 * 10 * 8)
    one = tile_layout(g, 1)
    assert (one.half, one.rows, one.pixels, one.threads, one.pairs) == (7, 9, 49, 64, False)
    # the top-left pixel's tap (r, s) = (0, 0) reads the zero before image row -1
    assert lay.offset(0, 0, 0) == TILE_LEAD - 1
    assert lay.pair_delta == 4 * 8


@pytest.mark.parametrize("geometry,dtype,accumulate,why", [
    (Geometry(1, 16, 8, 8, 8, 3, 1, 1), "fp32", "fp32", "fp16 data"),
    (Geometry(1, 16, 8, 8, 8, 3, 1, 1), "fp16", "fp32", "fp16 data"),
    (Geometry(1, 16, 8, 8, 8, 3, 2, 1), "fp16", "fp16", "stride 1"),
    (Geometry(1, 16, 8, 8, 8, 1, 1, 0), "fp16", "fp16", "3x3"),
    (Geometry(1, 128, 28, 28, 8, 3, 1, 1), "fp16", "fp16", "shared memory"),
])
def test_refusals_name_the_reason(geometry, dtype, accumulate, why):
    assert why in tile_refusal(geometry, dtype, accumulate)
    weight = sparse((geometry.out_channels, geometry.taps), 0.2, 1)
    import scipy.sparse as sp
    with pytest.raises(UserError, match="stage tile cannot run this layer"):
        build_plan(sp.csr_matrix(weight), geometry, TILE, Epilogue(), dtype, accumulate)


def test_token_major_output_is_refused():
    import scipy.sparse as sp
    g = Geometry(1, 16, 8, 8, 8, 3, 1, 1)
    with pytest.raises(UserError):
        build_plan(sp.csr_matrix(sparse((8, g.taps), 0.2, 1)), g, TILE,
                   Epilogue(token_major=True), "fp16", "fp16")


def test_defaults_and_candidates():
    c4 = Geometry(1, 256, 14, 14, 256, 3, 1, 1)
    assert default_params(c4, 59000, precision="fp16").name() == "s128v2w2r1c4t"
    # 28 pixel pairs would leave a worker one warp: the tile stage is no default there, and a
    # candidate at one pixel a thread
    c5 = Geometry(1, 512, 7, 7, 512, 3, 1, 1)
    assert default_params(c5, 236000, precision="fp16").name() == "s32v8w8r1c4t"   # row vectors
    assert "s64v1w4r1c4t" in [p.name() for p in candidates(c5, 236000, precision="fp16")]
    assert default_params(c4, 59000, precision="fp32").stage != "tile"
    assert default_params(c4, 59000, precision="fp16acc32").stage != "tile"
    batch8 = Geometry(8, 256, 14, 14, 256, 3, 1, 1)
    assert default_params(batch8, 59000, precision="fp16").stage != "tile"
    names = [p.name() for p in candidates(c4, 59000, precision="fp16")]
    assert names[0] == "s128v2w2r1c4t" and any(not n.endswith("t") for n in names)
    assert any(p.stage == "tile" for p in candidates(batch8, 59000, precision="fp16"))
    big = Geometry(1, 128, 28, 28, 128, 3, 1, 1)
    assert all(p.stage != "tile" for p in candidates(big, 29000, precision="fp16"))


def test_too_many_workers_for_one_block():
    with pytest.raises(UserError, match="exceed a block"):
        sparsert.compile_kernel(sparse((8, 4, 3, 3), 0.3, 2), op="conv",
                                input_shape=(1, 4, 14, 14), padding=1, dtype="fp16",
                                tuned=False, cache=None,
                                plan=StreamParams(stage="tile", warps=16))


def test_review_edge_cases(tmp_path):
    """Tall images (more than 256 column threads), min_blocks, a target whose blocks get less
    shared memory, and a saved tile kernel loaded back."""
    g = Geometry(1, 4, 24, 24, 8, 3, 1, 1)
    params = default_params(g, 100, precision="fp16")
    assert params.stage == "tile" and params.col_threads == 288
    weight = sparse((8, 4, 3, 3), 0.3, 4)
    kernel = sparsert.compile_kernel(weight, op="conv", input_shape=(1, 4, 24, 24), padding=1,
                                     dtype="fp16", tuned=False, cache=None,
                                     plan=StreamParams(stage="tile", vector_width=2, warps=1,
                                                       min_blocks=2))
    assert kernel.plan_params.min_blocks == 1 and kernel.block == (288, 1, 1)
    assert kernel.verify(0).verified["ok"]
    kernel.save(tmp_path / "k")
    again = sparsert.Kernel.from_dir(tmp_path / "k")
    assert again.plan_params == kernel.plan_params
    assert again.dynamic_shared_bytes == kernel.dynamic_shared_bytes
    big = sparse((16, 256, 3, 3), 0.05, 5)                  # a 131-KB tile
    tile = StreamParams(stage="tile", vector_width=2, warps=2)
    with pytest.raises(UserError, match="sm_86 gets at most 99 KB"):
        sparsert.compile_kernel(big, op="conv", input_shape=(1, 256, 14, 14), padding=1,
                                dtype="fp16", tuned=False, cache=None, plan=tile, arch="sm_86")
    ok = sparsert.compile_kernel(big, op="conv", input_shape=(1, 256, 14, 14), padding=1,
                                 dtype="fp16", tuned=False, cache=None, plan=tile, arch="sm_90")
    assert ok.dynamic_shared_bytes > 99 * 1024


def test_smem_stage_stages_its_block_entries():
    """Stage smem copies its block's entries (every K-slice's) into shared memory with cp.async
    before the loop, the segment loops then read them there; blocks whose entries exceed
    MAX_STAGED_ENTRY_BYTES, and token-major kernels that stage their output, stream them."""
    from dataclasses import replace

    smem = StreamParams(stage="smem", warps=2, rows_per_worker=3)
    for slices in (1, 2):
        kernel = sparsert.compile_kernel(
            sparse((16, 24, 3, 3), 0.3, 7), op="conv", input_shape=(1, 24, 9, 9), padding=1,
            dtype="fp16", tuned=False, cache=None, epilogue=EPI | {"bias": np.ones(16)},
            plan=replace(smem, k_slices=slices))
        ir = lower(kernel.plan)
        assert kernel.plan.staged_entries > 0
        for dependent in (False, True):
            source = print_stream(replace(ir, dependent_launch=dependent))
            check_printed(replace(ir, dependent_launch=dependent), source)
            assert "cp.async.cg.shared.global" in source and "sparsert_stage" not in source
            if dependent:
                assert source.index("cp.async.wait_all") < source.index("griddepcontrol.wait")
        assert kernel.verify(3).verified["ok"]
    wide = sparsert.compile_kernel(sparse((8, 4096), 0.6, 3), n=16, dtype="fp16", tuned=False,
                                   cache=None, plan=smem)
    assert wide.plan.staged_entries == 0
    assert "cp.async" not in print_stream(lower(wide.plan))
    assert wide.verify(3).verified["ok"]


def test_row_vector_layout_offsets_and_tile():
    """Row vectors: each tile row one 16-byte vector [0, image row, zeros], rows 0 and H + 1
    zero; an entry's word is its vector (from the lane's base) << 16 | the PRMT selector of its
    column; the raw copy follows the tile; a lane's window is its output row's."""
    from dataclasses import replace

    from sparsert_cli.families.streamed.plan import ROW_VECTORS, VECTOR_SELECTORS
    from sparsert_cli.interp_stream import _tile_image

    g = Geometry(1, 8, 7, 7, 8, 3, 1, 1)
    lay = tile_layout(g, ROW_VECTORS)
    assert (lay.row, lay.rows, lay.threads, lay.vectors, lay.pairs) == (8, 9, 32, True, False)
    assert lay.halves == TILE_LEAD + 8 * 9 * 8 and lay.raw == 8 * 49
    assert lay.bytes == 2 * (lay.halves + lay.raw)
    assert lay.offset(0, 0, 0) == (TILE_LEAD // 8) << 16 | 0x3210
    assert lay.offset(2, 1, 2) == ((TILE_LEAD + 2 * 72 + 8) // 8) << 16 | 0x7654
    assert VECTOR_SELECTORS == (0x3210, 0x5432, 0x7654)
    kernel = _kernel("rv_7x7")
    ir = lower(kernel.plan)
    x = np.arange(1, 16 * 49 + 1, dtype=np.float64)
    tile = _tile_image(ir, x, 0)[TILE_LEAD:].reshape(16, 9, 8)
    assert not tile[:, 0].any() and not tile[:, 8].any() and not tile[:, :, 0].any()
    assert np.array_equal(tile[3, 1:8, 1:8], x[3 * 49:4 * 49].reshape(7, 7))
    # a selector that is no column shift, and a vector past the tile, are caught
    offsets = ir.offsets.copy()
    offsets[0] = (offsets[0] & ~0xFFFF) | 0x1234
    with pytest.raises(PlanExecutionError, match="selector"):
        execute(replace(ir, offsets=offsets), *kernel.random_inputs(np.random.default_rng(0)))
    offsets = ir.offsets.copy()
    offsets[0] = (tile_layout(kernel.geometry, ROW_VECTORS).halves // 8) << 16 | 0x3210
    with pytest.raises(PlanExecutionError, match="outside the tile"):
        execute(replace(ir, offsets=offsets), *kernel.random_inputs(np.random.default_rng(0)))


def test_row_vector_kernel_source():
    """One warp a worker, the raw copy before the build and both before the compute, four
    PRMT and four HFMA2 per entry, the groups' sums added by two xor shuffles, group 0 stores."""
    kernel = _kernel("rv_7x7")
    source = print_stream(lower(kernel.plan))
    assert kernel.block == (32, 4, 1) and kernel.plan_params.chains == 4
    copy = source.index("cp.async.cg.shared.global [%0], [%1], 16;\" :: \"r\"(dst + 16u * i)")
    build = source.index("// the tile's row vectors")
    loop = source.index("for (; r < r_end; ++r)")
    assert source.index("cp.async.wait_all") < build < loop and copy < build
    assert source.count("prmt.b32") == 4 * (8 + 2)          # a full chunk (8 steps) and a tail
    assert source.count("__shfl_xor_sync") == 8
    assert "if (!act) continue;" in source
    assert kernel.dynamic_shared_bytes == tile_layout(kernel.geometry, 8).bytes


@pytest.mark.parametrize("geometry,why", [
    (Geometry(1, 16, 8, 8, 8, 3, 1, 1), "at most 8 rows of at most 7 pixels"),
    (Geometry(1, 16, 9, 7, 8, 3, 1, 1), "at most 8 rows of at most 7 pixels"),
    (Geometry(1, 3, 7, 7, 8, 3, 1, 1), "multiple of 8"),
])
def test_row_vector_refusals(geometry, why):
    assert why in tile_refusal(geometry, "fp16", "fp16", width=8)
    with pytest.raises(UserError, match="stage tile cannot run this layer"):
        sparsert.compile_kernel(sparse((8, geometry.in_channels, 3, 3), 0.3, 1), op="conv",
                                input_shape=(1, geometry.in_channels, geometry.height,
                                             geometry.width), padding=1, dtype="fp16",
                                tuned=False, cache=None,
                                plan=StreamParams(stage="tile", vector_width=8))


def test_row_vector_default_rule_and_switch(monkeypatch):
    from sparsert_cli.families.streamed import plan as P
    from sparsert_cli.families.streamed.tuning import _features

    c5 = Geometry(1, 512, 7, 7, 512, 3, 1, 1)
    assert (default_params(c5, 236000, precision="fp16").vector_width,
            default_params(c5, 236000, precision="fp16").stage) == (8, "tile")
    for other, precision in ((Geometry(2, 512, 7, 7, 512, 3, 1, 1), "fp16"), (c5, "fp32"),
                             (c5, "fp16acc32"), (Geometry(1, 512, 7, 7, 512, 3, 2, 1), "fp16")):
        assert default_params(other, 236000, precision=precision).vector_width != 8
    names = [p.name() for p in candidates(c5, 236000, precision="fp16")]
    assert names[0] == "s32v8w8r1c4t" and "s64v1w4r1c4mk2" in names
    monkeypatch.setattr(P, "ROW_VECTOR_DEFAULT", False)
    assert default_params(c5, 236000, precision="fp16").name() == "s64v1w4r1c4mk2"
    names = [p.name() for p in candidates(c5, 236000, precision="fp16")]
    assert names[:2] == ["s64v1w4r1c4mk2", "s32v8w8r1c4t"]
    # the cost features count a quarter of a warp step an entry
    rows = np.full(512, 460)
    workers = np.arange(512)
    vec = _features(c5, P.fit_params(c5, P.StreamParams(32, 8, 8, 1, 4, "tile"), "fp16"),
                    "fp16", 512, rows, workers, 235930)
    one = _features(c5, P.fit_params(c5, P.StreamParams(64, 1, 4, 1, 4, "tile"), "fp16"),
                    "fp16", 512, rows, workers, 235930)
    assert vec["serial_instructions"] < one["serial_instructions"]


def test_auto_plans_fit_the_target_arch():
    """A block of sm_86/sm_89 holds 99 KB: the cost model skips the tile defaults it cannot hold
    (rn50_c5_3x3's row vectors, 121 KB; rn50_c4_3x3's pixel pairs, 130 KB) and compiles the
    family's next candidate, in `compile_kernels` (auto plans) as in the streamed-only race of
    `sparsify_` (family "streamed"); on sm_90 the tile defaults stay; an explicit tile plan too
    large for the target is still refused in one line."""
    from sparsert_cli.families.streamed.plan import fits_arch

    for problem, tile_name in (("rn50_c5_3x3", "s32v8w8r1c4t"), ("rn50_c4_3x3", "s128v2w2r1c4t")):
        layer = sparsert.problem_layer(problem, 0.9, precision="fp16")
        params = default_params(layer.geometry, int(np.count_nonzero(layer.weight)),
                                precision="fp16")
        assert params.name() == tile_name
        assert fits_arch(layer.geometry, params, "sm_90")
        assert fits_arch(layer.geometry, params, "sm_80")
        assert not fits_arch(layer.geometry, params, "sm_86")
        from dataclasses import replace
        streamed = replace(layer, family="streamed")
        planned, _ = sparsert.api.plan_for(streamed, tuned=False, arch="sm_86")
        assert planned.params.stage != "tile", planned.params.name()
        assert fits_arch(layer.geometry, planned.params, "sm_86")
        planned, _ = sparsert.api.plan_for(streamed, tuned=False, arch="sm_90")
        assert planned.params.name() == tile_name
    layer = sparsert.problem_layer("rn50_c5_3x3", 0.9, precision="fp16")
    (kernel,) = sparsert.compile_kernels([layer], arch="sm_86", tuned=False)
    assert isinstance(kernel, sparsert.Kernel), kernel
    assert kernel.plan_params.stage != "tile" or kernel.plan_params.vector_width != 8
    with pytest.raises(UserError, match="sm_86 gets at most 99 KB"):
        sparsert.compile_kernel(layer.weight, op="conv", input_shape=(1, 512, 7, 7), padding=1,
                                dtype="fp16", tuned=False, cache=None, arch="sm_86",
                                plan=StreamParams(stage="tile", vector_width=8, warps=8))
