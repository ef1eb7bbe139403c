"""sparsify_: replace a model's sparse Conv2d / Linear layers by compiled kernels, in place.

Three phases. Plan: per layer, fold the following BatchNorm, fuse a following ReLU/ReLU6 or
GELU module (and a residual add), record the shape seen in `example_inputs`, and build a Linear
layer whose output only feeds another replaced Linear layer channel-major (a hand-off: the next
kernel reads it as it is, see SparseLayer.run). Compile: every kernel at once,
across processes (cache hits served at once). Check, layer by layer: verify element-wise against
float64 and (on a GPU) time against the dense layer; a kernel is swapped in only when verified
and at least `min_speedup` times faster, so the model never gets slower layer by layer.
Inference only.

Depthwise 3x3 convolutions (groups == in == out channels) run as the C x C x 3 x 3 convolution
whose weight is block-diagonal (backend.block_diagonal: 9 nonzeros a row), through the same
kernels; other grouped convolutions stay dense.

Kernels are specialised to one input shape: a SparseLayer called with another shape runs its
dense (folded) op instead. Linear layers: see SparseLayer.run (transposes outside the op).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from sparsert_cli.errors import UserError
from sparsert_cli.torch import ops
from sparsert_cli.torch.backend import LayerSpec, block_diagonal, compile_layers, tune_layer
from sparsert_cli.torch.check import release_evict, time_cold_us, verify as verify_layer
from sparsert_cli.torch.activations import activation_modules
from sparsert_cli.torch.fuse import Chain, find_chains, folded, idempotent, traces_whole
from sparsert_cli.torch.layers import FoldedDense, SparseLayer, folded_dense_forms
from sparsert_cli.torch import pairs
from sparsert_cli.torch.prune import is_depthwise
from sparsert_cli.torch.residual import ResidualChain, fuse_residuals, unshare_activations

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# In sparsify_'s race a streamed kernel is kept unless the immediate one times this much faster:
# the cold timer evicts everything, while in a replayed forward the streamed family's tables (8 B
# per nonzero) stay in L2 more often than the immediate family's code (16 B per nonzero). H100,
# ResNet-50 fp16, same run (S5-9): forward 313.3 -> 279.4 us at 95% with 1.15 (414.1 -> 417.7
# at 90%, noise). Re-measured with the L2 prefetch (S22-2/S22-3, ResNet-50 fp16 90%): 0.8 383.6,
# 1.0 382.5, 1.15 337.2-339.3, 1.4 335.5, 1.8 337.9, 2.5 344.7 us; MobileNet v1 72.2 at 1.15,
# 84.2 at 1.8 (docs/perf-notes.md, session 22).
STREAMED_PREFERENCE = 1.15
# hand-offs of models read by parts, from the recording forward (_recorded_handoffs); a switch
# for measuring what they change (scripts/hf_probe.py --handoff both)
RECORDED_HANDOFFS = True


def _compiled(form: FoldedDense):
    """form under torch.compile(mode="default"), compiled at its first call."""
    return torch.compile(form, mode="default", fullgraph=True)


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
    if k not in (1, 3, 5, 7):
        return f"kernel {tuple(module.kernel_size)} (only square 1x1, 3x3, 5x5 and 7x7)"
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


# reads of a tensor's metadata only (property getters and methods): not a use of its values
_METADATA = frozenset({"shape", "dtype", "device", "requires_grad", "is_cuda", "ndim", "_version",
                       "layout", "size", "dim", "numel", "nelement", "is_contiguous", "stride",
                       "element_size", "is_floating_point"})


class _Uses(TorchFunctionMode):
    """Counts the torch calls of a forward (function calls, methods, property reads) that take a
    watched tensor as an argument, from the moment it is watched (it is kept alive from then on,
    so its id names it alone); reads of its metadata (_METADATA) and the recording's own copies,
    made while `paused`, are left out."""

    def __init__(self):
        super().__init__()
        self.watched: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
        self.paused = False

    def watch(self, tensor: torch.Tensor) -> None:
        self.watched[id(tensor)] = tensor
        self.counts.setdefault(id(tensor), 0)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":                   # a property: its descriptor's name
            name = getattr(getattr(func, "__self__", None), "__name__", "")
        if not self.paused and self.watched and name not in _METADATA:
            for value in (*args, *kwargs.values()):
                for item in (value if isinstance(value, (list, tuple)) else (value,)):
                    if isinstance(item, torch.Tensor) and id(item) in self.watched:
                        self.counts[id(item)] += 1
        return func(*args, **kwargs)


def _record_inputs(model, chains: list[Chain], example_inputs, outputs: bool = False) -> dict:
    """Run the model once; per layer: how often it ran and its (first) input (and residual).
    With `outputs`, also for a chain without a residual its (first) output after its activation
    module ("output") and how many torch calls of the forward took that output afterwards
    ("output_uses"; one more where the forward's result holds it or a module keeps it as an
    attribute: readers the count cannot see)."""
    seen: dict[str, dict] = {}
    modules = dict(model.named_modules())
    handles = []
    uses = _Uses()
    for chain in chains:
        def hook(module, args, name=chain.layer, residual=chain.residual is not None):
            slot = seen.setdefault(name, {"calls": 0})
            slot["calls"] += 1
            if slot["calls"] == 1:
                uses.paused = True
                try:
                    slot["x"] = args[0].detach().clone()
                    slot["res"] = args[1].detach().clone() if residual else None
                    slot["version"] = _version(args[0])
                finally:
                    uses.paused = False
                slot["source"] = args[0]    # the object itself (kept alive: ids stay unique)
                slot["order"] = len(seen)
        handles.append(modules[chain.entry].register_forward_pre_hook(hook))
        if outputs and chain.residual is None:
            def keep(module, args, output, name=chain.layer):
                slot = seen.get(name)
                if slot is not None and "output" not in slot:
                    slot["output"] = output
                    if isinstance(output, torch.Tensor):
                        uses.watch(output)
            handles.append(modules[chain.act_module or chain.layer].register_forward_hook(keep))
    absorbed: dict[str, int] = {}       # calls of the BatchNorm / activation modules chains take
    for name in {n for c in chains for n in (c.bn, c.act_module) if n}:
        def count(module, args, name=name):
            absorbed[name] = absorbed.get(name, 0) + 1
        handles.append(modules[name].register_forward_pre_hook(count))
    try:
        with torch.no_grad(), (uses if outputs else contextlib.nullcontext()):
            result = model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    kept = _held(result, model) if outputs else set()
    for chain in chains:
        if chain.layer in seen:
            slot = seen[chain.layer]
            slot["absorbed"] = {n: absorbed.get(n, 0) for n in (chain.bn, chain.act_module) if n}
            if isinstance(slot.get("output"), torch.Tensor):
                slot["output_uses"] = (uses.counts.get(id(slot["output"]), 0)
                                       + (id(slot["output"]) in kept))
    return seen


def _held(result, model) -> set[int]:
    """ids of the tensors the forward's result holds (any nesting) and of those a module keeps
    as a plain attribute (or in a list, tuple or dict attribute) after it."""
    from torch.utils._pytree import tree_leaves

    # a mapping pytree may not know (transformers' ModelOutput): its values
    parts = list(result.values()) if isinstance(result, Mapping) else [result]
    held = {id(t) for part in parts for t in tree_leaves(part) if isinstance(t, torch.Tensor)}
    for module in model.modules():
        for value in vars(module).values():
            items = (value.values() if isinstance(value, dict) else
                     value if isinstance(value, (list, tuple)) else (value,))
            held |= {id(t) for t in items if isinstance(t, torch.Tensor)}
    return held


def _recorded_handoffs(chains: list[Chain], seen: dict, modules) -> list[str]:
    """Hand-offs of a model torch.fx cannot trace whole (read by parts, where a layer and the
    layer it feeds sit in different parts: Hugging Face BERT's intermediate and output), read
    from the recording forward: Linear layer A (no residual, called once) whose output (after
    its activation module) was taken by exactly one torch call of the forward, and that object
    is the input of Linear layer B's one call: A feeds B (Chain.feeds, as find_chains sets it
    from a traced graph). Returns the layers given a hand-off."""
    by_source = {id(rec["source"]): name for name, rec in seen.items()
                 if rec.get("calls") == 1 and "source" in rec}
    given = []
    for chain in chains:
        rec = seen.get(chain.layer)
        if (chain.feeds or chain.residual or rec is None or rec.get("calls") != 1
                or rec.get("output_uses") != 1
                or not isinstance(modules.get(chain.layer), torch.nn.Linear)):
            continue
        reader = by_source.get(id(rec["output"]))
        if reader is None or reader == chain.layer \
                or not isinstance(modules.get(reader), torch.nn.Linear):
            continue
        chain.feeds = reader
        given.append(chain.layer)
    return given


def _called_elsewhere(chain: Chain, record: dict | None) -> Chain:
    """chain without the BatchNorm / activation module that the recording forward called more
    often than its layer (a parent calling a part's `self.block.act` directly, which reading the
    part alone cannot see): replacing it by Identity would change those calls too. A BatchNorm
    goes with what follows it; an idempotent activation may stay fused (the module stays and
    applies once more); no hand-off from a layer whose absorbed module stays in between."""
    if record is None or chain.residual:       # a ResidualChain's modules are its own
        return chain
    calls = record.get("absorbed", {})
    if chain.bn and calls.get(chain.bn) != record["calls"]:
        return Chain(chain.layer, residual=chain.residual)
    if chain.act_module and calls.get(chain.act_module) != record["calls"]:
        return Chain(chain.layer, chain.bn, chain.activation if idempotent(chain.activation)
                     else "none", residual=chain.residual)
    return chain


class _Shared:
    """What a group of sibling Linear layers (one input, one kernel) shares in a forward: the
    input the head ran on and its output, all siblings' rows."""

    x = None
    y = None
    layer = None        # the head's SparseLayer (its output's layout: SparseLayer.part)
    version = None


def _version(t: torch.Tensor):
    """t's in-place version counter (None for inference-mode tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:
        return None


class SiblingHead(torch.nn.Module):
    """The first of sibling Linear layers called on one input: runs one kernel for all of them
    (their weights stacked) and returns its own slice of the output."""

    def __init__(self, layer: SparseLayer, shared: _Shared, rows: tuple[int, int]):
        super().__init__()
        self.layer, self.shared, self.rows = layer, shared, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        self.shared.x, self.shared.y, self.shared.layer = x, y, self.layer
        if not torch.compiler.is_compiling():
            self.shared.version = _version(x)
        return self.layer.part(y, self.rows)

    def extra_repr(self) -> str:
        return f"rows={self.rows[0]}:{self.rows[1]} of {self.layer.weight.shape[0]}"


class SiblingSlice(torch.nn.Module):
    """A sibling after the head: its slice of the head's output. Called on another input than
    the head's (a forward that differs from the recorded one), or on the same tensor changed in
    place since, it runs its own dense op (the version test only outside torch.compile, which
    traces the forward as called)."""

    def __init__(self, dense: torch.nn.Module, shared: _Shared, rows: tuple[int, int]):
        super().__init__()
        self.dense, self.shared, self.rows = dense, shared, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared.x is not x or (not torch.compiler.is_compiling()
                                      and self.shared.version != _version(x)):
            return self.dense(x)
        return self.shared.layer.part(self.shared.y, self.rows)

    def extra_repr(self) -> str:
        return f"rows={self.rows[0]}:{self.rows[1]} of the head's output"


def _sibling_groups(todo: list, modules, seen) -> list[list[int]]:
    """Indices into todo of Linear layers called on the same input object, unchanged in place
    between the calls (and nothing fused but the same activation), in call order: each group
    of two or more can be one kernel. A layer whose fused activation is not idempotent (GELU)
    stays alone: the siblings' swap leaves their activation modules in the model, where ReLU
    applied again changes nothing."""
    groups: dict[tuple, list[int]] = {}
    for i, (_, chain, *_) in enumerate(todo):
        module = modules[chain.layer]
        if not isinstance(module, torch.nn.Linear) or chain.bn or chain.residual or (
                chain.activation != "none" and not idempotent(chain.activation)):
            continue
        record = seen[chain.layer]
        key = (id(record["source"]), record["version"], chain.activation)
        groups.setdefault(key, []).append(i)
    return [sorted(g, key=lambda i: seen[todo[i][1].layer]["order"])
            for g in groups.values() if len(g) > 1]


def _fuse_siblings(todo: list, modules, seen) -> list:
    """todo with each sibling group as one entry: (head row, head chain, the stacked layer's
    spec, stacked weight, stacked bias, [(row, chain, (first, end row)) per sibling])."""
    groups = _sibling_groups(todo, modules, seen)
    grouped = {i for g in groups for i in g}
    out = [entry + (None,) for i, entry in enumerate(todo) if i not in grouped]
    for group in groups:
        entries = [todo[i] for i in group]
        weights = [e[3] for e in entries]
        biases = [e[4] if e[4] is not None else torch.zeros(w.shape[0], dtype=w.dtype)
                  for e, w in zip(entries, weights)]
        weight, bias = torch.cat(weights), torch.cat(biases)
        if all(e[4] is None for e in entries):
            bias = None
        ends = np.cumsum([0] + [w.shape[0] for w in weights])
        members = [(e[0], e[1], (int(ends[k]), int(ends[k + 1]))) for k, e in enumerate(entries)]
        head = entries[0]
        label = "+".join(e[1].layer for e in entries)
        epilogue = dict(head[2].epilogue or {}, bias=None if bias is None else bias.numpy())
        sizes = {w.shape[0] for w in weights}
        if epilogue.get("token_major") and len(sizes) == 1:
            # equal siblings (q, k, v): each its own plane, a contiguous N x P block that
            # attention reads as it is (no copy of a slice)
            epilogue["planes"] = sizes.pop()
        spec = LayerSpec(label, weight.numpy(), "gemm", n=head[2].n, epilogue=epilogue,
                         family=head[2].family)
        out.append((head[0], head[1], spec, weight, bias, members))
    return sorted(out, key=lambda e: seen[e[1].layer]["order"])


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
    return torch.nn.Sequential(*parts, *activation_modules(chain.activation))


def sparsify_(model: torch.nn.Module, example_inputs, *, dtype: str = "fp32", tuned=None,
              verify: bool = True, min_speedup: float = 1.0, min_sparsity: float = 0.5,
              dry_run: bool = False, arch: str | None = None, cache: bool = True,
              include=None, tune: bool = False, fuse_residual: bool = True,
              race: bool = True, fuse_siblings: bool = True, jobs: int | None = None,
              on_progress=None, stats: dict | None = None,
              compiled_dense: bool = False, dependent_launch: bool | None = None,
              fuse_depthwise: bool = True) -> list[dict]:
    """Replace the sparse Conv2d (square 1x1/3x3/5x5/7x7, stride 1/2; groups=1 or depthwise)
    and Linear layers of `model` (on a CUDA device, in eval mode: this call sets it) with
    compiled kernels, in place.

    example_inputs: a tuple of tensors the model is called with; kernels are compiled for the
    shapes each layer sees. dtype: the activations' type (fp16 / bf16: convert the model
    first, e.g. model.half()).
    tuned: the tuned-plan database (None: the default one; False: none). verify: check every
    kernel element-wise against float64 before using it. min_speedup: a layer is replaced only
    when its kernel is at least this much faster than the dense layer. Both are timed here, on
    the GPU, as a whole forward runs them (check.time_cold_us: their code and weights evicted
    from L2, their input just written), not warm and alone as `bench` times a layer. The dense
    layer is the fastest of its forms: the model's own modules, and BatchNorm folded
    (FoldedDense: conv2d, or a stride-1 1x1 convolution as one batched GEMM; BatchNorm folded
    as a frozen compiled model has it); row "dense_form" names the fastest. A layer whose
    kernel loses keeps its fastest uncompiled form: a folded one is swapped in for the layer,
    BatchNorm and activation, and its reason says so.
    compiled_dense: also time the folded conv2d/linear form under torch.compile (mode
    "default", no freezing: inductor fuses bias, add and activation into one pointwise kernel
    after the convolution; a few seconds of compiling per layer; torch._dynamo is reset before
    each, so other compiled callables recompile at their next call; a form that fails to
    compile is skipped, and the row says why in dense_compile_failed), for a model that will
    run compiled: `sparsert model` counts the compiled sparse model when it is faster. A kept
    layer holds the fastest uncompiled form either way (a compiled model compiles it).
    dependent_launch: compile kernels that wait for the kernel before them and launch them with
    programmatic stream serialization (None: where the GPU has it, sm_90 and newer), so in a
    run of replaced layers each kernel starts while the one before it ends (~0.4 us a kernel
    in a CUDA graph on an H100); ops.set_dependent_launch() turns it off and on again. Only
    kernels whose previous launch in the forward (torch.fx, after the swaps; for a model that
    does not trace, the GPU work one forward on example_inputs runs, recorded by
    torch.profiler) is one of ours keep it: after one of torch's it only costs (stats:
    dependent_launch_off).
    Kept layers swapped for a FoldedDense hold their folded weights as buffers: the model's
    Conv2d/BatchNorm parameters are gone there, and a later prune_/sparsify_ no longer sees
    those layers.
    min_sparsity: denser layers keep the dense op (their straight-line code would be huge); a
    depthwise layer counts as its block-diagonal C x C weight (at least 1 - 1/C sparse).
    dry_run: plan, compile and (with verify) check on the CPU interpreter; the model is not
    changed. include: None or a callable(name, module) -> bool choosing layers. fuse_residual:
    rewrite submodules computing act(bn(conv(x)) + identity) or linear(x) + residual (a Dropout
    between the layer and the add is stepped over) with torch.fx so one kernel does it all, and
    give each call of a shared ReLU module its own copy, so a kernel that fuses the
    ReLU also takes it out of the model. race (GPU): a layer planned in the immediate family
    also gets the streamed family's kernel, and keeps whichever is faster as the forward runs
    it (straight-line code fetched from memory is what makes large immediate kernels slower in
    a model than alone), the streamed one unless the immediate one is STREAMED_PREFERENCE
    (1.15x) faster. fuse_siblings: Linear layers called on the same input (a
    transformer's query, key and value) become one kernel of their stacked weights; the first
    one called runs it and the others take their slices (equal siblings: each its own
    contiguous plane of the output, no copy; a sibling called on another input runs its dense
    op). Activations fused: a ReLU/ReLU6 module or call, and an exact nn.GELU
    module called once (replaced by Identity; a functional F.gelu stays in the model, unfused).
    Channel-major hand-off: a Linear layer whose output (after its fused activation module) is
    only the input of another Linear layer that gets a kernel too (BERT's ffn_up, GELU,
    ffn_down; no sibling groups; in a model torch.fx cannot trace whole, such as Hugging Face
    BERT, where the two layers sit in different parts: when the example forward passed that
    output to the next layer and to no other torch call, did not return it and left it in no
    module attribute) is built channel-major and returns its M x N output as a transposed view
    (non-contiguous: a later forward that reads it some other way, or code reading its memory
    outside torch, sees N x M strides), which the next kernel reads as its K x N columns as it
    is: no transpose copy and no kernel between the two, in eager mode and under torch.compile (if
    the next layer keeps its dense op, F.linear reads the view); such a kernel keeps
    programmatic dependent launch after its producer. fuse_depthwise: a replaced 1x1 layer
    whose output only feeds a replaced depthwise 3x3 layer (MobileNet's blocks; traced models,
    batch 1) runs with it as one fused kernel (pairs.py) where that kernel verifies and (GPU)
    times faster than the two; not in a dry run. tune: run the tuner (GPU) on every
    layer first and record its winners in `tuned` (a path or TunedDB). jobs: compile
    processes (None: one per core; every kernel is compiled before any is checked).
    on_progress(stage, done, total, item): progress of the "compile", "compile streamed
    rivals", "check", "compile pointwise -> depthwise" (the fused pairs' kernels, across
    `jobs` processes too) and "fuse pointwise -> depthwise" stages. stats: receives
    plan_seconds, compile_seconds, kernels,
    cached, dependent_launch (kernels compiled for it), dependent_launch_off (of those,
    launched plainly: after one of torch's kernels, or a Linear layer whose input transpose
    is a copy), rival_seconds, rivals and fused_pairs.
    Returns one dict per layer: layer, op, shape, sparsity, fused, family, plan, replaced,
    reason, max_err, max_rel_err, dense_us, sparse_us, speedup (dense_form where the race ran;
    and, where a rival was timed,
    tried: {"family plan": us}; rival_failed where one failed verification; on the first of
    sibling layers, siblings: the others its stacked kernel runs, whose rows say so in
    reason; on a layer planned as a hand-off's first (replaced or not), layout:
    "channel-major (feeds <layer>)"; on a 1x1 layer of a fused pair: pair (pairs.fuse_pairs
    says what it sets)). Render with report_table().
    """
    _check_args(dtype, min_speedup, min_sparsity)
    if dependent_launch not in (None, True, False):
        raise UserError(f"dependent_launch must be True, False or None, got {dependent_launch!r}")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise UserError(f"jobs must be an integer >= 1 or None, got {jobs!r}")
    device = _device(model)
    if not dry_run and device.type != "cuda":
        raise UserError("sparsify_ swaps layers for GPU kernels: move the model to a CUDA device "
                        "(model.cuda()), or pass dry_run=True to compile and verify on the CPU")
    return _sparsify(model, example_inputs, dtype=dtype, tuned=tuned, verify=verify,
                     min_speedup=min_speedup, min_sparsity=min_sparsity, dry_run=dry_run,
                     arch=arch, cache=cache, include=include, device=device,
                     tune=tune and not dry_run, fuse_residual=fuse_residual, race=race,
                     fuse_siblings=fuse_siblings, jobs=jobs, on_progress=on_progress,
                     compiled_dense=compiled_dense, dependent_launch=dependent_launch,
                     stats=stats, fuse_depthwise=fuse_depthwise)


def _new_row(chain: Chain, module) -> dict:
    fused = [p for p in ("bn" if chain.bn else "", "add" if chain.residual else "",
                         chain.activation if chain.activation != "none" else "") if p]
    weight = module.weight.detach()
    return {"layer": chain.layer, "op": "linear" if isinstance(module, torch.nn.Linear)
            else "conv", "shape": "", "fused": "+".join(fused),
            "sparsity": 1.0 - int(torch.count_nonzero(weight)) / weight.numel(),
            "family": None, "plan": None, "replaced": False, "reason": "", "max_err": None,
            "max_rel_err": None, "dense_us": None, "sparse_us": None, "speedup": None}


def _output_shape(module, x: torch.Tensor) -> tuple:
    """The shape a Linear or Conv2d layer returns for input x."""
    if isinstance(module, torch.nn.Linear):
        return (*x.shape[:-1], module.out_features)
    size = [(x.shape[2 + i] + 2 * module.padding[i] - module.dilation[i] * (
        module.kernel_size[i] - 1) - 1) // module.stride[i] + 1 for i in range(2)]
    return (x.shape[0], module.out_channels, *size)


def _why_not(module, record, dtype, min_sparsity, row) -> str | None:
    """Why this layer keeps its dense op before any kernel is made (None: make one)."""
    why = _unsupported(module)
    if why is None and record["calls"] > 1:
        why = f"called {record['calls']} times per forward (shared module)"
    if why is None and record["x"].dtype != DTYPES[dtype]:
        why = f"input is {record['x'].dtype}, kernels are {dtype} (convert the model first)"
    res = record.get("res")
    out = None if why is not None or res is None else _output_shape(module, record["x"])
    if out is not None and tuple(res.shape) != out:
        why = (f"residual of shape {tuple(res.shape)} is not the layer's output shape {out} "
               "(a broadcast add stays dense)")
    if why is None and res is not None and res.dtype != DTYPES[dtype]:
        why = f"residual is {res.dtype}, kernels are {dtype}"
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
              race=True, fuse_siblings=True, jobs=None, on_progress=None,
              stats=None, compiled_dense=False, dependent_launch=None,
              fuse_depthwise=True) -> list[dict]:
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
        unshare_activations(model)      # a fused ReLU call leaves the model with its kernel
    modules = dict(model.named_modules())
    chains = [c for c in find_chains(model)
              if include is None or include(c.layer, modules[c.layer])]
    by_parts = RECORDED_HANDOFFS and not traces_whole(model)
    seen = _record_inputs(model, chains, example_inputs, outputs=by_parts)
    if by_parts:
        _recorded_handoffs(chains, seen, modules)
    chains = [_called_elsewhere(c, seen.get(c.layer)) for c in chains]
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
            todo.append((row, chain))
    # a Linear layer read by another replaced Linear layer alone hands it its output M x N
    handoffs = _handoffs(todo, modules, seen, fuse_siblings)
    for row, chain in todo:
        if chain.layer in handoffs:
            row["layout"] = f"channel-major (feeds {chain.feeds})"
    todo = [(row, chain, *_spec(chain, modules[chain.layer], modules, seen[chain.layer]["x"],
                                chain.layer in handoffs)) for row, chain in todo]
    if tune:
        for row, chain, spec, _, _ in todo:
            try:
                entry = tune_layer(spec.weight, op=spec.op, label=spec.label,
                                   input_shape=spec.input_shape, n=spec.n, stride=spec.stride,
                                   padding=spec.padding, dtype=dtype, epilogue=spec.epilogue,
                                   tuned=tuned, arch=arch, family=spec.family)
            except UserError as exc:
                row["reason"] = f"no kernel: {exc.message}"
                continue
            if entry.get("status") != "ok":     # the layer keeps its untuned plan: say so
                warnings.warn(f"sparsert: tuning {chain.layer}: {entry.get('status')}; its "
                              f"default plan is used", stacklevel=2)
        todo = [t for t in todo if not t[0]["reason"]]
    # siblings (Linear layers on one input: a transformer's query, key and value) become one
    # kernel; each todo entry ends with its members, None for a layer alone
    todo = _fuse_siblings(todo, modules, seen) if fuse_siblings else [t + (None,) for t in todo]
    for record in seen.values():
        record.pop("source", None)      # the recording forward's tensors: no longer needed
        record.pop("output", None)
    # ---- compile: every kernel at once, across processes
    count = [0]

    def compiled(i, result):
        count[0] += 1
        if on_progress:
            on_progress("compile", count[0], len(todo), todo[i][1].layer)

    info = {} if stats is None else stats
    kernels = compile_layers([t[2] for t in todo], dtype=dtype, tuned=tuned, arch=arch,
                             cache=cache, jobs=jobs, on_done=compiled, stats=info,
                             dependent_launch=dependent_launch)
    info["kernels"] = sum(not isinstance(k, str) for k in kernels)
    info["cached"] = sum(bool(getattr(k, "cached", False)) for k in kernels)
    info["dependent_launch"] = sum(bool(getattr(k, "dependent_launch", False)) for k in kernels)
    rivals = _rivals(todo, kernels, dtype, tuned, arch, cache, jobs, on_progress, info,
                     dependent_launch) if race and on_gpu else {}
    # ---- check: verify, time and swap, layer by layer
    for done, ((row, chain, spec, weight, bias, members), kernel) in enumerate(
            zip(todo, kernels), 1):
        if on_progress:
            on_progress("check", done, len(todo), chain.layer)
        if members:
            row["shape"] = f"{weight.shape[0]}x{weight.shape[1]}, N={spec.n}"
            row["siblings"] = [m[1].layer for m in members[1:]]
        if isinstance(kernel, str):
            row["reason"] = kernel
        else:
            record = seen[chain.layer]
            options = [kernel] + ([rivals[done - 1]] if done - 1 in rivals else [])
            feeds = chain.feeds if chain.layer in handoffs else None
            layers = [_load(k, chain, modules[chain.layer], record["x"], dtype, weight, bias,
                            on_gpu, feeds) for k in options]
            _check_layer(model, modules, chain, layers, record, row, dtype, verify, dry_run,
                         on_gpu, min_speedup, members, compiled_dense)
        for member_row, _, _ in (members or [])[1:]:
            if not member_row["replaced"]:
                member_row["reason"] = f"with {chain.layer}: {row['reason']}"
    if fuse_depthwise and not dry_run:
        info["fused_pairs"] = pairs.fuse_pairs(
            model, chains, rows, {t[1].layer: (t[3], t[4]) for t in todo}, seen, dtype=dtype,
            arch=arch, cache=cache, verify=verify, on_gpu=on_gpu,
            dependent_launch=info["dependent_launch"] > 0, on_progress=on_progress, jobs=jobs)
    if on_gpu:      # what the dense layers cost: their share of the model
        for chain, row in zip(chains, rows):
            record = seen.get(chain.layer)
            if not row["replaced"] and row["dense_us"] is None and record is not None:
                inputs = (record["x"],) if record["res"] is None else (record["x"],
                                                                       record["res"])
                row["dense_us"] = time_cold_us(_dense_module(modules, chain), inputs)
        release_evict()
    if on_gpu and not dry_run:
        info["dependent_launch_off"] = _launch_early_only_after_ours(model, example_inputs)
    return rows


# ---- which kernels start early -----------------------------------------------------------------
# calls that launch no kernel (views, shapes, modules that do nothing in eval mode)
_VIEW_FUNCTIONS = {torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze,
                   torch.unsqueeze, getattr}
_VIEW_METHODS = {"view", "view_as", "reshape", "flatten", "transpose", "permute", "size", "dim",
                 "t", "squeeze", "unsqueeze", "expand", "__getitem__"}
_NO_KERNEL_MODULES = (torch.nn.Identity, torch.nn.Dropout, torch.nn.Flatten)


def _launch_order(model) -> list[tuple[object, bool, bool]] | None:
    """The model's forward as torch.fx reads it after the swaps: per call that launches work,
    (its SparseLayer, whether our kernel is the last thing it launches, whether its input
    comes from a channel-major hand-off (SparseLayer.feeds: no transpose copy before it)), or
    (None, False, False) for torch's kernels; None when the model does not trace."""
    import operator

    import torch.fx

    ours = (SparseLayer, SiblingHead, SiblingSlice, ResidualChain, FoldedDense)

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, module, qualified_name) -> bool:
            return isinstance(module, ours) or super().is_leaf_module(module, qualified_name)

    try:
        graph = Tracer().trace(model)
    except Exception:  # noqa: BLE001 -- untraceable: every kernel keeps its launch
        return None
    modules = dict(model.named_modules())
    heads = {id(m.shared): m.layer for m in modules.values() if isinstance(m, SiblingHead)}
    order = []
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        if node.op == "call_function" and node.target in (_VIEW_FUNCTIONS | {operator.getitem}):
            continue
        if node.op == "call_method" and node.target in _VIEW_METHODS:
            continue
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, _NO_KERNEL_MODULES):
            continue
        if isinstance(module, SiblingSlice):     # a plane launches nothing; a slice copies
            head = heads.get(id(module.shared))
            if head is not None and head.planes:
                continue
            order.append((None, False, False))
            continue
        layer = (module if isinstance(module, SparseLayer) else
                 module.layer if isinstance(module, SiblingHead) else
                 module.sparse if isinstance(module, ResidualChain) else None)
        if not isinstance(layer, SparseLayer):
            order.append((None, False, False))
            continue
        # a sibling head without planes copies its slice after the kernel
        order.append((layer, not isinstance(module, SiblingHead) or bool(layer.planes),
                      _handed_over(node, modules)))
    return order


def _handed_over(node, modules) -> bool:
    """Whether the call `node` takes its input straight (through the Identity left where its
    activation module was) from a SparseLayer that feeds it: a transposed view of M x N."""
    source = node.args[0] if node.args else None
    while (getattr(source, "op", None) == "call_module"
           and isinstance(modules.get(source.target), torch.nn.Identity) and source.args):
        source = source.args[0]
    if getattr(source, "op", None) != "call_module":
        return False
    producer = modules.get(source.target)
    reader = (f"{node.target}.conv" if isinstance(modules.get(node.target), ResidualChain)
              else node.target)        # a Linear layer with its residual add: the chain's layer
    return isinstance(producer, SparseLayer) and producer.feeds == reader


def _plain_launches(order) -> set[int]:
    """Kernel ids (of _launch_order's layers) to launch without dependent launch: those after
    one of torch's kernels (or first), and Linear layers whose input is transposed by a copy
    (all but those handed a channel-major output)."""
    off, previous_ours = set(), False
    for layer, ends_ours, handed_over in order:
        if layer is not None and (not previous_ours or (layer.kind == "linear"
                                                        and not handed_over)):
            off.add(layer.kernel_id)
        previous_ours = layer is not None and ends_ours
    return off


def _launch_early_only_after_ours(model, example_inputs=None) -> int:
    """Programmatic dependent launch pays only where the kernel before is one of ours (it
    lets the next start early); after one of torch's, the early-launched kernel waits on its
    SMs while torch's runs (BERT fp32: 12-18 us slower, S9-7/S9-8). So a kernel keeps it only
    when the model's previous launch is one of our kernels: never for a Linear layer whose
    input is transposed first (a copy), only for one handed a channel-major output. Returns how
    many kernels were set to launch plainly. A model that does not trace (a Hugging Face
    model: its forwards take defaulted arguments) is read from the GPU work one forward on
    `example_inputs` launches instead (_profiled_plain_launches)."""
    order = _launch_order(model)
    if order is not None:
        plain = _plain_launches(order)
    elif example_inputs is not None:
        plain = _profiled_plain_launches(model, example_inputs)
        if plain is None:
            return 0
    else:
        return 0
    states = ops.dependent_launch_states(plain)
    ops.set_dependent_launch(False, [i for i, on in states.items() if on])
    return sum(states.values())


def _profiled_plain_launches(model, example_inputs) -> set[int] | None:
    """Kernel ids of the model's SparseLayers to launch plainly, read from what one forward
    runs on the GPU (torch.profiler's CUDA activity: kernels, copies and sets, in the order
    they start): those whose previous GPU work is not one of our kernels. None when the
    profiler saw none of ours (or failed): then every kernel keeps its launch. Not measured:
    whether CUPTI, left attached after the record, slows what is timed later (transformers'
    BertModel fp32 90% graphed 1242.0 us after it, S13-2, and 1223.4 us with the same plain
    launches and no profiler on another machine, S13-1)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    ids = {m.kernel_id for m in model.modules() if isinstance(m, SparseLayer)}
    names: dict[str, set[int]] = {}
    for i in ids:
        entry = ops._REGISTRY.get(i)
        if entry is not None and entry.loaded is not None:
            names.setdefault(entry.loaded.entry, set()).add(i)
    try:
        with torch.no_grad():
            model(*example_inputs)          # warm: no lazy initialisation in the record
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model(*example_inputs)
                torch.cuda.synchronize()
        work = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA),
                      key=lambda e: e.time_range.start)
    except Exception:  # noqa: BLE001 -- no profiler here: every kernel keeps its launch
        return None
    return plain_after_theirs([e.name for e in work], names)


def plain_after_theirs(sequence: list[str], names: dict[str, set[int]]) -> set[int] | None:
    """Of `names` (kernel entry name -> kernel ids), the ids of kernels that follow GPU work
    other than ours (or start the sequence) at least once in `sequence` (the names of the GPU
    work a forward runs, in order); None when none of ours is in it."""
    plain, seen, previous_ours = set(), False, False
    for name in sequence:
        mine = names.get(name)
        if mine is not None:
            seen = True
            if not previous_ours:
                plain |= mine
        previous_ours = mine is not None
    return plain if seen else None


def _rivals(todo, kernels, dtype, tuned, arch, cache, jobs, on_progress, info,
            dependent_launch=None) -> dict:
    """The streamed family's kernel for every layer planned in the immediate family, by index
    into todo: in a whole forward a layer's straight-line code comes from memory, not L2, which
    makes large immediate kernels slower than they time alone (and than the plans ranked by the
    tuner and the cost model); each layer keeps whichever times faster as a forward runs it."""
    import time

    which = [i for i, k in enumerate(kernels)
             if not isinstance(k, str) and getattr(k, "family", None) == "immediate"]
    if not which:
        return {}
    started = time.perf_counter()
    count = [0]

    def compiled(j, result):
        count[0] += 1
        if on_progress:
            on_progress("compile streamed rivals", count[0], len(which), todo[which[j]][1].layer)

    specs = [LayerSpec(**{**todo[i][2].__dict__, "family": "streamed"}) for i in which]
    found = compile_layers(specs, dtype=dtype, tuned=tuned, arch=arch, cache=cache, jobs=jobs,
                           on_done=compiled, dependent_launch=dependent_launch)
    info["rival_seconds"] = time.perf_counter() - started
    info["rivals"] = sum(not isinstance(k, str) for k in found)
    return {i: k for i, k in zip(which, found) if not isinstance(k, str)}


def _check_layer(model, modules, chain, layers, record, row, dtype, verify, dry_run, on_gpu,
                 min_speedup, members=None, compiled_dense=False) -> None:
    """Verify each candidate (SparseLayer, row fields) of one chain -- the planned kernel first,
    then its rivals --, time the verified ones and the dense op as a forward runs them
    (time_cold_us), and swap in the fastest if it beats dense by min_speedup. `members`:
    sibling layers sharing this kernel ((row, chain, rows) each, the head first): dense is one
    GEMM of their stacked weights, and each is swapped for its slice."""
    x, res = record["x"], record["res"]
    inputs = (x,) if res is None else (x, res)
    chosen = None
    try:
        passed, failed = [], []
        for layer, fields in layers:
            if verify:
                result = verify_layer(layer, x, res, dtype)
                fields = {**fields, "max_err": result["max_err"],
                          "max_rel_err": result["max_rel_err"]}
                if not result["ok"]:
                    failed.append((fields, result["message"]))
                    continue
            passed.append((layer, fields))
        if failed and passed:           # a rival that fails is kept out, and said
            row["rival_failed"] = "; ".join(f"{f['family']} {f['plan']}: {m}" for f, m in failed)
        if not passed:
            fields, message = failed[0]
            row.update(fields, reason=f"verification failed: {message}")
            return
        layer, fields = passed[0]
        if on_gpu:
            # the dense op, as the model runs it and folded as a frozen compiled model runs it
            # (siblings: one GEMM of their stacked weights, as freezing concatenates them, not
            # their GEMMs one by one)
            if members:
                denses = [("stacked", layer.dense, layer.dense)]
            else:
                folded_forms = folded_dense_forms(layer)
                denses = [("module", None, _dense_module(modules, chain))] + [
                    (f"folded{' gemm' if f.gemm else ''}", f, f) for f in folded_forms]
                if compiled_dense:      # bias, add and activation fused by inductor
                    denses.append(("folded compiled", folded_forms[0],
                                   _compiled(folded_forms[0])))
            dense_times = []
            for label, _, timed in denses:
                if not label.endswith("compiled"):
                    dense_times.append(time_cold_us(timed, inputs))
                    continue
                torch._dynamo.reset()   # every FoldedDense shares one forward: a fresh cache
                try:                    # per compile (its recompile limit)
                    dense_times.append(time_cold_us(timed, inputs))
                except Exception as exc:        # noqa: BLE001 -- inductor/Triton failures
                    dense_times.append(float("inf"))
                    row["dense_compile_failed"] = f"{type(exc).__name__}: {exc}"[:200]
            fastest = min(range(len(denses)), key=dense_times.__getitem__)
            row["dense_us"] = dense_times[fastest]
            # the form a kept layer runs in eager mode and CUDA graphs: the fastest uncompiled
            # one (compiled, the model compiles whichever it holds)
            eager = min((i for i, (label, _, _) in enumerate(denses)
                         if not label.endswith("compiled")), key=dense_times.__getitem__)
            if not members:
                row["dense_form"] = denses[fastest][0]
            timed = sorted(((time_cold_us(lay, inputs), i) for i, (lay, _) in enumerate(passed)))
            if len(passed) > 1:
                row["tried"] = {f"{passed[i][1]['family']} {passed[i][1]['plan']}": round(us, 2)
                                for us, i in timed}
            # the race, among the kernels that beat dense by min_speedup (all, if none does):
            # a streamed kernel stays ahead unless beaten by STREAMED_PREFERENCE
            fast = [t for t in timed if row["dense_us"] >= min_speedup * t[0]] or timed
            sparse_us, best = min(fast, key=lambda t: t[0] / (
                STREAMED_PREFERENCE if passed[t[1]][1]["family"] == "streamed" else 1.0))
            layer, fields = passed[best]
            row.update(fields, sparse_us=sparse_us, speedup=row["dense_us"] / sparse_us)
            if row["speedup"] < min_speedup:
                row["reason"] = f"dense is faster ({row['speedup']:.2f}x)"
                if members:         # each sibling's own times are filled in at the end
                    row["dense_us"] = row["sparse_us"] = None
                elif eager and not dry_run:     # a folded dense op beat the model's own
                    _swap(model, chain, denses[eager][1])
                    row["reason"] += f"; kept as the {denses[eager][0]} dense op"
                return
        else:
            row.update(fields)
        if dry_run:
            row["reason"] = "dry run: verified" if verify else "dry run: compiled"
            return
        if members:
            _swap_siblings(model, modules, layer, members, row)
        else:
            _swap(model, chain, layer)
        chosen = layer
        row["replaced"], row["reason"] = True, "replaced"
    finally:
        for layer, _ in layers:
            if layer is not chosen:
                ops.unregister(layer.kernel_id)


def _handoffs(todo, modules, seen, fuse_siblings: bool) -> set[str]:
    """Layers of todo ((row, chain) pairs) whose output only feeds another layer of todo, a
    Linear layer (Chain.feeds), neither of them in a sibling group: built channel-major, their
    M x N output is the K x N columns the next kernel reads (SparseLayer.run hands it over as
    a transposed view: no transpose copy, no kernel between the two)."""
    names = {chain.layer for _, chain in todo}
    grouped = ({todo[i][1].layer for group in _sibling_groups(todo, modules, seen)
                for i in group} if fuse_siblings else set())
    return {chain.layer for _, chain in todo
            if chain.feeds in names and not {chain.layer, chain.feeds} & grouped}


def _spec(chain, module, modules, x, channel_major: bool = False
          ) -> tuple[LayerSpec, torch.Tensor, object]:
    """(what to compile, folded weight, folded bias) of one layer. `channel_major`: a Linear
    layer's output M x N (a hand-off, see _handoffs) instead of token-major."""
    bn = modules[chain.bn] if chain.bn else None
    weight, bias = folded(module, bn)
    epilogue = {"bias": None if bias is None else bias.numpy(), "activation": chain.activation,
                "residual": chain.residual is not None}
    if isinstance(module, torch.nn.Linear):
        # token-major output (N x M, as nn.Linear's): no transpose after the kernel, and its
        # consumers (attention, LayerNorm) read rows; the streamed family builds it (and the
        # channel-major hand-off, in the same loop)
        spec = LayerSpec(chain.layer, weight.numpy(), "gemm", n=int(np.prod(x.shape[:-1])),
                         epilogue={**epilogue, "token_major": not channel_major},
                         family="streamed")
    else:
        kernel_weight = block_diagonal(weight.numpy()) if is_depthwise(module) else weight.numpy()
        spec = LayerSpec(chain.layer, kernel_weight, "conv", input_shape=tuple(x.shape),
                         stride=module.stride[0], padding=module.padding[0], epilogue=epilogue)
    return spec, weight, bias


def _load(kernel, chain, module, x, dtype, weight, bias, on_gpu, feeds: str | None = None
          ) -> tuple[SparseLayer, dict]:
    """(the SparseLayer running `kernel` (loaded on x's GPU when on_gpu), its row fields).
    `feeds`: the Linear layer a channel-major Linear kernel hands its output to."""
    linear = isinstance(module, torch.nn.Linear)
    fields = dict(family=getattr(kernel, "family", None), plan=kernel.plan_params.name(),
                  tuned=bool(getattr(kernel, "tuned", False)), nnz=int(kernel.nnz))
    if linear:          # the op's own shapes: K x N columns in, its output (SparseLayer.run)
        n = int(np.prod(x.shape[:-1]))         # (M: the weight's rows, siblings' stacked)
        entry = ops.Entry(kernel, True, (x.shape[-1], n), tuple(kernel.output_shape))
    else:
        entry = ops.Entry(kernel, False, tuple(x.shape), tuple(kernel.output_shape))
    if on_gpu:
        entry.loaded = kernel.to_device(x.device.index or 0)
        entry.device = x.device.index or 0
    store = DTYPES[dtype]
    layer = SparseLayer(ops.register(entry), "linear" if linear else "conv",
                        weight.to(x.device, store), None if bias is None else
                        bias.to(x.device, store), chain.activation,
                        1 if linear else module.stride[0], 0 if linear else module.padding[0],
                        tuple(x.shape), residual=chain.residual is not None,
                        groups=1 if linear else module.groups,
                        token_major=bool(kernel.epilogue.token_major),
                        planes=int(kernel.epilogue.planes),
                        feeds=None if kernel.epilogue.token_major else feeds)
    return layer, fields


def _swap(model, chain: Chain, layer: torch.nn.Module) -> None:
    """Put `layer` (a SparseLayer, or a FoldedDense) in place of the chain's layer, BatchNorm
    and activation (or into its ResidualChain)."""
    if chain.residual:              # conv, BatchNorm, add and activation: all in the kernel
        model.get_submodule(chain.residual).sparse = layer
        return
    model.set_submodule(chain.layer, layer)
    if chain.bn:
        model.set_submodule(chain.bn, torch.nn.Identity())
    if chain.act_module:
        model.set_submodule(chain.act_module, torch.nn.Identity())


def _swap_siblings(model, modules, layer: SparseLayer, members, row: dict) -> None:
    """The head runs the kernel for every sibling; each other sibling takes its slice."""
    shared = _Shared()
    (_, head, rows), *rest = members
    model.set_submodule(head.layer, SiblingHead(layer, shared, rows))
    for member_row, member, member_rows in rest:
        model.set_submodule(member.layer, SiblingSlice(modules[member.layer], shared,
                                                       member_rows))
        member_row.update({k: row.get(k) for k in ("family", "plan", "tuned")})
        member_row["nnz"] = int(torch.count_nonzero(modules[member.layer].weight))
        member_row["replaced"], member_row["reason"] = True, f"in {head.layer}'s kernel"


def report_table(rows: list[dict], title: str = "sparsify"):
    """A Rich table of sparsify_'s report."""
    from sparsert_cli.console import table

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    body = [[r["layer"], r["op"], r["shape"], num(r["sparsity"], ".2f"), r["fused"] or "-",
             r.get("plan") or "-", num(r.get("dense_us"), ".2f"),
             num(r.get("sparse_us", r.get("sparsert_us", r.get("kernel_us"))), ".2f"),
             num(r["speedup"], ".2f"), num(r["max_rel_err"], ".1e"), _replaced(r)]
            for r in rows]
    return table(title, ["layer", "op", "shape", "S", "fused", "plan", "dense us", "sparse us",
                         "x", "max rel err", "replaced"], body)


def _replaced(row: dict) -> str:
    """The report's last column: yes, yes with a fused pair's part, or why not."""
    if not row["replaced"]:
        return row["reason"]
    if str(row.get("pair", "")).startswith("fused with"):
        return f"yes, {row['pair']}"
    return f"yes, {row['reason']}" if row["reason"].startswith("in ") else "yes"
