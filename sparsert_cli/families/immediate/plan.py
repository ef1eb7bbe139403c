"""The immediate family's plan and planner: plain numbers that say exactly what a kernel computes.

The plan is lowered once (lower.py) to the kernel IR that every printer prints and the CPU
interpreter executes; if two printers disagree on the GPU, the bug is in a printer, never here.

Kernel shape (SparseRT's, generalised to strided/padded/batched convolutions):
  * Columns j in [0, N), N = batch*Ho*Wo, are output pixels. A thread owns `vector_width` consecutive
    columns; `col_threads` threads side by side cover one column tile; blockIdx.x picks the tile.
  * Output rows (channels) are packed into row groups, balanced by nonzero count; blockIdx.y picks
    the group. With grid_order "groups" the two swap (blockIdx.x picks the group): the blocks the
    GPU runs together are then every group of a few column tiles, which read one activation tile
    from DRAM once and share it through L2, instead of one group over many tiles, which streams
    the activations from DRAM once per group when they do not fit in L2 (batch 32). Each group's code is straight-line: for each input tap t it loads the activation at
    the immediate offset tap_offset(t) once and multiplies it into every row of the group that has a
    nonzero at t (the value is an immediate).
  * With k_split > 1, a group's taps are split over threadIdx.y; partial sums meet in shared memory
    and thread row ty finishes rows r with r % k_split == ty (epilogue and store).
"""

from __future__ import annotations

import hashlib
import heapq
import json
from dataclasses import asdict, dataclass, replace
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from ...errors import UserError
from ..base import Params, check_layer
from ...problem_shape import (HALF_DTYPES, MAX_STATIC_SHARED, MAX_THREADS, ColumnTiles, Epilogue,
                              Geometry, max_vector_width)

BALANCE_MODES = ("nnz", "contiguous")
GRID_ORDERS = ("tiles", "groups")     # what blockIdx.x picks
MAX_GRID_Y = 65535


@dataclass(frozen=True)
class PlanParams(Params):
    """Every tunable of the kernel family; `name()` is part of the symbol and the cache key."""

    TEXT = ("balance", "grid_order")

    rows_per_group: int = 8
    vector_width: int = 4
    col_threads: int = 64
    k_split: int = 1
    load_batch: int = 8
    balance: str = "nnz"
    max_registers: int = 0          # 0: the compiler's choice (up to 255)
    grid_order: str = "tiles"       # blockIdx.x picks column tiles ("tiles") or row groups

    def name(self) -> str:
        regs = f"m{self.max_registers}" if self.max_registers else ""
        order = "g" if self.grid_order == "groups" else ""
        return (f"r{self.rows_per_group}v{self.vector_width}t{self.col_threads}"
                f"k{self.k_split}b{self.load_batch}{self.balance[0]}{regs}{order}")

    def key(self) -> dict:
        """The fields as a dict; grid_order only when "groups" (plans made before it keep their
        keys and kernel names)."""
        doc = asdict(self)
        if self.grid_order == "tiles":
            del doc["grid_order"]
        return doc

    def validate(self) -> PlanParams:
        checks = [
            (1 <= self.rows_per_group <= 64, "rows_per_group must be in 1..64"),
            (self.vector_width in (1, 2, 4, 8), "vector_width must be 1, 2, 4 or 8 (8: fp16/bf16)"),
            (self.col_threads % 32 == 0 and 32 <= self.col_threads <= 512,
             "col_threads must be a multiple of 32 up to 512"),
            (1 <= self.k_split <= 16, "k_split must be in 1..16"),
            (self.col_threads * self.k_split <= MAX_THREADS,
             f"col_threads * k_split must be <= {MAX_THREADS}"),
            (1 <= self.load_batch <= 32, "load_batch must be in 1..32"),
            (self.balance in BALANCE_MODES, f"balance must be one of {', '.join(BALANCE_MODES)}"),
            (self.max_registers == 0 or 32 <= self.max_registers <= 255,
             "max_registers must be 0 (no cap) or in 32..255"),
            (self.grid_order in GRID_ORDERS, f"grid_order must be one of {', '.join(GRID_ORDERS)}"),
        ]
        return self._checked(checks)


@dataclass(frozen=True)
class Load:
    """One activation load (tap t) shared by the rows of its group: (row slot, weight) pairs."""

    tap: int
    uses: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class RowGroup:
    rows: tuple[int, ...]                    # slot i computes output row rows[i]
    slices: tuple[tuple[Load, ...], ...]     # len == k_split; slice s runs on threadIdx.y == s

    @property
    def nnz(self) -> int:
        return sum(len(load.uses) for sl in self.slices for load in sl)


@dataclass(frozen=True)
class Plan(ColumnTiles):
    geometry: Geometry
    params: PlanParams               # effective parameters (vector width after fitting the shape)
    groups: tuple[RowGroup, ...]
    epilogue: Epilogue = Epilogue()
    dtype: str = "fp32"             # storage of x, y, residual: fp32, fp16 or bf16
    accumulate: str = "fp32"        # registers the sums live in: fp32, or fp16 (half2 FMAs)

    @property
    def k_split(self) -> int:
        return self.params.k_split

    @property
    def rows_max(self) -> int:
        return max(len(g.rows) for g in self.groups)

    @property
    def grid(self) -> tuple[int, int, int]:
        tiles = -(-self.geometry.columns // self.tile_columns)
        if self.params.grid_order == "groups":
            return (len(self.groups), tiles, 1)
        return (tiles, len(self.groups), 1)

    @property
    def block(self) -> tuple[int, int, int]:
        return (self.col_threads, self.k_split, 1)

    @property
    def shared_bytes(self) -> int:
        if self.k_split == 1:
            return 0
        return (self.k_split * self.rows_max * self.col_threads * self.vector_width
                * self.acc_bytes)

    @property
    def nnz(self) -> int:
        return sum(g.nnz for g in self.groups)

    @property
    def arguments(self) -> tuple[str, ...]:
        """Kernel pointer arguments, in order: x (input), y (output), res (residual, same shape
        as y) when fused, z (an all-zero buffer of one image, C*H*W elements) when padded."""
        return (("x", "y") + (("res",) if self.epilogue.residual else ())
                + (("z",) if self.geometry.masked else ()))

    @property
    def loads(self) -> int:
        return sum(len(sl) for g in self.groups for sl in g.slices)

    def digest(self) -> str:
        """Hash of everything the kernel computes; values enter by their float32 bits."""
        return self._digest

    @cached_property
    def _digest(self) -> str:  # computed once: large plans take a noticeable fraction of a second
        h = hashlib.sha256()
        h.update(json.dumps({"geometry": asdict(self.geometry), "params": self.params.key(),
                             "epilogue": self.epilogue.key(), "dtype": self.dtype,
                             "accumulate": self.accumulate},
                            sort_keys=True).encode())
        for g in self.groups:
            h.update(np.asarray(g.rows, dtype=np.int64).tobytes())
            for sl in g.slices:
                h.update(b"|")
                for load in sl:
                    h.update(load.tap.to_bytes(4, "little"))
                    for slot, value in load.uses:
                        h.update(slot.to_bytes(2, "little"))
                        h.update(np.float32(value).tobytes())
        return h.hexdigest()

    @property
    def entry(self) -> str:
        return f"sparsert_{self.params.name()}_{self.digest()[:12]}"


def pair_windows(geometry: Geometry, dtype: str) -> bool:
    """Whether a direct convolution can take column pairs (width 2) through pair windows
    (KernelIR.pair_windows): 2-byte storage, 3x3, stride 1, padding 1 and an even width, so a
    thread's two columns share an output row and every pair it loads is aligned and lies wholly
    inside or wholly outside the image."""
    return (dtype in HALF_DTYPES and geometry.kernel == 3 and geometry.stride == 1
            and geometry.padding == 1 and geometry.width % 2 == 0)


def takes_pairs(geometry: Geometry, vector_width: int, dtype: str) -> bool:
    """Whether a plan of this (fitted) width is a pair-window kernel (KernelIR.pair_windows)."""
    return not geometry.linear and vector_width == 2 and pair_windows(geometry, dtype)


def fit_vector_width(geometry: Geometry, requested: int, dtype: str = "fp32",
                     windows: bool = False) -> int:
    """Largest width <= requested whose vectors stay inside one image row-run, stay aligned and
    fit one 16-byte load; direct convolutions take one column, or with `windows` (the immediate
    family) a pair where pair_windows allows."""
    if not geometry.linear:
        return 2 if windows and requested >= 2 and pair_windows(geometry, dtype) else 1
    width = min(requested, max_vector_width(dtype))
    while width > 1 and (geometry.out_pixels % width or geometry.image_elems % width):
        width //= 2
    return width


def fit_columns(geometry: Geometry, vector_width: int, col_threads: int,
                dtype: str = "fp32", windows: bool = False) -> tuple[int, int]:
    """(vector width, column threads) fitted to the shape: a legal width, and no more threads
    (whole warps) than the columns need. Both families map columns to threads this way."""
    width = fit_vector_width(geometry, vector_width, dtype, windows)
    per_thread = -(-geometry.columns // width)
    return width, min(col_threads, max(32, -(-per_thread // 32) * 32))


def fit_params(geometry: Geometry, params: PlanParams, dtype: str = "fp32") -> PlanParams:
    """Clamp parameters to the shape: no more column threads than columns, a legal vector width."""
    params = params.validate()
    width, threads = fit_columns(geometry, params.vector_width, params.col_threads, dtype,
                                 windows=True)
    rows = min(params.rows_per_group, geometry.out_channels)
    return replace(params, vector_width=width, col_threads=threads, rows_per_group=rows)


def _assign_rows(row_nnz: np.ndarray, rows_per_group: int, balance: str) -> list[list[int]]:
    m = len(row_nnz)
    n_groups = -(-m // rows_per_group)
    if balance == "contiguous":
        return [list(range(i, min(i + rows_per_group, m))) for i in range(0, m, rows_per_group)]
    # Longest-processing-time first with a row cap: heaviest row to the lightest group that has room.
    # Work counts a row's FMAs plus one for its store, so empty rows spread out too.
    groups: list[list[int]] = [[] for _ in range(n_groups)]
    heap = [(0, 0, g) for g in range(n_groups)]          # (work, rows, group)
    for row in sorted(range(m), key=lambda r: (-row_nnz[r], r)):
        work, count, g = heapq.heappop(heap)
        groups[g].append(row)
        if count + 1 < rows_per_group:
            heapq.heappush(heap, (work + int(row_nnz[row]) + 1, count + 1, g))
    return [sorted(g) for g in groups if g]


def _split_taps(taps: np.ndarray, weights: np.ndarray, parts: int) -> list[slice]:
    """Split sorted taps into `parts` contiguous runs of about equal work (loads + FMAs)."""
    if parts == 1 or len(taps) == 0:
        return [slice(0, len(taps))] + [slice(len(taps), len(taps))] * (parts - 1)
    cost = np.cumsum(weights + 1)
    bounds = [0]
    for p in range(1, parts):
        bounds.append(max(bounds[-1], int(np.searchsorted(cost, cost[-1] * p / parts))))
    bounds.append(len(taps))
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


def row_group(csr: sp.csr_matrix, rows, k_split: int = 1) -> RowGroup:
    """The group computing `rows` (slot i: rows[i]) of a float32 CSR weight with sorted indices
    and no explicit zeros: its loads in tap order, split into `k_split` slices."""
    sub = csr[list(rows)].tocsc()
    sub.sort_indices()
    taps = np.flatnonzero(np.diff(sub.indptr))
    per_tap = np.diff(sub.indptr)[taps]
    slices = []
    for run in _split_taps(taps, per_tap, k_split):
        loads = []
        for tap in taps[run]:
            lo, hi = sub.indptr[tap], sub.indptr[tap + 1]
            uses = tuple((int(slot), float(val))
                         for slot, val in zip(sub.indices[lo:hi], sub.data[lo:hi]))
            loads.append(Load(int(tap), uses))
        slices.append(tuple(loads))
    return RowGroup(tuple(int(r) for r in rows), tuple(slices))


def build_plan(csr: sp.csr_matrix, geometry: Geometry, params: PlanParams,
               epilogue: Epilogue = Epilogue(), dtype: str = "fp32",
               accumulate: str | None = None) -> Plan:
    """Pack the weight's rows into groups and order each group's loads. `accumulate` defaults to
    the storage type's (problem_shape.default_accumulate)."""
    geometry, accumulate = check_layer(csr, geometry, epilogue, dtype, accumulate)
    if epilogue.token_major:
        raise UserError("token-major output is built by the streamed family only")
    if epilogue.activation == "gelu":
        raise UserError("activation gelu is built by the streamed family only")
    params = fit_params(geometry, params, dtype)
    csr = sp.csr_matrix(csr, dtype=np.float32)
    csr.sort_indices()
    csr.eliminate_zeros()
    row_nnz = np.diff(csr.indptr)
    groups = tuple(row_group(csr, rows, params.k_split)
                   for rows in _assign_rows(row_nnz, params.rows_per_group, params.balance))
    plan = Plan(geometry, params, groups, epilogue, dtype, accumulate)
    if plan.grid[1] > MAX_GRID_Y:
        raise UserError(f"plan {params.name()} needs {plan.grid[1]} blocks on the grid's y axis "
                        f"(limit {MAX_GRID_Y}): use grid_order "
                        f"{'tiles' if params.grid_order == 'groups' else 'groups'} or wider tiles")
    if plan.shared_bytes > MAX_STATIC_SHARED:
        raise UserError(f"plan {params.name()} needs {plan.shared_bytes} bytes of shared memory "
                        f"(limit {MAX_STATIC_SHARED}): lower k_split, rows_per_group or col_threads")
    return plan
