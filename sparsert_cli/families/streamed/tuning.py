"""The streamed family's cost features (costmodel.FEATURES), from a plan or estimated from the
weight's row statistics without building one.

What a streamed kernel costs (H100 probes, docs/perf-notes.md): its code is one small loop, so
no instruction-fetch term; every table entry is, per warp, one share of a coalesced 8-byte load,
two shuffles or half a shared-memory load (stage), an address, one activation load (through L1,
from L2 on a miss) and one FMA per column unit; each row adds its table reads, epilogue and
store. The issue term takes the larger of the longest worker's chain and the SM's whole
instruction stream spread over its 4 schedulers.
"""

from __future__ import annotations

import numpy as np

from ...problem_shape import ELEMENT_BYTES, PRECISIONS, Geometry
from .plan import (PAD, ROW_VECTORS, StreamParams, check_limits, fit_params, slice_bounds,
                   tap_offsets, tile_layout, worker_rows)

LOOP_CODE_BYTES = 2048          # SASS of one segment's loop (both chunk paths)
# per entry, besides the FMAs: stage "shfl" two shuffles, an address (sign-extended add + LEA
# pair) and the load; "smem" half a 16-byte broadcast LDS, one IMAD.WIDE address and the load
ENTRY_INSTRUCTIONS = {"shfl": 4, "smem": 2.5, "ring": 3,
                      # tile: half a broadcast LDS, an address, two 16-bit LDS and a PRMT
                      "tile": 4.5}
# tile with row vectors: per entry and warp a quarter of (a broadcast 8-byte LDS, an address of
# three instructions, a 16-byte LDS, four PRMT and four HFMA2), the FMAs included
ROW_VECTOR_ENTRY_INSTRUCTIONS = 3.0
# tile: per tile row a thread copies (its loads, the zero fill, 16-byte stores, indexing)
TILE_ROW_INSTRUCTIONS = 16
ROW_INSTRUCTIONS = 24           # row table, accumulator zeroing and sum, epilogue, store
SEGMENT_INSTRUCTIONS = 10       # bounds, the first chunk's load, loop control
SMS = 132
SCHEDULERS = 4


def _units(width: int, precision: str) -> int:
    return max(1, width // 2) if precision == "fp16" else width


def _features(geometry: Geometry, params: StreamParams, precision: str, workers: int,
              row_entries: np.ndarray, worker_of: np.ndarray, nnz: int) -> dict[str, float]:
    dtype = PRECISIONS[precision][0]
    element = ELEMENT_BYTES[dtype]
    tiled = params.stage == "tile"          # one segment; one block an image
    segments = geometry.kernel ** 2 if geometry.masked and not tiled else 1
    per_thread = -(-geometry.columns // params.vector_width)
    tiles = geometry.batch if tiled else -(-per_thread // params.col_threads)
    columns = tiles * params.col_threads * params.vector_width
    entries = int(row_entries.sum())
    slices = params.k_slices
    # with K-slices a warp runs a row's share of one slice (its fixed costs once per slice);
    # the last slice's block adds the partials (one load per slice) before the epilogue
    vectors = tiled and params.vector_width == ROW_VECTORS
    per_row = (row_entries * (ROW_VECTOR_ENTRY_INSTRUCTIONS if vectors else
                              ENTRY_INSTRUCTIONS[params.stage]
                              + _units(params.vector_width, precision))
               + slices * (ROW_INSTRUCTIONS + SEGMENT_INSTRUCTIONS * segments)
               + (slices * 2 * _units(params.vector_width, precision) if slices > 1 else 0))
    chain = float(np.bincount(worker_of, weights=per_row, minlength=workers).max(initial=0)
                  ) / slices
    fill_bytes = 0.0
    if tiled:       # every block first copies its image (tile rows over the block's threads)
        layout = tile_layout(geometry, params.vector_width)
        copy_rows = -(-geometry.in_channels * layout.rows // (params.col_threads * params.warps))
        chain += copy_rows * (TILE_ROW_INSTRUCTIONS + geometry.width)
        fill_bytes = float(layout.bytes)
    longest = float(np.bincount(worker_of, weights=row_entries, minlength=workers
                                ).max(initial=0)) / slices
    blocks = tiles * (workers // params.warps) * slices
    warps_total = float(per_row.sum()) * tiles * params.col_threads / 32
    partials = 2 * 4 * slices * geometry.output_elems if slices > 1 else 0
    resident = max(1, min(32, 2048 // (params.col_threads * params.warps)))
    waves = max(1, -(-blocks // (SMS * resident)))
    code = float(LOOP_CODE_BYTES * segments)
    return {"launches": 1.0, "blocks": float(blocks),
            "threads_per_block": float(params.col_threads * params.warps),
            "code_bytes": code, "fetched_code_bytes": code * min(blocks, SMS),
            "max_block_code_bytes": code, "flops": 2.0 * nnz * geometry.columns,
            "dram_bytes": float(element * (geometry.input_elems + geometry.output_elems)
                                + 8 * entries),
            "l2_bytes": float(entries * tiles * (columns / tiles * element + 8) + partials
                              + fill_bytes * blocks),
            "serial_instructions": max(chain, warps_total / (SMS * SCHEDULERS) / waves),
            "loads": float(entries), "rows": float(geometry.out_channels),
            "max_worker_entries": longest}


def features(plan) -> dict[str, float]:
    """Exact cost features of a built streamed plan."""
    row_entries = plan.seg[:, -1] - plan.seg[:, 0]
    worker_of = np.repeat(np.arange(plan.workers), np.diff(plan.work))
    return _features(plan.geometry, plan.params, plan.precision, plan.workers, row_entries,
                     worker_of, plan.nnz)


def estimate(geometry: Geometry, csr, params: StreamParams, precision: str) -> dict[str, float]:
    """features() of the plan these parameters would give, from the CSR alone: the planner's
    worker assignment and each row's padded segment lengths."""
    params = fit_params(geometry, params, PRECISIONS[precision][0])
    check_limits(geometry, params, int(csr.nnz))
    m = geometry.out_channels
    segments = geometry.kernel ** 2 if geometry.masked and params.stage != "tile" else 1
    row_nnz = np.diff(csr.indptr)
    rows = np.repeat(np.arange(m), row_nnz)
    taps = csr.indices.astype(np.int64)
    segment, _ = tap_offsets(geometry, taps)
    if params.stage == "tile":
        segment = np.zeros_like(segment)
    slices = params.k_slices
    part = np.searchsorted(slice_bounds(geometry, slices), taps // geometry.kernel ** 2,
                           side="right") - 1
    cells = segments * slices
    counts = np.bincount(rows * cells + part * segments + segment,
                         minlength=m * cells).reshape(m, cells)
    padded = (-(-counts // PAD) * PAD).sum(axis=1)
    dealt = worker_rows(row_nnz, params)
    count = len(dealt)
    worker_of = np.empty(m, dtype=np.int64)
    for w, members in enumerate(dealt):
        worker_of[members] = w
    order = np.fromiter((r for members in dealt for r in members), dtype=np.int64, count=m)
    return _features(geometry, params, precision, count, padded[order], worker_of[order],
                     int(csr.nnz))
