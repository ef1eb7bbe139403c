"""The modules sparsify_ swaps into a model: SparseLayer (a layer running one compiled kernel
through the custom op) and FoldedDense (a layer's dense op with its BatchNorm folded), and the
dense op both share. Kept apart from sparsify.py so the fused pairs (pairs.py) can build on
them."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from sparsert_cli.torch import ops
from sparsert_cli.torch.activations import activate


def _dense_op(layer, x: torch.Tensor, residual=None, gemm: bool = False) -> torch.Tensor:
    """The dense op of a SparseLayer or FoldedDense (its folded weight and bias, kind, stride,
    padding, groups, activation): linear, conv2d, or a 1x1 convolution as a batched GEMM;
    then the residual add and the activation."""
    if layer.kind == "linear":
        y = F.linear(x, layer.weight, layer.bias)
    elif gemm:
        b, _, h, w = x.shape
        y = torch.matmul(layer.weight, x.flatten(2))
        if layer.bias is not None:
            y = y + layer.bias.view(1, -1, 1)
        y = y.view(b, -1, h, w)
    else:
        y = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, 1, layer.groups)
    if residual is not None:
        y = y + residual
    return activate(y, layer.activation)


class SparseLayer(torch.nn.Module):
    """A Conv2d/Linear (+ folded BatchNorm, + ReLU/ReLU6/GELU) running one compiled kernel."""

    def __init__(self, kernel_id: int, kind: str, weight: torch.Tensor, bias, activation: str,
                 stride: int, padding: int, in_shape: tuple, residual: bool = False,
                 groups: int = 1, token_major: bool = False, planes: int = 0,
                 feeds: str | None = None):
        super().__init__()
        self.token_major = token_major              # Linear: the op returns N x M
        self.planes = planes                        # ... or (M / P) x N x P (siblings)
        self.feeds = feeds                          # channel-major, read by this Linear alone
        self.kernel_id, self.kind, self.activation = kernel_id, kind, activation
        self.residual = residual                    # the kernel adds a residual input
        self.stride, self.padding, self.in_shape = stride, padding, tuple(in_shape)
        self.groups = groups                        # depthwise: C (the weight is C x 1 x R x S)
        self.register_buffer("weight", weight)      # the folded dense weight: other shapes
        self.register_buffer("bias", bias)
        self._warned = False

    def dense(self, x: torch.Tensor, residual=None) -> torch.Tensor:
        return _dense_op(self, x, residual)

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
        return self.run(x, residual)

    def run(self, x: torch.Tensor, residual=None) -> torch.Tensor:
        """The kernel on x. Linear: the kernel reads K x N columns, so token-major activations
        are transposed here, outside the op, where torch.compile fuses the copy into the
        kernel that makes x (in eager and plain graphs it is one copy). A token-major kernel
        writes N x M (and reads its residual so), as nn.Linear returns it; a channel-major one
        writes M x N, transposed back here. The output is contiguous, as nn.Linear's, except
        where the layer `feeds` another Linear layer alone: then its M x N output is returned
        as a transposed view (N x M strides), which that layer's transpose turns back into
        K x N columns without a copy or a kernel."""
        if self.kind != "linear":
            return ops.run(x, residual, self.kernel_id)
        k = self.in_shape[-1]
        columns = x.reshape(-1, k).t().contiguous()
        n = columns.shape[1]
        if self.planes:         # (M / P) x N x P: each plane one contiguous token-major block
            p = self.planes
            if residual is not None:
                residual = residual.reshape(n, -1, p).transpose(0, 1).contiguous()
            y = ops.run(columns, residual, self.kernel_id)
            return y.view(y.shape[0], *self.in_shape[:-1], p)
        if self.token_major:
            if residual is not None:
                residual = residual.reshape(n, -1).contiguous()
            y = ops.run(columns, residual, self.kernel_id)
            return y.view(*self.in_shape[:-1], y.shape[1])
        if residual is not None:
            residual = residual.reshape(n, -1).t().contiguous()
        y = ops.run(columns, residual, self.kernel_id)
        if self.feeds:
            return y.t().view(*self.in_shape[:-1], y.shape[0])
        return y.t().contiguous().view(*self.in_shape[:-1], y.shape[0])

    def _in_planes(self, y: torch.Tensor) -> bool:
        """Whether y (what forward returned) is the kernel's output in planes (the dense op's
        ends in M = planes x P, more than P)."""
        return bool(self.planes) and y.shape[-1] == self.planes

    def tokens(self, y: torch.Tensor) -> torch.Tensor:
        """forward's output as nn.Linear returns it (..., M): planes joined (a copy)."""
        if not self._in_planes(y):
            return y
        return y.movedim(0, -2).reshape(*y.shape[1:-1], y.shape[0] * y.shape[-1])

    def part(self, y: torch.Tensor, rows: tuple[int, int]) -> torch.Tensor:
        """Rows [first, end) of forward's output y, contiguous: a plane as it is (no copy), or
        a slice of the N x M output (a copy)."""
        if self._in_planes(y) and rows[1] - rows[0] == self.planes \
                and rows[0] % self.planes == 0:
            return y[rows[0] // self.planes]
        return self.tokens(y)[..., rows[0]:rows[1]].contiguous()

    def extra_repr(self) -> str:
        return f"{self.kind}, kernel_id={self.kernel_id}, activation={self.activation}, " \
               f"input={self.in_shape}" + (f", groups={self.groups}" if self.groups > 1 else "") \
               + (f", feeds={self.feeds}" if self.feeds else "")


# ---- per-layer checks --------------------------------------------------------------------------
class FoldedDense(torch.nn.Module):
    """The dense op of a layer its kernel did not beat, as a frozen compiled model runs it:
    BatchNorm folded into weight and bias, then the residual add and ReLU/ReLU6, all in one
    module (sparsify_ swaps it in for the chain's layer, BatchNorm and activation, as it does a
    kernel). `gemm`: a stride-1 1x1 convolution as one batched GEMM over the NCHW images
    (W' @ x[b] on C x HW columns), as inductor ran it in the frozen compiled model (S7-3
    profile: cuBLAS GEMM kernels); it avoids the layout changes cuDNN adds around an NCHW fp16
    convolution (ResNet-50 fp16 at batch 8, run S7-3: a 1x1 layer took 27-39 us as conv +
    BatchNorm + add + ReLU in the eager model, ~6 us as inductor's GEMM and one fused
    pointwise kernel)."""

    @staticmethod
    def gemm_fits(kind: str, weight: torch.Tensor, stride: int, padding: int,
                  groups: int) -> bool:
        """Whether the layer is a stride-1, unpadded, ungrouped 1x1 convolution (the GEMM
        form's only case)."""
        return (kind == "conv" and stride == 1 and padding == 0 and groups == 1
                and tuple(weight.shape[2:]) == (1, 1))

    def __init__(self, weight: torch.Tensor, bias, activation: str, stride: int = 1,
                 padding: int = 0, groups: int = 1, kind: str = "conv", gemm: bool = False):
        super().__init__()
        if gemm and not self.gemm_fits(kind, weight, stride, padding, groups):
            raise ValueError("FoldedDense(gemm=True) is a stride-1, unpadded, ungrouped 1x1 "
                             f"convolution; got weight {tuple(weight.shape)}, stride {stride}, "
                             f"padding {padding}, groups {groups}, kind {kind!r}")
        self.kind, self.activation, self.gemm = kind, activation, gemm
        self.stride, self.padding, self.groups = stride, padding, groups
        self.register_buffer("weight", weight.flatten(1) if gemm else weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor, residual=None) -> torch.Tensor:
        return _dense_op(self, x, residual, self.gemm)

    def extra_repr(self) -> str:
        form = "linear" if self.kind == "linear" else "1x1 as GEMM" if self.gemm else "conv2d"
        return f"{form}, weight={tuple(self.weight.shape)}, activation={self.activation}"


def folded_dense_forms(layer: SparseLayer) -> list[FoldedDense]:
    """The folded dense ops worth timing for a layer (its SparseLayer holds the folded weight
    and bias, in the model's type): conv2d (or linear), and for a stride-1 1x1 convolution of
    one group the batched GEMM too."""
    forms = [FoldedDense(layer.weight, layer.bias, layer.activation, layer.stride,
                         layer.padding, layer.groups, layer.kind)]
    if FoldedDense.gemm_fits(layer.kind, layer.weight, layer.stride, layer.padding,
                             layer.groups):
        forms.append(FoldedDense(layer.weight, layer.bias, layer.activation, kind="conv",
                                 gemm=True))
    return forms
