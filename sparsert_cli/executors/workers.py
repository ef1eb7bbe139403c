"""The life of a spawned per-GPU worker process, shared by `local.LocalExecutor` (tune) and
`cases.CasePool` (bench).

Worker side: `open_measure` (CUDA_VISIBLE_DEVICES, `measure.open()`, the ready / open_failed
answer), `fatal` (a sticky CUDA error: report and exit), `close_measure`.
Parent side: `WorkerPool` spawns a worker with its one device visible, waits for it to start,
stops it, polls the pipes with the busy workers' time limits, notices a worker that died, hung
or reported a fatal error, and replaces it (`_lost`); what a job is, how its result is recorded
and how a lost worker's jobs are retried (`_result`, `_orphaned`) is each executor's own.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import connection

from ..errors import UserError
from ..jobs import ATTEMPTS, one_line

START_TIMEOUT = 180.0     # seconds a new worker may take to import and open its GPU
_ENV_LOCK = threading.Lock()


def open_measure(conn, measure, device: str, tag: bool = False) -> bool:
    """Worker side: open the measure and answer ("ready", info) — with `device` added to the
    info when `tag` — or ("open_failed", line). True when ready."""
    os.environ["CUDA_VISIBLE_DEVICES"] = device   # already set by the parent; before any CUDA
    try:
        info = measure.open()
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        conn.send(("open_failed", one_line(exc)))
        return False
    conn.send(("ready", {**info, "device": device} if tag else info))
    return True


def fatal(conn, key, error: str) -> None:
    """Worker side: the CUDA context is unusable (sticky error), so this process must go."""
    conn.send(("fatal", key, error))
    conn.close()
    os._exit(3)


def close_measure(conn, measure) -> None:
    try:
        measure.close()
    finally:
        conn.close()


def devices(gpus: list[int]) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value for each device number (through this process's own)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    mapping = [d.strip() for d in visible.split(",")] if visible else None
    return [mapping[g] if mapping and g < len(mapping) else str(g) for g in gpus]


@dataclass
class Worker:
    slot: int
    device: str
    proc: object = None
    conn: object = None
    state: str = "starting"      # starting | idle | busy | dead
    since: float = 0.0           # when the job being measured (or the process) started
    info: dict = field(default_factory=dict)
    busy_seconds: float = 0.0    # time measuring, as the worker counts it
    restarts: int = 0
    error: str = ""


class WorkerPool:
    """Parent side of `self.workers` (Worker records); a subclass sets the class attributes and
    `self.context`, `self.measure`, and defines `_reset`, `_time_limit`, `_result`, `_orphaned`
    and `_restart_scale`."""

    _target = None            # the worker process's body: (conn, measure, device)
    _proc_name = "sparsert-gpu"
    _role = "measure"         # in "GPU n: <role> worker did not start"
    _unit = "job"             # in "<unit> timed out after n s"
    _stop_join = 10.0         # seconds a stopping worker may take to close its measure

    def _spawn(self, worker: Worker) -> None:
        parent, child = self.context.Pipe()
        proc = self.context.Process(target=type(self)._target,
                                    args=(child, self.measure, worker.device),
                                    name=f"{self._proc_name}{worker.device}", daemon=True)
        with _ENV_LOCK:   # the child's environment is copied at start: CUDA sees one device
            before = os.environ.get("CUDA_VISIBLE_DEVICES")
            os.environ["CUDA_VISIBLE_DEVICES"] = worker.device
            try:
                proc.start()
            finally:
                if before is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = before
        child.close()
        worker.proc, worker.conn, worker.state = proc, parent, "starting"
        worker.since = time.perf_counter()
        self._reset(worker)

    def _start(self) -> list[dict]:
        """Spawn every worker and wait until each has opened its GPU: their infos, by slot."""
        for worker in self.workers:
            self._spawn(worker)
        deadline = time.perf_counter() + START_TIMEOUT
        while any(w.state == "starting" for w in self.workers):
            self._poll(min(1.0, max(0.0, deadline - time.perf_counter())))
            if time.perf_counter() > deadline:
                break
        failed = [w for w in self.workers if w.state != "idle"]
        if failed:
            self.stop()
            w = failed[0]
            raise UserError(f"GPU {w.device}: {self._role} worker did not start "
                            f"({w.error or 'no answer in time'})", 3)
        return [w.info for w in self.workers]

    def stop(self) -> None:
        for worker in self.workers:
            if worker.proc is None:
                continue
            if worker.proc.is_alive():
                try:
                    worker.conn.send(("stop",))
                except (OSError, ValueError):
                    pass
                worker.proc.join(self._stop_join)
            if worker.proc.is_alive():
                worker.proc.kill()
                worker.proc.join(5)
            worker.conn.close()
            worker.proc = None

    def _errors(self) -> str:
        """Why the dead workers died, one line."""
        return "; ".join(sorted({w.error for w in self.workers if w.error}))

    def _poll(self, timeout: float, wake_r=None) -> None:
        """Wait for a worker message, a worker death, a busy worker's time limit or `wake_r`
        (a pipe's read end, drained); handle them."""
        live = [w for w in self.workers if w.proc is not None and w.state != "dead"]
        waitables = [w.conn for w in live] + [w.proc.sentinel for w in live]
        if wake_r is not None:
            waitables.append(wake_r)
        limit, now = self._time_limit(), time.perf_counter()
        deadlines = [w.since + limit - now for w in live if w.state == "busy"]
        timeout = max(0.0, min([timeout, *deadlines]))
        ready = connection.wait(waitables, timeout) if waitables else time.sleep(timeout) or []
        if wake_r is not None and wake_r in ready:
            os.read(wake_r, 65536)
        for worker in live:
            self._drain(worker)
            if worker.state != "dead" and not worker.proc.is_alive():
                # It may have sent its last message (a sticky error, a result) after the drain
                # above and then exited: read that first, or its death hides what it said.
                self._drain(worker)
                if worker.state != "dead" and not worker.proc.is_alive():
                    self._lost(worker, _died(worker.proc))
            elif worker.state == "busy" and time.perf_counter() - worker.since > limit:
                worker.proc.kill()
                worker.proc.join(5)
                self._lost(worker, f"{self._unit} timed out after {limit:g} s")
            elif worker.state == "starting" and \
                    time.perf_counter() - worker.since > START_TIMEOUT:
                worker.proc.kill()
                worker.proc.join(5)
                worker.state, worker.error = "dead", "no answer from a new worker in time"

    def _drain(self, worker: Worker) -> None:
        """Handle every message waiting in the worker's pipe."""
        try:
            while worker.conn.poll():
                self._message(worker, worker.conn.recv())
        except (EOFError, OSError):
            pass

    def _message(self, worker: Worker, message) -> None:
        kind = message[0]
        if kind == "ready":
            worker.state, worker.info = "idle", message[1]
        elif kind == "open_failed":
            worker.proc.join(5)
            worker.state, worker.error = "dead", message[1]
        elif kind == "result":
            self._result(worker, message)
        elif kind == "fatal":
            worker.proc.join(10)
            self._lost(worker, message[2])

    def _blame(self, key, error: str) -> str | None:
        """Count one more failed attempt at job `key`: its failure message once out of
        attempts, else None (retry it)."""
        tries = self._attempts[key] = self._attempts.get(key, 0) + 1
        return f"{error} (after {tries} attempts)" if tries >= ATTEMPTS else None

    def _lost(self, worker: Worker, error: str) -> None:
        """The worker process is gone: settle its jobs (`_orphaned`), start a replacement —
        unless it never started or has been replaced too often, then give the slot up."""
        self._orphaned(worker, error)
        try:
            worker.conn.close()
        except OSError:
            pass
        if worker.state == "starting" or \
                worker.restarts > 2 * ATTEMPTS * (self._restart_scale() + 1):
            worker.state, worker.error = "dead", worker.error or error
            return
        worker.restarts += 1
        self._spawn(worker)


def _died(proc) -> str:
    code = proc.exitcode
    why = (f"signal {signal.Signals(-code).name}" if code and code < 0
           else "still running" if code is None else f"exit code {code}")
    return f"worker died ({why})"
