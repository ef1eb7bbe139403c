"""Does the activation tile each SM walks bound the large streamed layers? (a perf experiment)

Times streamed-family GEMMs of one row count and the same nonzeros per row, but a smaller K
(denser rows): the loop's work per SM is unchanged, only the activation tile (K x N) shrinks.
Every kernel is verified on the GPU before it is timed. One JSON line per case to stdout/--out.

  python scripts/footprint_probe.py [--out FILE] CASE...
  CASE: M,K,N,DENSITY,PRECISION[:FIELD=VALUE,...]   e.g. 3072,192,128,0.4,fp16:warps=4
        (the streamed default for that shape, with the named StreamParams fields changed)
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np

import sparsert_cli as sparsert
from sparsert_cli.families.streamed import default_params
from sparsert_cli.families.streamed.plan import StreamParams

parser = argparse.ArgumentParser()
parser.add_argument("cases", nargs="+")
parser.add_argument("--out", default=None)
args = parser.parse_args()

layers = []
for text in args.cases:
    spec, _, fields = text.partition(":")
    m, k, n, density, precision = spec.split(",")
    m, k, n, density = int(m), int(k), int(n), float(density)
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((m, k)).astype(np.float32)
    weight[rng.random(weight.shape) >= density] = 0
    layer = sparsert.Layer.of(text, weight, op="gemm", n=n, dtype=precision)
    base = default_params(layer.geometry, int(np.count_nonzero(weight)),
                          precision=layer.precision)
    changes = dict(item.split("=") for item in fields.split(",") if item)
    params = replace(base, **{f: v if f in StreamParams.TEXT else int(v)
                              for f, v in changes.items()})
    layers.append(replace(layer, plan=params, family="streamed"))

kernels = sparsert.compile_kernels(layers, arch="sm_90", tuned=False)
with sparsert.Gpu() as gpu:
    for layer, kernel in zip(layers, kernels):
        row = {"case": layer.label, "nnz": int(np.count_nonzero(layer.weight))}
        if not isinstance(kernel, sparsert.Kernel):
            row["error"] = str(kernel).splitlines()[0]
        else:
            row["plan"] = kernel.plan.params.name()
            result = sparsert.benchmark_layer(gpu, kernel, baselines=False)
            row.update(registers=kernel.resources.registers, ok=result["verify_gpu"]["ok"],
                       us=result.get("sparsert", {}).get("median_us"))
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:       # appended as measured: a crash later loses no measured case
            with open(args.out, "a") as fh:
                fh.write(line + "\n")
