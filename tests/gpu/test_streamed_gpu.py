"""The streamed family on a GPU: every shape class and precision verified element-wise against
float64 (fresh inputs, poisoned outputs) through benchmark_layer. Skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from sparsert_cli.gpu.runtime import have_gpu

if not have_gpu():
    pytest.skip("no CUDA driver or GPU", allow_module_level=True)

import sparsert_cli as sparsert  # noqa: E402
from sparsert_cli.families.streamed import StreamParams  # noqa: E402

pytestmark = pytest.mark.gpu


def sparse(shape, density, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) >= density] = 0
    return w


EPI = {"bias": None, "activation": "relu6", "residual": True}
CASES = {
    "gemm_odd": (sparse((37, 53), 0.3, 1), dict(n=129), {}),
    "gemm_v4_chains8": (sparse((64, 96), 0.2, 2), dict(n=256), dict(vector_width=4, chains=8)),
    "bert_like": (sparse((384, 768), 0.1, 3), dict(n=128), {}),
    "pw_batch2": (sparse((40, 24, 1, 1), 0.3, 4), dict(op="conv", input_shape=(2, 24, 9, 12)),
                  dict(vector_width=2)),
    "pw_stride2": (sparse((20, 12, 1, 1), 0.3, 5), dict(op="conv", input_shape=(1, 12, 11, 9),
                                                         stride=2), {}),
    "3x3_pad1": (sparse((24, 16, 3, 3), 0.2, 6), dict(op="conv", input_shape=(1, 16, 13, 10),
                                                       padding=1), {}),
    "3x3_s2_b2": (sparse((12, 8, 3, 3), 0.3, 7), dict(op="conv", input_shape=(2, 8, 9, 7),
                                                       stride=2, padding=1), {}),
    "3x3_pad0": (sparse((10, 6, 3, 3), 0.4, 8), dict(op="conv", input_shape=(1, 6, 8, 8)), {}),
    # tap segments of ~40 entries: whole runs of 32, tails, ring refills inside segments
    "3x3_long": (sparse((16, 64, 3, 3), 0.6, 10), dict(op="conv", input_shape=(1, 64, 6, 6),
                                                        padding=1), dict(rows_per_worker=2)),
    "empty_rows": (np.pad(sparse((8, 32), 0.5, 9), ((0, 24), (0, 0))), dict(n=64), {}),
    # a block's entries past MAX_STAGED_ENTRY_BYTES: stage smem streams them 32 at a time (the
    # other cases' smem kernels copy their block's entries into shared memory first)
    "long_block_runs": (sparse((8, 4096), 0.6, 11), dict(n=40), {}),
}


@pytest.mark.parametrize("precision", [("fp32", "fp32"), ("fp16", "fp16"), ("fp16", "fp32"),
                                       ("bf16", "fp32")])
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("epilogue", [None, "relu6", "gelu"])
@pytest.mark.parametrize("stage", ["shfl", "smem", "ring", "smem-k2", "shfl-k3"])
def test_streamed_kernels_match_float64(gpu, name, precision, epilogue, stage):
    """"-kN": N K-slices (partials in the module's workspace; two checks, so the second launch
    finds the tile counters reset by the first). The epilogue: bias, residual and the named
    activation (gelu: erff in fp32, fp16 sums widened and rounded back)."""
    weight, shape, plan = CASES[name]
    rows = weight.shape[0]
    epi = dict(EPI, bias=np.linspace(-1, 1, rows), activation=epilogue) if epilogue else None
    stage, _, slices = stage.partition("-k")
    default = dict(col_threads=32, vector_width=1, warps=2, rows_per_worker=3, chains=4,
                   stage=stage, k_slices=int(slices or 1))
    kernel = sparsert.compile_kernel(weight, **shape, dtype=precision[0],
                                     accumulate=precision[1], tuned=False, cache=None,
                                     epilogue=epi, plan=StreamParams(**{**default, **plan}))
    result = sparsert.benchmark_layer(gpu, kernel, baselines=False, replays=1, checks=2)
    assert result["verify_gpu"]["ok"], (name, precision, result["verify_gpu"])


TOKEN_CASES = {name: CASES[name] for name in ("gemm_odd", "gemm_v4_chains8", "bert_like",
                                                "empty_rows")}


@pytest.mark.parametrize("precision", [("fp32", "fp32"), ("fp16", "fp16"), ("fp16", "fp32"),
                                       ("bf16", "fp32")])
@pytest.mark.parametrize("name", sorted(TOKEN_CASES))
@pytest.mark.parametrize("stage", ["smem", "ring", "smem-k2", "smem-b2"])
@pytest.mark.parametrize("activation", ["relu6", "gelu"])
def test_token_major_kernels_match_float64(gpu, name, precision, stage, activation):
    """Linear layers' N x M output (scalar stores per column, the residual read so), with the
    full epilogue; "-k2": two K-slices, "-b2": two blocks per SM (registers capped)."""
    weight, shape, plan = TOKEN_CASES[name]
    stage, _, extra = stage.partition("-")
    default = dict(col_threads=32, vector_width=4 if precision[0] == "fp32" else 8, warps=2,
                   rows_per_worker=3, chains=4, stage=stage,
                   k_slices=2 if extra == "k2" else 1, min_blocks=2 if extra == "b2" else 1)
    epi = dict(EPI, bias=np.linspace(-1, 1, weight.shape[0]), token_major=True,
               activation=activation)
    kernel = sparsert.compile_kernel(weight, **shape, dtype=precision[0],
                                     accumulate=precision[1], tuned=False, cache=None,
                                     epilogue=epi, plan=StreamParams(**{**default, **plan}))
    assert kernel.output_shape == (shape["n"], weight.shape[0])
    result = sparsert.benchmark_layer(gpu, kernel, baselines=False, replays=1, checks=2)
    assert result["verify_gpu"]["ok"], (name, precision, result["verify_gpu"])


@pytest.mark.parametrize("precision", [("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "fp32")])
@pytest.mark.parametrize("name, planes", [("bert_like", 128), ("gemm_v4_chains8", 16),
                                          ("gemm_v4_chains8", 32)])
@pytest.mark.parametrize("slices", [1, 2])
def test_token_major_planes_match_float64(gpu, name, planes, precision, slices):
    """Stacked sibling layers' output in planes (P x N blocks, each contiguous): the staged
    write-out with tiles that straddle planes (5 warps x 3 rows), and K-split scalar stores."""
    weight, shape, plan = TOKEN_CASES[name]
    default = dict(col_threads=32, vector_width=4 if precision[0] == "fp32" else 8, warps=5,
                   rows_per_worker=3, chains=4, stage="smem", k_slices=slices)
    epi = dict(EPI, bias=np.linspace(-1, 1, weight.shape[0]), token_major=True, planes=planes)
    kernel = sparsert.compile_kernel(weight, **shape, dtype=precision[0],
                                     accumulate=precision[1], tuned=False, cache=None,
                                     epilogue=epi, plan=StreamParams(**{**default, **plan}))
    assert kernel.output_shape == (weight.shape[0] // planes, shape["n"], planes)
    result = sparsert.benchmark_layer(gpu, kernel, baselines=False, replays=1, checks=2)
    assert result["verify_gpu"]["ok"], (name, precision, result["verify_gpu"])
