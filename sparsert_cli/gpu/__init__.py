"""GPU side of sparsert: the runtime (context, memory, launches, timing) and library baselines.

Importing this package never touches the driver or loads a CUDA library: everything that does
is imported lazily, so CPU-only machines can import it and `have_gpu()` decides what runs.
"""

from .runtime import DeviceBuffer, Gpu, Kernel, Timing, have_gpu

__all__ = ["DeviceBuffer", "Gpu", "Kernel", "Timing", "have_gpu"]
