"""One small padded, strided, batched 3x3 kernel (both emitters, and the fp16 precisions) and a
1x1 fp16 kernel with 16-byte vectors, launched once and checked: run under
`compute-sanitizer --tool memcheck` by scripts/gpu-check."""

from sparsert_cli import bench as B
from sparsert_cli.build import build_kernel, make_plan
from sparsert_cli.gpu.runtime import Gpu
from sparsert_cli.patterns import pruned_weights
from sparsert_cli.families.immediate import PlanParams
from sparsert_cli.problem_shape import Epilogue
from sparsert_cli.problems import Problem

problem = Problem("memcheck_3x3_s2", "conv3x3", 10, 6, height=11, width=9, stride=2, padding=1,
                  batch=2)
weight = pruned_weights(problem.weight_shape, 0.7, 1)
floors = {"fp32_gflops": 1.0, "bandwidth_gbs": 1.0, "launch_us": 1.0}
with Gpu() as gpu:
    for emitter in ("ptx", "cuda"):
        for k_split in (1, 2):
            plan = make_plan(problem, weight, PlanParams(rows_per_group=4, k_split=k_split),
                             Epilogue(tuple([0.5] * 10), "relu", residual=True))
            build, _ = build_kernel(plan, emitter, gpu.arch)
            case = B.Case(problem, 0.7, weight, plan, build=build)
            result = B.run_gpu_case(gpu, case, floors, 0, False, baselines=False, replays=1)
            print(emitter, plan.params.name(), result["verify_gpu"])
            assert result["verify_gpu"]["ok"]
    pointwise = Problem("memcheck_1x1_b2", "conv1x1", 12, 16, height=6, width=8, batch=2)
    for prob, w in ((problem, weight), (pointwise, pruned_weights(pointwise.weight_shape, 0.7, 2))):
        for precision in ("fp16", "fp16acc32"):
            plan = make_plan(prob, w, PlanParams(rows_per_group=4, k_split=2, vector_width=8),
                             Epilogue(tuple([0.5] * prob.m), "relu", residual=True),
                             precision=precision)
            build, _ = build_kernel(plan, "ptx", gpu.arch)
            case = B.Case(prob, 0.7, w, plan, build=build)
            result = B.run_gpu_case(gpu, case, floors, 0, False, baselines=False, replays=1)
            print(precision, prob.id, plan.params.name(), result["verify_gpu"])
            assert result["verify_gpu"]["ok"]
