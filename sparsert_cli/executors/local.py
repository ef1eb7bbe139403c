"""One host, every GPU: a CPU compile pool feeding one spawned measure worker per GPU.

Each GPU gets its own *spawned* process (a fresh interpreter, CUDA_VISIBLE_DEVICES=<i> in its
environment before anything can initialise CUDA), talking to this process over a pipe. Up to
DEPTH jobs are queued per worker (a reader thread there takes the next while one is measured, so
the GPU never waits for this process), jobs of one case stay on the worker that holds the case's
inputs (sent once per worker and case; another worker takes some only when it would idle), and
every case's inputs are computed ahead, in a few processes, from the start of the run.
A worker that dies (segfault, exit, kill), hits a sticky CUDA error (its context is gone) or
runs past the job timeout is replaced by a new process; the job it was measuring is retried
once, then recorded as failed with the error, and its queued jobs go back to the queue — never
dropped. Results go to `on_result` (the database) the moment they arrive, so a crash of this
process loses nothing already measured.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

from ..jobs import (Compiled, GpuMeasure, case_inputs, compile_job, failure, is_sticky,
                    measure_job, one_line)
from .workers import (Worker, WorkerPool, _died, close_measure, devices, fatal,
                      open_measure)

DEPTH = 2                 # jobs queued on one worker: one measured, one waiting
INPUT_PROCS = 4           # processes computing cases' inputs and references ahead


def _gpu_worker(conn, measure, device: str) -> None:
    """Body of a GPU worker process: open the measure, then answer jobs until told to stop."""
    if not open_measure(conn, measure, device, tag=True):
        return
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:      # the next job arrives while this one is measured
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):       # the parent went away
                message = ("stop",)
            inbox.put(message)
            if message[0] == "stop":
                return
    threading.Thread(target=read, name="sparsert-inbox", daemon=True).start()
    inputs = None
    while True:
        message = inbox.get()
        if message[0] == "stop":
            break
        _, job_id, payload, new_inputs = message
        if new_inputs is not None:
            inputs = new_inputs
        start = time.perf_counter()
        try:
            result = measure(payload, inputs)
        except Exception as exc:  # noqa: BLE001 - a job's failure is its result
            error = one_line(exc)
            if is_sticky(error):      # the context is unusable: this process must go
                fatal(conn, job_id, error)
            result = failure(error)
        conn.send(("result", job_id, result, time.perf_counter() - start))
    close_measure(conn, measure)


@dataclass
class _Worker(Worker):           # busy: jobs queued; since: when the first queued job started
    queue: deque = field(default_factory=deque)    # sent, unanswered; the first is measured
    case: int | None = None      # the case whose inputs the process holds
    jobs: int = 0
    sends: int = 0               # inputs sent (once per case held, ideally)


class LocalExecutor(WorkerPool):
    """`gpus`: device numbers (CUDA ordinals); `arch`: compile target (default: the GPUs');
    `jobs`: compile processes (default: all cores).
    `measure` is pickled into every worker (tests pass a fake one); `verify_seed` makes every
    compile job also verify its plan on the CPU; `staged` compiles everything and computes every
    case's inputs before measuring (to time the two phases apart); `job_timeout` bounds one measure job; `compile_fn` and
    `inputs_fn` stand in for compile_job and case_inputs (tests: no compiler, no reference)."""

    def __init__(self, gpus: list[int], emitter: str = "ptx", arch: str | None = None,
                 cache_root: str | None = None, jobs: int | None = None, measure=None,
                 verify_seed: int | None = None, staged: bool = False,
                 job_timeout: float = 600.0, compile_fn=compile_job, inputs_fn=case_inputs):
        self.gpus = list(gpus)
        self.emitter, self.arch, self.cache_root = emitter, arch, cache_root
        self.jobs = jobs or os.cpu_count() or 1
        self.measure = measure if measure is not None else GpuMeasure()
        self.verify_seed, self.staged, self.job_timeout = verify_seed, staged, job_timeout
        self.compile_fn, self.inputs_fn = compile_fn, inputs_fn
        self.context = get_context("spawn")
        self.workers: list[_Worker] = []
        self._left: dict[int, int] = {}
        self._nnz: dict[int, int] = {}

    # ---- workers ---------------------------------------------------------------------------
    _target = _gpu_worker

    def _reset(self, worker: _Worker) -> None:
        worker.case = None
        worker.queue.clear()

    def _time_limit(self) -> float:
        return self.job_timeout

    def _restart_scale(self) -> int:
        return len(self._left)

    def start(self) -> list[dict]:
        """Spawn one worker per GPU and wait until each has opened its device."""
        self.workers = [_Worker(slot, device) for slot, device in enumerate(devices(self.gpus))]
        return self._start()

    # ---- the run ---------------------------------------------------------------------------
    def run(self, cases, jobs, on_result, on_event=None) -> dict:
        """Compile every job, measure the compiled ones on the workers; every job ends in
        exactly one on_result(job, compiled | None, result, worker slot | None)."""
        self._cases, self._on_result, self._on_event = cases, on_result, on_event
        self._ready: dict[int, deque[Compiled]] = {}      # compiled, unsent; by case
        self._attempts: dict[tuple, int] = {}
        self._left: dict[int, int] = {}
        for job in jobs:
            self._left[job.case] = self._left.get(job.case, 0) + 1
        self._inputs: dict = {}
        started = time.perf_counter()
        self._first_dispatch = self._last_result = None
        compile_done = started
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)     # a full pipe already wakes the loop
        wake_lock, closed = threading.Lock(), []

        def wake(_future) -> None:   # from the pools' threads; never after the pipe is closed
            with wake_lock:
                if not closed:
                    try:
                        os.write(wake_w, b".")
                    except BlockingIOError:
                        pass
        threads = max(1, (os.cpu_count() or 1) // max(1, min(self.jobs, len(jobs) or 1)))
        # Biggest kernels first: the long compiles start early.
        order = sorted(jobs, key=lambda j: -self._size(j))
        pool = ProcessPoolExecutor(max_workers=max(1, min(self.jobs, len(jobs) or 1)),
                                   mp_context=self.context)
        refs = ProcessPoolExecutor(max(1, min(INPUT_PROCS, os.cpu_count() or 1,
                                              len(self._left))), mp_context=self.context)
        pending = {}
        try:
            for job in order:
                future = pool.submit(self.compile_fn, cases[job.case], job, self.emitter,
                                     self.arch, self.cache_root, threads, self.verify_seed)
                future.add_done_callback(wake)
                pending[future] = job
            for job in order:          # every case's inputs, ready before its first cubin
                if job.case not in self._inputs:
                    self._inputs[job.case] = refs.submit(self.inputs_fn, cases[job.case])
                    self._inputs[job.case].add_done_callback(wake)
            while pending or self._ready or any(w.state == "busy" for w in self.workers):
                for future in [f for f in pending if f.done()]:
                    job = pending.pop(future)
                    try:
                        compiled = future.result()
                    except Exception as exc:  # noqa: BLE001 - e.g. a compile process died
                        compiled = Compiled(job, None, None, f"compile worker: {one_line(exc)}")
                    self._compiled(compiled)
                    if not pending:
                        compile_done = time.perf_counter()
                if not (self.staged and (pending or not all(
                        f.done() for f in self._inputs.values()))):
                    self._dispatch()      # staged: once every cubin and every input is ready
                if not any(w.state != "dead" for w in self.workers):
                    self._fail_all("no GPU worker left: " + self._errors())
                self._poll(1.0, wake_r)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            refs.shutdown(wait=False, cancel_futures=True)
            with wake_lock:
                closed.append(True)
                os.close(wake_r)
                os.close(wake_w)
        end = time.perf_counter()
        measure_s = (self._last_result - self._first_dispatch) if self._first_dispatch and \
            self._last_result else 0.0
        return {"compile_seconds": compile_done - started, "measure_seconds": measure_s,
                "run_seconds": end - started,
                "gpus": [{"slot": w.slot, "device": w.device, "jobs": w.jobs,
                          "busy_seconds": round(w.busy_seconds, 3), "restarts": w.restarts,
                          "inputs_sent": w.sends,
                          "jobs_per_second": w.jobs / measure_s if measure_s else None,
                          "busy_fraction": (round(w.busy_seconds / measure_s, 3) if measure_s
                                            else None)}
                         for w in self.workers]}

    def _size(self, job) -> int:
        from ..build import code_units
        from ..patterns import count_nonzeros

        case = self._cases[job.case]
        if job.case not in self._nnz:      # a dense array or a SparseWeight
            self._nnz[job.case] = count_nonzeros(case.weight)
        return code_units(self._nnz[job.case], getattr(job.params, "vector_width", 1),
                          case.precision)

    def _compiled(self, compiled: Compiled) -> None:
        job = compiled.job
        if self._on_event:
            self._on_event("compiled", job, {"ok": compiled.build is not None,
                                             "seconds": compiled.seconds})
        if compiled.build is None:
            self._finish(job, compiled, failure(f"compile: {compiled.error}"), None)
            return
        self._ready.setdefault(job.case, deque()).append(compiled)

    def _requeue(self, compiled: Compiled) -> None:
        self._ready.setdefault(compiled.job.case, deque()).appendleft(compiled)

    def _usable(self, case: int) -> bool:
        """Jobs of `case` wait and its inputs are computed (a failure fails the case's jobs)."""
        if case not in self._ready or not self._inputs[case].done():
            return False
        error = self._inputs[case].exception()
        if error is not None:
            for compiled in self._ready.pop(case):
                self._finish(compiled.job, compiled, failure(f"inputs: {one_line(error)}"),
                             None)
            return False
        return True

    def _pick(self, worker: _Worker) -> int | None:
        """The case to send `worker` a job of: the one it holds, else one no other worker holds,
        else (only when it would idle) the case with the most jobs waiting."""
        usable = [c for c in list(self._ready) if self._usable(c)]
        if worker.case in usable:
            return worker.case
        held = {w.case for w in self.workers if w is not worker and w.state in ("idle", "busy")}
        free = [c for c in usable if c not in held]
        if free or worker.queue:
            return free[0] if free else None
        return max(usable, key=lambda c: len(self._ready[c]), default=None)

    def _dispatch(self) -> None:
        """Fill every worker's queue up to DEPTH, one job per worker per round."""
        sent = True
        while sent and self._ready:
            sent = False
            for worker in self.workers:
                if worker.state not in ("idle", "busy") or len(worker.queue) >= DEPTH:
                    continue
                case = self._pick(worker)
                if case is None:
                    continue
                pick = self._ready[case].popleft()
                if not self._ready[case]:
                    del self._ready[case]
                inputs = None if worker.case == case else self._inputs[case].result()
                try:
                    worker.conn.send(("job", pick.job.id, measure_job(pick, self._cases[case]),
                                      inputs))
                except (OSError, ValueError):       # died: its queue is blamed, not this job
                    self._requeue(pick)
                    proc = worker.proc
                    if proc.is_alive():
                        proc.kill()
                    proc.join(5)
                    # Its last message (a sticky CUDA error naming the job that caused it) may
                    # still be in the pipe: read it first, which settles the worker, or its
                    # death hides what it said.
                    self._drain(worker)
                    if worker.proc is proc and worker.state != "dead":
                        self._lost(worker, _died(proc))
                    continue
                now = time.perf_counter()
                if not worker.queue:
                    worker.since = now
                worker.queue.append(pick)
                worker.sends += inputs is not None
                worker.state, worker.case, sent = "busy", case, True
                self._first_dispatch = self._first_dispatch or now

    def _result(self, worker: _Worker, message) -> None:
        done = worker.queue.popleft()
        worker.busy_seconds += message[3]
        worker.jobs += 1
        worker.since = time.perf_counter()        # the next queued job starts now
        worker.state = "busy" if worker.queue else "idle"
        self._finish(done.job, done, message[2], worker.slot)

    def _orphaned(self, worker: _Worker, error: str) -> None:
        """Retry or fail the job the lost worker was measuring, queue its other jobs again."""
        flight = list(worker.queue)
        worker.queue.clear()
        for later in reversed(flight[1:]):       # never started: back to the front, unblamed
            self._requeue(later)
        if flight:
            job = flight[0]
            message = self._blame(job.job.id, error)
            if message:
                self._finish(job.job, job, failure(message), worker.slot)
            else:
                self._requeue(job)
                if self._on_event:
                    self._on_event("retry", job.job, {"error": error, "slot": worker.slot})
        worker.case = None

    def _finish(self, job, compiled, result, slot) -> None:
        self._last_result = time.perf_counter()
        self._on_result(job, compiled, result, slot)
        self._left[job.case] -= 1
        if not self._left[job.case]:
            self._inputs.pop(job.case, None)
        if self._on_event:
            self._on_event("measured", job, {"slot": slot, **result})

    def _fail_all(self, error: str) -> None:
        for case in list(self._ready):
            for compiled in self._ready.pop(case):
                self._finish(compiled.job, compiled, failure(error), None)

