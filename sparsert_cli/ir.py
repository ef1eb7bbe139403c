"""The kernel IR: one generated kernel, stated once, as plain numbers.

A family's lowering (families/<name>/lower.py) produces it; the printers (render/ptx.py,
render/cuda.py) print it by rule tables and the CPU interpreter (interp.py) executes it, so the
thread->column mapping, padding-tap bases, load order and offsets, FMAs, k-split partial layout,
epilogue order and stores are decided in exactly one place. `render.ptx.check_printed` parses the
printed PTX back into this IR and requires equality, so what the CPU check runs is what the GPU runs.

Units: load and store offsets are in elements of the storage type; shared-memory offsets in bytes.

Kernel: the entry evaluates `columns` (IndexOps over the thread ids tx, bx), offsets the pointers
by `pointers`, computes the body slot `idx` with `slot` (from by, ty) and, per phase, runs body
`phases[phase][idx]`; phases meet at a block barrier. Each body sees the thread's registers
x, y, res (offset pointers), z (the zero buffer), ih, iw (window corner), act (stores enabled) and
sp (its shared-memory partials base).

ChainIR: KernelIRs run one after the other by the same blocks of one entry (a fused pointwise ->
depthwise kernel), each stage's pointers bound to the kernel's arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Union

from .problem_shape import Geometry, Precision


# groups_on_x -> the PTX special registers bx (the column tile) and by (the row group) read
BLOCK_IDS = {False: {"bx": "ctaid.x", "by": "ctaid.y"}, True: {"bx": "ctaid.y", "by": "ctaid.x"}}


class IndexOp(NamedTuple):
    """dst = a*b + c (mad), a*b (mul), a+b, a-b, a/b, a%b, min(a, b), or a < b (lt, 0/1), in
    32-bit integers; operands are variable names or integers."""

    op: str
    dst: str
    a: str | int
    b: str | int
    c: str | int | None = None
    signed: bool = False


class TapBase(NamedTuple):
    """Kernel tap (r, s) of a padded convolution: its loads read x while (ih + r, iw + s) lies
    inside the image, else the zero buffer z shifted by `zero_shift` elements (same offsets)."""

    r: int
    s: int
    zero_shift: int


class Load(NamedTuple):
    """One vector load of `width` columns from base `tap` (index into the body's bases; -1: x)."""

    tap: int
    offset: int


class Fma(NamedTuple):
    """acc[slot] = source * weight (+ acc[slot] unless init); source indexes the batch's loads."""

    slot: int
    weight: float
    source: int
    init: bool


class Shift(NamedTuple):
    """Columns 1.. of load `a` followed by column 0 of load `b` (both indices into the batch's
    loads): the window one column right of `a`, built from two aligned column-pair loads
    (KernelIR.pair_windows)."""

    a: int
    b: int


class Batch(NamedTuple):
    """Loads issued together into registers, then the shifted windows built from them, then the
    FMAs that use them, in order. An FMA's source indexes loads, then shifts
    (len(loads) + shift index)."""

    loads: tuple[Load, ...]
    fmas: tuple[Fma, ...]
    shifts: tuple[Shift, ...] = ()


class Step(NamedTuple):
    """An epilogue step on a row's sums: bias (value), residual (element offset), max, min."""

    op: str
    value: float | int


class Finish(NamedTuple):
    """Epilogue steps in order, then the store of accumulator `slot` at `offset` elements."""

    slot: int
    offset: int
    steps: tuple[Step, ...]


class Partial(NamedTuple):
    """Store accumulator `slot` to shared memory at sp + `offset` bytes."""

    slot: int
    offset: int


class Compute(NamedTuple):
    """A straight-line body: tap bases, batches, zeroing of untouched slots, then per slot a
    Finish (no k-split) or a Partial."""

    slots: int
    bases: tuple[TapBase, ...]
    batches: tuple[Batch, ...]
    zero: tuple[int, ...]
    outputs: tuple[Finish | Partial, ...]


class ReduceRow(NamedTuple):
    """Sum the partials at sp + each offset (bytes, in order) into accumulator 0, then finish."""

    offsets: tuple[int, ...]
    finish: Finish


class Reduce(NamedTuple):
    rows: tuple[ReduceRow, ...]


Body = Union[Compute, Reduce]


@dataclass(frozen=True)
class KernelIR(Precision):
    entry: str
    comment: str                      # for the printed header
    geometry: Geometry
    dtype: str                        # storage of x, y, res, z
    accumulate: str                   # registers the sums live in
    vector_width: int
    col_threads: int
    k_split: int
    load_batch: int                   # loads in flight per batch (sizes the load registers)
    max_registers: int
    grid: tuple[int, int, int]
    arguments: tuple[str, ...]        # kernel pointer arguments in order
    columns: tuple[IndexOp, ...]      # tx, bx -> act, ih, iw, inoff, outoff
    pointers: tuple[tuple[str, str], ...]   # (pointer, element-offset variable)
    slot: IndexOp                     # by, ty -> idx
    shared_bytes: int
    partial_stride: int               # bytes between threads' partials (sp = base + tx * stride)
    phases: tuple[tuple[Body, ...], ...]
    inline: bool                      # bodies inline in the entry, else one function each
    # bx (the column tile) is blockIdx.x and by (the row group) blockIdx.y, or, when True, the
    # other way round (grid_order "groups": the groups of one tile run together)
    groups_on_x: bool = False
    # programmatic dependent launch (sm_90): the entry first waits for the grid before it in
    # the stream (griddepcontrol.wait: all of its memory visible), then lets the next launch
    # start (griddepcontrol.launch_dependents), so a launch made with programmatic stream
    # serialization overlaps its start with the end of the kernel before it
    dependent_launch: bool = False
    # column-pair windows of a stride-1 3x3 convolution (vector width 2, 2-byte storage): the
    # window corner iw is one column left of the usual (ow - padding - 1, an even column), every
    # load reads an aligned column pair at tap offset s in {0, 2, 4} (TapBase.s likewise), and
    # the odd windows (ow - 1, ow), (ow + 1, ow + 2) are Shifts of two such pairs
    pair_windows: bool = False
    # activation loads through the coherent path (ld.global) instead of the non-coherent one
    # (ld.global.nc): a stage of a ChainIR reads what an earlier stage of the same kernel wrote,
    # which the non-coherent path may serve stale
    coherent_loads: bool = False

    @property
    def block(self) -> tuple[int, int, int]:
        return (self.col_threads, self.k_split, 1)

    @property
    def tap_stride(self) -> int:
        """Tap base numbering: base (r, s) is number r * tap_stride + s (s reaches kernel + 1
        with pair windows)."""
        return self.geometry.kernel + (2 if self.pair_windows else 0)

    @property
    def tiles(self) -> int:
        """Column tiles: the range of bx."""
        return self.grid[1] if self.groups_on_x else self.grid[0]

    @property
    def groups(self) -> int:
        """Row groups: the range of by."""
        return self.grid[0] if self.groups_on_x else self.grid[1]

    @property
    def block_ids(self) -> dict[str, str]:
        """The PTX special registers bx and by are read from."""
        return BLOCK_IDS[self.groups_on_x]

    @property
    def body_args(self) -> tuple[tuple[str, str], ...]:
        """(type, name) of what each body receives, in order."""
        args = [("u64", "x"), ("u64", "y")] + ([("u64", "res")] if "res" in self.arguments else [])
        if self.geometry.masked:
            args += [("u64", "z"), ("u32", "ih"), ("u32", "iw")]
        return tuple(args + [("u32", "act")] + ([("u32", "sp")] if self.k_split > 1 else []))


@dataclass(frozen=True)
class ChainIR(Precision):
    """Kernels run one after the other by the same blocks of one entry (families/immediate/
    fuse.py: a pointwise convolution, then the depthwise convolution that reads its output).

    The entry takes the pointer `arguments`; stage i sees its own pointers (x, y, z) as the
    kernel arguments `bindings[i]` names ((stage pointer, kernel argument) pairs, in the
    stage's argument order), evaluates its own columns, pointers and slot, and runs its own
    phases; a block barrier separates the stages. Every stage has one column tile (tiles == 1),
    the same col_threads, k_split 1 and the same row groups, so block `by` runs group `by` of
    every stage, and a later stage may read what an earlier stage of the same block wrote (its
    loads then must be coherent: KernelIR.coherent_loads). Each stage's own `entry` and
    `arguments` name nothing in the printed kernel but its bodies' functions and parameters.
    """

    entry: str
    comment: str
    stages: tuple[KernelIR, ...]
    arguments: tuple[str, ...]
    bindings: tuple[tuple[tuple[str, str], ...], ...]
    # as KernelIR's: once, at the top of the entry
    dependent_launch: bool = False

    @property
    def dtype(self) -> str:
        return self.stages[0].dtype

    @property
    def accumulate(self) -> str:
        return self.stages[0].accumulate

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.stages[0].grid

    @property
    def block(self) -> tuple[int, int, int]:
        return self.stages[0].block

    @property
    def col_threads(self) -> int:
        return self.stages[0].col_threads

    @property
    def k_split(self) -> int:
        return 1

    @property
    def max_registers(self) -> int:
        return self.stages[0].max_registers

    @property
    def shared_bytes(self) -> int:
        return 0


@dataclass(frozen=True, eq=False)
class StreamIR(Precision):
    """A streamed-family kernel: one loop, its pattern as data (families/streamed/plan.py).

    Grid (worker blocks, column tiles): the entry evaluates `columns` with bx = blockIdx.y (the
    tile) and offsets the pointers like KernelIR; with padding, each tap
    segment t gets its base once: x while (ih + r, iw + s) lies inside the image, else the zero
    buffer shifted by `bases[t].zero_shift`. Worker w = blockIdx.x * warps + ty runs row entries
    work[w]..work[w+1]; row entry i computes output row row_out[i] from nonzeros
    seg[i, t]..seg[i, t+1] of each segment t: nonzero e adds values[e] * base_t[offsets[e]].
    Nonzero k of a segment feeds accumulator k % chains (the loop takes them 32 at a time: one
    coalesced load, then shared by the warp through shuffles, or with stage "smem" through a
    per-warp shared-memory buffer read two entries at a time; "ring": the worker's entries as one
    stream through a 64-entry ring); accumulators carry across segments, summed in order
    (((a0 + a1) + a2) + ...) before the epilogue: + bias[row], + res[row * out_pixels], max 0,
    min 6, then the store at y + row * out_pixels (stores only where act).
    With k_slices > 1 (grid[2] slices), slice z of row entry i reads its segments from
    seg[i, z * (segments + 1):(z + 1) * (segments + 1)]; each slice's chain sum is a partial,
    and the epilogue runs on the partials added in slice order (((p0 + p1) + p2) + ...).
    """

    entry: str
    comment: str
    geometry: Geometry
    dtype: str
    accumulate: str
    vector_width: int
    col_threads: int
    warps: int
    chains: int
    grid: tuple[int, int, int]
    arguments: tuple[str, ...]
    columns: tuple[IndexOp, ...]
    pointers: tuple[tuple[str, str], ...]
    bases: tuple[TapBase, ...]
    work: object                    # numpy int64 arrays / float64 values as the kernel holds them
    row_out: object
    seg: object
    offsets: object
    values: object
    bias: tuple[float, ...] | None  # per output row, as the kernel holds it
    residual: bool
    activation: str
    stage: str = "shfl"             # how a warp shares its chunk of 32 entries: shfl, smem, ring
    k_slices: int = 1               # K-slices on blockIdx.z (grid[2])
    # as KernelIR's, but the next launch is let start first, and the wait is printed before
    # each row's first activation load, after the row's table loads (ring: before the row loop;
    # K-slices: also before the partials and counters). ptxas hoists it: in the cubin only the
    # worker's row range (two loads) comes before the wait, at the top of each row iteration.
    # Right after letting the next launch start, the block asks L2 for its row headers and
    # entries (render/stream.py `spans`, `prefetches`): constant data, fetched while the
    # previous kernel still runs
    dependent_launch: bool = False
    min_blocks: int = 1             # __launch_bounds__'s second argument when > 1
    # GEMM views: y (and res) are N x M; column j of row m at (j * out_channels + m). The y and
    # res pointers advance by outoff * out_channels; each column is a scalar load / store
    token_major: bool = False
    # token-major output staged in shared memory: worker block b computes rows [b * tile_rows,
    # (b + 1) * tile_rows), each row's values go to the block's tile, and after a
    # __syncthreads the block writes the tile out column by column (0: scalar stores)
    tile_rows: int = 0
    # token-major output in planes of `planes` rows (Epilogue.planes): row m, column j at
    # (m / P) * (N * P) + j * P + m % P; the pointers advance by outoff * P (0: one plane)
    planes: int = 0
    # stages tile and smem: the entries each block copies into static shared memory before its
    # loop (the most any block owns; 0: its warps load them 32 at a time). Lowering sets it
    # where the plan allows (StreamPlan.staged_entries); build.lowered() clears it for a target
    # without cp.async (before sm_80) or whose block cannot hold it beside the tile's image
    staged: int = 0

    k_split = 1
    shared_bytes = 0                # smem staging is a static array (stage_warps)
    max_registers = 0

    @property
    def block(self) -> tuple[int, int, int]:
        return (self.col_threads, self.warps, 1)

    @property
    def stage_warps(self) -> int:
        """Warps with a shared-memory buffer of 64 entries (8 B each): all of the block's for the
        smem and ring stages, none for shfl."""
        return self.col_threads // 32 * self.warps if self.stage != "shfl" else 0

    ARRAYS = ("work", "row_out", "seg", "offsets", "values")
    SCALARS = ("entry", "geometry", "dtype", "accumulate", "vector_width", "col_threads", "warps",
               "chains", "grid", "arguments", "columns", "pointers", "bases", "bias", "residual",
               "activation", "stage", "k_slices", "dependent_launch", "min_blocks", "token_major",
               "tile_rows", "planes", "staged")

    def difference(self, other: "StreamIR") -> str | None:
        """The first field where `other` differs from this IR (None: equal)."""
        import numpy as np

        for name in self.SCALARS:
            if getattr(self, name) != getattr(other, name):
                return f"{name}: {getattr(self, name)!r} != {getattr(other, name)!r}"
        for name in self.ARRAYS:
            a, b = getattr(self, name), getattr(other, name)
            if np.shape(a) != np.shape(b) or not np.array_equal(a, b):
                return f"{name} differs"
        return None
