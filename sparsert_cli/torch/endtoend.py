"""End-to-end runs for `sparsert model`: a pruned dense model against its sparsified self.

GPU (one row per model x precision x sparsity x batch): dense eager, dense CUDA graph, the strong
baseline (torch.compile mode="max-autotune-no-cudagraphs" -- or "default", or both ("best",
the default: the faster kept; default mode won on ResNet-50 fp16 in one run, 412.0 against
427.4 us, S13-7), or none: DENSE_COMPILE -- with inductor freezing, channels_last and cudnn.benchmark, then CUDA-graph replayed; models
with grouped convolutions are compiled in NCHW too, the faster kept: `compile_layouts`), TF32
beside fp32, and the sparsified model graph-replayed, eagerly built and (where the dense model
is compiled) under torch.compile(mode="default") too, the faster counted (`sparsert_config`);
outputs checked against the pruned model in float64. The dense times depend on shapes only, so one measurement (a dense_record) serves
every sparsity of a model x precision x input shape (`dense_cached`).
CPU (`dry_run`): every layer compiled (and, with verify, checked by the plan interpreter); no
timings.

Relative error bound: max|y - y64| <= REL_ERR_BOUND[dtype] * max|y64|, y64 the pruned dense model
in float64 on the same input; the dense model's own error is reported beside it.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from sparsert_cli.errors import UserError
from sparsert_cli.torch import ops
from sparsert_cli.torch.check import captured_graph
from sparsert_cli.torch.activations import activation_modules
from sparsert_cli.torch.prune import prune_
from sparsert_cli.torch.sparsify import DTYPES, SparseLayer, sparsify_

REL_ERR_BOUND = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 0.4}   # bf16: fp16's 50 eps (2^-7)
# --dense-compile: the torch.compile mode of the strong dense baseline (None: not measured;
# "best": both modes, the faster kept)
DENSE_COMPILE = {"max-autotune": "max-autotune-no-cudagraphs", "default": "default",
                 "best": "best", "none": None}


def compile_modes(dense_compile: str) -> tuple[str, ...]:
    """The torch.compile modes a --dense-compile choice measures."""
    mode = DENSE_COMPILE[dense_compile]
    if mode == "best":
        return (DENSE_COMPILE["max-autotune"], DENSE_COMPILE["default"])
    return (mode,) if mode else ()


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
    graph = captured_graph(fn, (x,))
    graph.replay()
    return _median_us(graph.replay, iters)


def _precision(dtype: str, tf32: bool = False) -> None:
    """fp32 means fp32: TF32 only where asked (cuDNN allows it by default)."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


@torch.no_grad()
def time_compiled(model, x, mode: str = "max-autotune-no-cudagraphs",
                  channels_last: bool = True) -> tuple[float, float]:
    """(graph-replayed us, compile seconds) of the strong dense baseline."""
    import torch._inductor.config as inductor

    torch.backends.cudnn.benchmark = True
    model = copy.deepcopy(model)
    if x.dim() == 4 and channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(
            memory_format=torch.channels_last)
    torch._dynamo.reset()
    started = time.perf_counter()
    with inductor.patch(freezing=True):
        compiled = torch.compile(model, mode=mode)
        for _ in range(3):
            compiled(x)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        return time_graph(compiled, x), seconds


@torch.no_grad()
def sparse_compiled(model, x) -> tuple[float, float, torch.Tensor]:
    """(graph-replayed us, compile seconds, output) of the sparsified model under
    torch.compile(mode="default") with freezing, in its own layout (the kernels read NCHW):
    inductor fuses the ops around the sparsert custom ops (attention, LayerNorm, GELU, adds)
    as it does for the dense baseline; the kernels stay opaque calls."""
    import torch._inductor.config as inductor

    torch._dynamo.reset()
    started = time.perf_counter()
    with inductor.patch(freezing=True):
        compiled = torch.compile(model, mode="default", fullgraph=True)
        for _ in range(3):
            out = compiled(x)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        us = time_graph(compiled, x)
    torch._dynamo.reset()
    return us, round(seconds, 1), out


def compile_layouts(model, x) -> tuple[str, ...]:
    """The activation layouts the strong baseline is compiled in: "channels_last" for image
    models, and "nchw" too where the model has grouped convolutions (cuDNN's channels_last
    depthwise kernels were 4x slower than NCHW ones on the H100, MobileNet v1 fp16: 53-60 us
    against 15 us for 32x112x112, so channels_last alone would be a weak baseline there);
    "native" (as given) for other inputs. Records made before NCHW was tried hold the first."""
    if x.dim() != 4:
        return ("native",)
    grouped = any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in model.modules())
    return ("channels_last", "nchw") if grouped else ("channels_last",)


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


def best_dense_config(key: str, compile_mode: str | None,
                      layout: str = "channels_last", mode: str | None = None) -> str:
    """What the fastest dense time was measured with, in words (`mode`: the torch.compile
    mode that won, where several were measured)."""
    if key == "compile":
        return (f"torch.compile mode={mode or DENSE_COMPILE[compile_mode]} + freezing + "
                f"{layout} + cudnn.benchmark, CUDA graph")
    return {"eager": "dense eager (NCHW)", "graph": "dense CUDA graph (NCHW)"}.get(key, key)


def gpu_meta() -> dict:
    """The GPU and its software, kept with every measurement."""
    from sparsert_cli.gpu import nvml

    out = {"name": torch.cuda.get_device_name(),
           "capability": list(torch.cuda.get_device_capability()),
           "nvml_driver": nvml.driver_version(), "cuda_runtime": torch.version.cuda}
    try:
        from sparsert_cli.gpu.runtime import cu

        version = cu("cuDriverGetVersion")
        out["driver_version"] = f"{version // 1000}.{version % 1000 // 10}"
    except Exception:  # noqa: BLE001 - the names and torch's view are enough
        pass
    return out


def dense_record(name: str, model, x, dtype: str, dense_compile: str,
                 on_progress=None) -> dict:
    """The dense times of `model` on x (pruned or not: dense kernels do not look at zeros):
    {"model", "dtype", "input_shape", "compile_mode", "gpu", "dense": {eager_us, graph_us,
    compile_us}, "tf32": {graph_us} (fp32), "compile_seconds"}. on_progress(stage, done,
    total, item): stage "dense baseline", one step per compile (mode x layout: minutes each
    in max-autotune mode)."""
    compiles = [(mode, layout) for mode in compile_modes(dense_compile)
                for layout in compile_layouts(model, x)]

    def step(done: int, item: str) -> None:
        if on_progress:
            on_progress("dense baseline", done, 1 + len(compiles), item)

    step(0, "eager and CUDA graph")
    _precision(dtype)
    dense = {"eager_us": time_eager(model, x), "graph_us": time_graph(model, x),
             "compile_us": None}
    record = {"model": name, "dtype": dtype, "input_shape": list(x.shape),
              "compile_mode": dense_compile, "gpu": gpu_meta(), "torch": torch.__version__}
    if dtype == "fp32":
        _precision(dtype, tf32=True)
        record["tf32"] = {"graph_us": time_graph(model, x)}
        _precision(dtype)
    if DENSE_COMPILE[dense_compile]:
        layouts, modes, seconds = {}, {}, 0.0
        for done, (mode, layout) in enumerate(compiles, 1):
            step(done, f"torch.compile mode={mode} ({layout})")
            us, spent = time_compiled(model, x, mode, layout == "channels_last")
            if us < layouts.get(layout, float("inf")):
                layouts[layout] = us
            modes[mode] = min(us, modes.get(mode, float("inf")))
            seconds += spent
        record["compile_layouts_us"] = layouts      # per layout, the fastest mode's
        record["compile_layout"] = min(layouts, key=layouts.get)
        if len(modes) > 1:
            record["compile_modes_us"] = modes
            record["compile_mode_best"] = min(modes, key=modes.get)
        dense["compile_us"] = layouts[record["compile_layout"]]
        record["compile_seconds"] = round(seconds, 1)
        torch.backends.cudnn.benchmark = False
        _precision(dtype)
    record["dense"] = dense
    step(1 + len(compiles), "done")
    return record


def matches(record: dict, name: str, dtype: str, shape, dense_compile: str,
            gpu_name: str) -> bool:
    """Whether a cached dense_record serves this model, precision, input shape and GPU."""
    return (record.get("model"), record.get("dtype"), record.get("input_shape"),
            record.get("compile_mode"), (record.get("gpu") or {}).get("name")) == (
        name, dtype, list(shape), dense_compile, gpu_name)


def graph_launch_choice(model, x, keep_faster: bool = True) -> dict:
    """The sparsified model's CUDA graph timed with programmatic dependent launch as
    sparsify_ left it, and without it (this model's kernels only); with keep_faster, the
    faster state stays set for what is timed next (the compiled model too). It saves ~0.4 us
    a kernel in a chain of ours, but has cost a model more than it saved (MobileNet v1 fp32,
    S12-5). Returns {"graph_us": the counted time} and, where any kernel launches early,
    sparsert_graph_pdl_us, sparsert_graph_serial_us and dependent_launch_kept."""
    out = {"graph_us": time_graph(model, x)}
    before = ops.dependent_launch_states({m.kernel_id for m in model.modules()
                                          if isinstance(m, SparseLayer)})
    if not any(before.values()):
        return out
    try:
        ops.set_dependent_launch(False, before)
        serial = time_graph(model, x)
    finally:
        ops.restore_dependent_launch(before)
    kept = not (keep_faster and serial < out["graph_us"])
    out.update(sparsert_graph_pdl_us=round(out["graph_us"], 2),
               sparsert_graph_serial_us=round(serial, 2), dependent_launch_kept=kept)
    if not kept:
        ops.set_dependent_launch(False, before)
        out["graph_us"] = serial
    return out


def run_model(name: str, model: torch.nn.Module, x: torch.Tensor, *, sparsity: float | None,
              dtype: str, tuned=None, tune: bool = False, dense_compile: str = "best",
              dense_cached: list | None = None, on_dense=None, dry_run: bool = False,
              verify: bool = True, cache: bool = True, arch: str | None = None,
              jobs: int | None = None, on_progress=None,
              dependent_launch: bool | None = None, fuse_depthwise: bool = True) -> dict:
    """One row of the models results (see the module docstring). `sparsity` None keeps the
    model's own zeros (an imported, already pruned network). dense_cached: dense_records
    measured before (one that matches is used instead of measuring); on_dense(record) is
    called as soon as a new one is measured (so it can be saved before the sparse part).
    fuse_depthwise: as sparsify_'s."""
    if dense_compile not in DENSE_COMPILE:
        raise UserError(f"dense_compile must be one of {', '.join(DENSE_COMPILE)}, got "
                        f"{dense_compile!r}")
    if sparsity is not None:
        prune_(model, sparsity)
    row = {"model": name, "name": _label(name, dtype, sparsity, int(x.shape[0])),
           "dtype": dtype, "sparsity": sparsity, "batch": int(x.shape[0]),
           "input_shape": list(x.shape), "rel_err_bound": REL_ERR_BOUND[dtype]}
    stats: dict = {}
    common = dict(dtype=dtype, tuned=tuned, cache=cache, arch=arch, jobs=jobs,
                  on_progress=on_progress, stats=stats, verify=verify,
                  dependent_launch=dependent_launch, fuse_depthwise=fuse_depthwise)
    if dry_run:
        store = DTYPES[dtype]
        rows = sparsify_(model.to(dtype=store), (x.to(store),), dry_run=True, **common)
        ok = [r for r in rows if r["reason"].startswith("dry run")]
        row.update(mode="compile-only", layers=layer_records(rows), layers_total=len(rows),
                   replaced=0, verified_layers=len(ok) if verify else 0, verified=verify and all(
                       not r["reason"].startswith("verification failed") for r in rows),
                   max_rel_err=max((r["max_rel_err"] for r in ok if r["max_rel_err"]
                                    is not None), default=None),
                   kernels=_kernel_stats(stats))
        return row
    device = torch.device("cuda")
    store = DTYPES[dtype]
    model, x = model.to(device, store).eval(), x.to(device, store)
    _precision(dtype)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        dense_out = model(x)
    gpu_name = torch.cuda.get_device_name()
    layouts = compile_layouts(model, x)
    record = next((r for r in dense_cached or ()
                   if matches(r, name, dtype, x.shape, dense_compile, gpu_name)
                   and (not DENSE_COMPILE[dense_compile]
                        or set(r.get("compile_layouts_us") or layouts[:1]) == set(layouts))),
                  None)
    if record is None:
        record = dense_record(name, model, x, dtype, dense_compile, on_progress=on_progress)
        row["dense_source"] = "measured"
        if on_dense:
            on_dense(record)
    else:
        row["dense_source"] = f"cached ({record.get('timestamp', 'earlier run')})"
    dense = dict(record["dense"], compile_mode=dense_compile)
    row.update({k: record[k] for k in ("tf32", "compile_seconds", "compile_layouts_us",
                                       "compile_modes_us", "compile_mode_best") if k in record})
    _precision(dtype)
    torch.backends.cudnn.benchmark = True       # as the strong baseline: for the layers kept dense
    started = time.perf_counter()
    # the layers kept dense run compiled when the compiled sparse model is counted: time the
    # dense side of each race that way too
    rows = sparsify_(model, (x,), tune=tune, compiled_dense=bool(DENSE_COMPILE[dense_compile]),
                     **common)
    row["sparsify_seconds"] = round(time.perf_counter() - started, 1)
    with torch.no_grad():
        out = model(x)
    launch = graph_launch_choice(model, x, keep_faster=dependent_launch is None)
    sparse = {"graph_us": launch.pop("graph_us")}
    row.update(launch)
    if DENSE_COMPILE[dense_compile]:    # the sparse model compiled too, as the dense one is
        us, seconds, compiled_out = sparse_compiled(model, x)
        row["sparsert_compile_rel_err"] = _rel_err(compiled_out, ref)
        if row["sparsert_compile_rel_err"] <= REL_ERR_BOUND[dtype]:   # else not counted
            sparse["compile_us"], sparse["compile_seconds"] = us, seconds
        torch.backends.cudnn.benchmark = True
    sparse_config = min(sparse.keys() - {"compile_seconds"}, key=sparse.get).removesuffix("_us")
    sparse_us = sparse[f"{sparse_config}_us"]
    best_name = min((k for k in ("eager_us", "graph_us", "compile_us") if dense.get(k)),
                    key=lambda k: dense[k])
    best = best_name.removesuffix("_us")
    err, dense_err = _rel_err(out, ref), _rel_err(dense_out, ref)
    row.update(mode="gpu", sparsert_us=sparse_us, sparsert_config=sparse_config,
               sparsert={k: round(v, 2) for k, v in sparse.items()},
               sparsert_eager_us=time_eager(model, x),
               dense=dense, best_dense=best, best_dense_config=best_dense_config(
                   best, dense_compile, record.get("compile_layout", "channels_last"),
                   record.get("compile_mode_best")),
               best_dense_us=dense[best_name],
               speedup=dense[best_name] / sparse_us, max_rel_err=err, dense_rel_err=dense_err,
               verified=bool(np.isfinite(err) and err <= REL_ERR_BOUND[dtype]),
               replaced=sum(r["replaced"] for r in rows), layers_total=len(rows),
               layers=layer_records(rows), kernels=_kernel_stats(stats), gpu=gpu_meta(),
               torch=torch.__version__)
    torch.backends.cudnn.benchmark = False
    return row


def _kernel_stats(stats: dict) -> dict:
    """sparsify_'s compile-phase numbers for a results row."""
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in stats.items()}


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
    return torch.nn.Sequential(module, *activation_modules(layer.activation)).eval(), x


def run_onnx(name: str, layers, *, sparsity: float | None, dtype: str, tuned=None,
             tune: bool = False, dry_run: bool = False, cache: bool = True,
             arch: str | None = None, dependent_launch: bool | None = None) -> dict:
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
                            tune=tune, dry_run=dry_run, cache=cache, arch=arch,
                            dependent_launch=dependent_launch)
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
