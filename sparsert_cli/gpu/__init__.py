"""GPU side of sparsert: runtime.py (context, memory, load/launch), timing.py (graph, stream and
cold-L2 timing), baselines/ (one library per module), nvml.py (clocks).

Importing this package never touches the driver or loads a CUDA library: everything that does
is imported lazily, so CPU-only machines can import it and `have_gpu()` decides what runs.
"""

from .runtime import DeviceBuffer, Gpu, Kernel, have_gpu

__all__ = ["DeviceBuffer", "Gpu", "Kernel", "have_gpu"]
