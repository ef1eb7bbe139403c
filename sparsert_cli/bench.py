"""The benchmark: for every case of a config, generate, compile, verify, and time against the
baselines, all in one process and with one timing function. Results are plain dicts (JSON)."""

from __future__ import annotations

import datetime
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__, results
from .build import KernelBuild, build_all, epilogue_for, geometry_for, make_plan
from .cache import KernelCache
from .config import Config
from .errors import UserError
from .interp import execute
from .patterns import (Weight, case_seed, count_nonzeros, dense, generate, pattern_hash,
                       to_csr)
from .families.immediate import Plan
from .problems import Problem
from .reference import check, conv_reference

VERIFY_CHECKS = 2          # fresh random inputs each
DEFAULT_TARGET_GPU = "NVIDIA H100 80GB HBM3"
BASELINE_ORDER = ("cublas_fp32", "cublas_tf32", "cublas_fp16", "cusparse", "cudnn_fp32",
                  "cudnn_fp16", "im2col_cusparse")


@dataclass
class Case:
    problem: Problem
    sparsity: float
    weight: Weight                # dense array, or SparseWeight for sparse sources
    plan: Plan
    tuned: bool = False
    flushed: int = 0              # fp16 weights dropped because they round to zero
    build: KernelBuild | Exception | None = None
    result: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.problem.id}@{self.sparsity:g}"


def git_commit() -> str | None:
    """HEAD of the checkout, with "+dirty" when tracked files differ from it (a GPU host gets a
    copy of the working tree whose .git may lag behind: the suffix says the hash is not exact)."""
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0 or not out.stdout.strip():
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=root, capture_output=True, text=True, timeout=10)
        dirty = status.returncode != 0 or bool(status.stdout.strip())
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def check_budget(problem: Problem, sparsity: float, verify: bool = True) -> None:
    """Refuse, from the shape alone, a case far beyond this machine (before any array exists)."""
    from . import limits
    from .patterns import GENERATE_DENSE_LIMIT, expected_nonzeros

    size = problem.m * problem.k
    nnz = expected_nonzeros(size, sparsity)
    limits.check_nonzeros(nnz)
    estimate = limits.case_memory(problem.m, problem.k, problem.n, math.prod(problem.input_shape),
                                  math.prod(problem.output_shape), nnz,
                                  size <= GENERATE_DENSE_LIMIT, verify)
    limits.check_memory(estimate, f"a {problem.m}x{problem.k} weight with {nnz} nonzeros at "
                                  f"N={problem.n}")


def prepare(config: Config, gpu_name: str, tuned_db=None) -> list[Case]:
    """Weights and plans for every case (tuned parameters where the database has them)."""
    cases = []
    for problem, sparsity in config.cases():
        where = f"{config.path} [{problem.id} @ {sparsity:g}]"
        try:
            check_budget(problem, sparsity)
            weight = generate(problem, sparsity, config.pattern, config.seed)
            params, tuned = None, False
            if tuned_db is not None:
                params = tuned_db.lookup(pattern_hash(weight), geometry_for(problem), gpu_name,
                                         config.precision)
                tuned = params is not None
            epilogue = epilogue_for(problem, config.epilogue, config.seed, sparsity)
            plan = make_plan(problem, weight, params, epilogue,
                             overrides=None if tuned else config.plan,
                             precision=config.precision,
                             allow_fp16_flush=config.allow_fp16_flush)
        except UserError as exc:   # e.g. plan overrides that do not fit this layer
            raise UserError(f"{where}: {exc.message}") from None
        except MemoryError:
            raise UserError(f"{where}: out of memory while generating and planning") from None
        cases.append(Case(problem, sparsity, weight, plan, tuned,
                          flushed=count_nonzeros(weight) - plan.nnz))
    return cases


def compile_cases(cases: list[Case], emitter: str, arch: str, cache: KernelCache | None,
                  jobs: int | None, on_done: Callable | None = None) -> None:
    def done(i, build, seconds):
        cases[i].build = build
        if on_done:
            on_done(cases[i], build, seconds)

    build_all([c.plan for c in cases], emitter, arch, cache, jobs, done)


def random_inputs(case: Case, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Standard-normal x (and residual), float32 arrays holding values of the plan's storage type
    (fp16 plans get fp16-representable values: the kernel reads them exactly)."""
    p = case.problem
    store = storage(case)
    x = rng.standard_normal(p.input_shape).astype(store).astype(np.float32)
    res = (rng.standard_normal(p.output_shape).astype(store).astype(np.float32)
           if case.plan.epilogue.residual else None)
    return x, res


def storage(case: Case):
    """numpy type of the kernel's x / y / residual buffers."""
    return np.float16 if case.plan.dtype == "fp16" else np.float32


def reference(case: Case, x: np.ndarray, res: np.ndarray | None):
    p, epi = case.problem, case.plan.epilogue
    weight = dense(case.weight)
    ref = conv_reference(weight, x, p.stride, p.padding, epi.bias, res, epi.activation)
    mag = conv_reference(weight, x, p.stride, p.padding, epi.bias, res, absolute=True)
    return ref, mag


def verify_cpu(case: Case, seed: int) -> dict:
    """Execute the plan on the CPU (float64) and compare with the float64 reference."""
    rng = np.random.default_rng(case_seed(seed, case.problem.id, case.sparsity, "cpu-verify"))
    worst = 0.0
    for _ in range(VERIFY_CHECKS):
        x, res = random_inputs(case, rng)
        try:
            out = execute(case.plan, x, res)
        except AssertionError as exc:
            return {"ok": False, "max_err": None, "message": str(exc)}
        ref, mag = reference(case, x, res)
        ok, err, message = check(out, ref, mag, case.plan.dtype, case.problem.k)
        worst = max(worst, err)
        if not ok:
            return {"ok": False, "max_err": err, "message": message}
    return {"ok": True, "max_err": worst, "message": "ok"}


def floor_us(case: Case, floors: dict) -> dict:
    """The problem's floor: useful sparse flops at measured FP32 peak, bytes of the activations
    and outputs at measured bandwidth, and the measured launch floor; the largest wins.

    Half2 sums (precision fp16) count at twice the FP32 rate: HFMA2 issues like FFMA with two
    lanes (Hopper's non-tensor fp16 rate is documented as 2x fp32; not measured here)."""
    p, plan = case.problem, case.plan
    flops = 2.0 * plan.nnz * p.n / (2.0 if plan.precision == "fp16" else 1.0)
    nbytes = plan.element_bytes * (np.prod(p.input_shape) + np.prod(p.output_shape))
    terms = {"flops_us": flops / (floors["fp32_gflops"] * 1e3),
             "bytes_us": nbytes / (floors["bandwidth_gbs"] * 1e3),
             "launch_us": floors["launch_us"]}
    bound = max(terms, key=terms.get)
    return {"floor_us": terms[bound], "bound": bound.removesuffix("_us"), **terms}


def geomean(values: list[float]) -> float | None:
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summarize(cases: list[dict], ops: tuple[str, ...] | None = None) -> dict:
    """Geomean speedups per sparsity over verified cases (only problems of `ops` if given)."""
    out: dict = {}
    if ops is not None:
        cases = [c for c in cases if c.get("op") in ops]
    for s in sorted({c["sparsity"] for c in cases}):
        rows = [c for c in cases if c["sparsity"] == s]
        names = sorted({n for c in rows for n in c.get("speedup", {})},
                       key=lambda n: BASELINE_ORDER.index(n) if n in BASELINE_ORDER else 99)
        out[f"{s:g}"] = {n: geomean([c["speedup"].get(n) for c in rows
                                     if c.get("speedup", {}).get(n)]) for n in names}
        out[f"{s:g}"]["floor_pct"] = geomean([c.get("floor_pct") for c in rows])
        out[f"{s:g}"]["cases"] = len(rows)
    return out


def metadata(config: Config, mode: str, extra: dict | None = None) -> dict:
    return {"kind": config.kind, "schema": results.SCHEMA, "sparsert_version": __version__, "git_commit": git_commit(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": {"name": config.name, "path": config.path, "hash": config.digest(),
                       "dtype": config.dtype, "accumulate": config.accumulate,
                       "pattern": config.pattern, "seed": config.seed,
                       "emit": config.emit},
            "host": {"python": platform.python_version(), "machine": platform.machine(),
                     "cpus": os.cpu_count()},
            "mode": mode, **(extra or {})}


def case_record(case: Case) -> dict:
    p = case.problem
    build = case.build
    rec = {"problem": p.id, "sparsity": case.sparsity, "op": p.op, "shape": p.shape_text(),
           "m": p.m, "k": p.k, "n": p.n, "batch": p.batch, "stride": p.stride,
           "padding": p.padding, "nnz": case.plan.nnz, "pattern_hash": pattern_hash(case.weight),
           "plan": case.plan.params.name(), "params": dict(case.plan.params.__dict__),
           "tuned": case.tuned, "grid": list(case.plan.grid), "block": list(case.plan.block)}
    if case.flushed:
        rec["fp16_flushed"] = case.flushed
    if isinstance(build, KernelBuild):
        rec["compile"] = {"ok": True, "seconds": round(build.compile_seconds, 3),
                          "cached": build.cached, "registers": build.resources.registers,
                          "spill_bytes": build.resources.spills,
                          "cubin_bytes": len(build.cubin)}
    elif build is not None:
        rec["compile"] = {"ok": False, "error": str(build).splitlines()[0]}
    return rec


def run_gpu_case(gpu, case: Case, floors: dict, seed: int, cold_l2: bool,
                 baselines: bool = True, inputs=None, replays: int = 10) -> dict:
    """Verify the generated kernel on the GPU, time it, then every baseline (same inputs).

    `inputs` = (x, res, ref, magnitude) lets the tuner check many candidates of one case against
    one reference (one check each); otherwise VERIFY_CHECKS checks with fresh inputs each."""
    p, plan = case.problem, case.plan
    out: dict = {"baselines": {}}
    rng = np.random.default_rng(case_seed(seed, p.id, case.sparsity, "gpu-verify"))
    kernel = gpu.load(case.build.cubin, plan.entry)
    out["kernel"] = {"registers": kernel.registers, "local_bytes": kernel.local_bytes}
    x, res = (inputs[0], inputs[1]) if inputs else random_inputs(case, rng)
    store = storage(case)
    buffers = {"x": gpu.upload(x.astype(store)),
               "y": gpu.alloc(plan.element_bytes * int(np.prod(p.output_shape)))}
    if res is not None:
        buffers["res"] = gpu.upload(res.astype(store))
    if plan.geometry.masked:
        buffers["z"] = gpu.alloc(plan.element_bytes * plan.geometry.image_elems)
        gpu.memset(buffers["z"], 0)
    try:
        args = [buffers[a].ptr for a in plan.arguments]

        def launch():
            gpu.launch(kernel, plan.grid, plan.block, 0, args)

        worst, message = 0.0, "ok"
        for check_no in range(1 if inputs else VERIFY_CHECKS):
            if check_no:  # fresh inputs for every check
                x, res = random_inputs(case, rng)
                buffers["x"].free()
                buffers["x"] = gpu.upload(x.astype(store))
                if res is not None:
                    buffers["res"].free()
                    buffers["res"] = gpu.upload(res.astype(store))
                args = [buffers[a].ptr for a in plan.arguments]
            gpu.poison(buffers["y"])
            launch()
            y = gpu.download(buffers["y"], p.output_shape, store)
            ref, mag = (inputs[2], inputs[3]) if inputs else reference(case, x, res)
            ok, err, message = check(y, ref, mag, plan.dtype, p.k)
            worst = max(worst, err if math.isfinite(err) else float("inf"))
            if not ok:
                break
        out["verify_gpu"] = {"ok": ok, "max_err": worst, "message": message}
        if ok:
            timing = gpu.time(launch, cold_l2=cold_l2, replays=replays)
            out["sparsert"] = timing.as_dict()
        if baselines:
            out["baselines"] = run_baselines(gpu, case, x, cold_l2)
    finally:
        for buf in buffers.values():
            buf.free()
    fl = floor_us(case, floors)
    out.update(fl)
    mine = out.get("sparsert", {}).get("median_us")
    if mine:
        out["floor_pct"] = 100.0 * fl["floor_us"] / mine
        out["speedup"] = {name: b["median_us"] / mine for name, b in out["baselines"].items()
                          if b.get("ok") and b.get("median_us")}
    return out


def _baseline_specs(case: Case, x: np.ndarray):
    """(name, factory, reference, magnitude, dtype, k) for every baseline of this problem."""
    from .gpu import baselines as bl

    p, weight = case.problem, dense(case.weight)
    w2 = weight.reshape(p.m, -1).astype(np.float32)
    cols = bl.im2col64(x, p.kernel_size, p.kernel_size, p.stride, p.padding)
    b32 = cols.astype(np.float32)
    gemm_ref = w2.astype(np.float64) @ cols
    gemm_mag = np.abs(w2.astype(np.float64)) @ np.abs(cols)
    csr = to_csr(weight)
    specs = [
        ("cublas_fp32", lambda g: bl.CublasGemm(g, w2, b32, "fp32"), gemm_ref, gemm_mag, "fp32"),
        ("cublas_tf32", lambda g: bl.CublasGemm(g, w2, b32, "tf32"), gemm_ref, gemm_mag, "tf32"),
        ("cublas_fp16", lambda g: bl.CublasGemm(g, w2, b32, "fp16"), gemm_ref, gemm_mag, "fp16"),
        ("cusparse", lambda g: bl.CusparseSpmm(g, csr, b32), gemm_ref, gemm_mag, "fp32"),
    ]
    if p.op != "gemm":
        conv_ref, conv_mag = bl.conv_reference(x, weight, p.stride, p.padding)
        specs += [
            ("cudnn_fp32", lambda g: bl.CudnnConv(g, x, weight, p.stride, p.padding, "fp32"),
             conv_ref, conv_mag, "fp32"),
            ("cudnn_fp16", lambda g: bl.CudnnConv(g, x, weight, p.stride, p.padding, "fp16"),
             conv_ref, conv_mag, "fp16"),
        ]
        if p.kernel_size > 1 or p.stride > 1 or p.batch > 1:
            specs.append(("im2col_cusparse",
                          lambda g: bl.Im2colCusparse(g, x, csr, p.kernel_size, p.kernel_size,
                                                      p.stride, p.padding),
                          conv_ref, conv_mag, "fp32"))
    return specs


def run_baselines(gpu, case: Case, x: np.ndarray, cold_l2: bool) -> dict:
    from .gpu import baselines as bl

    results = {}
    for name, factory, ref, mag, dtype in _baseline_specs(case, x):
        started = time.perf_counter()
        try:
            with factory(gpu) as base:
                base.poison()
                base.enqueue()
                problem = bl.mismatch(base.output(), ref, mag, dtype, case.problem.k)
                entry = {"ok": not problem, "message": problem or "ok", "dtype": dtype,
                         "info": base.info}
                if not problem:
                    entry.update(gpu.time(base.enqueue, cold_l2=cold_l2).as_dict())
        except Exception as exc:  # noqa: BLE001 - a baseline that fails is recorded, not fatal
            entry = {"ok": False, "message": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                     if str(exc) else type(exc).__name__}
        entry["setup_seconds"] = round(time.perf_counter() - started, 3)
        results[name] = entry
    return results
