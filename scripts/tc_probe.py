"""A tensor-core probe for fp16 GEMM-view layers ("load as sparse, compute as dense"): is an
mma.sync kernel that decompresses each block's weight tile into shared memory faster than
cuBLAS fp16 and than sparsert's CUDA-core kernels on the paper20 GEMM views at batch 1?

Kernel (one per layer and tile shape): block = WM x WN warps; warp (wm, wn) computes MT 16-row
tiles x NT 8-column tiles of the output with mma.sync.m16n8k16 (fp16 in, fp32 sums). Per stage
of BK = 16 * KT input channels the block scatters its weight tile's nonzeros (u32 words: tile
position << 16 | fp16 bits, laid out per (row block, stage) at plan time) into a zeroed shared
tile (three buffers: each is re-zeroed entry by entry two stages later, one barrier a stage),
stages X[k0:k0 + BK, n0:n0 + BN] (two buffers), then ldmatrix + mma. Version 1 reads a start
table per stage; version 2 (the default) pads each (row block, stage) cell to E words per
thread, keeps the positions in registers and prefetches the next stage into registers.
Every kernel is verified on the GPU against float64 (fp16 tolerance, poisoned output) before it
is timed; sparsert's own kernel and the baselines (cuBLAS fp16) are timed in the same process.
Results and the floor arithmetic: docs/perf-notes.md, session 14.

  python scripts/tc_probe.py --out FILE [--config configs/paper20-fp16.yaml] [--sparsity 0.9]
         [--problems a,b] [--version 1|2] [--limit N] [--compile-only]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from concurrent.futures import ProcessPoolExecutor
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

APAD, BPAD = 8, 8           # halves of padding per shared row: ldmatrix rows on distinct banks

# the stage's MMAs, as every version prints them (see _mma_stage)
_STAGE = """\
#pragma unroll
    for (int q = 0; q < KT; ++q) {
      unsigned a[MT][4], b[NT][2];
#pragma unroll
      for (int t = 0; t < MT; ++t) {
        const unsigned short* p = A + (wm * MT * 16 + t * 16 + (lane & 15)) * LDA + q * 16
                                  + (lane >> 4) * 8;
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(a[t][0]), "=r"(a[t][1]), "=r"(a[t][2]), "=r"(a[t][3])
                     : "r"(smem(p)));
      }
#pragma unroll
      for (int t = 0; t < NT; t += 2) {
        const unsigned short* p = B + (q * 16 + (lane & 15)) * LDB + wn * NT * 8 + t * 8
                                  + (lane >> 4) * 8;
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(b[t][0]), "=r"(b[t][1]), "=r"(b[t + 1][0]), "=r"(b[t + 1][1])
                     : "r"(smem(p)));
      }
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
          asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                       "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                       : "+f"(acc[i][j][0]), "+f"(acc[i][j][1]), "+f"(acc[i][j][2]),
                         "+f"(acc[i][j][3])
                       : "r"(a[i][0]), "r"(a[i][1]), "r"(a[i][2]), "r"(a[i][3]),
                         "r"(b[j][0]), "r"(b[j][1]));
    }
"""


# versions 2 and 3: the three weight buffers zeroed (padding slots too), the sums zeroed, and
# this thread's first entry word of the block's row of cells
_ZERO = """\
  for (int i = tid; i < 3 * (BM * LDA + 8) / 8; i += T)
    reinterpret_cast<uint4*>(&As[0][0])[i] = make_uint4(0, 0, 0, 0);
  float acc[MT][NT][4];
#pragma unroll
  for (int a = 0; a < MT; ++a)
#pragma unroll
    for (int b = 0; b < NT; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;
  const unsigned* eb = ent + (size_t)blockIdx.x * S * E * T + tid;
"""


def _mma_stage(col: str = "j") -> str:
    """The stage's MMAs (every version): per k-step of 16, ldmatrix of the warp's MT weight
    tiles from A and NT activation tiles (transposed) from B, then MT x NT mma.sync into acc;
    `col`, the name of the column-tile loop variable."""
    return _STAGE.replace("[j]", f"[{col}]").replace("int j ", f"int {col} ").replace(
        "j < NT; ++j", f"{col} < NT; ++{col}")


def pack(csr: sp.csr_matrix, bm: int, bk: int) -> tuple[np.ndarray, np.ndarray]:
    """(entries u32, start int32[(row blocks) * stages + 1]): the nonzeros of row block b and
    stage s are entries[start[b * S + s]:start[b * S + s + 1]], each (r * (bk + APAD) + c) << 16
    | fp16 bits, (r, c) the position inside the bm x bk tile."""
    m, k = csr.shape
    coo = csr.tocoo()
    rows, cols = coo.row.astype(np.int64), coo.col.astype(np.int64)
    bits = coo.data.astype(np.float16).view(np.uint16).astype(np.uint32)
    stages = -(-k // bk)
    cell = (rows // bm) * stages + cols // bk
    pos = (rows % bm) * (bk + APAD) + cols % bk
    order = np.lexsort((pos, cell))
    words = (pos[order].astype(np.uint32) << 16) | bits[order]
    blocks = -(-m // bm)
    start = np.searchsorted(cell[order], np.arange(blocks * stages + 1)).astype(np.int32)
    return words.astype(np.uint32), start


def source(m: int, k: int, n: int, wm: int, wn: int, mt: int, nt: int, kt: int,
           entry: str = "tc_probe") -> str:
    bm, bn, bk = wm * mt * 16, wn * nt * 8, kt * 16
    lda, ldb = bk + APAD, bn + BPAD
    threads = wm * wn * 32
    stages = -(-k // bk)
    vec = 8 if n % 8 == 0 else 2 if n % 2 == 0 else 1
    assert nt % 2 == 0 and (bk * bn) % vec == 0
    lines = f"""
#define M {m}
#define K {k}
#define N {n}
#define BM {bm}
#define BN {bn}
#define BK {bk}
#define LDA {lda}
#define LDB {ldb}
#define T {threads}
#define S {stages}
#define WM {wm}
#define MT {mt}
#define NT {nt}
#define KT {kt}
__device__ __forceinline__ unsigned smem(const void* p) {{
  return (unsigned)__cvta_generic_to_shared(p); }}
extern "C" __global__ void __launch_bounds__(T) {entry}(
    const unsigned short* __restrict__ x, unsigned short* __restrict__ y,
    const unsigned* __restrict__ ent, const int* __restrict__ start) {{
  __shared__ __align__(16) unsigned short As[3][BM * LDA];
  __shared__ __align__(16) unsigned short Bs[2][BK * LDB];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % WM, wn = warp / WM;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  for (int i = tid; i < 3 * BM * LDA / 8; i += T)
    reinterpret_cast<uint4*>(&As[0][0])[i] = make_uint4(0, 0, 0, 0);
  float acc[MT][NT][4];
#pragma unroll
  for (int a = 0; a < MT; ++a)
#pragma unroll
    for (int b = 0; b < NT; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;
  const int* st = start + blockIdx.x * S;
  __syncthreads();
  for (int s = 0; s < S; ++s) {{
    unsigned short* A = As[s % 3];
    unsigned short* B = Bs[s & 1];
    const int e0 = __ldg(st + s), e1 = __ldg(st + s + 1);
    for (int e = e0 + tid; e < e1; e += T) {{
      const unsigned v = __ldg(ent + e);
      A[v >> 16] = (unsigned short)v;
    }}
    if (s >= 2) {{
      unsigned short* Z = As[(s - 2) % 3];
      const int z0 = __ldg(st + s - 2), z1 = __ldg(st + s - 1);
      for (int e = z0 + tid; e < z1; e += T) Z[__ldg(ent + e) >> 16] = 0;
    }}
    const int k0 = s * BK;
"""
    if vec == 8:
        lines += """
    for (int i = tid; i < BK * BN / 8; i += T) {
      const int r = i / (BN / 8), c = (i % (BN / 8)) * 8, kk = k0 + r, nn = n0 + c;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (kk < K && nn < N) v = __ldg(reinterpret_cast<const uint4*>(x + kk * N + nn));
      *reinterpret_cast<uint4*>(B + r * LDB + c) = v;
    }
"""
    else:
        lines += """
    for (int i = tid; i < BK * BN; i += T) {
      const int r = i / BN, c = i % BN, kk = k0 + r, nn = n0 + c;
      B[r * LDB + c] = (kk < K && nn < N) ? __ldg(x + kk * N + nn) : (unsigned short)0;
    }
"""
    lines += """
    __syncthreads();
""" + _mma_stage() + """  }
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + wm * MT * 16 + i * 16 + (lane >> 2) + h * 8;
        const int col = n0 + (warp / WM) * NT * 8 + j * 8 + (lane & 3) * 2;
        if (row < M) {
          unsigned short lo, hi;
          asm("cvt.rn.f16.f32 %0, %1;" : "=h"(lo) : "f"(acc[i][j][2 * h]));
          asm("cvt.rn.f16.f32 %0, %1;" : "=h"(hi) : "f"(acc[i][j][2 * h + 1]));
          if (col < N) y[row * N + col] = lo;
          if (col + 1 < N) y[row * N + col + 1] = hi;
        }
      }
}
"""
    return lines


def pack2(csr: sp.csr_matrix, bm: int, bk: int, threads: int) -> tuple[np.ndarray, int]:
    """Version 2's table: (row block b, stage s) owns E * T words at ((b * S + s) * E + i) * T
    + t (thread t's i-th entry), E = the most entries any (b, s) has over T, rounded up; the
    padding words point at the scratch slot bm * (bk + APAD) with value 0."""
    m, k = csr.shape
    words, start = pack(csr, bm, bk)
    counts = np.diff(start.astype(np.int64))
    e = max(1, int(-(-counts.max(initial=0) // threads)))
    cells = len(counts)
    out = np.full((cells, e * threads), np.uint32(bm * (bk + APAD)) << np.uint32(16), np.uint32)
    for cell in range(cells):
        c = int(counts[cell])
        if c:
            out[cell, :c] = words[start[cell]:start[cell] + c]
    # slot j of a cell is thread j % T's entry j // T: the order the kernel reads
    return out.ravel(), e


def source2(m: int, k: int, n: int, wm: int, wn: int, mt: int, nt: int, kt: int, e: int,
            entry: str = "tc_probe") -> str:
    """Version 2: the next stage's entries and activation tile are loaded into registers before
    this stage's MMAs (one stage of prefetch), entry positions kept in registers for the
    re-zeroing, no start table (padded cells), half2 stores."""
    bm, bn, bk = wm * mt * 16, wn * nt * 8, kt * 16
    lda, ldb = bk + APAD, bn + BPAD
    threads = wm * wn * 32
    stages = -(-k // bk)
    vec = 8 if n % 8 == 0 else 4 if n % 4 == 0 else 2 if n % 2 == 0 else 1
    per = bk * bn // vec
    bv = -(-per // threads)
    assert nt % 2 == 0
    vt = {8: "uint4", 4: "uint2", 2: "unsigned", 1: "unsigned short"}[vec]
    zero = {8: "make_uint4(0, 0, 0, 0)", 4: "make_uint2(0, 0)", 2: "0u",
            1: "(unsigned short)0"}[vec]
    text = f"""
#define M {m}
#define K {k}
#define N {n}
#define BM {bm}
#define BN {bn}
#define BK {bk}
#define LDA {lda}
#define LDB {ldb}
#define T {threads}
#define S {stages}
#define WM {wm}
#define MT {mt}
#define NT {nt}
#define KT {kt}
#define E {e}
#define VEC {vec}
#define BV {bv}
#define PER {per}
__device__ __forceinline__ unsigned smem(const void* p) {{
  return (unsigned)__cvta_generic_to_shared(p); }}
__device__ __forceinline__ void load_b(const unsigned short* __restrict__ x, int k0, int n0,
                                       int tid, {vt} (&r)[BV]) {{
#pragma unroll
  for (int i = 0; i < BV; ++i) {{
    const int j = tid + i * T;
    const int row = j / (BN / VEC), c = (j % (BN / VEC)) * VEC, kk = k0 + row, nn = n0 + c;
    r[i] = {zero};
    if ((PER % T == 0 || j < PER) && kk < K && nn < N)
      r[i] = __ldg(reinterpret_cast<const {vt}*>(x + kk * N + nn));
  }}
}}
extern "C" __global__ void __launch_bounds__(T) {entry}(
    const unsigned short* __restrict__ x, unsigned short* __restrict__ y,
    const unsigned* __restrict__ ent) {{
  __shared__ __align__(16) unsigned short As[3][BM * LDA + 8];
  __shared__ __align__(16) unsigned short Bs[2][BK * LDB];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % WM, wn = warp / WM;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
{_ZERO}  unsigned cur[E];
  unsigned short p1[E], p2[E];
  {vt} br[BV];
#pragma unroll
  for (int i = 0; i < E; ++i) {{ cur[i] = __ldg(eb + i * T); p1[i] = p2[i] = BM * LDA; }}
  load_b(x, 0, n0, tid, br);
  __syncthreads();
  for (int s = 0; s < S; ++s) {{
    unsigned short* A = &As[s % 3][0];
    unsigned short* B = &Bs[s & 1][0];
    unsigned short* Z = &As[(s + 1) % 3][0];    // stage s - 2's buffer
#pragma unroll
    for (int i = 0; i < E; ++i) {{
      A[cur[i] >> 16] = (unsigned short)cur[i];
      Z[p2[i]] = 0;
      p2[i] = p1[i];
      p1[i] = (unsigned short)(cur[i] >> 16);
    }}
#pragma unroll
    for (int i = 0; i < BV; ++i) {{
      const int j = tid + i * T;
      if (PER % T == 0 || j < PER)
        *reinterpret_cast<{vt}*>(B + (j / (BN / VEC)) * LDB + (j % (BN / VEC)) * VEC) = br[i];
    }}
    if (s + 1 < S) {{
#pragma unroll
      for (int i = 0; i < E; ++i) cur[i] = __ldg(eb + ((s + 1) * E + i) * T);
      load_b(x, (s + 1) * BK, n0, tid, br);
    }}
    __syncthreads();
{_mma_stage()}  }}
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {{
        const int row = m0 + wm * MT * 16 + i * 16 + (lane >> 2) + h * 8;
        const int col = n0 + wn * NT * 8 + j * 8 + (lane & 3) * 2;
        unsigned short lo, hi;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(lo) : "f"(acc[i][j][2 * h]));
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(hi) : "f"(acc[i][j][2 * h + 1]));
        if (row < M) {{
          if (N % 2 == 0 && col + 1 < N)
            *reinterpret_cast<unsigned*>(y + row * N + col) = (unsigned)lo | ((unsigned)hi << 16);
          else {{
            if (col < N) y[row * N + col] = lo;
            if (col + 1 < N) y[row * N + col + 1] = hi;
          }}
        }}
      }}
}}
"""
    return text


def source3(m: int, k: int, n: int, wm: int, wn: int, mt: int, nt: int, kt: int, e: int,
            depth: int, ks: int, entry: str = "tc_probe") -> str:
    """Version 3: `depth` stages in flight through cp.async (the activation tile and the entry
    words, each thread copying its own words), two barriers a stage, and `ks` K-slices on
    blockIdx.z: each slice writes its fp32 partial tile to `work`, and the block that finishes
    a tile last (a counter per tile, reset by that block) adds the slices in order and stores
    fp16. Needs N % 8 == 0 (16-byte activation copies)."""
    bm, bn, bk = wm * mt * 16, wn * nt * 8, kt * 16
    lda, ldb = bk + APAD, bn + BPAD
    threads = wm * wn * 32
    stages = -(-k // bk)
    assert n % 8 == 0 and nt % 2 == 0 and depth >= 2 and 1 <= ks <= stages
    chunks = bk * bn // 8
    text = f"""
#define M {m}
#define K {k}
#define N {n}
#define BM {bm}
#define BN {bn}
#define BK {bk}
#define LDA {lda}
#define LDB {ldb}
#define T {threads}
#define S {stages}
#define WM {wm}
#define MT {mt}
#define NT {nt}
#define KT {kt}
#define E {e}
#define P {depth}
#define KS {ks}
#define SPS ((S + KS - 1) / KS)
#define CH {chunks}
__device__ __forceinline__ unsigned smem(const void* p) {{
  return (unsigned)__cvta_generic_to_shared(p); }}
__device__ __forceinline__ void issue(const unsigned short* __restrict__ x,
    const unsigned* __restrict__ eb, int s, int n0, int tid, unsigned short* B, unsigned* W) {{
#pragma unroll
  for (int i = 0; i < E; ++i)
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;"
                 :: "r"(smem(W + i * T + tid)), "l"(eb + ((size_t)s * E + i) * T));
  const int k0 = s * BK;
#pragma unroll
  for (int i = 0; i < (CH + T - 1) / T; ++i) {{
    const int j = tid + i * T;
    if (CH % T == 0 || j < CH) {{
      const int r = j / (BN / 8), c = (j % (BN / 8)) * 8, kk = k0 + r, nn = n0 + c;
      const bool in = kk < K && nn < N;
      const unsigned short* src = in ? x + (size_t)kk * N + nn : x;
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                   :: "r"(smem(B + r * LDB + c)), "l"(src), "r"(in ? 16 : 0));
    }}
  }}
}}
extern "C" __global__ void __launch_bounds__(T) {entry}(
    const unsigned short* __restrict__ x, unsigned short* __restrict__ y,
    const unsigned* __restrict__ ent, float* __restrict__ work, unsigned* __restrict__ counters) {{
  __shared__ __align__(16) unsigned short As[3][BM * LDA + 8];
  __shared__ __align__(16) unsigned short Bs[P][BK * LDB];
  __shared__ __align__(16) unsigned Es[P][E * T];
  __shared__ int last;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % WM, wn = warp / WM;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const int s0 = blockIdx.z * SPS, ns = min(S, s0 + SPS) - s0;
{_ZERO}  unsigned short p1[E], p2[E];
#pragma unroll
  for (int i = 0; i < E; ++i) p1[i] = p2[i] = BM * LDA;
#pragma unroll
  for (int j = 0; j < P - 1; ++j) {{
    if (j < ns) issue(x, eb, s0 + j, n0, tid, Bs[j], Es[j]);
    asm volatile("cp.async.commit_group;");
  }}
  __syncthreads();      // the zeroed A buffers
  for (int j = 0; j < ns; ++j) {{
    asm volatile("cp.async.wait_group %0;" :: "n"(P - 2));
    unsigned short* A = &As[j % 3][0];
    unsigned short* Z = &As[(j + 1) % 3][0];      // stage j - 2's buffer
    const unsigned* W = Es[j % P];
#pragma unroll
    for (int i = 0; i < E; ++i) {{
      const unsigned v = W[i * T + tid];
      A[v >> 16] = (unsigned short)v;
      Z[p2[i]] = 0;
      p2[i] = p1[i];
      p1[i] = (unsigned short)(v >> 16);
    }}
    __syncthreads();
    if (j + P - 1 < ns) issue(x, eb, s0 + j + P - 1, n0, tid, Bs[(j + P - 1) % P],
                              Es[(j + P - 1) % P]);
    asm volatile("cp.async.commit_group;");
    const unsigned short* B = Bs[j % P];
{_mma_stage('jj')}  }}
  asm volatile("cp.async.wait_group 0;");
  if (KS > 1) {{
    float* part = work + (size_t)blockIdx.z * M * N;
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int jj = 0; jj < NT; ++jj)
#pragma unroll
        for (int h = 0; h < 2; ++h) {{
          const int row = m0 + wm * MT * 16 + i * 16 + (lane >> 2) + h * 8;
          const int col = n0 + wn * NT * 8 + jj * 8 + (lane & 3) * 2;
          if (row < M && col < N)
            __stcg(reinterpret_cast<float2*>(part + (size_t)row * N + col),
                   make_float2(acc[i][jj][2 * h], acc[i][jj][2 * h + 1]));
        }}
    __threadfence();
    __syncthreads();
    if (tid == 0) {{
      const unsigned tile = blockIdx.y * gridDim.x + blockIdx.x;
      last = atomicAdd(counters + tile, 1u) == KS - 1;
      if (last) counters[tile] = 0;
    }}
    __syncthreads();
    if (!last) return;
    __threadfence();
  }}
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int jj = 0; jj < NT; ++jj)
#pragma unroll
      for (int h = 0; h < 2; ++h) {{
        const int row = m0 + wm * MT * 16 + i * 16 + (lane >> 2) + h * 8;
        const int col = n0 + wn * NT * 8 + jj * 8 + (lane & 3) * 2;
        if (row >= M || col >= N) continue;
        float lo = acc[i][jj][2 * h], hi = acc[i][jj][2 * h + 1];
        if (KS > 1) {{
          lo = hi = 0.f;
#pragma unroll
          for (int z = 0; z < KS; ++z) {{
            const float2 v = __ldcg(reinterpret_cast<const float2*>(
                work + (size_t)z * M * N + (size_t)row * N + col));
            lo += v.x;
            hi += v.y;
          }}
        }}
        unsigned short a, b;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(a) : "f"(lo));
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(hi));
        *reinterpret_cast<unsigned*>(y + (size_t)row * N + col) = (unsigned)a | ((unsigned)b << 16);
      }}
}}
"""
    return text


def shared3(wm: int, wn: int, mt: int, nt: int, kt: int, e: int, depth: int) -> int:
    bm, bn, bk, threads = wm * mt * 16, wn * nt * 8, kt * 16, wm * wn * 32
    return 2 * 3 * (bm * (bk + APAD) + 8) + depth * (2 * bk * (bn + BPAD) + 4 * e * threads) + 4


def tiles(m: int, k: int, n: int) -> list[tuple[int, int, int, int, int]]:
    """(wm, wn, mt, nt, kt) candidates whose shared memory fits 48 KiB."""
    out = []
    for wm, wn, mt, nt, kt in itertools.product((1, 2, 4), (1, 2), (1, 2), (2, 4, 8), (2, 4, 8)):
        bm, bn, bk = wm * mt * 16, wn * nt * 8, kt * 16
        smem = 2 * (3 * (bm * (bk + APAD) + 8) + 2 * bk * (bn + BPAD))
        if smem > 48 * 1024 or bn > -(-n // 8) * 8 * 2 or bm > -(-m // 16) * 16:
            continue
        out.append((wm, wn, mt, nt, kt))
    return out


def candidates(csr, m: int, k: int, n: int, version: int):
    """(shapes, tables, sources) of one layer: version 1 and 2, every tile of tiles(); version
    3 (N % 8 == 0 only), every tile x pipeline depth 3 or 4 x K-slices 1, 2 or 4 (no more
    than the stages) whose shared memory fits 48 KiB; a shape is (wm, wn, mt, nt, kt) and for
    version 3 also (depth, K-slices)."""
    shapes, packs, texts = [], [], []
    for sh in tiles(m, k, n):
        bm, bk, threads = sh[0] * sh[2] * 16, sh[4] * 16, sh[0] * sh[1] * 32
        if version == 1:
            shapes.append(sh)
            packs.append(pack(csr, bm, bk))
            texts.append(source(m, k, n, *sh))
            continue
        pk = pack2(csr, bm, bk, threads)
        if version == 2:
            shapes.append(sh)
            packs.append(pk)
            texts.append(source2(m, k, n, *sh, pk[1]))
            continue
        if n % 8:
            continue
        for depth, ks in itertools.product((3, 4), (1, 2, 4)):
            if ks > -(-k // bk) or shared3(*sh, pk[1], depth) > 48 * 1024:
                continue
            shapes.append((*sh, depth, ks))
            packs.append(pk)
            texts.append(source3(m, k, n, *sh, pk[1], depth, ks))
    return shapes, packs, texts


def reference(csr, x: np.ndarray) -> np.ndarray:
    w = csr.toarray().astype(np.float16).astype(np.float64)
    return w @ x.astype(np.float64)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", default="configs/paper20-fp16.yaml")
    parser.add_argument("--sparsity", type=float, action="append")
    parser.add_argument("--problems", default="")
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--limit", type=int, default=0, help="tile shapes per layer (0: all)")
    parser.add_argument("--version", type=int, default=3, choices=(1, 2, 3))
    parser.add_argument("--only", default="", help="one shape, e.g. 1,2,2,2,4,4,1 (for ncu)")
    parser.add_argument("--no-baselines", action="store_true",
                        help="time only the tensor-core kernels (for ncu)")
    args = parser.parse_args()

    import sparsert_cli as sparsert
    from sparsert_cli.compile import cpp_to_cubin
    from sparsert_cli.config import load_config
    from sparsert_cli.patterns import dense

    started = time.perf_counter()
    wanted = set(filter(None, args.problems.split(",")))
    layers = [layer for layer in sparsert.config_layers(load_config(args.config))
              if layer.geometry.linear and layer.geometry.batch == 1
              and (not args.sparsity or layer.info["sparsity"] in args.sparsity)
              and (not wanted or layer.info["problem"] in wanted)]
    doc = {"kind": "tc-probe", "cases": []}
    out = Path(args.out)
    gpu = None if args.compile_only else sparsert.Gpu()
    try:
        for index, layer in enumerate(layers):
            g = layer.geometry
            m, k, n = g.out_channels, g.in_channels, g.columns
            csr = sp.csr_matrix(dense(layer.weight).reshape(m, k).astype(np.float32))
            case = {"label": layer.label, "m": m, "k": k, "n": n, "nnz": int(csr.nnz),
                    "runs": []}
            shapes, packs, texts = candidates(csr, m, k, n, args.version)
            if args.only:
                want = tuple(int(v) for v in args.only.split(","))
                keep = [i for i, sh in enumerate(shapes) if tuple(sh) == want]
                shapes, packs, texts = ([v[i] for i in keep] for v in (shapes, packs, texts))
            if args.limit:
                shapes, packs, texts = shapes[:args.limit], packs[:args.limit], texts[:args.limit]
            built = []
            with ProcessPoolExecutor(os.cpu_count()) as pool:
                compiled_all = list(pool.map(cpp_to_cubin, texts))
            for shape, compiled in zip(shapes, compiled_all):
                res = compiled.entry_resources("tc_probe")
                built.append((shape, compiled, res))
                case["runs"].append({"tile": list(shape), "registers": res.registers,
                                     "spill": res.spill_store_bytes,
                                     "compile_s": round(compiled.seconds, 2)})
            if gpu is not None:
                from sparsert_cli.gpu import timing

                rng = np.random.default_rng(index)
                x = rng.standard_normal((k, n)).astype(np.float16)
                ref = reference(csr, x)
                mag = np.abs(csr.toarray().astype(np.float16).astype(np.float64)) @ np.abs(
                    x.astype(np.float64))
                # the baselines and sparsert's own kernel for this layer, same process
                kernel = (None if args.no_baselines else
                          sparsert.compile_kernels([layer], arch="sm_90")[0])
                if isinstance(kernel, sparsert.Kernel):
                    bx, bres = kernel.random_inputs(np.random.default_rng(index))
                    result = sparsert.benchmark_layer(gpu, kernel, inputs=(
                        bx, bres, *kernel.reference(bx, bres)), baselines=True)
                    case["sparsert_us"] = result.get("sparsert", {}).get("median_us")
                    case["sparsert_ok"] = result["verify_gpu"]["ok"]
                    case["baselines"] = {
                        key: v.get("median_us") if isinstance(v, dict) else v
                        for key, v in result.get("baselines", {}).items()}
                xb = gpu.upload(x.view(np.uint16))
                yb = gpu.alloc(m * n * 2)
                slices = max([sh[6] for sh in shapes if len(sh) > 5] + [1])
                wb = gpu.alloc(slices * m * n * 4)
                cb = gpu.alloc(4 * -(-m // 16) * -(-n // 8))
                gpu.memset(cb, 0)
                for run, (tile, compiled, res), pk in zip(case["runs"], built, packs):
                    wm, wn, mt, nt, kt = tile[:5]
                    if res.spill_store_bytes:
                        run["skipped"] = "spills"
                        continue
                    words, extra = pk       # v1: the start table; v2, v3: E
                    eb = gpu.upload(words if len(words) else np.zeros(1, np.uint32))
                    sb = gpu.upload(extra) if args.version == 1 else None
                    run["entries_per_thread"] = int(extra) if args.version >= 2 else None
                    fn = gpu.load(compiled.cubin, "tc_probe")
                    grid = (-(-m // (wm * mt * 16)), -(-n // (wn * nt * 8)),
                            tile[6] if len(tile) > 5 else 1)
                    block = (wm * wn * 32, 1, 1)
                    launch_args = ((xb, yb, eb, sb) if args.version == 1 else (xb, yb, eb)
                                   if args.version == 2 else (xb, yb, eb, wb, cb))

                    def enqueue():
                        gpu.launch(fn, grid, block, 0, launch_args)
                    gpu.poison(yb)
                    enqueue()
                    gpu.synchronize()
                    got = gpu.download(yb, (m, n), np.uint16).view(np.float16).astype(
                        np.float64)
                    err = np.abs(got - ref)
                    tol = 8 * np.sqrt(k) * 2.0 ** -10 * mag + 1e-6
                    run["ok"] = bool(np.all(np.isfinite(got)) and np.all(err <= tol))
                    run["max_err_over_tol"] = float(np.max(err / tol))
                    if run["ok"]:
                        run["us"] = float(np.median(timing.graph(gpu, enqueue).samples_us))
                    eb.free()
                    if sb is not None:
                        sb.free()
                for buf in (xb, yb, wb, cb):
                    buf.free()
                ok = [r for r in case["runs"] if r.get("ok")]
                best = min(ok, key=lambda r: r["us"]) if ok else None
                case["best"] = best
                print(f"{layer.label:22s} sparsert {case.get('sparsert_us')} cublas_fp16 "
                      f"{case.get('baselines', {}).get('cublas_fp16')} tc best "
                      f"{best and best['us']:.2f} {best and best['tile']} "
                      f"({len(ok)}/{len(case['runs'])} ok)", flush=True)
            else:
                print(f"{layer.label:22s} compiled {len(built)} tiles", flush=True)
            doc["cases"].append(case)
            out.write_text(json.dumps(doc, indent=1))
    finally:
        if gpu is not None:
            gpu.close()
    doc["seconds"] = round(time.perf_counter() - started, 1)
    out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
