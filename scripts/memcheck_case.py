"""One small padded, strided, batched 3x3 kernel (both emitters, both grid orders, and the
fp16/bf16 precisions), stride-1 3x3 kernels with pair windows, a 1x1 fp16 kernel with 16-byte vectors and token-major GEMM kernels,
loaded with Kernel.to_device() and launched on the benchmark's stream, then checked; then, on
sm_90, a small sparsified chain whose kernels use programmatic dependent launch, replayed in a
CUDA graph: run under `compute-sanitizer --tool memcheck` by scripts/gpu-check."""

import numpy as np

import sparsert_cli as sparsert


def pruned(shape, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < 0.7] = 0
    return w


CONV = dict(op="conv", input_shape=(2, 6, 11, 9), stride=2, padding=1)
POINTWISE = dict(op="conv", input_shape=(2, 16, 6, 8))
weight, pointwise = pruned((10, 6, 3, 3), 1), pruned((12, 16, 1, 1), 2)


def run(gpu, label, kernel):
    result = sparsert.benchmark_layer(gpu, kernel, baselines=False, replays=1)
    print(label, kernel.plan_params.name(), result["verify_gpu"])
    assert result["verify_gpu"]["ok"]
    canary(label)


def canary(after: str) -> None:
    """S8-7 saw the interpreter's one-character " " overwritten in this script's process (every
    lone space an f-string put between two fields became a character NVRTC skips). Say after
    which case, if it happens again."""
    sep = " "
    joined = f"{'a'}{sep}{'b'}"
    if joined != "a b" or ord(sep) != 32:
        raise SystemExit(f"memcheck_case: the string ' ' reads {sep!r} after {after}: "
                         "something in this process wrote into an immutable object")


with sparsert.Gpu() as gpu:
    for emitter in ("ptx", "cuda"):
        for k_split, order in ((1, "tiles"), (2, "tiles"), (2, "groups")):
            kernel = sparsert.compile_kernel(
                weight, **CONV, emit=emitter, arch=gpu.arch, tuned=False, cache=None,
                plan=sparsert.PlanParams(rows_per_group=4, k_split=k_split, col_threads=32,
                                         grid_order=order),
                epilogue={"bias": [0.5] * 10, "activation": "relu", "residual": True})
            run(gpu, emitter, kernel)
    for w, shape in ((weight, CONV), (pointwise, POINTWISE)):
        for dtype, accumulate in (("fp16", "fp16"), ("fp16", "fp32"), ("bf16", "fp32")):
            kernel = sparsert.compile_kernel(
                w, **shape, dtype=dtype, accumulate=accumulate, arch=gpu.arch, tuned=False,
                cache=None, plan=sparsert.PlanParams(rows_per_group=4, k_split=2,
                                                     vector_width=8),
                epilogue={"bias": [0.5] * w.shape[0], "activation": "relu", "residual": True})
            run(gpu, f"{dtype}/{accumulate} {w.shape}", kernel)
    # pair windows (stride-1 3x3, 2-byte storage, even width): aligned pairs, padding pairs
    # read from the zero buffer, PRMT shifts; both emitters, a K-split, every 2-byte precision
    pairs = dict(op="conv", input_shape=(2, 6, 7, 10), stride=1, padding=1)
    for emitter in ("ptx", "cuda"):
        for dtype, accumulate in (("fp16", "fp16"), ("fp16", "fp32"), ("bf16", "fp32")):
            for k_split in (1, 2):
                kernel = sparsert.compile_kernel(
                    weight, **pairs, emit=emitter, dtype=dtype, accumulate=accumulate,
                    arch=gpu.arch, tuned=False, cache=None,
                    plan=sparsert.PlanParams(rows_per_group=3, k_split=k_split, vector_width=2,
                                             col_threads=32),
                    epilogue={"bias": [0.5] * 10, "activation": "relu", "residual": True})
                assert kernel.plan_params.vector_width == 2, kernel.plan_params
                run(gpu, f"pairs {emitter} {dtype}/{accumulate}", kernel)
    # the tall-group defaults of light 1x1 layers (tall_params): 2304 columns take groups
    # order, 44 rows in groups of up to 8 (fp32, one column a thread) or 4 (fp16, a pair)
    tall = pruned((44, 16, 1, 1), 4)
    for dtype in ("fp32", "fp16"):
        kernel = sparsert.compile_kernel(tall, op="conv", input_shape=(1, 16, 48, 48),
                                         dtype=dtype, arch=gpu.arch, tuned=False, cache=None,
                                         epilogue={"bias": [0.5] * 44, "activation": "relu"})
        assert kernel.plan_params.grid_order == "groups", kernel.plan_params
        run(gpu, f"tall default {dtype}", kernel)
    # the streamed family: padded strided batched 3x3 (tap bases, zero buffer), and 1x1 with
    # vectors, in every precision, with every epilogue step
    from sparsert_cli.families.streamed import StreamParams

    for w, shape, width in ((weight, CONV, 1), (pointwise, POINTWISE, 4)):
        for dtype, accumulate in (("fp32", "fp32"), ("fp16", "fp16"), ("fp16", "fp32")):
            for stage, slices in (("shfl", 1), ("smem", 1), ("ring", 1), ("smem", 2)):
                kernel = sparsert.compile_kernel(
                    w, **shape, dtype=dtype, accumulate=accumulate, arch=gpu.arch, tuned=False,
                    cache=None, plan=StreamParams(col_threads=32, vector_width=width, warps=2,
                                                  rows_per_worker=3, chains=2, stage=stage,
                                                  k_slices=slices),
                    epilogue={"bias": [0.5] * w.shape[0], "activation": "relu6",
                              "residual": True})
                run(gpu, f"streamed {stage} k{slices} {dtype}/{accumulate} {w.shape}", kernel)
    # token-major GEMM outputs (Linear layers): staged per block (one slice), scalar (two);
    # 37 rows and 21 columns leave partial tiles in both directions
    linear = pruned((37, 24), 3)
    for dtype, accumulate in (("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "fp32")):
        for slices in (1, 2):
            kernel = sparsert.compile_kernel(
                linear, op="gemm", n=21, dtype=dtype, accumulate=accumulate, arch=gpu.arch,
                tuned=False, cache=None,
                plan=StreamParams(col_threads=32, vector_width=1, warps=4, rows_per_worker=3,
                                  chains=2, stage="smem", k_slices=slices),
                epilogue={"bias": [0.5] * 37, "activation": "relu", "residual": True,
                          "token_major": True})
            run(gpu, f"streamed token-major k{slices} {dtype}/{accumulate}", kernel)
            # the same rows in planes: 36 of them in 3 planes of 12, tiles of 15 rows across
            kernel = sparsert.compile_kernel(
                linear[:36], op="gemm", n=21, dtype=dtype, accumulate=accumulate, arch=gpu.arch,
                tuned=False, cache=None,
                plan=StreamParams(col_threads=32, vector_width=1, warps=5, rows_per_worker=3,
                                  chains=2, stage="smem", k_slices=slices),
                epilogue={"bias": [0.5] * 36, "activation": "relu", "residual": True,
                          "token_major": True, "planes": 12})
            run(gpu, f"streamed token-major planes k{slices} {dtype}/{accumulate}", kernel)

# a model's layers with programmatic dependent launch (sm_90): a chain of sparsified small
# layers replayed in a CUDA graph, each kernel starting while the one before it ends
try:
    import torch
except ImportError:
    torch = None
if torch is not None and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9:
    import copy

    from sparsert_cli.torch import SparseLayer, ops, prune_, sparsify_

    torch.manual_seed(0)
    chain = torch.nn.Sequential(*[m for _ in range(4) for m in (
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 1))])
    prune_(chain, 0.7)
    chain = chain.cuda().eval()
    x = torch.randn(1, 16, 9, 9, device="cuda")
    with torch.no_grad():       # float64: cuDNN's fp32 convolutions may use TF32
        want = copy.deepcopy(chain).double()(x.double())
    rows = sparsify_(chain, (x,), tuned=False, min_speedup=0.0, race=False)
    assert all(r["replaced"] for r in rows) and ops.set_dependent_launch(True) == len(rows)
    assert sum(isinstance(m, SparseLayer) for m in chain.modules()) == len(rows)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        chain(x)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            out = chain(x)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    err = float((out.double() - want).abs().max() / want.abs().max())
    print("dependent launch chain", len(rows), "kernels, rel err", err)
    assert err < 1e-4
