"""StreamIR -> CUDA C++ (the streamed family's printer), its compile route and its parse-back.

The kernel is one fixed loop; what varies is printed as data: the constants line the loop uses,
the thread->column statements, the tap bases, and the tables (worker ranges, row entries, packed
(offset, weight) nonzeros, bias). The source holds the tables as initialised arrays and compiles
as it stands, but NVRTC needs seconds to parse a large initialiser, so `to_cubin` compiles the
kernel with the tables declared empty and writes the tables into its PTX as initialised .global
data before ptxas (the cubin carries them; nothing is uploaded at launch).

Stage "tile" prints its own kernel (`_print_tile`): the block's copy of its zero-padded image into
shared memory, then the same worker loop over one run of entries a row, with shared loads; at
width 8 (row vectors) `_print_rowvec`: the image copied raw, built into 16-byte row vectors,
and four lane groups of a warp taking four entries at a time.

`check_printed` parses the constants, statements, bases and tables back into a StreamIR, requires
it to equal the IR, and requires the source to be exactly what printing that IR gives.
"""

from __future__ import annotations

import re

import numpy as np

from .. import __version__
from ..compile import Compiled, cpp_to_ptx, ptx_to_cubin
from ..ir import IndexOp, StreamIR, TapBase
from ..families.streamed.plan import PAD, ROW_VECTORS, TILE_LEAD, tile_layout
from ..problem_shape import Geometry
from .cuda import GRID_DEPENDENCY, RULES, _helpers, f32
from .ptx import f16_bits

VERSION = "stream-6"
PRECISIONS = ("fp32", "fp16", "fp16acc32", "bf16")
_FLOAT_VEC = {1: "float", 2: "float2", 4: "float4"}
_PAIR_VEC = {1: "unsigned", 2: "uint2", 4: "uint4"}
_LANE = ("x", "y", "z", "w")
TABLES = ("sparsert_work", "sparsert_rows", "sparsert_ent", "sparsert_bias", "sparsert_span")
# exact GELU, as torch's F.gelu (approximate="none") computes it: 0.5 v (1 + erf(v / sqrt 2)),
# in fp32 (erff: 2 ulp); fp16 sums are widened to fp32 for it and rounded back
GELU = ("__device__ __forceinline__ float sparsert_gelu(float v) "
        "{ return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); }")


class _Types:
    def __init__(self, ir: StreamIR):
        w = self.width = ir.vector_width
        self.half_storage, self.half_acc = ir.dtype in ("fp16", "bf16"), ir.accumulate == "fp16"
        self.half_type = {"fp16": "f16", "bf16": "bf16"}.get(ir.dtype)
        self.elem = "unsigned short" if self.half_storage else "float"
        if self.half_storage:
            self.raws = 1 if w == 1 else w // 2
            self.vt = "unsigned short" if w == 1 else _PAIR_VEC[w // 2]
        else:
            self.raws, self.vt = w, _FLOAT_VEC[w]
        # accumulator units of one column vector: half2 pairs, one half, or floats
        self.units = self.raws if self.half_acc else w
        self.acc_t = ("unsigned" if w > 1 else "unsigned short") if self.half_acc else "float"

    def raw(self, var: str, k: int) -> str:
        return var if self.raws == 1 else f"{var}.{_LANE[k]}"

    def column(self, var: str, lane: int) -> str:
        """One column of a loaded vector as float."""
        if not self.half_storage:
            return self.raw(var, lane)
        if self.half_type == "bf16":    # a bf16 is the top half of an fp32: one bit operation
            if self.width == 1:
                return f"__uint_as_float((unsigned){var} << 16)"
            reg = self.raw(var, lane // 2)
            return (f"__uint_as_float({reg} & 0xFFFF0000u)" if lane % 2
                    else f"__uint_as_float({reg} << 16)")
        if self.width == 1:
            return f"sparsert_h2f({var})"
        reg = self.raw(var, lane // 2)
        return (f"sparsert_h2f((unsigned short)({reg} >> 16))" if lane % 2
                else f"sparsert_h2f((unsigned short){reg})")

    def fma(self, acc: str, var: str, weight: str) -> list[str]:
        """acc[k] (+)= column/pair k of `var` times `weight` (a 32-bit int of the table)."""
        if self.half_acc:
            h, w = ("2", f"(unsigned){weight}") if self.width > 1 else (
                "", f"(unsigned short){weight}")
            return [f"{acc}[{k}] = sparsert_hfma{h}({self.raw(var, k)}, {w}, {acc}[{k}]);"
                    for k in range(self.units)]
        return [f"{acc}[{k}] = fmaf({self.column(var, k)}, __int_as_float({weight}), {acc}[{k}]);"
                for k in range(self.units)]

    def add(self, a: str, b: str) -> str:
        if self.half_acc:
            return f"sparsert_hadd{'2' if self.width > 1 else ''}({a}, {b})"
        return f"{a} + {b}"

    def const(self, value: float) -> str:
        if not self.half_acc:
            return f32(value)
        bits = f16_bits(value)
        return f"0x{bits:04X}{bits:04X}u" if self.width > 1 else f"(unsigned short)0x{bits:04X}"


def _words(values, half_acc: bool, pair: bool) -> np.ndarray:
    """Values as signed 32-bit table words the loop reads: float bits, or fp16 bits (twice for
    half2 column pairs)."""
    values = np.asarray(values, dtype=np.float64)
    if half_acc:
        bits = values.astype(np.float16).view(np.uint16).astype(np.uint32)
        words = (bits << 16 | bits) if pair else bits
    else:
        words = values.astype(np.float32).view(np.uint32)
    return words.astype(np.uint32).view(np.int32).astype(np.int64)


def _from_words(words: np.ndarray, half_acc: bool) -> np.ndarray:
    words = np.asarray(words, dtype=np.int64).astype(np.uint32)
    if half_acc:
        return (words & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float64)
    return words.view(np.float32).astype(np.float64)


def _table(ctype: str, name: str, words: np.ndarray, align: int) -> str:
    body = ",".join(map(str, np.asarray(words, dtype=np.int64).tolist())) or "0"
    return f"__device__ __align__({align}) {ctype} {name}[{max(1, len(words))}] = {{{body}}};"


def tables(ir: StreamIR) -> dict[str, np.ndarray]:
    """The kernel's tables as 32-bit words, in printing order."""
    t = _Types(ir)
    rows = np.concatenate([ir.row_out[:, None], ir.seg], axis=1).ravel()
    ent = np.empty(2 * len(ir.offsets), dtype=np.int64)
    ent[0::2] = ir.offsets
    ent[1::2] = _words(ir.values, t.half_acc, ir.vector_width > 1)
    out = {"sparsert_work": ir.work, "sparsert_rows": rows, "sparsert_ent": ent}
    if ir.bias is not None:
        out["sparsert_bias"] = _words(ir.bias, t.half_acc, ir.vector_width > 1)
    if prefetches(ir) or ir.staged:
        out["sparsert_span"] = spans(ir)
    return out


def spans(ir: StreamIR) -> np.ndarray:
    """Per worker block b (and one past the last): the first entry of its rows and the first
    word of its row headers, interleaved: span[2b], span[2b + 1]. A block's rows are one run of
    row entries (workers are consecutive, each worker's rows consecutive) and their nonzeros one
    run of entries, so [span[2b], span[2b + 2]) and [span[2b + 1], span[2b + 3]) are all the
    row headers and entries its rows own (the ring stage's look-ahead also reads up to a chunk
    of 32 entries past them, and a worker without rows reads the first chunk)."""
    stride = ir.seg.shape[1] + 1
    first = np.asarray(ir.work, dtype=np.int64)[::ir.warps]
    if len(first) != ir.grid[0] + 1:       # work has workers + 1 words, workers = grid_x * warps
        raise ValueError("work table does not match the grid")
    rows = len(ir.row_out)
    entry = np.array([ir.seg[r, 0] if r < rows else len(ir.offsets) for r in first.tolist()],
                     dtype=np.int64)
    out = np.empty(2 * len(first), dtype=np.int64)
    out[0::2], out[1::2] = entry, first * stride
    return out


LINE = 128              # bytes of an L2 line: one prefetch each (the two tables are aligned to it)
# Dependent-launch kernels prefetch their block's pattern data before the wait. An experiment's
# switch for same-run comparisons (scripts/model_profile.py --no-prefetch), part of the cache
# key: read when a kernel is printed, so set it before any kernel is built in the process
# (build_all's workers are forked and inherit it)
PREFETCH = True


def _prefetch(ir: StreamIR) -> list[str]:
    """Before the wait for the previous grid: this worker block's row headers and entries
    (constant data, not written by any kernel) go to L2 while the previous kernel still runs,
    so the loop's chunk loads do not each wait on DRAM (docs/perf-notes.md, session 21)."""
    threads = ir.col_threads * ir.warps
    # the lines [a, b) touches; an empty range none (its first line may lie below a)
    loop = ("#pragma unroll 1\n"
            f"    for (int o = ({{a}} & -{LINE}) + t * {LINE}; {{a}} < {{b}} && o < {{b}}; "
            f"o += {threads * LINE})\n"
            '      asm volatile("prefetch.global.L2 [%0];" :: "l"({p} + max(o, {a})));')
    return [
        "  {   // this block's pattern data into L2 (it does not depend on the previous grid)",
        "    const int* S = sparsert_span + 2 * blockIdx.x;",
        "    const int e0 = 8 * __ldg(S), e1 = 8 * __ldg(S + 2), "
        "h0 = 4 * __ldg(S + 1), h1 = 4 * __ldg(S + 3);",
        "    const char* E = reinterpret_cast<const char*>(sparsert_ent);",
        "    const char* H = reinterpret_cast<const char*>(sparsert_rows);",
        "    const int t = threadIdx.y * blockDim.x + threadIdx.x;",
        *loop.format(a="e0", b="e1", p="E").split("\n"),
        *loop.format(a="h0", b="h1", p="H").split("\n"),
        "  }"]


def prefetches(ir: StreamIR) -> bool:
    """Whether the kernel prefetches its pattern data (dependent launch; the prefetch loop's
    byte offsets, up to a block's threads' lines past a table's end, within int range; a tile
    kernel that stages its entries copies them instead: an smem kernel still prefetches its row
    headers, and its entries' lines just before it copies them)."""
    room = 2**31 - ir.col_threads * ir.warps * LINE
    return (PREFETCH and ir.dependent_launch and not (ir.stage == "tile" and ir.staged)
            and 8 * len(ir.offsets) < room and 4 * ir.seg.size + 4 * len(ir.row_out) < room)


def _constants(ir: StreamIR) -> str:
    g = ir.geometry
    return (f"  // geometry batch={g.batch} in={g.in_channels} h={g.height} w={g.width} "
            f"out={g.out_channels} k={g.kernel} s={g.stride} p={g.padding}; dtype={ir.dtype} "
            f"acc={ir.accumulate}; width={ir.vector_width}; grid={ir.grid[0]}x{ir.grid[1]}; "
            f"activation={ir.activation}; stage={ir.stage}"
            + (f"; slices={ir.k_slices}" if ir.k_slices > 1 else "")
            + ("; layout=tokens" if ir.token_major else "")
            + (f"; tile_rows={ir.tile_rows}" if ir.tile_rows else "")
            + (f"; planes={ir.planes}" if ir.planes else "") + "\n"
            f"  constexpr int WARPS = {ir.warps}, CHAINS = {ir.chains}, "
            f"STRIDE = {ir.seg.shape[1] + 1}, PIXELS = {g.out_pixels};")


def _index(op: IndexOp) -> str:
    a, b, c = (v if isinstance(v, str) else f"{v}" for v in (op.a, op.b, op.c))
    return "  " + RULES[op.op].format(dst=op.dst, a=a, b=b, c=c)


def _head(ir: StreamIR, t: _Types) -> list[str]:
    """The source's first lines: comment, helpers and the tables."""
    out = [f"// Generated by sparsert {__version__} ({VERSION}): {ir.comment}", ""]
    if t.half_storage:
        out += _helpers(t.half_type)
    if ir.activation == "gelu":
        out += [GELU, ""]
    for name, words in tables(ir).items():    # int words; the nonzeros are read as int2
        lines = prefetches(ir) and name in ("sparsert_ent", "sparsert_rows")
        out.append(_table("int", name, words,
                          LINE if lines else 16 if name == "sparsert_ent" and ir.staged
                          else 8 if name == "sparsert_ent" else 4))
    return out


def print_stream(ir: StreamIR, arch: str = "sm_90") -> str:
    del arch
    t = _Types(ir)
    if ir.stage == "tile":
        return _print_tile(ir, t)
    out = _head(ir, t)
    if ir.k_slices > 1:     # zero-initialised module memory: partial sums, per-tile counters
        out += [f"__device__ __align__(16) {_part_type(t)} sparsert_part"
                f"[{ir.k_slices * _slice_units(ir, t)}];",
                f"__device__ unsigned sparsert_count[{ir.grid[0] * ir.grid[1]}];"]
    e = t.elem
    types = {"x": f"const {e}* __restrict__", "y": f"{e}* __restrict__",
             "res": f"const {e}* __restrict__", "z": f"const {e}* __restrict__"}
    signed = {op.dst for op in ir.columns if op.signed}
    unsigned = [op.dst for op in ir.columns if op.dst not in signed]
    bounds = f"{ir.col_threads * ir.warps}" + (f", {ir.min_blocks}" if ir.min_blocks > 1 else "")
    out += ["", f'extern "C" __global__ void __launch_bounds__({bounds})',
            f"{ir.entry}({', '.join(f'{types[a]} {a}' for a in ir.arguments)})", "{",
            *(GRID_DEPENDENCY[1:] if ir.dependent_launch else ()),
            *(_prefetch(ir) if prefetches(ir) else ()),
            _constants(ir),
            "  const unsigned tx = threadIdx.x, bx = blockIdx.y;   // bx: the column tile",
            f"  unsigned {', '.join(dict.fromkeys(unsigned))};",
            f"  int {', '.join(dict.fromkeys(op.dst for op in ir.columns if op.signed))};"]
    out += [_index(op) for op in ir.columns]
    if ir.k_slices > 1:      # this thread's partials (accumulator units) in each slice
        outvar = dict(ir.pointers)["y"]
        step = t.width // t.units
        out.append(f"  {_part_type(t)}* const P = sparsert_part + "
                   + (f"{outvar} / {step};" if step > 1 else f"{outvar};"))
    if ir.tile_rows:        # this block's rows [c0, c0 + tile_rows), staged, and y's base
        out += [f"  __shared__ {t.elem} sparsert_tile[{ir.tile_rows * _tile_stride(ir)}];",
                f"  const int c0 = blockIdx.x * {ir.tile_rows};",
                f"  {t.elem}* const y0 = y;"]
    out += [f"  {ptr} += {var}" + (f" * {_plane_rows(ir)};" if ir.token_major and ptr != "x"
                                    else ";")
            for ptr, var in ir.pointers]
    g = ir.geometry
    segments = ir.seg.shape[1] // ir.k_slices - 1
    if ir.bases:
        out += [f"  const {e}* b{i} = ((unsigned)(ih + {b.r}) < {g.height}u && (unsigned)(iw + "
                f"{b.s}) < {g.width}u) ? x : z + ({b.zero_shift});"
                for i, b in enumerate(ir.bases)]
    else:
        out += [f"  const {e}* b{i} = x;" for i in range(segments)]
    acc = f"{t.acc_t} a[CHAINS][{t.units}]"
    if not ir.staged:
        out += ["  const int2* ent = reinterpret_cast<const int2*>(sparsert_ent);",
                "  const int lane = threadIdx.x & 31;"]
    mine = f"sparsert_stage[threadIdx.y * {ir.col_threads // 32} + (threadIdx.x >> 5)]"
    n_staged = ir.staged
    if n_staged:             # the block's entries, copied before the wait (constant data)
        out += [f"  __shared__ __align__(16) int2 sparsert_block_ent[{n_staged}];",
                *_copy_entries(ir.col_threads * ir.warps),
                '  asm volatile("cp.async.wait_all;" ::: "memory");',
                "  __syncthreads();"]
    elif ir.stage == "smem":   # per warp two buffers, used in turn: one __syncwarp per chunk
        out += [f"  __shared__ __align__(16) int2 sparsert_stage[{ir.stage_warps}][2][32];",
                f"  int2 (*const buf)[32] = {mine};",
                "  int p = 0;"]
    elif ir.stage == "ring":  # per warp a ring of 64 entries, refilled 32 at a time
        out += [f"  constexpr int ENTRIES = {len(ir.offsets)};",
                f"  __shared__ __align__(16) int2 sparsert_stage[{ir.stage_warps}][64];",
                f"  int2* const ring = {mine};"]
    if ir.stage != "shfl":
        # each tap base an opaque 64-bit register: the address is then one wide multiply-add of
        # the entry's offset (NVCC otherwise re-adds the thread's column offset per entry)
        out += [f'  asm("" : "+l"(b{i}));' for i in range(segments)]
    zero = [f"    {acc};", "#pragma unroll", "    for (int c = 0; c < CHAINS; ++c)",
            "#pragma unroll", f"      for (int k = 0; k < {t.units}; ++k) a[c][k] = 0;"]
    out += ["  const int w = blockIdx.x * WARPS + threadIdx.y;",
            "  const int r_end = __ldg(sparsert_work + w + 1);"]
    if ir.stage == "ring":
        # the worker's entries are one contiguous run (rows, then segments, each padded to
        # whole groups): one stream, the next chunk always in flight, row headers one ahead
        out += ["  int r = __ldg(sparsert_work + w);",
                "  int h[STRIDE], hn[STRIDE];",
                "#pragma unroll",
                "  for (int i = 0; i < STRIDE; ++i)"
                " h[i] = r < r_end ? __ldg(sparsert_rows + r * STRIDE + i) : 0;",
                "  const int pos0 = h[1];",
                "  int fill = pos0;",
                "  int2 next = lane < ENTRIES - pos0 ? __ldg(ent + pos0 + lane) : make_int2(0, 0);",
                *(GRID_DEPENDENCY[:1] if ir.dependent_launch else ()),
                "  for (; r < r_end; ++r) {",
                "#pragma unroll",
                "    for (int i = 0; i < STRIDE; ++i)",
                "      hn[i] = r + 1 < r_end ? __ldg(sparsert_rows + (r + 1) * STRIDE + i) : 0;",
                "    const int row = h[0];"] + zero
    else:
        out += ["  for (int r = __ldg(sparsert_work + w); r < r_end; ++r) {",
                "    const int* R = sparsert_rows + r * STRIDE;",
                "    const int row = __ldg(R);"]
        if ir.k_slices > 1:
            out.append(f"    R += blockIdx.z * {segments + 1};   // this block's K-slice")
        out += zero
    load = f"__ldg(reinterpret_cast<const {t.vt}*>(b{{i}} + off))"
    for i in range(segments):
        out += _segment(ir, t, i, load.format(i=i))
    out += ["#pragma unroll", "    for (int c = 1; c < CHAINS; ++c)", "#pragma unroll",
            f"      for (int k = 0; k < {t.units}; ++k) a[0][k] = {t.add('a[0][k]', 'a[c][k]')};",
            "    const int o = row * PIXELS;"]
    if ir.k_slices > 1:
        out += _k_split(ir, t)
    else:
        out += _epilogue(ir, t)
        if ir.stage == "ring":
            out += ["#pragma unroll", "    for (int i = 0; i < STRIDE; ++i) h[i] = hn[i];"]
        out += ["  }"] + (_write_tile(ir) if ir.tile_rows else []) + ["}"]
    return "\n".join(out) + "\n"


def _print_tile(ir: StreamIR, t: _Types) -> str:
    """Stage "tile" (families/streamed/plan.py TileLayout): the block copies its image,
    zero-padded, into shared memory, then each worker runs its rows' entries, each entry two
    16-bit shared loads (the thread's top and bottom pixel), a byte permute and one HFMA2 (at
    width 1: one load and one HFMA). Where they fit (`staged`), the block's entries are copied
    into shared memory too, asynchronously and before the wait for the previous grid (they are
    constant), and each worker's first row header is read then; else each warp loads its
    entries 32 at a time, the next chunk in flight while it runs one."""
    g = ir.geometry
    lay = tile_layout(g, ir.vector_width)
    if lay.vectors:
        return _print_rowvec(ir, t)
    pairs = lay.pairs
    n_staged = ir.staged
    acc, h2 = ("unsigned", "2") if pairs else ("unsigned short", "")
    width = g.width
    out = _tile_head(ir, t, f"  // the image in shared memory: tile row i of a channel is image "
                            f"row i - 1 ({lay.rows} rows of {lay.row} halves), {TILE_LEAD} zero "
                            "halves first")
    out += _tile_fill(ir)
    if n_staged:
        out.append('  asm volatile("cp.async.wait_all;" ::: "memory");')
    out += ["  __syncthreads();",
            "  const int p = threadIdx.x;           // "
            + ("the pixel pair (oh, ow), (oh + H2, ow)" if pairs else "the pixel (oh, ow)"),
            f"  const bool act = p < {lay.pixels};",
            f"  const int oh = act ? p / {width} : 0, ow = act ? p % {width} : 0;"]
    if pairs:
        out.append(f"  const bool second = act && oh + {lay.half} < {g.height};")
    out += ["  const unsigned tb = (unsigned)__cvta_generic_to_shared(sparsert_tile) + "
            f"2u * (oh * {lay.row} + ow);"]
    out += _tile_row_loop(
        n_staged, "  // entry e of this block at qb + 8 e", "",
        ["  const int lane = threadIdx.x & 31;",
         f"  int2* const buf = sparsert_stage[threadIdx.y * {ir.col_threads // 32} + "
         "(threadIdx.x >> 5)];",
         "  const unsigned qa = (unsigned)__cvta_generic_to_shared(buf);"],
        [f"    {acc} a[CHAINS];", "#pragma unroll",
         f"    for (int c = 0; c < CHAINS; ++c) a[c] = {'0u' if pairs else '0'};"],
        lambda count, first: _tile_group(ir, count, first), "j")
    out += ["#pragma unroll",
            f"    for (int c = 1; c < CHAINS; ++c) a[0] = sparsert_hadd{h2}(a[0], a[c]);",
            f"    {acc} v = a[0];",
            f"    const int o = row * PIXELS + oh * {width} + ow;"]
    out += _tile_epilogue(ir, t, lay)
    return "\n".join(out + ["  }", "}"]) + "\n"


def _tile_head(ir: StreamIR, t: _Types, layout: str) -> list[str]:
    """A tile kernel up to its image copy: helpers and tables, the signature, the prefetch,
    constants, the `layout` comment, the shared arrays (the image, and the block's entries or
    the warps' entry buffers), this block's image and output, the staged entries' copy and the
    wait for the previous grid (the image copy reads what it wrote)."""
    g = ir.geometry
    hw, threads = g.height * g.width, ir.col_threads * ir.warps
    out = _head(ir, t)
    out += ["", f'extern "C" __global__ void __launch_bounds__({threads})',
            f"{ir.entry}({', '.join(f'{_TILE_TYPES[a]} {a}' for a in ir.arguments)})", "{",
            *(GRID_DEPENDENCY[1:] if ir.dependent_launch else ()),
            *(_prefetch(ir) if prefetches(ir) else ()),
            _constants(ir),
            layout,
            "  extern __shared__ __align__(16) unsigned short sparsert_tile[];",
            (f"  __shared__ __align__(16) int2 sparsert_block_ent[{ir.staged}];   "
             "// this block's entries" if ir.staged else
             f"  __shared__ __align__(16) int2 sparsert_stage[{ir.stage_warps}][32];"),
            "  const int t = threadIdx.y * blockDim.x + threadIdx.x;",
            f"  x += blockIdx.y * {g.in_channels * hw};   // this block's image",
            f"  y += blockIdx.y * {g.out_channels * hw};"]
    if ir.residual:
        out.append(f"  res += blockIdx.y * {g.out_channels * hw};")
    if ir.staged:
        out += _tile_stage_entries(threads)
    if ir.dependent_launch:
        out.append(GRID_DEPENDENCY[0])
    return out


def _print_rowvec(ir: StreamIR, t: _Types) -> str:
    """Stage "tile" with row vectors (ROW_VECTORS; images of at most 8 rows of at most 7
    pixels): the block copies its image with cp.async as it lies in global memory, then builds
    the tile's 16-byte vectors [0, image row, zeros] from it. A worker is one warp whose lanes
    are four groups of eight: lane j of group q holds output row min(j, H - 1) (eight pixels,
    four half2 sums) and takes the row's entries q, q + 4, q + 8, ...; each entry is a broadcast
    8-byte shared load, its vector's 16-byte shared load and four PRMT (the tap's column shift:
    the entry word's low half is the selector) and HFMA2. Two shuffles add the groups' sums;
    group 0 stores."""
    g = ir.geometry
    lay = tile_layout(g, ROW_VECTORS)
    n_staged = ir.staged
    threads = 32 * ir.warps
    out = _tile_head(ir, t, f"  // the image as row vectors: tile row i of a channel is [0, "
                            f"image row i - 1, zeros] ({lay.rows} rows of 16 bytes), {TILE_LEAD} "
                            "zero halves first; after the tile, the image as it lies in global "
                            f"memory ({lay.raw} halves)")
    out += _rowvec_fill(ir, lay, threads)
    lane_row = f"(j < {g.height} ? j : {g.height - 1})"
    out += ["  const int lane = threadIdx.x, j = lane & 7;   // group lane >> 3, output row j",
            f"  const bool act = lane < {g.height};          // group 0 stores row j",
            "  const unsigned tb = (unsigned)__cvta_generic_to_shared(sparsert_tile) + "
            f"16u * {lane_row};"]
    out += _tile_row_loop(
        n_staged, "  // entry e of this block at qb + 8 e, the lane's group's first at + 8 (lane >> 3)",
        " + 8u * (unsigned)(lane >> 3)",
        ["  int2* const buf = sparsert_stage[threadIdx.y];",
         "  const unsigned qa = (unsigned)__cvta_generic_to_shared(buf) + "
         "8u * (unsigned)(lane >> 3);"],
        ["    unsigned a0 = 0u, a1 = 0u, a2 = 0u, a3 = 0u;"], _rowvec_group, "i")
    out += ["    // the four groups' sums: lane j of group 0 gets ((q0 + q1) + (q2 + q3))"]
    for m in (8, 16):
        out += [f"    a{k} = sparsert_hadd2(a{k}, __shfl_xor_sync(0xffffffffu, a{k}, {m}));"
                for k in range(4)]
    out += ["    if (!act) continue;",
            f"    const int o = row * PIXELS + j * {g.width};"]
    out += _rowvec_epilogue(ir, t)
    return "\n".join(out + ["  }", "}"]) + "\n"


def _tile_row_loop(n_staged: int, comment: str, group_shift: str, buffer: list[str],
                   zero: list[str], group, var: str) -> list[str]:
    """A tile kernel's worker loop up to the end of a row's entries: its rows (headers a row
    ahead where the block staged its entries, else each warp's entries loaded 32 at a time into
    its buffer, `buffer` the lines that declare it and `qa`), `zero` the row's accumulators,
    each 32-entry chunk as one `group(32, "0")` and a tail in groups of PAD (`group(PAD, var)`);
    `group_shift` is added to the staged entries' address (row vectors: the lane group's
    entry)."""
    if n_staged:
        out = [comment,
               "  const unsigned qb = (unsigned)__cvta_generic_to_shared(sparsert_block_ent) - "
               f"8u * (unsigned)e0{group_shift};",
               "  for (; r < r_end; ++r) {",
               "    const int row = nrow, lo = nlo, end = nend;",
               "    if (r + 1 < r_end) {   // the next row's header",
               "      const int* R = sparsert_rows + (r + 1) * STRIDE;",
               "      nrow = __ldg(R); nlo = __ldg(R + 1); nend = __ldg(R + 2);",
               "    }",
               *zero,
               "    for (int e = lo; e < end; e += 32) {",
               "      const int n = min(32, end - e);",
               "      const unsigned qa = qb + 8u * (unsigned)e;",
               "      if (n == 32) {"]
    else:
        out = [*buffer,
               "  const int2* ent = reinterpret_cast<const int2*>(sparsert_ent);",
               "  const int w = blockIdx.x * WARPS + threadIdx.y;",
               "  const int r_end = __ldg(sparsert_work + w + 1);",
               "  for (int r = __ldg(sparsert_work + w); r < r_end; ++r) {",
               "    const int* R = sparsert_rows + r * STRIDE;",
               "    const int row = __ldg(R), lo = __ldg(R + 1), end = __ldg(R + 2);",
               *zero,
               "    int2 mine = lane < end - lo ? __ldg(ent + lo + lane) : make_int2(0, 0);",
               "    for (int e = lo; e < end; e += 32) {",
               "      const int n = min(32, end - e);",
               "      const int2 next = lane < end - e - 32 ? __ldg(ent + e + 32 + lane) : "
               "make_int2(0, 0);",
               "      __syncwarp();",
               "      buf[lane] = mine;",
               "      __syncwarp();",
               "      if (n == 32) {"]
    out += ["        " + x for x in group(32, "0")]
    out += ["      } else {", f"        for (int {var} = 0; {var} < n; {var} += {PAD}) {{"]
    out += ["          " + x for x in group(PAD, var)]
    return out + ["        }", "      }", *(() if n_staged else ("      mine = next;",)), "    }"]


def _rowvec_fill(ir: StreamIR, lay, threads: int) -> list[str]:
    """The image into shared memory as it lies in global memory (16-byte cp.async pieces, after
    the tile), then every tile row's vector [0, x0, .., x(W-1), zeros] built from it (the lead and
    the padding rows all zeros)."""
    g = ir.geometry
    hw, width = g.height * g.width, g.width
    pieces = g.in_channels * hw // 8
    return [
        "  {   // the image, as it lies in global memory, after the tile",
        f"    const unsigned dst = (unsigned)__cvta_generic_to_shared(sparsert_tile + {lay.halves});",
        "    const char* src = reinterpret_cast<const char*>(x);",
        f"    for (int i = t; i < {pieces}; i += {threads})",
        '      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst + 16u * i), '
        '"l"(src + 16ll * i) : "memory");',
        '    asm volatile("cp.async.commit_group;" ::: "memory");',
        '    asm volatile("cp.async.wait_all;" ::: "memory");',
        "  }",
        "  __syncthreads();",
        "  {   // the tile's row vectors",
        "    uint4* const T = reinterpret_cast<uint4*>(sparsert_tile);",
        f"    const unsigned short* const X = sparsert_tile + {lay.halves};",
        "    if (t == 0) T[0] = make_uint4(0u, 0u, 0u, 0u);   // the lead",
        # row-major over channels: a warp's lanes read one image row of consecutive channels
        # (hw halves apart: few bank conflicts) and store tile rows `rows` vectors apart
        f"    for (int q = t; q < {g.in_channels * lay.rows}; q += {threads}) {{",
        f"      const int c = q % {g.in_channels}, i = q / {g.in_channels} - 1;",
        "      unsigned h[8] = {0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u};",
        f"      if (i >= 0 && i < {g.height}) {{",
        f"        const unsigned short* s = X + c * {hw} + i * {width};",
        *[f"        h[{k + 1}] = s[{k}];" for k in range(width)],
        "      }",
        f"      T[{TILE_LEAD // 8} + c * {lay.rows} + i + 1] = make_uint4(h[0] | h[1] << 16, "
        "h[2] | h[3] << 16, h[4] | h[5] << 16, h[6] | h[7] << 16);",
        "    }",
        "  }",
        "  __syncthreads();"]


def _rowvec_group(count: int, first: str) -> list[str]:
    """`count` entries (a multiple of 4) from the warp's entries at qa + 8 * `first`: the
    lane's group takes every fourth, in three phases so the loads are in flight together (its
    entries, their vectors, then per entry four PRMT by the tap's column and four HFMA2)."""
    steps = count // 4
    at = f"qa + 8u * {first}" if first != "0" else "qa"
    out = [f"unsigned ex[{steps}], ew[{steps}];"]
    out += [f'asm volatile("ld.volatile.shared.v2.u32 {{%0, %1}}, [%2];" : "=r"(ex[{k}]), '
            f'"=r"(ew[{k}]) : "r"({at} + {32 * k}));' for k in range(steps)]
    out += [f"uint4 v[{steps}];"]
    out += [f'asm volatile("ld.volatile.shared.v4.u32 {{%0, %1, %2, %3}}, [%4];" : '
            f'"=r"(v[{k}].x), "=r"(v[{k}].y), "=r"(v[{k}].z), "=r"(v[{k}].w) : '
            f'"r"(tb + ((ex[{k}] >> 12) & ~15u)));' for k in range(steps)]
    words = ("x", "y", "z", "w")
    for k in range(steps):     # the low half of ex is the PRMT selector of the tap's column
        out.append(f"// entry {k}: the vector shifted by the tap's column (ex's low half)")
        for i, (lo, hi) in enumerate(zip(words, words[1:] + ("",))):
            b = f"v[{k}].{hi}" if hi else "0u"
            out += [f'{{ unsigned p; asm("prmt.b32 %0, %1, %2, %3;" : "=r"(p) : '
                    f'"r"(v[{k}].{lo}), "r"({b}), "r"(ex[{k}]));',
                    f"  a{i} = sparsert_hfma2(p, ew[{k}], a{i}); }}"]
    return out


def _rowvec_epilogue(ir: StreamIR, t: _Types) -> list[str]:
    """Bias, residual and activation on the row's four half2 sums (pixels 2k, 2k + 1 in sum k),
    then the row's W stores."""
    width = ir.geometry.width
    sums = [f"a{k}" for k in range(4)]
    out = []
    if ir.bias is not None:
        out.append("    const unsigned b = (unsigned)__ldg(sparsert_bias + row);")
        out += [f"    {a} = sparsert_hadd2({a}, b);" for a in sums]
    if ir.residual:
        for k, a in enumerate(sums):
            lo, hi = 2 * k, 2 * k + 1
            if lo >= width:
                continue
            word = f"(unsigned)__ldg(res + o + {lo})" + (
                f" | (unsigned)__ldg(res + o + {hi}) << 16" if hi < width else "")
            out.append(f"    {a} = sparsert_hadd2({a}, {word});")
    for op, value in (("max", 0.0), ("min", 6.0)):
        if ir.activation == "relu6" or (op == "max" and ir.activation == "relu"):
            out += [f"    {a} = sparsert_h{op}2({a}, {t.const(value)});" for a in sums]
    if ir.activation == "gelu":
        out += _gelu(t, sums)
    out += [f"    y[o + {ow}] = (unsigned short)(a{ow // 2}" + (" >> 16);" if ow % 2 else ");")
            for ow in range(width)]
    return out


def _tile_stage_entries(threads: int) -> list[str]:
    """Before the wait (constant data): the worker's row range and first row header, and the
    block's entries copied into shared memory (_copy_entries), awaited after the image copy."""
    return [
        "  const int w = blockIdx.x * WARPS + threadIdx.y;",
        "  int r = __ldg(sparsert_work + w);",
        "  const int r_end = __ldg(sparsert_work + w + 1);",
        *_copy_entries(threads),
        "  int nrow = 0, nlo = 0, nend = 0;   // the worker's next row header",
        "  if (r < r_end) {",
        "    const int* R = sparsert_rows + r * STRIDE;",
        "    nrow = __ldg(R); nlo = __ldg(R + 1); nend = __ldg(R + 2);",
        "  }"]


def _copy_entries(threads: int) -> list[str]:
    """The block's run of entries (whole 16-byte pairs: every row's or segment's run is a
    multiple of PAD, so 16-byte aligned) into sparsert_block_ent with cp.async; e0 its first
    entry's index (entry e at sparsert_block_ent[e - e0])."""
    return [
        "  const int e0 = __ldg(sparsert_span + 2 * blockIdx.x);",
        "  {   // this block's entries into shared memory",
        "    const int pieces = (__ldg(sparsert_span + 2 * blockIdx.x + 2) - e0) / 2;",
        "    const char* src = reinterpret_cast<const char*>(sparsert_ent) + 8ll * e0;",
        "    const unsigned dst = (unsigned)__cvta_generic_to_shared(sparsert_block_ent);",
        f"    for (int i = threadIdx.y * blockDim.x + threadIdx.x; i < pieces; i += {threads})",
        '      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst + 16u * i), '
        '"l"(src + 16ll * i) : "memory");',
        '    asm volatile("cp.async.commit_group;" ::: "memory");',
        "  }"]


# z (the other stages' zero buffer) stays in the signature, unused: the launch contract of every
# padded convolution is the same
_TILE_TYPES = {"x": "const unsigned short* __restrict__", "y": "unsigned short* __restrict__",
               "res": "const unsigned short* __restrict__",
               "z": "const unsigned short* __restrict__"}


def _tile_fill(ir: StreamIR) -> list[str]:
    """The zero-padded image into shared memory: one tile row per thread and step, the image
    row's words (or halves, at an odd width) loaded, then whole 16-byte stores."""
    g = ir.geometry
    lay = tile_layout(g, ir.vector_width)
    hw, width = g.height * g.width, g.width
    even = width % 2 == 0
    raw = width // 2 if even else width
    out = ["  {   // the zero-padded image",
           "    uint4* const T = reinterpret_cast<uint4*>(sparsert_tile);",
           "    if (t == 0) T[0] = make_uint4(0u, 0u, 0u, 0u);   // the lead",
           f"    for (int q = t; q < {g.in_channels * lay.rows}; q += {ir.col_threads * ir.warps}) {{",
           f"      const int c = q / {lay.rows}, i = q % {lay.rows} - 1;",
           f"      unsigned w[{lay.row // 2}];",
           f"      if (i >= 0 && i < {g.height}) {{"]
    if even:
        out.append(f"        const unsigned* s = reinterpret_cast<const unsigned*>(x + c * {hw} + "
                   f"i * {width});")
        out += [f"        w[{j}] = __ldg(s + {j});" for j in range(raw)]
    else:
        out.append(f"        const unsigned short* s = x + c * {hw} + i * {width};")
        out += [f"        w[{j}] = (unsigned)__ldg(s + {2 * j})"
                + (f" | ((unsigned)__ldg(s + {2 * j + 1}) << 16);" if 2 * j + 1 < width
                   else ";") for j in range(-(-width // 2))]
    done = raw if even else -(-width // 2)
    out += [f"        w[{j}] = 0u;" for j in range(done, lay.row // 2)]
    out += ["      } else {"]
    out += [f"        w[{j}] = 0u;" for j in range(lay.row // 2)]
    out += ["      }",
            f"      uint4* const d = T + {TILE_LEAD // 8} + q * {lay.row // 8};"]
    out += [f"      d[{j}] = make_uint4(w[{4 * j}], w[{4 * j + 1}], w[{4 * j + 2}], w[{4 * j + 3}]);"
            for j in range(lay.row // 8)]
    return out + ["    }", "  }"]


def _tile_group(ir: StreamIR, count: int, first: str) -> list[str]:
    """`count` entries from the warp's buffer at `first`, in three phases so their loads are in
    flight together: the entries (16-byte broadcasts), the two pixels' activations, the FMAs
    (entry k feeds accumulator k % CHAINS; `first` is a multiple of 8)."""
    lay = tile_layout(ir.geometry, ir.vector_width)
    at = f"qa + 8 * {first}" if first != "0" else "qa"
    out = [f"unsigned pr[{2 * count}];"]
    out += [f'asm volatile("ld.volatile.shared.v4.u32 {{%0, %1, %2, %3}}, [%4];" : "=r"(pr[{4 * k}]), '
            f'"=r"(pr[{4 * k + 1}]), "=r"(pr[{4 * k + 2}]), "=r"(pr[{4 * k + 3}]) : '
            f'"r"({at} + {16 * k}));' for k in range(count // 2)]
    if not lay.pairs:
        out += [f"unsigned short u[{count}];"]
        out += [f'asm volatile("ld.volatile.shared.u16 %0, [%1];" : "=h"(u[{k}]) : '
                f'"r"(tb + ((unsigned)pr[{2 * k}] << 1)));' for k in range(count)]
        return out + [f"a[{k} % CHAINS] = sparsert_hfma(u[{k}], (unsigned short)pr[{2 * k + 1}], "
                      f"a[{k} % CHAINS]);" for k in range(count)]
    out += [f"unsigned short u[{count}], d[{count}];"]
    out += [f'asm volatile("ld.volatile.shared.u16 %0, [%2];\\n\\tld.volatile.shared.u16 %1, '
            f'[%2+{2 * lay.pair_delta}];" : "=h"(u[{k}]), "=h"(d[{k}]) : '
            f'"r"(tb + ((unsigned)pr[{2 * k}] << 1)));' for k in range(count)]
    out += [f"a[{k} % CHAINS] = sparsert_hfma2((unsigned)u[{k}] | ((unsigned)d[{k}] << 16), "
            f"pr[{2 * k + 1}], a[{k} % CHAINS]);" for k in range(count)]
    return out


def _tile_epilogue(ir: StreamIR, t: _Types, lay) -> list[str]:
    """Bias, residual and activation on the pair's half2 sum, then its two stores."""
    d = lay.half * ir.geometry.width        # output elements from the top to the bottom pixel
    h2 = "2" if lay.pairs else ""
    out = []
    if ir.bias is not None:
        out.append(f"    v = sparsert_hadd{h2}(v, ({t.acc_t})__ldg(sparsert_bias + row));")
    if ir.residual and lay.pairs:
        out.append(f"    if (act) v = sparsert_hadd2(v, (unsigned)__ldg(res + o) | (second ? "
                   f"(unsigned)__ldg(res + o + {d}) << 16 : 0u));")
    elif ir.residual:
        out.append("    if (act) v = sparsert_hadd(v, __ldg(res + o));")
    for op, value in (("max", 0.0), ("min", 6.0)):
        if ir.activation == "relu6" or (op == "max" and ir.activation == "relu"):
            out.append(f"    v = sparsert_h{op}{h2}(v, {t.const(value)});")
    if ir.activation == "gelu":
        out += _gelu(t, ["v"])
    if not lay.pairs:
        return out + ["    if (act) y[o] = v;"]
    return out + ["    if (act) y[o] = (unsigned short)v;",
                  f"    if (second) y[o + {d}] = (unsigned short)(v >> 16);"]


def _part_type(t: _Types) -> str:
    return t.acc_t


def _slice_units(ir: StreamIR, t: _Types) -> int:
    """Accumulator units of one slice's partials: one per output, or per half2 pair."""
    return ir.geometry.output_elems * t.units // t.width


def _k_split(ir: StreamIR, t: _Types) -> list[str]:
    """A K-slice's end: its partial sums go to the workspace; the block that finishes a (worker
    block, column tile) last adds the slices in order and runs the epilogue (the counter is
    left at zero for the next launch)."""
    step = t.width // t.units
    at = f"o / {step}" if step > 1 else "o"
    slice_units = _slice_units(ir, t)
    load = f"__ldcg(P + s * {slice_units} + {at} + {{k}})"
    out = ["    if (act) {"]
    out += [f"      P[blockIdx.z * {slice_units} + {at} + {k}] = a[0][{k}];"
            for k in range(t.units)]
    out += ["    }", "  }",
            "  __shared__ unsigned sparsert_last;",
            *(GRID_DEPENDENCY[:1] if ir.dependent_launch else ()),  # workers without rows
            # one thread publishes the block's partials (the barrier orders every thread's
            # stores before its release) and, in the last block, acquires the others'. The
            # acquire empties the SM's L1 (CCTL.IVALL): once per tile, where a __threadfence
            # in every thread did it in every warp of every block (docs/perf-notes.md)
            "  __syncthreads();",
            "  if (threadIdx.x == 0 && threadIdx.y == 0) {",
            "    const unsigned tile = blockIdx.y * gridDim.x + blockIdx.x;",
            "    unsigned seen;",
            '    asm volatile("atom.release.gpu.global.add.u32 %0, [%1], 1;"'
            ' : "=r"(seen) : "l"(sparsert_count + tile) : "memory");',
            f"    sparsert_last = seen == {ir.k_slices - 1}u;",
            "    if (sparsert_last) {",
            '      asm volatile("fence.acq_rel.gpu;" ::: "memory");',
            "      sparsert_count[tile] = 0u;",
            "    }",
            "  }",
            "  __syncthreads();",
            "  if (!sparsert_last || !act) return;",
            "  for (int r = __ldg(sparsert_work + w); r < r_end; ++r) {",
            "    const int row = __ldg(sparsert_rows + r * STRIDE);",
            "    const int o = row * PIXELS;",
            f"    {t.acc_t} a[1][{t.units}];",
            "    {",
            "      const int s = 0;"]
    out += [f"      a[0][{k}] = {load.format(k=k)};" for k in range(t.units)]
    out += ["    }", f"    for (int s = 1; s < {ir.k_slices}; ++s) {{"]
    out += [f"      a[0][{k}] = {t.add(f'a[0][{k}]', load.format(k=k))};"
            for k in range(t.units)]
    out += ["    }"]
    out += _epilogue(ir, t)
    return out + ["  }", "}"]


def _segment(ir: StreamIR, t: _Types, i: int, load: str) -> list[str]:
    """Segment i's loop: chunks of 32 nonzeros, each one coalesced load (each lane one (offset,
    weight) pair, the next chunk's in flight meanwhile) that every lane then takes in turn, by
    shuffle or from the warp's shared-memory buffer (stage)."""
    def entry(pick: str, acc: str) -> list[str]:
        return [pick, f"const {t.vt} v = {load};"] + t.fma(acc, "v", "wt")

    def block(lines: list[str], indent: int) -> list[str]:
        return [" " * indent + "{"] + [" " * (indent + 2) + x for x in lines] + [" " * indent + "}"]

    pick = "const unsigned off = pr.{}; const int wt = pr.{};"
    pair = (["const int4 pr = q[c / 2];"]
            + block(entry(pick.format("x", "y"), "a[c % CHAINS]"), 0)
            + block(entry(pick.format("z", "w"), "a[(c + 1) % CHAINS]"), 0))
    if ir.stage == "ring":
        # the ring holds entries [fill - 64, fill); before each step it is filled up to the
        # step's last entry (a whole run of 32, the loads of 32 entries then in flight, or one
        # group of PAD at a segment's tail; groups are PAD-aligned, so none wraps the ring)
        def groups(count: int, acc: str) -> list[str]:
            lines = []
            for g in range(count):
                lines += ["{", f"  const int4* q = reinterpret_cast<const int4*>(ring + "
                          f"((e + {PAD * g} - pos0) & 63));", "#pragma unroll",
                          f"  for (int c = 0; c < {PAD}; c += 2) {{"]
                lines += ["    " + x for x in pair] + ["  }", "}"]
            return lines
        return (["    {",
                 f"      const int end = h[{2 + i}];",
                 f"      for (int e = h[{1 + i}]; e < end;) {{",
                 "        const int stop = min(e + 32, end);",
                 "        while (fill < stop) {",
                 "          __syncwarp();",
                 "          ring[((fill - pos0) & 32) + lane] = next;",
                 "          __syncwarp();",
                 "          fill += 32;",
                 "          next = lane < ENTRIES - fill ? __ldg(ent + fill + lane)"
                 " : make_int2(0, 0);",
                 "        }",
                 "        if (stop - e == 32) {"]
                + ["          " + x for x in groups(32 // PAD, "")]
                + ["          e += 32;", "        } else {"]
                + ["          " + x for x in groups(1, "")]
                + [f"          e += {PAD};", "        }", "      }", "    }"])
    n_staged = ir.staged
    out = ["    {",
           f"      const int lo = __ldg(R + {1 + i}), end = __ldg(R + {2 + i});"]
    if not n_staged:
        out.append("      int2 mine = lane < end - lo ? __ldg(ent + lo + lane) : make_int2(0, 0);")
    if i == 0 and ir.dependent_launch:      # before the row's first activation load
        out.append("    " + GRID_DEPENDENCY[0])
    out += [
           "      for (int e = lo; e < end; e += 32) {",
           "        const int n = min(32, end - e);"]
    if not n_staged:
        out.append("        const int2 next = lane < end - e - 32 ? __ldg(ent + e + 32 + lane)"
                   " : make_int2(0, 0);")
    if n_staged:              # the chunk's entries where the block staged them
        full = (["const int4 pr = q[j / 2];"]
                + block(entry(pick.format("x", "y"), "a[j % CHAINS]"), 0)
                + block(entry(pick.format("z", "w"), "a[(j + 1) % CHAINS]"), 0))
        tail = ["const int4 pr = q[(j + c) / 2];"] + pair[1:]
        out.append("        const int4* q = reinterpret_cast<const int4*>(sparsert_block_ent + "
                   "(e - e0));")
        step = 2
    elif ir.stage == "smem":    # offsets are >= 0: unsigned, one wide multiply-add per address
        full = (["const int4 pr = q[j / 2];"]
                + block(entry(pick.format("x", "y"), "a[j % CHAINS]"), 0)
                + block(entry(pick.format("z", "w"), "a[(j + 1) % CHAINS]"), 0))
        tail = ["const int4 pr = q[(j + c) / 2];"] + pair[1:]
        out += ["        buf[p][lane] = mine;",
                "        __syncwarp();",
                "        const int4* q = reinterpret_cast<const int4*>(buf[p]);"]
        step = 2
    else:
        shfl = ("const int off = __shfl_sync(0xffffffffu, mine.x, {j}), "
                "wt = __shfl_sync(0xffffffffu, mine.y, {j});")
        full, tail, step = entry(shfl.format(j="j"), "a[j % CHAINS]"), entry(
            shfl.format(j="j + c"), "a[c % CHAINS]"), 1
    inc = "++j" if step == 1 else f"j += {step}"
    out += ["        if (n == 32) {", "#pragma unroll",
            f"          for (int j = 0; j < 32; {inc}) {{"]
    out += ["            " + x for x in full]
    out += ["          }", "        } else {", f"          for (int j = 0; j < n; j += {PAD}) {{",
            "#pragma unroll", f"            for (int c = 0; c < {PAD}; "
            f"{'++c' if step == 1 else f'c += {step}'}) {{"]
    out += ["              " + x for x in tail]
    out += ["            }", "          }", "        }"]
    if not n_staged:
        out += ["        mine = next;"] + (["        p ^= 1;"] if ir.stage == "smem" else [])
    return out + ["      }", "    }"]


def _epilogue(ir: StreamIR, t: _Types) -> list[str]:
    out = []
    s = [f"a[0][{k}]" for k in range(t.units)]
    if ir.bias is not None:
        bias = ("(unsigned)__ldg(sparsert_bias + row)" if t.half_acc and t.width > 1 else
                "(unsigned short)__ldg(sparsert_bias + row)" if t.half_acc else
                "__int_as_float(__ldg(sparsert_bias + row))")
        out.append(f"    const {t.acc_t} bias = {bias};")
        out += [f"    {v} = {t.add(v, 'bias')};" for v in s]
    if ir.token_major and (ir.residual or not ir.tile_rows):
        out += _plane_row(ir)
    if ir.residual:
        out += _residual_tokens(ir, t, s) if ir.token_major else _residual(t, s)
    h = "2" if t.width > 1 else ""
    for op, value in (("max", 0.0), ("min", 6.0)):
        if ir.activation == "relu6" or (op == "max" and ir.activation == "relu"):
            if t.half_acc:
                out += [f"    {v} = sparsert_h{op}{h}({v}, {t.const(value)});" for v in s]
            else:
                out += [f"    {v} = f{op}f({v}, {f32(value)});" for v in s]
    if ir.activation == "gelu":
        out += _gelu(t, s)
    if ir.token_major:
        return out + _store_tokens(ir, t, s)
    if t.half_acc or not t.half_storage:
        packed = s[0] if len(s) == 1 else f"make_{t.vt}({', '.join(s)})"
    elif t.width == 1:
        packed = f"sparsert_f2h({s[0]})"
    else:
        pairs = [f"sparsert_f2h2({s[2 * u + 1]}, {s[2 * u]})" for u in range(t.raws)]
        packed = pairs[0] if len(pairs) == 1 else f"make_{t.vt}({', '.join(pairs)})"
    out.append(f"    if (act) *reinterpret_cast<{t.vt}*>(y + o) = {packed};")
    return out


def _gelu(t: _Types, s: list[str]) -> list[str]:
    """GELU of each sum (sparsert_gelu, fp32): half2 pairs and single halves widened to fp32
    for it and rounded back (cvt.rn)."""
    if not t.half_acc:
        return [f"    {v} = sparsert_gelu({v});" for v in s]
    if t.width == 1:
        return [f"    {v} = sparsert_f2h(sparsert_gelu(sparsert_h2f({v})));" for v in s]
    return [f"    {v} = sparsert_f2h2(sparsert_gelu(sparsert_h2f((unsigned short)({v} >> 16))), "
            f"sparsert_gelu(sparsert_h2f((unsigned short){v})));" for v in s]


def _residual(t: _Types, s: list[str]) -> list[str]:
    """res[row][column vector]: one vector load (channel-major output)."""
    out = [f"    const {t.vt} rv = __ldg(reinterpret_cast<const {t.vt}*>(res + o));"]
    if t.half_acc:
        return out + [f"    {v} = {t.add(v, t.raw('rv', k))};" for k, v in enumerate(s)]
    return out + [f"    {v} += {t.column('rv', k)};" for k, v in enumerate(s)]


def _plane_rows(ir: StreamIR) -> int:
    """Rows per plane of a token-major output (all of them: one plane)."""
    return ir.planes or ir.geometry.out_channels


def _plane_row(ir: StreamIR) -> list[str]:
    """`prow`, the row's offset in a token-major output in planes (its plane's base and its
    place in the plane's rows); a single plane uses `row` itself."""
    if not ir.planes:
        return []
    p = ir.planes
    return [f"    const int prow = row / {p} * {p * ir.geometry.out_pixels} + row % {p};"]


def _token(ir: StreamIR, column: int) -> str:
    """The offset of this thread's `column`-th column of the row in a token-major array."""
    step = column * _plane_rows(ir)
    row = "prow" if ir.planes else "row"
    return f"{step} + {row}" if step else row


def _residual_tokens(ir: StreamIR, t: _Types, s: list[str]) -> list[str]:
    """res[column][row]: one scalar load per column (token-major output)."""
    load = "__ldg(res + {})"
    if t.half_acc and t.width > 1:     # a half2 pair of columns 2u, 2u + 1
        pairs = [f"((unsigned){load.format(_token(ir, 2 * u + 1))} << 16 | "
                 f"(unsigned){load.format(_token(ir, 2 * u))})" for u in range(len(s))]
        return [f"    {v} = {t.add(v, pair)};" for v, pair in zip(s, pairs)]
    if t.half_acc:
        return [f"    {s[0]} = {t.add(s[0], load.format(_token(ir, 0)))};"]
    convert = "sparsert_h2f({})" if t.half_storage else "{}"
    return [f"    {v} += {convert.format(load.format(_token(ir, k)))};" for k, v in enumerate(s)]


def _tile_stride(ir: StreamIR) -> int:
    """Elements per row of the staged tile: its columns and one more (the block reads the tile
    down its rows when it writes it out: an odd stride keeps those reads on distinct banks)."""
    return ir.col_threads * ir.vector_width + 1


def _write_tile(ir: StreamIR) -> list[str]:
    """The staged tile written out: for each column of the tile, the block's rows as one run
    (consecutive threads, consecutive rows)."""
    g, width = ir.geometry, ir.col_threads * ir.vector_width
    threads = ir.col_threads * ir.warps
    return ["  __syncthreads();",
            "  {",
            f"    const int rows = min({ir.tile_rows}, {g.out_channels} - c0);",
            f"    const int t0 = blockIdx.y * {width}, cols = min({width}, {g.out_pixels} - t0);",
            f"    for (int i = threadIdx.y * {ir.col_threads} + threadIdx.x; i < rows * cols; "
            f"i += {threads}) {{",
            "      const int t = i / rows, c = i - t * rows;",
            f"      y0[{_tile_address(ir)}] = sparsert_tile[c * {_tile_stride(ir)} + t];",
            "    }",
            "  }"]


def _tile_address(ir: StreamIR) -> str:
    """Where the write-out puts tile row c's column t (token t0 + t, row c0 + c)."""
    g = ir.geometry
    if not ir.planes:
        return f"(t0 + t) * {g.out_channels} + c0 + c"
    p = ir.planes
    return f"(c0 + c) / {p} * {p * g.out_pixels} + (t0 + t) * {p} + (c0 + c) % {p}"


def _store_tokens(ir: StreamIR, t: _Types, s: list[str]) -> list[str]:
    """y[column][row] = each column's value: scalar stores (token-major output), or into the
    block's staged tile (tile_rows)."""
    if t.half_acc and t.width > 1:
        values = [f"(unsigned short){s[k // 2]}" if k % 2 == 0
                  else f"(unsigned short)({s[k // 2]} >> 16)" for k in range(t.width)]
    elif t.half_acc:
        values = [s[0]]
    elif t.half_storage:
        values = [f"sparsert_f2h({v})" for v in s]
    else:
        values = s
    if ir.tile_rows:
        at = f"(row - c0) * {_tile_stride(ir)} + tx * {t.width}"
        return (["    if (act) {"] + [f"      sparsert_tile[{at} + {k}] = {value};"
                                      for k, value in enumerate(values)] + ["    }"])
    return (["    if (act) {"] + [f"      y[{_token(ir, k)}] = {value};"
                                  for k, value in enumerate(values)] + ["    }"])


# ---- compile route ------------------------------------------------------------------------------
_DECL = re.compile(r"^__device__ __align__\((\d+)\) int (sparsert_\w+)\[(\d+)\] = \{([^}]*)\};$",
                   re.M)


def split_tables(source: str) -> tuple[str, dict[str, tuple[int, str]]]:
    """The source with each table declared uninitialised, and {name: (align, words text)}."""
    found: dict[str, tuple[int, str]] = {}

    def strip(m: re.Match) -> str:
        found[m[2]] = (int(m[1]), m[4])
        return f"__device__ __align__({m[1]}) int {m[2]}[{m[3]}];"

    return _DECL.sub(strip, source), found


def to_cubin(source: str, arch: str, threads: int = 1) -> Compiled:
    """NVRTC compiles the loop (tables declared empty); the tables go into its PTX as
    initialised .global data; nvJitLink assembles the module."""
    del threads
    bare, found = split_tables(source)
    ptx, nvrtc_seconds = cpp_to_ptx(bare, arch)
    for name, (align, words) in found.items():
        pattern = re.compile(rf"^(\.visible )?\.global \.align \d+ \.b8 {name}\[(\d+)\];$", re.M)
        count = words.count(",") + 1
        ptx, n = pattern.subn(lambda m: f"{m[1] or ''}.global .align {align} .b32 {name}"
                              f"[{count}] = {{{words}}};", ptx)
        if n != 1:
            from ..errors import CompileError
            raise CompileError(f"table {name} not found in NVRTC's PTX")
    compiled = ptx_to_cubin(ptx, arch)
    return Compiled(compiled.cubin, compiled.log, compiled.seconds + nvrtc_seconds,
                    compiled.resources)


# ---- parse-back ---------------------------------------------------------------------------------
_CONST = re.compile(
    r"// geometry batch=(\d+) in=(\d+) h=(\d+) w=(\d+) out=(\d+) k=(\d+) s=(\d+) p=(\d+); "
    r"dtype=(\w+) acc=(\w+); width=(\d+); grid=(\d+)x(\d+); activation=(\w+); stage=(\w+)"
    r"(?:; slices=(\d+))?(?:; layout=(tokens))?(?:; tile_rows=(\d+))?(?:; planes=(\d+))?\n"
    r"  constexpr int WARPS = (\d+), CHAINS = (\d+), STRIDE = (\d+), PIXELS = (\d+);")
_SIG = re.compile(r'__launch_bounds__\((\d+)(?:, (\d+))?\)\n(\w+)\(([^)]*)\)')
_BASE = re.compile(r"const [\w ]+\* b(\d+) = \(\(unsigned\)\(ih \+ (\d+)\) < (\d+)u && "
                   r"\(unsigned\)\(iw \+ (\d+)\) < (\d+)u\) \? x : z \+ \((-?\d+)\);")
_PTR = re.compile(r"^  (x|y|res) \+= (\w+)(?: \* \d+)?;$", re.M)


def _parse_index(line: str) -> IndexOp | None:
    for op, template in RULES.items():
        if op in ("pointer", "barrier", "load", "store") or "{dst}" not in template:
            continue
        pattern = re.escape(template).replace(r"\{dst\}", r"(\w+)").replace(
            r"\{a\}", r"(\w+)").replace(r"\{b\}", r"(\w+)").replace(r"\{c\}", r"(\w+)")
        m = re.fullmatch("  " + pattern, line)
        if m:
            vals = [int(v) if re.fullmatch(r"-?\d+", v) else v for v in m.groups()]
            return IndexOp(op, vals[0], vals[1], vals[2], vals[3] if len(vals) > 3 else None)
    return None


def check_printed(ir: StreamIR, source: str) -> None:
    from . import PrintedMismatch

    parsed = _parse(source)
    if isinstance(parsed, str):
        raise PrintedMismatch(f"streamed source: {parsed}")
    diff = ir.difference(parsed)
    if diff:
        raise PrintedMismatch(f"printed streamed kernel differs from its IR: {diff}")
    if print_stream(parsed) != source:
        raise PrintedMismatch("printed streamed kernel is not what its IR prints")


def _parse(source: str) -> StreamIR | str:
    """The StreamIR the printed source says, or what is missing (index ops are signed where
    the source declares them int)."""
    m = _CONST.search(source)
    sig = _SIG.search(source)
    if not m or not sig:
        return "constants or signature not found"
    v = [int(x) if x and x.isdigit() else x for x in m.groups()]
    geometry = Geometry(*v[0:8])
    slices = v[15] or 1
    dtype, accumulate, width, grid, activation = v[8], v[9], v[10], (v[11], v[12], slices), v[13]
    stage, (warps, chains, stride) = v[14], v[19:22]
    half_acc = accumulate == "fp16"
    arguments = tuple(a.split()[-1] for a in sig[4].split(","))
    decl = source[sig.end():]
    signed_line = re.search(r"^  int ([\w, ]+);$", decl, re.M)
    signed = set(signed_line[1].split(", ")) if signed_line else set()
    columns = []
    for line in decl.splitlines():
        op = _parse_index(line)
        if op is not None:
            columns.append(op._replace(signed=op.dst in signed))
    found = {name: np.array([int(w) for w in words.split(",")], dtype=np.int64)
             for _, name, _, words in _DECL.findall(source)}
    if any(name not in found for name in TABLES[:3]):
        return "a table is missing"
    rows = found["sparsert_rows"].reshape(-1, stride)
    ent = found["sparsert_ent"]
    nnz = len(ent) // 2 if not (len(ent) == 1) else 0
    bases = tuple(TapBase(int(b[1]), int(b[3]), int(b[5])) for b in _BASE.findall(source))
    bias = (tuple(_from_words(found["sparsert_bias"], half_acc).tolist())
            if "sparsert_bias" in found else None)
    staged = re.search(r"int2 sparsert_block_ent\[(\d+)\];", source)
    return StreamIR(
        entry=sig[3], comment=ir_comment(source), geometry=geometry, dtype=dtype,
        accumulate=accumulate, vector_width=width, col_threads=int(sig[1]) // warps,
        warps=warps, chains=chains, grid=grid, arguments=arguments, columns=tuple(columns),
        pointers=tuple(_PTR.findall(source)), bases=bases, work=found["sparsert_work"],
        row_out=rows[:, 0], seg=rows[:, 1:], offsets=ent[0:2 * nnz:2],
        values=_from_words(ent[1:2 * nnz:2], half_acc), bias=bias,
        residual="res" in arguments, activation=activation, stage=stage, k_slices=slices,
        dependent_launch=source.startswith("\n{\n" + GRID_DEPENDENCY[1], sig.end()),
        min_blocks=int(sig[2] or 1), token_major=v[16] == "tokens", tile_rows=v[17] or 0,
        planes=v[18] or 0, staged=int(staged[1]) if staged else 0)


def ir_comment(source: str) -> str:
    first = source.split("\n", 1)[0]
    return first.split("): ", 1)[1] if "): " in first else ""
