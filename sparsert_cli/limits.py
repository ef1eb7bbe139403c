"""What sparsert refuses up front: fp16/bf16 values out of range, and work far beyond the machine.

Each check raises a one-line UserError with the numbers behind it; callers prefix the file or the
config case it came from. The budgets are estimates from measured runs, not exact bounds: they
exist so that a typo (a 30000 x 30000 layer at 99%) fails in a second instead of after an hour.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import UserError
from .storage import BF16_MAX, bf16

FP16_MAX = 65504.0
# A dense weight (file or generated) above this many elements is refused; save it sparse.
MAX_DENSE_ELEMS = 1 << 28
# Straight-line code: every nonzero is at least one FMA of 16 bytes of SASS, and ptxas took ~26 s
# for the 236k nonzeros of bert_ffn_up at 90% (docs/perf-notes.md).
MAX_NONZEROS = 4_000_000
SASS_BYTES_PER_NONZERO = 16
COMPILE_SECONDS_PER_NONZERO = 26.0 / 236_000
# Host bytes per nonzero while planning and emitting: plan objects (~150 B) + PTX text (~70 B)
# measured on bert_ffn_up, with room for ptxas.
PLAN_BYTES_PER_NONZERO = 400


def fp16_flush_mask(values, what: str, allow_flush: bool) -> np.ndarray:
    """Where `values` underflow to zero in fp16 (to be dropped, when `allow_flush`).

    Overflow (|v| rounds past 65504 to Inf) is always an error; a nonzero that rounds to zero is
    an error unless `allow_flush`. Subnormal results keep their value, with fewer bits."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore"):
        half = values.astype(np.float16)
    over = np.isinf(half) & np.isfinite(values)
    if over.any():
        raise UserError(f"{what}: {int(over.sum())} value(s) overflow fp16 (|v| > {FP16_MAX:g}; "
                        f"largest {float(np.max(np.abs(values[over]))):.6g})")
    under = (half == 0) & (values != 0)
    if under.any() and not allow_flush:
        raise UserError(f"{what}: {int(under.sum())} nonzero value(s) round to zero in fp16 "
                        f"(largest {float(np.max(np.abs(values[under]))):.3g}); drop them with "
                        f"--allow-fp16-flush or 'allow_fp16_flush: true'")
    return under


def bf16_overflow(values, what: str) -> None:
    """Refuse values that round past bf16's largest finite value (~3.39e38) to Inf."""
    values = np.asarray(values, dtype=np.float64)
    over = np.isinf(bf16(values)) & np.isfinite(values)
    if over.any():
        raise UserError(f"{what}: {int(over.sum())} value(s) overflow bf16 (|v| > {BF16_MAX:.6g}; "
                        f"largest {float(np.max(np.abs(values[over]))):.6g})")


def machine_memory() -> int:
    """Physical memory in bytes (0 when the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB"


def check_nonzeros(nnz: int) -> None:
    """Refuse kernels whose straight-line code would take far too long to compile."""
    if nnz > MAX_NONZEROS:
        sass = nnz * SASS_BYTES_PER_NONZERO / 1e6
        minutes = nnz * COMPILE_SECONDS_PER_NONZERO / 60
        raise UserError(f"{nnz} nonzeros is beyond the {MAX_NONZEROS} a kernel may hold (~{sass:.0f}"
                        f" MB of SASS, ~{minutes:.0f} min to compile): prune further or split "
                        f"the layer")


def case_memory(m: int, k: int, n: int, inputs: int, outputs: int, nnz: int,
                dense_weight: bool, verify: bool) -> int:
    """Estimated peak host bytes of one case: generating (dense below the generator's limit),
    planning and, with `verify`, the float64 reference and the dense baselines' weight."""
    total = PLAN_BYTES_PER_NONZERO * nnz
    total += 20 * m * k if dense_weight else 40 * nnz     # float32 draw + int64 argsort
    if verify:   # float64 dense W and |W|, float32 W for cuBLAS; im2col, outputs, interp gather
        total += 28 * m * k + 24 * k * n + 24 * m * n + 8 * (inputs + outputs)
    return total


def check_memory(estimate: int, what: str) -> None:
    """Refuse work estimated to need more than half of this machine's memory."""
    ram = machine_memory()
    if ram and estimate > ram // 2:
        raise UserError(f"{what} needs ~{_gb(estimate)} of memory, more than half of this "
                        f"machine's {_gb(ram)}")
