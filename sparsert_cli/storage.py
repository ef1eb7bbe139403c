"""Values as the storage types hold them, and their bytes on the device.

numpy has fp32 and fp16 but no bfloat16: bf16 is rounded here by hand (round to nearest even,
subnormals kept, overflow to +-inf, as `cvt.rn.bf16.f32` does) and lives on the device as the
top 16 bits of a float32, moved as uint16 bit patterns.
"""

from __future__ import annotations

import numpy as np

BF16_MAX = float.fromhex("0x1.fep127")          # (2 - 2^-7) * 2^127
_BF16_MIN_EXP = -133                             # spacing of the subnormals: 2^-133


def bf16(values) -> np.ndarray:
    """`values` rounded to the nearest bfloat16 (ties to even), as float64. 8 significant bits:
    a value m * 2^e (0.5 <= |m| < 1) is a multiple of 2^(e - 8), or of 2^-133 below 2^-126."""
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        ulp = np.ldexp(1.0, np.maximum(np.frexp(v)[1] - 8, _BF16_MIN_EXP))
        out = np.rint(v / ulp) * ulp                  # both steps exact in float64
        return np.where(np.abs(out) > BF16_MAX, np.copysign(np.inf, v), out)


def fp16(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).astype(np.float16).astype(np.float64)


def rounded(values, dtype: str) -> np.ndarray:
    """`values` as storage type `dtype` (fp32, fp16, bf16) holds them, as float64."""
    if dtype == "bf16":
        return bf16(values)
    if dtype == "fp16":
        return fp16(values)
    return np.asarray(values, dtype=np.float64).astype(np.float32).astype(np.float64)


def bf16_bits(values) -> np.ndarray:
    """uint16 bit patterns of `values` rounded to bf16 (the top half of their float32)."""
    return (bf16(values).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def from_bf16_bits(bits) -> np.ndarray:
    """float32 values of uint16 bf16 bit patterns."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def device_type(dtype: str):
    """numpy type of a device buffer of `dtype` values (bf16: uint16 bit patterns)."""
    return {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}[dtype]


def encode(values, dtype: str) -> np.ndarray:
    """Host array to upload for a `dtype` buffer (values rounded to nearest even)."""
    if dtype == "bf16":
        return bf16_bits(values)
    return np.asarray(values).astype(device_type(dtype))


def decode(array, dtype: str) -> np.ndarray:
    """float32 values of a downloaded `dtype` buffer."""
    if dtype == "bf16":
        return from_bf16_bits(array)
    return np.asarray(array).astype(np.float32)
