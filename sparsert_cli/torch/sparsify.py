"""sparsify_: replace a model's sparse Conv2d / Linear layers by compiled kernels, in place.

Three phases. Plan: per layer, fold the following BatchNorm, fuse a following ReLU/ReLU6 (and
a residual add), record the shape seen in `example_inputs`. Compile: every kernel at once,
across processes (cache hits served at once). Check, layer by layer: verify element-wise against
float64 and (on a GPU) time against the dense layer; a kernel is swapped in only when verified
and at least `min_speedup` times faster, so the model never gets slower layer by layer.
Inference only.

Depthwise 3x3 convolutions (groups == in == out channels) run as the C x C x 3 x 3 convolution
whose weight is block-diagonal (backend.block_diagonal: 9 nonzeros a row), through the same
kernels; other grouped convolutions stay dense.

Kernels are specialised to one input shape: a SparseLayer called with another shape runs its
dense (folded) op instead. Linear layers: see ops.py (transposes until a token-major kernel).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from sparsert_cli.errors import UserError
from sparsert_cli.torch import ops
from sparsert_cli.torch.backend import LayerSpec, block_diagonal, compile_layers, tune_layer
from sparsert_cli.torch.check import time_us, verify as verify_layer
from sparsert_cli.torch.fuse import Chain, find_chains, folded
from sparsert_cli.torch.prune import is_depthwise
from sparsert_cli.torch.residual import fuse_residuals

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class SparseLayer(torch.nn.Module):
    """A Conv2d/Linear (+ folded BatchNorm, + ReLU/ReLU6) running one compiled kernel."""

    def __init__(self, kernel_id: int, kind: str, weight: torch.Tensor, bias, activation: str,
                 stride: int, padding: int, in_shape: tuple, residual: bool = False,
                 groups: int = 1):
        super().__init__()
        self.kernel_id, self.kind, self.activation = kernel_id, kind, activation
        self.residual = residual                    # the kernel adds a residual input
        self.stride, self.padding, self.in_shape = stride, padding, tuple(in_shape)
        self.groups = groups                        # depthwise: C (the weight is C x 1 x R x S)
        self.register_buffer("weight", weight)      # the folded dense weight: other shapes
        self.register_buffer("bias", bias)
        self._warned = False

    def dense(self, x: torch.Tensor, residual=None) -> torch.Tensor:
        if self.kind == "linear":
            y = F.linear(x, self.weight, self.bias)
        else:
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        if residual is not None:
            y = y + residual
        if self.activation == "relu":
            return F.relu(y)
        return F.relu6(y) if self.activation == "relu6" else y

    def forward(self, x: torch.Tensor, residual=None) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or (
                residual is not None and residual.requires_grad)):
            raise RuntimeError("sparsert layers are inference-only: run under torch.no_grad() "
                               "or torch.inference_mode(), with inputs that do not require grad")
        if tuple(x.shape) != self.in_shape:
            if not self._warned:
                warnings.warn(f"sparsert kernel compiled for input {self.in_shape} got "
                              f"{tuple(x.shape)}: running the dense op", stacklevel=2)
                self._warned = True
            return self.dense(x, residual)
        return ops.run(x, residual, self.kernel_id)

    def extra_repr(self) -> str:
        return f"{self.kind}, kernel_id={self.kernel_id}, activation={self.activation}, " \
               f"input={self.in_shape}" + (f", groups={self.groups}" if self.groups > 1 else "")


# ---- per-layer checks --------------------------------------------------------------------------
def _pair(value) -> int | None:
    values = value if isinstance(value, (tuple, list)) else (value, value)
    return values[0] if len(set(values)) == 1 and isinstance(values[0], int) else None


def _unsupported(module) -> str | None:
    """Why this layer has no kernel (None: it can have one)."""
    if isinstance(module, torch.nn.Linear):
        return None
    k = _pair(module.kernel_size)
    if module.groups != 1 and not is_depthwise(module):
        return f"groups={module.groups} (grouped convolution: no kernel, dense)"
    if k not in (1, 3):
        return f"kernel {tuple(module.kernel_size)} (only 1x1 and 3x3)"
    if _pair(module.stride) not in (1, 2):
        return f"stride {module.stride} (only 1 and 2)"
    if not isinstance(module.padding, (tuple, list)) or _pair(module.padding) is None:
        return f"padding {module.padding!r} (only equal integer padding)"
    if _pair(module.dilation) != 1 or module.padding_mode != "zeros":
        return "dilation or padding mode other than 1 / zeros"
    return None


def _describe(module, x_shape) -> tuple[str, str]:
    if isinstance(module, torch.nn.Linear):
        n = int(np.prod(x_shape[:-1]))
        return "linear", f"{module.out_features}x{module.in_features}, N={n}"
    k = module.kernel_size[0]
    stride, pad = module.stride[0], module.padding[0]
    if is_depthwise(module):
        text = f"{module.out_channels}x{k}x{k} dw"
        return f"dw{k}x{k}", text + f" @ {x_shape[2]}x{x_shape[3]}" + (
            f" s{stride}" if stride > 1 else "") + (f" p{pad}" if pad else "") + (
            f" b{x_shape[0]}" if x_shape[0] > 1 else "")
    text = f"{module.out_channels}x{module.in_channels}" + (f"x{k}x{k}" if k > 1 else "")
    text += f" @ {x_shape[2]}x{x_shape[3]}" + (f" s{stride}" if stride > 1 else "") + (
        f" p{pad}" if pad else "") + (f" b{x_shape[0]}" if x_shape[0] > 1 else "")
    return f"conv{k}x{k}", text


def _record_inputs(model, chains: list[Chain], example_inputs) -> dict:
    """Run the model once; per layer: how often it ran and its (first) input (and residual)."""
    seen: dict[str, dict] = {}
    modules = dict(model.named_modules())
    handles = []
    for chain in chains:
        def hook(module, args, name=chain.layer, residual=chain.residual is not None):
            slot = seen.setdefault(name, {"calls": 0})
            slot["calls"] += 1
            if slot["calls"] == 1:
                slot["x"] = args[0].detach().clone()
                slot["res"] = args[1].detach().clone() if residual else None
        handles.append(modules[chain.entry].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


# ---- the driver --------------------------------------------------------------------------------
def _check_args(dtype, min_speedup, min_sparsity):
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for name, value in (("min_speedup", min_speedup), ("min_sparsity", min_sparsity)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise UserError(f"{name} must be a number >= 0, got {value!r}")


def _device(model) -> torch.device:
    tensors = list(model.parameters()) + list(model.buffers())
    return tensors[0].device if tensors else torch.device("cpu")


def _dense_module(modules, chain: Chain):
    """The layer as the model runs it: layer, BatchNorm, (residual add,) activation."""
    if chain.residual:
        return modules[chain.residual]          # a ResidualChain without its kernel yet
    parts = [modules[chain.layer]] + ([modules[chain.bn]] if chain.bn else [])
    if chain.activation == "relu":
        parts.append(torch.nn.ReLU())
    elif chain.activation == "relu6":
        parts.append(torch.nn.ReLU6())
    return torch.nn.Sequential(*parts)


def sparsify_(model: torch.nn.Module, example_inputs, *, dtype: str = "fp32", tuned=None,
              verify: bool = True, min_speedup: float = 1.0, min_sparsity: float = 0.5,
              dry_run: bool = False, arch: str | None = None, cache: bool = True,
              include=None, tune: bool = False, fuse_residual: bool = True,
              jobs: int | None = None, on_progress=None, stats: dict | None = None
              ) -> list[dict]:
    """Replace the sparse Conv2d (1x1/3x3, stride 1/2; groups=1 or depthwise) and Linear layers
    of `model` (on a CUDA device, in eval mode: this call sets it) with compiled kernels, in
    place.

    example_inputs: a tuple of tensors the model is called with; kernels are compiled for the
    shapes each layer sees. dtype: the activations' type (fp16 / bf16: convert the model
    first, e.g. model.half()).
    tuned: the tuned-plan database (None: the default one; False: none). verify: check every
    kernel element-wise against float64 before using it. min_speedup: a layer is replaced only
    when its kernel is at least this much faster than the dense layer (timed here, on the GPU).
    min_sparsity: denser layers keep the dense op (their straight-line code would be huge); a
    depthwise layer counts as its block-diagonal C x C weight (at least 1 - 1/C sparse).
    dry_run: plan, compile and (with verify) check on the CPU interpreter; the model is not
    changed. include: None or a callable(name, module) -> bool choosing layers. fuse_residual:
    rewrite submodules computing act(bn(conv(x)) + identity) (torch.fx) so one kernel does all
    four. tune: run the tuner (GPU) on every layer first and record its winners in `tuned` (a
    path or TunedDB). jobs: compile processes (None: one per core; every kernel is compiled
    before any is checked). on_progress(stage, done, total, item): progress of the "compile"
    and "check" stages. stats: receives plan_seconds, compile_seconds, kernels, cached.
    Returns one dict per layer: layer, op, shape, sparsity, fused, family, plan, replaced,
    reason, max_err, max_rel_err, dense_us, sparse_us, speedup. Render with report_table().
    """
    _check_args(dtype, min_speedup, min_sparsity)
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise UserError(f"jobs must be an integer >= 1 or None, got {jobs!r}")
    device = _device(model)
    if not dry_run and device.type != "cuda":
        raise UserError("sparsify_ swaps layers for GPU kernels: move the model to a CUDA device "
                        "(model.cuda()), or pass dry_run=True to compile and verify on the CPU")
    return _sparsify(model, example_inputs, dtype=dtype, tuned=tuned, verify=verify,
                     min_speedup=min_speedup, min_sparsity=min_sparsity, dry_run=dry_run,
                     arch=arch, cache=cache, include=include, device=device,
                     tune=tune and not dry_run, fuse_residual=fuse_residual, jobs=jobs,
                     on_progress=on_progress, stats=stats)


def _new_row(chain: Chain, module) -> dict:
    fused = [p for p in ("bn" if chain.bn else "", "add" if chain.residual else "",
                         chain.activation if chain.activation != "none" else "") if p]
    weight = module.weight.detach()
    return {"layer": chain.layer, "op": "linear" if isinstance(module, torch.nn.Linear)
            else "conv", "shape": "", "fused": "+".join(fused),
            "sparsity": 1.0 - int(torch.count_nonzero(weight)) / weight.numel(),
            "family": None, "plan": None, "replaced": False, "reason": "", "max_err": None,
            "max_rel_err": None, "dense_us": None, "sparse_us": None, "speedup": None}


def _why_not(module, record, dtype, min_sparsity, row) -> str | None:
    """Why this layer keeps its dense op before any kernel is made (None: make one)."""
    why = _unsupported(module)
    if why is None and record["calls"] > 1:
        why = f"called {record['calls']} times per forward (shared module)"
    if why is None and record["x"].dtype != DTYPES[dtype]:
        why = f"input is {record['x'].dtype}, kernels are {dtype} (convert the model first)"
    weight = module.weight.detach()
    sparsity = row["sparsity"]
    if is_depthwise(module):         # as the kernel sees it: block-diagonal C x C x R x S
        sparsity = 1.0 - int(torch.count_nonzero(weight)) / (weight.numel() * module.groups)
    if why is None and sparsity < min_sparsity:
        why = f"sparsity {sparsity:.2f} below min_sparsity {min_sparsity:g}"
    if why is None and not torch.any(weight):
        why = "all weights are zero"
    return why


def _sparsify(model, example_inputs, *, dtype, tuned, verify, min_speedup, min_sparsity,
              dry_run, arch, cache, include, device, tune=False, fuse_residual=True,
              jobs=None, on_progress=None, stats=None) -> list[dict]:
    """sparsify_ without the device check: on a CPU model (tests) layers are replaced by ops
    that run the plan interpreter."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if dry_run:                # the caller's model stays as it is: work on a CPU copy
        model = copy.deepcopy(model).cpu()
        example_inputs = tuple(t.cpu() if isinstance(t, torch.Tensor) else t
                               for t in example_inputs)
    model.eval()
    if fuse_residual:
        fuse_residuals(model)
    modules = dict(model.named_modules())
    chains = [c for c in find_chains(model)
              if include is None or include(c.layer, modules[c.layer])]
    seen = _record_inputs(model, chains, example_inputs)
    on_gpu = device.type == "cuda" and not dry_run
    if on_gpu and arch is None:
        major, minor = torch.cuda.get_device_capability(device)
        arch = f"sm_{major}{minor}"
    # ---- plan: which layers get a kernel, with what weight and epilogue
    rows, todo = [], []                 # todo: (row, chain, LayerSpec, folded weight, bias)
    for chain in chains:
        module = modules[chain.layer]
        record = seen.get(chain.layer)
        row = _new_row(chain, module)
        rows.append(row)
        if record is None:
            row["reason"] = "not called by example_inputs"
            continue
        row["op"], row["shape"] = _describe(module, tuple(record["x"].shape))
        row["reason"] = _why_not(module, record, dtype, min_sparsity, row) or ""
        if not row["reason"]:
            todo.append((row, chain, *_spec(chain, module, modules, record["x"])))
    if tune:
        for row, chain, spec, _, _ in todo:
            try:
                tune_layer(spec.weight, op=spec.op, label=spec.label,
                           input_shape=spec.input_shape, n=spec.n, stride=spec.stride,
                           padding=spec.padding, dtype=dtype, epilogue=spec.epilogue,
                           tuned=tuned, arch=arch)
            except UserError as exc:
                row["reason"] = f"no kernel: {exc.message}"
        todo = [t for t in todo if not t[0]["reason"]]
    # ---- compile: every kernel at once, across processes
    count = [0]

    def compiled(i, result):
        count[0] += 1
        if on_progress:
            on_progress("compile", count[0], len(todo), todo[i][1].layer)

    info = {} if stats is None else stats
    kernels = compile_layers([t[2] for t in todo], dtype=dtype, tuned=tuned, arch=arch,
                             cache=cache, jobs=jobs, on_done=compiled, stats=info)
    info["kernels"] = sum(not isinstance(k, str) for k in kernels)
    info["cached"] = sum(bool(getattr(k, "cached", False)) for k in kernels)
    # ---- check: verify, time and swap, layer by layer
    for done, ((row, chain, spec, weight, bias), kernel) in enumerate(zip(todo, kernels), 1):
        if on_progress:
            on_progress("check", done, len(todo), chain.layer)
        if isinstance(kernel, str):
            row["reason"] = kernel
            continue
        record = seen[chain.layer]
        layer = _load(kernel, chain, modules[chain.layer], record["x"], row, dtype, weight,
                      bias, on_gpu)
        _check_layer(model, modules, chain, layer, record, row, dtype, verify, dry_run,
                     on_gpu, min_speedup)
    if on_gpu:      # what the dense layers cost: their share of the model
        for chain, row in zip(chains, rows):
            record = seen.get(chain.layer)
            if not row["replaced"] and row["dense_us"] is None and record is not None:
                inputs = (record["x"],) if record["res"] is None else (record["x"],
                                                                       record["res"])
                row["dense_us"] = time_us(_dense_module(modules, chain), inputs)
    return rows


def _check_layer(model, modules, chain, layer, record, row, dtype, verify, dry_run, on_gpu,
                 min_speedup) -> None:
    x, res = record["x"], record["res"]
    inputs = (x,) if res is None else (x, res)
    try:
        if verify:
            result = verify_layer(layer, x, res, dtype)
            row.update(max_err=result["max_err"], max_rel_err=result["max_rel_err"])
            if not result["ok"]:
                row["reason"] = f"verification failed: {result['message']}"
                return
        if on_gpu:
            row["dense_us"] = time_us(_dense_module(modules, chain), inputs)
            row["sparse_us"] = time_us(layer, inputs)
            row["speedup"] = row["dense_us"] / row["sparse_us"]
            if row["speedup"] < min_speedup:
                row["reason"] = f"dense is faster ({row['speedup']:.2f}x)"
                return
        if dry_run:
            row["reason"] = "dry run: verified" if verify else "dry run: compiled"
            return
        _swap(model, chain, layer)
        row["replaced"], row["reason"] = True, "replaced"
    finally:
        if not row["replaced"]:
            ops.unregister(layer.kernel_id)


def _spec(chain, module, modules, x) -> tuple[LayerSpec, torch.Tensor, object]:
    """(what to compile, folded weight, folded bias) of one layer."""
    bn = modules[chain.bn] if chain.bn else None
    weight, bias = folded(module, bn)
    epilogue = {"bias": None if bias is None else bias.numpy(), "activation": chain.activation,
                "residual": chain.residual is not None}
    if isinstance(module, torch.nn.Linear):
        spec = LayerSpec(chain.layer, weight.numpy(), "gemm", n=int(np.prod(x.shape[:-1])),
                         epilogue=epilogue)
    else:
        kernel_weight = block_diagonal(weight.numpy()) if is_depthwise(module) else weight.numpy()
        spec = LayerSpec(chain.layer, kernel_weight, "conv", input_shape=tuple(x.shape),
                         stride=module.stride[0], padding=module.padding[0], epilogue=epilogue)
    return spec, weight, bias


def _load(kernel, chain, module, x, row, dtype, weight, bias, on_gpu) -> SparseLayer:
    """The SparseLayer running `kernel` (loaded on x's GPU when on_gpu)."""
    linear = isinstance(module, torch.nn.Linear)
    row.update(family=getattr(kernel, "family", None), plan=kernel.plan_params.name(),
               tuned=bool(getattr(kernel, "tuned", False)), nnz=int(kernel.nnz))
    out_shape = (*x.shape[:-1], module.out_features) if linear else tuple(kernel.output_shape)
    entry = ops.Entry(kernel, linear, tuple(x.shape), tuple(out_shape))
    if on_gpu:
        entry.loaded = kernel.to_device(x.device.index or 0)
        entry.device = x.device.index or 0
    store = DTYPES[dtype]
    return SparseLayer(ops.register(entry), "linear" if linear else "conv",
                       weight.to(x.device, store), None if bias is None else
                       bias.to(x.device, store), chain.activation,
                       1 if linear else module.stride[0], 0 if linear else module.padding[0],
                       tuple(x.shape), residual=chain.residual is not None,
                       groups=1 if linear else module.groups)


def _swap(model, chain: Chain, layer: SparseLayer) -> None:
    if chain.residual:              # conv, BatchNorm, add and activation: all in the kernel
        model.get_submodule(chain.residual).sparse = layer
        return
    model.set_submodule(chain.layer, layer)
    if chain.bn:
        model.set_submodule(chain.bn, torch.nn.Identity())
    if chain.act_module:
        model.set_submodule(chain.act_module, torch.nn.Identity())


def report_table(rows: list[dict], title: str = "sparsify"):
    """A Rich table of sparsify_'s report."""
    from sparsert_cli.console import table

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    body = [[r["layer"], r["op"], r["shape"], num(r["sparsity"], ".2f"), r["fused"] or "-",
             r.get("plan") or "-", num(r.get("dense_us"), ".2f"),
             num(r.get("sparse_us", r.get("sparsert_us", r.get("kernel_us"))), ".2f"),
             num(r["speedup"], ".2f"), num(r["max_rel_err"], ".1e"),
             "yes" if r["replaced"] else r["reason"]] for r in rows]
    return table(title, ["layer", "op", "shape", "S", "fused", "plan", "dense us", "sparse us",
                         "x", "max rel err", "replaced"], body)
