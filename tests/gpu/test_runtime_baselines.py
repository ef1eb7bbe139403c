"""GPU runtime and library baselines against float64 references. Skipped without a GPU."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import scipy.sparse as sp

from sparsert_cli.gpu.runtime import have_gpu

if not have_gpu():
    pytest.skip("no CUDA driver or GPU", allow_module_level=True)

from sparsert_cli.benchmark import measure_floors, timing_summary  # noqa: E402
from sparsert_cli.compile import ptx_to_cubin  # noqa: E402
from sparsert_cli.gpu import baselines as bl  # noqa: E402
from sparsert_cli.gpu import timing as tm  # noqa: E402
from sparsert_cli.gpu.baselines._base import mismatch  # noqa: E402
from sparsert_cli.reference import reference_and_magnitude  # noqa: E402
from sparsert_cli.gpu.runtime import cu, ptx_header  # noqa: E402

pytestmark = pytest.mark.gpu

# y[i] = 2 x[i] + 1 for i < 1000; and a copy through 64 KiB of dynamic shared memory.
TEST_PTX = r"""
.extern .shared .align 16 .b8 sparsert_dyn[];

.visible .entry sparsert_test_affine(.param .u64 x_ptr, .param .u64 y_ptr)
{
    .reg .pred %p1;
    .reg .b32 %r<5>;
    .reg .f32 %f<3>;
    .reg .b64 %rd<6>;
    ld.param.u64 %rd1, [x_ptr];
    ld.param.u64 %rd2, [y_ptr];
    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    mov.u32 %r1, %ctaid.x;
    mov.u32 %r2, %ntid.x;
    mov.u32 %r3, %tid.x;
    mad.lo.s32 %r4, %r1, %r2, %r3;
    setp.ge.s32 %p1, %r4, 1000;
    @%p1 bra $L_done;
    mul.wide.s32 %rd3, %r4, 4;
    add.s64 %rd4, %rd1, %rd3;
    add.s64 %rd5, %rd2, %rd3;
    ld.global.f32 %f1, [%rd4];
    fma.rn.f32 %f2, %f1, 0f40000000, 0f3F800000;
    st.global.f32 [%rd5], %f2;
$L_done:
    ret;
}

.visible .entry sparsert_test_smem(.param .u64 x_ptr, .param .u64 y_ptr)
{
    .reg .b32 %r<2>;
    .reg .f32 %f<2>;
    .reg .b64 %rd<8>;
    ld.param.u64 %rd1, [x_ptr];
    ld.param.u64 %rd2, [y_ptr];
    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    mov.u32 %r1, %tid.x;
    mul.wide.u32 %rd3, %r1, 4;
    add.s64 %rd4, %rd1, %rd3;
    ld.global.f32 %f1, [%rd4];
    mov.u64 %rd5, sparsert_dyn;
    add.s64 %rd6, %rd5, %rd3;
    st.shared.f32 [%rd6+60000], %f1;
    bar.sync 0;
    ld.shared.f32 %f1, [%rd6+60000];
    add.s64 %rd7, %rd2, %rd3;
    st.global.f32 [%rd7], %f1;
    ret;
}
"""

GEMM_SHAPE = (37, 53, 129)                       # M, K, N: odd on purpose
CONV_CASES = [(1, 1), (2, 0)]                    # (stride, padding), 3x3 filters
X_SHAPE, OUT_CHANNELS = (2, 5, 9, 11), 7


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))   # fresh per test


def sparse_matrix(rng, m, k, density=0.2) -> sp.csr_matrix:
    a = sp.random(m, k, density=density, format="csr", dtype=np.float32, random_state=rng,
                  data_rvs=lambda size: rng.standard_normal(size).astype(np.float32))
    a = a.tolil()
    a[0, :] = 0          # an empty row: every algorithm must still write zeros there
    return a.tocsr()


def sparse_filter(rng, shape, density=0.2) -> np.ndarray:
    w = rng.standard_normal(shape).astype(np.float32)
    return w * (rng.random(shape) < density)


def run_checked(baseline, ref, mag, dtype, k):
    baseline.poison()
    baseline.enqueue()
    problem = mismatch(baseline.output(), ref, mag, dtype, k)
    assert problem == "", f"{baseline.name}: {problem}"


# ---- runtime --------------------------------------------------------------------------------

def test_info_is_sane(gpu):
    info = gpu.info()
    assert gpu.arch.startswith("sm_") and gpu.sm_count > 0 and gpu.l2_bytes > 0
    assert info["compute_capability"] == list(gpu.compute_capability)
    assert "." in gpu.driver_version


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32])
def test_upload_download_round_trip(gpu, rng, dtype):
    host = (rng.standard_normal((3, 1031)) * 100).astype(dtype)
    buf = gpu.upload(host[:, ::2])                  # non-contiguous input is made contiguous
    try:
        assert np.array_equal(gpu.download(buf, (3, 516), dtype), host[:, ::2])
    finally:
        buf.free()


def test_poison_writes_nan(gpu):
    buf = gpu.upload(np.zeros(1000, np.float32))
    gpu.poison(buf)
    assert np.isnan(gpu.download(buf, 1000, np.float32)).all()
    assert np.isnan(gpu.download(buf, 2000, np.float16)).all()
    buf.free()


def test_ptx_kernel_launch(gpu, rng):
    cubin = ptx_to_cubin(ptx_header(gpu.arch) + TEST_PTX, gpu.arch).cubin
    kernel = gpu.load(cubin, "sparsert_test_affine")
    assert kernel.registers > 0 and kernel.local_bytes == 0
    x = rng.standard_normal(1024).astype(np.float32)
    dx, dy = gpu.upload(x), gpu.alloc(x.nbytes)
    gpu.poison(dy)
    gpu.launch(kernel, (4, 1, 1), (256, 1, 1), 0, [dx, dy.ptr])
    y = gpu.download(dy, 1024, np.float32)
    assert np.array_equal(y[:1000], 2 * x[:1000] + 1)
    assert np.isnan(y[1000:]).all()                 # the guard kept the tail untouched

    smem = gpu.load(cubin, "sparsert_test_smem")    # needs the > 48 KiB opt-in
    gpu.poison(dy)
    gpu.launch(smem, (1, 1, 1), (128, 1, 1), 64 * 1024, [dx.ptr, dy.ptr])
    assert np.array_equal(gpu.download(dy, 128, np.float32), x[:128])
    dx.free()
    dy.free()


def test_launch_on_a_borrowed_stream(gpu, rng):
    from cuda.bindings import driver

    kernel = gpu.load(ptx_to_cubin(ptx_header(gpu.arch) + TEST_PTX, gpu.arch).cubin,
                      "sparsert_test_affine")
    x = rng.standard_normal(1024).astype(np.float32)
    dx, dy = gpu.upload(x), gpu.alloc(x.nbytes)
    gpu.poison(dy)
    gpu.synchronize()
    borrowed = cu("cuStreamCreate", int(driver.CUstream_flags.CU_STREAM_NON_BLOCKING))
    try:
        gpu.launch(kernel, (4, 1, 1), (256, 1, 1), 0, [dx, dy.ptr], stream=int(borrowed))
        cu("cuStreamSynchronize", borrowed)
        assert np.array_equal(gpu.download(dy, 1000, np.float32), 2 * x[:1000] + 1)
    finally:
        cu("cuStreamDestroy", borrowed)
        dx.free()
        dy.free()


def empty_launcher(gpu):
    kernel = gpu.load(ptx_to_cubin(ptx_header(gpu.arch) + ".visible .entry e() { ret; }\n",
                                   gpu.arch).cubin, "e")
    return lambda: gpu.launch(kernel, (gpu.sm_count, 1, 1), (128, 1, 1), 0, [])


def test_time_empty_kernel_uses_graph(gpu):
    timing = tm.graph(gpu, empty_launcher(gpu), per_graph=20, replays=7)
    assert timing.method == "graph" and timing.per_graph == 20 and len(timing.samples_us) == 7
    assert all(s > 0 for s in timing.samples_us)
    summary = timing_summary(timing)
    assert 0 < summary["p20_us"] <= summary["median_us"] <= summary["p80_us"]
    cold = tm.cold_l2(gpu, empty_launcher(gpu), replays=3)
    assert cold.method == "graph" and cold.per_graph == 1 and min(cold.samples_us) > 0
    assert cold.cold_l2


def test_time_falls_back_when_capture_fails(gpu):
    launch = empty_launcher(gpu)

    def not_capturable():
        launch()
        gpu.synchronize()            # illegal while the stream is capturing

    timing = tm.graph(gpu, not_capturable, per_graph=4, replays=3)
    assert timing.method == "stream" and timing.note and min(timing.samples_us) > 0
    assert int(cu("cuStreamIsCapturing", gpu.stream)) == 0
    assert tm.graph(gpu, launch, replays=2).method == "graph"     # the stream is usable again
    assert tm.stream(gpu, launch, replays=2).method == "stream"


def test_measure_floors(gpu):
    pytest.importorskip("nvmath.bindings.cublas")
    floors = measure_floors(gpu, gemm_size=2048)
    assert floors["fp32_gflops"] > 0 and floors["bandwidth_gbs"] > 0 and floors["launch_us"] > 0


# ---- baselines ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["fp32", "tf32", "fp16", "bf16"])
def test_cublas_gemm(gpu, rng, mode):
    pytest.importorskip("nvmath.bindings.cublas")
    m, k, n = GEMM_SHAPE
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    ref = a.astype(np.float64) @ b
    mag = np.abs(a).astype(np.float64) @ np.abs(b)
    with bl.CublasGemm(gpu, a, b, mode) as gemm:
        run_checked(gemm, ref, mag, mode, k)
        gemm.poison()
        assert tm.graph(gpu, gemm.enqueue, replays=2).method == "graph"
        assert mismatch(gemm.output(), ref, mag, mode, k) == ""   # replays wrote it too


def test_cusparse_spmm(gpu, rng):
    pytest.importorskip("nvmath.bindings.cusparse")
    m, k, n = GEMM_SHAPE
    a = sparse_matrix(rng, m, k)
    b = rng.standard_normal((k, n)).astype(np.float32)
    a64 = a.astype(np.float64)
    ref, mag = a64 @ b.astype(np.float64), abs(a64) @ np.abs(b).astype(np.float64)
    with bl.CusparseSpmm(gpu, a, b) as spmm:
        info = spmm.info
        assert info["algorithm"] in info["per_algorithm_us"]          # only verified ones timed
        assert set(info["per_algorithm_us"]).isdisjoint(info["rejected"])
        assert all(t > 0 for t in info["per_algorithm_us"].values())
        run_checked(spmm, ref, mag, "fp32", k)


@pytest.mark.parametrize("mode", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("stride,padding", CONV_CASES)
def test_cudnn_conv(gpu, rng, mode, stride, padding):
    pytest.importorskip("cudnn")
    x = rng.standard_normal(X_SHAPE).astype(np.float32)
    w = rng.standard_normal((OUT_CHANNELS, X_SHAPE[1], 3, 3)).astype(np.float32)
    ref, mag = reference_and_magnitude(w, x, stride, padding)
    with bl.CudnnConv(gpu, x, w, stride, padding, mode) as conv:
        assert conv.info["per_plan_us"]
        assert conv.output().shape == ref.shape
        run_checked(conv, ref, mag, mode, X_SHAPE[1] * 9)


@pytest.mark.parametrize("stride,padding", CONV_CASES)
def test_im2col_cusparse(gpu, rng, stride, padding):
    pytest.importorskip("nvmath.bindings.cusparse")
    x = rng.standard_normal(X_SHAPE).astype(np.float32)
    w = sparse_filter(rng, (OUT_CHANNELS, X_SHAPE[1], 3, 3))
    ref, mag = reference_and_magnitude(w, x, stride, padding)
    w_csr = sp.csr_matrix(w.reshape(OUT_CHANNELS, -1))
    with bl.Im2colCusparse(gpu, x, w_csr, 3, 3, stride, padding) as conv:
        assert conv.info["algorithm"] in conv.info["per_algorithm_us"]
        run_checked(conv, ref, mag, "fp32", X_SHAPE[1] * 9)
