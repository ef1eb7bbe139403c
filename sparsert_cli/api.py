"""sparsert's public Python API: `import sparsert_cli as sparsert`.

    kernel = sparsert.compile_kernel(weight, op="gemm", n=256)      # -> Kernel
    y = kernel.run_cpu(x)                                            # the CPU interpreter
    kernel.save("out.sparsert"); sparsert.Kernel.from_dir("out.sparsert")
    with kernel.to_device(0) as loaded:                              # GPU only
        loaded.launch(torch.cuda.current_stream().cuda_stream, x.data_ptr(), y.data_ptr())

A Kernel is the compiled code plus its launch contract (entry, grid, block, shared bytes, the
ordered pointer arguments with shapes and dtypes) and the plan it was made from, so it can be
executed on the CPU, verified against float64, written out as `sparsert gen` does, and loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from . import __version__
from .build import (EMITTERS, build_kernel, check_emitter, code_version, current_family, emit,
                    layer_family, plan_weight)
from .cache import KernelCache
from .compile import Resources
from .errors import UserError
from .interp import PlanExecutionError, execute
from .families import families, family_of_params, get_family
from .families.immediate import Plan, PlanParams, build_plan
from .patterns import SparseWeight, dense, pattern_hash, to_csr
from .problem_shape import (ACTIVATIONS, ELEMENT_BYTES, PRECISIONS, Epilogue, Geometry,
                            precision_label, from_token_layout, to_token_layout)
from .render import printer_for
from .storage import device_type, rounded
from .reference import check, reference_and_magnitude

FAMILY, FAMILY_VERSION = current_family("ptx")
OPS = ("gemm", "conv")
VERIFY_CHECKS = 2          # fresh random inputs each
MANIFEST = "manifest.json"
CUBIN = "kernel.cubin"
WEIGHTS = "weights.npz"    # the weight (and bias) a saved kernel was made from: run_cpu needs them
OUTPUT_FILES = {"kernel.ptx", "kernel.cu", CUBIN, MANIFEST, WEIGHTS}
ROLES = {"x": "input activations (NCHW; a gemm's K x N matrix)",
         "y": "output (NCHW; a gemm's M x N matrix, N x M when token-major), fully overwritten",
         "res": "residual added before the activation, same shape as y",
         "z": "all-zero buffer read for padding taps (allocated by to_device())"}


# ---- inputs: weight, shapes, epilogue, plan ----------------------------------------------------
def _weight(weight):
    """A float32 array, or a patterns.SparseWeight (scipy.sparse input stays sparse)."""
    if sp.issparse(weight):
        csr = sp.csr_matrix(weight, dtype=np.float32)
        csr.sum_duplicates()
        csr.eliminate_zeros()
        csr.sort_indices()
        if not np.all(np.isfinite(csr.data)):
            raise UserError("weight holds NaN/Inf values or values beyond the float32 range")
        return SparseWeight(csr, tuple(int(d) for d in csr.shape))
    if isinstance(weight, SparseWeight):
        return weight
    array = np.asarray(weight)
    if array.dtype.kind not in "fiub" or array.ndim not in (2, 4) or array.size == 0:
        raise UserError(f"weight must be a non-empty numeric 2-D (M x K) or 4-D (M x C x R x S) "
                        f"array or scipy sparse matrix, got {array.dtype} shape {array.shape}")
    with np.errstate(over="ignore"):
        dense = array.astype(np.float32)
    if not np.all(np.isfinite(dense)):
        raise UserError("weight holds NaN/Inf values or values beyond the float32 range")
    return dense


def _int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def layer_geometry(weight, op: str, input_shape=None, n=None, stride: int = 1,
                   padding: int = 0) -> tuple[np.ndarray | SparseWeight, Geometry]:
    """(M x C x R x S weight, Geometry) for a layer, or a UserError saying what is wrong.

    gemm: weight M x K, activations K x N (give n, or input_shape=(K, N)).
    conv: weight M x C x R x S (R == S), activations input_shape=(batch, C, H, W) or (C, H, W).
    """
    weight = _weight(weight)
    if op == "gemm":
        if weight.ndim != 2:
            raise UserError(f"a gemm weight is 2-D (M x K), got shape {weight.shape}")
        m, k = weight.shape
        if input_shape is not None:
            if n is not None or len(input_shape) != 2 or input_shape[0] != k:
                raise UserError(f"a gemm takes n= or input_shape=(K={k}, N), got "
                                f"input_shape={input_shape} n={n}")
            n = input_shape[1]
        if n is None:
            raise UserError("a gemm needs n (the number of activation columns)")
        if (stride, padding) != (1, 0):
            raise UserError("stride and padding are for convolutions")
        geometry = Geometry(1, k, 1, _int("n", n, 1), m)
        return weight.reshape(m, k, 1, 1), geometry.validate()
    if op != "conv":
        raise UserError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    if n is not None:
        raise UserError("n is for gemm; a convolution takes input_shape=(batch, C, H, W)")
    if weight.ndim != 4 or weight.shape[2] != weight.shape[3]:
        raise UserError(f"a conv weight is 4-D M x C x R x S with R == S, got {weight.shape}")
    if input_shape is None or len(input_shape) not in (3, 4):
        raise UserError(f"a conv needs input_shape=(batch, C, H, W), got {input_shape!r}")
    batch, c, h, w = (1, *input_shape) if len(input_shape) == 3 else input_shape
    if c != weight.shape[1]:
        raise UserError(f"input has {c} channels but the weight expects {weight.shape[1]}")
    geometry = Geometry(_int("batch", batch, 1), c, _int("height", h, 1), _int("width", w, 1),
                        weight.shape[0], weight.shape[2], _int("stride", stride, 1),
                        _int("padding", padding, 0))
    return weight, geometry.validate()


def make_epilogue(epilogue, rows: int) -> Epilogue:
    """None, an Epilogue, or {"bias": values (M), "activation": ..., "residual": bool}."""
    if epilogue is None:
        return Epilogue()
    if isinstance(epilogue, Epilogue):
        doc = {"bias": epilogue.bias, "activation": epilogue.activation,
               "residual": epilogue.residual, "token_major": epilogue.token_major,
               "planes": epilogue.planes}
    elif isinstance(epilogue, dict):
        unknown = sorted(set(epilogue) - {"bias", "activation", "residual", "token_major",
                                          "planes"})
        if unknown:
            raise UserError(f"unknown epilogue key {unknown[0]!r} (bias, activation, residual, "
                            f"token_major, planes)")
        doc = epilogue
    else:
        raise UserError(f"epilogue must be a dict or an Epilogue, got {type(epilogue).__name__}")
    bias = doc.get("bias")
    if bias is not None:
        values = np.asarray(bias, dtype=np.float64).ravel()
        with np.errstate(over="ignore"):
            bias32 = values.astype(np.float32)
        if values.size != rows or not np.all(np.isfinite(bias32)):
            raise UserError(f"bias must hold {rows} finite float32 values, got {values.size}")
        bias = tuple(float(v) for v in bias32)
    activation = doc.get("activation", "none") or "none"
    if activation not in ACTIVATIONS:
        raise UserError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    planes = doc.get("planes", 0) or 0
    if isinstance(planes, bool) or not isinstance(planes, (int, np.integer)) or planes < 0:
        raise UserError(f"planes must be an int >= 0 (rows per output plane), got {planes!r}")
    return Epilogue(bias, activation, bool(doc.get("residual", False)),
                    bool(doc.get("token_major", False)), int(planes))


def _tuned_db(tuned):
    from .tune import TunedDB

    if tuned is False:
        return None
    if tuned is None:
        return TunedDB()
    return tuned if isinstance(tuned, TunedDB) else TunedDB(tuned)


def tuned_params(geometry: Geometry, weight, precision: str, tuned=None,
                 gpu_name: str | None = None, emit: str = "ptx", family: str = "auto"):
    """The tuned winner's parameters for this layer, GPU, precision and code version: the
    fastest over every registered family (or `family` alone), or None."""
    db = _tuned_db(tuned)
    if db is None:
        return None
    from .gpu.runtime import detect_gpu_name

    found = db.best(pattern_hash(weight), geometry, gpu_name or detect_gpu_name(), precision,
                    emit, family)
    return found[1] if found else None


def plan_for(layer: "Layer", tuned=None, gpu_name: str | None = None,
             emit: str = "ptx", arch: str | None = None) -> tuple[Plan, bool]:
    """(plan, tuned?) of a layer. plan "auto": a tuned winner of any family (or of the layer's
    `family`), else the cost model's choice for `gpu_name`; a dict: parameters over the cost
    model's choice, unless a winner exists (a config's `plan:` applies only to untuned layers);
    a family's params object (e.g. PlanParams): exactly those. `arch`: the cost model ranks
    only plans a block of that target holds (None: as for sm_90)."""
    choice = layer.plan
    explicit = not isinstance(choice, (str, dict)) and any(
        isinstance(choice, f.params) for f in families())
    if not (explicit or isinstance(choice, dict) or choice == "auto"):
        raise UserError(f"plan must be 'auto', a family's parameters (PlanParams, StreamParams) "
                        f"or a dict, got {choice!r}")
    params = None if explicit else tuned_params(
        layer.geometry, layer.weight, layer.precision, tuned, gpu_name, emit,
        layer_family(layer.epilogue, layer.family))
    if params is not None and arch is not None:     # a winner of another GPU's arch may not fit
        owner = family_of_params(params)
        try:
            fitted = owner.fit_params(layer.geometry, params, PRECISIONS[layer.precision][0])
        except UserError:
            fitted = None                            # plan_weight says why, as before
        if owner.fits is not None and fitted is not None and not owner.fits(
                layer.geometry, fitted, arch):
            params = None
    was_tuned = params is not None
    if explicit:
        params = choice.validate()
    overrides = choice if isinstance(choice, dict) and not was_tuned else None
    plan = plan_weight(layer.geometry, layer.weight, params, layer.epilogue, overrides,
                       layer.precision, layer.allow_fp16_flush, layer.family, gpu_name, arch)
    return plan, was_tuned


def layer_inputs(geometry: Geometry, dtype: str, residual: bool, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """Standard-normal NCHW x (and residual) as float32 arrays holding values of the storage
    type `dtype` (fp16 / bf16 kernels get representable values: the kernel reads them exactly)."""
    g = geometry
    x = rng.standard_normal((g.batch, g.in_channels, g.height, g.width))
    x = rounded(x, dtype).astype(np.float32)
    out_shape = (g.batch, g.out_channels, g.out_height, g.out_width)
    res = (rounded(rng.standard_normal(out_shape), dtype).astype(np.float32) if residual
           else None)
    return x, res


def layer_reference(weight: np.ndarray, geometry: Geometry, epilogue: Epilogue, x, res=None):
    """(float64 reference, magnitude) of a layer, NCHW; token-major layers: N x M, or
    (M / P) x N x P in planes (and `res` holds its values in that order)."""
    g = geometry
    x = np.asarray(x).reshape(g.batch, g.in_channels, g.height, g.width)
    if not epilogue.token_major:
        return reference_and_magnitude(dense(weight), x, g.stride, g.padding, epilogue.bias,
                                       res, epilogue.activation)
    m, n = g.out_channels, g.out_pixels
    if res is not None:
        res = from_token_layout(res, m, n, epilogue.planes).reshape(1, m, 1, n)
    ref, mag = reference_and_magnitude(dense(weight), x, g.stride, g.padding, epilogue.bias,
                                       res, epilogue.activation)
    return (to_token_layout(ref.reshape(m, n), epilogue.planes),
            to_token_layout(mag.reshape(m, n), epilogue.planes))


def plan_inputs(plan: Plan, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """layer_inputs() for a plan's shape, storage type and epilogue."""
    return layer_inputs(plan.geometry, plan.dtype, plan.epilogue.residual, rng)


def plan_reference(plan: Plan, weight: np.ndarray, x, res=None):
    """layer_reference() of a plan's layer."""
    return layer_reference(weight, plan.geometry, plan.epilogue, x, res)


def verify_plan(plan: Plan, weight: np.ndarray, rng: np.random.Generator,
                checks: int = VERIFY_CHECKS) -> dict:
    """Execute the plan on the CPU (float64) for `checks` fresh random inputs and compare each
    element with the float64 reference: {"ok", "max_err", "message", "checks"}."""
    worst = 0.0
    for _ in range(checks):
        x, res = plan_inputs(plan, rng)
        try:
            out = execute(plan, x, res)
        except PlanExecutionError as exc:
            return {"ok": False, "max_err": None, "message": str(exc), "checks": checks}
        ref, mag = plan_reference(plan, weight, x, res)
        ok, err, message = check(out, ref, mag, plan.dtype, plan.geometry.taps)
        worst = max(worst, err)
        if not ok:
            return {"ok": False, "max_err": err, "message": message, "checks": checks}
    return {"ok": True, "max_err": worst, "message": "ok", "checks": checks}


def plan_stats(plan) -> dict:
    """A plan's size in its family's terms."""
    if hasattr(plan, "groups"):
        return {"row_groups": len(plan.groups), "loads": plan.loads}
    return {"workers": plan.workers, "rows": len(plan.row_out),
            "data_bytes": plan.data_bytes}


# ---- the kernel --------------------------------------------------------------------------------
def _arguments(plan: Plan) -> tuple[dict, ...]:
    geo = plan.geometry
    out = (list(plan.epilogue.token_shape(geo.out_channels, geo.out_pixels))  # N x M
           if plan.epilogue.token_major
           else [geo.batch, geo.out_channels, geo.out_height, geo.out_width])
    shapes = {"x": [geo.batch, geo.in_channels, geo.height, geo.width], "y": out, "res": out,
              "z": [geo.in_channels, geo.height, geo.width]}
    dtype = {"fp16": "float16", "bf16": "bfloat16"}.get(plan.dtype, "float32")
    return tuple({"name": a, "kind": "pointer", "shape": shapes[a], "dtype": dtype,
                  "role": ROLES[a]} for a in plan.arguments)


@dataclass(frozen=True, eq=False)
class Kernel:
    """A compiled kernel, its launch contract and the plan it came from. Launch contract: the
    entry takes one 64-bit device pointer per `arguments` item, in order; grid and block are
    fixed; `shared_bytes` is static shared memory; `dynamic_shared_bytes` (a property of the
    plan's parameters: the streamed tile stage's image) is asked for at every launch."""

    entry: str
    cubin: bytes
    emitter: str                     # "ptx" or "cuda": the language of `source`
    arch: str
    op: str                          # "gemm" or "conv"
    geometry: Geometry
    epilogue: Epilogue
    plan_params: PlanParams
    precision: str                   # fp32, fp16 (half2 sums), fp16acc32 or bf16 (fp32 sums)
    resources: Resources
    nnz: int
    pattern_hash: str | None
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int                # static shared memory the entry declares
    arguments: tuple[dict, ...]      # {name, kind, shape, dtype, role}, in parameter order
    plan_stats: dict                 # row_groups, loads
    family: str = FAMILY
    family_version: str = FAMILY_VERSION
    tuned: bool = False
    compile_seconds: float = 0.0
    cached: bool = False
    plan: Plan | None = None         # None for a saved kernel without its weights file
    weight: np.ndarray | None = None  # M x C x R x S float32
    verified: dict | None = None     # what a CPU verification found, when one ran before saving
    _source: str | None = None
    # compiled to wait for the kernel before it and launched with programmatic stream
    # serialization (build.lowered(); to_device() launches it so)
    dependent_launch: bool = False

    def __repr__(self) -> str:
        return (f"Kernel({self.entry}, {self.op} {self.input_shape} -> {self.output_shape}, "
                f"{self.precision}, grid={self.grid}, block={self.block}, nnz={self.nnz})")

    # -- contract ----------------------------------------------------------------------------
    @property
    def dtype(self) -> str:
        return PRECISIONS[self.precision][0]

    @property
    def accumulate(self) -> str:
        return PRECISIONS[self.precision][1]

    @property
    def storage(self):
        """numpy type of the x / y / residual buffers (bf16: uint16 bit patterns; storage.encode
        and storage.decode convert)."""
        return device_type(self.dtype)

    @property
    def input_shape(self) -> tuple[int, ...]:
        g = self.geometry
        return (g.in_channels, g.width) if self.op == "gemm" else (
            g.batch, g.in_channels, g.height, g.width)

    @property
    def output_shape(self) -> tuple[int, ...]:
        g = self.geometry
        if self.epilogue.token_major:
            return self.epilogue.token_shape(g.out_channels, g.width)
        return (g.out_channels, g.width) if self.op == "gemm" else (
            g.batch, g.out_channels, g.out_height, g.out_width)

    @cached_property
    def source(self) -> str:
        """PTX or CUDA text (emitted again from the plan when the build came from the cache)."""
        if self._source is not None:
            return self._source
        if self.plan is None:
            raise UserError(f"{self.entry}: no source kept and no plan to emit it from")
        return emit(self.plan, self.emitter, self.arch, self.dependent_launch)

    # -- CPU ----------------------------------------------------------------------------------
    def _need_plan(self) -> Plan:
        if self.plan is None:
            raise UserError(f"{self.entry}: loaded without {WEIGHTS}, so it cannot run on the CPU")
        return self.plan

    def run_cpu(self, x, residual=None) -> np.ndarray:
        """Execute the kernel's plan on the CPU: float64 values shaped like the op's output
        (fp16 / bf16 kernels: x and residual are first rounded to that type, as the kernel reads
        them, and every rounding of the kernel is reproduced)."""
        plan = self._need_plan()
        x = np.asarray(x)
        if x.shape != self.input_shape:
            raise UserError(f"x has shape {x.shape}; this kernel takes {self.input_shape}")
        if plan.epilogue.residual != (residual is not None):
            raise UserError("this kernel adds a residual: pass residual=" if residual is None
                            else "this kernel takes no residual")
        if residual is not None:
            residual = np.asarray(residual)
            if residual.shape != self.output_shape:
                raise UserError(f"residual has shape {residual.shape}; this kernel's output is "
                                f"{self.output_shape}")
            residual = rounded(residual, self.dtype)
        return execute(plan, rounded(x, self.dtype), residual).reshape(self.output_shape)

    def random_inputs(self, rng: np.random.Generator):
        """(x, residual or None): random inputs in the op's shapes (storage-type values)."""
        x, res = plan_inputs(self._need_plan(), rng)
        return x.reshape(self.input_shape), None if res is None else res.reshape(
            self.output_shape)

    def reference(self, x, residual=None) -> tuple[np.ndarray, np.ndarray]:
        """(float64 reference output, magnitude sum |w||x| that scales the tolerance)."""
        plan = self._need_plan()
        ref, mag = plan_reference(plan, self.weight, x, residual)
        return ref.reshape(self.output_shape), mag.reshape(self.output_shape)

    def check(self, out, x, residual=None) -> tuple[bool, float, str]:
        """Compare an output (from the GPU or run_cpu) with the float64 reference element-wise."""
        ref, mag = self.reference(x, residual)
        return check(out, ref, mag, self.dtype, self.geometry.taps)

    def verify(self, seed: int = 0) -> "Kernel":
        """This kernel with `verified` set to verify_cpu(seed) (kept in the manifest)."""
        return replace(self, verified=self.verify_cpu(seed), _source=self._source_text())

    def _source_text(self) -> str | None:
        return self.__dict__.get("source", self._source)

    def verify_cpu(self, seed: int = 0, checks: int = VERIFY_CHECKS) -> dict:
        """run_cpu on `checks` fresh random inputs vs float64: {"ok", "max_err", "message"}."""
        rng = np.random.default_rng([seed, int(self.pattern_hash, 16) & 0xFFFFFFFF])
        return verify_plan(self._need_plan(), self.weight, rng, checks)

    # -- GPU ----------------------------------------------------------------------------------
    def to_device(self, device: int = 0):
        """Load onto `device` (primary context): a gpu.loaded.LoadedKernel whose
        launch(stream, x_ptr, y_ptr, residual_ptr=None) runs on the caller's stream."""
        from .gpu.loaded import LoadedKernel

        g = self.geometry
        zero = g.image_elems * ELEMENT_BYTES[self.dtype] if g.masked else 0
        return LoadedKernel(self.cubin, self.entry, self.grid, self.block,
                            [a["name"] for a in self.arguments], zero,
                            self.dynamic_shared_bytes, device,
                            dependent_launch=self.dependent_launch)

    @property
    def dynamic_shared_bytes(self) -> int:
        """Dynamic shared memory each launch asks for (the streamed tile stage's image)."""
        from .families.streamed.plan import StreamParams, dynamic_shared_bytes

        if isinstance(self.plan_params, StreamParams):
            return dynamic_shared_bytes(self.geometry, self.plan_params)
        return 0

    # -- files --------------------------------------------------------------------------------
    def manifest(self) -> dict:
        """What `sparsert gen` writes as manifest.json (and `sparsert inspect` reads)."""
        g, res = self.geometry, self.resources
        plan_doc = {"name": self.plan_params.name(), **self.plan_params.__dict__,
                    **self.plan_stats}
        op_name = "gemm" if self.op == "gemm" else f"conv{g.kernel}x{g.kernel}"
        suffix = printer_for(self.emitter, self.family).suffix     # streamed: always CUDA
        doc = {
            "sparsert_version": __version__, "entry": self.entry, "cubin": CUBIN,
            "source": "kernel" + suffix, "weights": WEIGHTS,
            "emitter": self.emitter, "family": self.family,
            "family_version": self.family_version, "arch": self.arch, "dtype": self.dtype,
            "accumulate": self.accumulate, "precision": self.precision,
            "grid": list(self.grid), "block": list(self.block),
            "shared_bytes": self.shared_bytes,
            "dynamic_shared_bytes": self.dynamic_shared_bytes,
            "arguments": [dict(a) for a in self.arguments],
            "problem": {"op": op_name, "m": g.out_channels, "k": g.taps, "n": g.columns,
                        "batch": g.batch, "in_channels": g.in_channels, "height": g.height,
                        "width": g.width, "kernel": g.kernel, "stride": g.stride,
                        "padding": g.padding, "out_height": g.out_height,
                        "out_width": g.out_width},
            "epilogue": {"bias": self.epilogue.bias is not None,
                         "activation": self.epilogue.activation,
                         "residual": self.epilogue.residual,
                         **({"token_major": True} if self.epilogue.token_major else {}),
                         **({"planes": self.epilogue.planes} if self.epilogue.planes else {})},
            "plan": plan_doc, "tuned": self.tuned, "nnz": self.nnz,
            "density": self.nnz / (g.out_channels * g.taps), "pattern_hash": self.pattern_hash,
            "registers": res.registers, "spill_store_bytes": res.spill_store_bytes,
            "spill_load_bytes": res.spill_load_bytes, "stack_bytes": res.stack_bytes,
            "compile_seconds": round(self.compile_seconds, 3), "cached": self.cached,
            "cubin_bytes": len(self.cubin),
            "cubin_sha256": hashlib.sha256(self.cubin).hexdigest(),
            "dependent_launch": self.dependent_launch}
        if self.verified is not None:
            doc["verify_cpu"] = dict(self.verified)
        return doc

    def files(self) -> dict[str, bytes]:
        """{file name: bytes} of save(): source, cubin, manifest.json and weights.npz."""
        doc = self.manifest()
        out = {doc["source"]: self.source.encode(), CUBIN: self.cubin,
               MANIFEST: (json.dumps(doc, indent=2) + "\n").encode()}
        if self.weight is not None:
            import io

            buf = io.BytesIO()
            bias = np.asarray(self.epilogue.bias if self.epilogue.bias is not None else [],
                              dtype=np.float32)
            csr = to_csr(self.weight)      # kept sparse: a large layer's weight stays small
            np.savez_compressed(buf, shape=np.asarray(self.weight.shape), indptr=csr.indptr,
                                indices=csr.indices, data=csr.data, bias=bias)
            out[WEIGHTS] = buf.getvalue()
        return out

    def save(self, directory) -> Path:
        """Write files() into `directory`: a new one is filled aside and renamed into place;
        an existing one may hold only an earlier sparsert output (anything else: UserError)."""
        from .files import write_output_dir

        out = Path(directory)
        write_output_dir(out, self.files(), OUTPUT_FILES)
        return out

    @classmethod
    def from_dir(cls, directory) -> "Kernel":
        """Read a directory written by save() / `sparsert gen`. With its weights.npz the plan is
        rebuilt (and must give the same entry, i.e. the same code), so run_cpu works."""
        from .files import read_manifest

        directory = Path(directory)
        doc = read_manifest(directory)
        from .files import check_cubin

        check_cubin(directory, doc)
        name = doc.get("source")
        if not isinstance(name, str) or Path(name).name != name:
            raise UserError(f"{directory / MANIFEST}: 'source' must name a file in {directory}")
        try:
            cubin = (directory / doc.get("cubin", CUBIN)).read_bytes()
            source = (directory / name).read_text()
        except OSError as exc:
            raise UserError(f"{directory}: cannot read the kernel files ({exc})") from None
        dependent = doc.get("dependent_launch", False) is True
        if dependent and "griddepcontrol.wait" not in source:   # launched so, it would race
            raise UserError(f"{directory / MANIFEST}: dependent_launch is true but {name} does "
                            "not wait for the kernel before it (griddepcontrol.wait)")
        try:
            p = doc["problem"]
            op = "gemm" if p["op"] == "gemm" else "conv"
            geometry = Geometry(p["batch"], p["in_channels"], p["height"], p["width"], p["m"],
                                p["kernel"], p["stride"], p["padding"]).validate()
            kind = get_family(doc.get("family", "immediate")).params
            params = kind.from_dict({k: v for k, v in doc["plan"].items()
                                     if k not in ("name", "family", "row_groups", "loads",
                                                  "workers", "rows", "data_bytes")})
            precision = doc.get("precision") or precision_label(doc["dtype"],
                                                                doc.get("accumulate"))
            resources = Resources(doc["registers"], doc["stack_bytes"], doc["spill_store_bytes"],
                                  doc["spill_load_bytes"], int(doc["shared_bytes"]))
            epi = doc["epilogue"]
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{directory / MANIFEST}: not a usable sparsert manifest "
                            f"({type(exc).__name__}: {exc})") from None
        weight, plan, bias = None, None, None
        weights_path = directory / doc.get("weights", WEIGHTS)
        if weights_path.is_file():
            try:
                with np.load(weights_path, allow_pickle=False) as archive:
                    shape = tuple(int(d) for d in archive["shape"])
                    csr = sp.csr_matrix((archive["data"].astype(np.float32), archive["indices"],
                                         archive["indptr"]),
                                        shape=(shape[0], int(np.prod(shape[1:]))))
                    weight = SparseWeight(csr, shape)
                    bias_values = np.asarray(archive["bias"], dtype=np.float32)
            except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
                raise UserError(f"{weights_path}: not a readable weights file ({exc})") from None
            bias = tuple(float(v) for v in bias_values) if epi.get("bias") else None
        epilogue = Epilogue(bias, epi.get("activation", "none"), bool(epi.get("residual")),
                            bool(epi.get("token_major")), int(epi.get("planes", 0)))
        if weight is not None:
            plan = plan_weight(geometry, weight, params, epilogue, None, precision,
                               allow_fp16_flush=True)
            if plan.entry != doc["entry"]:
                raise UserError(f"{weights_path}: the weights do not rebuild {doc['entry']} "
                                f"(got {plan.entry}): the files come from different kernels")
        try:
            contract = dict(grid=tuple(doc["grid"]), block=tuple(doc["block"]),
                            shared_bytes=int(doc["shared_bytes"]),
                            arguments=tuple(dict(a) for a in doc["arguments"]),
                            plan_stats={k: int(v) for k, v in doc["plan"].items() if k in
                                        ("row_groups", "loads", "workers", "rows", "data_bytes")})
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{directory / MANIFEST}: not a usable sparsert manifest "
                            f"({type(exc).__name__}: {exc})") from None
        return cls(entry=doc["entry"], cubin=cubin, emitter=doc["emitter"], arch=doc["arch"],
                   op=op, geometry=geometry, epilogue=epilogue, plan_params=params,
                   precision=precision, resources=resources, nnz=int(doc["nnz"]),
                   pattern_hash=doc["pattern_hash"], **contract,
                   family=doc.get("family", FAMILY),
                   family_version=doc.get("family_version", FAMILY_VERSION),
                   tuned=bool(doc.get("tuned", False)),
                   compile_seconds=float(doc.get("compile_seconds", 0.0)),
                   cached=bool(doc.get("cached", False)), plan=plan, weight=weight,
                   verified=doc.get("verify_cpu"), _source=source,
                   dependent_launch=dependent)

    @classmethod
    def from_build(cls, plan: Plan, build, weight: np.ndarray, op: str, tuned: bool = False,
                   source: str | None = None) -> "Kernel":
        """A Kernel from a plan and its build.KernelBuild (what build_all returns)."""
        kernel = cls.from_launch(plan, build, op, tuned, pattern_hash(weight))
        return replace(kernel, plan=plan, weight=weight,
                       plan_stats=plan_stats(plan),
                       _source=source)

    @classmethod
    def from_launch(cls, launch, build, op: str, tuned: bool = False,
                    pattern: str | None = None) -> "Kernel":
        """A launch-only Kernel (no plan, no weights: to_device() and benchmark_layer() with
        given inputs work, run_cpu does not) from anything with a plan's launch fields (a Plan,
        or the few numbers a tuning job ships to a GPU worker) and its KernelBuild."""
        return cls(entry=launch.entry, cubin=build.cubin, emitter=build.emitter,
                   arch=build.arch, op=op, geometry=launch.geometry, epilogue=launch.epilogue,
                   plan_params=launch.params, precision=launch.precision,
                   resources=build.resources, nnz=launch.nnz, pattern_hash=pattern,
                   grid=tuple(launch.grid), block=tuple(launch.block),
                   shared_bytes=int(launch.shared_bytes),
                   arguments=_arguments(launch), plan_stats={}, tuned=tuned,
                   compile_seconds=build.compile_seconds, cached=build.cached,
                   family=family_of_params(launch.params).name,
                   family_version=code_version(family_of_params(launch.params), build.emitter),
                   dependent_launch=build.dependent_launch)


@dataclass(frozen=True, eq=False)
class Layer:
    """One layer: its weight (M x C x R x S, dense float32 or a patterns.SparseWeight), shape,
    epilogue, precision and plan choice, for compile_kernels(). `label` names it in progress
    lines and errors."""

    label: str
    op: str                  # "gemm" or "conv"
    weight: np.ndarray | SparseWeight
    geometry: Geometry
    epilogue: Epilogue = Epilogue()
    precision: str = "fp32"
    info: dict | None = None  # e.g. problem id and sparsity
    plan: object = "auto"     # as compile_kernel's `plan`
    allow_fp16_flush: bool = False   # fp16: drop weights that round to zero instead of refusing
    family: str = "auto"      # "auto" (tuned winner / cost model over every family) or a name

    @classmethod
    def of(cls, label: str, weight, *, op: str = "gemm", input_shape=None, n=None,
           stride: int = 1, padding: int = 0, epilogue=None, dtype: str = "fp32",
           accumulate: str | None = None, info: dict | None = None,
           plan="auto") -> "Layer":
        """A layer from compile_kernel()'s arguments (same checks, same errors)."""
        weight, geometry = layer_geometry(weight, op, input_shape, n, stride, padding)
        return cls(label, op, weight, geometry, make_epilogue(epilogue, geometry.out_channels),
                   precision_label(dtype, accumulate), info, plan)


def problem_layer(problem, sparsity: float, *, pattern: str = "uniform", seed: int = 0,
                  precision: str = "fp32", epilogue=None, plan="auto") -> Layer:
    """A problem (a built-in id or a problems.Problem) at a sparsity, with the weights `bench`
    generates for it (same pattern kind and seed -> same weights)."""
    from .build import geometry_for
    from .patterns import generate
    from .problems import builtin_problems

    if isinstance(problem, str):
        known = builtin_problems()
        if problem not in known:
            raise UserError(f"unknown problem {problem!r} (see `sparsert problems`)")
        problem = known[problem]
    weight = generate(problem, sparsity, pattern, seed)
    return Layer(f"{problem.id}@{sparsity:g}", "gemm" if problem.op == "gemm" else "conv",
                 weight, geometry_for(problem), make_epilogue(epilogue, problem.out_channels),
                 precision, {"problem": problem.id, "sparsity": sparsity}, plan)


def config_layer(config, problem, sparsity: float, weight=None) -> Layer:
    """One case of a benchmark config as a Layer: the weights, epilogue, precision and plan
    overrides `bench` uses (`weight`: the case's generated weight, if already made)."""
    from .build import epilogue_for, geometry_for
    from .patterns import generate

    if weight is None:
        weight = generate(problem, sparsity, config.pattern, config.seed)
    return Layer(f"{problem.id}@{sparsity:g}", "gemm" if problem.op == "gemm" else "conv",
                 weight, geometry_for(problem),
                 epilogue_for(problem, config.epilogue, config.seed, sparsity),
                 config.precision, {"problem": problem.id, "sparsity": sparsity},
                 config.plan or "auto", config.allow_fp16_flush, config.family)


def config_layers(config) -> list[Layer]:
    """Every case of a benchmark config as a Layer (config_layer)."""
    return [config_layer(config, p, s) for p, s in config.cases()]


# ---- compile -----------------------------------------------------------------------------------
def _cache(cache):
    if cache is True:
        return KernelCache()
    if cache is None or cache is False:
        return None
    if isinstance(cache, KernelCache):
        return cache
    raise UserError(f"cache must be True, None or a KernelCache, got {cache!r}")


def compile_kernel(weight, *, op: str = "gemm", input_shape=None, n: int | None = None,
                   stride: int = 1, padding: int = 0, dtype: str = "fp32",
                   accumulate: str | None = None, epilogue=None, plan="auto",
                   family: str = "auto", emit: str = "ptx", arch: str | None = None,
                   cache=True, tuned=None, gpu_name: str | None = None,
                   verify: bool = False, seed: int = 0) -> Kernel:
    """Compile a kernel specialised to `weight`'s values and sparsity pattern.

    weight: numpy or scipy.sparse; gemm M x K (with n= or input_shape=(K, N)), conv M x C x R x S
      (with input_shape=(batch, C, H, W), stride, padding).
    dtype/accumulate: storage fp32, fp16 or bf16; sums fp32, or fp16 (half2) for fp16 data
      (default: the dtype; fp32 for bf16). epilogue: None, an Epilogue or {"bias": M values,
      "activation": "none" | "relu" | "relu6" | "gelu" (exact, erf; streamed family only),
      "residual": bool, "token_major": bool, "planes": int}.
    plan: "auto" (the tuned winner for this pattern, shape, GPU, precision and family version if
      the database has one, else the cost model's choice), a family's params (PlanParams), or a
      dict over the cost model's choice.
    family: "auto" (every registered family competes) or a family's name (sparsert_cli.families).
    emit: "ptx" or "cuda" (readable CUDA C++, compiled by NVRTC; every precision).
    arch: e.g. "sm_90" (default: the local GPU's, else sm_90). cache: True (the default kernel
      cache), None, or a KernelCache. tuned: None (configs/tuned.json), False (none), a path or a
      TunedDB. gpu_name: the GPU whose tuned plans to use (default: the local one, else H100).
    verify: run verify_cpu(seed) and keep its result in `kernel.verified` (and the manifest).
    Errors in any argument raise UserError (one line).
    """
    weight, geometry = layer_geometry(weight, op, input_shape, n, stride, padding)
    layer = Layer("kernel", op, weight, geometry, make_epilogue(epilogue, geometry.out_channels),
                  precision_label(dtype, accumulate), plan=plan, family=family)
    arch = _target(family, emit, arch, {layer.precision})
    kernel = compile_layer(layer, plan_for(layer, tuned, gpu_name, emit, arch), emit=emit,
                           arch=arch, cache=cache)
    return kernel.verify(seed) if verify else kernel


def compile_layer(layer: "Layer", planned: tuple[Plan, bool], *, emit: str = "ptx",
                  arch: str | None = None, cache=True) -> Kernel:
    """Compile one planned layer in this process with every core (ptxas split-compile), keeping
    the source. A compiler error raises CompileError."""
    arch = _target("auto", emit, arch, {layer.precision})
    plan, was_tuned = planned
    build, source = build_kernel(plan, emit, arch, _cache(cache), threads=os.cpu_count() or 1,
                                 keep_source=True)
    return Kernel.from_build(plan, build, layer.weight, layer.op, was_tuned, source)


def _target(family: str, emit: str, arch: str | None, precisions) -> str:
    """Check the family, emitter, arch and precisions up front; the arch (detected if None)."""
    from .arch import check_arch
    from .gpu.runtime import detect_arch

    get_family(family)
    if emit not in EMITTERS:
        raise UserError(f"emit must be one of {', '.join(EMITTERS)}, got {emit!r}")
    arch = arch or detect_arch()
    try:
        check_arch(arch)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    for precision in sorted(precisions):
        check_emitter(emit, precision, arch)
    return arch


def plan_layers(layers: list[Layer], tuned=None, gpu_name: str | None = None,
                emit: str = "ptx", labels: bool = True, arch: str | None = None
                ) -> list[tuple[Plan, bool]]:
    """(plan, tuned?) per layer, as compile_kernels() plans them (no compiling), for `arch`
    (plan_for). An error names the layer's label (unless `labels` is False: the caller names
    it)."""
    out, db = [], _tuned_db(tuned)          # read the database once
    for layer in layers:
        try:
            out.append(plan_for(layer, db if db is not None else False, gpu_name, emit, arch))
        except UserError as exc:
            if not labels:
                raise
            raise UserError(f"{layer.label}: {exc.message}") from None
    return out


class KernelFailure(Exception):
    """A layer whose kernel did not compile: its plan, whether it was tuned, and the error."""

    def __init__(self, plan: Plan, error: BaseException, tuned: bool = False):
        super().__init__(str(error))
        self.plan, self.error, self.tuned = plan, error, tuned


def compile_plans(layers: list[Layer], planned: list[tuple[Plan, bool]], *, emit: str = "ptx",
                  arch: str | None = None, cache=True, jobs: int | None = None, on_done=None,
                  stats: dict | None = None,
                  dependent_launch: bool | None = False) -> list[Kernel | KernelFailure]:
    """Compile planned layers across processes (build_all); a layer that fails to compile gets
    a KernelFailure in its place, never raised. `on_done(index, kernel_or_failure)` reports
    each as it finishes; `stats`, if given, receives compile_seconds (wall).
    dependent_launch: kernels that wait for the kernel before them and are launched with
    programmatic stream serialization (sm_90+: a chain of them overlaps each launch with the
    end of the kernel before; None: where the arch has it). Off by default: `bench` times one
    kernel replayed back to back, which the overlap would turn into a throughput figure."""
    import time

    from .build import build_all, require_dependent_launch
    from .compile import arch_number

    arch = _target("auto", emit, arch, {layer.precision for layer in layers})
    if dependent_launch is None:
        dependent_launch = arch_number(arch) >= 90
    elif dependent_launch:      # once here, not once per kernel
        require_dependent_launch(arch)
    started = time.perf_counter()
    kernels: list = [None] * len(layers)

    def done(i, build, seconds):
        plan, was_tuned = planned[i]
        kernels[i] = (KernelFailure(plan, build, was_tuned) if isinstance(build, Exception)
                      else Kernel.from_build(plan, build, layers[i].weight, layers[i].op,
                                             was_tuned))
        if on_done:
            on_done(i, kernels[i])

    build_all([plan for plan, _ in planned], emit, arch, _cache(cache), jobs, done,
              dependent_launch=bool(dependent_launch))
    if stats is not None:
        stats["compile_seconds"] = time.perf_counter() - started
    return kernels


def compile_kernels(layers: list[Layer], *, emit: str = "ptx", arch: str | None = None,
                    cache=True, tuned=None, gpu_name: str | None = None,
                    jobs: int | None = None, on_done=None,
                    stats: dict | None = None) -> list[Kernel | KernelFailure]:
    """Plan (plan_layers) and compile (compile_plans) many layers at once, as `bench` does.
    `stats`, if given, receives plan_seconds and compile_seconds (wall)."""
    import time

    arch = _target("auto", emit, arch, {layer.precision for layer in layers})
    started = time.perf_counter()
    planned = plan_layers(layers, tuned, gpu_name, emit, arch=arch)
    if stats is not None:
        stats["plan_seconds"] = time.perf_counter() - started
    return compile_plans(layers, planned, emit=emit, arch=arch, cache=cache, jobs=jobs,
                         on_done=on_done, stats=stats)
