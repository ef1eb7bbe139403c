"""What both interpreters share (interp.py, interp_stream.py): the error they raise, the
entry's index arithmetic evaluated per thread, and fp16 rounding."""

from __future__ import annotations

import numpy as np

from .ir import IndexOp, KernelIR


class PlanExecutionError(AssertionError):
    pass


_INDEX = {"mad": lambda a, b, c: a * b + c, "mul": lambda a, b, c: a * b,
          "add": lambda a, b, c: a + b, "sub": lambda a, b, c: a - b,
          "div": lambda a, b, c: a // b, "rem": lambda a, b, c: a % b,
          "min": lambda a, b, c: np.minimum(a, b), "lt": lambda a, b, c: (a < b).astype(np.int64)}


def evaluate(ops: tuple[IndexOp, ...], env: dict) -> dict:
    """Run IndexOps on int64 arrays (operands never leave [0, 2^31) except signed ones)."""
    env = dict(env)
    for op in ops:
        a, b, c = (env[v] if isinstance(v, str) else v for v in (op.a, op.b, op.c))
        value = _INDEX[op.op](a, b, c)
        if not op.signed and np.any(np.asarray(value) < 0):
            raise PlanExecutionError(f"unsigned index {op.dst} went negative")
        env[op.dst] = value
    return env


def thread_env(ir: KernelIR) -> dict:
    """Per thread (bx * col_threads + tx, flattened): the entry's column variables."""
    tiles = ir.tiles
    tid = np.arange(tiles * ir.col_threads, dtype=np.int64)
    return evaluate(ir.columns, {"bx": tid // ir.col_threads, "tx": tid % ir.col_threads})


def _f16(values):
    return np.asarray(values, dtype=np.float64).astype(np.float16).astype(np.float64)
