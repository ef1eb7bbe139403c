"""The tuner's CPU side: candidate plans and the tuned-plan database."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from sparsert_cli.build import default_params, geometry_for
from sparsert_cli.errors import UserError
from sparsert_cli.families import get_family
from sparsert_cli.families.immediate import PlanParams, fit_params
from sparsert_cli.problems import Problem, builtin_problems
from sparsert_cli.families.immediate.tuning import fits_registers, throughput_time
from sparsert_cli.tune import TunedDB, candidates, shape_key

PROBLEMS = builtin_problems()


@pytest.mark.parametrize("pid", ["mbv1_pw0", "rn50_c3_3x3", "bert_ffn_up", "mbv1_pw11"])
def test_candidates_start_with_the_default_and_are_distinct_and_legal(pid):
    problem = PROBLEMS[pid]
    geometry = geometry_for(problem)
    nnz = problem.m * problem.k // 10
    found = candidates(geometry, nnz, limit=12)
    assert found[0] == fit_params(geometry, default_params(geometry, nnz))
    assert len(found) == len(set(found)) and 2 <= len(found) <= 12
    for params in found:
        assert params == fit_params(geometry, params)          # already fitted to the shape
        assert params.col_threads * params.k_split <= 1024


@pytest.mark.parametrize("pid", ["rn50_c4_reduce", "mbv1_pw0", "mbv1_pw12"])
def test_throughput_shapes_default_to_group_major_plans_that_fit_the_registers(pid):
    """At batch 32 the default and the candidates after it put row groups on blockIdx.x, keep
    their sums and a load batch in half the registers, and end with the best one's tiles-order
    twin; at batch 1 the same layer keeps its latency rules."""
    problem = PROBLEMS[pid]
    nnz = problem.m * problem.k // 10
    geometry = geometry_for(problem.with_batch(32))
    found = candidates(geometry, nnz, limit=12)
    head = [p for p in found if p.grid_order == "groups"][:8]
    assert found[:len(head)] == head and len(head) >= 5
    assert all(p.k_split == 1 and fits_registers(p.col_threads, p.rows_per_group,
                                                 p.vector_width, p.load_batch) for p in head)
    if len(found) > len(head):
        assert found[len(head)] == replace(found[0], grid_order="tiles")
    assert found[0] == fit_params(geometry, default_params(geometry, nnz))
    times = [throughput_time(geometry, p, nnz, "fp32") for p in head]
    assert times == sorted(times)
    narrow = candidates(geometry_for(problem), nnz, limit=12)
    # at batch 1 groups order comes only from the tall-group plans (tall_params): the default
    # itself, or its twins (one column a thread, no K-split) after a tiles-order default
    from sparsert_cli.families.immediate.tuning import tall_params
    tall = tall_params(geometry_for(problem), nnz, min_columns=1)
    if narrow[0].grid_order == "groups":
        assert narrow[0] == tall_params(geometry_for(problem), nnz)
    else:
        assert all(p.grid_order == "tiles" or (
            tall is not None and p.k_split == 1 and p.vector_width == tall.vector_width
            and p.rows_per_group in (tall.rows_per_group, tall.rows_per_group // 2))
            for p in narrow)


@pytest.mark.parametrize("pid", ["rn50_c2_3x3", "rn50_c4_3x3", "rn50_c5_3x3"])
def test_batched_3x3_layers_get_wider_taller_candidates_in_both_grid_orders(pid):
    """A direct 3x3 convolution at batch 8 keeps its latency-rule default, then gets 256/512
    threads x 4-32 rows in both grid orders, within the register rule, those with about a wave
    of blocks first; at batch 1 none of them (its candidates keep tiles on x)."""
    problem = PROBLEMS[pid]
    nnz = problem.m * problem.k // 10
    geometry = geometry_for(problem.with_batch(8))
    found = candidates(geometry, nnz, limit=16)
    assert found[0] == fit_params(geometry, default_params(geometry, nnz))
    assert found[0].grid_order == "tiles"
    batched = [p for p in found[1:] if p.k_split == 1 and p.col_threads >= 256
               and p.rows_per_group >= 4][:4]
    assert len(batched) == 4 and {p.grid_order for p in batched} == {"groups", "tiles"}
    for params in batched:
        assert fits_registers(params.col_threads, params.rows_per_group, params.vector_width,
                              params.load_batch)
        assert replace(params, grid_order="tiles" if params.grid_order == "groups"
                       else "groups") in found
    def blocks(p):
        tiles = -(-geometry.columns // (p.vector_width * p.col_threads))
        return tiles * -(-geometry.out_channels // p.rows_per_group)
    waves = [min(blocks(p), 132 - 132 // 8) for p in found[1:] if p.grid_order == "groups"]
    assert waves == sorted(waves, reverse=True)
    assert all(p.grid_order == "tiles" for p in candidates(geometry_for(problem), nnz, limit=16))


def test_throughput_time_charges_tiles_order_a_dram_read_per_group_past_l2():
    """mbv1_pw2 at batch 32 (51 MB of input): with tiles on blockIdx.x each row group streams
    the input from DRAM again (S6-3, r32v2t256: 82.4 vs 41.6 us)."""
    geometry = geometry_for(PROBLEMS["mbv1_pw2"].with_batch(32))
    params = PlanParams(rows_per_group=16, vector_width=2, col_threads=512, grid_order="groups")
    nnz = 1638
    groups = throughput_time(geometry, params, nnz, "fp32")
    tiles = throughput_time(geometry, replace(params, grid_order="tiles"), nnz, "fp32")
    assert tiles > 3 * groups


def test_large_layers_get_fewer_candidates():
    problem = PROBLEMS["bert_ffn_up"]
    assert len(candidates(geometry_for(problem), 235_930, limit=16)) <= 6


def test_database_round_trip_is_keyed_by_pattern_shape_gpu_and_dtype(tmp_path):
    path = tmp_path / "tuned.json"
    db = TunedDB(path)
    g1 = geometry_for(PROBLEMS["mbv1_pw3"])
    g32 = geometry_for(PROBLEMS["mbv1_pw3"].with_batch(32))
    params = PlanParams(rows_per_group=4, vector_width=2)
    db.record("abc", g1, "GPU X", "fp32", params, {"us": 2.5})
    db.save()
    again = TunedDB(path)
    assert again.lookup("abc", g1, "GPU X", "fp32") == params
    assert again.lookup("abc", g32, "GPU X", "fp32") is None      # same weights, other N
    assert again.lookup("abc", g1, "GPU Y", "fp32") is None
    assert again.lookup("abd", g1, "GPU X", "fp32") is None
    assert shape_key(g1) != shape_key(g32)


def test_database_entry_from_an_older_version_is_ignored(tmp_path):
    path = tmp_path / "tuned.json"
    geometry = geometry_for(PROBLEMS["mbv1_pw0"])
    key = TunedDB.key("h", geometry, "G", "fp32")
    path.write_text(json.dumps({"entries": {key: {"params": {"rows_per_group": 4,
                                                            "no_such_knob": 1}}}}))
    assert TunedDB(path).lookup("h", geometry, "G", "fp32") is None


def test_database_that_is_not_json_is_one_clear_error(tmp_path):
    path = tmp_path / "tuned.json"
    path.write_text("{broken")
    with pytest.raises(UserError) as caught:
        TunedDB(path)
    assert str(path) in caught.value.message


def test_shipped_database_matches_shipped_problems():
    """Every committed tuned entry names a shipped problem whose shape (at the batch the key
    names: the throughput config runs batch 32) it was tuned on."""
    db = TunedDB()
    assert db.entries, "configs/tuned.json is empty"
    for key, entry in db.entries.items():
        problem = PROBLEMS[entry["problem"]]
        batch = int(key.split("|")[1].split("c")[0][1:])
        assert f"|{shape_key(geometry_for(problem.with_batch(batch)))}|" in key
        family = get_family(key.rsplit("|", 1)[1].split("@")[0])
        assert family.params.from_dict(entry["params"]) is not None


def test_tune_needs_a_gpu(monkeypatch):
    from sparsert_cli.commands.tune import run_tuner
    from sparsert_cli.config import CONFIG_DIR, load_config
    from sparsert_cli.errors import NoGpuError
    from sparsert_cli.gpu import runtime

    monkeypatch.setattr(runtime, "have_gpu", lambda: False)
    with pytest.raises(NoGpuError):
        run_tuner(load_config(CONFIG_DIR / "ci.yaml"))


def test_gemm_batch_override_scales_tokens():
    p = Problem("g", "gemm", 8, 16, height=1, width=128)
    assert p.with_batch(4).n == 512


def test_seeds_follow_the_default_and_survive_the_limit():
    problem = PROBLEMS["rn50_c3_3x3"]
    geometry = geometry_for(problem)
    nnz = problem.m * problem.k // 10
    seed = PlanParams(rows_per_group=8, vector_width=1, col_threads=64, k_split=1)
    assert seed != candidates(geometry, nnz, limit=1, precision="fp16")[0]
    found = candidates(geometry, nnz, limit=3, precision="fp16", seeds=(seed,))
    assert found[1] == fit_params(geometry, seed, "fp16") and len(found) == 3
    assert seed not in candidates(geometry, nnz, limit=3, precision="fp16")[1:2]


# ---- the immediate family's untuned rule (docs/perf-notes.md, "Untuned defaults") ------------
def _rule(pid: str, density: float = 0.1, precision: str = "fp32"):
    from sparsert_cli.families.immediate import default_params as rule

    problem = PROBLEMS[pid]
    geometry = geometry_for(problem)
    nnz = int(problem.m * problem.k * density)
    from sparsert_cli.problem_shape import PRECISIONS

    params = fit_params(geometry, rule(geometry, nnz, precision), PRECISIONS[precision][0])
    per_thread = -(-geometry.columns // params.vector_width)
    tiles = -(-per_thread // params.col_threads)
    return params, tiles, tiles * -(-problem.m // params.rows_per_group)


@pytest.mark.parametrize("pid", ["bert_ffn_up", "mbv1_pw12", "rn50_c3_3x3_b8"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_code_heavy_defaults_take_one_tile_where_possible_and_about_one_wave(pid, precision):
    """Large layers (and batched direct 3x3 convolutions) are bound by instruction fetch: the
    widest tile (each further tile fetches the group's code again) and rows per group halved
    only until the blocks fill 7/8 of the 132 SMs (not two waves, as for light layers)."""
    params, tiles, blocks = _rule(pid, precision=precision)
    assert params.col_threads == 256 or tiles == 1
    assert blocks >= 132 - 132 // 8 and (params.rows_per_group == 32 or blocks // 2 < 116)


@pytest.mark.parametrize("pid", ["rn50_c2_3x3", "rn50_c3_3x3", "rn50_c4_3x3", "rn50_c5_3x3"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_one_image_3x3_defaults_fill_one_wave_with_the_least_output_per_block(pid, precision):
    """One-image direct 3x3 convolutions: at most one block per SM, and no one-wave plan with
    fewer outputs per block (rows x columns)."""
    params, tiles, blocks = _rule(pid, precision=precision)
    assert blocks <= 132
    problem = PROBLEMS[pid]
    per_thread = geometry_for(problem).columns
    for threads in range(32, 257, 32):
        for rows in (2, 4, 8, 16, 32):
            if -(-per_thread // threads) * -(-problem.m // rows) <= 132:
                assert rows * threads >= params.rows_per_group * params.col_threads


def test_3x3_default_and_wide_code_narrows_the_vector():
    """rn50_c3_3x3 @90%: the rule now gives r4v1t224 (S11-7: 4.45 us; run S4's fastest,
    r4v1t256, 4.78; the rule's first default r4v1t64k2 was 1.75x slower than it). A light 1x1
    layer past WIDE_CODE sum instructions narrows its vector (26k nonzeros x 4 columns: 1.4-1.5x
    slower than x 2 in run S4). fp16 (half2 sums) takes 8 columns up to LIGHT_HALF2 nonzeros,
    past it the columns fp32 takes (run S6-6: rn50_c3_reduce 2.64 us at 4 columns, 5.81 at 8;
    rn50_c4_reduce 2.93 at 2, 3.27 at 4)."""
    assert _rule("rn50_c3_3x3")[0].name() == "r4v1t224k1b8n"
    assert _rule("mbv1_pw6")[0].vector_width == 2
    for pid, width in (("mbv1_pw6", 2), ("rn50_c4_reduce", 2), ("rn50_c3_reduce", 4),
                       ("mbv1_pw4", 4), ("mbv1_pw3", 8)):
        assert _rule(pid, precision="fp16")[0].vector_width == width, pid
        if width < 8:     # bf16 (widened sums): fp32's columns, one where they are few (S18-2)
            assert _rule(pid, precision="bf16")[0].vector_width == (
                width if geometry_for(PROBLEMS[pid]).columns >= 128 * width else 1), pid
    for pid in ("mbv1_pw6", "rn50_c4_reduce"):     # 196 columns: fp32 keeps the rule's pairs
        assert _rule(pid)[0].vector_width == 2, pid
    assert _rule("mbv1_pw6", density=0.05)[0].vector_width == 4       # 13k x 4 < WIDE_CODE
    assert _rule("mbv1_pw3", precision="bf16")[0].rows_per_group == 2  # light: r4 fills 128 < 132


@pytest.mark.parametrize("pid, precision, name", [
    ("mbv1_pw4", "bf16", "r2v4t128k1b8n"),       # S18-1: 2.44 us against r2v4t64 3.56
    ("rn50_c3_reduce", "bf16", "r2v4t128k1b8n"),  # 2.79 against 4.01
    ("mbv1_pw3", "bf16", "r2v4t128k1b8n"),       # 1.95 against 1.92
    ("rn50_c3_reduce", "fp16acc32", "r2v4t128k1b8n"),
    ("rn50_c3_reduce", "fp16", "r2v4t64k1b8n"),   # half2 sums keep 64 threads
    ("mbv1_pw5", "bf16", "r4v1t128k1b8n"),       # S18-2: 196 columns; r2v4t64 3.93, r4v1t128 2.47
    ("mbv1_pw6", "bf16", "r4v1t128k1b8n"),       # r2v2t128 5.52, r4v1t128 3.46
    ("rn50_c4_reduce", "bf16", "r2v1t128k1b8n"),  # r2v2t128 5.29, r2v1t128 3.61
    ("mbv1_pw5", "fp32", "r2v4t64k1b8n"),        # fp32 keeps its vectors
])
def test_widened_light_layers_take_128_threads(pid, precision, name):
    """Light layers whose 2-byte inputs are widened to fp32 sums (bf16, fp16acc32) keep 128
    threads' worth of vectors (narrower vectors on few columns), take tiles of 128 threads once
    a thread's vectors pass 64 (half the tiles, each of which fetches its group's code) and one
    wave of blocks (S18-1, S18-2)."""
    assert _rule(pid, precision=precision)[0].name() == name


@pytest.mark.parametrize("pid, precision, name", [
    ("mbv1_pw2", "fp32", "r32v1t128k1b8ng"),     # S16-1: 2.35 us (r8v4t64, tuned: 3.25)
    ("rn50_c2_expand", "fp32", "r32v1t128k1b8ng"),
    ("mbv1_pw0", "fp32", "r32v1t128k1b8ng"),
    ("mbv1_pw3", "fp32", "r16v1t128k1b8n"),      # 784 columns: r32 would fill 104 blocks
    ("mbv1_pw4", "fp32", "r16v1t128k1b8n"),      # 26 nonzeros a row: r32 passes TALL_FMAS
    ("rn50_c3_reduce", "fp32", "r8v1t128k1b8n"),
    ("mbv1_pw2", "fp16", "r16v2t128k1b8ng"),     # half2: a column pair, 32 sums a thread
    ("rn50_c2_expand", "fp16", "r16v2t128k1b8ng"),
    ("mbv1_pw2", "bf16", "r32v1t128k1b8ng"),     # S18-1: r32v1 2.24-2.38 us, r2v4t64 2.60
    ("mbv1_pw0", "bf16", "r32v1t128k1b8ng"),
    ("mbv1_pw2", "fp16acc32", "r32v1t128k1b8ng"),  # widened sums, as bf16
])
def test_light_layers_over_many_columns_default_to_tall_groups(pid, precision, name):
    """Light batch-1 1x1 layers with enough columns (TALL_COLUMNS) take tall row groups of one
    column (fp16: one pair) a thread, as tall as TALL_FMAS sums a thread and a full wave of
    blocks allow, row groups on blockIdx.x past TALL_GROUPS_COLUMNS columns (S16-1/S16-2)."""
    params, tiles, blocks = _rule(pid, precision=precision)
    assert params.name() == name
    assert blocks >= 96 and params.k_split == 1


@pytest.mark.parametrize("pid, precision", [
    ("mbv1_pw5", "fp32"), ("mbv1_pw6", "fp32"), ("rn50_c4_reduce", "fp32"),   # 196 columns
    ("mbv1_pw3", "fp16"), ("mbv1_pw4", "fp16"),          # fp16 under 2048 columns
    ("mbv1_pw4", "bf16"), ("rn50_c3_reduce", "fp16acc32"),  # widened sums under 2048 columns
    ("rn50_c2_3x3", "fp32"), ("bert_ffn_up", "fp32"),    # direct 3x3; over LARGE_CODE
])
def test_tall_groups_stay_where_they_were_measured(pid, precision):
    from sparsert_cli.families.immediate.tuning import tall_params

    problem = PROBLEMS[pid]
    assert tall_params(geometry_for(problem), problem.m * problem.k // 10, precision) is None
    assert tall_params(geometry_for(problem.with_batch(8)), problem.m * problem.k // 10,
                       precision) is None


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "fp16acc32"])
def test_every_builtin_layers_default_is_a_legal_block(precision):
    """The rule's k-split stays inside a block (1024 threads) and its slices' partial sums inside
    static shared memory: the batch-8 3x3 layers (many tiles: 32 rows per group) once asked for
    64 KB."""
    from sparsert_cli.families.immediate import default_params as rule
    from sparsert_cli.problem_shape import MAX_STATIC_SHARED, PRECISIONS

    dtype, accumulate = PRECISIONS[precision]
    for problem in PROBLEMS.values():
        geometry = geometry_for(problem)
        for density in (0.02, 0.05, 0.1, 0.2):
            nnz = int(problem.m * problem.k * density)
            p = fit_params(geometry, rule(geometry, nnz, precision), dtype)
            shared = p.k_split * p.rows_per_group * p.col_threads * p.vector_width * (
                2 if accumulate == "fp16" else 4)
            assert p.col_threads * p.k_split <= 1024, (problem.id, p.name())
            assert p.k_split == 1 or shared <= MAX_STATIC_SHARED, (problem.id, p.name())


@pytest.mark.parametrize("batch", [8, 32])
def test_every_builtin_layers_batched_defaults_and_candidates_are_legal(batch):
    """Batched layers get the throughput plans, fitted to their columns: e.g. ResNet-50's
    layer4 1x1 layers at batch 8 have 392 columns, which a 512-thread plan fits to 416 threads
    (a first version refused that count and left those layers dense)."""
    for pid, problem in PROBLEMS.items():
        wide = problem.with_batch(batch)
        geometry = geometry_for(wide)
        nnz = max(1, wide.m * wide.k * problem.kernel_size ** 2 // 10)
        base = fit_params(geometry, default_params(geometry, nnz))
        assert base == base.validate(), pid
        for params in candidates(geometry, nnz, limit=16):
            assert params == fit_params(geometry, params), (pid, params.name())


def test_batched_conv_candidates_keep_tiles_on_x_past_the_grids_y_limit():
    """Group-major plans put column tiles on blockIdx.y (at most 65535): a 3x3 layer with more
    tiles gets only the tile-major twins (review of session 7)."""
    from sparsert_cli.families.immediate.plan import MAX_GRID_Y
    from sparsert_cli.families.immediate.tuning import batched_conv_params
    from sparsert_cli.problem_shape import Geometry

    geometry = Geometry(64, 8, 1024, 1024, 8, kernel=3, padding=1)     # 64M columns
    found = batched_conv_params(geometry, PlanParams(), "fp32")
    assert found
    for params in found:
        tiles = -(-geometry.columns // (params.vector_width * params.col_threads))
        assert params.grid_order == "tiles" or tiles <= MAX_GRID_Y, params.name()
    small = batched_conv_params(geometry_for(PROBLEMS["rn50_c4_3x3"].with_batch(8)),
                                PlanParams(), "fp32")
    assert {p.grid_order for p in small} == {"groups", "tiles"}


def test_one_image_3x3_defaults_take_one_wave_of_the_smallest_blocks():
    """rn50_c2_3x3 (64 x 3136 outputs): 4 groups of 16 rows x 33 tiles of 96 threads = 132
    blocks, 1536 outputs each; r4t256 ran 208 blocks (two on most SMs). Batched layers, 1x1
    layers and shapes that cannot fit one wave keep the older rule."""
    from sparsert_cli.families.immediate.tuning import balanced_tiles, rule_params
    from sparsert_cli.problems import builtin_problems

    assert balanced_tiles(64, 3136) == (16, 96)
    assert balanced_tiles(128, 784) == (4, 224)
    assert balanced_tiles(256, 196) == (2, 224)
    assert balanced_tiles(512, 49) == (4, 64)
    assert balanced_tiles(64, 25088) is None            # no plan fits one wave
    problems = builtin_problems()

    def rule(name: str):
        geometry = geometry_for(problems[name])
        return rule_params(geometry, geometry.out_channels * geometry.taps // 10)

    assert (rule("rn50_c2_3x3").rows_per_group, rule("rn50_c2_3x3").col_threads) == (16, 96)
    assert rule("rn50_c2_3x3").k_split == 1
    assert rule("rn50_c3_3x3_b8").col_threads == 256     # batch 8: the older rule
    assert rule("mbv1_pw6").col_threads == 64            # 1x1: the older rule


@pytest.mark.parametrize("pid, sparsity, pattern, precision, name", [
    # uneven (pruned) rows: the tall plan with twice its rows on 64 threads (S19-1, us)
    ("mbv1_pw6", 0.95, "pruned", "fp32", "r16v1t64k1b8n"),   # 3.24; r8v1t128 3.59, r2v4t64 6.47
    ("mbv1_pw5", 0.9, "pruned", "fp32", "r16v1t64k1b8n"),    # 2.55; r8v1t128 2.90
    ("mbv1_pw6", 0.95, "pruned", "fp16", "r8v2t64k1b8n"),    # 3.44; rule r2v4t64 4.04
    ("rn50_c3_reduce", 0.95, "pruned", "fp16", "r8v2t64k1b8n"),  # 2.96; rule r2v8t64 4.45
    ("rn50_c4_reduce", 0.95, "pruned", "bf16", "r4v1t64k1b8n"),  # 5.50; rule r2v1t128 5.81
    ("mbv1_pw4", 0.95, "pruned", "bf16", "r16v1t64k1b8n"),   # widened: the tall rows, 2.23
    # twice the rows pass TALL_FMAS sums: the even-row choice (S19-4: 3.51; r8v1t128 3.93,
    # which spills; rn50_c4_reduce bf16 at 90% keeps the rule's r2v1t128, 8.11 against 5.74)
    ("mbv1_pw6", 0.9, "pruned", "bf16", "r4v1t128k1b8n"),
    ("rn50_c4_reduce", 0.9, "pruned", "bf16", "r2v1t128k1b8n"),
    ("mbv1_pw6", 0.9, "pruned", "fp32", "r8v1t128k1b8n"),    # 4.16; r2v2t64 not timed
    ("mbv1_pw4", 0.8, "pruned", "fp16", "r2v4t64k1b8n"),     # fp16: the rule
    # even rows: the rule unless the tall plan's largest group has less code (fp32, bf16)
    ("mbv1_pw6", 0.9, "uniform", "fp32", "r2v2t64k1b8n"),    # S16-3: 3.60 us, r8v1t128 3.88
    ("mbv1_pw5", 0.9, "uniform", "fp32", "r2v4t64k1b8n"),
    ("mbv1_pw6", 0.95, "uniform", "fp16", "r2v4t64k1b8n"),   # fp16: the rule (S19-1: best)
    ("mbv1_pw3", 0.98, "uniform", "fp16", "r2v8t64k1b8n"),   # 2.6 a row: random, not uneven
    ("mbv1_pw2", 0.9, "pruned", "fp32", "r32v1t128k1b8ng"),  # tall by the rule already
    ("mbv1_pw11", 0.95, "pruned", "fp32", "r4v1t64k1b8n"),   # one tile: its one-wave rule
])
def test_the_cost_model_refines_the_immediate_default_by_the_largest_groups_code(
        pid, sparsity, pattern, precision, name):
    """Under TALL_COLUMNS a light layer with uneven (pruned) rows takes taller groups of 64
    threads (uneven_params); on even rows an fp32 or bf16 layer takes the tall-group plan only
    when its largest group has less code than the rule's, fp16 keeps the rule; the choice goes
    through costmodel.choose, as every untuned plan does."""
    from sparsert_cli import costmodel
    from sparsert_cli.patterns import generate, to_csr

    problem = PROBLEMS[pid]
    csr = to_csr(generate(problem, sparsity, pattern, 0))
    family, params = costmodel.choose(geometry_for(problem), csr, precision,
                                      "NVIDIA H100 80GB HBM3")
    assert (family.name, params.name()) == ("immediate", name)


def test_tall_groups_keep_the_grid_limit_and_leave_throughput_shapes_alone():
    """A GEMM view of millions of columns: groups order would put more column tiles than
    MAX_GRID_Y on blockIdx.y, so the tall plan takes tiles order (or is none), and no candidate
    passes the limit; a tall plan is never one of four waves of blocks (throughput_shape: those
    layers keep the throughput rules)."""
    from sparsert_cli.families.immediate.plan import MAX_GRID_Y
    from sparsert_cli.families.immediate.tuning import grid_fits, tall_params, throughput_shape
    from sparsert_cli.problem_shape import Geometry

    huge = Geometry(1, 64, 1, 9_000_000, 64)
    tall = tall_params(huge, 400)
    assert tall is None or grid_fits(huge, tall)
    for params in candidates(huge, 400, limit=16):
        assert grid_fits(huge, params), params.name()
    assert -(-9_000_000 // 128) > MAX_GRID_Y            # the case the limit is about
    for pid in ("mbv1_pw0", "mbv1_pw2", "mbv1_pw4", "rn50_c2_expand"):
        for density in (0.02, 0.1, 0.3, 0.5):
            for precision in ("fp32", "fp16"):
                problem = PROBLEMS[pid]
                nnz = int(problem.m * problem.k * density)
                tall = tall_params(geometry_for(problem), nnz, precision)
                assert tall is None or not throughput_shape(geometry_for(problem), tall)


def test_tall_groups_stop_where_two_rows_pass_the_sum_budget_and_fit_odd_columns():
    from sparsert_cli.families.immediate.tuning import TALL_FMAS, tall_params
    from sparsert_cli.problem_shape import Geometry

    wide = Geometry(1, 1024, 56, 56, 64)               # 300 nonzeros a row: 2 x 300 > 416
    assert tall_params(wide, 64 * 300) is None and 2 * 300 > TALL_FMAS
    odd = Geometry(1, 64, 47, 47, 128)                 # 2209 columns: no fp16 pairs
    tall = tall_params(odd, 128 * 6, "fp16")
    assert tall is not None and tall.vector_width == 1
    tiles = -(-odd.columns // tall.col_threads)
    assert tiles * -(-odd.out_channels // tall.rows_per_group) >= 132


def test_refine_keeps_k_split_and_throughput_defaults():
    """refine_default compares the largest group's code only for one-slice latency defaults."""
    from sparsert_cli.families.immediate.tuning import refine_default, throughput_layer
    from sparsert_cli.patterns import generate, to_csr

    problem = PROBLEMS["mbv1_pw5"]
    csr = to_csr(generate(problem, 0.7, "uniform", 0))
    split = fit_params(geometry_for(problem), default_params(geometry_for(problem), csr.nnz))
    assert split.k_split > 1
    assert refine_default(geometry_for(problem), csr, split, "fp32") == split
    batched = geometry_for(problem.with_batch(32))
    csr = to_csr(generate(problem, 0.9, "uniform", 0))
    assert throughput_layer(batched, csr.nnz, "fp32")
    rule = fit_params(batched, default_params(batched, csr.nnz))
    assert refine_default(batched, csr, rule, "fp32") == rule


@pytest.mark.parametrize("overrides", [{"k_split": 4}, {"k_split": 2}, {"vector_width": 4}])
def test_overrides_over_a_tall_default_still_build(overrides):
    """A k-split's partial sums do not fit beside a 32-row group of 128 threads (64 KB of
    shared memory): the override then applies over the latency rules without tall groups."""
    from sparsert_cli.build import plan_weight
    from sparsert_cli.patterns import generate

    for pid in ("mbv1_pw0", "mbv1_pw2", "rn50_c2_expand"):
        problem = PROBLEMS[pid]
        plan = plan_weight(geometry_for(problem), generate(problem, 0.9, "uniform", 0),
                           overrides=overrides, gpu_name="NVIDIA H100 80GB HBM3")
        for name, value in overrides.items():
            assert getattr(plan.params, name) == value, (pid, plan.params.name())


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_light_layers_in_one_tile_fill_one_wave_not_two(precision):
    """49 columns fit one tile: more groups than SMs only add code each block fetches alone
    (mbv1_pw11 at 95%: r4, 256 blocks, not r2, 512); over several tiles two waves stay."""
    from sparsert_cli.families.immediate.tuning import rule_params
    from sparsert_cli.problem_shape import Geometry

    one_tile = Geometry(1, 512, 7, 7, 1024)
    params = rule_params(one_tile, 26214, precision, tall=False)
    assert params.rows_per_group == 4, params.name()
    many = Geometry(1, 512, 28, 28, 1024)      # 784 columns: several tiles
    params = rule_params(many, 26214, precision, tall=False)
    tiles = -(-784 // (params.vector_width * params.col_threads))
    assert tiles > 1 and tiles * -(-1024 // params.rows_per_group) >= 2 * 132, params.name()


def test_uneven_rows_are_pruned_rows_not_the_noise_of_random_ones():
    """Random (uniform) rows vary by about the square root of their mean: at 98% and 2.6
    nonzeros a row their CV passes UNEVEN_ROWS_CV, but not the dispersion test; pruned rows
    pass both; an empty weight is not uneven."""
    import scipy.sparse

    from sparsert_cli.families.immediate.tuning import uneven_rows
    from sparsert_cli.patterns import generate, to_csr

    for pid in ("mbv1_pw3", "mbv1_pw5", "rn50_c4_reduce", "bert_attn_out"):
        for sparsity in (0.9, 0.95, 0.98):
            problem = PROBLEMS[pid]
            assert not uneven_rows(to_csr(generate(problem, sparsity, "uniform", 0))), pid
            assert uneven_rows(to_csr(generate(problem, sparsity, "pruned", 0))), pid
    assert not uneven_rows(scipy.sparse.csr_matrix((4, 8), dtype="float32"))
