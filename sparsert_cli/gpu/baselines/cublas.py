"""cuBLAS dense GEMM baseline (strict fp32, TF32, fp16 and bf16 with fp32 accumulation)."""

from __future__ import annotations

import numpy as np

from ...storage import decode, device_type, encode
from ..runtime import Gpu
from ._base import _Baseline, _bind


class CublasGemm(_Baseline):
    """Dense row-major C = A @ B with cuBLAS. Modes: "fp32" (PEDANTIC sgemm, no TF32),
    "tf32" (sgemm with TF32 tensor cores), "fp16" / "bf16" (CUDA_R_16F / CUDA_R_16BF A/B/C,
    COMPUTE_32F, gemm_ex: tensor cores)."""

    HALF = {"fp16": "CUDA_R_16F", "bf16": "CUDA_R_16BF"}

    WORKSPACE = 32 << 20

    def __init__(self, gpu: Gpu, A: np.ndarray, B: np.ndarray, mode: str = "fp32"):
        super().__init__(gpu)
        from nvmath.bindings import cublas

        if mode not in ("fp32", "tf32", "fp16", "bf16"):
            raise ValueError(f"cuBLAS mode must be fp32, tf32, fp16 or bf16, got {mode!r}")
        (m, k), (k2, n) = A.shape, B.shape
        if k != k2:
            raise ValueError(f"A is {m}x{k} but B is {k2}x{n}")
        self.name, self.dtype, self.mode = f"cublas_{mode}", mode, mode
        self._cublas, self._handle = cublas, None
        self._shape = (m, n, k)
        self._io = "fp32" if mode == "tf32" else mode      # storage type of A, B and C
        self._store = device_type(self._io)
        try:
            self._a = self._upload(encode(A, self._io))
            self._b = self._upload(encode(B, self._io))
            self._out = self._alloc(m * n * np.dtype(self._store).itemsize)
            self._workspace = self._alloc(self.WORKSPACE)
            self._alpha = np.array(1.0, dtype=np.float32)   # read by pointer (host pointer mode)
            self._beta = np.array(0.0, dtype=np.float32)
            self._handle = cublas.create()
            cublas.set_stream(self._handle, gpu.stream_handle)
            # An explicit workspace keeps cuBLAS from allocating during graph capture.
            cublas.set_workspace(self._handle, self._workspace.ptr, self.WORKSPACE)
            math = {"fp32": cublas.Math.PEDANTIC_MATH, "tf32": cublas.Math.TF32_TENSOR_OP_MATH,
                    "fp16": cublas.Math.DEFAULT_MATH, "bf16": cublas.Math.DEFAULT_MATH}[mode]
            cublas.set_math_mode(self._handle, int(math))
            self._call = self._bind_gemm(cublas, m, n, k)
            self.info = {"library": "cuBLAS", "version": cublas.get_version(self._handle),
                         "routine": "gemm_ex" if mode in self.HALF else "sgemm",
                         "math_mode": math.name, "workspace_bytes": self.WORKSPACE}
        except BaseException:
            self.close()
            raise

    def enqueue(self) -> None:
        self._call()

    def _bind_gemm(self, cublas, m: int, n: int, k: int):
        # cuBLAS is column-major: row-major C = A @ B is column-major C^T = B^T A^T, so the
        # operands swap and m <-> n (checked numerically in CUDA_PYTHON_NOTES §3 and §6).
        op_n = int(cublas.Operation.N)
        alpha, beta = self._alpha.ctypes.data, self._beta.ctypes.data
        if self.mode in self.HALF:
            from nvmath import CudaDataType
            half = int(getattr(CudaDataType, self.HALF[self.mode]))
            return _bind(cublas.gemm_ex, self._handle, op_n, op_n, n, m, k, alpha,
                         self._b.ptr, half, n, self._a.ptr, half, k, beta, self._out.ptr, half, n,
                         int(cublas.ComputeType.COMPUTE_32F), int(cublas.GemmAlgo.DEFAULT))
        return _bind(cublas.sgemm, self._handle, op_n, op_n, n, m, k, alpha, self._b.ptr, n,
                     self._a.ptr, k, beta, self._out.ptr, n)

    def output(self) -> np.ndarray:
        m, n, _ = self._shape
        return decode(self.gpu.download(self._out, (m, n), self._store),
                      self._io).astype(np.float64)

    def _close_library(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            self._cublas.destroy(handle)
