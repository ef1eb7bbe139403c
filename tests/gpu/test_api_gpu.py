"""The public API on a GPU: Kernel.to_device().launch() on a stream the caller made (with
cuda.bindings, and torch's when torch is importable), pointers the caller allocated, the output
poisoned first and checked element-wise against float64. Skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from sparsert_cli.gpu.runtime import have_gpu

if not have_gpu():
    pytest.skip("no CUDA driver or GPU", allow_module_level=True)

import sparsert_cli as sparsert  # noqa: E402
from sparsert_cli.gpu.runtime import cu  # noqa: E402

pytestmark = pytest.mark.gpu


def sparse(shape, density, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) >= density] = 0
    return w


KERNELS = {
    "gemm_v4_ksplit": lambda: sparsert.compile_kernel(
        sparse((40, 72), 0.2, 1), n=200, plan={"vector_width": 4, "k_split": 2}, tuned=False),
    "conv3x3_s2_pad_b2_epilogue": lambda: sparsert.compile_kernel(
        sparse((10, 6, 3, 3), 0.3, 2), op="conv", input_shape=(2, 6, 11, 9), stride=2,
        padding=1, tuned=False, plan={"rows_per_group": 4, "k_split": 2},
        epilogue={"bias": np.linspace(-1, 1, 10), "activation": "relu", "residual": True}),
    "fp16_1x1_residual": lambda: sparsert.compile_kernel(
        sparse((12, 16, 1, 1), 0.3, 3), op="conv", input_shape=(2, 16, 6, 8), dtype="fp16",
        tuned=False, epilogue={"residual": True}, plan={"vector_width": 8}),
}


class RawStream:
    """A stream, memory and copies made with cuda.bindings directly (no sparsert Gpu)."""

    def __init__(self):
        from cuda.bindings import driver

        self.driver = driver
        self.handle = cu("cuStreamCreate", int(driver.CUstream_flags.CU_STREAM_NON_BLOCKING))
        self.owned = []

    def upload(self, array: np.ndarray) -> int:
        host = np.ascontiguousarray(array)
        ptr = int(cu("cuMemAlloc", max(host.nbytes, 1)))
        self.owned.append(ptr)
        cu("cuMemcpyHtoDAsync", ptr, host.ctypes.data, host.nbytes, self.handle)
        cu("cuStreamSynchronize", self.handle)
        return ptr

    def poisoned(self, nbytes: int) -> int:
        ptr = int(cu("cuMemAlloc", nbytes))
        self.owned.append(ptr)
        cu("cuMemsetD8Async", ptr, 0xFF, nbytes, self.handle)   # NaN in fp32 and fp16
        return ptr

    def download(self, ptr: int, shape, dtype) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        cu("cuMemcpyDtoHAsync", out.ctypes.data, ptr, out.nbytes, self.handle)
        cu("cuStreamSynchronize", self.handle)
        return out

    def close(self):
        cu("cuStreamSynchronize", self.handle)
        for ptr in self.owned:
            cu("cuMemFree", ptr)
        cu("cuStreamDestroy", self.handle)


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("handle_kind", ["int", "CUstream"])
def test_launch_on_a_cuda_bindings_stream(gpu, name, handle_kind):
    kernel = KERNELS[name]()
    rng = np.random.default_rng(4)
    stream = RawStream()
    try:
        with kernel.to_device(gpu.device) as loaded:
            for _ in range(2):                                   # fresh inputs, same loaded kernel
                x, res = kernel.random_inputs(rng)
                px = stream.upload(x.astype(kernel.storage))
                pr = None if res is None else stream.upload(res.astype(kernel.storage))
                py = stream.poisoned(int(np.prod(kernel.output_shape))
                                     * np.dtype(kernel.storage).itemsize)
                handle = int(stream.handle) if handle_kind == "int" else stream.handle
                loaded.launch(handle, px, py, pr)
                loaded.launch(handle, px, py, pr)                # packed arguments reused
                y = stream.download(py, kernel.output_shape, kernel.storage)
                ok, err, message = kernel.check(y, x, res)
                assert ok, (name, message)
    finally:
        stream.close()


def test_launch_needs_the_residual_it_was_built_with(gpu):
    kernel = KERNELS["fp16_1x1_residual"]()
    with kernel.to_device(gpu.device) as loaded:
        with pytest.raises(ValueError, match="residual"):
            loaded.launch(gpu.stream_handle, 0, 0)


def test_launch_on_torch_streams(gpu):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    kernel = KERNELS["conv3x3_s2_pad_b2_epilogue"]()
    rng = np.random.default_rng(5)
    x, res = kernel.random_inputs(rng)
    with kernel.to_device(0) as loaded:
        side = torch.cuda.Stream()
        for stream in (torch.cuda.current_stream(), side,
                       torch.cuda.current_stream().cuda_stream):
            with torch.cuda.stream(side if stream is side else torch.cuda.current_stream()):
                xt = torch.from_numpy(x).cuda()
                rt = torch.from_numpy(res).cuda()
                yt = torch.full(kernel.output_shape, float("nan"), device="cuda")
                loaded.launch(stream, xt.data_ptr(), yt.data_ptr(), rt.data_ptr())
            torch.cuda.synchronize()
            ok, _, message = kernel.check(yt.cpu().numpy(), x, res)
            assert ok, message


def test_benchmark_layer_returns_a_record(gpu):
    kernel = KERNELS["gemm_v4_ksplit"]()
    floors = {"fp32_gflops": 50_000.0, "bandwidth_gbs": 3000.0, "launch_us": 1.0}
    record = sparsert.benchmark_layer(gpu, kernel, floors=floors, baselines=False, replays=3)
    assert record["verify_gpu"]["ok"], record["verify_gpu"]
    assert record["sparsert"]["method"] == "graph" and len(record["sparsert"]["samples_us"]) == 3
    assert record["floor_us"] > 0 and record["floor_pct"] > 0
    assert record["kernel"]["registers"] > 0
