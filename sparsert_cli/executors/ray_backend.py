"""A cluster through Ray Core (optional extra `[ray]`): the local executor's jobs, Ray's workers.

Compile jobs are tasks (`num_cpus=1`) scheduled anywhere in the cluster; each GPU is one timer
actor (`num_gpus=1`: Ray sets its CUDA_VISIBLE_DEVICES) holding the measure object. A compiled
kernel stays in the object store: the driver fetches only the small summary of a compile job,
and hands the kernel's reference to an actor, so cubins travel worker -> object store -> actor.
An actor that dies is replaced and its job retried once, then recorded as failed.
"""

from __future__ import annotations

import time

from ..errors import UserError
from ..jobs import (ATTEMPTS, GpuMeasure, case_inputs, compile_job, failure,
                    measure_job, one_line)

IN_FLIGHT = 2     # jobs queued per actor (the next one is ready when the current one ends)


def _ray():
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs the Ray extra: pip install 'sparsert[ray]'") from None
    return ray


def _compile_split(case, job, emitter, arch, cache_root, threads, verify_seed):
    """A compile job as two objects: the small summary the driver reads, and the kernel."""
    compiled = compile_job(case, job, emitter, arch, cache_root, threads, verify_seed)
    summary = {"ok": compiled.build is not None, "error": compiled.error,
               "seconds": compiled.seconds, "cpu_verify": compiled.cpu_verify,
               "cubin_sha256": compiled.cubin_sha256}
    return summary, compiled


class _Timer:
    """Actor body: one GPU, one measure object."""

    def __init__(self, measure):
        self.measure = measure
        self.info = None

    def open(self) -> dict:
        import os

        self.info = {**self.measure.open(),
                     "device": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
        return self.info

    def run(self, compiled, case, inputs) -> dict:
        try:
            return self.measure(measure_job(compiled, case), inputs)
        except Exception as exc:  # noqa: BLE001 - sticky errors end the actor below
            from ..jobs import is_sticky

            error = one_line(exc)
            if is_sticky(error):
                import os
                os._exit(3)      # Ray sees the actor die; the driver retries on a new one
            return failure(error)


class RayExecutor:
    """`address`: "auto" (a running cluster), an address, or None (start a local instance with
    `init_kwargs`). `gpus`: timer actors to create (default: the cluster's GPU count)."""

    def __init__(self, address: str | None = "auto", gpus: int | None = None,
                 emitter: str = "ptx", arch: str | None = None, cache_root: str | None = None,
                 measure=None, verify_seed: int | None = None, init_kwargs: dict | None = None,
                 attempts: int = ATTEMPTS):
        self.ray = _ray()
        self.address, self.gpus, self.init_kwargs = address, gpus, dict(init_kwargs or {})
        self.emitter, self.arch, self.cache_root = emitter, arch, cache_root
        self.measure = measure if measure is not None else GpuMeasure()
        self.verify_seed, self.attempts = verify_seed, attempts
        self.actors: list = []
        self._owns_ray = False

    def start(self) -> list[dict]:
        ray = self.ray
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, include_dashboard=False,
                         log_to_driver=False, **self.init_kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise UserError(f"--ray {self.address}: cannot connect ({one_line(exc)})") \
                    from None
            self._owns_ray = True
        count = self.gpus if self.gpus is not None else \
            int(ray.cluster_resources().get("GPU", 0))
        if count < 1:
            raise UserError(f"--ray {self.address or 'local'}: the cluster has no GPU", 3)
        self._timer = ray.remote(num_gpus=1, num_cpus=0)(_Timer)
        self._compile = ray.remote(num_cpus=1, num_returns=2)(_compile_split)
        self._inputs = ray.remote(num_cpus=1)(case_inputs)
        self.actors = [self._timer.remote(self.measure) for _ in range(count)]
        try:
            self.infos = ray.get([a.open.remote() for a in self.actors], timeout=300)
        except Exception as exc:  # noqa: BLE001 - an actor that cannot open its GPU
            self.stop()
            raise UserError(f"Ray timer actor did not start ({one_line(exc)})", 3) from None
        return self.infos

    def stop(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if self._owns_ray and self.ray.is_initialized():
            self.ray.shutdown()
            self._owns_ray = False

    def run(self, cases, jobs, on_result, on_event=None) -> dict:
        ray = self.ray
        started = time.perf_counter()
        case_refs = {c.index: ray.put(c) for c in cases if any(j.case == c.index for j in jobs)}
        input_refs: dict = {}
        summaries = {}
        for job in jobs:
            summary, kernel = self._compile.remote(case_refs[job.case], job, self.emitter,
                                                   self.arch, self.cache_root, 1,
                                                   self.verify_seed)
            summaries[summary] = (job, kernel)
        ready: list = []          # (job, kernel ref, summary)
        running: dict = {}        # measure ref -> (job, kernel ref, summary, actor slot)
        load = [0] * len(self.actors)
        done_jobs = [0] * len(self.actors)
        attempts: dict = {}
        first = last = None
        compile_done = started
        while summaries or ready or running:
            waiting = list(summaries) + list(running)
            finished, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
            for ref in finished:
                if ref in summaries:
                    job, kernel = summaries.pop(ref)
                    try:
                        summary = ray.get(ref)
                    except ray.exceptions.RayError as exc:   # its worker died, retries spent
                        summary = {"ok": False, "error": f"compile task: {one_line(exc)}",
                                   "seconds": 0.0}
                    if on_event:
                        on_event("compiled", job, {"ok": summary["ok"],
                                                   "seconds": summary["seconds"]})
                    if not summary["ok"]:
                        last = time.perf_counter()
                        on_result(job, None, failure(f"compile: {summary['error']}"), None)
                        if on_event:
                            on_event("measured", job, {"slot": None})
                    else:
                        if job.case not in input_refs:
                            input_refs[job.case] = self._inputs.remote(case_refs[job.case])
                        ready.append((job, kernel, summary))
                    if not summaries:
                        compile_done = time.perf_counter()
                    continue
                job, kernel, summary, slot, actor = running.pop(ref)
                load[slot] -= 1
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    tries = attempts[job.id] = attempts.get(job.id, 0) + 1
                    if self.actors[slot] is actor:     # replace it once, not per lost job
                        self.actors[slot] = self._timer.remote(self.measure)
                        self.infos[slot] = ray.get(self.actors[slot].open.remote())
                    if tries < self.attempts:
                        ready.insert(0, (job, kernel, summary))
                        continue
                    result = failure(f"timer actor died ({one_line(exc)}) "
                                     f"(after {tries} attempts)")
                last = time.perf_counter()
                done_jobs[slot] += 1
                on_result(job, _Summary(summary), result, slot)
                if on_event:
                    on_event("measured", job, {"slot": slot, **result})
            while ready and min(load) < IN_FLIGHT:
                slot = load.index(min(load))
                job, kernel, summary = ready.pop(0)
                ref = self.actors[slot].run.remote(kernel, case_refs[job.case],
                                                   input_refs[job.case])
                running[ref] = (job, kernel, summary, slot, self.actors[slot])
                load[slot] += 1
                first = first or time.perf_counter()
        measure_s = (last - first) if first and last else 0.0
        return {"compile_seconds": compile_done - started, "measure_seconds": measure_s,
                "run_seconds": time.perf_counter() - started,
                "gpus": [{"slot": i, "device": self.infos[i].get("device"), "jobs": n,
                          "jobs_per_second": n / measure_s if measure_s else None}
                         for i, n in enumerate(done_jobs)]}


class _Summary:
    """What the database row needs of a compile job the driver never fetched whole."""

    def __init__(self, summary: dict):
        self.cubin_sha256 = summary["cubin_sha256"]
        self.cpu_verify = summary["cpu_verify"]
