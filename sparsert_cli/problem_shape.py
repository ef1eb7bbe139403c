"""Shapes and precisions every kernel family shares: the NCHW geometry, the fused epilogue and the
(storage, accumulate) pairs a kernel can be built for. Numbers only; no family decides anything here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .errors import UserError

MAX_THREADS = 1024
MAX_STATIC_SHARED = 48 * 1024
# gelu: exact (erf) GELU, 0.5 x (1 + erf(x / sqrt 2)), as torch's F.gelu; streamed family only
ACTIVATIONS = ("none", "relu", "relu6", "gelu")
# (storage, accumulate) pairs a kernel can be built for, by their precision label.
PRECISIONS = {"fp32": ("fp32", "fp32"), "fp16": ("fp16", "fp16"), "fp16acc32": ("fp16", "fp32"),
              "bf16": ("bf16", "fp32")}
ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
DTYPES = ("fp32", "fp16", "bf16")          # storage types of x, y and the residual
HALF_DTYPES = ("fp16", "bf16")             # 2-byte storage: sm_80+, column pairs per register


def default_accumulate(dtype: str) -> str:
    """The sums' type when only the storage is named: fp16 data is summed in half2, bf16 in fp32
    (no bf16 sums are built)."""
    return "fp32" if dtype == "bf16" else dtype


def precision_label(dtype: str, accumulate: str | None = None) -> str:
    """fp32 (fp32 storage and sums), fp16 (fp16 storage, half2 sums), fp16acc32 or bf16 (bf16
    storage, fp32 sums). `accumulate` None: default_accumulate(dtype)."""
    accumulate = accumulate or default_accumulate(dtype)
    for label, pair in PRECISIONS.items():
        if pair == (dtype, accumulate):
            return label
    raise UserError(f"no kernel stores {dtype} and accumulates in {accumulate} "
                    f"(supported: fp32/fp32, fp16/fp16, fp16/fp32, bf16/fp32)")


class Precision:
    """Mixin for anything with `dtype` (storage) and `accumulate` (sums) attributes: plans and
    kernel IRs of every family."""

    @property
    def precision(self) -> str:
        return precision_label(self.dtype, self.accumulate)

    @property
    def element_bytes(self) -> int:
        return ELEMENT_BYTES[self.dtype]

    @property
    def acc_bytes(self) -> int:
        """Bytes of one column's sum (what k-split slices exchange in shared memory)."""
        return ELEMENT_BYTES[self.accumulate]


class ColumnTiles(Precision):
    """Mixin for plans whose `params` set the column tile: `vector_width` columns per thread,
    `col_threads` threads side by side."""

    @property
    def vector_width(self) -> int:
        return self.params.vector_width

    @property
    def col_threads(self) -> int:
        return self.params.col_threads

    @property
    def tile_columns(self) -> int:
        return self.col_threads * self.vector_width


def max_vector_width(dtype: str) -> int:
    """Columns per thread that one 16-byte load covers."""
    return 16 // ELEMENT_BYTES[dtype]


@dataclass(frozen=True)
class Geometry:
    """NCHW convolution shape; a GEMM is kernel 1, height 1, width N."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0

    @property
    def out_height(self) -> int:
        return (self.height + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def out_width(self) -> int:
        return (self.width + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def out_pixels(self) -> int:
        return self.out_height * self.out_width

    @property
    def columns(self) -> int:
        return self.batch * self.out_pixels

    @property
    def taps(self) -> int:
        return self.in_channels * self.kernel * self.kernel

    @property
    def image_elems(self) -> int:
        return self.in_channels * self.height * self.width

    @property
    def linear(self) -> bool:
        """Columns map to consecutive input addresses (1x1, stride 1, no padding)."""
        return self.kernel == 1 and self.stride == 1 and self.padding == 0

    @property
    def masked(self) -> bool:
        return self.padding > 0

    def tap_rs(self, tap: int) -> tuple[int, int, int]:
        k = self.kernel
        return tap // (k * k), (tap // k) % k, tap % k

    def tap_offset(self, tap: int) -> int:
        """Element offset of tap (c, r, s) from the column's input base."""
        c, r, s = self.tap_rs(tap)
        return c * self.height * self.width + r * self.width + s

    @property
    def input_elems(self) -> int:
        return self.batch * self.image_elems

    @property
    def output_elems(self) -> int:
        return self.batch * self.out_channels * self.out_pixels

    def validate(self) -> Geometry:
        for f in fields(self):
            value = getattr(self, f.name)
            if value < (0 if f.name == "padding" else 1):
                raise UserError(f"impossible shape: {f.name} = {value}")
        if self.out_height <= 0 or self.out_width <= 0:
            raise UserError(f"impossible shape: output {self.out_height}x{self.out_width}")
        if max(self.input_elems, self.output_elems) >= 2**31:
            raise UserError("shape too large: tensors must hold fewer than 2^31 elements")
        return self


@dataclass(frozen=True)
class Epilogue:
    """Fused after the sum: y = act(acc + bias[m] + residual). `token_major` (GEMM views, the
    streamed family): the output, and the residual, are N x M (y[n, m], as nn.Linear returns
    them) instead of M x N; the input stays K x N. `planes` (token-major only): the output
    rows in planes of that many, each plane N x planes of its own, y[m // P][n][m % P] --
    stacked sibling layers (q, k, v) then each get one contiguous N x P block; 0: one plane."""

    bias: tuple[float, ...] | None = None
    activation: str = "none"
    residual: bool = False
    token_major: bool = False
    planes: int = 0

    def key(self) -> dict:
        """The fields as digests hold them (token_major and planes only when set: kernels made
        before them keep their names)."""
        doc = asdict(self)
        if not self.token_major:
            del doc["token_major"]
        if not self.planes:
            del doc["planes"]
        return doc

    def plane_rows(self, rows: int) -> int:
        """Rows per plane of a token-major output of `rows` rows (P; all of them: one plane)."""
        return self.planes or rows

    def token_shape(self, rows: int, columns: int) -> tuple[int, ...]:
        """A token-major output's shape: N x M, or (M / P) x N x P in planes."""
        if self.planes:
            return (rows // self.planes, columns, self.planes)
        return (columns, rows)


def to_token_layout(values, planes: int = 0):
    """An M x N (channel-major) array in the token-major layout: N x M, or (M / P) x N x P in
    planes of P rows (a copy)."""
    import numpy as np

    values = np.asarray(values)
    m, n = values.shape
    if not planes:
        return np.ascontiguousarray(values.T)
    return np.ascontiguousarray(values.reshape(m // planes, planes, n).transpose(0, 2, 1))


def from_token_layout(values, rows: int, columns: int, planes: int = 0):
    """The inverse of to_token_layout: M x N (channel-major) values from a token-major array in
    any shape holding N x M or (M / P) x N x P elements."""
    import numpy as np

    values = np.asarray(values)
    if not planes:
        return np.ascontiguousarray(values.reshape(columns, rows).T)
    return np.ascontiguousarray(values.reshape(rows // planes, columns, planes)
                                .transpose(0, 2, 1).reshape(rows, columns))
