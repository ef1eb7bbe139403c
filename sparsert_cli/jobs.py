"""The tuning job model: (pattern, shape, precision, family@version, plan) -> compile -> measure.

A *case* is one layer of a config at one sparsity and precision; a *job* is one candidate plan
of a case. A compile job (CPU, any process or host) builds the plan, emits and compiles it
through the kernel cache and optionally executes the plan on the CPU against float64; a measure
job (one GPU) verifies the cubin element-wise against float64 with a poisoned output and times
it. Executors (executors/local.py, executors/ray_backend.py) move jobs between the two; this
module holds what they share: the job identity that resume and the database key on, the two job
functions, the measure object a GPU worker runs, and the winner selection.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Callable

import numpy as np

from .build import KernelBuild, build_kernel, epilogue_for, geometry_for, layer_family
from .families import family_of_params, get_family
from .families.base import params_key
from .families.immediate import PlanParams
from .problem_shape import PRECISIONS, Epilogue, Geometry
from .problems import Problem
from .tunedb import plan_json

# CUDA errors after which a context is unusable: the worker process must be replaced.
STICKY_ERRORS = ("CUDA_ERROR_ILLEGAL_ADDRESS", "CUDA_ERROR_LAUNCH_FAILED",
                 "CUDA_ERROR_ILLEGAL_INSTRUCTION", "CUDA_ERROR_MISALIGNED_ADDRESS",
                 "CUDA_ERROR_INVALID_ADDRESS_SPACE", "CUDA_ERROR_INVALID_PC",
                 "CUDA_ERROR_HARDWARE_STACK_ERROR", "CUDA_ERROR_LAUNCH_TIMEOUT",
                 "CUDA_ERROR_ECC_UNCORRECTABLE", "CUDA_ERROR_ASSERT",
                 "CUDA_ERROR_CONTEXT_IS_DESTROYED", "CUDA_ERROR_UNKNOWN")
TUNE_REPLAYS = 5
ATTEMPTS = 2          # a job whose worker dies is run once more, then recorded as failed


def current_family(emitter: str = "ptx") -> tuple[str, str]:
    """(family, version) of the kernels this sparsert emits (build.current_family)."""
    from .build import current_family as family_and_version

    return family_and_version(emitter)


def family_version(name: str, emitter: str = "ptx") -> tuple[str, str]:
    """(family, code version) of the family called `name` printed by `emitter`."""
    from .build import code_version

    return name, code_version(get_family(name), emitter)


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


def is_sticky(error: str) -> bool:
    return any(name in error for name in STICKY_ERRORS)


@dataclass(frozen=True)
class CaseSpec:
    """What every candidate of one case shares (sent with each compile job)."""

    index: int
    problem: Problem
    sparsity: float
    weight: np.ndarray = field(repr=False, compare=False)
    epilogue: Epilogue
    precision: str
    pattern_hash: str
    shape: str

    @property
    def key(self) -> str:
        return f"{self.problem.id}@{self.sparsity:g}"

    @property
    def geometry(self) -> Geometry:
        return geometry_for(self.problem)


@dataclass(frozen=True)
class Job:
    case: int            # CaseSpec.index
    candidate: int       # 0 is the untuned default (the cost model's choice)
    params: PlanParams   # or another family's parameters
    family: tuple[str, str] | None = None   # (family, code version); None: the run's default

    @property
    def id(self) -> tuple[int, int]:
        return (self.case, self.candidate)

    def family_of(self, default: tuple[str, str]) -> tuple[str, str]:
        return self.family or default

    def ident(self, case: CaseSpec, family: tuple[str, str]) -> tuple:
        """The job's identity in the database (tunedb.JOB_COLUMNS less GPU and driver);
        `family` is the run's default (name, version) for jobs that do not carry their own."""
        return (case.pattern_hash, case.shape, case.precision, *self.family_of(family),
                plan_json(params_key(self.params)))


@dataclass(frozen=True)
class LaunchSpec:
    """The part of a plan a GPU worker needs to launch and check a kernel (a Plan holds every
    load and can be large; this is a few numbers): what api.Kernel.from_launch needs."""

    entry: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    arguments: tuple[str, ...]
    geometry: Geometry
    element_bytes: int
    dtype: str
    accumulate: str
    precision: str
    nnz: int
    epilogue: Epilogue
    params: PlanParams
    shared_bytes: int = 0

    @classmethod
    def of(cls, plan) -> "LaunchSpec":
        return cls(plan.entry, tuple(plan.grid), tuple(plan.block), tuple(plan.arguments),
                   plan.geometry, plan.element_bytes, plan.dtype, plan.accumulate,
                   plan.precision, plan.nnz, plan.epilogue, plan.params, plan.shared_bytes)


@dataclass(frozen=True)
class Compiled:
    """A compile job's answer. `build` is None when planning or compiling failed (`error`)."""

    job: Job
    launch: LaunchSpec | None
    build: KernelBuild | None
    error: str | None = None
    cpu_verify: dict | None = None
    seconds: float = 0.0
    features: dict | None = None      # the plan's cost features (costmodel.py)

    @property
    def cubin_sha256(self) -> str | None:
        return hashlib.sha256(self.build.cubin).hexdigest() if self.build else None


@dataclass(frozen=True)
class MeasureJob:
    """What a GPU worker gets: the job, its case's problem and the compiled kernel."""

    job: Job
    case_key: str
    problem: Problem
    sparsity: float
    launch: LaunchSpec
    build: KernelBuild


def make_cases(configs, limit: int, seeds: Callable[[str, Geometry, str], list] = lambda *a: [],
               family: str = "auto", gpu_name: str | None = None,
               keep: Callable[[str, Geometry, str], list] = lambda *a: [],
               arch: str | None = None) -> tuple[list[CaseSpec], list[Job]]:
    """Every case of a config (or of several) and its candidate jobs: first the cost model's
    choice for `gpu_name` (the untuned default, so default-vs-best is measured in one run),
    then the candidates of every family that can choose (or of `family` alone; a GELU case's
    "auto" is the streamed family's, build.layer_family), taken in turn.
    `seeds(pattern_hash, geometry, precision)` gives plans to try right after the default (a
    layer's winners at other precisions); `keep(...)` gives the layer's current winners at this
    precision, measured right after the default whatever the limit, so a re-tuning run can only
    replace a winner by something faster in the same run. `arch`: only candidates a block of
    that target holds (costmodel.choose)."""
    from .patterns import generate, pattern_hash, to_csr
    from .tune import shape_key

    cases, jobs, seen = [], [], set()
    for config, problem, sparsity in ((c, p, s) for c in
                                      (configs if isinstance(configs, (list, tuple))
                                       else [configs]) for p, s in c.cases()):
        weight = generate(problem, sparsity, config.pattern, config.seed)
        geometry = geometry_for(problem)
        digest = pattern_hash(weight)
        if (digest, shape_key(geometry), config.precision) in seen:
            continue       # the same layer in two configs: one tuned key, tuned once
        seen.add((digest, shape_key(geometry), config.precision))
        case = CaseSpec(len(cases), problem, sparsity, weight,
                        epilogue_for(problem, config.epilogue, config.seed, sparsity),
                        config.precision, digest, shape_key(geometry))
        cases.append(case)
        cands = case_candidates(geometry, to_csr(weight), config.precision, limit,
                                tuple(seeds(digest, geometry, config.precision)),
                                layer_family(case.epilogue, family),
                                gpu_name, config.emit,
                                tuple(keep(digest, geometry, config.precision)), arch)
        jobs += [Job(case.index, i, params, fam) for i, (fam, params) in enumerate(cands)]
    return cases, jobs


def case_candidates(geometry: Geometry, csr, precision: str, limit: int, seeds: tuple = (),
                    family: str = "auto", gpu_name: str | None = None, emitter: str = "ptx",
                    keep: tuple = (), arch: str | None = None
                    ) -> list[tuple[tuple[str, str], object]]:
    """[((family, version), params)] of one case: the cost model's choice, the `keep` plans
    (current winners: always measured, beyond `limit` if need be), then each family's
    candidates in turn (its seeds among them), deduplicated, at most `limit`; with `arch`, only
    plans a block of that target holds (a family's `fits`)."""
    from . import costmodel
    from .families import families

    pool = [f for f in families() if f.choosable] if family == "auto" else [get_family(family)]
    chosen, params = costmodel.choose(geometry, csr, precision, gpu_name, pool, arch=arch)
    out = [(family_version(chosen.name, emitter), params)]
    for plan in keep:
        owner = next((f for f in pool if isinstance(plan, f.params)), None)
        entry = (family_version(owner.name, emitter), owner.fit_params(
            geometry, plan, PRECISIONS[precision][0])) if owner else None
        if entry and entry not in out:
            out.append(entry)
    limit = max(limit, len(out))
    lists = []
    for f in pool:
        own = tuple(s for s in seeds if isinstance(s, f.params))
        found = f.candidates(geometry, int(csr.nnz), precision=precision, limit=limit,
                             **({"seeds": own} if own else {}))
        if arch is not None and f.fits is not None:
            found = [p for p in found if f.fits(geometry, p, arch)]
        lists.append([(family_version(f.name, emitter), p) for p in found])
    for entry in (e for row in zip_longest(*lists) for e in row if e is not None):
        if len(out) >= limit:
            break
        if entry not in out:
            out.append(entry)
    return out


def compile_job(case: CaseSpec, job: Job, emitter: str, arch: str, cache_root: str | None,
                threads: int = 1, verify_seed: int | None = None) -> Compiled:
    """Plan -> source -> cubin (through the cache), and with verify_seed the CPU verification of
    the plan against float64. Never raises: a failure is the answer's `error`."""
    from .api import verify_plan
    from .patterns import case_seed
    from .cache import KernelCache
    from .patterns import to_csr

    start = time.perf_counter()
    launch = features = None
    try:
        dtype, accumulate = PRECISIONS[case.precision]
        family = get_family(job.family[0]) if job.family else family_of_params(job.params)
        plan = family.build_plan(to_csr(case.weight), case.geometry, job.params, case.epilogue,
                                 dtype, accumulate)
        features = family.features(plan) if family.features else None
        launch = LaunchSpec.of(plan)
        cache = KernelCache(cache_root) if cache_root is not None else None
        build, _ = build_kernel(plan, emitter, arch, cache, threads)
        verify = (verify_plan(plan, case.weight, np.random.default_rng(case_seed(
                      verify_seed, case.problem.id, case.sparsity, "cpu-verify")))
                  if verify_seed is not None else None)
    except Exception as exc:  # noqa: BLE001 - reported per job, never fatal to the run
        return Compiled(job, launch, None, one_line(exc), None, time.perf_counter() - start,
                        features)
    return Compiled(job, launch, build, None, verify, time.perf_counter() - start, features)


def case_inputs(case: CaseSpec):
    """(x, residual, reference, magnitude) shared by every candidate of a case: one reference
    per case, as the serial tuner always did (seeded, so every worker and host agrees)."""
    from .api import layer_inputs, layer_reference

    x, res = layer_inputs(case.geometry, PRECISIONS[case.precision][0], case.epilogue.residual,
                          np.random.default_rng(0))
    return (x, res, *layer_reference(case.weight, case.geometry, case.epilogue, x, res))


def measure_job(compiled: Compiled, case: CaseSpec) -> MeasureJob:
    return MeasureJob(compiled.job, case.key, case.problem, case.sparsity, compiled.launch,
                      compiled.build)


class GpuMeasure:
    """Verify + time on the one GPU this process sees. `open` runs in the worker process, after
    CUDA_VISIBLE_DEVICES is set; the same object, pickled, is what tests replace."""

    def __init__(self, replays: int = TUNE_REPLAYS):
        self.replays = replays
        self.gpu = None

    def open(self) -> dict:
        from .gpu.runtime import Gpu

        self.gpu = Gpu(0)
        info = self.gpu.info()
        return {"gpu_name": info["name"], "sm_count": info["sm_count"], "arch": info["arch"],
                "driver": info.get("nvml_driver") or info["driver_version"],
                "clocks": info.get("clocks", {}), "pci_bus_id": info.get("pci_bus_id")}

    def __call__(self, job: MeasureJob, inputs) -> dict:
        from .api import Kernel
        from .benchmark import benchmark_layer

        kernel = Kernel.from_launch(job.launch, job.build,
                                    "gemm" if job.problem.op == "gemm" else "conv")
        out = benchmark_layer(self.gpu, kernel, inputs=inputs, baselines=False,
                              replays=self.replays)
        verify = out.get("verify_gpu", {})
        timing = out.get("sparsert", {})
        return {"verified": bool(verify.get("ok")) and "median_us" in timing,
                "error": None if verify.get("ok") else f"verify: {verify.get('message')}",
                "median_us": timing.get("median_us"), "p20_us": timing.get("p20_us"),
                "p80_us": timing.get("p80_us"), "n": len(timing.get("samples_us", ())),
                "samples_us": timing.get("samples_us")}

    def close(self) -> None:
        if self.gpu is not None:
            self.gpu.close()
            self.gpu = None


def failure(error: str) -> dict:
    return {"verified": False, "error": error, "median_us": None, "p20_us": None,
            "p80_us": None, "n": 0}


def row(case: CaseSpec, compiled: Compiled | None, job: Job, result: dict, gpu: dict,
        family: tuple[str, str]) -> dict:
    """The database row of one measurement (or of a job that failed before measuring)."""
    median = result.get("median_us")
    features = getattr(compiled, "features", None)
    family = job.family_of(family)
    return {"pattern_hash": case.pattern_hash, "shape": case.shape, "precision": case.precision,
            "family": family[0], "family_version": family[1], "plan_name": job.params.name(),
            "plan_json": plan_json(params_key(job.params)), "candidate": job.candidate,
            "problem": case.problem.id, "sparsity": case.sparsity,
            "cubin_sha256": compiled.cubin_sha256 if compiled else None,
            "gpu_name": gpu["gpu_name"], "sm_count": gpu.get("sm_count"),
            "driver": gpu["driver"], "clocks_json": gpu.get("clocks") or {},
            "median_us": median if median is not None and math.isfinite(median) else None,
            "p20_us": result.get("p20_us"), "p80_us": result.get("p80_us"),
            "n": result.get("n", 0), "verified": bool(result.get("verified")),
            "error": result.get("error"), "cpu_verified": _cpu_ok(compiled),
            "features_json": json.dumps(features, sort_keys=True) if features else None}


def _cpu_ok(compiled) -> int | None:
    verify = getattr(compiled, "cpu_verify", None)
    return None if verify is None else int(bool(verify.get("ok")))


def winners(cases: list[CaseSpec], jobs: list[Job], db, gpu: dict, family: tuple[str, str]
            ) -> list[dict]:
    """Per case the fastest verified candidate among this run's jobs, from the latest stored
    row of each on this GPU (measured now or by an earlier, interrupted run): the serial
    tuner's rule — the lowest median, ties to the earlier candidate."""
    from .tunedb import latest

    stored = {(r["pattern_hash"], r["shape"], r["precision"], r["family"], r["family_version"],
               r["plan_json"]): r
              for r in latest(db.rows("WHERE gpu_name = ? AND driver = ?",
                                      (gpu["gpu_name"], gpu["driver"])))}
    by_case: dict[int, list[Job]] = {}
    for job in jobs:
        by_case.setdefault(job.case, []).append(job)
    summary = []
    for case in cases:
        cands = sorted(by_case.get(case.index, []), key=lambda j: j.candidate)
        timed, measured = [], []
        for job in cands:
            r = stored.get(job.ident(case, family))
            if r and r["verified"] and r["median_us"] is not None:
                timed.append((r["median_us"], job.candidate, job))
            fam = job.family_of(family)
            measured.append({"plan": job.params.name(), "candidate": job.candidate,
                             "family": f"{fam[0]}@{fam[1]}",
                             "median_us": r["median_us"] if r else None,
                             "verified": bool(r and r["verified"]),
                             "error": (r["error"] if r else "not measured") or None})
        if not timed:
            summary.append({"case": case.key, "status": "no candidate verified",
                            "candidates": len(cands), "verified": 0, "measured": measured,
                            "problem": case.problem.id, "sparsity": case.sparsity,
                            "precision": case.precision})
            continue
        best_us, _, best = min(timed, key=lambda t: (t[0], t[1]))
        default_us = next((us for us, i, _ in timed if i == 0), None)
        family_best: dict[tuple[str, str], tuple] = {}    # each family's fastest, this run
        for us, index, job in sorted(timed, key=lambda t: (t[0], t[1])):
            family_best.setdefault(job.family_of(family), (us, job.params))
        summary.append({"case": case.key, "status": "ok", "best": best.params.name(),
                        "params": best.params, "us": best_us, "default_us": default_us,
                        "family": best.family_of(family), "family_best": family_best,
                        "default_family": cands[0].family_of(family)[0] if cands else None,
                        "verified": len(timed), "candidates": len(cands),
                        "problem": case.problem.id, "sparsity": case.sparsity,
                        "pattern_hash": case.pattern_hash, "geometry": case.geometry,
                        "precision": case.precision, "measured": measured,
                        "default": cands[0].params.name() if cands else None,
                        "default_params": cands[0].params if cands else None})
    return summary


def tune_results(summary: list[dict], run: dict, meta: dict) -> dict:
    """A `kind: tune` results document (what `sparsert plot --kind tune` draws): per case the
    default plan's time, the winner's, and every candidate measured this run."""
    from .results import stamp

    cases = []
    for entry in summary:
        if entry["status"] != "ok":
            continue
        cases.append({"problem": entry["problem"], "sparsity": entry["sparsity"],
                      "precision": entry["precision"], "pattern_hash": entry["pattern_hash"],
                      "default_plan": entry["default"], "default_us": entry["default_us"],
                      "default_family": entry["default_family"],
                      "best_plan": entry["best"], "best_us": entry["us"],
                      "best_family": entry["family"][0],
                      "candidates": [_candidate(m) for m in entry["measured"]
                                     if m["verified"] and m["median_us"] is not None]})
    gpu = dict(run["gpu"] or {})
    gpu = {"name": gpu.pop("gpu_name", gpu.pop("name", None)), **gpu}   # as bench results
    return stamp({**meta, "gpu": gpu, "run": {k: run[k] for k in
                  ("jobs", "skipped", "wall_seconds", "compile_seconds", "measure_seconds",
                   "interrupted")
                  if k in run}, "cases": cases, "summary": default_gap(cases),
                  "failed": [e["case"] for e in summary if e["status"] != "ok"]}, "tune")


def _candidate(measured: dict) -> dict:
    """A measured candidate for a tune results file: `family` its name (as default_family and
    best_family), `family_version` beside it."""
    name, _, version = str(measured.get("family", "")).partition("@")
    return {**measured, "family": name, **({"family_version": version} if version else {})}


GAP_GEOMEAN, GAP_CASE = 1.10, 1.25      # issue 10: default within 10% geomean, 25% per case


def default_gap(cases: list[dict]) -> dict:
    """How far the untuned defaults are from the best candidates of the same run: geomean and
    worst default_us / best_us over the cases that measured both, and whether that meets
    issue 10's bar (GAP_GEOMEAN, GAP_CASE)."""
    ratios = [(c["default_us"] / c["best_us"], c) for c in cases
              if c.get("default_us") and c.get("best_us")]
    if not ratios:
        return {"cases": 0, "geomean_default_over_best": None, "worst": None, "ok": None}
    geomean = math.exp(sum(math.log(r) for r, _ in ratios) / len(ratios))
    worst, case = max(ratios, key=lambda t: t[0])
    return {"cases": len(ratios), "geomean_default_over_best": geomean,
            "worst": {"problem": case.get("problem"), "sparsity": case.get("sparsity"),
                      "precision": case.get("precision"), "ratio": worst},
            "ok": geomean <= GAP_GEOMEAN and worst <= GAP_CASE}
