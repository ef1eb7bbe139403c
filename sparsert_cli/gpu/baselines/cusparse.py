"""cuSPARSE CSR SpMM baseline: every CSR algorithm tried, the fastest correct one kept."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .. import timing
from ..runtime import DeviceBuffer, Gpu, _one_line
from ._base import _Baseline, _bind, median_us, mismatch


def _as_csr32(A) -> sp.csr_matrix:
    """A float32 CSR copy with sorted, merged column indices (cuSPARSE expects sorted)."""
    a = sp.csr_matrix(A, dtype=np.float32, copy=True)
    a.sum_duplicates()
    a.sort_indices()
    return a


class _CsrSpmm:
    """cuSPARSE SpMM, CSR (M x K) times row-major dense (K x N) into row-major (M x N).

    Tries every CSR algorithm with its own descriptors and buffer (preprocessing of one cannot
    leak into another), checks each against the float64 reference with a poisoned output,
    times the correct ones inside a CUDA graph (they differ by up to 14x), and keeps the fastest.
    """

    ALGORITHMS = ("CSR_ALG1", "CSR_ALG2", "CSR_ALG3", "DEFAULT")

    def __init__(self, owner: _Baseline, a: sp.csr_matrix, b_ptr: int, out: DeviceBuffer,
                 n: int, reference: np.ndarray, magnitude: np.ndarray):
        from nvmath.bindings import cusparse

        self._cs, self._handle, self._descriptors = cusparse, None, []
        self._owner, self._a, self._b_ptr, self._out, self._n = owner, a, b_ptr, out, n
        self._alpha = np.array(1.0, dtype=np.float32)   # read by pointer
        self._beta = np.array(0.0, dtype=np.float32)
        try:
            self._csr = [owner._upload(a.indptr.astype(np.int32)),
                         owner._upload(a.indices.astype(np.int32)),
                         owner._upload(a.data.astype(np.float32))]
            self._handle = cusparse.create()
            cusparse.set_stream(self._handle, owner.gpu.stream_handle)
            calls, times, rejected = {}, {}, {}
            for name in self.ALGORITHMS:
                try:
                    call = self._prepare(name)
                    owner.gpu.poison(out)
                    call()
                    got = owner.gpu.download(out, (a.shape[0], n), np.float32)
                    problem = mismatch(got, reference, magnitude, "fp32", a.shape[1])
                    if problem:
                        rejected[name] = problem
                        continue
                    times[name], calls[name] = timing.graph(owner.gpu, call), call
                except Exception as exc:  # noqa: BLE001 - an unsupported algorithm is skipped
                    rejected[name] = _one_line(exc)
            if not calls:
                raise RuntimeError(f"no cuSPARSE SpMM algorithm gave a correct result: {rejected}")
        except BaseException:
            self.close()
            raise
        self.algorithm = min(times, key=lambda alg: median_us(times[alg]))
        self.enqueue = calls[self.algorithm]
        self.info = {"library": "cuSPARSE", "version": cusparse.get_version(self._handle),
                     "algorithm": self.algorithm,
                     "per_algorithm_us": {alg: median_us(t) for alg, t in times.items()},
                     "timing_method": {alg: t.method for alg, t in times.items()},
                     "rejected": rejected}

    def _prepare(self, name: str):
        """Descriptors, buffer and (ALG1/ALG3) preprocessing for one algorithm; its sp_mm call."""
        from nvmath import CudaDataType

        cs, (m, k), n = self._cs, self._a.shape, self._n
        f32, i32, row = int(CudaDataType.CUDA_R_32F), int(cs.IndexType.INDEX_32I), int(cs.Order.ROW)
        indptr, indices, values = self._csr
        mat_a = self._keep("sp", cs.create_csr(m, k, self._a.nnz, indptr.ptr, indices.ptr,
                                               values.ptr, i32, i32, int(cs.IndexBase.ZERO), f32))
        mat_b = self._keep("dn", cs.create_dn_mat(k, n, n, self._b_ptr, f32, row))
        mat_c = self._keep("dn", cs.create_dn_mat(m, n, n, self._out.ptr, f32, row))
        no_t = int(cs.Operation.NON_TRANSPOSE)
        args = (self._handle, no_t, no_t, self._alpha.ctypes.data, mat_a, mat_b,
                self._beta.ctypes.data, mat_c, f32, int(getattr(cs.SpMMAlg, name)))
        buffer = self._owner._alloc(cs.sp_mm_buffer_size(*args))
        if name in ("CSR_ALG1", "CSR_ALG3"):   # the algorithms that use preprocessing
            cs.sp_mm_preprocess(*args, buffer.ptr)
        return _bind(cs.sp_mm, *args, buffer.ptr)

    def _keep(self, kind: str, descriptor: int) -> int:
        self._descriptors.append((kind, descriptor))
        return descriptor

    def close(self) -> None:
        for kind, descriptor in self._descriptors:
            (self._cs.destroy_sp_mat if kind == "sp" else self._cs.destroy_dn_mat)(descriptor)
        self._descriptors.clear()
        if self._handle is not None:
            handle, self._handle = self._handle, None
            self._cs.destroy(handle)


class CusparseSpmm(_Baseline):
    """Sparse CSR A (M x K, float32) times dense row-major B (K x N) with the best cuSPARSE
    algorithm. info = {"algorithm", "per_algorithm_us", "rejected", ...}."""

    def __init__(self, gpu: Gpu, A, B: np.ndarray):
        super().__init__(gpu)
        self.name, self.dtype = "cusparse_csr", "fp32"
        self._spmm = None
        a = _as_csr32(A)
        (m, k), (k2, n) = a.shape, B.shape
        if k != k2:
            raise ValueError(f"A is {m}x{k} but B is {k2}x{n}")
        self._shape = (m, n)
        try:
            b32 = np.asarray(B, dtype=np.float32)
            self._b = self._upload(b32)
            self._out = self._alloc(m * n * 4)
            a64, b64 = a.astype(np.float64), b32.astype(np.float64)
            reference, magnitude = np.asarray(a64 @ b64), np.asarray(abs(a64) @ np.abs(b64))
            self._spmm = _CsrSpmm(self, a, self._b.ptr, self._out, n, reference, magnitude)
            self.algorithm, self.info = self._spmm.algorithm, self._spmm.info
        except BaseException:
            self.close()
            raise

    def enqueue(self) -> None:
        self._spmm.enqueue()

    def output(self) -> np.ndarray:
        return self.gpu.download(self._out, self._shape, np.float32).astype(np.float64)

    def _close_library(self) -> None:
        if self._spmm is not None:
            self._spmm.close()
