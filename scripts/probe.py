"""Time hand-picked plans of one layer (a perf experiment, not the tuner): every plan is verified
on the GPU before it is timed. Prints one line per plan and writes JSON lines to --out.

  python scripts/probe.py PROBLEM SPARSITY [--precision fp32] [--out FILE] PLAN...
  PLAN: rows,width,threads,k_split[,max_registers]   e.g. 16,1,128,1
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from sparsert_cli import bench as B
from sparsert_cli.build import build_all, epilogue_for, make_plan
from sparsert_cli.cache import KernelCache
from sparsert_cli.config import EpilogueSpec
from sparsert_cli.gpu.runtime import Gpu
from sparsert_cli.patterns import generate
from sparsert_cli.families.immediate import PlanParams
from sparsert_cli.problems import builtin_problems

parser = argparse.ArgumentParser()
parser.add_argument("problem")
parser.add_argument("sparsity", type=float)
parser.add_argument("plans", nargs="+")
parser.add_argument("--precision", default="fp32")
parser.add_argument("--out", default=None)
args = parser.parse_args()

problem = builtin_problems()[args.problem]
weight = generate(problem, args.sparsity, "uniform", 0)
epilogue = epilogue_for(problem, EpilogueSpec(), 0, args.sparsity)
plans = []
for text in args.plans:
    values = [int(v) for v in text.split(",")]
    params = PlanParams(rows_per_group=values[0], vector_width=values[1], col_threads=values[2],
                        k_split=values[3], max_registers=values[4] if len(values) > 4 else 0)
    plans.append(make_plan(problem, weight, params, epilogue, precision=args.precision))
builds = build_all(plans, "ptx", "sm_90", KernelCache())
floors = {"fp32_gflops": 51700.0, "bandwidth_gbs": 3010.0, "launch_us": 1.01}
rows = []
with Gpu() as gpu:
    rng = np.random.default_rng(0)
    first = B.Case(problem, args.sparsity, weight, plans[0])
    x, res = B.random_inputs(first, rng)
    inputs = (x, res, *B.reference(first, x, res))
    for plan, build in zip(plans, builds):
        row = {"problem": problem.id, "sparsity": args.sparsity, "precision": args.precision,
               "plan": plan.params.name(), "groups": len(plan.groups), "loads": plan.loads,
               "nnz": plan.nnz, "grid": list(plan.grid), "block": list(plan.block)}
        if isinstance(build, Exception):
            row["error"] = str(build).splitlines()[0]
        else:
            case = B.Case(problem, args.sparsity, weight, plan, build=build)
            result = B.run_gpu_case(gpu, case, floors, 0, False, baselines=False, inputs=inputs)
            row.update(cubin_bytes=len(build.cubin), registers=build.resources.registers,
                       ok=result["verify_gpu"]["ok"],
                       us=result.get("sparsert", {}).get("median_us"))
        rows.append(row)
        print(json.dumps(row), flush=True)
if args.out:
    with open(args.out, "a") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
