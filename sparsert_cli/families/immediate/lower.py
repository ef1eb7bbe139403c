"""Lowering: an immediate-family plan -> the kernel IR (ir.py). Every decision about what the
kernel computes and where it reads and writes is made here, once; printers only print."""

from __future__ import annotations

import numpy as np

from ...ir import (Batch, Compute, Finish, Fma, IndexOp, KernelIR, Load, Partial, Reduce,
                   ReduceRow, Step, TapBase)
from .plan import Plan, RowGroup

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
    return (u("mad", "j", "bx", plan.col_threads, "tx"), u("mul", "j", "j", width),
            u("lt", "act", "j", geo.columns), u("min", "j", "j", geo.columns - width),
            u("div", "img", "j", geo.out_pixels), u("rem", "pix", "j", geo.out_pixels),
            u("div", "oh", "pix", geo.out_width), u("rem", "ow", "pix", geo.out_width),
            u("mul", "ih", "oh", geo.stride, signed=True),
            u("sub", "ih", "ih", geo.padding, signed=True),
            u("mul", "iw", "ow", geo.stride, signed=True),
            u("sub", "iw", "iw", geo.padding, signed=True),
            u("mul", "inoff", "img", geo.image_elems, signed=True),
            u("mad", "inoff", "ih", geo.width, "inoff", signed=True),
            u("add", "inoff", "inoff", "iw", signed=True),
            u("mul", "outoff", "img", geo.out_channels * geo.out_pixels, signed=True),
            u("add", "outoff", "outoff", "pix", signed=True))


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


def _compute(plan: Plan, group: RowGroup, index: int) -> Compute:
    geo, k = plan.geometry, plan.geometry.kernel
    loads = group.slices[index]
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
        load_batch=plan.params.load_batch,
        max_registers=plan.params.max_registers, grid=plan.grid, arguments=plan.arguments,
        columns=column_ops(plan), pointers=pointers,
        slot=IndexOp("mad", "idx", "by", plan.k_split, "ty"),
        shared_bytes=plan.shared_bytes, partial_stride=plan.vector_width * plan.acc_bytes,
        phases=tuple(phases), inline=plan.nnz * plan.vector_width <= inline_limit,
        groups_on_x=plan.params.grid_order == "groups")
