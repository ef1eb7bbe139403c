"""Convolution as im2col (a small generated CUDA kernel) + cuSPARSE SpMM."""

from __future__ import annotations

import numpy as np

from ...compile import cpp_to_cubin
from ...reference import conv_out_hw, im2col
from ..runtime import Gpu
from ._base import _Baseline
from .cusparse import _as_csr32, _CsrSpmm


_IM2COL_BODY = r"""
extern "C" __global__ void sparsert_im2col(const float* __restrict__ x, float* __restrict__ cols)
{
    // cols[row][j]: row = (c*KR + r)*KS + s, j = (n*HO + ho)*WO + wo; zero outside the image.
    // Shape constants are compile-time, so the divisions become multiplies; idx_t is 32-bit
    // whenever the matrix allows it (64-bit division is many times slower).
    const idx_t total = (idx_t)ROWS * COLS;
    for (idx_t idx = blockIdx.x * (idx_t)blockDim.x + threadIdx.x; idx < total;
         idx += (idx_t)gridDim.x * blockDim.x) {
        const idx_t row = idx / COLS, j = idx - row * COLS;
        const int s = (int)(row % KS), r = (int)((row / KS) % KR), c = (int)(row / (KR * KS));
        const int wo = (int)(j % WO), ho = (int)((j / WO) % HO), n = (int)(j / (WO * HO));
        const int h = ho * STRIDE - PAD + r, w = wo * STRIDE - PAD + s;
        float v = 0.0f;
        if (h >= 0 && h < IN_H && w >= 0 && w < IN_W)
            v = x[(((idx_t)n * IN_C + c) * IN_H + h) * IN_W + w];
        cols[idx] = v;
    }
}
"""


def im2col_source(x_shape, r: int, s: int, stride: int, padding: int) -> str:
    """CUDA C++ for an im2col kernel specialised to one shape (pointer-only arguments)."""
    n, c, h, w = x_shape
    ho, wo = conv_out_hw(h, w, r, s, stride, padding)
    defines = {"IN_C": c, "IN_H": h, "IN_W": w, "KR": r, "KS": s, "HO": ho, "WO": wo,
               "STRIDE": stride, "PAD": padding, "ROWS": c * r * s, "COLS": n * ho * wo}
    small = max(c * r * s * n * ho * wo, n * c * h * w) < 2 ** 31   # also leaves loop headroom
    index_type = "unsigned int" if small else "unsigned long long"
    lines = [f"typedef {index_type} idx_t;"] + [f"#define {k} {v}" for k, v in defines.items()]
    return "\n".join(lines) + "\n" + _IM2COL_BODY


class Im2colCusparse(_Baseline):
    """Convolution as im2col (a small CUDA kernel) + cuSPARSE SpMM with the best algorithm.
    `w_csr` is M x (C*R*S) with column (c*R + r)*S + s. Both steps count in enqueue()."""

    THREADS = 256

    def __init__(self, gpu: Gpu, x: np.ndarray, w_csr, R: int, S: int, stride: int,
                 padding: int):
        super().__init__(gpu)
        self.name, self.dtype = "im2col_cusparse", "fp32"
        self._spmm = None
        n, c, h, w = x.shape
        a = _as_csr32(w_csr)
        m, crs = a.shape
        if crs != c * R * S:
            raise ValueError(f"w_csr has {crs} columns; C*R*S = {c}*{R}*{S} = {c * R * S}")
        ho, wo = conv_out_hw(h, w, R, S, stride, padding)
        if ho < 1 or wo < 1:
            raise ValueError(f"empty output: {h}x{w} input, {R}x{S} filter, stride {stride}, "
                             f"padding {padding}")
        self._out_shape = (m, n, ho, wo)
        cols_n = n * ho * wo
        try:
            x32 = np.asarray(x, dtype=np.float32)
            src = im2col_source(x.shape, R, S, stride, padding)
            self._kernel = gpu.load(cpp_to_cubin(src, gpu.arch).cubin, "sparsert_im2col")
            self._x = self._upload(x32)
            self._cols = self._alloc(crs * cols_n * 4)
            self._out = self._alloc(m * cols_n * 4)
            blocks = min(-(-crs * cols_n // self.THREADS), 2 ** 31 - 1)   # one element a thread
            self._grid = (max(blocks, 1), 1, 1)
            self._im2col()
            cols64 = im2col(x32.astype(np.float64), R, S, stride, padding)
            got = gpu.download(self._cols, (crs, cols_n), np.float32)
            if not np.array_equal(got, cols64.astype(np.float32)):   # a pure copy: exact
                raise RuntimeError("the im2col kernel disagrees with the host im2col")
            a64 = a.astype(np.float64)
            reference = np.asarray(a64 @ cols64)
            magnitude = np.asarray(abs(a64) @ np.abs(cols64))
            self._spmm = _CsrSpmm(self, a, self._cols.ptr, self._out, cols_n, reference, magnitude)
            self.algorithm = self._spmm.algorithm
            self.info = dict(self._spmm.info, im2col_registers=self._kernel.registers,
                             im2col_grid=list(self._grid))
        except BaseException:
            self.close()
            raise

    def _im2col(self) -> None:
        self.gpu.launch(self._kernel, self._grid, (self.THREADS, 1, 1), 0,
                        [self._x.ptr, self._cols.ptr])

    def enqueue(self) -> None:
        self._im2col()
        self._spmm.enqueue()

    def output(self) -> np.ndarray:
        y = self.gpu.download(self._out, self._out_shape, np.float32)
        return y.transpose(1, 0, 2, 3).astype(np.float64)   # M x N x Ho x Wo -> N x M x Ho x Wo

    def _close_library(self) -> None:
        if self._spmm is not None:
            self._spmm.close()
