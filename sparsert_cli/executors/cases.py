"""`bench --gpus`: a config's cases spread over one spawned worker process per GPU of this host.

Each worker (a fresh interpreter with CUDA_VISIBLE_DEVICES=<i> set before anything initialises
CUDA) opens the measure once (`measure.open() -> info`: the bench measures its GPU's floors
there), then answers one case at a time: `measure(index, payload) -> record part`. A case is
sent to whichever worker is idle, in the caller's order. A worker that dies, hits a sticky CUDA
error or runs past `case_timeout` is replaced; the case it was measuring is retried once, then
answered with a failed `verify_gpu` naming the error — every case ends in exactly one
`on_result(index, part, slot)`.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing import get_context

from ..jobs import is_sticky, one_line
from .workers import Worker, WorkerPool, close_measure, devices, fatal, open_measure


def _sticky_part(part: dict) -> bool:
    """A record part whose messages name a sticky CUDA error: this context is unusable."""
    texts = [str(part.get("verify_gpu", {}).get("message", ""))]
    texts += [str(b.get("message", "")) for b in (part.get("baselines") or {}).values()
              if isinstance(b, dict)]
    return any(is_sticky(t) for t in texts)


def _case_worker(conn, measure, device: str) -> None:
    """Body of a worker process: open the measure, answer cases until told to stop."""
    if not open_measure(conn, measure, device):
        return
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):      # the parent went away
            break
        if message[0] == "stop":
            break
        _, index, payload = message
        start = time.perf_counter()
        try:
            part = measure(index, payload)
        except Exception as exc:  # noqa: BLE001 - a case's failure is its record
            if is_sticky(one_line(exc)):
                fatal(conn, index, one_line(exc))
            part = {"verify_gpu": {"ok": False, "message": f"{type(exc).__name__}: {exc}"}}
        conn.send(("result", index, part, time.perf_counter() - start))
        if _sticky_part(part):           # recorded; the next case gets a fresh context
            os._exit(3)
    close_measure(conn, measure)


@dataclass
class _Worker(Worker):
    index: int | None = None     # the case being measured
    payload: object = None
    cases: int = 0


class CasePool(WorkerPool):
    """One spawned worker per device number in `gpus` (CUDA ordinals, as `--gpus` gives)."""

    _target = _case_worker
    _proc_name, _role, _unit, _stop_join = "sparsert-bench-gpu", "bench", "case", 30.0

    def __init__(self, gpus: list[int], measure, case_timeout: float = 3600.0):
        self.measure, self.case_timeout = measure, case_timeout
        self.workers = [_Worker(slot, device) for slot, device in enumerate(devices(gpus))]
        self.context = get_context("spawn")
        self._todo: deque = deque()
        self._left = 0    # cases still to finish; 0 before run(), so a worker lost while the
        self._attempts: dict[int, int] = {}    # others start gets the smallest restart budget
        self._on_result = None

    def _reset(self, worker: _Worker) -> None:
        worker.index = None

    def _time_limit(self) -> float:
        return self.case_timeout

    def _restart_scale(self) -> int:
        return self._left

    def start(self) -> list[dict]:
        """Spawn the workers and wait until each has opened its GPU: their infos, by slot."""
        return self._start()

    def run(self, tasks, on_result) -> None:
        """Measure every (index, payload) of `tasks`; each index ends in one on_result."""
        self._todo, self._on_result = deque(tasks), on_result
        self._left = len(self._todo)
        while self._left:
            live = [w for w in self.workers if w.state != "dead"]
            if not live:                 # no worker can start any more: fail what is left
                error = self._errors()
                while self._todo:
                    index, _ = self._todo.popleft()
                    self._finish(index, _failed(f"no GPU worker left ({error})"), None)
                break
            for worker in live:
                if worker.state == "idle" and self._todo:
                    index, payload = self._todo.popleft()
                    try:
                        worker.conn.send(("case", index, payload))
                    except (OSError, ValueError):     # died while idle: not this case's fault
                        self._todo.appendleft((index, payload))
                        continue
                    worker.state, worker.index, worker.since = "busy", index, time.perf_counter()
                    worker.payload = payload
            self._poll(1.0)

    def _result(self, worker: _Worker, message) -> None:
        worker.cases += 1
        worker.busy_seconds += message[3]
        worker.state, worker.index = "idle", None
        self._finish(message[1], message[2], worker.slot)

    def _orphaned(self, worker: _Worker, error: str) -> None:
        """Retry or fail the case the lost worker was measuring."""
        if worker.index is not None:
            index = worker.index
            message = self._blame(index, error)
            if message:
                self._finish(index, _failed(message), worker.slot)
            else:
                self._todo.appendleft((index, worker.payload))
        worker.index = None

    def _finish(self, index: int, part: dict, slot: int | None) -> None:
        self._left -= 1
        self._on_result(index, part, slot)

    def stats(self) -> list[dict]:
        return [{"slot": w.slot, "device": w.device, "cases": w.cases,
                 "busy_seconds": round(w.busy_seconds, 3),
                 "cases_per_second": (round(w.cases / w.busy_seconds, 3) if w.busy_seconds
                                      else None), "restarts": w.restarts}
                for w in self.workers]


def _failed(message: str) -> dict:
    return {"verify_gpu": {"ok": False, "message": message}}
