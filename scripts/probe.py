"""Time hand-picked plans of one layer (a perf experiment, not the tuner): every plan is verified
on the GPU before it is timed. Prints one line per plan and writes JSON lines to --out.

  python scripts/probe.py PROBLEM SPARSITY [--precision fp32] [--baselines] [--out FILE] PLAN...
  PLAN: rows,width,threads,k_split[,max_registers]   e.g. 16,1,128,1   (immediate family)
        s[:FIELD=VALUE,...]   the streamed family's untuned default with those fields changed,
                              e.g. s, s:k_slices=2, s:k_slices=4,rows_per_worker=2
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import sparsert_cli as sparsert
from sparsert_cli.families import family_of_params

parser = argparse.ArgumentParser()
parser.add_argument("problem")
parser.add_argument("sparsity", type=float)
parser.add_argument("plans", nargs="+")
parser.add_argument("--precision", default="fp32")
parser.add_argument("--out", default=None)
parser.add_argument("--baselines", action="store_true",
                    help="also time the dense baselines (cuBLAS, cuSPARSE, ...) once, with the "
                         "first plan that compiles, so every ratio is of one run")
args = parser.parse_args()

def streamed(text: str, layer):
    """The streamed default of `layer`'s shape with the fields `text` names changed."""
    from dataclasses import replace

    from sparsert_cli.families.streamed import default_params
    from sparsert_cli.families.streamed.plan import StreamParams

    base = default_params(layer.geometry, int(np.count_nonzero(layer.weight)),
                          precision=args.precision)
    fields = dict(item.split("=") for item in text.partition(":")[2].split(",") if item)
    return replace(base, **{k: v if k in StreamParams.TEXT else int(v)
                            for k, v in fields.items()})


layers = []
for text in args.plans:
    layer = sparsert.problem_layer(args.problem, args.sparsity, precision=args.precision)
    if text.startswith("s"):
        params = streamed(text, layer)
    else:
        values = [int(v) for v in text.split(",")]
        params = sparsert.PlanParams(rows_per_group=values[0], vector_width=values[1],
                                     col_threads=values[2], k_split=values[3],
                                     max_registers=values[4] if len(values) > 4 else 0)
    layers.append(sparsert.problem_layer(args.problem, args.sparsity, precision=args.precision,
                                         plan=params))
kernels = sparsert.compile_kernels(layers, arch="sm_90", tuned=False)
rows = []
with sparsert.Gpu() as gpu:
    first = next(k for k in kernels if isinstance(k, sparsert.Kernel))
    x, res = first.random_inputs(np.random.default_rng(0))
    inputs = (x, res, *first.reference(x, res))        # one reference for every plan
    for kernel in kernels:
        plan = kernel.plan
        row = {"problem": args.problem, "sparsity": args.sparsity, "precision": args.precision,
               "family": family_of_params(plan.params).name, "plan": plan.params.name(),
               "groups": len(getattr(plan, "groups", ())), "loads": plan.loads,
               "nnz": plan.nnz, "grid": list(plan.grid), "block": list(plan.block)}
        if not isinstance(kernel, sparsert.Kernel):
            row["error"] = str(kernel).splitlines()[0]
        else:
            want = args.baselines and not any("baselines" in r for r in rows)
            result = sparsert.benchmark_layer(gpu, kernel, inputs=inputs, baselines=want)
            if want:
                row["baselines"] = {
                    name: value.get("median_us") if isinstance(value, dict) else value
                    for name, value in result.get("baselines", {}).items()}
            row.update(cubin_bytes=len(kernel.cubin), registers=kernel.resources.registers,
                       ok=result["verify_gpu"]["ok"],
                       us=result.get("sparsert", {}).get("median_us"))
        rows.append(row)
        print(json.dumps(row), flush=True)
if args.out:
    with open(args.out, "a") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
