"""A wide sweep of the immediate family's plans for small layers (a perf experiment, not the
tuner): the tuner's candidates change one knob of the default at a time, so this times the
joint grid rows x vector width x column threads, then, around the three fastest plans of each
layer, load_batch, grid order and a K-split. Every plan is verified on the GPU before it is
timed; one JSON line per plan on stdout (and --out, appended as it goes), so a run cut by a
time limit keeps what it measured.

  python scripts/plan_sweep.py [--precision fp32] [--sparsity 0.9] [--budget 240]
                               [--rows 2,4,..] [--widths 1,2,..] [--threads 32,64,..]
                               [--pattern uniform|pruned] [--grid-only] [--out FILE] PROBLEM...

--pattern pruned times the uneven-row weights of configs/mobilenet.yaml (the same generator and
seed as `bench`); --grid-only skips the second round around the three fastest plans.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np

import sparsert_cli as sparsert
from sparsert_cli.api import compile_plans, plan_layers
from sparsert_cli.families.immediate import fit_params
from sparsert_cli.problem_shape import PRECISIONS

parser = argparse.ArgumentParser()
parser.add_argument("problems", nargs="+")
parser.add_argument("--precision", default="fp32")
parser.add_argument("--sparsity", type=float, default=0.9)
parser.add_argument("--budget", type=float, default=240.0, help="seconds; no layer starts after")
parser.add_argument("--out", default=None)
parser.add_argument("--rows", default="2,4,8,16,32")
parser.add_argument("--widths", default=None, help="default: 1,2,4 (fp16: 2,4,8)")
parser.add_argument("--threads", default="32,64,128,256")
parser.add_argument("--pattern", default="uniform", choices=("uniform", "pruned"))
parser.add_argument("--grid-only", action="store_true", help="no second round around the best")
args = parser.parse_args()


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


WIDTHS = ints(args.widths) if args.widths else {"fp32": (1, 2, 4), "bf16": (1, 2, 4),
                                               "fp16acc32": (1, 2, 4),
                                               "fp16": (2, 4, 8)}[args.precision]
started = time.monotonic()


def grid(layer) -> list:
    """rows x width x threads at k1 b8, skipping plans whose sums take over 64 registers or
    whose one tile is over twice the layer's columns, and widths the layer's shape narrows
    (3x3 layers: one column, or a pair with pair windows)."""
    columns = layer.geometry.columns
    out, seen = [], set()
    for rows in ints(args.rows):
        for width in WIDTHS:
            for threads in ints(args.threads):
                if rows * width > 64 or width * threads > 2 * max(columns, 64):
                    continue
                params = sparsert.PlanParams(rows_per_group=rows, vector_width=width,
                                             col_threads=threads, k_split=1)
                fitted = fit_params(layer.geometry, params, PRECISIONS[args.precision][0])
                if fitted.vector_width == width and fitted.name() not in seen:
                    seen.add(fitted.name())
                    out.append(params)
    return out


def around(params) -> list:
    return [replace(params, load_batch=4), replace(params, load_batch=16),
            replace(params, load_batch=32), replace(params, grid_order="groups"),
            replace(params, k_split=2)]


def measure(problem: str, plans: list, gpu, inputs_cache: dict) -> list[dict]:
    layers, planned, rows = [], [], []
    for p in plans:       # a plan this layer cannot take (e.g. too much shared memory): a row
        layer = sparsert.problem_layer(problem, args.sparsity, pattern=args.pattern,
                                       precision=args.precision, plan=p)
        try:
            planned += plan_layers([layer], tuned=False)
        except sparsert.UserError as exc:
            fitted = fit_params(layer.geometry, p, PRECISIONS[args.precision][0])
            rows.append({"problem": problem, "sparsity": args.sparsity,
                         "precision": args.precision, "pattern": args.pattern,
                         "plan": fitted.name(),
                         "error": exc.message})
            continue
        layers.append(layer)
    kernels = compile_plans(layers, planned, arch="sm_90")
    for kernel in kernels:
        row = {"problem": problem, "sparsity": args.sparsity, "precision": args.precision,
               "pattern": args.pattern}
        if not isinstance(kernel, sparsert.Kernel):
            row["error"] = str(kernel).splitlines()[0]
        else:
            if problem not in inputs_cache:
                x, res = kernel.random_inputs(np.random.default_rng(0))
                inputs_cache[problem] = (x, res, *kernel.reference(x, res))
            result = sparsert.benchmark_layer(gpu, kernel, inputs=inputs_cache[problem],
                                              baselines=False)
            row.update(plan=kernel.plan.params.name(), registers=kernel.resources.registers,
                       spill=kernel.resources.spills, cubin_bytes=len(kernel.cubin),
                       grid=list(kernel.plan.grid), ok=result["verify_gpu"]["ok"],
                       us=result.get("sparsert", {}).get("median_us"))
            row["params"] = kernel.plan.params
        rows.append(row)
    return rows


def emit(row: dict) -> None:
    params = row.pop("params", None)
    text = json.dumps(row)
    print(text, flush=True)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text + "\n")
    if params is not None:
        row["params"] = params


with sparsert.Gpu() as gpu:
    cache: dict = {}
    for problem in args.problems:
        if time.monotonic() - started > args.budget:
            print(json.dumps({"problem": problem, "skipped": "budget"}), flush=True)
            continue
        layer = sparsert.problem_layer(problem, args.sparsity, pattern=args.pattern,
                                       precision=args.precision)
        first = measure(problem, grid(layer), gpu, cache)
        for row in first:
            emit(row)
        good = sorted((r for r in first if r.get("ok") and r.get("us")), key=lambda r: r["us"])
        seen = {r["plan"] for r in first if "plan" in r}
        extra = [] if args.grid_only else [p for r in good[:3] for p in around(r["params"])
                                           if p.name() not in seen]
        for row in measure(problem, extra, gpu, cache) if extra else []:
            emit(row)
        best = min((r for r in first if r.get("ok") and r.get("us")), key=lambda r: r["us"],
                   default=None)
        print(json.dumps({"problem": problem, "done_s": round(time.monotonic() - started, 1),
                          "grid_best": best and best["plan"]}), flush=True)
