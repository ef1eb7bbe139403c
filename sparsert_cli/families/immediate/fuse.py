"""A pointwise (1x1) convolution and the depthwise 3x3 convolution after it, fused into one
immediate-family kernel (batch 1): ir.ChainIR of two lowered plans.

Block `by` computes row group `by` of the pointwise plan over every output pixel (one column
tile) and stores those channels, finished and rounded to the storage type, to the scratch
buffer t (C x H x W, the pointwise output's own layout); after a block barrier it runs the
depthwise rows of the same channels, reading t through the coherent load path (padding taps
from the zero buffer z, as an unfused padded convolution does) and writing y. The depthwise is
planned as a 3x3 convolution with a block-diagonal weight (row m has taps only in input
channel m) whose row groups are exactly the pointwise plan's, so a block reads only the
channels it wrote; lower_fused checks that in the lowered IR and refuses anything else.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from ...errors import UserError
from ...ir import ChainIR, Compute, Finish, KernelIR
from ...problem_shape import MAX_THREADS, PRECISIONS, Epilogue, Geometry, Precision
from .lower import lower
from .plan import Plan, PlanParams, build_plan, fit_vector_width, row_group
from .tuning import H100_SMS, PAIR_COLUMNS, TALL_ACCUMULATORS, lanes

# changes whenever the fused kernel's code changes (with the immediate family's and the
# printer's versions it enters the fused kernels' cache keys)
VERSION = "fused-pw-dw-1"
# the fused kernel's pointer arguments, and which of them each stage's x, y (and z) are
ARGUMENTS = ("x", "y", "t", "z")
BINDINGS = ((("x", "x"), ("y", "t")), (("x", "t"), ("y", "y"), ("z", "z")))
STRIDES = (1, 2)
# registers a thread keeps besides its sums and loads (pointers, indices, tap bases), used to
# cap the rows of a group so that ptxas has no reason to spill at the block's register share
OTHER_REGISTERS = 40
# registers' worth of distinct loads a group's pointwise body may hold: ptxas hoists a
# straight-line body's loads, and past about this many a body spilled (sm_90, nvJitLink 13,
# 1024x512@7 at 90%, 8 rows of one column: ~290 loads spilled 152 B in fp16 and 8 B in bf16,
# as the unfused default r8v1t64 does; 6 rows, ~240 loads, did not)
GROUP_LOAD_REGISTERS = 224
# a pointwise stage needing more threads than this takes twice its width when the depthwise
# stage needs at most half as many (fuse_params)
WIDE_TILE = 512


@dataclass(frozen=True)
class FusedPlan(Precision):
    """The two plans of a fused pointwise -> depthwise kernel: `pointwise` (1x1, batch 1, one
    column tile) and `depthwise` (3x3, padding 1, its block-diagonal weight planned over the
    pointwise plan's row groups, same column threads)."""

    pointwise: Plan
    depthwise: Plan

    @property
    def dtype(self) -> str:
        return self.pointwise.dtype

    @property
    def accumulate(self) -> str:
        return self.pointwise.accumulate

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.pointwise.grid

    @property
    def block(self) -> tuple[int, int, int]:
        return self.pointwise.block

    @property
    def nnz(self) -> int:
        return self.pointwise.nnz + self.depthwise.nnz

    @property
    def scratch_elems(self) -> int:
        """Elements of t: the pointwise output, C x H x W."""
        return self.pointwise.geometry.output_elems

    def digest(self) -> str:
        return self._digest

    @cached_property
    def _digest(self) -> str:
        h = hashlib.sha256(VERSION.encode())
        for plan in (self.pointwise, self.depthwise):
            h.update(b"|" + plan.digest().encode())
        return h.hexdigest()

    @property
    def entry(self) -> str:
        return (f"sparsert_fused_{self.pointwise.params.name()}"
                f"_dw{self.depthwise.vector_width}_{self.digest()[:12]}")


def depthwise_geometry(pointwise: Geometry, stride: int) -> Geometry:
    """The depthwise 3x3 (padding 1, `stride`) over the pointwise output."""
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) \
            or stride not in STRIDES:
        raise UserError(f"a fused depthwise takes stride 1 or 2, not {stride}")
    return Geometry(1, pointwise.out_channels, pointwise.out_height, pointwise.out_width,
                    pointwise.out_channels, kernel=3, stride=stride, padding=1).validate()


def depthwise_csr(weight, channels: int) -> sp.csr_matrix:
    """A depthwise weight, C x 3 x 3 (or C x 1 x 3 x 3, PyTorch's groups=C layout), as the
    C x (C * 9) block-diagonal weight of a 3x3 convolution: row m has its taps at columns
    m * 9 .. m * 9 + 8 (input channel m), float32, zeros dropped."""
    w = np.asarray(weight)
    if w.ndim == 4 and w.shape[1] == 1:
        w = w[:, 0]
    if w.shape != (channels, 3, 3):
        raise UserError(f"a depthwise weight is C x 3 x 3 (or C x 1 x 3 x 3) with C = "
                        f"{channels}, got shape {np.shape(weight)}")
    with np.errstate(over="ignore"):
        values = w.reshape(channels, 9).astype(np.float32)
    if not np.all(np.isfinite(values)):
        raise UserError("depthwise weight holds NaN/Inf values or values beyond float32's range")
    rows = np.repeat(np.arange(channels), 9)
    cols = (rows * 9 + np.tile(np.arange(9), channels))
    csr = sp.csr_matrix((values.ravel(), (rows, cols)), shape=(channels, channels * 9))
    csr.eliminate_zeros()
    csr.sort_indices()
    return csr


def fuse_params(pointwise: Geometry, stride: int, nnz: int, precision: str,
                rows_per_group: int | None = None, sm_count: int = H100_SMS,
                vector_width: int | None = None,
                depthwise_pairs: bool | None = None) -> tuple[PlanParams, int]:
    """(pointwise parameters, depthwise vector width) of the fused kernel; both stages take the
    parameters' col_threads, which may exceed PlanParams' 512 (up to a block's 1024: one tile
    must hold every column), so they are not validate()d. Chosen on the S20-4 sweep (H100,
    MobileNet v1's pairs at 90%, fp16 and fp32: rows 1/2/4/8 x pointwise widths 1/2/4, with and
    without depthwise pairs; the 164 kernels that built verified): these choices were within
    4% of the sweep's fastest in 11 of 12 cases timed warm (fp16 pw256x256@28 before a
    stride-2 depthwise: 14% behind), and within 23% with programmatic dependent launch.

    Pointwise width: `vector_width` (UserError where it does not fit the shape), else the width
    of one sum instruction a nonzero (half2 sums: a column pair; else one column), or twice
    that where the pointwise would need more than WIDE_TILE threads and the depthwise at most
    half as many (a stride-2 depthwise would leave most of the block idle). The depthwise takes
    column pairs (pair windows: 2-byte storage, stride 1, even width) where its planner would
    (over PAIR_COLUMNS columns) or where the pointwise takes pairs with half2 sums
    (`depthwise_pairs` True / False: wherever legal / never), else one column a thread. The
    block has the threads (whole warps) either stage needs.

    Rows per group: `rows_per_group`, else as many as make about one block per SM
    (ceil(M / sm_count): with one column tile the groups are the blocks; rows 2 for M = 256 and
    4 for M = 512 were the fastest in the sweep or within 4% of it; the first rule, the
    unfused default's rows scaled to its sums a thread, made 16-32 blocks of 416-800 threads,
    up to 2.4x slower than the unfused pair), capped at TALL_ACCUMULATORS sums a thread, so that a thread's sums of either stage
    and a batch of loads fit its share of the register file (OTHER_REGISTERS for the rest), and
    so that a group's expected distinct loads (uniformly spread nonzeros) fit
    GROUP_LOAD_REGISTERS."""
    dtype = PRECISIONS[precision][0]
    dw = depthwise_geometry(pointwise, stride)
    if vector_width is not None:
        if vector_width not in (1, 2, 4, 8) or fit_vector_width(
                pointwise, vector_width, dtype) != vector_width:
            raise UserError(f"vector_width {vector_width} does not fit a {dtype} pointwise "
                            f"of {pointwise.columns} columns")
        pw_width = vector_width
    else:       # one sum instruction a nonzero: half2 sums take column pairs
        one = 2 if lanes(2, precision) == 1 else 1
        pw_width = one if fit_vector_width(pointwise, one, dtype) == one else 1
    if depthwise_pairs is None:
        pairs = dw.columns > PAIR_COLUMNS or (pw_width == 2 and precision == "fp16")
    else:
        pairs = bool(depthwise_pairs)
    dw_width = fit_vector_width(dw, 2, dtype, windows=pairs)
    dw_threads = _warps(-(-dw.columns // dw_width))
    if (vector_width is None and _warps(-(-pointwise.columns // pw_width)) > WIDE_TILE
            and 2 * dw_threads <= _warps(-(-pointwise.columns // pw_width))
            and fit_vector_width(pointwise, 2 * pw_width, dtype) == 2 * pw_width):
        pw_width *= 2       # a stride-2 depthwise would leave most of a wide block idle
    threads = max(dw_threads, _warps(-(-pointwise.columns // pw_width)))
    if threads > MAX_THREADS:
        raise UserError(f"a fused kernel's one column tile would need {threads} threads "
                        f"(limit {MAX_THREADS}): {pointwise.columns} pointwise and "
                        f"{dw.columns} depthwise columns are too many")
    per_row = max(lanes(pw_width, precision), lanes(dw_width, precision))
    rows = rows_per_group or -(-pointwise.out_channels // sm_count)
    load_batch = PlanParams().load_batch
    budget = min(255, 65536 // threads)
    loads = max(load_batch, 3) * max(pw_width, dw_width)      # fp32 registers, at most
    cap = min(TALL_ACCUMULATORS, budget - OTHER_REGISTERS - loads) // per_row
    rows = max(1, min(rows, cap, pointwise.out_channels))
    density = nnz / max(1, pointwise.out_channels * pointwise.taps)
    per_load = pw_width if dtype == "fp32" else max(1, pw_width // 2)
    while rows > 1 and (pointwise.taps * (1 - (1 - density) ** rows) * per_load
                        > GROUP_LOAD_REGISTERS):
        rows -= 1
    return PlanParams(rows_per_group=rows, vector_width=pw_width, col_threads=threads,
                      k_split=1, load_batch=load_batch), dw_width


def _warps(threads: int) -> int:
    """`threads` rounded up to whole warps."""
    return -(-threads // 32) * 32


def plan_fused(pw_csr, pw_geometry: Geometry, dw_csr, stride: int,
               pw_epilogue: Epilogue = Epilogue(), dw_epilogue: Epilogue = Epilogue(),
               precision: str = "fp32", rows_per_group: int | None = None,
               vector_width: int | None = None,
               depthwise_pairs: bool | None = None) -> FusedPlan:
    """Plan a fused pointwise -> depthwise kernel from the pointwise's M x C CSR weight and the
    depthwise's block-diagonal M x (M * 9) CSR (depthwise_csr), both already fitted to the
    precision (build.fit_precision). Parameters: fuse_params."""
    check_fusable_layers(pw_geometry, pw_epilogue, dw_epilogue)
    dtype, accumulate = PRECISIONS[precision]
    params, dw_width = fuse_params(pw_geometry, stride, int(pw_csr.nnz), precision,
                                   rows_per_group, vector_width=vector_width,
                                   depthwise_pairs=depthwise_pairs)
    # the planner takes at most 512 column threads; the fused tile may need up to 1024
    pointwise = build_plan(pw_csr, pw_geometry, replace(params, col_threads=min(
        params.col_threads, 512)), pw_epilogue, dtype, accumulate)
    pointwise = replace(pointwise, params=replace(pointwise.params,
                                                  col_threads=params.col_threads))
    dw = depthwise_geometry(pw_geometry, stride)
    return FusedPlan(pointwise, depthwise_plan(pointwise, dw_csr, dw, dw_epilogue, dw_width))


def check_fusable_layers(pw_geometry: Geometry, pw_epilogue: Epilogue,
                         dw_epilogue: Epilogue) -> None:
    """UserError unless the layers are ones this kernel fuses."""
    g = pw_geometry
    if not (g.batch == 1 and g.kernel == 1 and g.stride == 1 and g.padding == 0):
        raise UserError(f"a fused pointwise is a batch-1 1x1 convolution (stride 1, no "
                        f"padding), got batch {g.batch}, {g.kernel}x{g.kernel}, stride "
                        f"{g.stride}, padding {g.padding}")
    for name, epi in (("pointwise", pw_epilogue), ("depthwise", dw_epilogue)):
        if epi.residual or epi.token_major:
            raise UserError(f"a fused {name} takes no residual and no token-major output")
        if epi.activation not in ("none", "relu", "relu6"):
            raise UserError(f"a fused {name} takes activation none, relu or relu6, not "
                            f"{epi.activation}")


def depthwise_plan(pointwise: Plan, dw_csr, geometry: Geometry, epilogue: Epilogue,
                   vector_width: int) -> Plan:
    """The depthwise plan over the pointwise plan's row groups (same rows, same order), its
    loads built from the depthwise weight; same column threads and load batch, one slice."""
    csr = sp.csr_matrix(dw_csr, dtype=np.float32)
    csr.sort_indices()
    csr.eliminate_zeros()
    if csr.shape != (geometry.out_channels, geometry.taps):
        raise UserError(f"depthwise weight is {csr.shape[0]}x{csr.shape[1]}, the shape needs "
                        f"{geometry.out_channels}x{geometry.taps}")
    params = replace(pointwise.params, vector_width=vector_width, k_split=1)
    groups = tuple(row_group(csr, g.rows) for g in pointwise.groups)
    return Plan(geometry, params, groups, epilogue, pointwise.dtype, pointwise.accumulate)


def check_fused(plan: FusedPlan) -> None:
    """UserError unless the two plans make one fused kernel: a 1x1 pointwise whose output is
    the depthwise's input, one column tile each, the same column threads, no k-split, the
    same number of row groups in the tiles grid order, and a depthwise vector width its
    geometry takes."""
    pw, dw = plan.pointwise, plan.depthwise
    check_fusable_layers(pw.geometry, pw.epilogue, dw.epilogue)
    g, d = pw.geometry, dw.geometry
    if (d.batch, d.in_channels, d.height, d.width, d.out_channels, d.kernel, d.padding) != (
            1, g.out_channels, g.out_height, g.out_width, g.out_channels, 3, 1) \
            or d.stride not in STRIDES:
        raise UserError(f"the depthwise ({d}) does not read the pointwise's output ({g})")
    if (pw.dtype, pw.accumulate) != (dw.dtype, dw.accumulate):
        raise UserError(f"the stages' precisions differ: {pw.precision}, {dw.precision}")
    for name, p in (("pointwise", pw), ("depthwise", dw)):
        if p.k_split != 1 or p.params.grid_order != "tiles":
            raise UserError(f"the fused {name} must have k_split 1 and grid order tiles")
        if p.grid[0] != 1:
            raise UserError(f"the fused {name} covers its {p.geometry.columns} columns in "
                            f"{p.grid[0]} tiles: it must take one")
    if pw.col_threads != dw.col_threads:
        raise UserError(f"the stages' column threads differ: {pw.col_threads}, "
                        f"{dw.col_threads}")
    if len(pw.groups) != len(dw.groups):
        raise UserError(f"the stages have {len(pw.groups)} and {len(dw.groups)} row groups")
    if fit_vector_width(d, dw.vector_width, dw.dtype, windows=True) != dw.vector_width:
        raise UserError(f"the depthwise's vector width {dw.vector_width} does not fit its "
                        f"{d.height}x{d.width} stride-{d.stride} geometry")


def _written_channels(ir: KernelIR, body: Compute) -> set[int]:
    """Output rows a (k_split 1) body stores."""
    rows = set()
    for out in body.outputs:
        if not isinstance(out, Finish):
            raise UserError("a fused stage stores partial sums")
        row, rest = divmod(out.offset, ir.geometry.out_pixels)
        if rest:
            raise UserError(f"a fused stage stores at offset {out.offset}, not a row start")
        rows.add(row)
    return rows


def _read_channels(ir: KernelIR, body: Compute) -> set[int]:
    """Input channels a padded body's loads read (offset = c * H * W + r * W + s from base
    (r, s))."""
    geo = ir.geometry
    channels = set()
    for batch in body.batches:
        for load in batch.loads:
            if load.tap < 0:
                raise UserError("a fused depthwise load reads outside its padding tap bases")
            base = body.bases[load.tap]
            channel, rest = divmod(load.offset - (base.r * geo.width + base.s),
                                   geo.height * geo.width)
            if rest:
                raise UserError(f"a fused depthwise load at offset {load.offset} is not at "
                                f"its tap ({base.r}, {base.s}) of a channel")
            channels.add(channel)
    return channels


def check_chain(first: KernelIR, second: KernelIR) -> None:
    """UserError unless every row group of the second stage reads only channels that the same
    group of the first stage writes (block by runs body by of each), in IRs with one phase of
    one body per group."""
    for name, ir in (("pointwise", first), ("depthwise", second)):
        if len(ir.phases) != 1 or ir.tiles != 1 or ir.k_split != 1:
            raise UserError(f"the fused {name} stage has {len(ir.phases)} phases, {ir.tiles} "
                            f"tiles and k_split {ir.k_split}; it needs 1, 1 and 1")
    if first.block != second.block or first.groups != second.groups:
        raise UserError(f"the stages' blocks differ: {first.block} x {first.groups} groups, "
                        f"{second.block} x {second.groups} groups")
    for by, (made, used) in enumerate(zip(first.phases[0], second.phases[0])):
        foreign = _read_channels(second, used) - _written_channels(first, made)
        if foreign:
            raise UserError(f"row group {by} of the depthwise reads channel(s) "
                            f"{sorted(foreign)[:8]} that its block's pointwise does not write")


def lower_fused(plan: FusedPlan, dependent_launch: bool = False) -> ChainIR:
    """The fused kernel's IR: both plans lowered (lower.lower), the depthwise's loads coherent
    (it reads what the pointwise wrote in the same kernel), checked by check_fused and
    check_chain."""
    check_fused(plan)
    first = lower(plan.pointwise)
    second = replace(lower(plan.depthwise), coherent_loads=True)
    check_chain(first, second)
    return ChainIR(entry=plan.entry,
                   comment=f"fused pointwise {first.comment} -> depthwise {second.comment}",
                   stages=(first, second), arguments=ARGUMENTS, bindings=BINDINGS,
                   dependent_launch=dependent_launch)
