"""The one place sparsert_cli.torch reaches into the kernel library: compile_layer().

It calls the public API (`sparsert_cli.api.compile_kernel`) when this checkout has it, and
otherwise plans and builds through the internals (build/plan/interp) with the same contract for
what sparsify_ uses: run_cpu(), to_device(), plan_params, family, nnz, tuned.
"""

from __future__ import annotations

import numpy as np

from sparsert_cli.errors import UserError


class _InternalKernel:
    """The subset of api.Kernel sparsify_ needs, built from the internals (CPU only)."""

    family = "immediate"
    tuned = False

    def __init__(self, plan, op: str, input_shape, output_shape):
        self.plan, self.op = plan, op
        self.plan_params, self.nnz = plan.params, plan.nnz
        self.input_shape, self.output_shape = tuple(input_shape), tuple(output_shape)

    def run_cpu(self, x, residual=None) -> np.ndarray:
        from sparsert_cli.interp import execute

        store = np.float16 if self.plan.dtype == "fp16" else np.float32
        res = None if residual is None else np.asarray(residual).astype(store)
        out = execute(self.plan, np.asarray(x).astype(store), res)
        return out.reshape(self.output_shape)

    def to_device(self, device: int = 0):
        raise UserError("loading kernels onto a GPU needs sparsert_cli.api (a newer sparsert)")


def _internal(weight, op, input_shape, n, stride, padding, dtype, epilogue, arch, cache):
    from sparsert_cli.build import Epilogue, build_kernel, make_plan
    from sparsert_cli.cache import KernelCache
    from sparsert_cli.compile import DEFAULT_ARCH
    from sparsert_cli.problems import Problem

    if op == "gemm":
        m, k = weight.shape
        problem = Problem("layer", "gemm", m, k, height=1, width=n).validate("layer")
        weight, shapes = weight.reshape(m, k, 1, 1), ((k, n), (m, n))
    else:
        b, c, h, w = input_shape
        problem = Problem("layer", f"conv{weight.shape[2]}x{weight.shape[2]}", weight.shape[0], c,
                          height=h, width=w, batch=b, stride=stride,
                          padding=padding).validate("layer")
        shapes = tuple(input_shape), problem.output_shape
    bias = epilogue.get("bias")
    epi = Epilogue(None if bias is None else tuple(float(v) for v in bias),
                   epilogue.get("activation", "none"), bool(epilogue.get("residual")))
    plan = make_plan(problem, weight, None, epi, precision=dtype)
    build_kernel(plan, "ptx", arch or DEFAULT_ARCH, KernelCache() if cache else None)
    return _InternalKernel(plan, op, *shapes)


def compile_layer(weight: np.ndarray, *, op: str, input_shape=None, n: int | None = None,
                  stride: int = 1, padding: int = 0, dtype: str = "fp32",
                  epilogue: dict | None = None, tuned=None, arch: str | None = None,
                  cache: bool = True):
    """A compiled kernel for one layer: gemm (weight M x K, activations K x N) or conv (weight
    M x C x R x S, input_shape (B, C, H, W)); epilogue {"bias", "activation"}."""
    epilogue = epilogue or {}
    try:
        from sparsert_cli.api import compile_kernel
    except ImportError:
        return _internal(weight, op, input_shape, n, stride, padding, dtype, epilogue, arch,
                         cache)
    if op == "gemm":
        return compile_kernel(weight, op="gemm", n=n, dtype=dtype, epilogue=epilogue,
                              tuned=tuned, arch=arch, cache=cache)
    return compile_kernel(weight, op="conv", input_shape=tuple(input_shape), stride=stride,
                          padding=padding, dtype=dtype, epilogue=epilogue, tuned=tuned,
                          arch=arch, cache=cache)


def tune_layer(weight: np.ndarray, *, op: str, label: str, input_shape=None, n=None,
               stride: int = 1, padding: int = 0, dtype: str = "fp32",
               epilogue: dict | None = None, tuned=None, arch: str | None = None) -> None:
    """Tune one layer on the local GPU and save its winner into the tuned-plan database `tuned`
    (None: the default one), where compile_layer(plan="auto") then finds it."""
    try:
        from sparsert_cli.api import Layer
        from sparsert_cli.gpu.runtime import Gpu
        from sparsert_cli.tune import TunedDB
        from sparsert_cli.tuning import LocalExecutor, tune_layers
    except ImportError:
        raise UserError("tuning from PyTorch needs sparsert_cli.tuning (a newer sparsert)") \
            from None
    db = tuned if isinstance(tuned, TunedDB) else TunedDB() if tuned in (None, True, False) \
        else TunedDB(tuned)
    layer = Layer.of(label, weight, op=op, input_shape=input_shape, n=n, stride=stride,
                     padding=padding, epilogue=epilogue, dtype=dtype)
    with Gpu() as gpu:
        tune_layers([layer], LocalExecutor(gpu, arch=arch), db)
    db.save()
