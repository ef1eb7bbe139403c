"""Both kernel families on every case of benchmark configs, in one process (a perf experiment
and the cost model's calibration data, not the tuner): per case the immediate family's plan
(tuned winner if configs/tuned.json has one, else its default), the streamed family's default
and its candidates, and the baselines once. Every kernel is verified on the GPU (fresh inputs,
poisoned output) before it is timed. JSON is rewritten after every case, so a crash or a time
limit keeps what was measured.

  python scripts/stream_probe.py CONFIG... --out FILE [--sparsity 0.9] [--limit 8]
         [--budget SECONDS] [--no-immediate]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

import sparsert_cli as sparsert
from sparsert_cli.config import load_config
from sparsert_cli.families.streamed import candidates, default_params

parser = argparse.ArgumentParser()
parser.add_argument("configs", nargs="+")
parser.add_argument("--out", required=True)
parser.add_argument("--sparsity", type=float, action="append")
parser.add_argument("--limit", type=int, default=8)
parser.add_argument("--budget", type=float, default=540.0)
parser.add_argument("--no-immediate", action="store_true")
args = parser.parse_args()
started = time.perf_counter()

layers = []
for path in args.configs:
    layers += [layer for layer in sparsert.config_layers(load_config(path))
               if not args.sparsity or (layer.info or {}).get("sparsity") in args.sparsity]
variants, owners = [], []
for index, layer in enumerate(layers):
    nnz = int(np.count_nonzero(layer.weight)) if hasattr(layer.weight, "shape") else None
    nnz = nnz if nnz is not None else layer.weight.nnz
    default = default_params(layer.geometry, nnz, precision=layer.precision)
    plans = ([] if args.no_immediate else ["auto"]) + candidates(
        layer.geometry, nnz, layer.precision, args.limit)
    for plan in plans:
        variants.append(replace(layer, plan=plan))
        owners.append((index, plan, plan == default))
print(f"{len(layers)} cases, {len(variants)} kernels: compiling", flush=True)
stats: dict = {}
kernels = sparsert.compile_kernels(variants, arch="sm_90", jobs=os.cpu_count(), stats=stats)
print(f"compiled in {stats.get('compile_seconds', 0):.1f} s (plan {stats.get('plan_seconds', 0):.1f} s)",
      flush=True)

doc = {"kind": "stream-probe", "cases": [], "compile_seconds": stats.get("compile_seconds")}
out = Path(args.out)
with sparsert.Gpu() as gpu:
    doc["gpu"] = gpu.name if hasattr(gpu, "name") else None
    for index, layer in enumerate(layers):
        if time.perf_counter() - started > args.budget:
            doc["stopped"] = f"budget {args.budget:.0f} s reached"
            break
        case = {"label": layer.label, "precision": layer.precision, "info": layer.info,
                "shape": list(layer.geometry.__dict__.values()), "runs": []}
        mine = [(i, owners[i]) for i in range(len(variants)) if owners[i][0] == index]
        first = next((kernels[i] for i, _ in mine if isinstance(kernels[i], sparsert.Kernel)),
                     None)
        if first is None:
            case["error"] = "nothing compiled"
            doc["cases"].append(case)
            continue
        x, res = first.random_inputs(np.random.default_rng(index))
        inputs = (x, res, *first.reference(x, res))
        baselines_done = False
        for i, (_, plan, is_default) in mine:
            kernel = kernels[i]
            run = {"family": "immediate" if plan == "auto" else "streamed",
                   "plan": plan if plan == "auto" else plan.name(), "default": is_default}
            if not isinstance(kernel, sparsert.Kernel):
                run["error"] = str(kernel).splitlines()[0]
            else:
                if plan == "auto":
                    run["plan"] = kernel.plan_params.name()
                    run["tuned"] = kernel.tuned
                want = not baselines_done
                result = sparsert.benchmark_layer(gpu, kernel, inputs=inputs, baselines=want)
                if want:
                    case["baselines"] = {k: v.get("median_us") if isinstance(v, dict) else v
                                         for k, v in result.get("baselines", {}).items()}
                    baselines_done = True
                run.update(ok=result["verify_gpu"]["ok"], us=result.get("sparsert", {}).get(
                    "median_us"), registers=kernel.resources.registers,
                    cubin_bytes=len(kernel.cubin), compile_s=kernel.compile_seconds)
                if not run["ok"]:
                    run["message"] = result["verify_gpu"].get("message")
            case["runs"].append(run)
        ok = [r for r in case["runs"] if r.get("ok")]
        best = {fam: min((r["us"] for r in ok if r["family"] == fam), default=None)
                for fam in ("immediate", "streamed")}
        sdef = next((r["us"] for r in ok if r["default"]), None)
        base = case.get("baselines", {})
        print(f"{layer.label:28s} {layer.precision:9s} imm {best['immediate']} | stream best "
              f"{best['streamed']} default {sdef} | {json.dumps(base)[:160]}", flush=True)
        doc["cases"].append(case)
        out.write_text(json.dumps(doc, indent=1))
out.write_text(json.dumps(doc, indent=1))
print(f"wrote {out} in {time.perf_counter() - started:.0f} s")
