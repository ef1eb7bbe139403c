"""The custom op `torch.ops.sparsert.run(x, residual, kernel_id)`, registered with
torch.library.Library (define/impl): the @custom_op decorator costs ~36 us a call against ~10 us.

* CUDA: the output is allocated by torch and the kernel is launched on torch's current stream
  (LoadedKernel.launch with the stream handle and data pointers), so the op can be captured in a
  CUDA graph and traced by torch.compile(fullgraph=True) through the fake (meta) kernel.
* CPU: the plan interpreter (float64, slow): what sparsify_'s checks and the tests run.
* A fused pointwise -> depthwise kernel (pairs.FusedPair) also takes a scratch buffer, which
  the op allocates with torch for each call (Entry.scratch).

`kernel_id` indexes a process-wide registry (a schema cannot carry Python objects). The kernels
read X as K x N columns, and so does the op for Linear layers: its caller
(sparsify.SparseLayer.run) transposes token-major activations in, outside the op, where
torch.compile fuses that copy into the kernel that makes them. Linear kernels built token-major
(the streamed family) write N x M, as nn.Linear returns it; others write M x N, transposed back
by the caller, or handed to the next Linear kernel as a transposed view (whose transpose back
into K x N columns is then no copy: the contiguous() here and there does nothing).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

_REGISTRY: dict[int, "Entry"] = {}
_IDS = itertools.count(1)


@dataclass
class Entry:
    kernel: object              # api.Kernel (run_cpu) or backend._InternalKernel
    linear: bool
    in_shape: tuple             # the shape x must have (Linear: K x N columns; conv: B, C, H, W)
    out_shape: tuple            # the op's output shape
    loaded: object = None       # LoadedKernel on the GPU, None on the CPU
    device: int | None = None
    # a fused kernel's scratch buffer (fused.FusedKernel.scratch_shape): allocated by torch
    # for each call, in x's type; None: the kernel takes none
    scratch: tuple | None = None


def register(entry: Entry) -> int:
    kernel_id = next(_IDS)
    _REGISTRY[kernel_id] = entry
    return kernel_id


def unregister(kernel_id: int) -> None:
    entry = _REGISTRY.pop(kernel_id, None)
    if entry is not None and entry.loaded is not None and hasattr(entry.loaded, "close"):
        entry.loaded.close()


def dependent_launch_states(kernel_ids=None) -> dict[int, bool]:
    """{kernel id: launched with programmatic stream serialization} of the loaded kernels
    compiled for it (all of them, or those of `kernel_ids`)."""
    return {i: e.loaded.dependent_launch for i, e in _REGISTRY.items()
            if (kernel_ids is None or i in kernel_ids) and e.loaded is not None
            and getattr(e.loaded, "waits", False)}


def set_dependent_launch(on: bool, kernel_ids=None) -> int:
    """Launch the loaded kernels compiled for programmatic dependent launch (all of them, or
    those of `kernel_ids`: e.g. a model's SparseLayer.kernel_id) with (True) or without (False)
    programmatic stream serialization, e.g. to time a model both ways. CUDA graphs keep the
    launches they captured: capture again. Returns how many kernels can."""
    states = dependent_launch_states(kernel_ids)
    for i in states:
        _REGISTRY[i].loaded.dependent_launch = bool(on)
    return len(states)


def restore_dependent_launch(states: dict[int, bool]) -> None:
    """Put back what dependent_launch_states() returned (kernels since unloaded are skipped)."""
    for i, on in states.items():
        entry = _REGISTRY.get(i)
        if entry is not None and entry.loaded is not None:
            entry.loaded.dependent_launch = on


def _entry(x: torch.Tensor, kernel_id: int) -> Entry:
    entry = _REGISTRY.get(kernel_id)
    if entry is None:
        raise RuntimeError(f"sparsert: no kernel {kernel_id} in this process")
    if tuple(x.shape) != entry.in_shape:
        raise RuntimeError(f"sparsert: kernel {kernel_id} was compiled for input "
                           f"{entry.in_shape}, got {tuple(x.shape)}")
    return entry


def _run_cuda(x: torch.Tensor, residual, kernel_id: int) -> torch.Tensor:
    entry = _entry(x, kernel_id)
    if entry.loaded is None or x.device.index != entry.device:
        raise RuntimeError(f"sparsert: kernel {kernel_id} is loaded on cuda:{entry.device}, "
                           f"not {x.device}")
    xin = x.contiguous()
    y = torch.empty(entry.out_shape, dtype=x.dtype, device=x.device)
    res = None if residual is None else residual.contiguous()
    stream = torch.cuda.current_stream(x.device).cuda_stream
    if entry.scratch is not None:       # freed after the call: torch reuses it in stream order
        scratch = torch.empty(entry.scratch, dtype=x.dtype, device=x.device)
        entry.loaded.launch(stream, xin.data_ptr(), y.data_ptr(), None,
                            scratch_ptr=scratch.data_ptr())
        return y
    entry.loaded.launch(stream, xin.data_ptr(), y.data_ptr(),
                        None if res is None else res.data_ptr())
    return y


def _run_cpu(x: torch.Tensor, residual, kernel_id: int) -> torch.Tensor:
    entry = _entry(x, kernel_id)
    store = np.float16 if x.dtype == torch.float16 else np.float32
    data = x.detach().to(torch.float32).numpy().astype(store)
    res = None if residual is None else residual.detach().to(torch.float32).numpy()
    out = np.asarray(entry.kernel.run_cpu(data) if entry.scratch is not None
                     else entry.kernel.run_cpu(data, res))
    return torch.from_numpy(np.ascontiguousarray(out)).to(x.dtype).view(entry.out_shape)


def _run_fake(x: torch.Tensor, residual, kernel_id: int) -> torch.Tensor:
    entry = _REGISTRY.get(kernel_id)
    if entry is None:
        raise RuntimeError(f"sparsert: no kernel {kernel_id} in this process")
    return x.new_empty(entry.out_shape)


def _define():
    try:                        # defined once per process (a re-import must not define again)
        return torch.ops.sparsert.run
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("sparsert", "DEF")
    lib.define("run(Tensor x, Tensor? residual, int kernel_id) -> Tensor")
    lib.impl("run", _run_cuda, "CUDA")
    lib.impl("run", _run_cpu, "CPU")
    torch.library.register_fake("sparsert::run", _run_fake, lib=lib)
    _define.lib = lib            # the Library must outlive this call
    return torch.ops.sparsert.run


run = _define()
