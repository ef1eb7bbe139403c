"""Library baselines (cuBLAS, cuSPARSE, cuDNN, im2col + cuSPARSE), timed by the same Gpu.time().

Each baseline does all its setup in __init__ (handles, descriptors, workspace, preprocessing,
plan building, and for cuSPARSE/cuDNN choosing the fastest correct algorithm), so `enqueue()`
only puts one run on gpu.stream: no allocation, no host sync, capturable into a CUDA graph.
Host scalars (alpha/beta) are attributes: the libraries read them by pointer.
Library imports (nvmath, cudnn) happen inside the constructors, never at import time.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..compile import cpp_to_cubin, ptx_to_cubin
from ..reference import ABSOLUTE, EPS, SAFETY, im2col, tolerance  # noqa: F401 (re-exported)
from .runtime import EMPTY_PTX, DeviceBuffer, Gpu, _one_line, cu, ptx_header

MAX_WORKSPACE = 1 << 30      # a cuDNN plan asking for more than this is skipped


def mismatch(out: np.ndarray, ref: np.ndarray, magnitude: np.ndarray, dtype: str, k: int) -> str:
    """"" when `out` is within tolerance of `ref` everywhere, else one line saying why not."""
    out = np.asarray(out, dtype=np.float64).reshape(ref.shape)
    bad_values = int(np.count_nonzero(~np.isfinite(out)))
    if bad_values:
        return f"{bad_values} of {out.size} outputs are NaN/Inf (unwritten or overflowed)"
    err = np.abs(out - ref)
    bound = (tolerance(dtype, k) * np.asarray(magnitude, dtype=np.float64).reshape(ref.shape)
             + ABSOLUTE[dtype])
    over = err > bound
    if np.any(over):
        worst = int(np.argmax(err - bound))
        return (f"{int(np.count_nonzero(over))} of {out.size} outputs off; worst got "
                f"{out.flat[worst]:.7g}, want {ref.flat[worst]:.7g} "
                f"(bound {bound.flat[worst]:.2g})")
    return ""


def conv_out_hw(h: int, w: int, r: int, s: int, stride: int, padding: int) -> tuple[int, int]:
    return (h + 2 * padding - r) // stride + 1, (w + 2 * padding - s) // stride + 1


def im2col64(x: np.ndarray, r: int, s: int, stride: int, padding: int) -> np.ndarray:
    """NCHW -> (C*R*S) x (N*Ho*Wo) float64 (reference.im2col on a float64 copy)."""
    return im2col(np.asarray(x, dtype=np.float64), r, s, stride, padding)


def conv_reference(x: np.ndarray, w, stride: int, padding: int, r: int | None = None,
                   s: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(y, |w| (*) |x|) in float64, both N x M x Ho x Wo. `w` is M x C x R x S dense, or a
    M x (C*R*S) matrix (dense or scipy sparse) with r and s given."""
    if r is None:
        m, _, r, s = w.shape
        w = np.asarray(w, dtype=np.float64).reshape(m, -1)
    w64 = sp.csr_matrix(w, dtype=np.float64)
    cols = im2col64(x, r, s, stride, padding)
    n, _, h, wd = x.shape
    ho, wo = conv_out_hw(h, wd, r, s, stride, padding)
    shape = (w64.shape[0], n, ho, wo)
    y = np.asarray(w64 @ cols).reshape(shape).transpose(1, 0, 2, 3)
    mag = np.asarray(abs(w64) @ np.abs(cols)).reshape(shape).transpose(1, 0, 2, 3)
    return y, mag


class _Baseline:
    """Owns device buffers; subclasses add library handles in _close_library()."""

    name = ""
    dtype = ""

    def __init__(self, gpu: Gpu):
        self.gpu = gpu
        self.info: dict = {}
        self._owned: list[DeviceBuffer] = []
        self._out: DeviceBuffer | None = None

    def _upload(self, arr: np.ndarray) -> DeviceBuffer:
        buf = self.gpu.upload(arr)
        self._owned.append(buf)
        return buf

    def _alloc(self, nbytes: int) -> DeviceBuffer:
        buf = self.gpu.alloc(nbytes)
        self._owned.append(buf)
        return buf

    def poison(self) -> None:
        self.gpu.poison(self._out)

    def _close_library(self) -> None:
        pass

    def close(self) -> None:
        """Destroy handles and free buffers. Idempotent; safe on a half-built instance."""
        try:
            if self.gpu.stream is not None:    # the Gpu may already be closed
                self.gpu.synchronize()
        finally:
            self._close_library()
            for buf in self._owned:
                buf.free()
            self._owned.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CublasGemm(_Baseline):
    """Dense row-major C = A @ B with cuBLAS. Modes: "fp32" (PEDANTIC sgemm, no TF32),
    "tf32" (sgemm with TF32 tensor cores), "fp16" (fp16 A/B/C, fp32 accumulate, gemm_ex)."""

    WORKSPACE = 32 << 20

    def __init__(self, gpu: Gpu, A: np.ndarray, B: np.ndarray, mode: str = "fp32"):
        super().__init__(gpu)
        from nvmath.bindings import cublas

        if mode not in ("fp32", "tf32", "fp16"):
            raise ValueError(f"cuBLAS mode must be fp32, tf32 or fp16, got {mode!r}")
        (m, k), (k2, n) = A.shape, B.shape
        if k != k2:
            raise ValueError(f"A is {m}x{k} but B is {k2}x{n}")
        self.name, self.dtype, self.mode = f"cublas_{mode}", mode, mode
        self._cublas, self._handle = cublas, None
        self._shape = (m, n, k)
        self._store = np.float16 if mode == "fp16" else np.float32
        try:
            self._a = self._upload(np.asarray(A, dtype=self._store))
            self._b = self._upload(np.asarray(B, dtype=self._store))
            self._out = self._alloc(m * n * np.dtype(self._store).itemsize)
            self._workspace = self._alloc(self.WORKSPACE)
            self._alpha = np.array(1.0, dtype=np.float32)   # read by pointer (host pointer mode)
            self._beta = np.array(0.0, dtype=np.float32)
            self._handle = cublas.create()
            cublas.set_stream(self._handle, gpu.stream_handle)
            # An explicit workspace keeps cuBLAS from allocating during graph capture.
            cublas.set_workspace(self._handle, self._workspace.ptr, self.WORKSPACE)
            math = {"fp32": cublas.Math.PEDANTIC_MATH, "tf32": cublas.Math.TF32_TENSOR_OP_MATH,
                    "fp16": cublas.Math.DEFAULT_MATH}[mode]
            cublas.set_math_mode(self._handle, int(math))
            self._call = self._bind_gemm(cublas, m, n, k)
            self.info = {"library": "cuBLAS", "version": cublas.get_version(self._handle),
                         "routine": "gemm_ex" if mode == "fp16" else "sgemm",
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
        if self.mode == "fp16":
            from nvmath import CudaDataType
            half = int(CudaDataType.CUDA_R_16F)
            return _bind(cublas.gemm_ex, self._handle, op_n, op_n, n, m, k, alpha,
                         self._b.ptr, half, n, self._a.ptr, half, k, beta, self._out.ptr, half, n,
                         int(cublas.ComputeType.COMPUTE_32F), int(cublas.GemmAlgo.DEFAULT))
        return _bind(cublas.sgemm, self._handle, op_n, op_n, n, m, k, alpha, self._b.ptr, n,
                     self._a.ptr, k, beta, self._out.ptr, n)

    def output(self) -> np.ndarray:
        m, n, _ = self._shape
        return self.gpu.download(self._out, (m, n), self._store).astype(np.float64)

    def _close_library(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            self._cublas.destroy(handle)


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
                    times[name], calls[name] = owner.gpu.time(call), call
                except Exception as exc:  # noqa: BLE001 - an unsupported algorithm is skipped
                    rejected[name] = _one_line(exc)
            if not calls:
                raise RuntimeError(f"no cuSPARSE SpMM algorithm gave a correct result: {rejected}")
        except BaseException:
            self.close()
            raise
        self.algorithm = min(times, key=lambda alg: times[alg].median_us)
        self.enqueue = calls[self.algorithm]
        self.info = {"library": "cuSPARSE", "version": cusparse.get_version(self._handle),
                     "algorithm": self.algorithm,
                     "per_algorithm_us": {alg: t.median_us for alg, t in times.items()},
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


def _bind(fn, *args):
    """fn(*args) as a zero-argument callable: every argument is fixed at setup."""
    return lambda: fn(*args)


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
            cols64 = im2col64(x32, R, S, stride, padding)
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


def conv_graph(x_shape, w_shape, stride: int, padding: int, mode: str, handle=None):
    """cuDNN frontend graph for an NCHW conv: (graph, X, W, Y). Buildable without a GPU up to
    shape inference. Y's dims and NCHW strides are set explicitly: left unset, cuDNN wrote Y
    in NHWC order on an H100 although get_stride() printed NCHW (CUDA_PYTHON_NOTES §6)."""
    import cudnn

    io = {"fp32": cudnn.data_type.FLOAT, "fp16": cudnn.data_type.HALF}[mode]
    fp = cudnn.data_type.FLOAT
    n, c, h, w = x_shape
    k, c2, r, s = w_shape
    if c != c2:
        raise ValueError(f"input has {c} channels but the filter expects {c2}")
    ho, wo = conv_out_hw(h, w, r, s, stride, padding)
    graph = cudnn.pygraph(io_data_type=io, intermediate_data_type=fp, compute_data_type=fp,
                          handle=handle)
    X = graph.tensor(name="X", dim=[n, c, h, w], stride=[c * h * w, h * w, w, 1], data_type=io)
    W = graph.tensor(name="W", dim=[k, c, r, s], stride=[c * r * s, r * s, s, 1], data_type=io)
    Y = graph.conv_fprop(image=X, weight=W, padding=[padding, padding], stride=[stride, stride],
                         dilation=[1, 1], compute_data_type=fp, name="conv")
    Y.set_output(True).set_data_type(io)
    Y.set_dim([n, k, ho, wo]).set_stride([k * ho * wo, ho * wo, wo, 1])
    return graph, X, W, Y


class CudnnConv(_Baseline):
    """NCHW conv forward through the cuDNN frontend, fastest correct execution plan.
    "fp32": FLOAT io and compute, plans with tensor-core / down-convert numeric notes
    deselected (no TF32). "fp16": HALF io, FLOAT compute."""

    def __init__(self, gpu: Gpu, x: np.ndarray, w: np.ndarray, stride: int, padding: int,
                 mode: str = "fp32"):
        super().__init__(gpu)
        import cudnn

        if mode not in ("fp32", "fp16"):
            raise ValueError(f"cuDNN mode must be fp32 or fp16, got {mode!r}")
        self.name, self.dtype = f"cudnn_{mode}", mode
        self._cudnn, self._handle = cudnn, None
        store = np.float16 if mode == "fp16" else np.float32
        n, c, h, wd = x.shape
        k, _, r, s = w.shape
        ho, wo = conv_out_hw(h, wd, r, s, stride, padding)
        self._out_shape, self._store = (n, k, ho, wo), store
        try:
            self._handle = cudnn.create_handle()
            cudnn.set_stream(self._handle, gpu.stream_handle)
            graph, X, W, Y = conv_graph(x.shape, w.shape, stride, padding, mode, self._handle)
            graph.validate()
            graph.build_operation_graph()
            graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            if mode == "fp32":
                note = cudnn.numerical_note
                graph.deselect_numeric_notes([note.TENSOR_CORE, note.DOWN_CONVERT_INPUTS,
                                              note.REDUCED_PRECISION_REDUCTION])
            self._graph = graph
            built, rejected = self._build_plans(graph)
            self._x = self._upload(np.asarray(x, dtype=store))
            self._w = self._upload(np.asarray(w, dtype=store))
            self._out = self._alloc(n * k * ho * wo * np.dtype(store).itemsize)
            self._workspace = self._alloc(max(built.values(), default=0))
            self._pack = {X: self._x.ptr, W: self._w.ptr, Y: self._out.ptr}  # plain ints
            reference, magnitude = conv_reference(np.asarray(x, np.float32),
                                                  np.asarray(w, np.float32), stride, padding)
            times = self._time_plans(built, reference, magnitude, c * r * s, rejected)
            self.plan_index = min(times, key=lambda i: times[i].median_us)
            self._chosen = self._runner(self.plan_index)
            names = {i: self._plan_name(i) for i in times}
            self.info = {"library": "cuDNN", "version": cudnn.backend_version(),
                         "plan": names[self.plan_index], "plan_index": self.plan_index,
                         "workspace_bytes": built[self.plan_index],
                         "per_plan_us": {f"{i}:{names[i]}": t.median_us for i, t in times.items()},
                         "timing_method": {f"{i}:{names[i]}": t.method for i, t in times.items()},
                         "rejected": rejected}
        except BaseException:
            self.close()
            raise

    def _plan_name(self, index: int) -> str:
        try:
            return str(self._graph.get_plan_name_at_index(index))
        except Exception:  # noqa: BLE001 - a name is only for the record
            return f"plan{index}"

    def _build_plans(self, graph) -> tuple[dict[int, int], dict[str, str]]:
        """{plan index: workspace bytes} for every plan that builds, and why the others did not."""
        built, rejected = {}, {}
        for index in range(graph.get_execution_plan_count()):
            try:
                graph.build_plan_at_index(index)
                workspace = int(graph.get_workspace_size_plan_at_index(index))
            except Exception as exc:  # noqa: BLE001 - deselected or unsupported plans
                rejected[f"{index}:{self._plan_name(index)}"] = _one_line(exc)
                continue
            if workspace > MAX_WORKSPACE:
                rejected[f"{index}:{self._plan_name(index)}"] = f"workspace {workspace} bytes"
                continue
            built[index] = workspace
        if not built:
            raise RuntimeError(f"cuDNN built no execution plan for this convolution: {rejected}")
        return built, rejected

    def _time_plans(self, built, reference, magnitude, k, rejected) -> dict:
        times = {}
        for index in built:
            run = self._runner(index)
            try:
                self.gpu.poison(self._out)
                run()
                got = self.gpu.download(self._out, self._out_shape, self._store)
                problem = mismatch(got, reference, magnitude, self.dtype, k)
                if not problem:
                    times[index] = self.gpu.time(run)
                    continue
            except Exception as exc:  # noqa: BLE001 - a plan that fails to run is skipped
                problem = _one_line(exc)
            rejected[f"{index}:{self._plan_name(index)}"] = problem
        if not times:
            raise RuntimeError(f"no cuDNN plan gave a correct result: {rejected}")
        return times

    def _runner(self, index: int):
        graph, pack, handle = self._graph, self._pack, self._handle
        workspace = self._workspace.ptr
        return lambda: graph.execute_plan_at_index(pack, workspace=workspace, index=index,
                                                   handle=handle)

    def enqueue(self) -> None:
        self._chosen()

    def output(self) -> np.ndarray:
        return self.gpu.download(self._out, self._out_shape, self._store).astype(np.float64)

    def _close_library(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            self._cudnn.destroy_handle(handle)


def measure_floors(gpu: Gpu, gemm_size: int = 8192) -> dict:
    """Ceilings the benchmark reports "% of floor" against, all timed with gpu.time():
    strict-fp32 cuBLAS SGEMM GFLOP/s (n^3 random data), device-to-device copy bandwidth of
    1 GiB with cuMemcpyDtoDAsync (bytes read + written), and the per-launch time of an empty
    kernel with one 128-thread block per SM (graph-timed)."""
    n = int(gemm_size)
    rng = np.random.default_rng(0)
    with CublasGemm(gpu, rng.standard_normal((n, n), dtype=np.float32),
                    rng.standard_normal((n, n), dtype=np.float32), "fp32") as gemm:
        t_gemm = gpu.time(gemm.enqueue, per_graph=2, replays=5, warmup=1)

    nbytes = 1 << 30
    src, dst = gpu.alloc(nbytes), gpu.alloc(nbytes)
    try:
        gpu.memset(src, 0x3C)
        # Not graph-captured: on an H100 a captured copy node moved 2.44 TB/s, the same copy on
        # the stream 3.00 TB/s (a float4 copy kernel 2.87). A 0.7 ms copy needs no graph.
        t_copy = gpu.time(lambda: cu("cuMemcpyDtoDAsync", dst.ptr, src.ptr, nbytes, gpu.stream),
                          per_graph=5, replays=5, warmup=1, capture=False)
    finally:
        src.free()
        dst.free()

    empty = gpu.load(ptx_to_cubin(ptx_header(gpu.arch) + EMPTY_PTX, gpu.arch), "sparsert_empty")
    grid = (gpu.sm_count, 1, 1)
    t_launch = gpu.time(lambda: gpu.launch(empty, grid, (128, 1, 1), 0, []))
    return {"fp32_gflops": 2.0 * n ** 3 / (t_gemm.median_us * 1e3),
            "bandwidth_gbs": 2.0 * nbytes / (t_copy.median_us * 1e3),
            "launch_us": t_launch.median_us,
            "gemm_size": n, "copy_bytes": nbytes, "launch_grid": list(grid),
            "methods": {"gemm": t_gemm.method, "copy": t_copy.method, "launch": t_launch.method}}
