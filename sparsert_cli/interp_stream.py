"""Execute a streamed-family kernel's IR (ir.StreamIR) on the CPU the way the GPU runs it.

Every thread's column variables and tap bases come from the IR's own index arithmetic; workers
walk their row entries, each row entry its segments, each segment its nonzeros in order, nonzero
k of a segment feeding accumulator k % chains; with K-slices, each slice's sums are a partial
and the partials are added in slice order before the epilogue. Stage "tile": each image's
zero-padded tile is built as its layout (plan.py TileLayout) defines it, and every entry reads
the thread's pixel (and its pair's) from it; the printed copy that fills the tile is checked
against that layout only on the GPU (tests/gpu/test_tile_gpu.py).
Sums are float64; with fp16 sums every half2 FMA and epilogue step is rounded to fp16 as the GPU
does. Checked on the way: the data tables are consistent (the grid's workers, monotonic ranges),
every load lies in its buffer (inactive threads included) and is aligned, every output is written
exactly once.
"""

from __future__ import annotations

import numpy as np

from .families.streamed.plan import PAD, VECTOR_SELECTORS, tile_layout
from .interp_base import PlanExecutionError, _f16, evaluate
from .ir import StreamIR
from .reference import gelu
from .storage import rounded


def schedule(seg: np.ndarray, chains: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(entry, chain, segment) of every step of every row entry, shape (rows, steps), -1 where a
    row has finished: the order the kernel's loop runs them (nonzero k of a segment feeds
    accumulator k % chains)."""
    rows, segments = seg.shape[0], seg.shape[1] - 1
    lengths = np.diff(seg, axis=1)                            # (rows, segments)
    steps = int(lengths.sum(axis=1).max(initial=0))
    out = [np.full((rows, steps), -1, dtype=np.int64) for _ in range(3)]
    for i in range(rows):
        es = np.concatenate([np.arange(seg[i, t], seg[i, t + 1]) for t in range(segments)]
                            ) if segments else np.zeros(0, np.int64)
        cs = np.concatenate([np.arange(lengths[i, t]) % chains for t in range(segments)]
                            ) if segments else np.zeros(0, np.int64)
        ts = np.repeat(np.arange(segments), lengths[i])
        for array, values in zip(out, (es, cs, ts)):
            array[i, :len(values)] = values
    return tuple(out)


def _check_tables(ir: StreamIR) -> None:
    work, seg, nnz = ir.work, ir.seg, len(ir.offsets)
    workers = ir.grid[0] * ir.warps
    if len(work) != workers + 1:
        raise PlanExecutionError(f"{len(work) - 1} worker ranges for {workers} workers")
    if work[0] != 0 or np.any(np.diff(work) < 0) or work[-1] != len(ir.row_out):
        raise PlanExecutionError("worker ranges do not cover the row entries in order")
    if np.any(np.diff(seg, axis=1) < 0) or (seg.size and (seg.min() < 0 or seg.max() > nnz)):
        raise PlanExecutionError("segment ranges out of order or outside the nonzeros")
    tiled = ir.stage == "tile"          # one run of entries a row, padding in the tile
    segments = ir.geometry.kernel ** 2 if ir.geometry.masked and not tiled else 1
    slices = ir.k_slices
    if ir.grid[2] != slices:
        raise PlanExecutionError(f"grid has {ir.grid[2]} slices for {slices} K-slices")
    if seg.shape != (len(ir.row_out), slices * (segments + 1)) or len(ir.bases) != (
            segments if ir.geometry.masked and not tiled else 0):
        raise PlanExecutionError(f"{seg.shape[0]} rows of {seg.shape[1]} segment bounds and "
                                 f"{len(ir.bases)} tap bases for {len(ir.row_out)} row entries "
                                 f"of {slices} x {segments} segments")
    if np.any(np.diff(seg, axis=1) % PAD):
        raise PlanExecutionError(f"a segment is not whole groups of {PAD} entries (the loop "
                                 f"would read past its end)")
    if len(ir.values) != nnz:
        raise PlanExecutionError("offsets and values differ in length")
    rows = ir.geometry.out_channels
    if len(ir.row_out) and (ir.row_out.min() < 0 or ir.row_out.max() >= rows):
        raise PlanExecutionError("a row entry names a row outside the output")
    if ir.tile_rows:        # each block stages rows [b * tile_rows, (b + 1) * tile_rows)
        if not ir.token_major or ir.k_slices > 1:
            raise PlanExecutionError("a staged tile needs a token-major output and one K-slice")
        block = np.repeat(np.arange(workers) // ir.warps, np.diff(work))
        if np.any(ir.row_out // ir.tile_rows != block):
            raise PlanExecutionError("a row entry lies outside its block's staged tile")


def _partial(ir: StreamIR, x: np.ndarray, seg: np.ndarray, inside: np.ndarray,
             shifts: np.ndarray, base_x: np.ndarray) -> np.ndarray:
    """One K-slice's sums (rows, threads, width): its segments' nonzeros in loop order, each
    chain's accumulator, then the chains added in order."""
    geo, width, chains = ir.geometry, ir.vector_width, ir.chains
    rnd = _f16 if ir.accumulate == "fp16" else (lambda v: v)
    lanes = np.arange(width, dtype=np.int64)
    entry, chain, segment = schedule(seg, chains)
    rows, threads = len(ir.row_out), len(base_x)
    acc = np.zeros((rows, chains, threads, width))
    offsets, values = ir.offsets, ir.values
    row_index = np.arange(rows)
    for step in range(entry.shape[1]):
        live = entry[:, step] >= 0
        if not np.any(live):
            continue
        e, c, t, r = entry[live, step], chain[live, step], segment[live, step], row_index[live]
        ok = inside[t]                                       # (live, threads)
        addr_x = base_x[None, :] + offsets[e][:, None]       # (live, threads)
        addr_z = offsets[e][:, None] + shifts[t][:, None] + np.zeros_like(base_x)[None, :]
        addr = np.where(ok, addr_x, addr_z)
        if width > 1 and np.any(addr % width):
            raise PlanExecutionError("misaligned vector load")
        full = addr[..., None] + lanes
        bad_x = ok[..., None] & ((full < 0) | (full >= geo.input_elems))
        bad_z = ~ok[..., None] & ((full < 0) | (full >= geo.image_elems))
        if np.any(bad_x) or np.any(bad_z):
            raise PlanExecutionError(f"load out of bounds at step {step} "
                                     f"({'input' if np.any(bad_x) else 'zero buffer'})")
        loaded = np.where(ok[..., None], x[np.clip(full, 0, geo.input_elems - 1)], 0.0)
        acc[r, c] = rnd(acc[r, c] + values[e][:, None, None] * loaded)
    total = acc[:, 0]
    for k in range(1, chains):
        total = rnd(total + acc[:, k])
    return total


def _tile_image(ir: StreamIR, x: np.ndarray, image: int) -> np.ndarray:
    """The shared-memory tile of one image as the kernel's copy writes it (halves)."""
    geo = ir.geometry
    lay = tile_layout(geo, ir.vector_width)
    tile = np.zeros(lay.halves)
    plane = x[image * geo.image_elems:(image + 1) * geo.image_elems].reshape(
        geo.in_channels, geo.height, geo.width)
    grid = tile[8:].reshape(geo.in_channels, lay.rows, lay.row)
    if lay.vectors:      # each tile row [0, image row, zeros]
        grid[:, 1:geo.height + 1, 1:geo.width + 1] = plane
    else:
        grid[:, 1:geo.height + 1, :geo.width] = plane
    return tile


def _execute_rowvec(ir: StreamIR, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stage "tile" with row vectors: (sums (rows, images * H, 8), output offsets, which are
    stored): lane j of each group reads the vector at its base 8 * min(j, H - 1) halves plus
    8 * (offset >> 16) (in the tile, whole), shifted by s halves where the offset's low half is
    VECTOR_SELECTORS[s] (zeros shifted in); entry k of a row feeds group k % 4 (fp16 rounding every step); the groups' sums add as
    (q0 + q1) + (q2 + q3); lanes j < H store pixels ow < W of output row j."""
    geo, chains = ir.geometry, ir.chains
    lay = tile_layout(geo, ir.vector_width)
    if (chains != 4 or ir.col_threads != 32 or ir.grid[1] != geo.batch
            or geo.width > 7 or geo.height > 8):
        raise PlanExecutionError("a row-vector tile kernel takes one warp a worker (four "
                                 "groups), one image a block, at most 8 rows of 7 pixels")
    entry, chain, _ = schedule(ir.seg, chains)
    height = geo.height
    base = 8 * np.arange(height, dtype=np.int64)             # lanes j < H (the others repeat H - 1)
    rows = len(ir.row_out)
    offsets = np.asarray(ir.offsets, dtype=np.int64)
    if np.any(offsets < 0):
        raise PlanExecutionError("a negative row-vector offset")
    start, selector = (offsets >> 16) * 8, offsets & 0xFFFF
    shift = np.searchsorted(VECTOR_SELECTORS, selector)
    if np.any(shift > 2) or np.any(np.asarray(VECTOR_SELECTORS)[np.minimum(shift, 2)]
                                    != selector):
        raise PlanExecutionError("a row-vector entry's selector is not a shift of 0-2 halves")
    total = np.zeros((rows, geo.batch * height, 8))
    for image in range(geo.batch):
        tile = np.concatenate([_tile_image(ir, x, image), np.zeros(8)])
        acc = np.zeros((rows, chains, height, 8))
        for step in range(entry.shape[1]):
            live = entry[:, step] >= 0
            if not np.any(live):
                continue
            e, c, r = entry[live, step], chain[live, step], np.flatnonzero(live)
            at = base[None, :] + start[e][:, None]              # (live rows, lanes)
            if at.min() < 0 or at.max() + 8 > lay.halves or np.any(at % 8):
                raise PlanExecutionError(f"row-vector load outside the tile or misaligned at "
                                         f"step {step}")
            window = tile[at[..., None] + np.arange(10)]         # 8 halves and two past
            window[..., 8:] = 0.0                                # the PRMT shifts zeros in
            k = shift[e][:, None, None] + np.arange(8)
            loaded = np.take_along_axis(window, np.broadcast_to(k, window.shape[:2] + (8,)),
                                        axis=-1)
            acc[r, c] = _f16(acc[r, c] + ir.values[e][:, None, None] * loaded)
        part = _f16(_f16(acc[:, 0] + acc[:, 1]) + _f16(acc[:, 2] + acc[:, 3]))
        total[:, image * height:(image + 1) * height] = part
    pixel = np.arange(height)[:, None] * geo.width + np.arange(8)[None, :]
    stores = np.broadcast_to(np.arange(8)[None, :] < geo.width, (height, 8))
    images = np.arange(geo.batch)[:, None, None]
    return (total,
            (images * geo.out_channels * geo.out_pixels + pixel[None]).reshape(-1, 8),
            np.broadcast_to(stores, (geo.batch,) + stores.shape).reshape(-1, 8))


def _execute_tile(ir: StreamIR, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stage "tile": (sums (rows, images * threads, 2), output offsets (images * threads, 2) of
    each thread's top and bottom pixel, which of them it stores): each image's tile, each
    thread's base oh * row + ow, entry e reading halves base + offsets[e] and pair_delta
    further, nonzero k of the row feeding accumulator k % chains (fp16 rounding every step)."""
    geo, chains = ir.geometry, ir.chains
    lay = tile_layout(geo, ir.vector_width)
    lanes = 2 if lay.pairs else 1
    if ir.vector_width != lanes or ir.col_threads < lay.pixels or ir.grid[1] != geo.batch:
        raise PlanExecutionError("a tile kernel takes one pixel or a pair a thread, every "
                                 "thread in one block and one image a block")
    entry, chain, _ = schedule(ir.seg, chains)
    p = np.arange(ir.col_threads, dtype=np.int64)
    act = p < lay.pixels
    oh, ow = np.where(act, p // geo.width, 0), np.where(act, p % geo.width, 0)
    second = act & (oh + lay.half < geo.height)
    base = oh * lay.row + ow
    rows, threads = len(ir.row_out), len(p)
    total = np.zeros((rows, geo.batch * threads, lanes))
    for image in range(geo.batch):
        tile = _tile_image(ir, x, image)
        acc = np.zeros((rows, chains, threads, lanes))
        for step in range(entry.shape[1]):
            live = entry[:, step] >= 0
            if not np.any(live):
                continue
            e, c, r = entry[live, step], chain[live, step], np.flatnonzero(live)
            top = base[None, :] + ir.offsets[e][:, None]
            bottom = top + lay.pair_delta
            if top.min() < 0 or (bottom if lay.pairs else top).max() >= lay.halves:
                raise PlanExecutionError(f"shared-memory load outside the tile at step {step}")
            loaded = np.stack([tile[top], tile[bottom]] if lay.pairs else [tile[top]], axis=-1)
            acc[r, c] = _f16(acc[r, c] + ir.values[e][:, None, None] * loaded)
        part = acc[:, 0]
        for k in range(1, chains):
            part = _f16(part + acc[:, k])
        total[:, image * threads:(image + 1) * threads] = part
    pixel = oh * geo.width + ow
    offsets = np.stack([pixel, pixel + lay.half * geo.width][:lanes], axis=-1)
    stores = np.stack([act, second][:lanes], axis=-1)
    images = np.arange(geo.batch)[:, None, None]
    return (total,
            (images * geo.out_channels * geo.out_pixels + offsets[None]).reshape(-1, lanes),
            np.broadcast_to(stores, (geo.batch,) + stores.shape).reshape(-1, lanes))


def execute_stream(ir: StreamIR, x: np.ndarray, residual: np.ndarray | None) -> np.ndarray:
    _check_tables(ir)
    if ir.stage == "tile":
        total, offsets, stores = (_execute_rowvec if tile_layout(
            ir.geometry, ir.vector_width).vectors else _execute_tile)(ir, x)
        return _outputs(ir, total, lambda name, row: offsets + row * ir.geometry.out_pixels,
                        stores, residual, vectors=False, loads=stores)
    geo, width = ir.geometry, ir.vector_width
    rnd = _f16 if ir.accumulate == "fp16" else (lambda v: v)
    tid = np.arange(ir.grid[1] * ir.col_threads, dtype=np.int64)    # tiles = blockIdx.y
    env = evaluate(ir.columns, {"bx": tid // ir.col_threads, "tx": tid % ir.col_threads})
    active = env["act"].astype(bool)
    lanes = np.arange(width, dtype=np.int64)
    pointer = {ptr: env[var] for ptr, var in ir.pointers}   # per thread, elements
    base_x = pointer["x"]
    threads = len(base_x)
    # per segment: is each thread's base the input (True) or the shifted zero buffer
    if geo.masked:
        inside = np.stack([(env["ih"] + b.r >= 0) & (env["ih"] + b.r < geo.height)
                           & (env["iw"] + b.s >= 0) & (env["iw"] + b.s < geo.width)
                           for b in ir.bases])              # (segments, threads)
        shifts = np.array([b.zero_shift for b in ir.bases], dtype=np.int64)
    else:
        inside = np.ones((1, threads), dtype=bool)            # one segment
        shifts = np.zeros(inside.shape[0], dtype=np.int64)
    rows = len(ir.row_out)
    total = None
    stride = ir.seg.shape[1] // ir.k_slices
    for z in range(ir.k_slices):         # each slice's partial sums, added in slice order
        part = _partial(ir, x, ir.seg[:, z * stride:(z + 1) * stride], inside, shifts, base_x)
        total = part if total is None else rnd(total + part)
    if total is None:
        total = np.zeros((rows, threads, width))

    def address(pointer_name: str, row: int) -> np.ndarray:
        """(threads, width) element offsets of a row's columns: channel-major (a vector at
        pointer + row * pixels) or token-major ((pointer + column) * rows + row; in planes of
        P rows: row / P * (pixels * P) + (pointer + column) * P + row % P)."""
        if ir.token_major:
            p = ir.planes or geo.out_channels
            return ((pointer[pointer_name][:, None] + lanes) * p
                    + row // p * (p * geo.out_pixels) + row % p)
        return pointer[pointer_name][:, None] + row * geo.out_pixels + lanes

    stores = np.broadcast_to(active[:, None], (len(active), width))
    return _outputs(ir, total, address, stores, residual, vectors=not ir.token_major,
                    loads=np.ones_like(stores))


def _outputs(ir: StreamIR, total: np.ndarray, address, stores: np.ndarray,
             residual: np.ndarray | None, vectors: bool, loads: np.ndarray) -> np.ndarray:
    """The epilogue of every row entry: bias, residual, activation, rounding to the storage
    type; `address(pointer, row)` gives the (threads, lanes) element offsets, `stores` which of
    them are stored (each output exactly once), `loads` which residual elements are loaded
    (each must lie in the buffer)."""
    geo = ir.geometry
    width = total.shape[-1]
    rnd = _f16 if ir.accumulate == "fp16" else (lambda v: v)
    out = np.full(geo.output_elems, np.nan)
    writes = np.zeros(geo.output_elems, dtype=np.int64)
    for i, row in enumerate(ir.row_out.tolist()):
        value = total[i]                                     # (threads, width)
        addr = address("y", row)
        if ir.bias is not None:
            value = rnd(value + ir.bias[row])
        if ir.residual:
            at = np.where(loads, address("res", row), 0)
            if (np.any(at < 0) or np.any(at >= geo.output_elems)
                    or (vectors and np.any(at[:, 0] % width))):
                raise PlanExecutionError("residual load out of bounds or misaligned")
            value = rnd(value + residual[at])
        if ir.activation in ("relu", "relu6"):
            value = np.maximum(value, 0.0)
        if ir.activation == "relu6":
            value = np.minimum(value, 6.0)
        if ir.activation == "gelu":      # fp16 sums: widened, GELU in fp32, rounded back
            value = rnd(gelu(value))
        if ir.dtype != "fp32":
            value = rounded(value, ir.dtype)
        store = addr[stores]
        if np.any(store < 0) or np.any(store >= geo.output_elems):
            raise PlanExecutionError("store out of bounds")
        if vectors and np.any(addr[stores[:, 0], 0] % width):
            raise PlanExecutionError("misaligned vector store")
        out[store] = value[stores]
        np.add.at(writes, store, 1)
    if not np.all(writes == 1):
        raise PlanExecutionError(f"{int(np.sum(writes == 0))} outputs never written, "
                                 f"{int(np.sum(writes > 1))} written more than once")
    return out
