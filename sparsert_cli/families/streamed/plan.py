"""The streamed family's plan and planner: weights as data, a short loop that stays hot.

The immediate family turns every nonzero into an instruction, so a layer's code grows with its
nonzeros and large layers wait on instruction fetch (docs/perf-notes.md). Here the code is one
loop whatever the nonzero count; the pattern becomes compact data laid out at compile time in the
order the loop consumes it:

  * Columns j in [0, N) are output pixels, mapped to threads exactly as in the immediate family
    (`vector_width` consecutive columns per thread, `col_threads` threads per column tile,
    blockIdx.x picks the tile).
  * Output rows are dealt to *workers* (one warp row of a block each: worker = blockIdx.y *
    warps + threadIdx.y), balanced by nonzeros (longest first). All lanes of a warp run the same
    row, so every weight/offset read is warp-uniform (one broadcast load), and the activations a
    block's workers read for one column tile stay in L1 for every row that needs them.
  * A row's nonzeros are sorted by kernel tap (r, s) then address; with padding each tap (r, s)
    is one segment whose base pointer (input, or the zero buffer) is chosen once per thread, so the
    loop has no bounds tests. Entries of a segment are spread over `chains` accumulators.
  * `k_slices` > 1 splits the reduction (K) by input channel into slices run on blockIdx.z:
    more warps for layers with few long rows, and a smaller activation tile per block. Every
    slice has the same workers and rows; a block stores its partial sums in the module's
    workspace, and the block that finishes a (worker block, column tile) last adds the slices
    in order (deterministic) and runs the epilogue.
  * Stage "tile" (fp16 sums, 3x3 convolutions of stride 1 and padding 1 whose image fits in
    shared memory): each block first copies its image, zero-padded, into shared memory, so a
    row's nonzeros are one run of (tile offset, weight) entries (no tap segments, no per-tap
    bases). At width 2 each thread computes the two pixels (oh, ow) and (oh + H2, ow),
    H2 = ceil(H / 2), with two 16-bit shared loads, one byte permute and one HFMA2 per
    nonzero; at width 1 one pixel. blockIdx.y is the image (docs/perf-notes.md, session 23).
    At width 8 (ROW_VECTORS: images of at most 8 rows of 7 pixels) the tile is one 16-byte
    vector [0, image row, zeros] per channel and tile row, a worker is one warp whose four
    groups of eight lanes take every fourth entry, lane j holding output row j's eight pixels;
    an entry's word carries the PRMT selector that shifts its vector by the tap's column
    (docs/perf-notes.md, session 25).
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
from ...problem_shape import ELEMENT_BYTES, MAX_THREADS, PRECISIONS, ColumnTiles, Epilogue, Geometry
from ..immediate.plan import fit_columns, fit_vector_width

MAX_ROWS_PER_WORKER = 4096
# Segments are padded to a multiple of PAD nonzeros with zero weights at the segment's last
# offset (always in bounds), so the loop runs whole groups of PAD with every load in flight and
# no bounds tests. A zero weight adds 0 * x: exact for finite inputs (an infinite input at that
# offset gives NaN where the dense product gives +-inf).
PAD = 8
MAX_GRID_Y = 65535              # column tiles run on blockIdx.y
INT_MAX = 2**31 - 1             # the tables are `int` words, indexed with int arithmetic
STAGES = {"shfl": "", "smem": "m", "ring": "g", "tile": "t"}  # stage -> its plan-name suffix
MAX_K_SLICES = 16
MAX_DEFAULT_SLICES = 2          # the most K-slices the untuned default takes
# a default slice keeps at least this many nonzeros of each row: each slice adds a row's fixed
# latency (its table reads) and the split adds the reduction's (fence, counter, partials)
MIN_SLICE_NONZEROS = 192
# the k-split workspace (slices x outputs partial sums) is static memory of the loaded module
MAX_WORKSPACE_BYTES = 64 << 20
MAX_MIN_BLOCKS = 8
MAX_STAGED_BYTES = 24 << 10     # shared memory a block may use to stage token-major output
MAX_SM_THREADS = 2048           # resident threads per SM (sm_70 to sm_90)
# stage "tile": the most a block may keep of its zero-padded image in (dynamic) shared memory
# (sm_90 gives a block up to 227 KB; the entry buffers take some of the rest)
MAX_TILE_BYTES = 200 << 10
TILE_LEAD = 8                   # zero halves before the first channel (16 bytes)
# stage "tile" at this vector width: row vectors (session 25). A lane holds eight pixels of one
# output row (W <= 7), each tile row is one 16-byte vector [0, x0, .., x(W-1), 0..], and the
# warp's four groups of eight lanes take four entries at a time
ROW_VECTORS = 8
VECTOR_SELECTORS = (0x3210, 0x5432, 0x7654)   # PRMT: a tap's column s = 0, 1, 2 (shift s halves)
# stages "tile" and "smem": a block's entries (8 bytes each) are copied into static shared
# memory (at most 48 KB a kernel) before its wait for the previous grid, where they fit this
# (tile: and, with the image, TILE_BLOCK_BYTES); else its warps stream them in chunks of 32
# (session 24)
MAX_STAGED_ENTRY_BYTES = 40 << 10
TILE_BLOCK_BYTES = 226 << 10     # sm_90's 227 KB a block less 1 KB (ptxas counts 1 KB reserved)
# the tile stage's code generation (part of a tile plan's digest, so its cache key and symbol):
# 2 = the block's entries staged in shared memory up front
TILE_CODE = 2
# stage "smem" with its block's entries staged in shared memory (part of such a plan's digest)
STAGED_CODE = 1
# whether defaults and candidates offer the tile stage: an experiment's switch for same-run
# comparisons (scripts/model_profile.py --no-tile); read when a layer is planned
TILE = True
# whether the untuned default of an fp16 3x3 layer whose image row vectors hold (at most 8 rows of
# 7 pixels: ResNet-50's 7x7 layers) is the tile stage with row vectors (session 25;
# scripts/model_profile.py --no-row-vectors); read when a layer is planned
ROW_VECTOR_DEFAULT = True


@dataclass(frozen=True)
class StreamParams(Params):
    """Every tunable of the streamed family; `name()` is part of the symbol and the cache key."""

    col_threads: int = 32
    vector_width: int = 1
    warps: int = 4                  # workers (warp rows) per block
    rows_per_worker: int = 4        # sets the worker count: ceil(rows / rows_per_worker)
    chains: int = 4                 # independent accumulators per column (loop unroll)
    # how a warp shares each chunk of 32 (offset, weight) entries it loads: two shuffles per
    # entry ("shfl"), or a per-warp shared-memory buffer read as one broadcast 16-byte load per
    # two entries ("smem"; fewer instructions on the LSU/MIO pipe the activation loads share),
    # or "ring": like smem, but the worker's whole entry run (every row and tap segment) is one
    # stream through a 64-entry ring with the next chunk always in flight and row headers read
    # one row ahead, so no row or segment start waits on a table load
    stage: str = "shfl"
    k_slices: int = 1               # input-channel slices run on blockIdx.z (see the module doc)
    # blocks per SM the registers must allow (`__launch_bounds__(threads, min_blocks)`): ptxas
    # caps each thread's registers at 64K / (threads * min_blocks), trading loads in flight per
    # warp for more warps to hide the activation loads' latency (docs/perf-notes.md, session 9)
    min_blocks: int = 1

    TEXT = ("stage",)

    def name(self) -> str:
        return (f"s{self.col_threads}v{self.vector_width}w{self.warps}r{self.rows_per_worker}"
                f"c{self.chains}{STAGES.get(self.stage, '?')}"
                + (f"k{self.k_slices}" if self.k_slices > 1 else "")
                + (f"b{self.min_blocks}" if self.min_blocks > 1 else ""))

    def key(self) -> dict:
        """The fields as a dict; k_slices and min_blocks only when > 1 (plans made before them
        keep their keys)."""
        doc = asdict(self)
        for name in ("k_slices", "min_blocks"):
            if doc[name] == 1:
                del doc[name]
        return doc

    def validate(self) -> StreamParams:
        checks = [
            (self.col_threads % 32 == 0 and 32 <= self.col_threads <= (
                MAX_THREADS if self.stage == "tile" else 256),
             "col_threads must be a multiple of 32 up to 256 (up to "
             f"{MAX_THREADS} with stage tile: its pixels in whole warps)"),
            (self.vector_width in (1, 2, 4, 8), "vector_width must be 1, 2, 4 or 8 (8: 2-byte types)"),
            (1 <= self.warps <= 32, "warps must be in 1..32"),
            (self.col_threads * self.warps <= MAX_THREADS,
             f"col_threads * warps must be <= {MAX_THREADS}"),
            (1 <= self.rows_per_worker <= MAX_ROWS_PER_WORKER,
             f"rows_per_worker must be in 1..{MAX_ROWS_PER_WORKER}"),
            (self.chains in (1, 2, 4, 8), "chains must be 1, 2, 4 or 8"),
            (self.stage in STAGES, f"stage must be one of {', '.join(STAGES)}"),
            (1 <= self.k_slices <= MAX_K_SLICES, f"k_slices must be in 1..{MAX_K_SLICES}"),
            (1 <= self.min_blocks <= MAX_MIN_BLOCKS
             and self.col_threads * self.warps * self.min_blocks <= MAX_SM_THREADS,
             f"min_blocks must be in 1..{MAX_MIN_BLOCKS} with col_threads * warps * min_blocks "
             f"<= {MAX_SM_THREADS} (threads an SM holds)"),
            (self.k_slices == 1 or self.stage not in ("ring", "tile"),
             "k_slices > 1 needs stage smem or shfl (the ring streams a worker's whole run, "
             "the tile stage one image)"),
        ]
        return self._checked(checks)


@dataclass(frozen=True)
class TileLayout:
    """Stage "tile": the zero-padded image in shared memory, in halves. Tile row i of channel c
    (i in [0, rows)) holds image row i - 1 in its first W halves and zeros after them; the
    zeros at a row's end are also the left neighbours of the next row's first pixel. Thread
    (oh, ow), oh < half, reads tap (c, r, s) of its (top) pixel at its base oh * row + ow plus
    offset(c, r, s); with pixel pairs (width 2) the thread also computes (oh + half, ow),
    pair_delta halves further."""

    half: int           # rows of (top) pixels: H, or with pairs ceil(H / 2)
    row: int            # halves per tile row: >= W + 1, whole 16-byte stores
    rows: int           # tile rows per channel: H + 2, or with pairs 2 * half + 2
    channels: int
    pixels: int         # threads that compute: half * W
    threads: int        # column threads: `pixels` in whole warps
    pairs: bool
    # row vectors (ROW_VECTORS): tile row i of channel c is the 16-byte vector
    # [0, image row i - 1, zeros] (rows 0 and H + 1 all zeros), TILE_LEAD zeros first; lane j of
    # each group of eight reads output row min(j, H - 1)'s vectors, and an entry's offset word is
    # (vectors from the lane's base to the tap's vector) << 16 | the PRMT selector that shifts
    # it by the tap's column s: 0x3210 + 0x2222 s (VECTOR_SELECTORS)
    vectors: bool = False
    # row vectors: halves after the tile where the block first copies its image as it lies in
    # global memory (whole 16-byte pieces, cp.async), then builds the tile's vectors from it
    raw: int = 0

    @property
    def channel(self) -> int:
        return self.rows * self.row

    @property
    def halves(self) -> int:
        """The tile's halves (the lead and every channel's rows; not the raw copy)."""
        return TILE_LEAD + self.channels * self.channel

    @property
    def bytes(self) -> int:
        """Dynamic shared memory a block asks for: the tile and the raw copy."""
        return 2 * (self.halves + self.raw)

    @property
    def pair_delta(self) -> int:
        return self.half * self.row

    def offset(self, channel, r, s):
        """Halves from a thread's base to tap (r, s) of `channel` (3x3, padding 1); with row
        vectors the entry word (vectors to the tap's vector) << 16 | VECTOR_SELECTORS[s]."""
        if self.vectors:
            return ((TILE_LEAD + channel * self.channel + r * self.row) // 8) << 16 | (
                np.asarray(VECTOR_SELECTORS)[s])
        return TILE_LEAD + channel * self.channel + r * self.row + s - 1


def tile_layout(geometry: Geometry, width: int = 2) -> TileLayout:
    """The tile of pixel pairs (width 2 or 4), of one pixel a thread (width 1) or of row
    vectors (ROW_VECTORS: one warp a worker, its 32 lanes four groups of eight)."""
    if width == ROW_VECTORS:
        return TileLayout(half=geometry.height, row=8, rows=geometry.height + 2,
                          channels=geometry.in_channels, pixels=geometry.out_pixels,
                          threads=32, pairs=False, vectors=True,
                          raw=-(-geometry.in_channels * geometry.height * geometry.width // 8) * 8)
    pairs = width >= 2
    half = -(-geometry.height // 2) if pairs else geometry.height
    pixels = half * geometry.width
    return TileLayout(half=half, row=-(-(geometry.width + 1) // 8) * 8,
                      rows=2 * half + 2 if pairs else geometry.height + 2,
                      channels=geometry.in_channels, pixels=pixels,
                      threads=max(32, -(-pixels // 32) * 32), pairs=pairs)


def tile_kind(vector_width: int) -> int:
    """The tile stage's width for a plan's vector width: row vectors (ROW_VECTORS), pixel
    pairs (2, also for 4) or one pixel a thread (1)."""
    return vector_width if vector_width in (1, ROW_VECTORS) else 2


def tile_refusal(geometry: Geometry, dtype: str, accumulate: str | None = None,
                 width: int = 1) -> str | None:
    """Why stage "tile" of this width cannot run this layer (None: it can)."""
    if dtype != "fp16" or accumulate not in (None, "fp16"):
        return "it needs fp16 data with fp16 (half2) sums"
    if not (geometry.kernel == 3 and geometry.stride == 1 and geometry.padding == 1):
        return "it takes 3x3 convolutions of stride 1 and padding 1"
    if width == ROW_VECTORS and (geometry.width > 7 or geometry.height > 8):
        return (f"row vectors (vector_width 8) take images of at most 8 rows of at most 7 "
                f"pixels, not {geometry.height}x{geometry.width} (vector_width 2: pixel pairs, "
                f"1: one pixel a thread)")
    if width == ROW_VECTORS and geometry.in_channels * geometry.height * geometry.width % 8:
        return ("row vectors copy the image in 16-byte pieces: channels x pixels must be a "
                "multiple of 8")
    layout = tile_layout(geometry, width)
    if layout.bytes > MAX_TILE_BYTES:
        return (f"the padded image ({layout.bytes >> 10} KB) exceeds the "
                f"{MAX_TILE_BYTES >> 10} KB a block may keep in shared memory")
    if layout.threads > MAX_THREADS:
        return f"its {layout.pixels} pixel threads exceed a block's {MAX_THREADS} threads"
    return None


def tile_width(geometry: Geometry) -> int:
    """The tile stage's width for this image: pixel pairs where they still fill two warps, else
    one pixel a thread (28 pairs a worker left rn50_c5_3x3 29% slower than the smem stage:
    fewer threads to copy the image, fewer warps to compute; H100, session 23)."""
    return 2 if tile_layout(geometry, 2).pixels >= 64 else 1


def tile_default_applies(geometry: Geometry, precision: str) -> bool:
    """Whether the untuned default is the tile stage: fp16 sums, one image, and pixel pairs
    (H100, session 23, warm and in the ResNet-50 fp16 forward: rn50_c4_3x3, 98 pairs, 10.9 ->
    8.3 us; rn50_c5_3x3 at one pixel a thread 11.9 -> 11.3 us warm but 12.1 -> 15.7 us in the
    forward, so not there)."""
    return (TILE and precision == "fp16" and geometry.batch == 1 and tile_width(geometry) == 2
            and tile_refusal(geometry, PRECISIONS[precision][0], width=2) is None)


def row_vectors_default_applies(geometry: Geometry, precision: str) -> bool:
    """Whether the untuned default is the tile stage with row vectors: fp16 sums, one image,
    and an image row vectors hold (H100, session 25: docs/perf-notes.md)."""
    return (TILE and ROW_VECTOR_DEFAULT and precision == "fp16" and geometry.batch == 1
            and tile_refusal(geometry, PRECISIONS[precision][0], width=ROW_VECTORS) is None)


def block_entries(work: np.ndarray, seg: np.ndarray, warps: int) -> int:
    """The most entries one worker block's rows own (a block's rows are consecutive row entries
    and their nonzeros one run of entries: seg[first row, 0] to seg[last row, -1])."""
    first = np.asarray(work, dtype=np.int64)[::warps]
    seg = np.asarray(seg, dtype=np.int64)
    most = 0
    for a, b in zip(first[:-1].tolist(), first[1:].tolist()):
        if b > a:
            most = max(most, int(seg[b - 1, -1] - seg[a, 0]))
    return most


def staged_entries(geometry: Geometry, stage: str, width: int, work: np.ndarray,
                   seg: np.ndarray, warps: int, tile_rows: int = 0) -> int:
    """Entries a block stages in shared memory (0: its warps stream them 32 at a time): the
    block's whole run (every K-slice's) where it fits MAX_STAGED_ENTRY_BYTES, for stage "tile"
    (beside the image, in TILE_BLOCK_BYTES) and stage "smem" (not with token-major output
    staged in shared memory too: tile_rows)."""
    if stage not in ("tile", "smem") or (stage == "smem" and tile_rows):
        return 0
    n = block_entries(work, seg, warps)
    fits = 8 * n <= MAX_STAGED_ENTRY_BYTES and (
        stage != "tile" or tile_layout(geometry, width).bytes + 8 * n <= TILE_BLOCK_BYTES)
    return n if n and fits else 0


def fits_arch(geometry: Geometry, params: StreamParams, arch: str) -> bool:
    """Whether a block of `arch` holds a kernel of these (fitted) parameters: a tile plan's
    image plus its warps' entry buffers (build.lowered() streams the entries where staging them
    does not fit, and refuses a plan whose image does not)."""
    if params.stage != "tile":
        return True
    from ...arch import block_shared_bytes

    buffers = 256 * (params.col_threads // 32) * params.warps
    return dynamic_shared_bytes(geometry, params) + buffers <= block_shared_bytes(arch)


def dynamic_shared_bytes(geometry: Geometry, params: StreamParams) -> int:
    """Dynamic shared memory a kernel of these (fitted) parameters asks for at launch."""
    return (tile_layout(geometry, params.vector_width).bytes if params.stage == "tile"
            else 0)


@dataclass(frozen=True, eq=False)
class StreamPlan(ColumnTiles):
    """Arrays, in the order the kernel reads them:
    work[w]..work[w+1]: worker w's row entries; row_out[i]: output row of row entry i;
    seg[i, z * (segments + 1) + t]..[.. + t + 1]: its nonzeros of K-slice z, tap segment t
    (t < segments, z < k_slices; one slice: seg[i, t]..seg[i, t + 1]);
    offsets/values[e]: tap offset (elements from the thread's input base) and weight of nonzero e.
    """

    geometry: Geometry
    params: StreamParams
    work: np.ndarray          # int64 (workers + 1,)
    row_out: np.ndarray       # int64 (rows,)
    seg: np.ndarray           # int64 (rows, k_slices * (segments + 1))
    offsets: np.ndarray       # int64 (nnz,)
    values: np.ndarray        # float32 (nnz,)
    epilogue: Epilogue = Epilogue()
    dtype: str = "fp32"
    accumulate: str = "fp32"
    # token-major outputs staged per block (0: none): block b computes output rows
    # [b * tile_rows, (b + 1) * tile_rows), keeps them in shared memory and writes them out as
    # whole runs of rows per column (coalesced) instead of one scalar store per column and row
    tile_rows: int = 0

    k_split = 1                 # the immediate family's threadIdx.y split; here k_slices
    family = "streamed"

    @property
    def k_slices(self) -> int:
        return self.params.k_slices

    @property
    def workers(self) -> int:
        return len(self.work) - 1

    @property
    def segments(self) -> int:
        return self.seg.shape[1] // self.k_slices - 1

    @property
    def grid(self) -> tuple[int, int, int]:
        """(worker blocks, column tiles, K-slices): blocks are dispatched x first, so the blocks
        an SM holds at a time mostly share one column tile and slice, whose activations then stay
        in its L1."""
        if self.params.stage == "tile":         # one image a block (blockIdx.y)
            return (self.workers // self.params.warps, self.geometry.batch, 1)
        tiles = -(-self.geometry.columns // self.tile_columns)
        return (self.workers // self.params.warps, tiles, self.k_slices)

    @property
    def block(self) -> tuple[int, int, int]:
        return (self.col_threads, self.params.warps, 1)

    shared_bytes = 0

    @property
    def dynamic_shared_bytes(self) -> int:
        return dynamic_shared_bytes(self.geometry, self.params)

    @cached_property
    def staged_entries(self) -> int:
        """Entries each block of this plan may keep in static shared memory (staged_entries; 0:
        none; build.lowered() may still clear it for a target, StreamIR.staged)."""
        return staged_entries(self.geometry, self.params.stage, self.params.vector_width,
                              self.work, self.seg, self.params.warps, self.tile_rows)

    @property
    def warp_buffer_bytes(self) -> int:
        """Static shared memory of an unstaged tile kernel's entry buffers: 32 entries of 8
        bytes a warp (a staged one declares 8 bytes an entry it stages instead)."""
        return 256 * (self.params.col_threads // 32) * self.params.warps

    @property
    def nnz(self) -> int:
        """Nonzero weights (the padding entries hold zeros)."""
        return int(np.count_nonzero(self.values))

    @property
    def entries(self) -> int:
        """Entries in the tables, padding included."""
        return int(len(self.values))

    @property
    def loads(self) -> int:
        """Activation loads per column vector: one per nonzero (reuse is through L1)."""
        return self.nnz

    @property
    def data_bytes(self) -> int:
        """Bytes of pattern data the kernel carries (8 per nonzero, 4 per row boundary)."""
        return 8 * self.entries + 4 * (self.seg.size + self.work.size + self.row_out.size)

    @property
    def arguments(self) -> tuple[str, ...]:
        return (("x", "y") + (("res",) if self.epilogue.residual else ())
                + (("z",) if self.geometry.masked else ()))

    def digest(self) -> str:
        return self._digest

    @cached_property
    def _digest(self) -> str:
        h = hashlib.sha256(b"streamed")
        doc = {"geometry": asdict(self.geometry), "params": self.params.key(),
               "epilogue": self.epilogue.key(), "dtype": self.dtype,
               "accumulate": self.accumulate}
        if self.tile_rows:
            doc["tile_rows"] = self.tile_rows
        if self.params.stage == "tile":
            doc["tile_code"] = TILE_CODE
        elif self.staged_entries:
            doc["entries_staged"] = STAGED_CODE
        h.update(json.dumps(doc, sort_keys=True).encode())
        for array in (self.work, self.row_out, self.seg, self.offsets):
            h.update(b"|" + np.ascontiguousarray(array, dtype=np.int64).tobytes())
        h.update(b"|" + np.ascontiguousarray(self.values, dtype=np.float32).tobytes())
        return h.hexdigest()

    @property
    def entry(self) -> str:
        return f"sparsert_{self.params.name()}_{self.digest()[:12]}"


def fit_params(geometry: Geometry, params: StreamParams, dtype: str = "fp32") -> StreamParams:
    """Clamp parameters to the shape: a legal vector width, no more threads than columns, no
    more rows per worker than rows."""
    params = params.validate()
    if params.stage == "tile":      # a pixel or a pair a thread, all in one block, one slice
        width = tile_kind(params.vector_width)
        reason = tile_refusal(geometry, dtype, width=width)
        if reason:
            raise UserError(f"streamed plan {params.name()}: stage tile cannot run this layer: "
                            f"{reason}")
        threads = tile_layout(geometry, width).threads
        if threads * params.warps > MAX_THREADS:
            raise UserError(f"streamed plan {params.name()}: {params.warps} workers of "
                            f"{threads} threads exceed a block's {MAX_THREADS}")
        if geometry.batch > MAX_GRID_Y:
            raise UserError(f"streamed plan {params.name()}: {geometry.batch} images exceed "
                            f"the grid's {MAX_GRID_Y} (stage tile runs one a block row)")
        # one block an SM at most anyway (the image): no register cap for more blocks
        return replace(params, vector_width=width, col_threads=threads, k_slices=1,
                       min_blocks=1, chains=4 if width == ROW_VECTORS else params.chains,
                       rows_per_worker=min(params.rows_per_worker, geometry.out_channels))
    width, threads = fit_columns(geometry, params.vector_width, params.col_threads, dtype)
    rows = min(params.rows_per_worker, geometry.out_channels)
    slices = min(params.k_slices, geometry.in_channels)
    return replace(params, vector_width=width, col_threads=threads, rows_per_worker=rows,
                   k_slices=slices)


def check_limits(geometry: Geometry, params: StreamParams, entries: int = 0) -> None:
    """Refuse a plan whose grid or int32 tables would not hold it (fitted `params`)."""
    tiles = -(-geometry.columns // (params.col_threads * params.vector_width))
    if tiles > MAX_GRID_Y:
        raise UserError(f"streamed plan {params.name()}: {tiles} column tiles exceed the grid's "
                        f"{MAX_GRID_Y} (more col_threads or a wider vector_width, or the "
                        f"immediate family)")
    words = geometry.out_channels * (
        params.k_slices * ((geometry.kernel ** 2 if geometry.masked else 1) + 1) + 1)
    workspace = workspace_bytes(geometry, params)
    if workspace > MAX_WORKSPACE_BYTES:
        raise UserError(f"streamed plan {params.name()}: its k-split workspace "
                        f"({workspace >> 20} MiB) exceeds {MAX_WORKSPACE_BYTES >> 20} MiB "
                        f"(fewer k_slices)")
    if max(words, entries + 64) > INT_MAX:
        raise UserError(f"streamed plan {params.name()}: its tables ({words} row words, {entries} "
                        f"entries) exceed the kernel's int32 indices")


def workspace_bytes(geometry: Geometry, params: StreamParams) -> int:
    """Bytes of partial sums a k-split kernel keeps (4 per output and slice; 0 unsplit)."""
    return 4 * params.k_slices * geometry.output_elems if params.k_slices > 1 else 0


def slice_bounds(geometry: Geometry, slices: int) -> np.ndarray:
    """First input channel of each K-slice (and the end): channels as evenly as they divide."""
    return np.array([z * geometry.in_channels // slices for z in range(slices + 1)],
                    dtype=np.int64)


def _workers(row_nnz: np.ndarray, count: int) -> list[list[int]]:
    """Rows dealt to `count` workers, heaviest first to the lightest worker (work = nonzeros + a
    row's fixed cost); each worker's rows in ascending order."""
    heap = [(0, w) for w in range(count)]
    out: list[list[int]] = [[] for _ in range(count)]
    for row in sorted(range(len(row_nnz)), key=lambda r: (-row_nnz[r], r)):
        load, w = heapq.heappop(heap)
        out[w].append(row)
        heapq.heappush(heap, (load + int(row_nnz[row]) + 8, w))
    return [sorted(rows) for rows in out]


def worker_rows(row_nnz: np.ndarray, params: StreamParams) -> list[list[int]]:
    """Rows dealt (_workers) to ceil(rows / rows_per_worker) workers, in whole blocks."""
    count = -(-len(row_nnz) // params.rows_per_worker)
    return _workers(row_nnz, -(-count // params.warps) * params.warps)


def _run_order(dealt: list[list[int]], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(row entries' output rows worker after worker, each worker's first row entry and the
    end)."""
    order = np.fromiter((r for members in dealt for r in members), dtype=np.int64, count=rows)
    work = np.concatenate([[0], np.cumsum([len(members) for members in dealt])])
    return order, work.astype(np.int64)


def tap_offsets(geometry: Geometry, taps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(segment, element offset from the thread's input base) of each weight column `taps`.
    Padded kernels: one segment per kernel tap r*k+s; else one segment."""
    g, k = geometry, geometry.kernel
    channel, rs = taps // (k * k), taps % (k * k)
    offset = channel * g.height * g.width + (rs // k) * g.width + rs % k
    return (rs if g.masked else np.zeros_like(taps)), offset


def build_plan(csr: sp.csr_matrix, geometry: Geometry, params: StreamParams,
               epilogue: Epilogue = Epilogue(), dtype: str = "fp32",
               accumulate: str | None = None) -> StreamPlan:
    geometry, accumulate = check_layer(csr, geometry, epilogue, dtype, accumulate)
    if params.stage == "tile":
        reason = tile_refusal(geometry, dtype, accumulate, tile_kind(params.vector_width))
        if reason:
            raise UserError(f"streamed plan {params.name()}: stage tile cannot run this layer: "
                            f"{reason}")
        if epilogue.token_major:
            raise UserError("stage tile writes channel-major convolution outputs only")
    params = fit_params(geometry, params, dtype)
    check_limits(geometry, params)
    csr = sp.csr_matrix(csr, dtype=np.float32)
    csr.sum_duplicates()
    csr.eliminate_zeros()
    csr.sort_indices()
    m = geometry.out_channels
    if params.stage == "tile":
        return _tile_plan(csr, geometry, params, epilogue, dtype, accumulate)
    segments = geometry.kernel ** 2 if geometry.masked else 1
    tile_rows = staged_rows(geometry, params, epilogue, dtype)
    if tile_rows:       # each block its own run of rows, dealt over its workers
        row_nnz = np.diff(csr.indptr)
        dealt = []
        for first in range(0, m, tile_rows):
            block = _workers(row_nnz[first:first + tile_rows], params.warps)
            dealt += [[first + r for r in rows] for rows in block]
    else:
        dealt = worker_rows(np.diff(csr.indptr), params)
    order, work = _run_order(dealt, m)
    slices = params.k_slices
    channel_of = slice_bounds(geometry, slices)
    offsets, values = [], []
    seg = np.zeros((m, slices * (segments + 1)), dtype=np.int64)
    start = 0
    for i, row in enumerate(order.tolist()):
        lo, hi = csr.indptr[row], csr.indptr[row + 1]
        taps = csr.indices[lo:hi].astype(np.int64)
        segment, offset = tap_offsets(geometry, taps)
        part = np.searchsorted(channel_of, taps // geometry.kernel ** 2, side="right") - 1
        sort = np.lexsort((offset, segment, part))
        segment, offset, value = segment[sort], offset[sort], csr.data[lo:hi][sort]
        key = part[sort] * segments + segment
        bounds = np.searchsorted(key, np.arange(slices * segments + 1))
        for z in range(slices):
            for t in range(segments):      # each segment padded to a whole group (see PAD)
                a, b = bounds[z * segments + t], bounds[z * segments + t + 1]
                pad = -(b - a) % PAD
                seg[i, z * (segments + 1) + t] = start
                offsets += [offset[a:b], np.full(pad, offset[b - 1] if b > a else 0, np.int64)]
                values += [value[a:b], np.zeros(pad, np.float32)]
                start += b - a + pad
            seg[i, z * (segments + 1) + segments] = start
    check_limits(geometry, params, start)
    return StreamPlan(geometry, params, work, order, seg,
                      np.concatenate(offsets) if offsets else np.zeros(0, np.int64),
                      np.concatenate(values).astype(np.float32) if values
                      else np.zeros(0, np.float32), epilogue, dtype, accumulate, tile_rows)


def _tile_plan(csr: sp.csr_matrix, geometry: Geometry, params: StreamParams,
               epilogue: Epilogue, dtype: str, accumulate: str) -> StreamPlan:
    """Stage "tile": each row's nonzeros one run of entries ordered by tile offset (channel,
    then tap), padded to whole groups of PAD with zero weights at offset TILE_LEAD - 1 (from a
    thread's base: a zero of the lead for the first image row, an image element for the others;
    0 * x is exact for finite inputs, as with the other stages' padding; row vectors: the lane's
    own vector of channel 0's tile)."""
    m, k2 = geometry.out_channels, geometry.kernel ** 2
    layout = tile_layout(geometry, params.vector_width)
    order, work = _run_order(worker_rows(np.diff(csr.indptr), params), m)
    seg = np.zeros((m, 2), dtype=np.int64)
    offsets, values = [], []
    start = 0
    for i, row in enumerate(order.tolist()):
        lo, hi = csr.indptr[row], csr.indptr[row + 1]
        taps = csr.indices[lo:hi].astype(np.int64)
        offset = layout.offset(taps // k2, taps % k2 // 3, taps % 3)
        sort = np.argsort(offset, kind="stable")
        pad = -(hi - lo) % PAD
        offsets += [offset[sort], np.full(pad, layout.offset(0, 0, 0) if layout.vectors
                                          else TILE_LEAD - 1, np.int64)]
        values += [csr.data[lo:hi][sort], np.zeros(pad, np.float32)]
        seg[i] = (start, start + hi - lo + pad)
        start += hi - lo + pad
    check_limits(geometry, params, start)
    return StreamPlan(geometry, params, work, order, seg,
                      np.concatenate(offsets) if offsets else np.zeros(0, np.int64),
                      np.concatenate(values).astype(np.float32) if values
                      else np.zeros(0, np.float32), epilogue, dtype, accumulate, 0)


def tile_default(geometry: Geometry, sm_count: int = 132, width: int | None = None
                 ) -> StreamParams:
    """The tile stage's plan for this shape (the default where tile_default_applies, else the
    first tile candidate): one row a worker, as many workers a block as put every row in one
    block an SM (each block copies the whole image once, so fewer blocks copy less; H100,
    session 23: rn50_c4_3x3 two workers a block)."""
    width = tile_width(geometry) if width is None else width
    layout = tile_layout(geometry, width)
    most = max(1, MAX_THREADS // layout.threads)
    warps = min(most, max(1, -(-geometry.out_channels // sm_count)))
    if width == ROW_VECTORS:    # half as many blocks: each copies and builds the whole image
        warps = min(most, 2 * warps)    # (rn50_c5_3x3: 8.7 us at 8 warps, 9.6 at 4; S25-5)
    rows = max(1, -(-geometry.out_channels // (sm_count * warps)))
    return StreamParams(layout.threads, width, warps, rows, 4, "tile")


def staged_rows(geometry: Geometry, params: StreamParams, epilogue: Epilogue,
                dtype: str) -> int:
    """Rows per block whose token-major output a block stages in shared memory (0: scalar
    stores): unsplit kernels (a K-split block's epilogue runs for whichever block ends last)
    whose tile (rows x (tile columns + 1) elements) fits MAX_STAGED_BYTES."""
    if not epilogue.token_major or params.k_slices > 1:
        return 0
    rows = min(params.warps * params.rows_per_worker, geometry.out_channels)
    tile = rows * (params.col_threads * params.vector_width + 1) * ELEMENT_BYTES[dtype]
    return rows if tile <= MAX_STAGED_BYTES else 0


def default_params(geometry: Geometry, nnz: int, sm_count: int = 132,
                   precision: str = "fp32") -> StreamParams:
    """An untuned plan: vectors as wide as keep a warp's 32 lanes busy (each entry's load and
    address then feed more columns: that, not L1 capacity, decided the H100 probes, see
    docs/perf-notes.md), one warp row per worker, enough workers for ~8 warps per SM (16 at one
    column per thread), entries shared through shared memory (stage "smem": fewer instructions
    per entry)."""
    dtype = PRECISIONS[precision][0]
    if row_vectors_default_applies(geometry, precision):
        return fit_params(geometry, tile_default(geometry, sm_count, ROW_VECTORS), dtype)
    if tile_default_applies(geometry, precision):
        return fit_params(geometry, tile_default(geometry, sm_count), dtype)
    return untiled_default(geometry, nnz, sm_count, precision)


def untiled_default(geometry: Geometry, nnz: int, sm_count: int = 132,
                    precision: str = "fp32") -> StreamParams:
    """default_params without the tile stage."""
    dtype = PRECISIONS[precision][0]
    width = fit_vector_width(geometry, 16 // ELEMENT_BYTES[dtype], dtype)
    while width > 1 and -(-geometry.columns // width) < 32:
        width //= 2
    width = fit_vector_width(geometry, width, dtype)
    per_thread = -(-geometry.columns // width)
    threads = 32 if per_thread <= 32 else 64 if per_thread <= 64 else 128
    tiles = -(-per_thread // threads)
    # warps per SM to aim for: one column per thread needs few registers, and more workers (fewer
    # rows each) won on every such layer of the H100 tuning run (docs/perf-notes.md, S6)
    per_sm = 16 if width == 1 else 8
    wanted = (per_sm * sm_count * 32) // (threads * tiles)
    workers = max(1, min(geometry.out_channels, wanted))
    rows = min(MAX_ROWS_PER_WORKER, -(-geometry.out_channels // workers))
    slices = default_slices(geometry, nnz, wanted)
    warps = balanced_warps(-(-geometry.out_channels // rows), tiles * slices,
                           most_warps(threads), sm_count)
    return fit_params(geometry, StreamParams(threads, width, warps, rows, 4, "smem", slices),
                      dtype)


def most_warps(col_threads: int) -> int:
    """The tallest default block: 8 workers, at most 256 threads."""
    return max(1, min(8, 256 // col_threads))


def balanced_warps(workers: int, tiles: int, most: int, sm_count: int = 132) -> int:
    """Workers per block: `most`, unless a block of at least half as many leaves the busiest SM
    >= 15% fewer workers (blocks dealt evenly over the SMs; `tiles` blocks per worker block).
    768 one-row workers in blocks of 8 fill only 96 of 132 SMs; blocks of 6 fill 128 (H100,
    S11-2: bert_ffn_down fp32 14.2 -> 12.7 us, bert_attn_out 4.9 -> 4.7)."""
    def busiest(w: int) -> int:
        return -(-tiles * -(-workers // w) // sm_count) * min(w, workers)

    best = min(range(-(-most // 2), most + 1), key=lambda w: (busiest(w), -w))
    return best if busiest(best) <= 0.85 * busiest(most) else most


def default_slices(geometry: Geometry, nnz: int, wanted_workers: int) -> int:
    """K-slices for a layer with fewer rows than the workers wanted (a power of two up to
    MAX_DEFAULT_SLICES) while each slice keeps MIN_SLICE_NONZEROS of a row (H100, run S5-2:
    rn50_c5_3x3, 461 per row, 13.3 -> 12.6 us at 2 slices, slower at 4 and 8; rn50_c4_reduce,
    102 per row, 4.7 -> 5.7 us at 2)."""
    per_row = nnz / max(1, geometry.out_channels)
    slices = 1
    while (slices < MAX_DEFAULT_SLICES and geometry.out_channels * slices * 2 <= wanted_workers
           and per_row / (slices * 2) >= MIN_SLICE_NONZEROS):
        slices *= 2
    return slices


def candidates(geometry: Geometry, nnz: int, precision: str = "fp32", limit: int = 12,
               seeds=None) -> list[StreamParams]:
    """`seeds` (winners at other precisions) and the default first, then the tile stage's
    neighbours (where it runs) and the other stages' default and neighbours: rows per worker,
    the ring stage, block heights, chains, vector widths, column threads and the shfl stage last
    (fitted to the shape, duplicates and plans past the grid's limits dropped)."""
    dtype = PRECISIONS[precision][0]
    tiled = []
    if (TILE and precision == "fp16"
            and tile_refusal(geometry, dtype, width=tile_width(geometry)) is None):
        t = tile_default(geometry)
        tiled = [t, replace(t, vector_width=3 - t.vector_width), replace(t, chains=8),
                 replace(t, warps=max(1, t.warps // 2)), replace(t, warps=t.warps * 2),
                 replace(t, rows_per_worker=t.rows_per_worker * 2)]
    vectors = []        # row vectors (images of at most 8 rows of 7 pixels), second in line
    if TILE and precision == "fp16" and tile_refusal(geometry, dtype,
                                                     width=ROW_VECTORS) is None:
        rv = tile_default(geometry, width=ROW_VECTORS)
        vectors = [rv, replace(rv, warps=max(1, rv.warps // 2)), replace(rv, warps=rv.warps * 2)]
    base = untiled_default(geometry, nnz, precision=precision)
    r, v = base.rows_per_worker, base.vector_width
    # most promising first (a tuner that caps candidates per case keeps the head): in runs S6-S8
    # halving rows per worker, the ring stage, 4-warp blocks and 2 chains won cases; smem beat
    # shfl on all 40, so shfl comes last
    # the tile stage (fp16 3x3 layers whose image fits a block) leads where it is the default
    head = (tiled[:1] + [base] + tiled[1:] if tile_default_applies(geometry, precision)
            else [base] + tiled)
    if row_vectors_default_applies(geometry, precision):
        head = vectors[:1] + head + vectors[1:]
    else:
        head = head[:1] + vectors + head[1:]
    tries = list(seeds or []) + head + [
        replace(base, rows_per_worker=max(1, r // 2)), replace(base, stage="ring"),
        replace(base, warps=max(1, base.warps // 2)), replace(base, chains=2),
        # the block height before balanced_warps spread the workers (a tied or narrow call)
        replace(base, warps=most_warps(base.col_threads)),
        replace(base, rows_per_worker=r * 2), replace(base, vector_width=v * 2),
        replace(base, vector_width=max(1, v // 2)), replace(base, warps=base.warps * 2),
        replace(base, rows_per_worker=max(1, r // 4)), replace(base, rows_per_worker=r * 4),
        replace(base, col_threads=min(256, base.col_threads * 2)), replace(base, chains=8),
        replace(base, stage="shfl")]
    # K-slices last: they won only on few very long rows in run S5-2 (docs/perf-notes.md)
    k = base.k_slices
    tries += [replace(base, k_slices=max(1, k // 2)), replace(base, k_slices=k * 2),
              replace(base, k_slices=k * 4)]
    out: list[StreamParams] = []
    for params in tries:
        if params.stage == "ring" and geometry.masked and geometry.kernel > 3:
            continue    # its row headers (2 + k*k words, twice) spill past 255 registers at 7x7
        if params.stage == "ring" and params.k_slices > 1:
            params = replace(params, k_slices=1)
        try:
            params = fit_params(geometry, params, dtype)
            check_limits(geometry, params)
        except UserError:
            continue
        if params not in out:
            out.append(params)
    return out[:limit]
