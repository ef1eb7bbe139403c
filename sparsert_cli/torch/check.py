"""Per-layer checks of sparsify_: a SparseLayer's output against its float64 reference (torch's
grouped convolution for depthwise layers: no C x C weight is made), and timing: warm (CUDA
graph, `time_us`) and as a whole forward sees a layer (`time_cold_us`)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from sparsert_cli.reference import SLOPE
from sparsert_cli.torch.activations import activate


def _grouped_reference(weight, bias, activation, x, stride, padding, groups, res=None):
    """(float64 reference, magnitude) of a grouped (depthwise) convolution, by torch on the
    CPU in float64 (no C x C weight is made)."""
    w, x = torch.from_numpy(weight.astype(np.float64)), torch.from_numpy(x)
    b = None if bias is None else torch.from_numpy(bias.astype(np.float64))
    r = None if res is None else torch.from_numpy(res)
    y = F.conv2d(x, w, b, stride, padding, 1, groups) + (0.0 if r is None else r)
    mag = F.conv2d(x.abs(), w.abs(), None if b is None else b.abs(), stride, padding, 1, groups)
    mag = (mag + (0.0 if r is None else r.abs())) * SLOPE.get(activation, 1.0)
    return activate(y, activation).numpy(), mag.numpy()


def _reference(kind: str, weight: np.ndarray, bias, activation: str, x: np.ndarray, stride,
               padding, res=None, groups: int = 1):
    """(float64 reference, magnitude) of the folded layer, in the op's output layout."""
    from sparsert_cli.reference import conv_reference

    if groups > 1:
        return _grouped_reference(weight, bias, activation, x, stride, padding, groups, res)
    if kind == "linear":
        m, k = weight.shape
        x4 = x.reshape(-1, k).T.reshape(1, k, 1, -1)
        w4 = weight.reshape(m, k, 1, 1)
        r4 = None if res is None else res.reshape(-1, m).T.reshape(1, m, 1, -1)  # (..., M) in
        ref = conv_reference(w4, x4, 1, 0, bias, r4, activation)
        mag = conv_reference(w4, x4, 1, 0, bias, r4, activation, absolute=True)
        return ref.reshape(m, -1).T, mag.reshape(m, -1).T
    return (conv_reference(weight, x, stride, padding, bias, res, activation),
            conv_reference(weight, x, stride, padding, bias, res, activation, absolute=True))


def verify(layer, x: torch.Tensor, res, dtype: str) -> dict:
    """A SparseLayer's op on its recorded input vs float64: {"ok", "max_err", "max_rel_err",
    "message"}."""
    from sparsert_cli.reference import check

    with torch.no_grad():
        y = layer.run(x, res)
        y = layer.tokens(y) if hasattr(layer, "tokens") else y
    if y.is_cuda:
        torch.cuda.synchronize(y.device)
    out = y.detach().float().cpu().numpy().astype(np.float64)
    weight = layer.weight.float().cpu().numpy()
    bias = None if layer.bias is None else layer.bias.float().cpu().numpy()
    x64 = x.detach().float().cpu().numpy().astype(np.float64)
    res64 = None if res is None else res.detach().float().cpu().numpy().astype(np.float64)
    ref, mag = _reference(layer.kind, weight, bias, layer.activation, x64, layer.stride,
                          layer.padding, res64, layer.groups)
    k = int(np.prod(weight.shape[1:]))          # taps per output (depthwise: R*S)
    ok, err, message = check(out.reshape(ref.shape), ref, mag, dtype, k)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return {"ok": ok, "max_err": err, "max_rel_err": err / scale if scale else err,
            "message": message}


def captured_graph(fn, inputs: tuple, calls: int = 1, warmup: int = 3):
    """A CUDA graph of `calls` calls of fn(*inputs), after `warmup` calls on a side stream."""
    device = inputs[0].device
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(warmup):
            fn(*inputs)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        for _ in range(calls):
            fn(*inputs)
    return graph


GATE_CYCLES = 4_000_000     # ~2 ms of GPU sleep while the host queues what is timed
_GATE_TRIES = 4             # each try sleeps 4x longer


def gated(enqueue) -> list:
    """Run enqueue() -- it queues GPU work between timing events and returns them -- behind a
    GPU sleep, so that all of it is queued before the GPU reaches any of it: host time (Python,
    a busy GIL) never falls between two events. The sleep is lengthened 4x and the work queued
    again while the GPU woke before enqueue() returned, up to _GATE_TRIES times (then the last
    samples are kept, with a RuntimeWarning). Returns what enqueue() returned, after the device
    synchronised."""
    sleep = getattr(torch.cuda, "_sleep", None)     # private: absent, the samples go ungated
    if sleep is None:
        out = enqueue()
        torch.cuda.synchronize()
        return out
    cycles = GATE_CYCLES
    for attempt in range(_GATE_TRIES):
        gate = torch.cuda.Event()
        sleep(cycles)
        gate.record()
        out = enqueue()
        early = gate.query()        # True: the GPU woke before the last event was queued
        torch.cuda.synchronize()
        if not early:
            return out
        cycles *= 4
    warnings.warn(f"sparsert: the host queued a timer's samples slower than a {cycles // 4} "
                  "cycle GPU sleep; its times may include host delay", RuntimeWarning,
                  stacklevel=3)
    return out


def time_us(fn, inputs: tuple, per_graph: int = 20, replays: int = 7) -> float:
    """Median per-call time of fn(*inputs) replayed from a CUDA graph (L2 warm)."""
    graph = captured_graph(fn, inputs, per_graph, warmup=3)
    graph.replay()
    with torch.cuda.device(inputs[0].device):
        pairs = gated(lambda: _replays(graph, replays))
    return float(np.median([s.elapsed_time(e) * 1e3 / per_graph for s, e in pairs]))


def _replays(graph, count: int, before=None) -> list:
    """Queue `count` replays of `graph`, each between two timing events (after before())."""
    pairs = []
    for _ in range(count):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        pairs.append((start, end))
    return pairs


_EVICT: dict = {}       # device index -> (4 x L2 bytes to read, a scalar to sum into)


def release_evict() -> None:
    """Free time_cold_us's eviction buffers (4 x L2 bytes per device, 200 MB on an H100)."""
    _EVICT.clear()


def time_cold_us(fn, inputs: tuple, samples: int = 15) -> float:
    """Median time of fn(*inputs) as a layer runs inside a whole forward: L2 holds none of its
    code, weights or tables (a kernel has just read four times the L2's size elsewhere: read,
    not written, so no dirty lines are left for fn to write back), but its inputs were just
    written (copied into fresh tensors after the eviction). fn is captured once in a CUDA
    graph and replayed between two events; every sample is queued behind a GPU sleep (gated),
    so host time is not counted, launch gaps inside fn are."""
    device = inputs[0].device
    key = device.index or 0
    if key not in _EVICT:
        l2 = max(int(torch.cuda.get_device_properties(device).L2_cache_size), 1 << 24)
        _EVICT[key] = (torch.ones(l2, dtype=torch.float32, device=device),  # 4 x L2 bytes
                       torch.empty((), dtype=torch.float32, device=device))
    evict, sink = _EVICT[key]
    fresh = tuple(t.clone() for t in inputs)
    graph = captured_graph(fn, fresh, 1, warmup=2)

    def evict_and_refresh():
        torch.sum(evict, dim=0, out=sink)
        for dst, src in zip(fresh, inputs):
            dst.copy_(src)

    with torch.cuda.device(device):
        pairs = gated(lambda: _replays(graph, samples + 2, evict_and_refresh))
    return float(np.median([s.elapsed_time(e) * 1e3 for s, e in pairs[2:]]))


def verify_fused(layer, kernel, x: torch.Tensor) -> dict:
    """A FusedPair's op (pairs.py) on its recorded input vs the fused kernel's float64
    reference (fused.FusedKernel.check: the 1x1 layer, its output rounded to the storage type,
    then the depthwise layer): {"ok", "max_err", "max_rel_err", "message"}."""
    with torch.no_grad():
        y = layer.run(x)
    if y.is_cuda:
        torch.cuda.synchronize(y.device)
    out = y.detach().float().cpu().numpy().astype(np.float64)
    x64 = x.detach().float().cpu().numpy().astype(np.float64)
    ok, err, message = kernel.check(out, x64)
    ref, _ = kernel.reference(x64)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return {"ok": ok, "max_err": err, "max_rel_err": err / scale if scale else err,
            "message": message}
