"""Probe: what programmatic dependent launch (PDL, sm_90) saves in a chain of small kernels
replayed as one CUDA graph, as a sparsified model runs them.

A chain of CHAIN launches of one small kernel (y = x * a + b over N elements plus ITERS dependent
FMAs per element, so each kernel runs ~1-3 us), ping-ponging two torch buffers, is captured in a
torch CUDA graph and replayed; the mean replay time per kernel is reported for:

  plain        kernel without griddepcontrol, cuLaunchKernel
  gdc          kernel with griddepcontrol (wait, then launch_dependents), cuLaunchKernel
  gdc+pdl      the same kernel, cuLaunchKernelEx with programmatic stream serialization
  late+pdl     launch_dependents after the kernel's work (not at its top), PDL launch
  first+pdl    launch_dependents before the wait (the streamed family's order), PDL launch
  mixed+pdl    every third launch is a torch op (relu_) between PDL kernels

Every variant's output is checked against the same chain run in torch (float64 sums of the
same affine steps). Writes one JSON object (--out) and prints a table.
    python3 scripts/pdl_probe.py --out probe.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np

SOURCE = r"""
extern "C" __global__ void __launch_bounds__(256) step_{name}(const float* __restrict__ x,
                                                             float* __restrict__ y, int n)
{{
  {top}
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {{
    float v = x[i];
    float acc = 0.f;
    #pragma unroll 1
    for (int k = 0; k < {iters}; ++k) acc = fmaf(acc, 0.5f, 1e-30f);
    y[i] = v * 0.5f + 1.0f + acc;
  }}
  {bottom}
}}
"""
WAIT = 'asm volatile("griddepcontrol.wait;" ::: "memory");'
TRIGGER = 'asm volatile("griddepcontrol.launch_dependents;" ::: "memory");'


def compile_kernels(iters: int, arch: str = "sm_90") -> bytes:
    from sparsert_cli.compile import cpp_to_cubin

    src = "".join(SOURCE.format(name=name, top=top, bottom=bottom, iters=iters) for name, top, bottom in (
        ("plain", "", ""), ("gdc", WAIT + "\n  " + TRIGGER, ""), ("late", WAIT, TRIGGER),
        ("first", TRIGGER + "\n  " + WAIT, "")))
    return cpp_to_cubin(src, arch).cubin


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chain", type=int, default=28)
    ap.add_argument("--n", type=int, default=128 * 256)
    ap.add_argument("--iters", type=int, nargs="+", default=[0, 200, 1000])
    ap.add_argument("--replays", type=int, default=200)
    ap.add_argument("--out")
    args = ap.parse_args()

    import torch
    from cuda.bindings import driver as d

    from sparsert_cli.gpu.runtime import cu, pack_params

    dev = torch.device("cuda", 0)
    torch.cuda.init()
    x0 = torch.randn(args.n, device=dev)
    bufs = [torch.empty_like(x0), torch.empty_like(x0)]
    results = {"gpu": torch.cuda.get_device_name(0), "chain": args.chain, "n": args.n, "runs": []}
    for iters in args.iters:
        module = cu("cuModuleLoadData", compile_kernels(iters))
        fns = {name: cu("cuModuleGetFunction", module, f"step_{name}".encode())
               for name in ("plain", "gdc", "late", "first")}
        keep = []

        def launch(fn, src, dst, pdl):
            values, pointers = pack_params([src.data_ptr(), dst.data_ptr()])
            n = np.array([args.n], dtype=np.int32)
            ptrs = np.array([pointers[0], pointers[1], n.ctypes.data], dtype=np.uint64)
            keep.append((values, n, ptrs))
            stream = torch.cuda.current_stream().cuda_stream
            grid = ((args.n + 255) // 256, 1, 1)
            if not pdl:
                (err,) = d.cuLaunchKernel(fn, *grid, 256, 1, 1, 0, stream, int(ptrs.ctypes.data), 0)
            else:
                cfg = d.CUlaunchConfig()
                cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = grid
                cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = 256, 1, 1
                cfg.sharedMemBytes, cfg.hStream = 0, stream
                attr = d.CUlaunchAttribute()
                attr.id = d.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
                attr.value.programmaticStreamSerializationAllowed = 1
                cfg.attrs, cfg.numAttrs = [attr], 1
                (err,) = d.cuLaunchKernelEx(cfg, fn, int(ptrs.ctypes.data), 0)
            if int(err) != 0:
                raise RuntimeError(f"launch failed: {err}")

        def forward(variant):
            src = x0
            for i in range(args.chain):
                dst = bufs[i % 2]
                if variant == "mixed+pdl" and i % 3 == 2:
                    dst.copy_(src).relu_()
                else:
                    name = {"plain": "plain", "gdc": "gdc", "gdc+pdl": "gdc",
                            "late+pdl": "late", "first+pdl": "first",
                            "mixed+pdl": "gdc"}[variant]
                    launch(fns[name], src, dst, variant.endswith("pdl"))
                src = dst
            return src

        def expected(variant):
            v = x0.double()
            for i in range(args.chain):
                v = v.relu() if variant == "mixed+pdl" and i % 3 == 2 else v * 0.5 + 1.0
            return v

        for variant in ("plain", "gdc", "gdc+pdl", "late+pdl", "first+pdl", "mixed+pdl",
                        "plain"):
            keep.clear()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                forward(variant)            # warm-up outside capture
                torch.cuda.synchronize()
                with torch.cuda.graph(graph, stream=s):
                    out = forward(variant)
            torch.cuda.current_stream().wait_stream(s)
            times = []
            for _ in range(7):
                bufs[0].fill_(float("nan")), bufs[1].fill_(float("nan"))
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda._sleep(20_000_000)   # the host queues every replay while the GPU sleeps
                start.record()
                for _ in range(args.replays):
                    graph.replay()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) * 1e3 / args.replays)
            err = float((out.double() - expected(variant)).abs().max())
            row = {"iters": iters, "variant": variant, "forward_us": statistics.median(times),
                   "per_kernel_us": statistics.median(times) / args.chain,
                   "spread_us": max(times) - min(times), "max_abs_err": err}
            results["runs"].append(row)
            print(f"iters {iters:5d} {variant:10s} forward {row['forward_us']:8.2f} us  "
                  f"per kernel {row['per_kernel_us']:6.3f} us  spread {row['spread_us']:.2f}  "
                  f"err {err:.2e}", flush=True)
            del graph
        cu("cuModuleUnload", module)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
