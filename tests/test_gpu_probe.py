"""GPU-module checks that run on any machine: the probe, lazy imports, and the host-side parts
of the runtime and baselines (parameter packing, PTX/C++ that must assemble, references)."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import numpy as np
import pytest

from sparsert_cli import reference as rf
from sparsert_cli.benchmark import timing_summary
from sparsert_cli.compile import cpp_to_cubin, ptx_to_cubin
from sparsert_cli.errors import NoGpuError
from sparsert_cli.gpu import baselines as bl
from sparsert_cli.gpu import runtime, timing
from sparsert_cli.gpu.baselines._base import mismatch


def test_have_gpu_returns_bool_without_raising():
    assert isinstance(runtime.have_gpu(), bool)
    assert runtime.have_gpu() is runtime.have_gpu()            # cached


@pytest.mark.skipif(runtime.have_gpu(), reason="a GPU is present")
def test_gpu_without_driver_is_one_line_no_gpu_error():
    with pytest.raises(NoGpuError) as caught:
        runtime.Gpu()
    message = str(caught.value)
    assert message.startswith("no CUDA driver or GPU found: ") and "\n" not in message
    assert caught.value.code == 3


def test_import_touches_no_gpu_library():
    code = ("import sys, sparsert_cli.gpu.runtime, sparsert_cli.gpu.baselines, "
            "sparsert_cli.gpu.nvml, sparsert_cli.gpu.timing, sparsert_cli.gpu.loaded, "
            "sparsert_cli.benchmark, sparsert_cli.api, sparsert_cli.bench\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('nvmath', 'cudnn', 'pynvml')"
            " or m == 'cuda.bindings.driver']\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_pack_params_points_at_each_value():
    args = [0x7F00_0000_1000, 2**64 - 1, 0]
    values, pointers = runtime.pack_params(args)
    assert pointers.dtype == np.uint64 and len(pointers) == 3
    assert [ctypes.c_uint64.from_address(int(p)).value for p in pointers] == args
    assert len(runtime.pack_params([])[1]) == 0


@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_90a", "sm_100"])
def test_runtime_ptx_assembles(arch):
    header = runtime.ptx_header(arch)
    assert ptx_to_cubin(header + timing._SPIN_PTX, arch).cubin
    assert ptx_to_cubin(header + runtime.EMPTY_PTX, arch).cubin


def test_timing_summaries():
    summary = timing_summary(timing.Timing((5.0, 1.0, 3.0, 2.0, 4.0), "graph", 20))
    assert summary["median_us"] == 3.0 and summary["p20_us"] == pytest.approx(1.8)
    assert summary["p80_us"] == pytest.approx(4.2)
    assert summary["method"] == "graph" and summary["samples_us"] == [5.0, 1.0, 3.0, 2.0, 4.0]


def test_tolerance_scales_with_sqrt_k_and_precision():
    assert rf.tolerance("fp32", 400) == pytest.approx(2 * rf.tolerance("fp32", 100))
    assert rf.tolerance("fp32", 64) < rf.tolerance("tf32", 64) == rf.tolerance("fp16", 64)
    assert rf.tolerance("fp32", 1) == pytest.approx(8 * 2.0 ** -23)
    assert rf.tolerance("bf16", 64) == pytest.approx(2.0 ** -7 + 64 * 2.0 ** -23)
    with pytest.raises(ValueError):
        rf.tolerance("fp8", 8)


def test_mismatch_reports_nan_and_error():
    ref, mag = np.array([1.0, 2.0]), np.ones(2)
    assert mismatch(ref.copy(), ref, mag, "fp32", 4) == ""
    assert "NaN" in mismatch(np.array([1.0, np.nan]), ref, mag, "fp32", 4)
    assert "off" in mismatch(np.array([1.0, 2.001]), ref, mag, "fp32", 4)


def emulate_im2col_kernel(x, r, s, stride, padding):
    """The index arithmetic of the im2col CUDA kernel, run element by element on the host."""
    n, c, h, w = x.shape
    ho, wo = rf.conv_out_hw(h, w, r, s, stride, padding)
    rows, cols = c * r * s, n * ho * wo
    out, flat = np.zeros(rows * cols), x.ravel()
    for idx in range(rows * cols):
        row, j = divmod(idx, cols)
        ss, rr, cc = row % s, (row // s) % r, row // (r * s)
        ow, oh, nn = j % wo, (j // wo) % ho, j // (wo * ho)
        ih, iw = oh * stride - padding + rr, ow * stride - padding + ss
        if 0 <= ih < h and 0 <= iw < w:
            out[idx] = flat[((nn * c + cc) * h + ih) * w + iw]
    return out.reshape(rows, cols)


@pytest.mark.parametrize("shape,r,s,stride,padding", [((2, 5, 9, 11), 3, 3, 1, 1),
                                                      ((2, 5, 9, 11), 3, 3, 2, 0),
                                                      ((1, 3, 7, 6), 3, 2, 2, 1)])
def test_im2col_index_math_and_source(shape, r, s, stride, padding):
    x = np.random.default_rng(0).standard_normal(shape)
    assert np.array_equal(emulate_im2col_kernel(x, r, s, stride, padding),
                          rf.im2col(x, r, s, stride, padding))
    assert cpp_to_cubin(bl.im2col_source(shape, r, s, stride, padding), "sm_90").cubin


def test_conv_reference_matches_direct_loops():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((2, 3, 6, 7)), rng.standard_normal((4, 3, 3, 3))
    y, mag = rf.reference_and_magnitude(w, x, 2, 1)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    direct = np.zeros_like(y)
    for i in range(y.shape[2]):
        for j in range(y.shape[3]):
            patch = padded[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            direct[:, :, i, j] = np.einsum("ncrs,kcrs->nk", patch, w)
            assert np.all(mag[:, :, i, j] >= np.abs(direct[:, :, i, j]) - 1e-12)
    assert np.allclose(y, direct, atol=1e-12)


@pytest.mark.parametrize("mode,stride,padding,out_hw", [("fp32", 1, 1, (9, 11)),
                                                        ("fp16", 2, 0, (4, 5))])
def test_cudnn_graph_declares_nchw_output(mode, stride, padding, out_hw):
    pytest.importorskip("cudnn")
    _, _, _, y = bl.conv_graph((2, 5, 9, 11), (7, 5, 3, 3), stride, padding, mode)
    ho, wo = out_hw
    assert y.get_dim() == [2, 7, ho, wo]
    assert y.get_stride() == [7 * ho * wo, ho * wo, wo, 1]
