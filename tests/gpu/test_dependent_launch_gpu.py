"""Programmatic dependent launch on the GPU (sm_90): a chain of kernels of both families and
every streamed stage, each reading the output of the kernel before it (and some the output of
the one before that, as a residual), launched back to back with programmatic stream
serialization in a CUDA graph. Every buffer is poisoned (NaN) and the
input drawn fresh before each replay, so a kernel that read its input before the kernel before
it had finished would see NaN or the previous replay's values."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU for torch", allow_module_level=True)
if torch.cuda.get_device_capability()[0] < 9:
    pytest.skip("programmatic dependent launch needs sm_90", allow_module_level=True)

from sparsert_cli.api import Layer, compile_plans, plan_layers  # noqa: E402
from sparsert_cli.families.immediate import PlanParams  # noqa: E402
from sparsert_cli.families.streamed import StreamParams  # noqa: E402

pytestmark = pytest.mark.gpu
C, H, W = 32, 7, 7
CHAIN = [  # (kernel size, plan, activation, adds the output of two kernels back): immediate,
    # every streamed stage, K-slices, immediate k-split; no ReLU on some layers, so a NaN read
    # from a poisoned buffer is not clamped away
    (1, PlanParams(rows_per_group=4), "relu", False),
    (1, StreamParams(32, 1, 2, 3, 4, "shfl"), "none", False),
    (3, StreamParams(32, 1, 2, 3, 4, "smem"), "relu", True),
    (1, StreamParams(32, 1, 2, 3, 4, "ring"), "none", True),
    (3, StreamParams(32, 1, 2, 3, 4, "smem", k_slices=2), "none", False),
    (3, PlanParams(rows_per_group=4, k_split=2), "relu", True),
    (1, StreamParams(64, 1, 4, 1, 4, "smem"), "none", True),
]


def _chain(dtype):
    rng = np.random.default_rng(11)
    layers = []
    for i, (k, params, activation, residual) in enumerate(CHAIN):
        w = rng.standard_normal((C, C, k, k)).astype(np.float32) / np.sqrt(C * k * k * 0.2)
        w[rng.random(w.shape) < 0.8] = 0
        layers.append(Layer.of(f"l{i}", w, op="conv", input_shape=(1, C, H, W), padding=k // 2,
                               epilogue={"bias": list(rng.standard_normal(C) * 0.1),
                                         "activation": activation, "residual": residual},
                               dtype=dtype, plan=params))
    planned = plan_layers(layers, False, None, labels=False)
    major, minor = torch.cuda.get_device_capability()
    kernels = compile_plans(layers, planned, arch=f"sm_{major}{minor}", cache=False,
                            dependent_launch=True)
    assert all(getattr(k, "dependent_launch", False) for k in kernels), kernels
    return kernels


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_a_chain_of_both_families_overlaps_without_reading_early(dtype):
    kernels = _chain(dtype)
    assert {k.family for k in kernels} == {"immediate", "streamed"}
    store = torch.float32 if dtype == "fp32" else torch.float16
    loaded = [k.to_device(0) for k in kernels]
    assert all(lk.dependent_launch for lk in loaded)
    x = torch.empty(1, C, H, W, device="cuda", dtype=store)
    bufs = [torch.empty_like(x) for _ in kernels]

    def forward():
        stream = torch.cuda.current_stream().cuda_stream
        outs = [x]
        for lk, dst, (_, _, _, residual) in zip(loaded, bufs, CHAIN):
            lk.launch(stream, outs[-1].data_ptr(), dst.data_ptr(),
                      outs[-2].data_ptr() if residual else None)
            outs.append(dst)

    rng = np.random.default_rng(5)
    tol = 1e-4 if dtype == "fp32" else 3e-2
    try:
        for overlap in (True, False):
            for lk in loaded:
                lk.dependent_launch = overlap
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                forward()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                forward()
            for _ in range(10):
                host = rng.standard_normal((1, C, H, W)).astype(np.float32)
                for b in bufs:
                    b.fill_(float("nan"))
                x.copy_(torch.from_numpy(host).to(store))
                graph.replay()
                torch.cuda.synchronize()
                outs = [x.float().cpu().numpy().astype(np.float32)]
                for kernel, (_, _, _, residual) in zip(kernels, CHAIN):   # the interpreter
                    outs.append(np.asarray(kernel.run_cpu(
                        outs[-1], outs[-2] if residual else None), np.float32))
                want = outs[-1].astype(np.float64)
                got = bufs[-1].float().cpu().numpy()
                assert np.isfinite(got).all()
                err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
                assert err < tol, (overlap, err)
            del graph
    finally:
        for lk in loaded:
            lk.close()
