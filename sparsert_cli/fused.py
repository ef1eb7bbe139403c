"""Fused pointwise -> depthwise kernels in the public API (`sparsert.fuse_pointwise_depthwise`).

    kernel = sparsert.fuse_pointwise_depthwise(pw_weight, dw_weight, input_shape=(128, 28, 28),
                                               pw_epilogue={"bias": b1, "activation": "relu"},
                                               dw_epilogue={"bias": b2, "activation": "relu"})
    y = kernel.run_cpu(x)                                  # the CPU interpreter, block by block
    with kernel.to_device(0) as loaded:                    # GPU only
        loaded.launch(stream, x_ptr, y_ptr, scratch_ptr=t_ptr)

One kernel computes a batch-1 1x1 convolution (BN folded into its bias, an activation) and the
depthwise 3x3 convolution after it (padding 1, stride 1 or 2; its own bias and activation):
each block computes a group of the pointwise's output channels into the scratch buffer t and,
after a block barrier, the depthwise rows of those channels (families/immediate/fuse.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from .api import VERIFY_CHECKS, _cache, _target, _weight, layer_geometry, make_epilogue
from .build import build_all, build_fused, emit_fused, plan_fused_layers
from .compile import Resources
from .errors import CompileError, UserError
from .families.immediate.fuse import ARGUMENTS, FusedPlan, lower_fused
from .interp import PlanExecutionError, execute
from .problem_shape import ELEMENT_BYTES, precision_label
from .reference import check, pointwise_depthwise_reference
from .storage import device_type, rounded

ROLES = {"x": "input activations, 1 x C x H x W",
         "y": "output, 1 x M x Ho x Wo (the depthwise's), fully overwritten",
         "t": "scratch: the pointwise's output, 1 x M x H x W, caller-allocated and fully "
              "overwritten (launches that may overlap need one each)",
         "z": "all-zero buffer of M x H x W read for padding taps (allocated by to_device())"}


@dataclass(frozen=True, eq=False)
class FusedKernel:
    """A compiled fused pointwise -> depthwise kernel, its launch contract and its plan. The
    entry takes one 64-bit device pointer per `arguments` item (x, y, t, z), in order; grid and
    block are fixed; no shared memory. Not saved to disk (save() is for Kernel)."""

    entry: str
    cubin: bytes
    arch: str
    plan: FusedPlan
    pw_weight: np.ndarray            # M x C x 1 x 1 float32 (or a patterns.SparseWeight)
    dw_weight: np.ndarray            # M x 3 x 3 float32
    resources: Resources
    compile_seconds: float = 0.0
    cached: bool = False
    dependent_launch: bool = False
    verified: dict | None = None
    _source: str | None = None

    def __repr__(self) -> str:
        return (f"FusedKernel({self.entry}, {self.input_shape} -> {self.output_shape}, "
                f"{self.precision}, grid={self.grid}, block={self.block})")

    # -- contract ----------------------------------------------------------------------------
    @property
    def precision(self) -> str:
        return self.plan.precision

    @property
    def dtype(self) -> str:
        return self.plan.dtype

    @property
    def storage(self):
        """numpy type of the x / y / t buffers (bf16: uint16 bit patterns)."""
        return device_type(self.dtype)

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.plan.grid

    @property
    def block(self) -> tuple[int, int, int]:
        return self.plan.block

    @property
    def shared_bytes(self) -> int:
        return 0

    @property
    def stride(self) -> int:
        return self.plan.depthwise.geometry.stride

    @property
    def input_shape(self) -> tuple[int, ...]:
        g = self.plan.pointwise.geometry
        return (1, g.in_channels, g.height, g.width)

    @property
    def scratch_shape(self) -> tuple[int, ...]:
        g = self.plan.pointwise.geometry
        return (1, g.out_channels, g.out_height, g.out_width)

    @property
    def output_shape(self) -> tuple[int, ...]:
        g = self.plan.depthwise.geometry
        return (1, g.out_channels, g.out_height, g.out_width)

    @property
    def arguments(self) -> tuple[dict, ...]:
        """{name, kind, shape, dtype, role} of each pointer argument, in order."""
        dtype = {"fp16": "float16", "bf16": "bfloat16"}.get(self.dtype, "float32")
        shapes = {"x": self.input_shape, "y": self.output_shape, "t": self.scratch_shape,
                  "z": self.scratch_shape[1:]}
        return tuple({"name": a, "kind": "pointer", "shape": list(shapes[a]), "dtype": dtype,
                      "role": ROLES[a]} for a in ARGUMENTS)

    @cached_property
    def source(self) -> str:
        """The PTX (printed again from the plan when the build came from the cache)."""
        if self._source is not None:
            return self._source
        return emit_fused(self.plan, "ptx", self.arch, self.dependent_launch)

    # -- CPU ----------------------------------------------------------------------------------
    def run_cpu(self, x) -> np.ndarray:
        """Execute the kernel's IR on the CPU block by block (interp.execute_chain; x is first
        rounded to the storage type): float64 values shaped like the output."""
        x = np.asarray(x)
        if x.shape != self.input_shape:
            raise UserError(f"x has shape {x.shape}; this kernel takes {self.input_shape}")
        chain = lower_fused(self.plan, self.dependent_launch)
        return execute(chain, rounded(x, self.dtype)).reshape(self.output_shape)

    def random_inputs(self, rng: np.random.Generator) -> np.ndarray:
        """Standard-normal x of the storage type's values."""
        return rounded(rng.standard_normal(self.input_shape), self.dtype).astype(np.float32)

    def reference(self, x) -> tuple[np.ndarray, np.ndarray]:
        """(float64 reference, magnitude that scales the tolerance) of the two layers
        (reference.pointwise_depthwise_reference)."""
        pw, dw = self.plan.pointwise.epilogue, self.plan.depthwise.epilogue
        weight = self.pw_weight.dense() if hasattr(self.pw_weight, "dense") else self.pw_weight
        x = np.asarray(x, dtype=np.float64).reshape(self.input_shape)
        return pointwise_depthwise_reference(weight, self.dw_weight, x, self.stride, self.dtype,
                                             pw.bias, pw.activation, dw.bias, dw.activation)

    def check(self, out, x) -> tuple[bool, float, str]:
        """Compare an output (from the GPU or run_cpu) with the float64 reference."""
        ref, mag = self.reference(x)
        return check(out, ref, mag, self.dtype, 9)

    def verify_cpu(self, seed: int = 0, checks: int = VERIFY_CHECKS) -> dict:
        """run_cpu on `checks` fresh random inputs vs float64: {"ok", "max_err", "message",
        "checks"}."""
        rng = np.random.default_rng([seed, int(self.plan.digest()[:8], 16)])
        worst = 0.0
        for _ in range(checks):
            x = self.random_inputs(rng)
            try:
                out = self.run_cpu(x)
            except PlanExecutionError as exc:
                return {"ok": False, "max_err": None, "message": str(exc), "checks": checks}
            ok, err, message = self.check(out, x)
            worst = max(worst, err)
            if not ok:
                return {"ok": False, "max_err": err, "message": message, "checks": checks}
        return {"ok": True, "max_err": worst, "message": "ok", "checks": checks}

    # -- GPU ----------------------------------------------------------------------------------
    def to_device(self, device: int = 0):
        """Load onto `device` (primary context): a gpu.loaded.LoadedKernel whose
        launch(stream, x_ptr, y_ptr, scratch_ptr=t_ptr) runs on the caller's stream (t: the
        scratch buffer, prod(scratch_shape) elements of the storage type)."""
        from .gpu.loaded import LoadedKernel

        zero = int(np.prod(self.scratch_shape)) * ELEMENT_BYTES[self.dtype]
        return LoadedKernel(self.cubin, self.entry, self.grid, self.block,
                            [a["name"] for a in self.arguments], zero, 0, device,
                            dependent_launch=self.dependent_launch)


def fuse_pointwise_depthwise(pw_weight, dw_weight, *, input_shape, stride: int = 1,
                             pw_epilogue=None, dw_epilogue=None, dtype: str = "fp32",
                             accumulate: str | None = None, rows_per_group: int | None = None,
                             vector_width: int | None = None,
                             depthwise_pairs: bool | None = None,
                             allow_fp16_flush: bool = False, arch: str | None = None,
                             cache=True, dependent_launch: bool = False, verify: bool = False,
                             seed: int = 0) -> FusedKernel:
    """Compile one kernel for a batch-1 1x1 convolution and the depthwise 3x3 convolution over
    its output (MobileNet's pointwise -> depthwise pairs), specialised to both weights.

    pw_weight: M x C or M x C x 1 x 1 (numpy or scipy.sparse); input_shape: (C, H, W) or
      (1, C, H, W). dw_weight: M x 3 x 3 or M x 1 x 3 x 3 (PyTorch's groups=M layout), padding
      1, `stride` 1 or 2. pw_epilogue / dw_epilogue: None or {"bias": M values, "activation":
      "none" | "relu" | "relu6"} (no residual, no token-major output). dtype / accumulate: as
      compile_kernel's (fp32, fp16 with half2 sums, fp16acc32, bf16); the pointwise output
      is stored in the storage type in between, as an unfused pair would store it.
    rows_per_group: at most this many channels per block (fewer where a thread's registers
      would not hold them: fuse_params); vector_width: the pointwise's columns a thread;
      depthwise_pairs: the depthwise on column-pair windows (2-byte storage, stride 1, even
      width) or not (defaults for all three: families/immediate/fuse.fuse_params).
    arch: e.g. "sm_90" (default: the local GPU's, else sm_90). cache: as compile_kernel's.
    dependent_launch: wait for the kernel before (programmatic dependent launch, sm_90+).
    verify: run verify_cpu(seed) and keep its result in `kernel.verified`.
    Launch: x, y, a caller-allocated scratch buffer t (1 x M x H x W) and the zero buffer
    to_device() allocates. Errors in any argument raise UserError (one line).
    """
    plan, weight, dw, arch = _plan_pair(
        pw_weight, dw_weight, input_shape=input_shape, stride=stride, pw_epilogue=pw_epilogue,
        dw_epilogue=dw_epilogue, dtype=dtype, accumulate=accumulate,
        rows_per_group=rows_per_group, vector_width=vector_width,
        depthwise_pairs=depthwise_pairs, allow_fp16_flush=allow_fp16_flush, arch=arch)
    build, source = build_fused(plan, arch, _cache(cache), threads=os.cpu_count() or 1,
                                keep_source=True, dependent_launch=dependent_launch)
    kernel = _kernel(build, plan, weight, dw, dependent_launch, source)
    return replace(kernel, verified=kernel.verify_cpu(seed)) if verify else kernel


def compile_pairs(pairs: list[dict], *, arch: str | None = None, cache=True,
                  dependent_launch: bool = False, jobs: int | None = None,
                  on_done=None) -> list[FusedKernel | UserError]:
    """fuse_pointwise_depthwise for several pairs at once, compiled across `jobs` processes
    (default: one per core; cache hits are not compiled again). `pairs`: each pair's keyword
    arguments of fuse_pointwise_depthwise (pw_weight, dw_weight, input_shape, stride, epilogues,
    dtype, ...; not arch, cache, dependent_launch, verify). Returns, in order, each pair's
    kernel or the UserError that refused it (a bad argument, or a compile that failed).
    on_done(i): called once for each pair, as its compile (or cache hit) ends or as it is
    refused."""
    planned: list[tuple | UserError] = []
    for i, kwargs in enumerate(pairs):
        try:
            planned.append(_plan_pair(**kwargs, arch=arch))
        except UserError as exc:
            planned.append(exc)
            if on_done:
                on_done(i)
    built: dict[int, object] = {}
    for target in sorted({p[3] for p in planned if not isinstance(p, UserError)}):
        mine = [i for i, p in enumerate(planned) if not isinstance(p, UserError)
                and p[3] == target]         # one arch in practice: the local GPU's, or arch
        done = (lambda j, *_, mine=mine: on_done(mine[j])) if on_done else None
        built.update(zip(mine, build_all([planned[i][0] for i in mine], "ptx", target,
                                         _cache(cache), jobs, on_done=done,
                                         dependent_launch=dependent_launch)))
    out: list[FusedKernel | UserError] = []
    for i, p in enumerate(planned):
        if isinstance(p, UserError):
            out.append(p)
            continue
        build = built[i]
        if isinstance(build, UserError):
            out.append(build)
        elif isinstance(build, CompileError):
            out.append(UserError(f"the fused kernel did not compile: "
                                 f"{str(build).splitlines()[0]}"))
        elif isinstance(build, Exception):
            raise build
        else:
            plan, weight, dw, _ = p
            out.append(_kernel(build, plan, weight, dw, dependent_launch, None))
    return out


def _kernel(build, plan, weight, dw, dependent_launch: bool, source) -> FusedKernel:
    rows = plan.pointwise.geometry.out_channels
    return FusedKernel(build.entry, build.cubin, build.arch, plan, weight,
                       dw.reshape(rows, 3, 3).astype(np.float32), build.resources,
                       build.compile_seconds, build.cached, dependent_launch, _source=source)


def _plan_pair(pw_weight, dw_weight, *, input_shape, stride=1, pw_epilogue=None,
               dw_epilogue=None, dtype="fp32", accumulate=None, rows_per_group=None,
               vector_width=None, depthwise_pairs=None, allow_fp16_flush=False, arch=None):
    """(fused plan, the 1x1 weight M x C x 1 x 1, the depthwise weight, arch), arguments
    checked as fuse_pointwise_depthwise says."""
    weight = _weight(pw_weight)
    if weight.ndim == 2:
        weight = weight.reshape(weight.shape[0], weight.shape[1], 1, 1)
    if input_shape is not None and len(input_shape) == 4 and input_shape[0] != 1:
        raise UserError(f"a fused kernel takes one image (batch 1), got input_shape "
                        f"{tuple(input_shape)}")
    weight, geometry = layer_geometry(weight, "conv", input_shape)
    rows = geometry.out_channels
    precision = precision_label(dtype, accumulate)
    arch = _target("immediate", "ptx", arch, {precision})
    if rows_per_group is not None and (isinstance(rows_per_group, bool) or not isinstance(
            rows_per_group, (int, np.integer)) or not 1 <= rows_per_group <= 64):
        raise UserError(f"rows_per_group must be an integer in 1..64, got {rows_per_group!r}")
    if vector_width is not None and (isinstance(vector_width, bool)
                                     or vector_width not in (1, 2, 4, 8)):
        raise UserError(f"vector_width must be 1, 2, 4 or 8, got {vector_width!r}")
    if depthwise_pairs not in (None, True, False):
        raise UserError(f"depthwise_pairs must be True, False or None, got {depthwise_pairs!r}")
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) \
            or stride not in (1, 2):
        raise UserError(f"stride must be 1 or 2, got {stride!r}")
    dw = np.asarray(dw_weight)
    if dw.dtype.kind not in "fiub":
        raise UserError(f"dw_weight must be numeric, got {dw.dtype}")
    plan = plan_fused_layers(weight, geometry, dw, stride, make_epilogue(pw_epilogue, rows),
                             make_epilogue(dw_epilogue, rows), precision, allow_fp16_flush,
                             rows_per_group, vector_width, depthwise_pairs)
    return plan, weight, dw, arch


__all__ = ["FusedKernel", "fuse_pointwise_depthwise"]
