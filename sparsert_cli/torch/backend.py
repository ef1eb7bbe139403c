"""The one place sparsert_cli.torch reaches into the kernel library: compile_layers() (plan
every layer, compile them all across processes), block_diagonal() and tune_layer(), through the
public API and the tuning job machinery."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LayerSpec:
    """One layer to compile, as api.compile_kernel takes it: gemm (weight M x K, activations
    K x N) or conv (weight M x C x R x S, input_shape (B, C, H, W)); weight numpy or
    block_diagonal(); epilogue {"bias", "activation", "residual", "token_major", "planes"};
    family "auto" (a tuned winner of any family, else the cost model's pick) or one family's
    name."""

    label: str
    weight: object
    op: str
    input_shape: tuple | None = None
    n: int | None = None
    stride: int = 1
    padding: int = 0
    epilogue: dict | None = None
    family: str = "auto"


def block_diagonal(weight: np.ndarray):
    """A depthwise weight (C x 1 x R x S) as the C x C x R x S convolution weight it stands for
    (row c holds filter c on input channel c, R*S nonzeros per row), kept sparse (a
    patterns.SparseWeight: no C*C*R*S dense array)."""
    import scipy.sparse as sp

    from sparsert_cli.patterns import SparseWeight

    c, one, r, s = weight.shape
    if one != 1:
        raise ValueError(f"a depthwise weight is C x 1 x R x S, got {weight.shape}")
    taps = r * s
    cols = np.arange(c)[:, None] * taps + np.arange(taps)[None, :]
    csr = sp.csr_matrix((np.asarray(weight, np.float32).reshape(c, taps).ravel(),
                         (np.repeat(np.arange(c), taps), cols.ravel())), shape=(c, c * taps))
    csr.eliminate_zeros()
    csr.sort_indices()
    return SparseWeight(csr, (c, c, r, s))


def compile_layers(specs: list[LayerSpec], *, dtype: str = "fp32", tuned=None,
                   arch: str | None = None, cache: bool = True, jobs: int | None = None,
                   on_done=None, stats: dict | None = None,
                   dependent_launch: bool | None = None) -> list:
    """Plan every layer, then compile them all across processes (api.compile_plans: cache hits
    served here, the rest in `jobs` workers). Per spec, in order: a Kernel, or a string saying
    why there is none (a planning error or a compile failure). on_done(index, result) as each
    finishes; stats receives plan_seconds and compile_seconds. dependent_launch: as
    compile_plans (None: where the arch has it; a model's kernels run one after another)."""
    import time
    from dataclasses import replace

    from sparsert_cli.api import KernelFailure, Layer, compile_plans, plan_layers
    from sparsert_cli.errors import UserError
    from sparsert_cli.gpu.runtime import detect_arch, detect_gpu_name
    from sparsert_cli.tune import TunedDB

    started = time.perf_counter()
    target = arch or detect_arch()      # plans a block of the target holds (costmodel.choose)
    db = False if tuned is False else tuned if isinstance(tuned, TunedDB) else (
        TunedDB(tuned) if tuned else TunedDB())
    gpu_name = detect_gpu_name()
    out: list = [None] * len(specs)
    layers, planned, where = [], [], []
    for i, spec in enumerate(specs):
        try:
            layer = Layer.of(spec.label, spec.weight, op=spec.op, input_shape=spec.input_shape,
                             n=spec.n, stride=spec.stride, padding=spec.padding,
                             epilogue=spec.epilogue, dtype=dtype)
            if spec.family != "auto":
                layer = replace(layer, family=spec.family)
            planned += plan_layers([layer], db, gpu_name, labels=False, arch=target)
        except UserError as exc:
            out[i] = f"no kernel: {exc.message}"
            if on_done:
                on_done(i, out[i])
            continue
        layers.append(layer)
        where.append(i)
    if stats is not None:
        stats["plan_seconds"] = time.perf_counter() - started

    def done(j, kernel):
        i = where[j]
        out[i] = (f"compile failed: {str(kernel.error).splitlines()[0]}"
                  if isinstance(kernel, KernelFailure) else kernel)
        if on_done:
            on_done(i, out[i])

    if layers:
        compile_plans(layers, planned, arch=arch, cache=cache, jobs=jobs, on_done=done,
                      dependent_launch=dependent_launch,
                      stats=stats)
    elif stats is not None:
        stats["compile_seconds"] = 0.0
    return out


def tune_layer(weight: np.ndarray, *, op: str, label: str, input_shape=None, n=None,
               stride: int = 1, padding: int = 0, dtype: str = "fp32",
               epilogue: dict | None = None, tuned=None, arch: str | None = None,
               limit: int = 16, device: int = 0, db_path=None, measure=None,
               family: str = "auto") -> dict:
    """Tune one layer on GPU `device` (one spawned measure worker, as `sparsert tune`): every
    candidate compiled, verified element-wise and timed, every measurement kept in the tuning
    database (`db_path`, default as `sparsert tune`), the winner recorded in the tuned-plan JSON
    `tuned` (a path, a TunedDB, or None: ./configs/tuned.json), keyed exactly as
    compile_layers() (plan "auto") looks it up. `measure` replaces the GPU timer (tests).
    `family`: as LayerSpec's (a token-major or GELU layer's "auto" is the streamed family).
    Returns the summary row of the case (status, best plan, us, default_us)."""
    from dataclasses import replace

    from sparsert_cli.api import Layer
    from sparsert_cli.build import layer_family
    from sparsert_cli.executors import run_jobs
    from sparsert_cli.executors.local import LocalExecutor
    from sparsert_cli.jobs import CaseSpec, Job, case_candidates, current_family, winners
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
    csr = to_csr(layer.weight)
    nnz = csr.nnz
    # A token-major layer (a Linear layer, streamed family only) is tuned as the same loop with
    # its output channel-major: the winner is keyed by pattern, shape and family, not layout,
    # and the token-major kernel takes it (plan_for) without a second set of measurements
    token_major = layer.epilogue.token_major
    case_epilogue = (replace(layer.epilogue, token_major=False, planes=0) if token_major
                     else layer.epilogue)
    case = CaseSpec(0, problem, 1.0 - nnz / (g.out_channels * g.taps), layer.weight,
                    case_epilogue, layer.precision, pattern_hash(layer.weight), shape_key(g))
    if layer_family(layer.epilogue, family) == "streamed":
        from sparsert_cli.gpu.runtime import detect_arch

        pairs = case_candidates(g, csr, layer.precision, limit, family="streamed",
                                arch=arch or detect_arch())
        family = pairs[0][0]
        jobs = [Job(0, i, params) for i, (_, params) in enumerate(pairs)]
    else:
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
