"""Generated kernels on the GPU, both emitters, against the float64 reference. Skipped without a
GPU. Every check poisons the output (NaN) first and draws fresh random inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sparsert_cli.gpu.runtime import have_gpu

if not have_gpu():
    pytest.skip("no CUDA driver or GPU", allow_module_level=True)

from sparsert_cli.api import Kernel, config_layers  # noqa: E402
from sparsert_cli.benchmark import benchmark_layer  # noqa: E402
from sparsert_cli.build import build_kernel, make_plan  # noqa: E402
from sparsert_cli.config import load_config  # noqa: E402
from sparsert_cli.patterns import pruned_weights, uniform_weights  # noqa: E402
from sparsert_cli.families.immediate import PlanParams  # noqa: E402
from sparsert_cli.problem_shape import Epilogue  # noqa: E402
from sparsert_cli.problems import Problem  # noqa: E402

pytestmark = pytest.mark.gpu

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FLOORS = {"fp32_gflops": 1.0, "bandwidth_gbs": 1.0, "launch_us": 1.0}


def run_case(gpu, problem, weight, params=None, epilogue=Epilogue(), emitter="ptx",
             sparsity=0.9, precision="fp32"):
    plan = make_plan(problem, weight, params, epilogue, precision=precision)
    build, _ = build_kernel(plan, emitter, gpu.arch, cache=None)
    kernel = Kernel.from_build(plan, build, weight, "gemm" if problem.op == "gemm" else "conv")
    result = benchmark_layer(gpu, kernel, floors=FLOORS, seed=7, baselines=False)
    assert result["verify_gpu"]["ok"], (plan.params.name(), result["verify_gpu"])
    return result


_CI = load_config(CONFIGS / "ci.yaml")
CI_CASES = [(problem, sparsity, layer.weight) for (problem, sparsity), layer
            in zip(_CI.cases(), config_layers(_CI))]


@pytest.mark.parametrize("emitter", ["ptx", "cuda"])
@pytest.mark.parametrize("index", range(len(CI_CASES)),
                         ids=[f"{p.id}@{s:g}" for p, s, _ in CI_CASES])
def test_ci_config_kernels(gpu, emitter, index):
    problem, sparsity, weight = CI_CASES[index]
    run_case(gpu, problem, weight, emitter=emitter, sparsity=sparsity)


def _odd_weights():
    rng = np.random.default_rng(3)
    base = uniform_weights((29, 41, 1, 1), 0.85, 5)
    empty_rows = base.copy()
    empty_rows[[0, 5, 6, 28]] = 0
    dense_row = base.copy()
    dense_row[7, :, 0, 0] = rng.standard_normal(41)
    one_column = np.zeros_like(base)
    one_column[:, 13, 0, 0] = rng.standard_normal(29)
    return {"uniform": base, "empty_rows": empty_rows, "dense_row": dense_row,
            "one_column": one_column}


ODD = _odd_weights()
GEMM = Problem("odd_gemm", "gemm", 29, 41, height=1, width=203)
PARAMS = [PlanParams(), PlanParams(rows_per_group=3, k_split=3, col_threads=32),
          PlanParams(rows_per_group=16, vector_width=1, col_threads=128, load_batch=3),
          PlanParams(rows_per_group=5, balance="contiguous", max_registers=64),
          PlanParams(rows_per_group=3, k_split=3, col_threads=32, grid_order="groups")]


@pytest.mark.parametrize("emitter", ["ptx", "cuda"])
@pytest.mark.parametrize("name", sorted(ODD))
@pytest.mark.parametrize("params", PARAMS, ids=lambda p: p.name())
def test_odd_patterns(gpu, emitter, name, params):
    run_case(gpu, GEMM, ODD[name], params, emitter=emitter)


CONVS = [
    Problem("c3_s1_p1", "conv3x3", 19, 7, height=13, width=11, stride=1, padding=1),
    # even width: 2-byte storage takes column pairs (pair windows) at vector width 2 and up
    Problem("c3_s1_p1_w12_b2", "conv3x3", 19, 7, height=9, width=12, stride=1, padding=1,
            batch=2),
    Problem("c3_s2_p1_b3", "conv3x3", 13, 6, height=15, width=9, stride=2, padding=1, batch=3),
    Problem("c3_s2_p0", "conv3x3", 11, 5, height=10, width=12, stride=2, padding=0),
    Problem("c3_s1_p0_b2", "conv3x3", 9, 4, height=7, width=6, stride=1, padding=0, batch=2),
    Problem("c1_s2_b2", "conv1x1", 21, 10, height=9, width=13, stride=2, batch=2),
    Problem("c1_b4", "conv1x1", 17, 12, height=6, width=6, batch=4),
]


@pytest.mark.parametrize("emitter", ["ptx", "cuda"])
@pytest.mark.parametrize("problem", CONVS, ids=lambda p: p.id)
@pytest.mark.parametrize("k_split", [1, 2])
@pytest.mark.parametrize("grid_order", ["tiles", "groups"])
def test_convolutions(gpu, emitter, problem, k_split, grid_order):
    weight = pruned_weights(problem.weight_shape, 0.8, 11)
    run_case(gpu, problem, weight, PlanParams(rows_per_group=4, k_split=k_split,
                                              col_threads=32, grid_order=grid_order),
             emitter=emitter)


@pytest.mark.parametrize("emitter", ["ptx", "cuda"])
@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
def test_fused_epilogue(gpu, emitter, activation):
    problem = Problem("epi", "conv3x3", 14, 6, height=9, width=10, stride=1, padding=1, batch=2)
    weight = pruned_weights(problem.weight_shape, 0.7, 2)
    bias = tuple(float(v) for v in np.linspace(-2, 2, 14, dtype=np.float32))
    run_case(gpu, problem, weight, PlanParams(rows_per_group=4, k_split=2),
             Epilogue(bias, activation, residual=True), emitter)


# ---- 2-byte storage: fp16 with half2 sums (fp16) or fp32 sums (fp16acc32), bf16 (fp32 sums) --

HALF = ["fp16", "fp16acc32", "bf16"]
HALF_PARAMS = [PlanParams(vector_width=8), PlanParams(vector_width=4, rows_per_group=3, k_split=3,
                                                      col_threads=32),
               PlanParams(vector_width=2, rows_per_group=5, balance="contiguous"),
               PlanParams(rows_per_group=16, vector_width=1, col_threads=128, load_batch=3),
               PlanParams(vector_width=8, rows_per_group=4, col_threads=32, grid_order="groups")]
GEMM_EVEN = Problem("even_gemm", "gemm", 29, 41, height=1, width=208)   # widths up to 8 fit


@pytest.mark.parametrize("precision", HALF)
@pytest.mark.parametrize("name", sorted(ODD))
@pytest.mark.parametrize("params", HALF_PARAMS, ids=lambda p: p.name())
def test_fp16_patterns(gpu, precision, name, params):
    run_case(gpu, GEMM_EVEN, ODD[name], params, precision=precision)


@pytest.mark.parametrize("emitter", ["ptx", "cuda"])
@pytest.mark.parametrize("precision", HALF)
@pytest.mark.parametrize("problem", CONVS, ids=lambda p: p.id)
@pytest.mark.parametrize("k_split", [1, 2])
def test_fp16_convolutions(gpu, precision, problem, k_split, emitter):
    weight = pruned_weights(problem.weight_shape, 0.8, 11)
    run_case(gpu, problem, weight, PlanParams(rows_per_group=4, k_split=k_split, vector_width=8),
             emitter=emitter, precision=precision)


@pytest.mark.parametrize("precision", HALF)
@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
@pytest.mark.parametrize("problem", [
    Problem("epi3", "conv3x3", 14, 6, height=9, width=10, stride=1, padding=1, batch=2),
    Problem("epi1", "conv1x1", 14, 24, height=8, width=8)], ids=lambda p: p.id)
@pytest.mark.parametrize("emitter", ["ptx", "cuda"])
def test_fp16_fused_epilogue(gpu, precision, activation, problem, emitter):
    weight = pruned_weights(problem.weight_shape, 0.7, 2)
    bias = tuple(float(v) for v in np.linspace(-2, 2, 14, dtype=np.float32))
    run_case(gpu, problem, weight, PlanParams(rows_per_group=4, k_split=2, vector_width=8),
             Epilogue(bias, activation, residual=True), emitter, precision=precision)


@pytest.mark.parametrize("precision", HALF)
def test_fp16_paper_layer(gpu, precision):
    """A real layer (MobileNet pw3, 90%) through the default fp16 plan."""
    from sparsert_cli.problems import builtin_problems

    problem = builtin_problems()["mbv1_pw3"]
    run_case(gpu, problem, uniform_weights(problem.weight_shape, 0.9, 0), precision=precision)


@pytest.mark.parametrize("problem", [Problem("bf1", "conv1x1", 24, 32, height=8, width=8),
                                     Problem("bf3", "conv3x3", 16, 8, height=9, width=9,
                                             stride=2, padding=1)], ids=lambda p: p.id)
def test_bf16_layer_against_bf16_tensor_core_baselines(gpu, problem):
    """A bf16 layer runs next to cuBLAS and cuDNN in bf16 (tensor cores, fp32 sums): every
    column verified against float64 with the bf16 tolerance."""
    weight = pruned_weights(problem.weight_shape, 0.8, 5)
    plan = make_plan(problem, weight, precision="bf16")
    build, _ = build_kernel(plan, "ptx", gpu.arch, cache=None)
    kernel = Kernel.from_build(plan, build, weight, "conv")
    result = benchmark_layer(gpu, kernel, floors=FLOORS, seed=3)
    assert result["verify_gpu"]["ok"], result["verify_gpu"]
    for name in ("cublas_bf16", "cudnn_bf16"):
        base = result["baselines"][name]
        assert base["ok"] and base["dtype"] == "bf16" and base["median_us"] > 0, (name, base)
