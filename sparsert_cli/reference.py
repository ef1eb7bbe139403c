"""Float64 references and the tolerance every check uses."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .storage import rounded

# Machine epsilon (spacing at 1) of each type: 2^-(stored mantissa bits). bf16 keeps 7 of its 8
# significant bits: 2^-7, 8x fp16's, with fp32's exponent range.
EPS = {"fp32": 2.0 ** -23, "tf32": 2.0 ** -10, "fp16": 2.0 ** -10, "bf16": 2.0 ** -7}
# Storage types only ever summed in fp32 (kernels and baselines): rounded once per output.
ROUNDED_ONCE = ("bf16",)
# fp16 outputs and inputs below 2^-14 are subnormal: their spacing, 2^-24, is an absolute error
# no relative bound covers (seen: a batch-32 cuBLAS fp16 output of 1.5e-7 off by 2.6e-8). The
# same term for bf16 is 4x its subnormal spacing, 2^-133.
ABSOLUTE = {"fp32": 0.0, "tf32": 0.0, "fp16": 4 * 2.0 ** -24, "bf16": 4 * 2.0 ** -133}
SAFETY = 8.0
# The largest slope |act'(v)| of each activation that has one above 1: the pre-activation sum's
# rounding error comes out of the activation scaled by at most this much, so the magnitude that
# scales the tolerance is scaled so too. GELU's slope peaks at v = sqrt 2: Phi(sqrt 2) +
# sqrt 2 phi(sqrt 2) = 1.1289. Its own evaluation in fp32 (erff, 2 ulp; a few roundings) adds
# at most ~4 fp32 ulps of |v| <= the magnitude, within SAFETY's margin at any K (the sums'
# expected sqrt(K) eps against SAFETY * sqrt(K) eps); fp16 and bf16 outputs round it once to
# their own type, the rounding every output already has. relu and relu6: slope <= 1.
SLOPE = {"gelu": 1.13}


def gelu(values) -> np.ndarray:
    """Exact GELU in float64, 0.5 v (1 + erf(v / sqrt 2)) (torch's F.gelu), written with erfc
    (1 + erf(z) = erfc(-z)) so that it stays accurate where erf(z) is near -1."""
    from scipy.special import erfc

    v = np.asarray(values, dtype=np.float64)
    return 0.5 * v * erfc(-v / np.sqrt(2.0))


def conv_out_hw(h: int, w: int, r: int, s: int, stride: int, padding: int) -> tuple[int, int]:
    return (h + 2 * padding - r) // stride + 1, (w + 2 * padding - s) // stride + 1


def im2col(x: np.ndarray, kernel_h: int, kernel_w: int, stride: int, padding: int) -> np.ndarray:
    """NCHW input -> (C*kh*kw) x (N*Ho*Wo) column matrix, row (c*kh + r)*kw + s, column
    (n*Ho + ho)*Wo + wo, zero padded. Keeps x's dtype."""
    n, c, h, w = x.shape
    ho, wo = conv_out_hw(h, w, kernel_h, kernel_w, stride, padding)
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    cols = np.empty((c, kernel_h, kernel_w, n, ho, wo), dtype=x.dtype)
    for r in range(kernel_h):
        for s in range(kernel_w):
            cols[:, r, s] = padded[:, :, r:r + stride * (ho - 1) + 1:stride,
                                   s:s + stride * (wo - 1) + 1:stride].transpose(1, 0, 2, 3)
    return cols.reshape(c * kernel_h * kernel_w, n * ho * wo)


def conv_reference(weight: np.ndarray, x: np.ndarray, stride: int = 1, padding: int = 0,
                   bias=None, residual=None, activation: str = "none",
                   absolute: bool = False) -> np.ndarray:
    """y = act(W (*) x + bias + residual) in float64, NCHW. With `absolute`, the same sum over
    |W| and |x| plus |bias| and |residual|, scaled by the activation's largest slope (SLOPE):
    the magnitude that scales the rounding error of each output."""
    m, c, k, k2 = weight.shape
    x64 = np.asarray(x, dtype=np.float64)
    n = x64.shape[0]
    w2 = sp.csr_matrix(np.asarray(weight, dtype=np.float64).reshape(m, -1))
    cols = im2col(x64, k, k2, stride, padding)
    if absolute:
        w2, cols = abs(w2), np.abs(cols)
    y = np.asarray(w2 @ cols)
    ho, wo = conv_out_hw(x64.shape[2], x64.shape[3], k, k2, stride, padding)
    y = y.reshape(m, n, ho, wo).transpose(1, 0, 2, 3)
    if absolute:
        if residual is not None:
            y = y + np.abs(np.asarray(residual, dtype=np.float64).reshape(y.shape))
        if bias is not None:
            y = y + np.abs(np.asarray(bias, dtype=np.float64)).reshape(1, m, 1, 1)
        return y * SLOPE.get(activation, 1.0)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64).reshape(1, m, 1, 1)
    if residual is not None:
        y = y + np.asarray(residual, dtype=np.float64).reshape(y.shape)
    if activation in ("relu", "relu6"):
        y = np.maximum(y, 0.0)
    if activation == "relu6":
        y = np.minimum(y, 6.0)
    return gelu(y) if activation == "gelu" else y


def reference_and_magnitude(weight: np.ndarray, x: np.ndarray, stride: int = 1, padding: int = 0,
                            bias=None, residual=None, activation: str = "none"):
    """(y, sum |w||x| + |bias| + |residual| (times SLOPE for gelu)), both float64 NCHW: what
    check() compares against. `weight` is M x C x R x S (a gemm's M x K weight is M x K x 1 x 1,
    its x 1 x K x 1 x N)."""
    ref = conv_reference(weight, x, stride, padding, bias, residual, activation)
    mag = conv_reference(weight, x, stride, padding, bias, residual, activation, absolute=True)
    return ref, mag


def tolerance(dtype: str, k: int) -> float:
    """Relative bound per element: SAFETY * sqrt(K) * eps(dtype), applied to sum |w||x|.

    Rounding errors of a length-K dot product grow like sqrt(K) * eps relative to that magnitude
    in practice (the worst case is K * eps); SAFETY = 8 covers the tail. The magnitude, not
    |ref|, scales the bound, so cancellation to ~0 does not demand impossible accuracy.

    bf16 (8 significant bits, eps 2^-7) is only ever summed in fp32, so the same derivation
    splits in two: the sums' rounding is fp32's, SAFETY * sqrt(K) * 2^-23, and bf16 adds
    K-independent terms, each at most the unit roundoff 2^-8 of sum |w||x|: the output's one
    rounding to bf16, and for a bf16 baseline its weights rounded to bf16. Bound: 2^-7 +
    8 * sqrt(K) * 2^-23 (0.8% at K = 4608). 8 * sqrt(K) * 2^-7 would exceed the magnitude from
    K = 256 on and pass an all-zero output."""
    if dtype not in EPS:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(EPS)}")
    if dtype in ROUNDED_ONCE:
        return EPS[dtype] + SAFETY * np.sqrt(max(k, 1)) * EPS["fp32"]
    return SAFETY * np.sqrt(max(k, 1)) * EPS[dtype]


def check(out: np.ndarray, ref: np.ndarray, magnitude: np.ndarray, dtype: str,
          k: int) -> tuple[bool, float, str]:
    """Element-wise check. Returns (ok, max abs error, message). NaN (unwritten output) fails."""
    out = np.asarray(out, dtype=np.float64).reshape(ref.shape)
    err = np.abs(out - ref)
    bound = (tolerance(dtype, k) * (np.asarray(magnitude).reshape(ref.shape) + 1e-30)
             + ABSOLUTE[dtype])
    nans = int(np.count_nonzero(~np.isfinite(out)))
    max_err = float(np.nanmax(err)) if err.size and nans < err.size else float("nan")
    if nans:
        return False, max_err, f"{nans} output(s) NaN/Inf (unwritten or overflow)"
    bad = int(np.count_nonzero(err > bound))
    if bad:
        worst = int(np.argmax(err / bound))
        return False, max_err, (f"{bad} output(s) off; worst at flat index {worst}: got "
                                f"{out.ravel()[worst]:.6g}, want {ref.ravel()[worst]:.6g}")
    return True, max_err, "ok"


def depthwise_reference(weight: np.ndarray, x: np.ndarray, stride: int = 1, padding: int = 1,
                        bias=None, activation: str = "none",
                        absolute: bool = False) -> np.ndarray:
    """A depthwise convolution (output channel c reads input channel c only) in float64, NCHW:
    `weight` C x kh x kw (or C x 1 x kh x kw); as conv_reference, with `absolute` the sum over
    |w| and |x| plus |bias| (scaled by SLOPE)."""
    w = np.asarray(weight, dtype=np.float64)
    w = w.reshape(w.shape[0], w.shape[-2], w.shape[-1])
    c, kh, kw = w.shape
    x64 = np.asarray(x, dtype=np.float64)
    n = x64.shape[0]
    cols = im2col(x64, kh, kw, stride, padding).reshape(c, kh * kw, -1)
    if absolute:
        w, cols = np.abs(w), np.abs(cols)
    y = np.einsum("ct,ctn->cn", w.reshape(c, kh * kw), cols)
    ho, wo = conv_out_hw(x64.shape[2], x64.shape[3], kh, kw, stride, padding)
    y = y.reshape(c, n, ho, wo).transpose(1, 0, 2, 3)
    if absolute:
        if bias is not None:
            y = y + np.abs(np.asarray(bias, dtype=np.float64)).reshape(1, c, 1, 1)
        return y * SLOPE.get(activation, 1.0)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64).reshape(1, c, 1, 1)
    if activation in ("relu", "relu6"):
        y = np.maximum(y, 0.0)
    if activation == "relu6":
        y = np.minimum(y, 6.0)
    return gelu(y) if activation == "gelu" else y


def pointwise_depthwise_reference(pw_weight: np.ndarray, dw_weight: np.ndarray, x: np.ndarray,
                                  stride: int, dtype: str, pw_bias=None,
                                  pw_activation: str = "none", dw_bias=None,
                                  dw_activation: str = "none"):
    """(y, magnitude) of a pointwise convolution (M x C x 1 x 1) and the depthwise 3x3
    (padding 1, `stride`) over its output, in float64 NCHW: the pointwise output t is rounded to
    the storage type `dtype` in between, as a kernel stores it. check(out, y, magnitude, dtype,
    9) bounds the error by the depthwise's own tolerance over the magnitude, which includes,
    in units of that tolerance, the depthwise sum over |w| of t's worst error: the
    pointwise's bound (tolerance over its magnitude, ABSOLUTE), plus one spacing of `dtype` at
    |t| (the kernel's t and this one may round to neighbours)."""
    t = conv_reference(pw_weight, x, 1, 0, pw_bias, None, pw_activation)
    t_mag = conv_reference(pw_weight, x, 1, 0, pw_bias, None, pw_activation, absolute=True)
    t = rounded(t, dtype)
    k = int(np.prod(np.shape(pw_weight)[1:]))
    t_err = tolerance(dtype, k) * t_mag + ABSOLUTE[dtype] + EPS[dtype] * np.abs(t)
    y = depthwise_reference(dw_weight, t, stride, 1, dw_bias, dw_activation)
    mag = depthwise_reference(dw_weight, t, stride, 1, dw_bias, dw_activation, absolute=True)
    carried = depthwise_reference(dw_weight, t_err, stride, 1, None, dw_activation,
                                  absolute=True)
    return y, mag + carried / tolerance(dtype, 9)
