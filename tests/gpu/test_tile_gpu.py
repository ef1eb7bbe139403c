"""The streamed family's tile stage on a GPU: every tile shape class, epilogue and batch, the
ResNet-50 3x3 layers it is the default for, and the dependent-launch build, each verified
element-wise against float64 (fresh inputs, poisoned outputs) through benchmark_layer. Skipped
without a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from sparsert_cli.gpu.runtime import have_gpu

if not have_gpu():
    pytest.skip("no CUDA driver or GPU", allow_module_level=True)

import sparsert_cli as sparsert  # noqa: E402
import sparsert_cli.api  # noqa: E402,F401
from sparsert_cli.families.streamed import StreamParams  # noqa: E402

pytestmark = pytest.mark.gpu


def sparse(shape, density, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) >= density] = 0
    return w


SHAPES = {   # (M, C, H, W), batch
    "14x14": ((24, 32, 14, 14), 1), "7x7_b2": ((20, 16, 7, 7), 2), "5x6": ((12, 8, 5, 6), 1),
    "6x9_b3": ((16, 8, 6, 9), 3), "long_rows": ((8, 96, 4, 4), 1),
    # dense rows of 512 channels: a block's entries exceed what it stages in shared memory
    # (MAX_STAGED_ENTRY_BYTES), so its warps stream them (the other shapes stage them)
    "streamed_entries": ((12, 512, 3, 3), 1),
}


@pytest.mark.parametrize("epilogue", [None, "relu", "relu6", "gelu"])
@pytest.mark.parametrize("plan", [dict(warps=2, rows_per_worker=2), dict(warps=1, chains=8),
                                  dict(warps=3, rows_per_worker=1, chains=2),
                                  dict(vector_width=1, warps=2, rows_per_worker=2),
                                  dict(vector_width=1, warps=1, chains=8)])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_tile_kernels_match_float64(gpu, name, plan, epilogue):
    _check_tile(gpu, name, SHAPES[name], StreamParams(stage="tile", **{"vector_width": 2,
                                                                        **plan}), epilogue)


def _check_tile(gpu, name, shape, params, epilogue):
    """Compile a tile kernel of `shape` ((M, C, H, W), batch), with every epilogue op when
    `epilogue` names an activation, and verify it on the GPU (fresh inputs, poisoned outputs);
    the shapes "long_rows" and "streamed_entries" are denser, and only the latter's block
    entries exceed what a block stages."""
    (m, c, h, w), batch = shape
    epi = ({"bias": np.linspace(-1, 1, m), "activation": epilogue, "residual": True}
           if epilogue else None)
    kernel = sparsert.compile_kernel(
        sparse((m, c, 3, 3), 0.2 if name not in ("long_rows", "streamed_entries") else 0.6,
               len(name)), op="conv",
        input_shape=(batch, c, h, w), padding=1, dtype="fp16", tuned=False, cache=None,
        epilogue=epi, plan=params)
    assert (kernel.plan.staged_entries == 0) == (name == "streamed_entries"), params
    result = sparsert.benchmark_layer(gpu, kernel, baselines=False, replays=1, checks=2)
    assert result["verify_gpu"]["ok"], (name, params, result["verify_gpu"])
    return kernel


@pytest.mark.parametrize("problem", ["rn50_c4_3x3", "rn50_c5_3x3"])
@pytest.mark.parametrize("dependent", [False, True])
def test_resnet_layers_tile_plans_match(gpu, problem, dependent):
    """The tile default of rn50_c4_3x3 and the width-1 candidate of rn50_c5_3x3."""
    from dataclasses import replace

    from sparsert_cli.families.streamed import default_params

    layer = sparsert.problem_layer(problem, 0.9, precision="fp16")
    params = default_params(layer.geometry, int(np.count_nonzero(layer.weight)),
                            precision="fp16")
    if problem == "rn50_c5_3x3":
        params = StreamParams(stage="tile", warps=4)
    assert params.stage == "tile"
    _check_planned(gpu, replace(layer, plan=params), dependent)


def _check_planned(gpu, layer, dependent):
    """Plan `layer` (its explicit plan), compile it for sm_90 with or without dependent launch
    and verify it on the GPU."""
    planned = [sparsert.api.plan_for(layer, tuned=False)]
    kernel = sparsert.api.compile_plans([layer], planned, arch="sm_90", cache=None,
                                        dependent_launch=dependent)[0]
    assert isinstance(kernel, sparsert.Kernel), kernel
    result = sparsert.benchmark_layer(gpu, kernel, baselines=False, replays=2, checks=2)
    assert result["verify_gpu"]["ok"], result["verify_gpu"]


def test_a_staged_tile_plan_at_the_block_limit_launches(gpu):
    """Image (195 KB) and staged entries (31 KB) within ~1.2 KB of the 227 KB an sm_90 block
    gets (families/streamed/plan.py TILE_BLOCK_BYTES keeps 1 KB for what ptxas reserves): the
    launch is accepted and the result matches."""
    rng = np.random.default_rng(24)
    weight = np.zeros((4, 390 * 9), np.float32)
    for r in range(4):
        weight[r, rng.choice(390 * 9, 980, replace=False)] = rng.standard_normal(980)
    kernel = sparsert.compile_kernel(
        weight.reshape(4, 390, 3, 3), op="conv", input_shape=(1, 390, 14, 14), padding=1,
        dtype="fp16", tuned=False, cache=None,
        plan=StreamParams(stage="tile", vector_width=2, warps=4, rows_per_worker=1))
    assert kernel.plan.staged_entries == 3936
    assert "sparsert_block_ent[3936]" in kernel.source
    result = sparsert.benchmark_layer(gpu, kernel, baselines=False, replays=1, checks=2)
    assert result["verify_gpu"]["ok"], result["verify_gpu"]


# row vectors (session 25): images of at most 8 rows of at most 7 pixels
ROW_SHAPES = {"7x7_b2": ((20, 16, 7, 7), 2), "5x6": ((12, 8, 5, 6), 1),
              "8x7": ((9, 8, 8, 7), 1), "1x1": ((6, 8, 1, 1), 1), "3x2_b3": ((5, 4, 3, 2), 3),
              "long_rows": ((8, 96, 4, 4), 1), "streamed_entries": ((12, 512, 3, 3), 1)}


@pytest.mark.parametrize("epilogue", [None, "relu", "relu6", "gelu"])
@pytest.mark.parametrize("plan", [dict(warps=2, rows_per_worker=2), dict(warps=1),
                                  dict(warps=3, rows_per_worker=1)])
@pytest.mark.parametrize("name", sorted(ROW_SHAPES))
def test_row_vector_tile_kernels_match_float64(gpu, name, plan, epilogue):
    kernel = _check_tile(gpu, name, ROW_SHAPES[name],
                         StreamParams(stage="tile", vector_width=8, **plan), epilogue)
    assert kernel.plan_params.vector_width == 8 and kernel.plan_params.col_threads == 32


@pytest.mark.parametrize("sparsity", [0.9, 0.95])
@pytest.mark.parametrize("dependent", [False, True])
def test_resnet_7x7_row_vector_default_matches(gpu, sparsity, dependent):
    """rn50_c5_3x3's untuned fp16 default (row vectors), with and without dependent launch."""
    from dataclasses import replace

    from sparsert_cli.families.streamed import default_params

    layer = sparsert.problem_layer("rn50_c5_3x3", sparsity, precision="fp16")
    params = default_params(layer.geometry, int(np.count_nonzero(layer.weight)),
                            precision="fp16")
    assert (params.stage, params.vector_width) == ("tile", 8)
    _check_planned(gpu, replace(layer, plan=params), dependent)
