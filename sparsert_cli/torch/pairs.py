"""sparsify_'s last step: fused pointwise -> depthwise pairs (MobileNet's blocks).

A replaced 1x1 convolution (BatchNorm folded, its activation) whose output is only ever the
input of one replaced depthwise 3x3 convolution (Chain.depthwise_next, from the traced graph)
can run as one kernel (sparsert_cli.fused): each block computes a group of the 1x1 layer's
channels into a scratch buffer and, after a block barrier, the depthwise rows of those
channels. The depthwise kernel's launch and its wait for the 1x1 kernel go (at batch 1 a layer
of MobileNet v1 costs ~2.5 us in a CUDA graph, mostly that).

Only batch-1 pairs whose fused plan exists (one column tile: families/immediate/fuse.py) are
tried. On a GPU a pair is fused only when its verified kernel times faster than the two
kernels it replaces, back to back (check.time_cold_us); on the CPU (tests; no timing) every
pair whose kernel builds and verifies is fused. A pair that is not fused keeps its two kernels
and says why in the 1x1 layer's row (`pair`).
"""

from __future__ import annotations

import torch

from sparsert_cli.errors import UserError
from sparsert_cli.interp import PlanExecutionError
from sparsert_cli.torch import ops
from sparsert_cli.torch.check import time_cold_us
from sparsert_cli.torch.layers import FoldedDense, SparseLayer


class FusedPair(SparseLayer):
    """A 1x1 Conv2d layer (+ folded BatchNorm, activation) and the depthwise 3x3 layer after it
    (+ its own), one fused kernel. Holds both layers' folded dense ops: called with another
    input shape, it runs them (the 1x1 as SparseLayer.dense, then `depthwise`)."""

    def __init__(self, kernel_id: int, pointwise: SparseLayer, depthwise: SparseLayer,
                 depthwise_name: str):
        super().__init__(kernel_id, "conv", pointwise.weight, pointwise.bias,
                         pointwise.activation, pointwise.stride, pointwise.padding,
                         pointwise.in_shape)
        self.depthwise = FoldedDense(depthwise.weight, depthwise.bias, depthwise.activation,
                                     depthwise.stride, depthwise.padding, depthwise.groups)
        self.depthwise_name = depthwise_name

    def dense(self, x: torch.Tensor, residual=None) -> torch.Tensor:
        return self.depthwise(super().dense(x, residual))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", then {self.depthwise_name} (depthwise) in one kernel"


def _alone(model, chain) -> SparseLayer | None:
    """The chain's SparseLayer when the chain was swapped for one alone (no residual chain, no
    sibling group, not already a pair), else None."""
    if chain.residual:
        return None
    module = model.get_submodule(chain.layer)
    return module if type(module) is SparseLayer else None


def pairs(model, chains, rows) -> list[tuple]:
    """(1x1 chain, its row, depthwise chain, its row) of each pair whose two layers were both
    replaced by kernels alone, at batch 1."""
    by_layer = {c.layer: (c, r) for c, r in zip(chains, rows)}
    out = []
    for chain, row in zip(chains, rows):
        if chain.depthwise_next not in by_layer:
            continue
        d_chain, d_row = by_layer[chain.depthwise_next]
        if not (row["replaced"] and d_row["replaced"]):
            continue
        pw, dw = _alone(model, chain), _alone(model, d_chain)
        if (pw is None or dw is None or pw.in_shape[0] != 1
                or tuple(dw.weight.shape[2:]) != (3, 3) or dw.padding != 1):
            continue
        out.append((chain, row, d_chain, d_row))
    return out


def _epilogue(bias, activation: str) -> dict:
    return {"bias": None if bias is None else bias.numpy(), "activation": activation}


def fuse_pairs(model, chains, rows, folded: dict, seen: dict, *, dtype: str, arch, cache,
               verify: bool, on_gpu: bool, dependent_launch: bool, on_progress=None,
               jobs: int | None = None) -> int:
    """Fuse what pairs() finds in `model` (after sparsify_'s swaps). `folded`: layer name ->
    (folded float32 weight, bias) as its kernel was compiled from; `seen`: sparsify_'s
    recorded inputs (the 1x1 layer's is the pair's). Returns how many pairs were fused.
    Rows: the 1x1 layer's gets `pair` (fused with / why not), and when fused the fused
    kernel's `family` (immediate), `plan` ("<1x1 plan>+dw"), `max_err` / `max_rel_err` (its
    check; None with verify=False) and (GPU) `sparse_us` (the fused kernel's time),
    `pair_unfused_us` (the two kernels back to back) and `speedup` (the two layers' dense
    times over the fused kernel's); the depthwise layer's `sparse_us` becomes 0, its family,
    plan and errors None (the 1x1 row's are the kernel's), and its reason names the kernel it
    runs in. Every pair's kernel is compiled first, across `jobs` processes
    (fused.compile_pairs; default: one per core)."""
    from sparsert_cli.fused import compile_pairs
    from sparsert_cli.torch.check import verify_fused

    found = pairs(model, chains, rows)
    specs = []
    for chain, _, d_chain, _ in found:
        pw, dw = _alone(model, chain), _alone(model, d_chain)
        weight, bias = folded[chain.layer]
        d_weight, d_bias = folded[d_chain.layer]
        specs.append(dict(pw_weight=weight.numpy()[:, :, 0, 0], dw_weight=d_weight.numpy(),
                          input_shape=pw.in_shape, stride=dw.stride,
                          pw_epilogue=_epilogue(bias, pw.activation),
                          dw_epilogue=_epilogue(d_bias, dw.activation), dtype=dtype))
    count = [0]

    def compiled(i: int) -> None:
        count[0] += 1
        on_progress("compile pointwise -> depthwise", count[0], len(found), found[i][0].layer)

    kernels = compile_pairs(specs, arch=arch, cache=cache, dependent_launch=dependent_launch,
                            jobs=jobs, on_done=compiled if on_progress else None
                            ) if found else []
    fused = 0
    for done, ((chain, row, d_chain, d_row), kernel) in enumerate(zip(found, kernels), 1):
        if on_progress:
            on_progress("fuse pointwise -> depthwise", done, len(found), chain.layer)
        pw, dw = _alone(model, chain), _alone(model, d_chain)
        if isinstance(kernel, UserError):
            row["pair"] = f"not fused with {d_chain.layer}: {kernel.message}"
            continue
        entry = ops.Entry(kernel, False, tuple(pw.in_shape), tuple(kernel.output_shape),
                          scratch=tuple(kernel.scratch_shape))
        x = seen[chain.layer]["x"]
        if on_gpu:
            entry.loaded = kernel.to_device(x.device.index or 0)
            entry.device = x.device.index or 0
        layer = FusedPair(ops.register(entry), pw, dw, d_chain.layer)
        keep, checked = False, {}
        try:
            if verify:
                try:
                    result = verify_fused(layer, kernel, x)
                except PlanExecutionError as exc:   # the CPU interpreter refused a load
                    result = {"ok": False, "message": str(exc)}
                if not result["ok"]:
                    row["pair"] = (f"not fused with {d_chain.layer}: verification failed: "
                                   f"{result['message']}")
                    continue
                checked = {"max_err": result["max_err"], "max_rel_err": result["max_rel_err"]}
            if on_gpu:
                fused_us = time_cold_us(layer, (x,))
                unfused_us = time_cold_us(lambda t: dw(pw(t)), (x,))
                if fused_us >= unfused_us:
                    row["pair"] = (f"not fused with {d_chain.layer}: slower ({fused_us:.2f} "
                                   f"against {unfused_us:.2f} us for the two kernels)")
                    continue
                row.update(sparse_us=fused_us, pair_unfused_us=unfused_us,
                           speedup=(row["dense_us"] + d_row["dense_us"]) / fused_us
                           if row.get("dense_us") and d_row.get("dense_us") else None)
                d_row.update(sparse_us=0.0, speedup=None)
            keep = True
        finally:
            if not keep:
                ops.unregister(layer.kernel_id)
        model.set_submodule(chain.layer, layer)
        model.set_submodule(d_chain.layer, torch.nn.Identity())
        ops.unregister(pw.kernel_id)
        ops.unregister(dw.kernel_id)
        # the fused kernel's own fields (its error: only where it was checked)
        row.update({"max_err": None, "max_rel_err": None, **checked}, family="immediate",
                   pair=f"fused with {d_chain.layer}",
                   plan=f"{kernel.plan.pointwise.params.name()}+dw")
        d_row.update(family=None, plan=None, max_err=None, max_rel_err=None,
                     reason=f"in {chain.layer}'s fused kernel")
        fused += 1
    return fused
