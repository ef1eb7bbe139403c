"""End-to-end runs for `sparsert model`: a pruned dense model against its sparsified self.

GPU (one row per model x precision x sparsity x batch): dense eager, dense CUDA graph, the strong
baseline (torch.compile mode="max-autotune-no-cudagraphs" with inductor freezing, channels_last
and cudnn.benchmark, then CUDA-graph replayed), TF32 beside fp32, and the sparsified model
graph-replayed; outputs checked against the pruned model in float64.
CPU (`dry_run`): every layer compiled and verified by the plan interpreter; no timings.

Relative error bound: max|y - y64| <= REL_ERR_BOUND[dtype] * max|y64|, y64 the pruned dense model
in float64 on the same input; the dense model's own error is reported beside it.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from sparsert_cli.torch.prune import prune_
from sparsert_cli.torch.sparsify import DTYPES, sparsify_

REL_ERR_BOUND = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 0.4}   # bf16: fp16's 50 eps (2^-7)


def _median_us(run, iters: int, reps: int = 7) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / iters)
    return float(np.median(times))


@torch.no_grad()
def time_eager(fn, x, iters: int = 20) -> float:
    for _ in range(3):
        fn(x)
    return _median_us(lambda: fn(x), iters)


@torch.no_grad()
def time_graph(fn, x, iters: int = 20) -> float:
    """Per-forward time of fn(x) captured once in a CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(x)
    graph.replay()
    return _median_us(graph.replay, iters)


def _precision(dtype: str, tf32: bool = False) -> None:
    """fp32 means fp32: TF32 only where asked (cuDNN allows it by default)."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


@torch.no_grad()
def time_compiled(model, x) -> tuple[float, float]:
    """(graph-replayed us, compile seconds) of the strong dense baseline."""
    import torch._inductor.config as inductor

    torch.backends.cudnn.benchmark = True
    model = copy.deepcopy(model)
    if x.dim() == 4:
        model, x = model.to(memory_format=torch.channels_last), x.to(
            memory_format=torch.channels_last)
    started = time.perf_counter()
    with inductor.patch(freezing=True):
        compiled = torch.compile(model, mode="max-autotune-no-cudagraphs")
        for _ in range(3):
            compiled(x)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        return time_graph(compiled, x), seconds


def _label(name: str, dtype: str, sparsity, batch) -> str:
    return " ".join([name, dtype] + ([f"S={sparsity:g}"] if sparsity is not None else [])
                    + ([f"b{batch}"] if batch else []))


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    scale = float(ref.abs().max())
    err = float((y.double() - ref).abs().max())
    return err / scale if scale else err


def layer_records(rows: list[dict]) -> list[dict]:
    """sparsify_'s rows for a results file: `name`, and `sparsert_us` only where the kernel
    replaced the layer (else the layer's time is its `dense_us`, when it was timed)."""
    out = []
    for row in rows:
        rec = {"name": row["layer"], **{k: v for k, v in row.items() if k != "sparse_us"}}
        if row["replaced"] and row.get("sparse_us") is not None:
            rec["sparsert_us"] = row["sparse_us"]
        elif row.get("sparse_us") is not None:
            rec["kernel_us"] = row["sparse_us"]     # measured, but slower than dense
        if rec.get("dense_us") is None:
            rec.pop("dense_us", None)
        out.append(rec)
    return out


def run_model(name: str, model: torch.nn.Module, x: torch.Tensor, *, sparsity: float | None,
              dtype: str, tuned=None, tune: bool = False, compile_baseline: bool = True,
              dry_run: bool = False, cache: bool = True, arch: str | None = None) -> dict:
    """One row of the models results (see the module docstring). `sparsity` None keeps the
    model's own zeros (an imported, already pruned network)."""
    if sparsity is not None:
        prune_(model, sparsity)
    row = {"model": name, "name": _label(name, dtype, sparsity, int(x.shape[0])),
           "dtype": dtype, "sparsity": sparsity, "batch": int(x.shape[0]),
           "rel_err_bound": REL_ERR_BOUND[dtype]}
    if dry_run:
        store = DTYPES[dtype]
        rows = sparsify_(model.to(dtype=store), (x.to(store),), dtype=dtype, tuned=tuned,
                         dry_run=True, cache=cache, arch=arch)
        ok = [r for r in rows if r["reason"].startswith("dry run")]
        row.update(mode="compile-only", layers=layer_records(rows), layers_total=len(rows),
                   replaced=0, verified_layers=len(ok), verified=all(
                       not r["reason"].startswith("verification failed") for r in rows),
                   max_rel_err=max((r["max_rel_err"] for r in ok), default=None))
        return row
    device = torch.device("cuda")
    store = DTYPES[dtype]
    model, x = model.to(device, store).eval(), x.to(device, store)
    _precision(dtype)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        dense_out = model(x)
    dense = {"eager_us": time_eager(model, x), "graph_us": time_graph(model, x)}
    if dtype == "fp32":
        _precision(dtype, tf32=True)
        row["tf32"] = {"graph_us": time_graph(model, x)}
        _precision(dtype)
    if compile_baseline:
        dense["compile_us"], row["compile_seconds"] = time_compiled(model, x)
        torch.backends.cudnn.benchmark = False
        _precision(dtype)
    else:
        dense["compile_us"] = None
    started = time.perf_counter()
    rows = sparsify_(model, (x,), dtype=dtype, tuned=tuned, tune=tune, verify=True,
                     cache=cache, arch=arch)
    row["sparsify_seconds"] = round(time.perf_counter() - started, 1)
    with torch.no_grad():
        out = model(x)
    sparse_us = time_graph(model, x)
    best_name = min((k for k, v in dense.items() if v), key=lambda k: dense[k])
    err, dense_err = _rel_err(out, ref), _rel_err(dense_out, ref)
    row.update(mode="gpu", sparsert_us=sparse_us, sparsert_eager_us=time_eager(model, x),
               dense=dense, best_dense=best_name.removesuffix("_us"),
               best_dense_us=dense[best_name], speedup=dense[best_name] / sparse_us,
               max_rel_err=err, dense_rel_err=dense_err,
               verified=bool(np.isfinite(err) and err <= REL_ERR_BOUND[dtype]),
               replaced=sum(r["replaced"] for r in rows), layers_total=len(rows),
               layers=layer_records(rows),
               gpu={"name": torch.cuda.get_device_name(), "capability":
                    list(torch.cuda.get_device_capability())}, torch=torch.__version__)
    return row


def onnx_module(layer) -> tuple[torch.nn.Module, torch.Tensor]:
    """A one-layer torch module equal to an onnx_import.OnnxLayer, and a random input for it
    (gemm: token-major N x K, as a Linear takes it)."""
    if layer.op == "gemm":
        k, n = layer.input_shape
        module = torch.nn.Linear(k, layer.weight.shape[0], bias=layer.bias is not None)
        x = torch.randn(n, k)
    else:
        m, c, r, _ = layer.weight.shape
        module = torch.nn.Conv2d(c * layer.groups, m, r, layer.stride, layer.padding,
                                 groups=layer.groups, bias=layer.bias is not None)
        x = torch.randn(*layer.input_shape)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(layer.weight))
        if layer.bias is not None:
            module.bias.copy_(torch.from_numpy(layer.bias))
    parts = [module] + ([torch.nn.ReLU()] if layer.activation == "relu" else
                        [torch.nn.ReLU6()] if layer.activation == "relu6" else [])
    return torch.nn.Sequential(*parts).eval(), x


def run_onnx(name: str, layers, *, sparsity: float | None, dtype: str, tuned=None,
             tune: bool = False, dry_run: bool = False, cache: bool = True,
             arch: str | None = None) -> dict:
    """One row for an ONNX file's layers, each sparsified alone: the graph's other ops are not
    run, so `sparsert_us` and `dense.layers_us` are sums over these layers (kernel per layer,
    CUDA-graph replayed), the dense op kept where it is faster."""
    store = DTYPES[dtype]
    rows = []
    for layer in layers:
        module, x = onnx_module(layer)
        if sparsity is not None:
            prune_(module, sparsity)
        if not dry_run:
            module, x = module.cuda(), x.cuda()
            _precision(dtype)
        (part,) = sparsify_(module.to(dtype=store), (x.to(store),), dtype=dtype, tuned=tuned,
                            tune=tune, dry_run=dry_run, cache=cache, arch=arch)
        part["layer"] = layer.name
        rows.append(part)
    row = {"model": name, "name": _label(name, dtype, sparsity, None), "dtype": dtype,
           "sparsity": sparsity, "rel_err_bound": None, "batch": None,
           "layers": layer_records(rows), "layers_total": len(rows),
           "replaced": sum(r["replaced"] for r in rows)}
    errs = [r["max_rel_err"] for r in rows if r["max_rel_err"] is not None]
    row.update(max_rel_err=max(errs, default=None), verified=not any(
        r["reason"].startswith("verification failed") for r in rows))
    if dry_run:
        row.update(mode="compile-only", verified_layers=sum(
            r["reason"].startswith("dry run") for r in rows))
        return row
    dense_us = sum(r["dense_us"] or 0.0 for r in rows)
    sparse_us = sum((r["sparse_us"] if r["replaced"] else r["dense_us"]) or 0.0 for r in rows)
    row.update(mode="gpu-layers", sparsert_us=sparse_us, dense={"layers_us": dense_us,
               "eager_us": None, "graph_us": None, "compile_us": None},
               best_dense="layers", best_dense_us=dense_us,
               speedup=dense_us / sparse_us if sparse_us else None,
               gpu={"name": torch.cuda.get_device_name()}, torch=torch.__version__)
    return row
