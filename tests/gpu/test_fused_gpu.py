"""Fused pointwise -> depthwise kernels on the GPU: FusedKernel.to_device().launch() with x
random, y and the scratch t poisoned (NaN), checked element-wise against the float64 reference;
the same kernel launched again on the now-finished t and y (a block that read a channel it did
not write would see the poison on the first launch, or last launch's values on the next: the
second launch gets a new x); with dependent launch, a chain of two fused kernels in one stream.
Skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from sparsert_cli.gpu.runtime import have_gpu

if not have_gpu():
    pytest.skip("no CUDA driver or GPU", allow_module_level=True)

import sparsert_cli as sparsert  # noqa: E402
from sparsert_cli.storage import decode, encode  # noqa: E402

pytestmark = pytest.mark.gpu

# (M, C, H, stride, depthwise activation): MobileNet v1's pairs and small odd ones; "none" on
# the depthwise so that a NaN read from a poisoned t is not clamped away by max(NaN, 0) = 0
CASES = [(256, 128, 28, 1, "none"), (256, 256, 28, 2, "relu"), (512, 512, 14, 1, "none"),
         (512, 512, 14, 2, "none"), (1024, 512, 7, 1, "relu6"), (40, 24, 9, 2, "none"),
         (36, 20, 10, 1, "none")]


def _kernel(case, dtype, accumulate=None, dependent=False, seed=0):
    m, c, h, stride, act = case
    rng = np.random.default_rng([seed, m, c, h])
    pw = (rng.standard_normal((m, c)) / np.sqrt(0.1 * c)).astype(np.float32)
    pw[rng.random((m, c)) >= 0.1] = 0
    dw = (rng.standard_normal((m, 1, 3, 3)) / 3).astype(np.float32)
    return sparsert.fuse_pointwise_depthwise(
        pw, dw, input_shape=(c, h, h), stride=stride, dtype=dtype, accumulate=accumulate,
        pw_epilogue={"bias": 0.1 * rng.standard_normal(m), "activation": "relu"},
        dw_epilogue={"bias": 0.1 * rng.standard_normal(m), "activation": act},
        dependent_launch=dependent)


def _run(gpu, kernel, loaded, x, t_buf=None, y_buf=None):
    """Launch once on fresh x; y and t poisoned unless given (then left as they are)."""
    x_buf = gpu.upload(encode(x, kernel.dtype))
    if y_buf is None:
        y_buf = gpu.alloc(int(np.prod(kernel.output_shape)) * np.dtype(kernel.storage).itemsize)
        gpu.poison(y_buf)
    if t_buf is None:
        t_buf = gpu.alloc(int(np.prod(kernel.scratch_shape)) * np.dtype(kernel.storage).itemsize)
        gpu.poison(t_buf)
    loaded.launch(gpu.stream, x_buf, y_buf, scratch_ptr=t_buf)
    gpu.synchronize()
    y = decode(gpu.download(y_buf, kernel.output_shape, kernel.storage), kernel.dtype)
    return y, t_buf, y_buf


@pytest.mark.parametrize("precision", [("fp32", None), ("fp16", None), ("bf16", None),
                                       ("fp16", "fp32")], ids=lambda p: "".join(filter(None, p)))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "pw{}x{}@{}-s{}-{}".format(*c))
def test_fused_kernel_matches_float64(gpu, case, precision):
    kernel = _kernel(case, *precision)
    assert kernel.resources.spills == 0
    rng = np.random.default_rng(7)
    with kernel.to_device(gpu.device) as loaded:
        x = kernel.random_inputs(rng)
        y, t_buf, y_buf = _run(gpu, kernel, loaded, x)
        ok, err, message = kernel.check(y, x)
        assert ok, message
        x2 = kernel.random_inputs(rng)           # again, over last launch's t and y
        y2, _, _ = _run(gpu, kernel, loaded, x2, t_buf, y_buf)
        ok, err, message = kernel.check(y2, x2)
        assert ok, message


def test_dependent_launch_chain(gpu):
    """Two fused kernels back to back with programmatic stream serialization: the second reads
    the first's y as its x."""
    first = _kernel((64, 32, 14, 1, "relu"), "fp16", dependent=True)
    m = 64
    rng = np.random.default_rng(3)
    pw = (rng.standard_normal((48, m)) / np.sqrt(0.1 * m)).astype(np.float32)
    pw[rng.random((48, m)) >= 0.1] = 0
    second = sparsert.fuse_pointwise_depthwise(
        pw, rng.standard_normal((48, 3, 3)) / 3, input_shape=(m, 14, 14), stride=2,
        dtype="fp16", pw_epilogue={"activation": "relu"}, dependent_launch=True)
    x = first.random_inputs(rng)
    item = np.dtype(first.storage).itemsize
    with first.to_device(gpu.device) as a, second.to_device(gpu.device) as b:
        x_buf = gpu.upload(encode(x, "fp16"))
        bufs = [gpu.alloc(int(np.prod(s)) * item) for s in (
            first.output_shape, first.scratch_shape, second.output_shape, second.scratch_shape)]
        for buf in bufs:
            gpu.poison(buf)
        a.launch(gpu.stream, x_buf, bufs[0], scratch_ptr=bufs[1])
        b.launch(gpu.stream, bufs[0], bufs[2], scratch_ptr=bufs[3])
        gpu.synchronize()
        mid = decode(gpu.download(bufs[0], first.output_shape, first.storage), "fp16")
        out = decode(gpu.download(bufs[2], second.output_shape, second.storage), "fp16")
    assert first.check(mid, x)[0]
    ok, _, message = second.check(out, mid)
    assert ok, message
