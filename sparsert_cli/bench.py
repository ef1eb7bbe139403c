"""The benchmark of a config as a library function: every layer planned and compiled (through
the public API), verified on the CPU and, with a GPU, verified again, timed against the
baselines and summarised. `run_benchmark` returns the results document (kind "bench"); the
`bench` command only parses, calls it and renders."""

from __future__ import annotations

import datetime
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__, results
from .api import Kernel, compile_plans, config_layer, plan_layers, verify_plan
from .benchmark import BASELINE_ORDER, benchmark_layer, measure_floors
from .cache import KernelCache
from .config import Config
from .errors import UserError
from .families import family_of
from .families.base import params_key
from .patterns import case_seed, count_nonzeros, generate, pattern_hash
from .problems import Problem

DEFAULT_TARGET_GPU = "NVIDIA H100 80GB HBM3"
Progress = Callable[[str, int, int, str], None]   # (stage, done, total, item)


def git_commit() -> str | None:
    """HEAD of the checkout, with "+dirty" when tracked files differ from it (a GPU host gets a
    copy of the working tree whose .git may lag behind: the suffix says the hash is not exact).
    $SPARSERT_GIT_COMMIT, when set, wins: the sender of such a copy knows the real commit."""
    if os.environ.get("SPARSERT_GIT_COMMIT"):
        return os.environ["SPARSERT_GIT_COMMIT"].strip()
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
    return {"kind": config.kind, "schema": results.SCHEMA, "sparsert_version": __version__,
            "git_commit": git_commit(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": {"name": config.name, "path": config.path, "hash": config.digest(),
                       "dtype": config.dtype, "accumulate": config.accumulate,
                       "pattern": config.pattern, "seed": config.seed,
                       "emit": config.emit},
            "host": {"python": platform.python_version(), "machine": platform.machine(),
                     "cpus": os.cpu_count()},
            "mode": mode, **(extra or {})}


def layer_record(problem: Problem, sparsity: float, layer, result) -> dict:
    """The compile part of a case's record, from a Kernel or a KernelFailure."""
    plan = result.plan
    rec = {"problem": problem.id, "sparsity": sparsity, "op": problem.op,
           "shape": problem.shape_text(), "m": problem.m, "k": problem.k, "n": problem.n,
           "batch": problem.batch, "stride": problem.stride, "padding": problem.padding,
           "nnz": plan.nnz, "pattern_hash": pattern_hash(layer.weight),
           "plan": plan.params.name(), "family": family_of(plan).name,
           "params": params_key(plan.params),
           "tuned": result.tuned, "grid": list(plan.grid), "block": list(plan.block)}
    flushed = count_nonzeros(layer.weight) - plan.nnz
    if flushed:
        rec["fp16_flushed"] = flushed
    if isinstance(result, Kernel):
        rec["compile"] = {"ok": True, "seconds": round(result.compile_seconds, 3),
                          "cached": result.cached, "registers": result.resources.registers,
                          "spill_bytes": result.resources.spills,
                          "cubin_bytes": len(result.cubin)}
    else:
        rec["compile"] = {"ok": False, "error": str(result).splitlines()[0]}
    return rec


def record_ok(record: dict, on_gpu: bool) -> bool:
    """Compiled, verified on the CPU and, on a GPU run, verified on the GPU."""
    if not record.get("compile", {}).get("ok") or not record.get("verify_cpu", {}).get("ok"):
        return False
    return not on_gpu or record.get("verify_gpu", {}).get("ok", False)


def _layers(config: Config, tuned, gpu_name: str, arch: str | None = None):
    """Layers and their plans (for `arch`); a case that cannot be planned is a UserError naming
    it."""
    layers, planned = [], []
    for problem, sparsity in config.cases():
        where = f"{config.path} [{problem.id} @ {sparsity:g}]"
        try:
            check_budget(problem, sparsity)
            layer = config_layer(config, problem, sparsity,
                                 generate(problem, sparsity, config.pattern, config.seed))
            planned += plan_layers([layer], tuned, gpu_name, config.emit, labels=False,
                                   arch=arch)
        except UserError as exc:   # e.g. plan overrides that do not fit this layer
            raise UserError(f"{where}: {exc.message}") from None
        except MemoryError:
            raise UserError(f"{where}: out of memory while generating and planning") from None
        layers.append(layer)
    return layers, planned


class BenchMeasure:
    """One case's GPU part (benchmark_layer: verify on the GPU, time, baselines) against the
    floors open() measured once on this process's GPU. In-process (`gpu` given) or pickled into
    a `bench --gpus` worker, where the kernel arrives light (cubin and launch data, no plan or
    weights: see light()) and both are rebuilt from the config and the case's seed."""

    def __init__(self, config: Config, cold_l2: bool = False, baselines: bool = True, gpu=None):
        self.config, self.cold_l2, self.baselines = config, cold_l2, baselines
        self.gpu, self.floors, self._own = gpu, None, False

    def __getstate__(self) -> dict:
        return {**self.__dict__, "gpu": None, "_own": False}

    def open(self) -> dict:
        """{"gpu": the GPU's info, "floors": measure_floors}: once per process."""
        if self.gpu is None:
            from .gpu.runtime import Gpu
            self.gpu, self._own = Gpu(0), True     # the one CUDA_VISIBLE_DEVICES shows
        self.floors = measure_floors(self.gpu)
        return {"gpu": self.gpu.info(), "floors": self.floors}

    def kernel(self, index: int, kernel: Kernel) -> Kernel:
        """`kernel` with its plan and weight: a light one gets them rebuilt (same entry)."""
        if kernel.plan is not None:
            return kernel
        from dataclasses import replace

        from .api import plan_for

        problem, sparsity = self.config.cases()[index]
        layer = config_layer(self.config, problem, sparsity)
        plan, _ = plan_for(replace(layer, plan=kernel.plan_params), False, None,
                           kernel.emitter)
        if plan.entry != kernel.entry:
            raise RuntimeError(f"{layer.label}: the rebuilt plan is {plan.entry}, the kernel "
                               f"{kernel.entry}")
        return replace(kernel, plan=plan, weight=layer.weight)

    def __call__(self, index: int, kernel: Kernel) -> dict:
        problem, sparsity = self.config.cases()[index]
        rng = np.random.default_rng(case_seed(self.config.seed, problem.id, sparsity,
                                              "gpu-verify"))
        return self.benchmark(self.kernel(index, kernel), rng)

    def benchmark(self, kernel: Kernel, rng: np.random.Generator) -> dict:
        return benchmark_layer(self.gpu, kernel, floors=self.floors, rng=rng,
                               cold_l2=self.cold_l2, baselines=self.baselines)

    def close(self) -> None:
        if self._own and self.gpu is not None:
            self.gpu.close()
        self.gpu = None


def light(kernel: Kernel) -> Kernel:
    """What crosses the pipe to a bench worker: the cubin and launch data, no plan or weight."""
    from dataclasses import replace

    return replace(kernel, plan=None, weight=None, _source=None)


def _start_pool(gpu_ids, measure, tick):
    """Spawn the bench workers (each opens its GPU and measures its floors) and check that they
    are one model of GPU."""
    from .executors.cases import CasePool

    pool = CasePool(gpu_ids, measure)
    tick("gpus", 0, len(gpu_ids), "starting a worker per GPU, measuring floors")
    infos = pool.start()
    names = sorted({i["gpu"]["name"] for i in infos})
    if len(names) > 1:
        pool.stop()
        raise UserError(f"--gpus: GPUs of different models ({' / '.join(names)}); benchmark "
                        f"each model on its own with --gpus")
    tick("gpus", len(gpu_ids), len(gpu_ids), names[0])
    return pool, infos


def _compile(config: Config, tuned, gpu_name: str, arch: str, cache, jobs, tick):
    """Plan, compile and verify on the CPU every case: (cases, layers, kernels, records)."""
    cases = config.cases()
    layers, planned = _layers(config, tuned if tuned is not None else False, gpu_name, arch)
    tick("plan", len(layers), len(layers))
    done = [0]

    def compiled(i, result):
        done[0] += 1
        tick("compile", done[0], len(layers), f"{layers[i].label} " + (
            "cached" if getattr(result, "cached", False) else
            f"{getattr(result, 'compile_seconds', 0.0):.1f}s"))

    tick("compile", 0, len(layers))
    kernels = compile_plans(layers, planned, emit=config.emit, arch=arch, cache=cache,
                            jobs=jobs, on_done=compiled)
    records = []
    for i, ((problem, sparsity), layer, kernel) in enumerate(zip(cases, layers, kernels)):
        record = layer_record(problem, sparsity, layer, kernel)
        if isinstance(kernel, Kernel):
            rng = np.random.default_rng(case_seed(config.seed, problem.id, sparsity,
                                                  "cpu-verify"))
            record["verify_cpu"] = verify_plan(kernel.plan, layer.weight, rng)
            record["verify_cpu"].pop("checks", None)
        records.append(record)
        tick("verify", i + 1, len(layers), layer.label)
    return cases, layers, kernels, records


def run_benchmark(config: Config, *, gpu=None, gpu_name: str = DEFAULT_TARGET_GPU,
                  arch: str | None = "sm_90", tuned=None, cache: KernelCache | None = None,
                  jobs: int | None = None, cold_l2: bool = False, baselines: bool = True,
                  on_progress: Progress | None = None, gpu_ids: list[int] | None = None,
                  measure=None) -> dict:
    """The whole benchmark of a config as one results document (kind "bench"): plan and compile
    every layer (tuned plans from `tuned`, a TunedDB, or none), verify each on the CPU, and with
    a `gpu` measure floors, then verify on the GPU, time and run the baselines
    (benchmark_layer). Records are built here and returned; a failing case is recorded (and
    listed in "failures"), never raised.
    `gpu_ids` (device numbers, as `--gpus` gives them): the GPU part of the cases runs in one
    spawned worker per GPU instead (executors/cases.py), each with its own floors; the
    document gains "gpus" (per slot: device, info, floors, cases, rate) and every record a
    "gpu_slot"; "gpu" and "floors" are slot 0's; `arch` None: the workers' GPU's. `measure`
    replaces BenchMeasure (tests: a fake GPU)."""
    def tick(stage, done, total, item=""):
        if on_progress:
            on_progress(stage, done, total, item)

    pool = infos = None
    if gpu_ids:
        pool, infos = _start_pool(gpu_ids, measure or BenchMeasure(config, cold_l2, baselines),
                                  tick)
        gpu_name, arch = infos[0]["gpu"]["name"], arch or infos[0]["gpu"].get("arch")
    try:
        cases, layers, kernels, records = _compile(config, tuned, gpu_name, arch or "sm_90",
                                                   cache, jobs, tick)
        extra = {"arch": arch or "sm_90", "cold_l2": cold_l2, "target_gpu": gpu_name}
        todo = {i for i, r in enumerate(records) if r.get("verify_cpu", {}).get("ok")}
        if pool is not None:
            started, finished = time.perf_counter(), [0]
            tick("time", 0, len(todo))

            def on_result(index, part, slot):
                records[index].update(part, gpu_slot=slot)
                finished[0] += 1
                tick("time", finished[0], len(todo), layers[index].label)
            pool.run([(i, light(kernels[i])) for i in sorted(todo)], on_result)
            wall = time.perf_counter() - started
            extra.update(gpu=infos[0]["gpu"], floors=infos[0]["floors"],
                         gpus=[{**stat, "gpu": info["gpu"], "floors": info["floors"]}
                               for stat, info in zip(pool.stats(), infos)],
                         measure_wall_seconds=round(wall, 3))
        elif gpu is not None or measure is not None:
            measure = measure or BenchMeasure(config, cold_l2, baselines, gpu)
            tick("floors", 0, 1, "peak FLOP/s, bandwidth, launch")
            info = measure.open()
            tick("floors", 1, 1)
            extra.update(gpu=info["gpu"], floors=info["floors"])
            try:
                for i in range(len(layers)):
                    tick("time", i, len(layers), layers[i].label)
                    try:
                        if i in todo:
                            records[i].update(measure(i, kernels[i]))
                    except Exception as exc:  # noqa: BLE001 - recorded per case
                        records[i]["verify_gpu"] = {"ok": False, "message":
                                                    f"{type(exc).__name__}: {exc}"}
                    tick("time", i + 1, len(layers), layers[i].label)
            finally:
                measure.close()
    finally:
        if pool is not None:
            pool.stop()
    on_gpu = "gpu" in extra
    if on_gpu:
        extra["timing"] = {"per_graph": 20, "replays": 10, "warmup": 3,
                           "method": "CUDA graph replay, median per launch"}
    extra["precision"] = config.precision
    doc = {**metadata(config, "gpu" if on_gpu else "compile-only", extra), "cases": records}
    doc["failures"] = [f"{r['problem']}@{r['sparsity']:g}" for r in records
                       if not record_ok(r, on_gpu)]
    if on_gpu:
        doc["geomean"] = summarize(records)
        ops = {r["op"] for r in records}
        if "gemm" in ops and ops - {"gemm"}:   # the convolutions alone (fp16 target population)
            doc["geomean_convs"] = summarize(records, tuple(sorted(ops - {"gemm"})))
    return doc
