"""The immediate family's hooks for choosing plans: its untuned default, the candidates the tuner
and the cost model sweep, and the cost features of a plan (exact, from a plan) or of parameters
(estimated from the weight's rows without building the plan: planning a 236k-nonzero layer takes
about a second, these estimates take milliseconds)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, replace

import numpy as np

from ...errors import UserError
from ...problem_shape import (ELEMENT_BYTES, MAX_STATIC_SHARED, MAX_THREADS, PRECISIONS,
                              Geometry, max_vector_width)
from .lower import INLINE_LIMIT
from .plan import (MAX_GRID_Y, Plan, PlanParams, _assign_rows, fit_params, fit_vector_width,
                   takes_pairs)

# Code size is nnz x vector width FMAs; ptxas time grows with it (~0.17 s per 1k on one core).
# Past this budget the planner narrows the vector so the biggest layers compile in ~20 s.
CODE_BUDGET = 500_000
LARGE_CODE = 40_000
# Sum instructions past which a default's vector narrows (~1 MB of SASS; run S4 of
# docs/perf-notes.md: 26k nonzeros x 4 columns ran 1.4-1.5x slower than x 2).
WIDE_CODE = 64_000
# fp16 (half2) layers up to this many nonzeros take 8 columns per thread; heavier ones take the
# columns an fp32 plan would, at least a pair (run S6-6: rule_params).
LIGHT_HALF2 = 4096
H100_SMS = 132
INSTRUCTION_BYTES = 16      # one SASS instruction (sm_70+)
STORE_INSTRUCTIONS = 2      # per row and lane: the store and its address/epilogue arithmetic
# Per k-split slice: its body's call, prologue and the shared-memory exchange; from the cubins of
# the run-1 probe (docs/perf-notes.md: +0.4-1.0 MB per doubling of k_split, ~160-200 per slice).
SLICE_INSTRUCTIONS = 160


# Light batch-1 1x1 / GEMM layers over many columns: tall row groups, one column a thread (a
# column pair with half2 sums). H100 runs S16-1/S16-2 (docs/perf-notes.md, session 16: rows x
# width x threads x grid order on 11 paper20 layers, every plan verified) found them 13-28%
# (fp32) and 7-15% (fp16) faster than session 15's tuned plans on the four layers of 3136
# columns or more, and up to 8% on 784 columns in fp32 (in S16-3 mbv1_pw3 was 8% slower: 2.37
# against r2v4t64 2.19 us; the tuner keeps the faster): one load feeds up to 32 rows, so a tile
# reads 2-3x fewer activation bytes per output (mbv1_pw2 at 90%: 16 B at r32v1 against 37 B at
# r8v4) for the same sums a thread. A group stops growing at TALL_FMAS sums a thread (mbv1_pw4,
# 26 nonzeros a row: r32v1 3.24 us against r16v1 2.85), at TALL_ACCUMULATORS sums a thread
# (fp16: r16v2 1.97 us against r32v2 2.12 on mbv1_pw2) and where its blocks (64 threads) would
# not fill the SMs (mbv1_pw3, 784 columns: r32v1t64, 104 blocks, 2.29 us against r16v1t64,
# 208 blocks, 2.14). Past TALL_GROUPS_COLUMNS columns a tile's row groups are neighbours on
# blockIdx.x (grid order "groups": they read the same activations at the same time): 3-12%
# faster on all eight such cases; on 784 columns it was once 1.4x slower (mbv1_pw4 r16v1t64),
# so the default keeps tiles there.
# One-image stride-1 3x3 layers with half2 sums over more than PAIR_COLUMNS columns take column
# pairs through pair windows (KernelIR.pair_windows), with balanced_tiles' rows and threads. H100
# run S17-1 (docs/perf-notes.md, session 17: rows x width x threads, every plan verified, fp16):
# one-column scalar fp16 sums cost ptxas a PRMT for most FMAs (it packs two rows' b16 sums into
# one register), and a pair's HFMA2 does two columns: rn50_c3_3x3 (784 columns) 4.81 us at the
# default r4v1t224 against 3.84 at r2v2t224 (90%), 3.55 against 2.81 (95%); rn50_c2_3x3 (3136)
# r16v1t96 4.00 against r4v2t224 3.51 (90%), 3.13 against 2.78 (95%). Where one tile already
# holds the columns (rn50_c4_3x3, 196) the pairs' extra loads and shifts only add code:
# r2v1t224 5.71 against r2v2t128 8.16.
# Measured at 90% and 95%, where these layers' bodies are inline; past INLINE_LIMIT nonzeros
# (e.g. rn50_c3_3x3 at 80%) a pair plan's functions spilled more than the one-column plan's (a
# review's compile, not timed), so those keep one column. Widened sums (WIDENED, below) take
# the same pairs: their code a column is no smaller (a pair's two widenings and FFMAs), but a
# pair load feeds two columns: bf16 run S18-5, rn50_c3_3x3 r2v2t224 4.10 us against r4v1t224
# 4.58, rn50_c2_3x3 r4v2t224 3.79 against r16v1t96 4.20 (90%; S18-2 and S18-3 measured the
# first at 4.12-4.14 against 4.62-4.63).
PAIR_COLUMNS = 256
# Precisions whose 2-byte inputs are widened to fp32 sums, one instruction a column (bf16: SHF or
# LOP3; fp16acc32: HADD2), so a nonzero costs each column a widening and an FFMA: their light
# layers are the more bound by each tile's fetch of its group's code. H100 run S18-1
# (docs/perf-notes.md, session 18: bf16 at 90%, rows x width x threads, every plan verified):
# at 784 columns r2v4t128 (2 tiles) ran 2.44 us against the rule's r2v4t64 (4 tiles) 3.56 on
# mbv1_pw4 and 2.79 against 4.01 on rn50_c3_reduce, and within 2% of it on mbv1_pw3 (1.95
# against 1.92); from TALL_COLUMNS (2048, fp16's) on, tall groups of one column a thread
# (mbv1_pw2: r32v1t64 2.24 against r2v4t64 2.60; mbv1_pw0 r32v1 1.92 against 2.10). fp16acc32
# has the same code shape and follows bf16 (S18-5 measured it: mbv1_pw4 r2v4t128 2.54 us
# against r2v4t64 3.74, rn50_c3_reduce 2.87 against 4.08). Their one-image light layers also
# keep WIDENED_THREADS threads' worth of vectors (narrower vectors where the columns are few)
# and one wave of blocks: S18-2 (bf16 tune at 90%) on 196 columns, where the old rule's r2v4t64
# is one tile of 49 busy threads, the rule's r4v1t128 ran 2.47 us against it 3.93 (mbv1_pw5;
# best r8v1t64 2.30), r4v1t128 3.46 against r2v2t128 5.52 (mbv1_pw6), r2v1t128 3.61 against
# r2v2t128 5.29 (rn50_c4_reduce). Batched layers keep the older rules (not measured).
WIDENED = ("bf16", "fp16acc32")
WIDENED_THREADS = 128
TALL_FMAS = 416
TALL_ACCUMULATORS = 32
TALL_COLUMNS = {"fp32": 512, "fp16": 2048, **{p: 2048 for p in WIDENED}}  # bf16: S18-1
TALL_GROUPS_COLUMNS = 2048
# Uneven rows (pruned weights): the coefficient of variation of the nonzeros per row above which
# refine_default takes taller groups of 64 threads (uniform random rows: 0.10-0.27 on paper20's
# light layers at 90-95%; configs/mobilenet.yaml's pruned rows: 1.3-2.1), where the variance is
# also over UNEVEN_ROWS_DISPERSION times the mean (random rows: about the mean, so at 98% and
# 2.6 nonzeros a row their CV of ~0.6 is noise, not unevenness).
UNEVEN_ROWS_CV = 0.5
UNEVEN_ROWS_DISPERSION = 2.0
UNEVEN_THREADS = 64


def code_units(nnz: int, vector_width: int, precision: str = "fp32") -> int:
    """Sum instructions of a plan: one per nonzero and column, or per column pair with half2."""
    return nnz * lanes(vector_width, precision)


def lanes(vector_width: int, precision: str) -> int:
    """FMA instructions per nonzero: one per column, one per column pair with half2 sums."""
    return max(1, vector_width // 2) if precision == "fp16" else vector_width


def load_instructions(vector_width: int, precision: str) -> int:
    """Instructions per activation load: the load, and where 2-byte data is summed in fp32
    (bf16, fp16acc32) one widening instruction per column (SASS of the ptx-3 printer: a bit
    operation per bf16 column, HADD2.F32 per fp16 column)."""
    return 1 + (vector_width if precision in WIDENED else 0)


def default_params(geometry: Geometry, nnz: int, precision: str = "fp32",
                   sm_count: int = H100_SMS) -> PlanParams:
    """A reasonable untuned plan (the cost model picks between the families' defaults as
    "auto"): for throughput layers (throughput_layer) the throughput plan of least predicted
    time, else the latency rules (rule_params)."""
    rules = rule_params(geometry, nnz, precision, sm_count)
    fitted = fit_params(geometry, rules, PRECISIONS[precision][0])
    if throughput_shape(geometry, fitted, sm_count):
        return throughput_params(geometry, fitted, precision, nnz, count=1)[0]
    return rules


def throughput_layer(geometry: Geometry, nnz: int, precision: str = "fp32") -> bool:
    """Whether the layer (not one plan of it) is planned and predicted as a throughput layer:
    throughput_shape of its rule default, fitted to the shape. Every candidate of such a layer
    is predicted by its floors (throughput_time), every candidate of other layers by the fitted
    model."""
    rules = fit_params(geometry, rule_params(geometry, nnz, precision), PRECISIONS[precision][0])
    return throughput_shape(geometry, rules)


def rule_params(geometry: Geometry, nnz: int, precision: str = "fp32",
                sm_count: int = H100_SMS, tall: bool = True, pairs: bool = True) -> PlanParams:
    """The untuned plan of latency-bound shapes, by rules (docs/perf-notes.md, "Untuned
    defaults", measures them).

    Light layers are latency-bound: wide vectors and enough blocks for two waves (one for
    widened sums, see WIDENED). Code-heavy
    plans are bound by instruction fetch (the weights are the instruction stream, 16 bytes per
    FMA, docs/perf-notes.md): large layers, and direct convolutions, whose columns cannot share
    an FMA (width 1) so that each column runs its group's whole filter. They get scalar columns,
    one tile where possible (every warp of a block shares the fetched code: each further tile
    fetches it again), more rows per group (each load feeds more FMAs) and about one wave of
    blocks (7/8 of the SMs). One-image 3x3 convolutions instead take one full wave of the
    smallest blocks (balanced_tiles; no K-split) where one exists. Past WIDE_CODE FMA
    instructions the vector narrows too: there more blocks with half the code each beat wider
    sums. With half2 sums (precision fp16) a column pair costs what one fp32 column does, so
    light layers (up to LIGHT_HALF2 nonzeros) take 8 columns; heavier ones take the columns fp32
    would (counted as columns, not pairs, against WIDE_CODE), but at least one pair: in run S6-6
    8 columns ran 2.2x slower than 4 on rn50_c3_reduce (6.6k nonzeros) and 4 columns 1.12x
    slower than 2 on rn50_c4_reduce (26k). One-image stride-1 3x3 layers with 2-byte inputs
    (half2 or widened sums) over PAIR_COLUMNS columns and bodies inline (INLINE_LIMIT) take
    column pairs (pair windows; `pairs=False`: the one-column plan). Widened sums' light layers
    keep WIDENED_THREADS threads' worth of vectors in one wave (see WIDENED)."""
    tall_plan = tall_params(geometry, nnz, precision, sm_count) if tall else None
    if tall_plan is not None:
        return tall_plan
    dtype = PRECISIONS[precision][0]
    half2 = precision == "fp16"
    big = nnz > LARGE_CODE
    heavy = big or not geometry.linear
    wanted = (2 if half2 else 1) if big else (8 if half2 and nnz <= LIGHT_HALF2 else 4)
    pairs = (pairs and (half2 or precision in WIDENED) and geometry.batch == 1
             and geometry.columns > PAIR_COLUMNS and nnz <= INLINE_LIMIT)
    width = fit_vector_width(geometry, wanted, dtype, windows=pairs)
    while lanes(width, precision) > 1 and code_units(nnz, width, precision) > WIDE_CODE:
        width //= 2
    while half2 and not big and width > 2 and nnz * width > WIDE_CODE:
        width //= 2     # fp16 keeps fp32's columns per thread past LIGHT_HALF2 (see above)
    widened = precision in WIDENED and not heavy and geometry.batch == 1    # measured at 1
    while widened and width > 1 and geometry.columns < WIDENED_THREADS * width:
        width //= 2     # widened sums: WIDENED_THREADS threads' worth of vectors (see WIDENED)
    per_thread = -(-geometry.columns // width)
    balanced = (balanced_tiles(geometry.out_channels, per_thread, sm_count)
                if geometry.kernel == 3 and geometry.batch == 1 else None)
    if balanced:
        rows, threads = balanced
    elif heavy:
        threads = min(256, -(-per_thread // 32) * 32)
    elif widened and per_thread > 64:
        threads = WIDENED_THREADS   # widened sums: half the tiles, each fetching the group's code
    else:
        threads = 32 if per_thread <= 32 else 64 if per_thread <= 2048 else 128
    tiles = -(-per_thread // threads)
    if not balanced:
        rows = 32 if heavy else 8
        # light layers aim for two waves of blocks (widened sums: one; rows stop at 2, so a
        # layer of few rows may still take two), one wave where one tile holds every
        # column: each further group is then code only its own block fetches (H100, pruned
        # mobilenet.yaml mbv1_pw11 at 95%, 49 columns: r2, 512 blocks, 4.06 us against r4,
        # 256 blocks, 3.45 in run S16-6; 5.08 against 3.70 in S17-4)
        fill = (sm_count - sm_count // 8 if heavy else sm_count if tiles == 1 or widened
                else 2 * sm_count)
        while rows > 2 and tiles * -(-geometry.out_channels // rows) < fill:
            rows //= 2
    taps_per_group = nnz / max(1, geometry.out_channels) * rows
    exchange = rows * threads * width * ELEMENT_BYTES[PRECISIONS[precision][1]]
    k_split = 1
    while (not big and not balanced and k_split < 4 and taps_per_group / k_split > 256
           and tiles * -(-geometry.out_channels // rows) * k_split < 4 * sm_count
           and 2 * k_split * threads <= MAX_THREADS
           and 2 * k_split * exchange <= MAX_STATIC_SHARED):   # the slices' sums in shared
        k_split *= 2
    return PlanParams(rows_per_group=rows, vector_width=width, col_threads=threads,
                      k_split=k_split)


def tall_params(geometry: Geometry, nnz: int, precision: str = "fp32",
                sm_count: int = H100_SMS, min_columns: int | None = None) -> PlanParams | None:
    """The tall-group plan of a light batch-1 1x1 or GEMM layer (see TALL_FMAS), or None when
    the layer is not one (batched, 3x3 or strided, over LARGE_CODE nonzeros, fewer columns than
    TALL_COLUMNS of its precision). `min_columns` overrides
    the column threshold (the tuner's candidates use 1)."""
    if (precision not in TALL_COLUMNS or geometry.batch != 1 or not geometry.linear
            or nnz > LARGE_CODE
            or geometry.columns < (TALL_COLUMNS[precision] if min_columns is None
                                   else min_columns)):
        return None
    dtype = PRECISIONS[precision][0]
    width = fit_vector_width(geometry, 2 if precision == "fp16" else 1, dtype)
    per_row = nnz / max(1, geometry.out_channels)
    if 2 * per_row * lanes(width, precision) > TALL_FMAS:
        return None                 # not light: two rows already pass TALL_FMAS sums a thread
    per_thread = -(-geometry.columns // width)

    def blocks(rows: int, threads: int) -> int:
        return -(-per_thread // threads) * -(-geometry.out_channels // rows)

    rows = TALL_ACCUMULATORS // width
    while rows > 2 and (rows * per_row * lanes(width, precision) > TALL_FMAS
                        or blocks(rows, 64) < sm_count):
        rows //= 2
    threads = 128 if blocks(rows, 128) >= sm_count * 3 // 4 else 64
    order = "groups" if geometry.columns >= TALL_GROUPS_COLUMNS else "tiles"
    params = fit_params(geometry, PlanParams(rows_per_group=rows, vector_width=width,
                                             col_threads=threads, k_split=1, grid_order=order),
                        dtype)
    if not grid_fits(geometry, params):
        params = replace(params, grid_order="tiles")
    if not grid_fits(geometry, params) or throughput_shape(geometry, params, sm_count):
        return None                 # four waves of blocks or more: the throughput rules' layer
    return params


def grid_fits(geometry: Geometry, params: PlanParams) -> bool:
    """Whether the plan's blockIdx.y (column tiles in groups order, else row groups) stays
    within MAX_GRID_Y."""
    tiles = -(-geometry.columns // (params.vector_width * params.col_threads))
    groups = -(-geometry.out_channels // params.rows_per_group)
    return (tiles if params.grid_order == "groups" else groups) <= MAX_GRID_Y


def refine_default(geometry: Geometry, csr, params: PlanParams, precision: str) -> PlanParams:
    """The default of a light batch-1 1x1 or GEMM layer under TALL_COLUMNS (fewer columns than
    the rule's tall plans), read from the weight's pattern: on uneven rows the taller plan of
    uneven_params where it applies (every precision); else, in fp32, bf16 and fp16acc32, the
    rule default or the tall-group plan, whichever's largest group has the less code (a
    straight-line block's time is its code's fetch), and in fp16 the rule. On pruned rows (uneven
    lengths) two-row groups are as long as their heaviest rows, while tall groups even them
    out: H100 run S16-6 (configs/mobilenet.yaml, pruned patterns, fp32): mbv1_pw6 at 95%
    r2v4t64 6.47 us against r8v1t128 3.65 (26.2 against 10.6 KB of code in the largest
    group), mbv1_pw5 3.96 against 2.87 at 90%. On the uniform rows measured (S16-3, paper20 at
    90%: mbv1_pw5, mbv1_pw6, rn50_c4_reduce) the rule's groups have the less code and were kept
    (mbv1_pw6 r2v2t64 3.60 us against r8v1t128 3.88, 5.0 against 11.5 KB); uniform rows under
    wider rule vectors can still switch (rn50_c4_reduce at 95%, r2v4t64 to r4v1t128: not
    measured; that case runs its tuned plan in the paper20 bench). Only one-slice latency
    defaults are compared (a K-split halves a thread's serial work, which the largest group's
    code does not show; throughput plans are chosen by their own floors). Widened sums (bf16,
    fp16acc32) likewise: S18-3 (mobilenet.yaml, bf16) mbv1_pw4 r2v4t128 4.96 us against
    r16v1t128 2.79 at 90%, 3.09 against 2.35 at 95%."""
    nnz = int(csr.nnz)
    if (precision not in ("fp32", "fp16", *WIDENED) or params.k_split != 1
            or throughput_layer(geometry, nnz, precision)):
        return params   # a K-split's or throughput plan's time is not its largest group's code
    tall = tall_params(geometry, nnz, precision, min_columns=1)
    if tall is None or geometry.columns >= TALL_COLUMNS[precision]:
        return params   # the rule gives the tall plan already (or the layer takes none)
    if uneven_rows(csr):
        taller = uneven_params(geometry, tall, nnz, precision)
        if taller is not None:
            return taller
    if precision == "fp16" or tall == params:
        return params   # fp16 on even rows: the rule measured best (S19-1)
    code = [estimate(geometry, csr, p, precision)["max_block_code_bytes"] for p in (params, tall)]
    return tall if code[1] < code[0] else params


def uneven_rows(csr) -> bool:
    """Whether the nonzeros per row vary as pruned weights' do (see UNEVEN_ROWS_CV)."""
    per_row = np.diff(csr.indptr)
    mean = float(per_row.mean()) if len(per_row) else 0.0
    var = float(per_row.var()) if len(per_row) else 0.0
    return (mean > 0 and var ** 0.5 / mean > UNEVEN_ROWS_CV
            and var > UNEVEN_ROWS_DISPERSION * mean)


def uneven_params(geometry: Geometry, tall: PlanParams, nnz: int,
                  precision: str) -> PlanParams | None:
    """The default of a light layer under TALL_COLUMNS with uneven rows: the tall plan with
    twice its rows (one halving fewer: about one wave of blocks, not two) on 64-thread tiles,
    where those rows stay within TALL_FMAS sums a thread and 64 threads still make two column
    tiles or more (else the blocks would halve: one-tile layers keep their one-wave rule);
    else None (refine_default's even-row choice applies). Widened sums (bf16, fp16acc32: a
    widening instruction per column loaded, so more code a row) keep the tall plan's rows on
    the 64-thread tiles. H100 run S19-1 (plan sweep, every plan verified; 196-column layers in
    fp32, bf16 and fp16, 784-column ones in fp16, 90% and 95%, configs/mobilenet.yaml's pruned
    rows): over 24 cases the old defaults were 1.15x the best plan (geomean; worst 1.50x, fp16
    rn50_c3_reduce at 95% r2v8t64 4.45 us against r8v2t64 2.96), this rule 1.035x (worst
    1.41x, bf16 rn50_c4_reduce at 90%, below; then 1.10x, fp32 rn50_c4_reduce at 90%: r4v1t128
    5.90 against r8v1t64 5.35). Where the doubled rows pass TALL_FMAS neither the tall plan nor
    the rule wins everywhere (bf16 at 90%: rn50_c4_reduce r4v1t128 5.74 us against the rule's
    r2v1t128 8.11; mbv1_pw6 the rule's r4v1t128 3.51 against r8v1t128 3.93 in S19-4, whose
    kernel spills 488 B; more tall plans spill there at 70-80%), so those layers keep the
    even-row choice. bf16 (S19-1 and the 784-column sweep of S19-2, 12 pruned cases): doubled
    rows 1.04x the best (worst 1.11x, mbv1_pw3 at 95%: r32v1t64 1.96 us against r8v2t64 1.76),
    the tall rows on 64 threads 1.016x (worst 1.06x, the same case at r16v1t64 1.87)."""
    doubled = min(TALL_ACCUMULATORS // tall.vector_width, 2 * tall.rows_per_group)
    per_row = nnz / max(1, geometry.out_channels)
    per_thread = -(-geometry.columns // tall.vector_width)
    if (doubled * per_row * lanes(tall.vector_width, precision) > TALL_FMAS
            or per_thread <= UNEVEN_THREADS):
        return None
    rows = tall.rows_per_group if precision in WIDENED else doubled
    taller = fit_params(geometry, replace(tall, rows_per_group=rows, col_threads=UNEVEN_THREADS),
                        PRECISIONS[precision][0])
    if not grid_fits(geometry, taller) or throughput_shape(geometry, taller):
        return None
    return taller


def balanced_tiles(out_channels: int, per_thread: int, sm_count: int = H100_SMS
                   ) -> tuple[int, int] | None:
    """(rows per group, threads per tile) of a one-image direct convolution: of the plans whose
    blocks fit one wave (at most one block per SM), the fewest outputs per block (its rows, at
    most out_channels, x threads), then the widest tile, then the most rows; None if no plan
    fits one wave. Tiles of 96-224 threads often divide the columns better than 256 (H100,
    S11-7, fp32: rn50_c2_3x3 r16t96 3.53 us against the old default r4t256 5.10 and the tuned
    r16t128 3.57; rn50_c3_3x3 r4t224 4.45 against r4t256 4.78)."""
    best = None
    for threads in range(min(256, -(-per_thread // 32) * 32), 31, -32):
        tiles = -(-per_thread // threads)
        for rows in (32, 16, 8, 4, 2):
            if tiles * -(-out_channels // rows) > sm_count:
                continue
            key = (min(rows, out_channels) * threads, -threads, -rows)
            if best is None or key < best[0]:
                best = (key, rows, threads)
    return (best[1], best[2]) if best else None


def candidates(geometry: Geometry, nnz: int, precision: str = "fp32", limit: int = 16,
               seeds: tuple[PlanParams, ...] = ()) -> list[PlanParams]:
    """Plan parameters worth timing for one case: the rule default, then sweeps around it.

    Seeds and, for light 1x1 / GEMM layers, tall-group plans (tall_params, both grid orders, the
    other thread count, half the rows) come first; then a rows x k_split grid (the two knobs
    that trade parallelism for reuse), then vector width, column threads and a register cap.
    Each is fitted to the shape and deduplicated; layers whose code is large get fewer
    candidates (they dominate compile time). `seeds` (e.g. this layer's winners at other
    precisions) come right after the default, ahead of the sweeps.
    """
    dtype, accumulate = PRECISIONS[precision]
    rules = fit_params(geometry, rule_params(geometry, nnz, precision), dtype)
    base = fit_params(geometry, default_params(geometry, nnz, precision), dtype)
    found: list[PlanParams] = [base]

    def add(params: PlanParams) -> None:
        try:
            params = fit_params(geometry, params, dtype)
        except UserError:
            return
        if params.col_threads * params.k_split > MAX_THREADS or not grid_fits(geometry, params):
            return
        if code_units(nnz, params.vector_width, precision) > CODE_BUDGET:
            return
        shared = (params.k_split * params.rows_per_group * params.col_threads
                  * params.vector_width * ELEMENT_BYTES[accumulate])
        if params.k_split > 1 and shared > MAX_STATIC_SHARED:
            return
        if params not in found:
            found.append(params)

    for seed in seeds:
        if isinstance(seed, PlanParams):
            add(seed)
    if not geometry.linear and rules.vector_width == 2:   # pairs: the one-column rule plan too
        add(rule_params(geometry, nnz, precision, pairs=False))
    if throughput_shape(geometry, rules):          # throughput_layer, rules already fitted
        for params in throughput_params(geometry, rules, precision, nnz):
            add(params)
    elif not geometry.linear and geometry.batch >= 8:
        for params in batched_conv_params(geometry, rules, precision):
            add(params)
    tall = tall_params(geometry, nnz, precision, min_columns=1)
    if tall is not None:            # light 1x1 / GEMM layers: the tall groups, both grid orders
        other = "tiles" if tall.grid_order == "groups" else "groups"
        for params in (tall, replace(tall, grid_order=other),
                       replace(tall, col_threads=64 if tall.col_threads > 64 else 128),
                       replace(tall, rows_per_group=max(2, tall.rows_per_group // 2))):
            add(params)
    seeded = len(found)
    for rows in (2, 4, 8, 16):
        for k_split in (1, 2, 4, 8):
            add(replace(base, rows_per_group=rows, k_split=k_split))
    for width in (8, 4, 2, 1):
        add(replace(base, vector_width=width))
    for threads in (32, 64, 128, 256):
        add(replace(base, col_threads=threads))
    add(replace(base, max_registers=128))
    add(replace(base, balance="contiguous"))
    if code_units(nnz, base.vector_width, precision) > 100_000:
        limit = min(limit, 6)

    def distance(p: PlanParams) -> int:   # prefer candidates close to the default
        return sum(getattr(p, f) != getattr(base, f) for f in asdict(base))
    ordered = found[1:seeded] + sorted(found[seeded:], key=distance)
    return [base] + ordered[:limit - 1]


# Throughput plans (many column tiles: batch 8-32). Three floors, and the plan with the lowest
# largest one is the default (H100, docs/perf-notes.md, session 6):
#  * instruction fetch: each block fetches its group's code once for its tile at ~3.2 GB/s per
#    SM, and its warps share each fetched instruction, so the code fetched per column falls with
#    the threads per block (and with taller groups: one load feeds more rows);
#  * L2: every group loads its activations once per column (~8.5 TB/s measured: mbv1_pw4 at
#    batch 32, r8 and r4 groups: 469 MB in 55 us, 566 MB in 67 us);
#  * DRAM: input and output once, with row groups on blockIdx.x (a tile's groups run together
#    and share its activations through L2), else the input once per group when it passes a
#    quarter of L2 (mbv1_pw2 at batch 32, 51 MB, r32v2t256: 82.4 us with tiles on x, 41.6 us
#    with groups; mbv1_pw1, 26 MB, r16v4t512: 40.8 vs 30.3 us).
# Registers: ptxas keeps more loads in flight than a batch, so a plan spills unless its sums
# and one batch of loads take at most half of what a thread may have (mbv1_pw2 at batch 32:
# r16v2t512 no spill, r32v2t512 208 B and 1.5x slower, r16v4t512 900 B).
THROUGHPUT_THREADS = (512, 256, 128)
THROUGHPUT_ROWS = (32, 16, 8, 4)
FETCH_BYTES_PER_US = 3200          # per SM
L2_BYTES_PER_US = 8.5e6
DRAM_BYTES_PER_US = 3.0e6
L2_BYTES = 50 << 20


# Direct convolutions at batch 8 and up: more column threads and taller groups than the latency
# rules give (a block's code is fetched once for more columns; a load feeds more rows), in both
# grid orders. Their floors are not modelled: a tap's neighbours load the same pixels, so L1
# serves much of what throughput_time charges to L2 (it predicts 47 us for rn50_c2_3x3 at batch 8,
# measured 17.6 us); the tuner measures them.
BATCHED_CONV_THREADS = (512, 256)
BATCHED_CONV_ROWS = (32, 16, 8, 4)


def batched_conv_params(geometry: Geometry, base: PlanParams, precision: str,
                        sm_count: int = H100_SMS) -> list[PlanParams]:
    """Candidates of a direct convolution at batch 8 and up (see above): threads x rows whose sums
    and one load batch fit the register rule (fits_registers), each group-major then tile-major.
    First those with about a wave of blocks (7/8 of the SMs) or more, then taller groups, then
    more threads."""
    dtype = PRECISIONS[precision][0]
    fill = sm_count - sm_count // 8
    scored = []
    for threads in BATCHED_CONV_THREADS:
        for rows in BATCHED_CONV_ROWS:
            if not fits_registers(threads, rows, base.vector_width, base.load_batch, precision):
                continue
            params = fit_params(geometry, replace(base, col_threads=threads, rows_per_group=rows,
                                                  k_split=1, grid_order="groups"), dtype)
            tiles = -(-geometry.columns // (params.vector_width * params.col_threads))
            blocks = tiles * -(-geometry.out_channels // params.rows_per_group)
            scored.append(((-min(blocks, fill), -params.rows_per_group, -params.col_threads),
                           params, tiles))
    out: list[PlanParams] = []
    for _, params, tiles in sorted(scored, key=lambda item: item[0]):
        # tiles on blockIdx.y ("groups") only while they fit its limit
        for order in ("groups", "tiles") if tiles <= MAX_GRID_Y else ("tiles",):
            twin = replace(params, grid_order=order)
            if twin not in out:
                out.append(twin)
    return out


def fits_registers(threads: int, rows: int, width: int, load_batch: int,
                   precision: str = "fp32") -> bool:
    """A row's sums for every group row (half2 sums: a register per column pair) and one batch
    of loads (4-byte registers) within half a thread's registers."""
    dtype = PRECISIONS[precision][0]
    loads = load_batch * -(-width * ELEMENT_BYTES[dtype] // 4)
    return rows * lanes(width, precision) + loads <= min(255, 65536 // threads) // 2


def throughput_shape(geometry: Geometry, params: PlanParams, sm_count: int = H100_SMS) -> bool:
    """1x1 convolutions at batch 8 and up, and 1x1 or GEMM layers whose `params` take four waves
    of blocks or more (a GEMM's batch is folded into its columns, so only the second test sees
    it): then the activations' reuse across row groups and the code fetched per column, not the
    launch, set the time."""
    if not geometry.linear:          # 3x3 and strided layers: not measured at batch 32 yet
        return False
    per_thread = -(-geometry.columns // params.vector_width)
    tiles = -(-per_thread // params.col_threads)
    return (geometry.batch >= 8
            or tiles * -(-geometry.out_channels // params.rows_per_group) >= 4 * sm_count)


def throughput_time(geometry: Geometry, params: PlanParams, nnz: int, precision: str) -> float:
    """Predicted microseconds of a throughput plan: its largest floor (see above), loads
    estimated for uniform rows."""
    element = ELEMENT_BYTES[PRECISIONS[precision][0]]
    density = nnz / max(1, geometry.out_channels * geometry.taps)
    per_thread = -(-geometry.columns // params.vector_width)
    tiles = -(-per_thread // params.col_threads)
    groups = -(-geometry.out_channels // params.rows_per_group)
    loads = groups * geometry.taps * (1 - (1 - density) ** params.rows_per_group)
    code = (loads + lanes(params.vector_width, precision) * nnz) * INSTRUCTION_BYTES
    fetch = -(-tiles * groups // H100_SMS) * code / groups / FETCH_BYTES_PER_US
    l2 = loads * tiles * params.col_threads * params.vector_width * element / L2_BYTES_PER_US
    x_bytes = geometry.input_elems * element
    reads = 1 if params.grid_order == "groups" or 4 * x_bytes <= L2_BYTES else groups
    dram = (geometry.output_elems * element + reads * x_bytes) / DRAM_BYTES_PER_US
    return max(fetch, l2, dram)


def throughput_params(geometry: Geometry, base: PlanParams, precision: str, nnz: int,
                      count: int = 8) -> list[PlanParams]:
    """The `count` plans of least predicted time (throughput_time; ties: wider vectors, more
    threads) with row groups on blockIdx.x (tiles on x where the tiles would pass the grid's
    y limit), then the best one with tiles on blockIdx.x. Vectors of 8 (2-byte types), 4 or 2
    columns, unless their code would pass WIDE_CODE and `base`'s (compile time): then `base`'s
    width."""
    dtype = PRECISIONS[precision][0]
    limit = max(WIDE_CODE, code_units(nnz, base.vector_width, precision))
    widths = [w for w in (8, 4, 2) if w <= max_vector_width(dtype)
              and code_units(nnz, w, precision) <= limit] or [base.vector_width]
    scored = []
    for threads in THROUGHPUT_THREADS:
        for rows in THROUGHPUT_ROWS:
            for width in widths:
                if not fits_registers(threads, rows, width, base.load_batch, precision):
                    continue
                params = fit_params(geometry, replace(
                    base, col_threads=threads, rows_per_group=rows, vector_width=width,
                    k_split=1, grid_order="groups"), dtype)
                tiles = -(-geometry.columns // (params.vector_width * params.col_threads))
                if tiles > MAX_GRID_Y:          # tiles on blockIdx.y: over its limit
                    params = replace(params, grid_order="tiles")
                scored.append((throughput_time(geometry, params, nnz, precision),
                               -params.vector_width, -params.col_threads, params.name(), params))
    out: list[PlanParams] = []
    for *_, params in sorted(scored):
        if params not in out:
            out.append(params)
    out = out[:count]
    if out and replace(out[0], grid_order="tiles") not in out:
        out.append(replace(out[0], grid_order="tiles"))
    return out


def _features(geometry: Geometry, params: PlanParams, precision: str, groups: int, loads: int,
              nnz: int, rows: int, group_instr: np.ndarray) -> dict[str, float]:
    """Cost features from the counts a plan (or an estimate) gives; see costmodel.FEATURES."""
    dtype = PRECISIONS[precision][0]
    per_thread = -(-geometry.columns // params.vector_width)
    tiles = -(-per_thread // params.col_threads)
    code = float(group_instr.sum()) * INSTRUCTION_BYTES
    element = ELEMENT_BYTES[dtype]
    columns = tiles * params.col_threads * params.vector_width    # every lane loads, idle or not
    extra = ({"throughput_us": throughput_time(geometry, params, nnz, precision)}
             if throughput_layer(geometry, nnz, precision) else {})
    return {**extra, "launches": 1.0, "blocks": float(tiles * groups),
            "threads_per_block": float(params.col_threads * params.k_split),
            "code_bytes": code, "fetched_code_bytes": code * tiles,
            "max_block_code_bytes": float(group_instr.max(initial=0)) * INSTRUCTION_BYTES,
            "code_sharers": float(tiles),            # blocks that run each group's code
            "flops": 2.0 * nnz * geometry.columns,
            "dram_bytes": float(element * (geometry.input_elems + geometry.output_elems)),
            "l2_bytes": float(loads * columns * element),
            "serial_instructions": float(group_instr.max(initial=0)) / params.k_split,
            "loads": float(loads), "rows": float(rows)}


def _slices(params: PlanParams) -> int:
    return SLICE_INSTRUCTIONS * params.k_split if params.k_split > 1 else 0


def _pair_loads(taps: np.ndarray) -> tuple[int, int]:
    """(pair loads, shifts) of one group's distinct 3x3 taps with pair windows: per (c, r) the
    centre pair, plus a pair and a shift for each of s = 0 and s = 2 it uses."""
    edges = int(np.count_nonzero(taps % 3 != 1))
    return len(np.unique(taps // 3)) + edges, edges


def features(plan: Plan) -> dict[str, float]:
    """Exact cost features of a built plan. With pair windows a group's loads are its pairs and
    each shift costs what a load does (a PRMT, and the same widening)."""
    width = lanes(plan.vector_width, plan.precision)
    per_load = load_instructions(plan.vector_width, plan.precision)
    windowed = takes_pairs(plan.geometry, plan.vector_width, plan.dtype)
    counts = []
    for g in plan.groups:
        taps = np.unique(np.fromiter((ld.tap for sl in g.slices for ld in sl), dtype=np.int64))
        counts.append(_pair_loads(taps) if windowed else (len(taps), 0))
    instr = np.array([per_load * (loads + shifts)
                      + width * (g.nnz + STORE_INSTRUCTIONS * len(g.rows))
                      for g, (loads, shifts) in zip(plan.groups, counts)],
                     dtype=np.float64) + _slices(plan.params)
    return _features(plan.geometry, plan.params, plan.precision, len(plan.groups),
                     sum(c[0] for c in counts), plan.nnz, plan.geometry.out_channels, instr)


def estimate(geometry: Geometry, csr, params: PlanParams, precision: str) -> dict[str, float]:
    """features() of the plan these parameters would give, without building it: the planner's
    own row assignment and the distinct taps per group (one load each, or pair windows' pairs
    and shifts) from the CSR indices. Equal to features(plan) (tests/test_costmodel.py),
    ~100x cheaper for large layers."""
    params = fit_params(geometry, params, PRECISIONS[precision][0])
    sizes, loads, nnz, pairs, shifts = _grouping(csr, params.rows_per_group, params.balance)
    if takes_pairs(geometry, params.vector_width, PRECISIONS[precision][0]):
        loads, extra = pairs, shifts
    else:
        extra = 0
    instr = (load_instructions(params.vector_width, precision) * (loads + extra)
             + lanes(params.vector_width, precision) * (nnz + STORE_INSTRUCTIONS * sizes))
    return _features(geometry, params, precision, len(sizes), int(loads.sum()), int(csr.nnz),
                     csr.shape[0], instr.astype(np.float64) + _slices(params))


_GROUPINGS: dict[tuple, tuple] = {}      # the last few weights' groupings: candidates share them


def _grouping(csr, rows_per_group: int, balance: str):
    """(rows, distinct taps, nonzeros, pair-window pairs, pair-window shifts) per row group, as
    build_plan groups the rows (the last two count taps as 3x3 ones: _pair_loads)."""
    digest = hashlib.sha1(csr.indptr.tobytes() + csr.indices.tobytes()).hexdigest()
    key = (digest, csr.shape, rows_per_group, balance)
    if key not in _GROUPINGS:
        row_nnz = np.diff(csr.indptr)
        groups = _assign_rows(row_nnz, rows_per_group, balance)
        group_of = np.empty(len(row_nnz), dtype=np.int64)
        sizes = np.zeros(len(groups), dtype=np.int64)
        for g, rows in enumerate(groups):
            group_of[rows] = g
            sizes[g] = len(rows)
        taps = int(csr.shape[1])
        keys = np.unique(np.repeat(group_of, row_nnz) * taps + csr.indices.astype(np.int64))
        group = keys // taps
        loads = np.bincount(group, minlength=len(groups))
        nnz = np.bincount(group_of, weights=row_nnz, minlength=len(groups))
        edges = np.bincount(group, weights=(keys % taps) % 3 != 1, minlength=len(groups))
        units = np.bincount(np.unique(group * taps + (keys % taps) // 3) // taps,
                            minlength=len(groups))
        if len(_GROUPINGS) >= 16:
            _GROUPINGS.pop(next(iter(_GROUPINGS)))
        _GROUPINGS[key] = (sizes, loads, nnz, units + edges.astype(np.int64),
                           edges.astype(np.int64))
    return _GROUPINGS[key]
