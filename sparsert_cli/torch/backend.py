"""The one place sparsert_cli.torch reaches into the kernel library: compile_layer() and
tune_layer(), both through the public API and the tuning job machinery."""

from __future__ import annotations

import numpy as np


def compile_layer(weight: np.ndarray, *, op: str, input_shape=None, n: int | None = None,
                  stride: int = 1, padding: int = 0, dtype: str = "fp32",
                  epilogue: dict | None = None, tuned=None, arch: str | None = None,
                  cache: bool = True):
    """A compiled kernel for one layer: gemm (weight M x K, activations K x N) or conv (weight
    M x C x R x S, input_shape (B, C, H, W)); epilogue {"bias", "activation", "residual"}."""
    from sparsert_cli.api import compile_kernel

    epilogue = epilogue or {}
    if op == "gemm":
        return compile_kernel(weight, op="gemm", n=n, dtype=dtype, epilogue=epilogue,
                              tuned=tuned, arch=arch, cache=cache)
    return compile_kernel(weight, op="conv", input_shape=tuple(input_shape), stride=stride,
                          padding=padding, dtype=dtype, epilogue=epilogue, tuned=tuned,
                          arch=arch, cache=cache)


def tune_layer(weight: np.ndarray, *, op: str, label: str, input_shape=None, n=None,
               stride: int = 1, padding: int = 0, dtype: str = "fp32",
               epilogue: dict | None = None, tuned=None, arch: str | None = None,
               limit: int = 16, device: int = 0, db_path=None, measure=None) -> dict:
    """Tune one layer on GPU `device` (one spawned measure worker, as `sparsert tune`): every
    candidate compiled, verified element-wise and timed, every measurement kept in the tuning
    database (`db_path`, default as `sparsert tune`), the winner recorded in the tuned-plan JSON
    `tuned` (a path, a TunedDB, or None: ./configs/tuned.json), keyed exactly as
    compile_layer(plan="auto") looks it up. `measure` replaces the GPU timer (tests). Returns
    the summary row of the case (status, best plan, us, default_us)."""
    from sparsert_cli.api import Layer
    from sparsert_cli.executors import run_jobs
    from sparsert_cli.executors.local import LocalExecutor
    from sparsert_cli.jobs import CaseSpec, Job, current_family, winners
    from sparsert_cli.paths import tuned_db_path
    from sparsert_cli.patterns import pattern_hash, to_csr
    from sparsert_cli.problems import Problem
    from sparsert_cli.tune import TunedDB, candidates, shape_key
    from sparsert_cli.tunedb import TuneDB, default_db_path

    layer = Layer.of(label, weight, op=op, input_shape=input_shape, n=n, stride=stride,
                     padding=padding, epilogue=epilogue, dtype=dtype)
    g = layer.geometry
    if op == "gemm":
        problem = Problem(label, "gemm", g.out_channels, g.in_channels, height=1, width=g.width)
    else:
        problem = Problem(label, f"conv{g.kernel}x{g.kernel}", g.out_channels, g.in_channels,
                          height=g.height, width=g.width, batch=g.batch, stride=g.stride,
                          padding=g.padding)
    nnz = to_csr(layer.weight).nnz
    case = CaseSpec(0, problem, 1.0 - nnz / (g.out_channels * g.taps), layer.weight,
                    layer.epilogue, layer.precision, pattern_hash(layer.weight), shape_key(g))
    jobs = [Job(0, i, params) for i, params in
            enumerate(candidates(g, nnz, limit, layer.precision))]
    family = current_family("ptx")
    db = tuned if isinstance(tuned, TunedDB) else TunedDB(tuned_db_path(tuned or None, True))
    executor = LocalExecutor([device], "ptx", arch, measure=measure)
    with TuneDB(db_path or default_db_path()) as store:
        stats = run_jobs(executor, lambda gpu: ([case], jobs), store, family)
        (entry,) = winners([case], jobs, store, stats["gpu"], family)
    if entry["status"] == "ok":
        db.record(case.pattern_hash, g, stats["gpu"]["gpu_name"], case.precision,
                  entry["params"], {"us": entry["us"], "default_us": entry["default_us"],
                                    "candidates": entry["candidates"], "problem": label},
                  *family)
        db.save()
    return entry
