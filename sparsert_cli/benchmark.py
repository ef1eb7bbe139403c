"""Verifying and benchmarking one layer: library functions the `bench`, `tune` and `gen` commands
and the scripts call. Each returns a plain dict (JSON-ready); nothing is mutated in place.

  verify_cpu(kernel_or_case, seed)      -- the plan executed on the CPU vs float64
  benchmark_layer(gpu, kernel, ...)     -- verify on the GPU (poisoned output), time, baselines
  measure_floors(gpu)                   -- the ceilings "% of floor" is reported against
"""

from __future__ import annotations

import math
import time

import numpy as np

from .api import Kernel, verify_plan
from .patterns import case_seed, dense, to_csr
from .problem_shape import ELEMENT_BYTES
from .reference import check, im2col, reference_and_magnitude
from .storage import decode, encode

BASELINE_ORDER = ("cublas_fp32", "cublas_tf32", "cublas_fp16", "cublas_bf16", "cusparse",
                  "cudnn_fp32", "cudnn_fp16", "cudnn_bf16", "im2col_cusparse")


def verify_cpu(kernel_or_case, seed: int = 0) -> dict:
    """{"ok", "max_err", "message"}: the kernel's plan executed on the CPU (float64) for two fresh
    random inputs, compared element-wise with the float64 reference. A Kernel draws its inputs
    from its pattern; a case (anything with problem, sparsity, plan and weight) from its own
    (problem, sparsity) seed, as `bench` does."""
    if isinstance(kernel_or_case, Kernel):
        result = kernel_or_case.verify_cpu(seed)
    else:
        case = kernel_or_case
        rng = np.random.default_rng(case_seed(seed, case.problem.id, case.sparsity, "cpu-verify"))
        result = verify_plan(case.plan, case.weight, rng)
    result.pop("checks", None)
    return result


def timing_summary(timing) -> dict:
    """median / p20 / p80 of a gpu.timing.Timing, with its raw samples and method."""
    samples = np.asarray(timing.samples_us)
    return {"median_us": float(np.median(samples)),
            "p20_us": float(np.percentile(samples, 20)),
            "p80_us": float(np.percentile(samples, 80)),
            "samples_us": list(timing.samples_us), "method": timing.method,
            "per_graph": timing.per_graph, "cold_l2": timing.cold_l2, "note": timing.note}


def time_enqueue(gpu, enqueue, cold_l2: bool = False, replays: int = 10) -> dict:
    from .gpu import timing

    if cold_l2:
        return timing_summary(timing.cold_l2(gpu, enqueue, replays=replays))
    return timing_summary(timing.graph(gpu, enqueue, replays=replays))


def floor_us(kernel: Kernel, floors: dict) -> dict:
    """The layer's floor: useful sparse flops at measured FP32 peak, bytes of the activations and
    outputs at measured bandwidth, and the measured launch floor; the largest wins.

    Half2 sums (precision fp16) count at twice the FP32 rate: HFMA2 issues like FFMA with two
    lanes (Hopper's non-tensor fp16 rate is documented as 2x fp32; not measured here)."""
    g = kernel.geometry
    flops = 2.0 * kernel.nnz * g.columns / (2.0 if kernel.precision == "fp16" else 1.0)
    nbytes = ELEMENT_BYTES[kernel.dtype] * (g.input_elems + g.output_elems)
    terms = {"flops_us": flops / (floors["fp32_gflops"] * 1e3),
             "bytes_us": nbytes / (floors["bandwidth_gbs"] * 1e3),
             "launch_us": floors["launch_us"]}
    bound = max(terms, key=terms.get)
    return {"floor_us": terms[bound], "bound": bound.removesuffix("_us"), **terms}


def benchmark_layer(gpu, kernel: Kernel, *, floors: dict | None = None, seed: int = 0,
                    rng: np.random.Generator | None = None, cold_l2: bool = False,
                    baselines: bool = True, inputs=None, replays: int = 10,
                    checks: int = 2) -> dict:
    """Verify `kernel` on the GPU, time it, then every baseline on the same inputs.

    The kernel is loaded with to_device() and launched on gpu.stream through the same
    LoadedKernel.launch a PyTorch caller uses. Each check poisons the output (NaN) and draws
    fresh inputs (from `rng`, else a generator seeded with `seed`); `inputs` = (x, res, ref,
    magnitude) instead checks once against a given reference (the tuner: one per layer).
    Returns {"kernel", "verify_gpu", "sparsert" (timing, when verified), "baselines", and with
    floors: "floor_us", "bound", ..., "floor_pct", "speedup"}."""
    rng = rng if rng is not None else np.random.default_rng(seed)
    store = kernel.storage
    out: dict = {"baselines": {}}
    x, res = (inputs[0], inputs[1]) if inputs else kernel.random_inputs(rng)
    buffers = {}
    with kernel.to_device(gpu.device) as loaded:
        # one kernel replayed back to back: no overlap of one run with the next (a kernel
        # compiled for dependent launch still waits; it is only launched without the attribute)
        loaded.dependent_launch = False
        out["kernel"] = {"registers": loaded.registers, "local_bytes": loaded.local_bytes}
        try:
            buffers["y"] = gpu.alloc(np.dtype(store).itemsize * int(np.prod(kernel.output_shape)))

            def upload(x, res):
                for name, value in (("x", x), ("res", res)):
                    if name in buffers:
                        buffers.pop(name).free()
                    if value is not None:
                        buffers[name] = gpu.upload(encode(value, kernel.dtype))

            def launch():
                loaded.launch(gpu.stream, buffers["x"].ptr, buffers["y"].ptr,
                              buffers["res"].ptr if "res" in buffers else None)

            worst, ok, message = 0.0, False, "ok"
            for check_no in range(1 if inputs else checks):
                if check_no:
                    x, res = kernel.random_inputs(rng)
                if check_no or "x" not in buffers:
                    upload(x, res)
                gpu.poison(buffers["y"])
                launch()
                y = decode(gpu.download(buffers["y"], kernel.output_shape, store), kernel.dtype)
                ref, mag = (inputs[2], inputs[3]) if inputs else kernel.reference(x, res)
                ok, err, message = check(y, np.reshape(ref, kernel.output_shape),
                                         np.reshape(mag, kernel.output_shape), kernel.dtype,
                                         kernel.geometry.taps)
                worst = max(worst, err if math.isfinite(err) else float("inf"))
                if not ok:
                    break
            out["verify_gpu"] = {"ok": ok, "max_err": worst, "message": message}
            if ok:
                out["sparsert"] = time_enqueue(gpu, launch, cold_l2, replays)
        finally:
            gpu.synchronize()
            for buf in buffers.values():
                buf.free()
    if baselines:
        out["baselines"] = run_baselines(gpu, kernel, x, cold_l2)
    if floors:
        fl = floor_us(kernel, floors)
        out.update(fl)
        mine = out.get("sparsert", {}).get("median_us")
        if mine:
            out["floor_pct"] = 100.0 * fl["floor_us"] / mine
            out["speedup"] = {name: b["median_us"] / mine for name, b in out["baselines"].items()
                              if b.get("ok") and b.get("median_us")}
    return out


def _baseline_specs(kernel: Kernel, x: np.ndarray):
    """(name, factory, reference, magnitude, dtype) for every baseline of this layer; bf16 layers
    add cuBLAS and cuDNN in bf16 (tensor cores, fp32 accumulation) next to the fp16 ones."""
    from .gpu.baselines import CublasGemm, CudnnConv, CusparseSpmm, Im2colCusparse

    g, weight = kernel.geometry, dense(kernel.weight)
    x4 = np.asarray(x, dtype=np.float32).reshape(g.batch, g.in_channels, g.height, g.width)
    w2 = weight.reshape(g.out_channels, -1).astype(np.float32)
    cols = im2col(x4.astype(np.float64), g.kernel, g.kernel, g.stride, g.padding)
    b32 = cols.astype(np.float32)
    gemm_ref = w2.astype(np.float64) @ cols
    gemm_mag = np.abs(w2.astype(np.float64)) @ np.abs(cols)
    csr = to_csr(weight)
    specs = [
        ("cublas_fp32", lambda gpu: CublasGemm(gpu, w2, b32, "fp32"), gemm_ref, gemm_mag, "fp32"),
        ("cublas_tf32", lambda gpu: CublasGemm(gpu, w2, b32, "tf32"), gemm_ref, gemm_mag, "tf32"),
        ("cublas_fp16", lambda gpu: CublasGemm(gpu, w2, b32, "fp16"), gemm_ref, gemm_mag, "fp16"),
        ("cusparse", lambda gpu: CusparseSpmm(gpu, csr, b32), gemm_ref, gemm_mag, "fp32"),
    ]
    bf16 = kernel.dtype == "bf16"
    if bf16:
        specs.insert(3, ("cublas_bf16", lambda gpu: CublasGemm(gpu, w2, b32, "bf16"), gemm_ref,
                         gemm_mag, "bf16"))
    if kernel.op != "gemm":
        conv_ref, conv_mag = reference_and_magnitude(weight, x4, g.stride, g.padding)
        specs += [
            ("cudnn_fp32", lambda gpu: CudnnConv(gpu, x4, weight, g.stride, g.padding, "fp32"),
             conv_ref, conv_mag, "fp32"),
            ("cudnn_fp16", lambda gpu: CudnnConv(gpu, x4, weight, g.stride, g.padding, "fp16"),
             conv_ref, conv_mag, "fp16"),
        ]
        if bf16:
            specs.append(("cudnn_bf16", lambda gpu: CudnnConv(gpu, x4, weight, g.stride,
                                                              g.padding, "bf16"),
                          conv_ref, conv_mag, "bf16"))
        if g.kernel > 1 or g.stride > 1 or g.batch > 1:
            specs.append(("im2col_cusparse",
                          lambda gpu: Im2colCusparse(gpu, x4, csr, g.kernel, g.kernel, g.stride,
                                                     g.padding),
                          conv_ref, conv_mag, "fp32"))
    return specs


def run_baselines(gpu, kernel: Kernel, x: np.ndarray, cold_l2: bool = False) -> dict:
    """Every library baseline of the layer on input `x`: checked (poisoned output) and timed.
    A baseline that fails is recorded with its message, never raised."""
    results = {}
    for name, factory, ref, mag, dtype in _baseline_specs(kernel, x):
        started = time.perf_counter()
        try:
            with factory(gpu) as base:
                base.poison()
                base.enqueue()
                ok, _, message = check(base.output(), ref, mag, dtype, kernel.geometry.taps)
                entry = {"ok": ok, "message": message, "dtype": dtype, "info": base.info}
                if ok:
                    entry.update(time_enqueue(gpu, base.enqueue, cold_l2))
        except Exception as exc:  # noqa: BLE001 - a baseline that fails is recorded, not fatal
            entry = {"ok": False, "message": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                     if str(exc) else type(exc).__name__}
        entry["setup_seconds"] = round(time.perf_counter() - started, 3)
        results[name] = entry
    return results


def measure_floors(gpu, gemm_size: int = 8192) -> dict:
    """Ceilings the benchmark reports "% of floor" against: strict-fp32 cuBLAS SGEMM GFLOP/s
    (n^3 random data), device-to-device copy bandwidth of 1 GiB with cuMemcpyDtoDAsync (bytes
    read + written), and the per-launch time of an empty kernel with one 128-thread block per SM
    (graph-timed)."""
    from .compile import ptx_to_cubin
    from .gpu import timing
    from .gpu.baselines import CublasGemm
    from .gpu.runtime import EMPTY_PTX, cu, ptx_header

    n = int(gemm_size)
    rng = np.random.default_rng(0)
    with CublasGemm(gpu, rng.standard_normal((n, n), dtype=np.float32),
                    rng.standard_normal((n, n), dtype=np.float32), "fp32") as gemm:
        t_gemm = timing.graph(gpu, gemm.enqueue, per_graph=2, replays=5, warmup=1)
    nbytes = 1 << 30
    src, dst = gpu.alloc(nbytes), gpu.alloc(nbytes)
    try:
        gpu.memset(src, 0x3C)
        # Not graph-captured: on an H100 a captured copy node moved 2.44 TB/s, the same copy on
        # the stream 3.00 TB/s (a float4 copy kernel 2.87). A 0.7 ms copy needs no graph.
        t_copy = timing.stream(gpu, lambda: cu("cuMemcpyDtoDAsync", dst.ptr, src.ptr, nbytes,
                                               gpu.stream), per_graph=5, replays=5, warmup=1)
    finally:
        src.free()
        dst.free()
    empty = gpu.load(ptx_to_cubin(ptx_header(gpu.arch) + EMPTY_PTX, gpu.arch), "sparsert_empty")
    grid = (gpu.sm_count, 1, 1)
    t_launch = timing.graph(gpu, lambda: gpu.launch(empty, grid, (128, 1, 1), 0, []))
    median = lambda t: float(np.median(t.samples_us))  # noqa: E731
    return {"fp32_gflops": 2.0 * n ** 3 / (median(t_gemm) * 1e3),
            "bandwidth_gbs": 2.0 * nbytes / (median(t_copy) * 1e3),
            "launch_us": median(t_launch),
            "gemm_size": n, "copy_bytes": nbytes, "launch_grid": list(grid),
            "methods": {"gemm": t_gemm.method, "copy": t_copy.method, "launch": t_launch.method}}
