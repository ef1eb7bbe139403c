"""What every library baseline shares: owned device buffers, poisoning, closing, and a few
helpers. A baseline does all its setup in __init__ (handles, descriptors, workspace,
preprocessing, choosing the fastest correct algorithm), so `enqueue()` only puts one run on
gpu.stream: no allocation, no host sync, capturable into a CUDA graph. Host scalars (alpha/beta)
are attributes: the libraries read them by pointer."""

from __future__ import annotations

import numpy as np

from ...reference import check
from ..runtime import DeviceBuffer, Gpu
from ..timing import Timing


def median_us(timing: Timing) -> float:
    return float(np.median(timing.samples_us))


def mismatch(out, ref, magnitude, dtype: str, k: int) -> str:
    """"" when `out` is within tolerance of `ref` everywhere, else one line saying why not."""
    ok, _, message = check(out, ref, magnitude, dtype, k)
    return "" if ok else message


def _bind(fn, *args):
    """fn(*args) as a zero-argument callable: every argument is fixed at setup."""
    return lambda: fn(*args)


class _Baseline:
    """Owns device buffers; subclasses add library handles in _close_library()."""

    name = ""
    dtype = ""

    def __init__(self, gpu: Gpu):
        self.gpu = gpu
        self.info: dict = {}
        self._owned: list[DeviceBuffer] = []
        self._out: DeviceBuffer | None = None

    def _upload(self, arr: np.ndarray) -> DeviceBuffer:
        buf = self.gpu.upload(arr)
        self._owned.append(buf)
        return buf

    def _alloc(self, nbytes: int) -> DeviceBuffer:
        buf = self.gpu.alloc(nbytes)
        self._owned.append(buf)
        return buf

    def poison(self) -> None:
        self.gpu.poison(self._out)

    def _close_library(self) -> None:
        pass

    def close(self) -> None:
        """Destroy handles and free buffers. Idempotent; safe on a half-built instance."""
        try:
            if self.gpu.stream is not None:    # the Gpu may already be closed
                self.gpu.synchronize()
        finally:
            self._close_library()
            for buf in self._owned:
                buf.free()
            self._owned.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
