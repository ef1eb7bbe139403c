"""Execute a plan on the CPU, the way the generated kernel does, in float64.

It walks the same thread/column mapping, address arithmetic, tap masks, slices and epilogue that the
emitters print, and checks what the GPU cannot report: every load in bounds, every vector load
aligned, every output element written exactly once.

fp16 plans are executed with the kernel's roundings: weights (and bias) rounded to fp16, every
half2 FMA rounded once to fp16 (float64 holds a product of two halves plus a half exactly, so
rounding that is a fused multiply-add), fp16 epilogue arithmetic, and fp16 outputs.
"""

from __future__ import annotations

import numpy as np

from .plan import Plan


class PlanExecutionError(AssertionError):
    pass


def thread_columns(plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """First column of every thread (clamped so all loads stay in bounds) and whether it stores."""
    geo, width = plan.geometry, plan.vector_width
    tiles = plan.grid[0]
    first = (np.arange(tiles * plan.col_threads, dtype=np.int64)) * width
    active = first < geo.columns
    return np.minimum(first, geo.columns - width), active


def column_bases(plan: Plan, first: np.ndarray):
    """Per thread: input base offset, output base offset, and (ih, iw) of the window's corner."""
    geo = plan.geometry
    image, pixel = np.divmod(first, geo.out_pixels)
    oh, ow = np.divmod(pixel, geo.out_width)
    ih = oh * geo.stride - geo.padding
    iw = ow * geo.stride - geo.padding
    in_base = image * geo.image_elems + ih * geo.width + iw
    out_base = image * geo.out_channels * geo.out_pixels + pixel
    return in_base, out_base, ih, iw


def _gather(plan: Plan, x: np.ndarray, in_base, ih, iw, taps) -> np.ndarray:
    """Activation values of `taps` for every thread lane: shape (len(taps), threads, width)."""
    geo, width = plan.geometry, plan.vector_width
    offsets = np.array([geo.tap_offset(t) for t in taps], dtype=np.int64)
    lanes = np.arange(width, dtype=np.int64)
    addr = in_base[None, :, None] + offsets[:, None, None] + lanes[None, None, :]
    mask = np.ones(addr.shape, dtype=bool)
    if geo.masked:
        rs = np.array([geo.tap_rs(t)[1:] for t in taps], dtype=np.int64).reshape(-1, 2)
        row_ok = (ih[None, :] + rs[:, :1] >= 0) & (ih[None, :] + rs[:, :1] < geo.height)
        col_ok = (iw[None, :] + rs[:, 1:] >= 0) & (iw[None, :] + rs[:, 1:] < geo.width)
        mask = np.broadcast_to((row_ok & col_ok)[:, :, None], addr.shape)
    if width > 1 and np.any((addr[:, :, 0] % width)[mask[:, :, 0]]):
        raise PlanExecutionError("a vector load is not aligned to its width")
    live = addr[mask]
    if live.size and (live.min() < 0 or live.max() >= x.size):
        raise PlanExecutionError(f"out-of-bounds load: address range {live.min()}..{live.max()} "
                                 f"outside 0..{x.size - 1}")
    if geo.masked:     # padded taps read the zero buffer at c*H*W: check that stays inside it
        zero_addr = np.array([geo.tap_rs(t)[0] * geo.height * geo.width for t in taps])
        if zero_addr.size and zero_addr.max() + width > geo.image_elems:
            raise PlanExecutionError("zero-buffer read out of bounds")
    values = np.zeros(addr.shape, dtype=np.float64)
    values[mask] = x[live]
    return values


def _f16(values):
    return np.asarray(values, dtype=np.float64).astype(np.float16).astype(np.float64)


def _sum_half(acc: np.ndarray, values: np.ndarray, loads) -> np.ndarray:
    """fp16 sums: one rounded FMA per (load, row) in load order, as the kernel does."""
    for i, load in enumerate(loads):
        slots = np.fromiter((slot for slot, _ in load.uses), dtype=np.int64, count=len(load.uses))
        weights = _f16([value for _, value in load.uses])
        acc[slots] = _f16(acc[slots] + weights[:, None, None] * values[i][None])
    return acc


def execute(plan: Plan, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
    """Run the plan on input `x` (any shape with the geometry's element count); returns the output
    as a flat float64 array of batch*M*Ho*Wo elements (NCHW)."""
    geo, width = plan.geometry, plan.vector_width
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size != geo.input_elems:
        raise PlanExecutionError(f"input has {x.size} elements, plan expects {geo.input_elems}")
    if plan.epilogue.residual:
        if residual is None:
            raise PlanExecutionError("plan adds a residual but none was given")
        residual = np.asarray(residual, dtype=np.float64).ravel()
    half_acc = plan.accumulate == "fp16"
    rnd = _f16 if half_acc else (lambda v: v)          # rounding of epilogue arithmetic
    if plan.dtype == "fp16":   # the kernel reads fp16: inputs must already be representable
        if not np.array_equal(x, _f16(x)) or (residual is not None
                                               and not np.array_equal(residual, _f16(residual))):
            raise PlanExecutionError("fp16 plan given inputs that are not fp16 values")
    first, active = thread_columns(plan)
    in_base, out_base, ih, iw = column_bases(plan, first)
    out = np.full(geo.output_elems, np.nan)
    writes = np.zeros(geo.output_elems, dtype=np.int64)
    lanes = np.arange(width, dtype=np.int64)
    store_addr = (out_base[active][:, None] + lanes[None, :])
    for group in plan.groups:
        acc = np.zeros((len(group.rows), len(first), width))
        for loads in group.slices:             # slices sum in order, as the reduction does
            if not loads:
                continue
            values = _gather(plan, x, in_base, ih, iw, [ld.tap for ld in loads])
            if half_acc:       # each slice sums alone; the reduction adds slices in fp16
                acc = rnd(acc + _sum_half(np.zeros_like(acc), values, loads))
                continue
            weights = np.zeros((len(group.rows), len(loads)))
            for i, load in enumerate(loads):
                for slot, value in load.uses:
                    weights[slot, i] = value
            if plan.dtype == "fp16":
                weights = _f16(weights)
            acc += np.einsum("rl,ltw->rtw", weights, values)
        for slot, row in enumerate(group.rows):
            y = acc[slot][active]
            if plan.epilogue.bias is not None and plan.epilogue.bias[row] != 0.0:
                y = rnd(y + rnd(plan.epilogue.bias[row]))
            addr = store_addr + row * geo.out_pixels
            if residual is not None:
                y = rnd(y + residual[addr])
            if plan.epilogue.activation in ("relu", "relu6"):
                y = np.maximum(y, 0.0)
            if plan.epilogue.activation == "relu6":
                y = np.minimum(y, 6.0)
            out[addr] = _f16(y) if plan.dtype == "fp16" else y
            np.add.at(writes, addr.ravel(), 1)
    if not np.all(writes == 1):
        raise PlanExecutionError(f"{int(np.sum(writes == 0))} outputs never written, "
                                 f"{int(np.sum(writes > 1))} written more than once")
    return out
