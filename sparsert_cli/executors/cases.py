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
from dataclasses import dataclass, field
from multiprocessing import connection, get_context

from ..errors import UserError
from ..jobs import ATTEMPTS, is_sticky, one_line
from .local import _ENV_LOCK, START_TIMEOUT, _died


def _sticky_part(part: dict) -> bool:
    """A record part whose messages name a sticky CUDA error: this context is unusable."""
    texts = [str(part.get("verify_gpu", {}).get("message", ""))]
    texts += [str(b.get("message", "")) for b in (part.get("baselines") or {}).values()
              if isinstance(b, dict)]
    return any(is_sticky(t) for t in texts)


def _case_worker(conn, measure, device: str) -> None:
    """Body of a worker process: open the measure, answer cases until told to stop."""
    os.environ["CUDA_VISIBLE_DEVICES"] = device   # already set by the parent; before any CUDA
    try:
        info = measure.open()
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        conn.send(("open_failed", one_line(exc)))
        return
    conn.send(("ready", info))
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
                conn.send(("fatal", index, one_line(exc)))
                os._exit(3)
            part = {"verify_gpu": {"ok": False, "message": f"{type(exc).__name__}: {exc}"}}
        conn.send(("result", index, part, time.perf_counter() - start))
        if _sticky_part(part):           # recorded; the next case gets a fresh context
            os._exit(3)
    try:
        measure.close()
    finally:
        conn.close()


@dataclass
class _Worker:
    slot: int
    device: str
    proc: object = None
    conn: object = None
    state: str = "starting"      # starting | idle | busy | dead
    index: int | None = None     # the case being measured
    payload: object = None
    since: float = 0.0
    info: dict = field(default_factory=dict)
    cases: int = 0
    busy_seconds: float = 0.0
    restarts: int = 0
    error: str = ""


class CasePool:
    """One spawned worker per device number in `gpus` (CUDA ordinals, as `--gpus` gives)."""

    def __init__(self, gpus: list[int], measure, case_timeout: float = 3600.0):
        self.measure, self.case_timeout = measure, case_timeout
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        mapping = [d.strip() for d in visible.split(",")] if visible else None
        self.workers = [_Worker(slot, mapping[g] if mapping and g < len(mapping) else str(g))
                        for slot, g in enumerate(gpus)]
        self.context = get_context("spawn")
        self._todo: deque = deque()
        self._attempts: dict[int, int] = {}
        self._on_result = None

    def _spawn(self, worker: _Worker) -> None:
        parent, child = self.context.Pipe()
        proc = self.context.Process(target=_case_worker, args=(child, self.measure,
                                                               worker.device),
                                    name=f"sparsert-bench-gpu{worker.device}", daemon=True)
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
        worker.index, worker.since = None, time.perf_counter()

    def start(self) -> list[dict]:
        """Spawn the workers and wait until each has opened its GPU: their infos, by slot."""
        for worker in self.workers:
            self._spawn(worker)
        deadline = time.perf_counter() + START_TIMEOUT
        while any(w.state == "starting" for w in self.workers) and time.perf_counter() < deadline:
            self._poll(1.0)
        failed = [w for w in self.workers if w.state != "idle"]
        if failed:
            self.stop()
            w = failed[0]
            raise UserError(f"GPU {w.device}: bench worker did not start "
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
                worker.proc.join(30)
            if worker.proc.is_alive():
                worker.proc.kill()
                worker.proc.join(5)
            worker.conn.close()
            worker.proc = None

    def run(self, tasks, on_result) -> None:
        """Measure every (index, payload) of `tasks`; each index ends in one on_result."""
        self._todo, self._on_result = deque(tasks), on_result
        self._left = len(self._todo)
        while self._left:
            live = [w for w in self.workers if w.state != "dead"]
            if not live:                 # no worker can start any more: fail what is left
                error = "; ".join(sorted({w.error for w in self.workers if w.error}))
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

    def _poll(self, timeout: float) -> None:
        live = [w for w in self.workers if w.proc is not None and w.state != "dead"]
        now = time.perf_counter()
        deadlines = [w.since + self.case_timeout - now for w in live if w.state == "busy"]
        connection.wait([w.conn for w in live] + [w.proc.sentinel for w in live],
                        max(0.0, min([timeout, *deadlines])))
        for worker in live:
            try:
                while worker.conn.poll():
                    self._message(worker, worker.conn.recv())
            except (EOFError, OSError):
                pass
            if worker.state != "dead" and not worker.proc.is_alive():
                self._lost(worker, _died(worker.proc))
            elif worker.state == "busy" and \
                    time.perf_counter() - worker.since > self.case_timeout:
                worker.proc.kill()
                worker.proc.join(5)
                self._lost(worker, f"case timed out after {self.case_timeout:g} s")
            elif worker.state == "starting" and time.perf_counter() - worker.since > START_TIMEOUT:
                worker.proc.kill()
                worker.proc.join(5)
                worker.state, worker.error = "dead", "no answer from a new worker in time"

    def _message(self, worker: _Worker, message) -> None:
        kind = message[0]
        if kind == "ready":
            worker.state, worker.info = "idle", message[1]
        elif kind == "open_failed":
            worker.proc.join(5)
            worker.state, worker.error = "dead", message[1]
        elif kind == "result":
            worker.cases += 1
            worker.busy_seconds += message[3]
            worker.state, worker.index = "idle", None
            self._finish(message[1], message[2], worker.slot)
        elif kind == "fatal":
            worker.proc.join(10)
            self._lost(worker, message[2])

    def _lost(self, worker: _Worker, error: str) -> None:
        """The process is gone: retry or fail its case, start a replacement."""
        if worker.index is not None:
            index = worker.index
            tries = self._attempts[index] = self._attempts.get(index, 0) + 1
            if tries >= ATTEMPTS:
                self._finish(index, _failed(f"{error} (after {tries} attempts)"), worker.slot)
            else:
                self._todo.appendleft((index, worker.payload))
        worker.index = None
        try:
            worker.conn.close()
        except OSError:
            pass
        if worker.state == "starting" or worker.restarts > 2 * ATTEMPTS * (self._left + 1):
            worker.state, worker.error = "dead", worker.error or error
            return
        worker.restarts += 1
        self._spawn(worker)

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
