"""Lowering: a streamed-family plan -> StreamIR (ir.py). Decides the column mapping (shared with
the immediate family), the tap bases and the data exactly as the kernel holds it."""

from __future__ import annotations

import numpy as np

from ...ir import StreamIR, TapBase
from ..immediate.lower import column_ops
from .plan import StreamPlan


def held(plan: StreamPlan, values) -> np.ndarray:
    """Values as the kernel holds them: fp16 with fp16 sums, else float32 (as float64)."""
    kind = np.float16 if plan.accumulate == "fp16" else np.float32
    return np.asarray(values, dtype=np.float64).astype(kind).astype(np.float64)


def lower(plan: StreamPlan) -> StreamIR:
    geo, k = plan.geometry, plan.geometry.kernel
    tiled = plan.params.stage == "tile"     # thread mapping, pointers and padding: the tile's
    bases = tuple(TapBase(t // k, t % k, -((t // k) * geo.width + t % k))
                  for t in range(plan.segments)) if geo.masked and not tiled else ()
    epi = plan.epilogue
    bias = tuple(held(plan, epi.bias).tolist()) if epi.bias is not None else None
    pointers = () if tiled else (("x", "inoff"), ("y", "outoff")) + (
        (("res", "outoff"),) if epi.residual else ())
    return StreamIR(
        entry=plan.entry,
        comment=(f"{plan.params.name()}, {plan.nnz} nonzeros, {len(plan.row_out)} rows on "
                 f"{plan.workers} workers" + (f" x {plan.k_slices} K-slices"
                                              if plan.k_slices > 1 else "")),
        geometry=geo, dtype=plan.dtype, accumulate=plan.accumulate,
        vector_width=plan.vector_width, col_threads=plan.col_threads, warps=plan.params.warps,
        chains=plan.params.chains, grid=plan.grid, arguments=plan.arguments,
        columns=() if tiled else column_ops(plan), pointers=pointers, bases=bases,
        work=plan.work.astype(np.int64), row_out=plan.row_out.astype(np.int64),
        seg=plan.seg.astype(np.int64), offsets=plan.offsets.astype(np.int64),
        values=held(plan, plan.values), bias=bias, residual=epi.residual,
        activation=epi.activation, stage=plan.params.stage, k_slices=plan.k_slices,
        min_blocks=plan.params.min_blocks, token_major=epi.token_major,
        tile_rows=plan.tile_rows, planes=epi.planes, staged=plan.staged_entries)
