"""Probe: the fused pointwise -> depthwise kernel (sparsert.fuse_pointwise_depthwise) against
the unfused pair the tool picks for the two layers alone, on MobileNet v1's pairs at batch 1.

For each case (pw M x C @ H x H, depthwise stride; uniform random pattern at --sparsity,
BN-like random biases, ReLU after both layers) and precision it builds
  (a) the fused kernel (default parameters, or --rows),
  (b) the pointwise and the depthwise alone (plan "auto", as compile_kernels plans layers: a
      tuned winner if configs/tuned.json has one, else the cost model's choice, over --family;
      the depthwise as a 3x3 convolution with its block-diagonal weight),
verifies both on the GPU (x random, y and the scratch poisoned) against the float64 reference of
the two layers, and times (a) and (b) with CUDA-graph replay (gpu/timing.graph: --per-graph
runs of the kernel, or of the pair back to back, per replay; median of --replays samples),
each with plain launches and with programmatic dependent launch (all kernels are compiled to
wait for the grid before them). One JSON line per case goes to --out; a case that fails
records its error and the others go on. Cases not started within --budget-s are recorded as
skipped.

    python3 scripts/probe_fused.py --out fused.jsonl
    python3 scripts/probe_fused.py --out fused.jsonl --precisions fp16 --rows 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (M, C, H, stride): pointwise M x C at H x H, then the depthwise over its M channels
CASES = [(256, 128, 28, 1), (256, 256, 28, 2), (512, 256, 14, 1), (512, 512, 14, 1),
         (512, 512, 14, 2), (1024, 512, 7, 1)]


def layer_weights(m: int, c: int, sparsity: float, seed: int):
    """(pw M x C x 1 x 1, dw M x 3 x 3, pw bias, dw bias): uniform pattern, BN-like biases."""
    from sparsert_cli.patterns import uniform_weights

    rng = np.random.default_rng([seed, m, c])
    pw = uniform_weights((m, c, 1, 1), sparsity, seed + m + c) / np.float32(
        np.sqrt((1 - sparsity) * c))
    dw = (rng.standard_normal((m, 3, 3)) / 3).astype(np.float32)
    b1 = (0.1 * rng.standard_normal(m)).astype(np.float32)
    b2 = (0.1 * rng.standard_normal(m)).astype(np.float32)
    return pw.astype(np.float32), dw, b1, b2


def median(timing) -> float:
    return statistics.median(timing.samples_us)


def kernel_doc(kernel) -> dict:
    res = kernel.resources
    doc = {"entry": kernel.entry, "grid": list(kernel.grid), "block": list(kernel.block),
           "registers": res.registers, "spill_bytes": res.spills,
           "compile_seconds": round(kernel.compile_seconds, 2), "cached": kernel.cached}
    if hasattr(kernel, "plan_params"):
        doc.update(plan=kernel.plan_params.name(), family=kernel.family, tuned=kernel.tuned)
    else:
        doc.update(pointwise_plan=kernel.plan.pointwise.params.name(),
                   depthwise_vector_width=kernel.plan.depthwise.vector_width,
                   row_groups=len(kernel.plan.pointwise.groups))
    return doc


def run_case(gpu, case, precision: str, args) -> dict:
    import sparsert_cli as sparsert
    from sparsert_cli.api import (KernelFailure, Layer, compile_plans, layer_geometry,
                                  make_epilogue, plan_layers)
    from sparsert_cli.problem_shape import precision_label
    from sparsert_cli.reference import check
    from sparsert_cli.families.immediate.fuse import depthwise_csr
    from sparsert_cli.gpu import timing
    from sparsert_cli.patterns import SparseWeight
    from sparsert_cli.storage import decode, encode

    m, c, h, stride = case
    dtype, accumulate = {"fp32": ("fp32", None), "fp16": ("fp16", None),
                         "bf16": ("bf16", None), "fp16acc32": ("fp16", "fp32")}[precision]
    pw, dw, b1, b2 = layer_weights(m, c, args.sparsity, args.seed)
    relu1 = {"bias": b1, "activation": "relu"}
    relu2 = {"bias": b2, "activation": "relu"}
    out: dict = {}
    started = time.perf_counter()
    fused = sparsert.fuse_pointwise_depthwise(
        pw, dw, input_shape=(c, h, h), stride=stride, dtype=dtype, accumulate=accumulate,
        pw_epilogue=relu1, dw_epilogue=relu2, rows_per_group=args.rows, dependent_launch=True)
    out["fused"] = kernel_doc(fused)
    dw_weight = SparseWeight(depthwise_csr(dw, m), (m, m, 3, 3))
    layers = []
    for label, weight, shape, conv, epilogue in (
            ("pw", pw, (1, c, h, h), {}, relu1),
            ("dw", dw_weight, (1, m, h, h), {"stride": stride, "padding": 1}, relu2)):
        weight, geometry = layer_geometry(weight, "conv", shape, **conv)
        layers.append(Layer(label, "conv", weight, geometry, make_epilogue(epilogue, m),
                            precision_label(dtype, accumulate), family=args.family))
    # jobs=1: compiled in this process (which holds a CUDA context: no forked workers)
    pw_kernel, dw_kernel = compile_plans(layers, plan_layers(layers), dependent_launch=True,
                                         jobs=1)
    for kernel in (pw_kernel, dw_kernel):
        if isinstance(kernel, KernelFailure):
            raise kernel.error
    out["pointwise"], out["depthwise"] = kernel_doc(pw_kernel), kernel_doc(dw_kernel)
    out["compile_seconds"] = round(time.perf_counter() - started, 1)

    store = np.dtype(fused.storage)
    rng = np.random.default_rng(args.seed + 1)
    x = fused.random_inputs(rng)
    ref, mag = fused.reference(x)
    x_buf = gpu.upload(encode(x, dtype))
    y_buf = gpu.alloc(store.itemsize * int(np.prod(fused.output_shape)))
    t_buf = gpu.alloc(store.itemsize * int(np.prod(fused.scratch_shape)))
    y2_buf = gpu.alloc(store.itemsize * int(np.prod(fused.output_shape)))
    t2_buf = gpu.alloc(store.itemsize * int(np.prod(fused.scratch_shape)))

    def verified(run, y) -> dict:
        gpu.poison(y)
        for buf in (t_buf, t2_buf):
            gpu.poison(buf)
        run()
        gpu.synchronize()
        got = decode(gpu.download(y, fused.output_shape, store), dtype)
        ok, err, message = check(got, ref, mag, dtype, 9)
        return {"ok": ok, "max_err": err, "message": message}

    with fused.to_device(gpu.device) as lf, pw_kernel.to_device(gpu.device) as lp, \
            dw_kernel.to_device(gpu.device) as ld:
        def run_fused():
            lf.launch(gpu.stream, x_buf, y_buf, scratch_ptr=t_buf)

        def run_pair():
            lp.launch(gpu.stream, x_buf, t2_buf)
            ld.launch(gpu.stream, t2_buf, y2_buf)

        out["fused"]["verify_gpu"] = verified(run_fused, y_buf)
        out["pair_verify_gpu"] = verified(run_pair, y2_buf)
        if not (out["fused"]["verify_gpu"]["ok"] and out["pair_verify_gpu"]["ok"]):
            return out
        times = {}
        # every kernel waits for the grid before it; "_pdl": also launched with programmatic
        # stream serialization, so each launch overlaps its start with the end of the last
        for name, run in (("fused", run_fused), ("pair", run_pair),
                          ("fused_pdl", run_fused), ("pair_pdl", run_pair)):
            for loaded in (lf, lp, ld):
                loaded.dependent_launch = name.endswith("_pdl")
            t = timing.graph(gpu, run, per_graph=args.per_graph, replays=args.replays)
            times[name] = {"median_us": round(median(t), 3), "method": t.method,
                           "samples_us": [round(v, 3) for v in t.samples_us]}
        out["time"] = times
        out["fused_over_pair"] = round(times["fused"]["median_us"]
                                       / times["pair"]["median_us"], 3)
        out["fused_over_pair_pdl"] = round(times["fused_pdl"]["median_us"]
                                           / times["pair_pdl"]["median_us"], 3)
        out["fused"]["verify_gpu_after_timing"] = verified(run_fused, y_buf)
        out["pair_verify_gpu_after_timing"] = verified(run_pair, y2_buf)
    for buf in (x_buf, y_buf, t_buf, y2_buf, t2_buf):
        buf.free()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON lines, one per case")
    ap.add_argument("--precisions", nargs="+", default=["fp16", "fp32"],
                    choices=["fp32", "fp16", "bf16", "fp16acc32"])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", type=int, default=None, help="fused rows per group (default: "
                    "fuse_params)")
    ap.add_argument("--family", default="auto", help="family of the unfused pair")
    ap.add_argument("--per-graph", type=int, default=20)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=170.0,
                    help="cases not started by then are recorded as skipped")
    args = ap.parse_args()

    from sparsert_cli.gpu.runtime import Gpu

    start = time.perf_counter()
    with Gpu() as gpu, open(args.out, "w") as fh:
        info = {"gpu": gpu.name, "arch": gpu.arch, "driver": gpu.driver_version}
        for precision in args.precisions:
            for case in CASES:
                m, c, h, stride = case
                line = {"case": f"pw{m}x{c}@{h}-dw-s{stride}", "m": m, "c": c, "h": h,
                        "stride": stride, "precision": precision, "sparsity": args.sparsity,
                        **info}
                if time.perf_counter() - start > args.budget_s:
                    line["skipped"] = f"time budget of {args.budget_s:g} s spent"
                else:
                    case_start = time.perf_counter()
                    try:
                        line.update(run_case(gpu, case, precision, args))
                    except Exception as exc:  # noqa: BLE001 - one case must not end the probe
                        line["error"] = f"{type(exc).__name__}: {exc}"
                        line["traceback"] = traceback.format_exc(limit=8)
                    line["seconds"] = round(time.perf_counter() - case_start, 1)
                fh.write(json.dumps(line) + "\n")
                fh.flush()
                summary = line.get("error") or line.get("skipped") or (
                    f"fused {line.get('time', {}).get('fused', {}).get('median_us')} us, pair "
                    f"{line.get('time', {}).get('pair', {}).get('median_us')} us, ratio "
                    f"{line.get('fused_over_pair')} (pdl {line.get('fused_over_pair_pdl')})"
                    if "time" in line else f"verify: fused "
                    f"{line.get('fused', {}).get('verify_gpu')}, pair "
                    f"{line.get('pair_verify_gpu')}")
                print(f"{precision:9s} {line['case']:24s} {summary}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
