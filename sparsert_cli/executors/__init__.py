"""Executors move tuning jobs (jobs.py) from a CPU compile stage to GPU measure workers.

`local.LocalExecutor`: a process pool and one spawned worker per GPU of this host (stdlib only).
`ray_backend.RayExecutor`: the same on a Ray cluster (optional extra `[ray]`).
Both answer `start() -> [GPU info per worker]`, `run(cases, jobs, on_result, on_event) -> stats`
and `stop()`; `run_jobs` below is what the commands call with either.
"""

from __future__ import annotations

import time

from ..errors import UserError
from ..families.base import params_key
from ..compile import DEFAULT_ARCH
from ..jobs import row
from .local import LocalExecutor


def parse_gpus(value: str | None, count: int) -> list[int]:
    """`--gpus all|0,1,...` against the `count` GPUs the driver reports (one line if wrong)."""
    if count == 0:
        raise UserError(f"--gpus {value}: no GPU on this machine ({gpu_count_reason()})", 3)
    if value in (None, "", "all"):
        return list(range(count))
    try:
        ids = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--gpus: expected 'all' or device numbers like 0,1, got {value!r}")
    if not ids or len(set(ids)) != len(ids):
        raise UserError(f"--gpus: expected distinct device numbers, got {value!r}")
    bad = [i for i in ids if not 0 <= i < count]
    if bad:
        raise UserError(f"--gpus: no device {bad[0]} (this machine has {count} GPU(s): "
                        f"0..{count - 1})")
    return ids


def gpu_count() -> int:
    """GPUs the driver reports (cuDeviceGetCount), 0 without a usable driver."""
    from ..gpu.runtime import cu, have_gpu

    return int(cu("cuDeviceGetCount")) if have_gpu() else 0


def gpu_count_reason() -> str:
    from ..gpu.runtime import _probe

    return _probe()[1]


def same_gpu(infos: list[dict]) -> dict:
    names = sorted({(i["gpu_name"], i["driver"]) for i in infos})
    if len(names) > 1:
        raise UserError("workers see different GPUs or drivers "
                        f"({'; '.join(' / '.join(n) for n in names)}): tune each kind with --gpus")
    return infos[0]


def run_jobs(executor, prepare, db, family, remeasure: bool = False, on_event=None) -> dict:
    """Start the executor, make the jobs (`prepare(gpu info) -> (cases, jobs)`: seeds may
    depend on the GPU), skip those the database already holds for this GPU (resume), run the
    rest with every result written to the database as it arrives, stop. Every row written
    carries a run id (results of every worker arrive here): a new one for a (case, family)
    the database does not hold yet; a case and family it holds (a resumed or extended tune)
    continue the run export takes them from (TuneDB.group_runs), so export compares that
    group's whole candidate list from one run. With `remeasure` every row takes the new id.
    Returns run stats (with "run_id", the new id)."""
    from ..tunedb import JOB_COLUMNS, new_run_id

    started = time.perf_counter()
    infos = executor.start()
    try:
        gpu = same_gpu(infos)
        if getattr(executor, "arch", None) is None:
            executor.arch = gpu.get("arch") or DEFAULT_ARCH
        cases, jobs = prepare(gpu)
        done = set() if remeasure else db.measured(gpu["gpu_name"], gpu["driver"])
        todo = [j for j in jobs if j.ident(cases[j.case], family) not in done]
        run_id = new_run_id()
        continued = {} if remeasure else db.group_runs(gpu["gpu_name"], gpu["driver"])
        if on_event:
            on_event("plan", None, {"jobs": len(jobs), "todo": len(todo)})

        def on_result(job, compiled, result, slot):
            info = infos[slot] if slot is not None and slot < len(infos) else gpu
            measured = row(cases[job.case], compiled, job, result, info, family)
            group = tuple(measured[c] for c in JOB_COLUMNS[:5])
            db.insert({**measured,
                       "run_id": continued[group] if group in continued else run_id})

        stats = executor.run(cases, todo, on_result, on_event)
    finally:
        executor.stop()
    return {"gpu": gpu, "cases": cases, "all_jobs": jobs, "jobs": len(jobs),
            "skipped": len(jobs) - len(todo), "wall_seconds": time.perf_counter() - started,
            "run_id": run_id, **stats}


def tune_config(config, *, gpus: str | None = None, ray: str | None = None, arch=None,
                jobs=None, cache_root: str | None = None, limit: int = 16, tuned_path=None,
                db_path=None, remeasure: bool = False, measure=None, on_event=None,
                gpu_ids: list[int] | None = None, family: str = "auto") -> dict:
    """`sparsert tune`: every candidate of every case compiled, verified and timed on every GPU
    of this host (or of a Ray cluster), every measurement kept in the tuning database, the
    winners (of any family, or of `family` alone) written to the tuned-plan JSON. Returns
    {"summary": rows, "run": stats}.
    `gpu_ids` (device numbers, unchecked) and `measure` are for tests and scripts."""
    from ..families import families, get_family
    from ..jobs import current_family, family_version, make_cases, winners
    from ..problem_shape import PRECISIONS
    from ..tune import TUNED_PATH, TunedDB
    from ..tunedb import TuneDB, default_db_path

    get_family(family)                       # an unknown name fails before any work
    default = current_family(config.emit)
    tuned = TunedDB(tuned_path or TUNED_PATH)
    if ray is not None:
        from .ray_backend import RayExecutor
        executor = RayExecutor(None if ray == "local" else ray, emitter=config.emit, arch=arch,
                               cache_root=cache_root, measure=measure)
    else:
        ids = gpu_ids if gpu_ids is not None else parse_gpus(gpus, gpu_count())
        executor = LocalExecutor(ids, config.emit, arch, cache_root, jobs, measure)

    def prepare(gpu):
        def winners_at(digest, geometry, precisions):
            return [found for other in precisions for f in families()
                    if (found := tuned.lookup(digest, geometry, gpu["gpu_name"], other,
                                              *family_version(f.name, config.emit)))]

        def seeds(digest, geometry, precision):
            return winners_at(digest, geometry, [p for p in PRECISIONS if p != precision])

        def keep(digest, geometry, precision):
            return winners_at(digest, geometry, [precision])

        cases, jobs = make_cases(config, limit, seeds, family, gpu["gpu_name"], keep,
                                 arch or gpu.get("arch"))
        made.update(gpu=gpu, cases=cases, jobs=jobs)
        return cases, jobs

    made: dict = {}
    started, stopped = time.perf_counter(), None
    with TuneDB(db_path or default_db_path()) as db:
        try:
            stats = run_jobs(executor, prepare, db, default, remeasure, on_event)
        except KeyboardInterrupt as exc:     # Ctrl-C or SIGTERM: keep what was measured
            if "cases" not in made:
                raise
            stopped = exc
            stats = {"gpu": made["gpu"], "cases": made["cases"], "all_jobs": made["jobs"],
                     "jobs": len(made["jobs"]), "skipped": 0, "interrupted": True,
                     "wall_seconds": time.perf_counter() - started, "compile_seconds": 0.0,
                     "measure_seconds": 0.0, "gpus": []}
        summary = winners(stats["cases"], stats["all_jobs"], db, stats["gpu"], default)
    if stopped is not None:    # a case counts only when every candidate of it was measured
        for entry in summary:
            if entry["status"] == "ok" and any(m["error"] == "not measured"
                                               for m in entry["measured"]):
                entry["status"] = "interrupted before every candidate was measured"
    for entry in summary:
        if entry["status"] != "ok":
            continue
        info = {"default_us": entry["default_us"],
                # the plan default_us timed (candidate 0: the cost model's pick, of either
                # family), so that a refit credits the time to that plan
                "default_params": params_key(entry["default_params"]),
                "default_family": entry["default_family"],
                "candidates": entry["candidates"], "verified": entry["verified"],
                "problem": entry["problem"], "sparsity": entry["sparsity"]}
        # every family measured in this run gets its fastest plan and time (the winner's family:
        # the winner), so the families' entries a later lookup compares (TunedDB.best) come
        # from one run: a losing family's faster time from another run cannot override the
        # winner. Keyed by the code version measured (issue 9).
        for fam, (us, params) in entry["family_best"].items():
            tuned.record(entry["pattern_hash"], entry["geometry"], stats["gpu"]["gpu_name"],
                         entry["precision"], params, {"us": us, **info}, *fam)
    tuned.save()
    if stopped is not None:
        raise TuneInterrupted({"summary": summary, "run": stats})
    return {"summary": summary, "run": stats}


class TuneInterrupted(KeyboardInterrupt):
    """A tuning run stopped by Ctrl-C or SIGTERM after its jobs were made: the winners of the
    cases whose every candidate was measured are already saved; `result` is what tune_config
    would have returned for them ({"summary", "run"}, run["interrupted"] True)."""

    def __init__(self, result: dict):
        super().__init__("tuning interrupted")
        self.result = result
