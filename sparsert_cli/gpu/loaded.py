"""A compiled kernel loaded onto a device, launched on the caller's stream with the caller's
pointers (a PyTorch or CuPy program, or sparsert's own Gpu).

Loading uses the device's primary context, the one the CUDA runtime (and so torch) uses, so
pointers and streams of either side are valid in the other. Everything that can be done once is
done at load: the module and function, the function attributes (dynamic shared memory opt-in,
checks of the block size against the function's limit), and the all-zero buffer padded
convolutions read. A launch allocates nothing and synchronises nothing: it packs the argument
buffer once per distinct pointer set (kept in a small cache) and calls cuLaunchKernel, or, for a
kernel compiled for programmatic dependent launch, cuLaunchKernelEx with programmatic stream
serialization (one launch configuration kept per stream).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .runtime import (_DEFAULT_SMEM, _driver, as_stream, cu, pack_params, require_device,
                      stream_handle)

_PACKED_LIMIT = 64          # distinct pointer sets whose argument buffers stay packed
_CONFIG_LIMIT = 16          # streams whose launch configurations stay built


def device_pointer(value) -> int:
    """A device address from an int, a DeviceBuffer, or a tensor with data_ptr() (torch)."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    data_ptr = getattr(value, "data_ptr", None)
    if callable(data_ptr):
        return int(data_ptr())
    return int(value)


class LoadedKernel:
    """One kernel entry loaded into device `device`'s primary context.

    `arguments` are the kernel's pointer parameters in order (names x, y, res, t, z; t: a fused
    kernel's scratch buffer, passed to launch()); `zero_bytes` sizes the all-zero buffer for `z`
    (0: the kernel has no z). Use as a context manager, or
    close(); closing waits for nothing, so the caller must not close while launches run.
    `dependent_launch`: the cubin's entry waits for the grid before it (griddepcontrol.wait,
    build.lowered()), so it may be launched with programmatic stream serialization: its blocks
    start while the kernel before it in the stream finishes (that one must let them, as
    sparsert's kernels do; any other kernel lets them only when it ends). The attribute of the
    same name turns the overlap off and on again for this kernel (the cubin stays the same).
    """

    def __init__(self, cubin: bytes, entry: str, grid: Sequence[int], block: Sequence[int],
                 arguments: Sequence[str], zero_bytes: int = 0, dynamic_shared_bytes: int = 0,
                 device: int = 0, dependent_launch: bool = False):
        require_device(device)
        self.entry, self.device = entry, device
        self.waits = self._dependent = bool(dependent_launch)   # compiled to wait
        self._configs: dict[int, object] = {}
        self.grid, self.block = tuple(map(int, grid)), tuple(map(int, block))
        self.arguments = tuple(arguments)
        self.dynamic_shared_bytes = int(dynamic_shared_bytes)
        self._module = self._zero = None
        self._packed: dict[tuple, tuple] = {}
        self._dev = cu("cuDeviceGet", device)
        self._ctx = cu("cuDevicePrimaryCtxRetain", self._dev)
        try:
            cu("cuCtxSetCurrent", self._ctx)
            self._module = cu("cuModuleLoadData", bytes(cubin))
            self._function = cu("cuModuleGetFunction", self._module, entry.encode())
            self._set_attributes()
            if "z" in self.arguments:
                self._zero = int(cu("cuMemAlloc", max(int(zero_bytes), 1)))
                cu("cuMemsetD8", self._zero, 0, max(int(zero_bytes), 1))
        except BaseException:
            self.close()
            raise

    def _set_attributes(self) -> None:
        attr = _driver().CUfunction_attribute
        get = lambda a: cu("cuFuncGetAttribute", a, self._function)  # noqa: E731
        self.registers = get(attr.CU_FUNC_ATTRIBUTE_NUM_REGS)
        self.local_bytes = get(attr.CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES)
        self.static_shared_bytes = get(attr.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
        limit = get(attr.CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK)
        threads = self.block[0] * self.block[1] * self.block[2]
        if threads > limit:
            raise RuntimeError(f"{self.entry}: a block of {threads} threads exceeds this "
                               f"function's limit of {limit} (registers: {self.registers})")
        if self.dynamic_shared_bytes > max(_DEFAULT_SMEM - self.static_shared_bytes, 0):
            cu("cuFuncSetAttribute", self._function,
               attr.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, self.dynamic_shared_bytes)

    @property
    def dependent_launch(self) -> bool:
        """Launched with programmatic stream serialization (only a kernel compiled to wait)."""
        return self._dependent

    @dependent_launch.setter
    def dependent_launch(self, on: bool) -> None:
        if on and not self.waits:
            raise ValueError(f"{self.entry} was not compiled for programmatic dependent launch "
                             "(it does not wait for the kernel before it)")
        self._dependent = bool(on)

    def _config(self, stream):
        """The cuLaunchKernelEx configuration for `stream` (built once per stream)."""
        key = int(stream_handle(stream))
        config = self._configs.get(key)
        if config is None:
            d = _driver()
            config = d.CUlaunchConfig()
            config.gridDimX, config.gridDimY, config.gridDimZ = self.grid
            config.blockDimX, config.blockDimY, config.blockDimZ = self.block
            config.sharedMemBytes, config.hStream = self.dynamic_shared_bytes, as_stream(stream)
            attr = d.CUlaunchAttribute()
            attr.id = d.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
            attr.value.programmaticStreamSerializationAllowed = 1
            config.attrs, config.numAttrs = [attr], 1
            if len(self._configs) >= _CONFIG_LIMIT:
                self._configs.clear()
            self._configs[key] = config
        return config

    def _pack(self, x_ptr, y_ptr, residual_ptr, scratch_ptr=None) -> tuple:
        key = (device_pointer(x_ptr), device_pointer(y_ptr),
               None if residual_ptr is None else device_pointer(residual_ptr),
               None if scratch_ptr is None else device_pointer(scratch_ptr))
        packed = self._packed.get(key)
        if packed is not None:
            return packed
        if ("res" in self.arguments) != (residual_ptr is not None):
            raise ValueError(f"{self.entry}: " + ("this kernel adds a residual: pass residual_ptr"
                                                  if residual_ptr is None else
                                                  "this kernel takes no residual"))
        if ("t" in self.arguments) != (scratch_ptr is not None):
            raise ValueError(f"{self.entry}: " + ("this fused kernel needs its scratch buffer: "
                                                  "pass scratch_ptr" if scratch_ptr is None else
                                                  "this kernel takes no scratch buffer"))
        by_name = {"x": key[0], "y": key[1], "res": key[2], "t": key[3], "z": self._zero}
        values, pointers = pack_params([by_name[name] for name in self.arguments])
        if len(self._packed) >= _PACKED_LIMIT:
            self._packed.clear()
        packed = self._packed[key] = (values, pointers, int(pointers.ctypes.data))
        return packed

    def launch(self, stream, x_ptr, y_ptr, residual_ptr=None, scratch_ptr=None) -> None:
        """Enqueue one run on `stream` (an int handle, CUstream, or an object with
        __cuda_stream__ / cuda_stream such as torch.cuda.current_stream()). Pointers are device
        addresses (ints, DeviceBuffers or tensors with data_ptr()); y is fully overwritten
        (a fused kernel's scratch buffer too; runs that may overlap need their own).
        Call from a thread where the device's primary context is current (torch's threads are;
        the thread that loaded the kernel is)."""
        if self._module is None:
            raise RuntimeError(f"{self.entry}: launch after close()")
        _, _, params = self._pack(x_ptr, y_ptr, residual_ptr, scratch_ptr)
        if self._dependent:
            (err,) = _driver().cuLaunchKernelEx(self._config(stream), self._function, params, 0)
        else:
            (err,) = _driver().cuLaunchKernel(self._function, *self.grid, *self.block,
                                              self.dynamic_shared_bytes, as_stream(stream),
                                              params, 0)
        if int(err) != 0:
            call = "cuLaunchKernelEx" if self._dependent else "cuLaunchKernel"
            raise RuntimeError(f"{call}({self.entry}) failed: "
                               f"{getattr(err, 'name', err)} ({int(err)})")

    def close(self) -> None:
        """Unload the module, free the zero buffer, release the primary context. Idempotent."""
        if self._ctx is None:
            return
        if self._zero:
            zero, self._zero = self._zero, None
            cu("cuMemFree", zero)
        if self._module is not None:
            module, self._module = self._module, None
            cu("cuModuleUnload", module)
        self._packed.clear()
        self._configs.clear()
        self._ctx = None
        cu("cuDevicePrimaryCtxRelease", self._dev)

    def __enter__(self) -> "LoadedKernel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
