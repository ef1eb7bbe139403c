"""Lowering: an immediate-family plan -> the kernel IR (ir.py). Every decision about what the
kernel computes and where it reads and writes is made here, once; printers only print."""

from __future__ import annotations

import numpy as np

from ...ir import (Batch, Compute, Finish, Fma, IndexOp, KernelIR, Load, Partial, Reduce,
                   ReduceRow, Shift, Step, TapBase)
from .plan import Plan, RowGroup, takes_pairs

# Kernels of at most this many FMA lanes (nnz x vector width) get their bodies inline in the
# entry; larger ones one function per body, which keeps ptxas near-linear in the nonzeros.
INLINE_LIMIT = 16384


def kernel_constant(plan: Plan, value: float) -> float:
    """`value` as the kernel holds it: an fp16 immediate with fp16 sums, else float32."""
    kind = np.float16 if plan.accumulate == "fp16" else np.float32
    return float(kind(value))


def column_ops(plan: Plan) -> tuple[IndexOp, ...]:
    """Thread -> columns: a thread owns `vector_width` consecutive columns; idle threads of the
    last tile compute a valid column (all loads in bounds) and skip the store (act = 0)."""
    geo, width = plan.geometry, plan.vector_width
    u = IndexOp
    # pair windows: the corner is one column further left, an even column (see KernelIR)
    left = geo.padding + (1 if windows(plan) else 0)
    return (u("mad", "j", "bx", plan.col_threads, "tx"), u("mul", "j", "j", width),
            u("lt", "act", "j", geo.columns), u("min", "j", "j", geo.columns - width),
            u("div", "img", "j", geo.out_pixels), u("rem", "pix", "j", geo.out_pixels),
            u("div", "oh", "pix", geo.out_width), u("rem", "ow", "pix", geo.out_width),
            u("mul", "ih", "oh", geo.stride, signed=True),
            u("sub", "ih", "ih", geo.padding, signed=True),
            u("mul", "iw", "ow", geo.stride, signed=True),
            u("sub", "iw", "iw", left, signed=True),
            u("mul", "inoff", "img", geo.image_elems, signed=True),
            u("mad", "inoff", "ih", geo.width, "inoff", signed=True),
            u("add", "inoff", "inoff", "iw", signed=True),
            u("mul", "outoff", "img", geo.out_channels * geo.out_pixels, signed=True),
            u("add", "outoff", "outoff", "pix", signed=True))


def windows(plan: Plan) -> bool:
    """Column-pair windows (KernelIR.pair_windows): a 3x3 plan that fit_vector_width let take
    column pairs."""
    return takes_pairs(plan.geometry, plan.vector_width, plan.dtype)


def fma_lanes(plan: Plan) -> int:
    """What INLINE_LIMIT counts per nonzero: the vector width, except in pair-window kernels,
    which count FMA instructions (one half2 FMA a nonzero with fp16 sums, two fp32 FMAs else)."""
    if windows(plan):
        return 1 if plan.accumulate == "fp16" else 2
    return plan.vector_width


def _steps(plan: Plan, row: int) -> tuple[Step, ...]:
    """Epilogue order: bias, residual, activation."""
    epi, offset = plan.epilogue, row * plan.geometry.out_pixels
    steps = []
    if epi.bias is not None and epi.bias[row] != 0.0:
        steps.append(Step("bias", kernel_constant(plan, epi.bias[row])))
    if epi.residual:
        steps.append(Step("residual", offset))
    if epi.activation in ("relu", "relu6"):
        steps.append(Step("max", 0.0))
    if epi.activation == "relu6":
        steps.append(Step("min", 6.0))
    return tuple(steps)


def _finish(plan: Plan, slot: int, row: int) -> Finish:
    return Finish(slot, row * plan.geometry.out_pixels, _steps(plan, row))


def partial_offset(plan: Plan, index: int, slot: int) -> int:
    """Shared-memory byte offset (from the thread's sp) of slice `index`'s sums of `slot`:
    [slice][slot][thread][column] sums."""
    return ((index * plan.rows_max + slot) * plan.col_threads) * plan.vector_width * plan.acc_bytes


def _pair_batches(plan: Plan, loads) -> tuple[tuple[TapBase, ...], list[Batch], set[int]]:
    """Pair-window loads of a 3x3 slice (KernelIR.pair_windows). The taps of one (c, r) read
    columns ow - 1 .. ow + 2: the pairs L = (ow - 2, ow - 1), C = (ow, ow + 1) and
    R = (ow + 2, ow + 3) at window offsets s' = 0, 2, 4. Tap s = 1 reads C; s = 0 the shift
    (L, C), s = 2 the shift (C, R). A padding pair lies wholly outside the image (even width),
    so each pair's base is x or the zero buffer as a whole. Units of one (c, r) stay in one batch
    (at most max(load_batch, 3) pairs)."""
    geo = plan.geometry
    units: dict[int, list] = {}
    for ld in loads:
        units.setdefault(ld.tap // 3, []).append(ld)
    used: dict[tuple[int, int], int] = {}
    bases: list[TapBase] = []

    def base(r: int, s: int) -> int:
        if not geo.masked:
            return -1
        if (r, s) not in used:
            used[(r, s)] = len(bases)
            bases.append(TapBase(r, s, -(r * geo.width + s)))
        return used[(r, s)]

    kind = np.float16 if plan.accumulate == "fp16" else np.float32
    batches, touched = [], set()

    def batch_of(pending: list[tuple[int, list, set]]) -> Batch:
        pairs, shifts, fmas = [], [], []
        for unit, taps, ss in pending:
            c, r = divmod(unit, 3)
            pair = {}
            for s_pair in (0, 2, 4):
                if s_pair == 2 or s_pair // 2 in ss:      # C always; L for s = 0, R for s = 2
                    pair[s_pair] = len(pairs)
                    pairs.append(Load(base(r, s_pair),
                                      c * geo.height * geo.width + r * geo.width + s_pair))
            source = {1: ("pair", pair[2])}
            for s, (a, b) in ((0, (0, 2)), (2, (2, 4))):
                if s in ss:
                    source[s] = ("shift", len(shifts))
                    shifts.append(Shift(pair[a], pair[b]))
            fmas += [(slot, float(kind(value)), source[ld.tap % 3])
                     for ld in taps for slot, value in ld.uses]
        out = []
        for slot, value, (what, index) in fmas:     # sources: pairs, then shifts
            out.append(Fma(slot, value, index + (len(pairs) if what == "shift" else 0),
                           slot not in touched))
            touched.add(slot)
        return Batch(tuple(pairs), tuple(out), tuple(shifts))

    limit, pending, count = max(plan.params.load_batch, 3), [], 0
    for unit, taps in units.items():
        ss = {ld.tap % 3 for ld in taps}
        need = 1 + (0 in ss) + (2 in ss)
        if count and count + need > limit:
            batches.append(batch_of(pending))
            pending, count = [], 0
        pending.append((unit, taps, ss))
        count += need
    if pending:
        batches.append(batch_of(pending))
    return tuple(bases), batches, touched


def _compute(plan: Plan, group: RowGroup, index: int) -> Compute:
    geo, k = plan.geometry, plan.geometry.kernel
    loads = group.slices[index]
    if windows(plan):
        bases, batches, touched = _pair_batches(plan, loads)
        return _body(plan, group, index, bases, batches, touched)
    taps = np.fromiter((ld.tap for ld in loads), dtype=np.int64, count=len(loads))
    rs = taps % (k * k)                          # r * k + s of each load's kernel tap
    offsets = ((taps // (k * k)) * geo.height * geo.width + (rs // k) * geo.width
               + rs % k).tolist()
    bases: tuple[TapBase, ...] = ()
    base_ids = [-1] * len(loads)
    if geo.masked:
        used = np.unique(rs).tolist()
        bases = tuple(TapBase(t // k, t % k, -((t // k) * geo.width + t % k)) for t in used)
        lookup = np.zeros(k * k, dtype=np.int64)
        lookup[used] = np.arange(len(used))
        base_ids = lookup[rs].tolist()
    kind = np.float16 if plan.accumulate == "fp16" else np.float32
    weights = iter(np.array([v for ld in loads for _, v in ld.uses], dtype=kind).tolist())
    batch, new = plan.params.load_batch, tuple.__new__      # plain tuple.__new__: hot loop
    touched: set[int] = set()
    batches = []
    for start in range(0, len(loads), batch):
        fmas = []
        for i, load in enumerate(loads[start:start + batch]):
            for slot, _ in load.uses:
                fmas.append(new(Fma, (slot, next(weights), i, slot not in touched)))
                touched.add(slot)
        batches.append(Batch(tuple(new(Load, pair) for pair in zip(
            base_ids[start:start + batch], offsets[start:start + batch])), tuple(fmas)))
    return _body(plan, group, index, bases, batches, touched)


def _body(plan: Plan, group: RowGroup, index: int, bases: tuple[TapBase, ...],
          batches: list[Batch], touched: set[int]) -> Compute:
    slots = len(group.rows)
    zero = tuple(s for s in range(slots) if s not in touched)
    if plan.k_split == 1:
        outputs = tuple(_finish(plan, slot, row) for slot, row in enumerate(group.rows))
    else:
        outputs = tuple(Partial(slot, partial_offset(plan, index, slot)) for slot in range(slots))
    return Compute(slots, bases, tuple(batches), zero, outputs)


def _reduce(plan: Plan, group: RowGroup, thread_row: int) -> Reduce:
    """Thread row ty finishes the rows whose slot % k_split == ty, adding slices in order."""
    return Reduce(tuple(
        ReduceRow(tuple(partial_offset(plan, i, slot) for i in range(plan.k_split)),
                  _finish(plan, 0, row))
        for slot, row in enumerate(group.rows) if slot % plan.k_split == thread_row))


def lower(plan: Plan, inline_limit: int = INLINE_LIMIT) -> KernelIR:
    phases = [tuple(_compute(plan, g, si) for g in plan.groups for si in range(plan.k_split))]
    if plan.k_split > 1:
        phases.append(tuple(_reduce(plan, g, ty) for g in plan.groups
                            for ty in range(plan.k_split)))
    pointers = (("x", "inoff"), ("y", "outoff")) + (
        (("res", "outoff"),) if plan.epilogue.residual else ())
    return KernelIR(
        entry=plan.entry,
        comment=(f"{plan.params.name()}, {plan.nnz} nonzeros, {len(plan.groups)} row groups"),
        geometry=plan.geometry, dtype=plan.dtype, accumulate=plan.accumulate,
        vector_width=plan.vector_width, col_threads=plan.col_threads, k_split=plan.k_split,
        load_batch=max(plan.params.load_batch, 3) if windows(plan) else plan.params.load_batch,
        max_registers=plan.params.max_registers, grid=plan.grid, arguments=plan.arguments,
        columns=column_ops(plan), pointers=pointers,
        slot=IndexOp("mad", "idx", "by", plan.k_split, "ty"),
        shared_bytes=plan.shared_bytes, partial_stride=plan.vector_width * plan.acc_bytes,
        phases=tuple(phases), inline=plan.nnz * fma_lanes(plan) <= inline_limit,
        groups_on_x=plan.params.grid_order == "groups", pair_windows=windows(plan))
