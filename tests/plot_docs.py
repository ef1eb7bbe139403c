"""Small synthetic results documents (sweep, tune, models) for the plot and report tests."""

from __future__ import annotations

import json

from sparsert_cli import results

# Geomean speedups per baseline at sparsity 0.5, 0.7, 0.9 (both problems alike): cuBLAS fp32
# crosses 1 between 0.7 and 0.9, TF32 is >= 1 throughout, cuSPARSE never gets there.
SWEEP_SPEEDUPS = {"cublas_fp32": (0.5, 0.8, 2.0), "cublas_tf32": (1.2, 1.5, 3.0),
                  "cusparse": (0.3, 0.5, 0.9)}
SPARSITIES = (0.5, 0.7, 0.9)


def _timing(median: float) -> dict:
    samples = [median * f for f in (0.97, 0.99, 1.0, 1.0, 1.01, 1.05)]
    return {"median_us": median, "p20_us": median, "p80_us": median, "samples_us": samples}


def sweep_doc(kind: str = "sweep", sparsities=SPARSITIES) -> dict:
    cases = []
    for problem in ("layer_a", "layer_b"):
        for i, s in enumerate(SPARSITIES):
            if s not in sparsities:
                continue
            mine = 10.0 * (1 - s) + 1.0
            speedup = {n: v[i] for n, v in SWEEP_SPEEDUPS.items()}
            cases.append({"problem": problem, "sparsity": s, "op": "gemm", "shape": "64x64",
                          "m": 64, "k": 64, "n": 128, "batch": 1, "nnz": int(4096 * (1 - s)),
                          "plan": "r1v1t64k1b8n", "verify_gpu": {"ok": True, "max_err": 0.0},
                          "sparsert": _timing(mine), "speedup": speedup,
                          "baselines": {n: {"ok": True, **_timing(mine * x)}
                                        for n, x in speedup.items()},
                          "bytes_us": 0.02, "floor_us": 1.0, "floor_pct": 100 / mine,
                          "bound": "launch"})
    return results.stamp({"config": {"name": "synthetic"}, "precision": "fp32",
                          "floors": {"fp32_gflops": 50000.0, "bandwidth_gbs": 3000.0,
                                     "launch_us": 1.0},
                          "gpu": {"name": "Test GPU", "nvml_driver": "1.2.3"},
                          "cases": cases}, kind)


def tune_doc() -> dict:
    cases = [{"problem": p, "sparsity": 0.9, "default_us": d, "best_us": b,
              "default_plan": "r1v1t64k1b8n", "best_plan": "r4v2t128k1b8n",
              "candidates": [{"plan": f"c{i}", "median_us": b + i * 0.5,
                              "family": "rows" if i % 2 else "stream"} for i in range(6)]}
             for p, d, b in (("layer_a", 4.0, 2.5), ("layer_b", 9.0, 6.0))]
    return results.stamp({"cases": cases}, "tune")


def models_doc() -> dict:
    layers = [{"name": "conv1", "dense_us": 5.0}, {"name": "pw1", "sparsert_us": 2.0},
              {"name": "pw2", "sparsert_us": 3.0}, {"name": "fc", "dense_us": 4.0},
              # run by pw2's kernel (as BERT's key and value by the query's): no time of its own
              {"name": "pw2b", "reason": "in pw2's kernel"}]
    return results.stamp({"models": [{"name": "tiny", "sparsert_us": 16.0,
                                      "layers": layers}]}, "models")


def write(tmp_path, doc, name: str):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path
