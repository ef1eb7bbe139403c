"""GPU runtime: the device's primary context, an own stream, device memory, cubin loading and
launches (on the own stream or a borrowed one). Timing lives in timing.py, library baselines in
baselines/, neither imported from here.

Built on the raw `cuda.bindings.driver` API, which is the same across cuda-bindings 12.x/13.x
(the GPU image has 13.3.1, the dev box 13.4.4); cuda.core's API moved too often to rely on.
Everything that touches the driver is imported lazily, so this module imports on a machine
without a driver, and `Gpu()` there raises NoGpuError (one line, no traceback).
One `Gpu` is meant to be used from one thread: the context is made current on that thread.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..arch import DEFAULT_ARCH, ptx_header  # noqa: F401 (ptx_header: re-exported)
from ..errors import NoGpuError

_DEFAULT_SMEM = 48 * 1024   # static + dynamic shared above this needs a per-kernel opt-in

EMPTY_PTX = ".visible .entry sparsert_empty()\n{\n    ret;\n}\n"


def _driver():
    from cuda.bindings import driver
    return driver


def cu(name: str, *args):
    """Call driver function `name`; raise RuntimeError naming the call and its CUresult.
    Returns the call's outputs: None, one value, or a tuple."""
    err, *out = getattr(_driver(), name)(*args)
    if int(err) != 0:
        raise RuntimeError(f"{name} failed: {getattr(err, 'name', err)} ({int(err)})")
    if not out:
        return None
    return out[0] if len(out) == 1 else tuple(out)


@functools.cache
def _probe() -> tuple[bool, str]:
    """(usable, reason). cuInit + cuDeviceGetCount, never raising: without libcuda the bindings
    raise DynamicLibNotFoundError at the first call, which must not escape."""
    try:
        from cuda.bindings import driver
        (err,) = driver.cuInit(0)
        if int(err) == 0:
            err, count = driver.cuDeviceGetCount()
        if int(err) != 0:
            return False, f"the driver answered {getattr(err, 'name', err)}"
        return (count > 0), f"{count} device(s)" if count else "the driver reports no devices"
    except Exception as exc:  # noqa: BLE001 - no cuda-python, no libcuda, ...: no GPU here
        if type(exc).__name__ == "DynamicLibNotFoundError":
            return False, "the CUDA driver library (libcuda.so.1) is not installed"
        return False, _one_line(exc)


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


def have_gpu() -> bool:
    """True when a CUDA driver and at least one GPU are usable. Cached; never raises."""
    return _probe()[0]


def pack_params(args: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Kernel parameters for cuLaunchKernel when every parameter is a 64-bit pointer.
    Returns (values, pointers): `pointers` is the void*[] array whose address goes in as
    kernelParams (the int form, accepted by every cuda-bindings version); entry i points at
    values[i]. Both arrays must stay alive until cuLaunchKernel returns (it copies them)."""
    values = np.array([int(a) for a in args], dtype=np.uint64)
    pointers = values.ctypes.data + 8 * np.arange(len(values), dtype=np.uint64)
    return values, pointers


class DeviceBuffer:
    """A cuMemAlloc'd block. `ptr` is the device address as an int (0 once freed)."""

    def __init__(self, gpu: "Gpu", ptr: int, nbytes: int):
        self._gpu, self.ptr, self.nbytes = gpu, ptr, nbytes

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            self._gpu._buffers.pop(ptr, None)
            cu("cuMemFree", ptr)

    def __int__(self) -> int:
        return self.ptr


def stream_handle(stream) -> int:
    """The cudaStream_t/CUstream address of an external stream: an int, a CUstream, an object
    with the CUDA stream protocol `__cuda_stream__()` (cuda.core, CuPy) or with `cuda_stream`
    (torch.cuda.Stream). 0 is the legacy default stream."""
    if isinstance(stream, int):
        return stream
    protocol = getattr(stream, "__cuda_stream__", None)
    if callable(protocol):
        return int(protocol()[1])
    handle = getattr(stream, "cuda_stream", None)
    if handle is not None:
        return int(handle)
    try:
        return int(stream)          # CUstream, cudaStream_t, numpy integers
    except (TypeError, ValueError):
        raise TypeError(f"not a CUDA stream handle: {type(stream).__name__} (pass an int, a "
                        f"CUstream, or an object with __cuda_stream__ or cuda_stream)") from None


@functools.lru_cache(maxsize=64)
def _stream_object(handle: int):
    return _driver().CUstream(handle)


def as_stream(stream):
    """A CUstream for the driver calls, from any handle stream_handle() accepts."""
    if isinstance(stream, _driver().CUstream):
        return stream
    return _stream_object(stream_handle(stream))


def _device_attribute(device: int, name: str) -> int:
    attr = getattr(_driver().CUdevice_attribute, name)
    return cu("cuDeviceGetAttribute", attr, cu("cuDeviceGet", device))


def detect_arch(default: str = DEFAULT_ARCH, device: int = 0) -> str:
    """The GPU's sm_XX, or `default` when there is no usable driver."""
    if not have_gpu():
        return default
    try:
        major = _device_attribute(device, "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR")
        minor = _device_attribute(device, "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR")
    except RuntimeError:
        return default
    return f"sm_{major}{minor}"


def detect_gpu_name(default: str = "NVIDIA H100 80GB HBM3", device: int = 0) -> str:
    """The GPU's name (part of a tuned-plan key), or `default` without a usable driver."""
    if not have_gpu():
        return default
    try:
        name = cu("cuDeviceGetName", 256, cu("cuDeviceGet", device))
    except RuntimeError:
        return default
    return bytes(name).split(b"\0", 1)[0].decode(errors="replace").strip() or default


@dataclass
class Kernel:
    entry: str
    function: object             # CUfunction
    registers: int
    local_bytes: int             # per-thread local memory (spills, stack arrays)
    static_shared_bytes: int
    dynamic_shared_limit: int     # dynamic bytes a launch may ask for without a new opt-in


def require_device(device: int) -> None:
    """NoGpuError (one line) unless a driver is usable and `device` is one of its devices."""
    ok, why = _probe()
    if not ok:
        raise NoGpuError(f"no CUDA driver or GPU found: {why}")
    count = cu("cuDeviceGetCount")
    if not 0 <= device < count:
        raise NoGpuError(f"no CUDA device {device}: the driver reports {count} device(s)")


class Gpu:
    """One device's primary context and one non-blocking stream. Use as a context manager."""

    def __init__(self, device: int = 0):
        require_device(device)
        drv = _driver()
        self._buffers: dict[int, DeviceBuffer] = {}
        self._modules: list = []
        self._ctx = self.stream = None
        self._at_close: list[Callable[[], None]] = []
        self.device = device
        self._dev = cu("cuDeviceGet", device)
        try:
            self._ctx = cu("cuDevicePrimaryCtxRetain", self._dev)
            cu("cuCtxSetCurrent", self._ctx)
            self.stream = cu("cuStreamCreate", int(drv.CUstream_flags.CU_STREAM_NON_BLOCKING))
            self.stream_handle = int(self.stream)
            attr = drv.CUdevice_attribute
            get = lambda a: cu("cuDeviceGetAttribute", a, self._dev)  # noqa: E731
            self.compute_capability = (get(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                                       get(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR))
            self.arch = "sm_{}{}".format(*self.compute_capability)
            self.sm_count = get(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            self.l2_bytes = get(attr.CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            self.max_shared_per_block = get(
                attr.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            self.name = cu("cuDeviceGetName", 256, self._dev).split(b"\0")[0].decode()
            self.total_memory = cu("cuDeviceTotalMem", self._dev)
            self.pci_bus_id = cu("cuDeviceGetPCIBusId", 64, self._dev).split(b"\0")[0].decode()
            version = cu("cuDriverGetVersion")
            self.driver_version = f"{version // 1000}.{version % 1000 // 10}"
        except BaseException:
            self.close()
            raise

    # ---- lifetime --------------------------------------------------------------------------
    def __enter__(self) -> "Gpu":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Free everything this Gpu made. Idempotent. Baselines must be closed first."""
        if self._ctx is None:
            return
        errors = []

        def release(name, *args):
            try:
                cu(name, *args)
            except RuntimeError as exc:   # keep releasing; report the first failure at the end
                errors.append(str(exc))

        if self.stream is not None:
            release("cuStreamSynchronize", self.stream)
        for callback in reversed(self._at_close):   # helpers (timing events) before the memory
            try:
                callback()
            except RuntimeError as exc:
                errors.append(str(exc))
        self._at_close.clear()
        for ptr in list(self._buffers):
            self._buffers.pop(ptr).ptr = 0
            release("cuMemFree", ptr)
        for module in self._modules:
            release("cuModuleUnload", module)
        self._modules.clear()
        if self.stream is not None:
            release("cuStreamDestroy", self.stream)
        release("cuDevicePrimaryCtxRelease", self._dev)
        self._ctx = self.stream = None
        if errors:
            raise RuntimeError("; ".join(errors))

    def at_close(self, callback: Callable[[], None]) -> None:
        """Run `callback` when this Gpu closes (before its buffers and modules go)."""
        self._at_close.append(callback)

    def synchronize(self) -> None:
        cu("cuStreamSynchronize", self.stream)

    # ---- device facts ----------------------------------------------------------------------
    def clocks(self) -> dict:
        """Current and maximum SM/memory clocks (MHz) and temperature via NVML; {} without it."""
        from . import nvml
        return nvml.clocks(self.pci_bus_id, self.device)

    def info(self) -> dict:
        """Everything about the device worth recording next to a measurement (JSON-ready)."""
        from . import nvml
        return {"name": self.name, "device": self.device, "arch": self.arch,
                "compute_capability": list(self.compute_capability), "sm_count": self.sm_count,
                "l2_bytes": self.l2_bytes, "total_memory_bytes": self.total_memory,
                "max_shared_per_block": self.max_shared_per_block,
                "pci_bus_id": self.pci_bus_id, "driver_version": self.driver_version,
                "nvml_driver": nvml.driver_version(), "clocks": self.clocks()}

    # ---- memory ----------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> DeviceBuffer:
        ptr = int(cu("cuMemAlloc", max(int(nbytes), 1)))  # cuMemAlloc(0) is an error
        buf = DeviceBuffer(self, ptr, int(nbytes))
        self._buffers[ptr] = buf
        return buf

    def upload(self, arr: np.ndarray) -> DeviceBuffer:
        """Copy a host array (made C-contiguous) to a new buffer; returns after the copy."""
        host = np.ascontiguousarray(arr)
        buf = self.alloc(host.nbytes)
        if host.nbytes:
            cu("cuMemcpyHtoDAsync", buf.ptr, host.ctypes.data, host.nbytes, self.stream)
        self.synchronize()   # pageable source: keep `host` alive until the copy is done
        return buf

    def download(self, buf: DeviceBuffer, shape, dtype) -> np.ndarray:
        """Copy the start of `buf` into a new host array; waits for the stream first."""
        out = np.empty(shape, dtype=dtype)
        if out.nbytes > buf.nbytes:
            raise ValueError(f"download of {out.nbytes} bytes from a {buf.nbytes}-byte buffer")
        if out.nbytes:
            cu("cuMemcpyDtoHAsync", out.ctypes.data, buf.ptr, out.nbytes, self.stream)
        self.synchronize()
        return out

    def memset(self, buf: DeviceBuffer, value: int, nbytes: int | None = None) -> None:
        """Set bytes to `value` on the stream (asynchronous)."""
        count = buf.nbytes if nbytes is None else int(nbytes)
        if count:
            cu("cuMemsetD8Async", buf.ptr, int(value) & 0xFF, count, self.stream)

    def poison(self, buf: DeviceBuffer) -> None:
        """Fill with 0xFF bytes: NaN as fp32 and fp16, so an unwritten output cannot pass."""
        self.memset(buf, 0xFF)

    # ---- kernels ---------------------------------------------------------------------------
    def load(self, cubin, entry: str) -> Kernel:
        """Load a cubin (bytes, or an object with `.cubin`) and look up one entry point.
        Modules stay loaded until close()."""
        image = bytes(getattr(cubin, "cubin", cubin))
        module = cu("cuModuleLoadData", image)
        self._modules.append(module)
        function = cu("cuModuleGetFunction", module, entry.encode())
        attr = _driver().CUfunction_attribute
        get = lambda a: cu("cuFuncGetAttribute", a, function)  # noqa: E731
        static = get(attr.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
        return Kernel(entry, function, get(attr.CU_FUNC_ATTRIBUTE_NUM_REGS),
                      get(attr.CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES), static,
                      max(_DEFAULT_SMEM - static, 0))

    def launch(self, kernel: Kernel, grid: tuple[int, int, int], block: tuple[int, int, int],
               shared_bytes: int, args: Sequence[int], stream=None) -> None:
        """Launch on this Gpu's stream, or on a borrowed `stream` (a handle: see stream_handle()).
        Every argument is a 64-bit device address (int or DeviceBuffer). Dynamic shared memory
        beyond the default 48 KiB (with static) is opted in on first use."""
        if shared_bytes > kernel.dynamic_shared_limit:
            cu("cuFuncSetAttribute", kernel.function,
               _driver().CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
               int(shared_bytes))
            kernel.dynamic_shared_limit = int(shared_bytes)
        values, pointers = pack_params(args)
        params = pointers.ctypes.data if len(values) else 0
        cu("cuLaunchKernel", kernel.function, *map(int, grid), *map(int, block),
           int(shared_bytes), self.stream if stream is None else as_stream(stream), params, 0)
