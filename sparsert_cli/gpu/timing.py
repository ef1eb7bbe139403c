"""Timing harness: how long one enqueued operation takes on a Gpu's stream. Three variants, each a
function returning raw per-launch samples; summaries (median, p20/p80) are the caller's.

  graph()   -- `per_graph` launches captured into a CUDA graph, replayed `replays` times (falls
               back to plain stream launches, method "stream", when capture fails);
  stream()  -- the same launches enqueued directly (long operations a graph would change);
  cold_l2() -- one launch per graph, a 2x-L2 memset before every replay.

Before every timed replay a ~50 us spin kernel is queued, so the start event, the graph launch and
the stop event are all submitted while the GPU is still busy: host submission latency stays out of
the measurement. A cold sample carries one graph launch's fixed cost (H100: empty kernel 2.98 us at
per_graph=1, 1.0 at 20): compare cold numbers only with cold numbers.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

from .runtime import Gpu, Kernel, _one_line, cu, ptx_header

_SPIN_NS = 50_000           # GPU busy time queued ahead of each timed replay
# Busy-waits ~_SPIN_NS on %globaltimer, touching no memory (so it leaves L2 as it was).
# The iteration cap keeps it finite should the timer ever stand still.
_SPIN_PTX = f""".visible .entry sparsert_spin()
{{
    .reg .pred %p<3>;
    .reg .b64 %rd<5>;
    mov.u64 %rd1, %globaltimer;
    mov.u64 %rd4, 0;
$L_spin:
    mov.u64 %rd2, %globaltimer;
    sub.s64 %rd3, %rd2, %rd1;
    add.s64 %rd4, %rd4, 1;
    setp.lt.s64 %p1, %rd3, {_SPIN_NS};
    setp.lt.s64 %p2, %rd4, 10000000;
    and.pred %p1, %p1, %p2;
    @%p1 bra $L_spin;
    ret;
}}
"""


@dataclass(frozen=True)
class Timing:
    """Per-launch times in microseconds, one sample per timed replay."""

    samples_us: tuple[float, ...]
    method: str          # "graph" (CUDA-graph replay) or "stream" (no graph)
    per_graph: int       # launches per timed replay; each sample is elapsed / per_graph
    cold_l2: bool = False
    note: str = ""       # why capture failed, when a graph was asked for and method == "stream"


class _Helpers:
    """Per-Gpu timing state: two timing events, the spin kernel, the L2 scratch buffer.
    Released by the Gpu when it closes."""

    def __init__(self, gpu: Gpu):
        from cuda.bindings import driver

        flags = int(driver.CUevent_flags.CU_EVENT_DEFAULT)   # timing enabled
        self.events = (cu("cuEventCreate", flags), cu("cuEventCreate", flags))
        gpu.at_close(self.close)
        from ..compile import ptx_to_cubin
        cubin = ptx_to_cubin(ptx_header(gpu.arch) + _SPIN_PTX, gpu.arch).cubin
        self.spin: Kernel = gpu.load(cubin, "sparsert_spin")
        self.scratch = None
        self.flush_value = 0

    def close(self) -> None:
        events, self.events = self.events, ()
        for event in events:
            cu("cuEventDestroy", event)


_HELPERS: "weakref.WeakKeyDictionary[Gpu, _Helpers]" = weakref.WeakKeyDictionary()


def _helpers(gpu: Gpu) -> _Helpers:
    if gpu not in _HELPERS or not _HELPERS[gpu].events:
        _HELPERS[gpu] = _Helpers(gpu)
    return _HELPERS[gpu]


def _check(per_graph: int, replays: int, warmup: int) -> None:
    if per_graph < 1 or replays < 1 or warmup < 0:
        raise ValueError("per_graph and replays must be >= 1 and warmup >= 0")


def _samples(gpu: Gpu, run: Callable[[], None], per_graph: int, replays: int,
             flush: bool) -> tuple[float, ...]:
    """Run once untimed, then `replays` timed runs (spin first; with flush, an L2 flush first)."""
    helpers = _helpers(gpu)
    start, stop = helpers.events
    run()
    gpu.synchronize()
    samples = []
    for _ in range(replays):
        if flush:
            _flush_l2(gpu, helpers)
        gpu.launch(helpers.spin, (1, 1, 1), (32, 1, 1), 0, [])
        cu("cuEventRecord", start, gpu.stream)
        run()
        cu("cuEventRecord", stop, gpu.stream)
        cu("cuEventSynchronize", stop)
        samples.append(cu("cuEventElapsedTime", start, stop) * 1000.0 / per_graph)
    return tuple(samples)


def _flush_l2(gpu: Gpu, helpers: _Helpers) -> None:
    if helpers.scratch is None:
        helpers.scratch = gpu.alloc(2 * max(gpu.l2_bytes, 1 << 20))
    helpers.flush_value ^= 1   # a different value each time: no write can be skipped
    gpu.memset(helpers.scratch, helpers.flush_value)


def _warm(gpu: Gpu, enqueue: Callable[[], None], warmup: int) -> None:
    _helpers(gpu)             # load the spin kernel before anything is captured
    for _ in range(warmup):
        enqueue()
    gpu.synchronize()


def _graphed(gpu: Gpu, enqueue, per_graph: int, replays: int, flush: bool) -> Timing:
    graph_exec, note = capture(gpu, enqueue, per_graph)
    try:
        if graph_exec is None:
            def run():
                for _ in range(per_graph):
                    enqueue()
        else:
            def run():
                cu("cuGraphLaunch", graph_exec, gpu.stream)
        samples = _samples(gpu, run, per_graph, replays, flush)
    finally:
        if graph_exec is not None:
            cu("cuGraphExecDestroy", graph_exec)
    return Timing(samples, "graph" if graph_exec is not None else "stream", per_graph, flush,
                  note)


def graph(gpu: Gpu, enqueue: Callable[[], None], *, per_graph: int = 20, replays: int = 10,
          warmup: int = 3) -> Timing:
    """Per-launch time of `enqueue` (which puts exactly one run on gpu.stream): warm up, capture
    `per_graph` runs into a CUDA graph, replay it once untimed, then `replays` times between two
    events; each sample is elapsed / per_graph. If capture fails (a call that cannot be
    captured), the same runs are timed as plain back-to-back enqueues (method "stream")."""
    _check(per_graph, replays, warmup)
    _warm(gpu, enqueue, warmup)
    return _graphed(gpu, enqueue, per_graph, replays, False)


def cold_l2(gpu: Gpu, enqueue: Callable[[], None], *, replays: int = 10,
            warmup: int = 3) -> Timing:
    """Like graph() with one launch per graph and a 2x-L2 scratch memset (outside the events)
    before every replay: in a graph of several launches only the first would see a cold L2."""
    _check(1, replays, warmup)
    _warm(gpu, enqueue, warmup)
    return _graphed(gpu, enqueue, 1, replays, True)


def stream(gpu: Gpu, enqueue: Callable[[], None], *, per_graph: int = 20, replays: int = 10,
           warmup: int = 3) -> Timing:
    """`per_graph` back-to-back enqueues per timed replay, no graph (big copies: a captured copy
    node moved 2.44 TB/s on an H100, the same copy on the stream 3.00 TB/s)."""
    _check(per_graph, replays, warmup)
    _warm(gpu, enqueue, warmup)

    def run():
        for _ in range(per_graph):
            enqueue()
    return Timing(_samples(gpu, run, per_graph, replays, False), "stream", per_graph)


def capture(gpu: Gpu, enqueue: Callable[[], None], count: int):
    """(uploaded graph exec, "") or (None, why capture failed). Never leaves the stream
    capturing."""
    from cuda.bindings import driver

    cu("cuStreamBeginCapture", gpu.stream,
       driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
    failure = ""
    try:
        for _ in range(count):
            enqueue()
    except Exception as exc:  # noqa: BLE001 - any failure inside capture means "not capturable"
        failure = _one_line(exc)
    err, graph_ = driver.cuStreamEndCapture(gpu.stream)   # None or NULL on failure
    if failure or int(err) != 0 or graph_ is None or not int(graph_):
        if int(err) == 0 and graph_ is not None and int(graph_):
            cu("cuGraphDestroy", graph_)
        _clear_capture_error(gpu)
        return None, failure or f"cuStreamEndCapture returned {getattr(err, 'name', err)}"
    try:
        graph_exec = cu("cuGraphInstantiate", graph_, 0)
    finally:
        cu("cuGraphDestroy", graph_)   # the executable graph does not need it
    cu("cuGraphUpload", graph_exec, gpu.stream)
    return graph_exec, ""


def _clear_capture_error(gpu: Gpu) -> None:
    """After a failed capture: clear the runtime's last error (best effort: a library with its
    own static cudart keeps its own), and make sure the stream really left capture."""
    from cuda.bindings import driver
    try:
        from cuda.bindings import runtime
        runtime.cudaGetLastError()
    except Exception:  # noqa: BLE001 - nothing to clear if the runtime never loaded
        pass
    status = cu("cuStreamIsCapturing", gpu.stream)
    if int(status) != int(driver.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_NONE):
        raise RuntimeError(f"stream still capturing after cuStreamEndCapture: {status!r}")
