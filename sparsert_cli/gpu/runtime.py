"""GPU runtime: one context, one stream, device memory, cubin loading, launches and timing.

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

from ..errors import NoGpuError

_DEFAULT_SMEM = 48 * 1024   # static + dynamic shared above this needs a per-kernel opt-in
_SPIN_NS = 50_000           # GPU busy time queued ahead of each timed replay (see time())

EMPTY_PTX = ".visible .entry sparsert_empty()\n{\n    ret;\n}\n"
# Busy-waits ~_SPIN_NS on %globaltimer, touching no memory (so it leaves L2 as it was).
# The iteration cap keeps it finite should the timer ever stand still.
_SPIN_PTX = f""".visible .entry sparsert_spin()
{{
    .reg .pred %p<3>;
    .reg .b64 %rd<5>;
    mov.u64 %rd1, %globaltimer;
    mov.u64 %rd4, 0;
$L_spin:
    mov.u64 %rd2, %globaltimer;
    sub.s64 %rd3, %rd2, %rd1;
    add.s64 %rd4, %rd4, 1;
    setp.lt.s64 %p1, %rd3, {_SPIN_NS};
    setp.lt.s64 %p2, %rd4, 10000000;
    and.pred %p1, %p1, %p2;
    @%p1 bra $L_spin;
    ret;
}}
"""


def ptx_header(arch: str) -> str:
    """`.version/.target/.address_size` lines for hand-written PTX. ISA 8.0 covers sm_90(a) and
    older; newer chips need a newer ISA, which nvJitLink 13.x accepts (we never JIT PTX)."""
    from ..render.ptx import ptx_version

    version = ptx_version(arch)
    return f".version {version}\n.target {arch}\n.address_size 64\n\n"


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


@dataclass(frozen=True)
class Timing:
    """Per-launch times in microseconds, one sample per timed replay."""

    samples_us: tuple[float, ...]
    method: str          # "graph" (CUDA-graph replay) or "stream" (capture failed)
    per_graph: int       # launches per timed replay; each sample is elapsed / per_graph
    cold_l2: bool = False
    note: str = ""       # why capture failed, when method == "stream"

    @property
    def median_us(self) -> float:
        return float(np.median(self.samples_us))

    @property
    def p20_us(self) -> float:
        return float(np.percentile(self.samples_us, 20))

    @property
    def p80_us(self) -> float:
        return float(np.percentile(self.samples_us, 80))

    def as_dict(self) -> dict:
        return {"median_us": self.median_us, "p20_us": self.p20_us, "p80_us": self.p80_us,
                "samples_us": list(self.samples_us), "method": self.method,
                "per_graph": self.per_graph, "cold_l2": self.cold_l2, "note": self.note}


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


@dataclass
class Kernel:
    entry: str
    function: object             # CUfunction
    registers: int
    local_bytes: int             # per-thread local memory (spills, stack arrays)
    static_shared_bytes: int
    dynamic_shared_limit: int     # dynamic bytes a launch may ask for without a new opt-in


class Gpu:
    """One device's primary context and one non-blocking stream. Use as a context manager."""

    def __init__(self, device: int = 0):
        ok, why = _probe()
        if not ok:
            raise NoGpuError(f"no CUDA driver or GPU found: {why}")
        count = cu("cuDeviceGetCount")
        if not 0 <= device < count:
            raise NoGpuError(f"no CUDA device {device}: the driver reports {count} device(s)")
        drv = _driver()
        self._buffers: dict[int, DeviceBuffer] = {}
        self._modules: list = []
        self._ctx = self.stream = self._events = None
        self._scratch: DeviceBuffer | None = None
        self._spin: Kernel | None = None
        self._flush_value = 0
        self.device = device
        self._dev = cu("cuDeviceGet", device)
        try:
            self._ctx = cu("cuDevicePrimaryCtxRetain", self._dev)
            cu("cuCtxSetCurrent", self._ctx)
            self.stream = cu("cuStreamCreate", int(drv.CUstream_flags.CU_STREAM_NON_BLOCKING))
            self.stream_handle = int(self.stream)
            flags = int(drv.CUevent_flags.CU_EVENT_DEFAULT)   # timing enabled
            self._events = (cu("cuEventCreate", flags), cu("cuEventCreate", flags))
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
        for ptr in list(self._buffers):
            self._buffers.pop(ptr).ptr = 0
            release("cuMemFree", ptr)
        for module in self._modules:
            release("cuModuleUnload", module)
        self._modules.clear()
        for event in self._events or ():
            release("cuEventDestroy", event)
        if self.stream is not None:
            release("cuStreamDestroy", self.stream)
        release("cuDevicePrimaryCtxRelease", self._dev)
        self._ctx = self.stream = self._events = self._spin = self._scratch = None
        if errors:
            raise RuntimeError("; ".join(errors))

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
               shared_bytes: int, args: Sequence[int]) -> None:
        """Launch on the stream. Every argument is a 64-bit device address (int or DeviceBuffer).
        Dynamic shared memory beyond the default 48 KiB (with static) is opted in on first use."""
        if shared_bytes > kernel.dynamic_shared_limit:
            cu("cuFuncSetAttribute", kernel.function,
               _driver().CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
               int(shared_bytes))
            kernel.dynamic_shared_limit = int(shared_bytes)
        values, pointers = pack_params(args)
        params = pointers.ctypes.data if len(values) else 0
        cu("cuLaunchKernel", kernel.function, *map(int, grid), *map(int, block),
           int(shared_bytes), self.stream, params, 0)

    # ---- timing ----------------------------------------------------------------------------
    def time(self, enqueue: Callable[[], None], *, per_graph: int = 20, replays: int = 10,
             warmup: int = 3, cold_l2: bool = False, capture: bool = True) -> Timing:
        """Per-launch time of `enqueue` (which puts exactly one run on self.stream).

        Warm up, capture `per_graph` runs into a CUDA graph, replay it once untimed, then
        `replays` times between two events; each sample is elapsed / per_graph. Before every
        timed replay a ~50 us spin kernel is queued, so the start event, the graph launch and
        the stop event are all submitted while the GPU is still busy: host submission latency
        stays out of the measurement. If capture fails (a call that cannot be captured), the
        stream is taken out of capture and the same runs are timed as plain back-to-back
        enqueues (method "stream"). With cold_l2, a 2x-L2 scratch memset runs before each
        replay (outside the events) and per_graph is forced to 1: in a graph of several
        launches only the first would see a cold L2. A cold sample therefore carries one graph
        launch's fixed cost (H100: empty kernel 2.98 us at per_graph=1, 1.0 at 20): compare
        cold numbers only with cold numbers. capture=False skips the graph and times
        on the stream directly (for long operations a graph would change, like big copies).
        """
        if per_graph < 1 or replays < 1 or warmup < 0:
            raise ValueError("per_graph and replays must be >= 1 and warmup >= 0")
        if cold_l2:
            per_graph = 1
        spin = self._spin_kernel()
        for _ in range(warmup):
            enqueue()
        self.synchronize()
        graph_exec, note = self._capture(enqueue, per_graph) if capture else (None, "not asked")

        def run():
            if graph_exec is not None:
                cu("cuGraphLaunch", graph_exec, self.stream)
            else:
                for _ in range(per_graph):
                    enqueue()

        start, stop = self._events
        try:
            run()
            self.synchronize()
            samples = []
            for _ in range(replays):
                if cold_l2:
                    self._flush_l2()
                self.launch(spin, (1, 1, 1), (32, 1, 1), 0, [])
                cu("cuEventRecord", start, self.stream)
                run()
                cu("cuEventRecord", stop, self.stream)
                cu("cuEventSynchronize", stop)
                samples.append(cu("cuEventElapsedTime", start, stop) * 1000.0 / per_graph)
        finally:
            if graph_exec is not None:
                cu("cuGraphExecDestroy", graph_exec)
        return Timing(tuple(samples), "graph" if graph_exec is not None else "stream",
                      per_graph, cold_l2, note)

    def _capture(self, enqueue: Callable[[], None], count: int):
        """(uploaded graph exec, "") or (None, why capture failed). Never leaves the stream
        capturing."""
        drv = _driver()
        cu("cuStreamBeginCapture", self.stream,
           drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        failure = ""
        try:
            for _ in range(count):
                enqueue()
        except Exception as exc:  # noqa: BLE001 - any failure inside capture means "not capturable"
            failure = _one_line(exc)
        err, graph = drv.cuStreamEndCapture(self.stream)   # graph is None or NULL on failure
        if failure or int(err) != 0 or graph is None or not int(graph):
            if int(err) == 0 and graph is not None and int(graph):
                cu("cuGraphDestroy", graph)
            self._clear_capture_error()
            return None, failure or f"cuStreamEndCapture returned {getattr(err, 'name', err)}"
        try:
            graph_exec = cu("cuGraphInstantiate", graph, 0)
        finally:
            cu("cuGraphDestroy", graph)   # the executable graph does not need it
        cu("cuGraphUpload", graph_exec, self.stream)
        return graph_exec, ""

    def _clear_capture_error(self) -> None:
        """After a failed capture: clear the runtime's last error (best effort: a library with
        its own static cudart keeps its own), and make sure the stream really left capture."""
        try:
            from cuda.bindings import runtime
            runtime.cudaGetLastError()
        except Exception:  # noqa: BLE001 - nothing to clear if the runtime never loaded
            pass
        status = cu("cuStreamIsCapturing", self.stream)
        if int(status) != int(_driver().CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_NONE):
            raise RuntimeError(f"stream still capturing after cuStreamEndCapture: {status!r}")

    def _spin_kernel(self) -> Kernel:
        if self._spin is None:
            from ..compile import ptx_to_cubin
            cubin = ptx_to_cubin(ptx_header(self.arch) + _SPIN_PTX, self.arch).cubin
            self._spin = self.load(cubin, "sparsert_spin")
        return self._spin

    def _flush_l2(self) -> None:
        if self._scratch is None:
            self._scratch = self.alloc(2 * max(self.l2_bytes, 1 << 20))
        self._flush_value ^= 1   # a different value each time: no write can be skipped
        self.memset(self._scratch, self._flush_value)

    # ---- ceilings ----------------------------------------------------------------------------
    def measure_floors(self, gemm_size: int = 8192) -> dict:
        """Ceilings for "% of floor": {"fp32_gflops", "bandwidth_gbs", "launch_us", ...}.
        Lives with the baselines (it runs cuBLAS); see baselines.measure_floors."""
        from .baselines import measure_floors
        return measure_floors(self, gemm_size)
