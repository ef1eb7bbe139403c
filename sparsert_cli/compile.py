"""Source -> cubin, with the ptxas resource report parsed.

Two routes, both usable without a GPU or driver:
  * PTX  -> cubin through nvJitLink (the default: near-linear compile time for long kernels),
  * C++  -> cubin through NVRTC (the readable CUDA emitter, and small helper kernels).
Never PTX for the driver to JIT: the GPU hosts run an older driver than the PTX ISA we emit.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field

# Re-exported: arch helpers live in arch.py; callers that import them from here keep working.
from .arch import DEFAULT_ARCH, SUPPORTED_ARCHS, arch_number, check_arch  # noqa: F401
from .errors import CompileError


@dataclass(frozen=True)
class Resources:
    """What ptxas reported for one kernel entry."""

    registers: int = 0
    stack_bytes: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    shared_bytes: int = 0

    @property
    def spills(self) -> int:
        return self.spill_store_bytes + self.spill_load_bytes


@dataclass(frozen=True)
class Compiled:
    cubin: bytes
    log: str
    seconds: float
    resources: dict[str, Resources] = field(default_factory=dict)

    def entry_resources(self, entry: str) -> Resources:
        return self.resources.get(entry, Resources())


def _target(arch: str) -> str:
    try:
        return check_arch(arch)
    except ValueError as exc:
        raise CompileError(str(exc)) from None


_FN = re.compile(r"Function properties for (\S+)")
_COMPILING = re.compile(r"Compiling entry function '([^']+)'")
_SP = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RG = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_LINK_FN = re.compile(r"^info\s*: Function properties for '([^']+)'")
_LINK_USE = re.compile(r"^info\s*: used (\d+) registers.*?(\d+) stack, (\d+) bytes smem")


def parse_ptxas(log: str) -> dict[str, Resources]:
    """Parse a `ptxas -v` log into {entry name: Resources}.

    Spills are summed over every function (a spill in a called .func costs the kernel too). The
    register count and shared memory come from nvJitLink's own per-entry summary when present,
    because with calls it counts the callees' registers and ptxas's entry line does not; otherwise
    from ptxas's "Used N registers" line (NVRTC's log).
    """
    spills = [0, 0, 0]
    entries: dict[str, dict[str, int]] = {}
    current = None
    link_entry = None
    for line in log.splitlines():
        if line.startswith("ptxas"):
            if m := _COMPILING.search(line):
                current = m[1]
                entries.setdefault(current, {})
            elif m := _FN.search(line):
                current = m[1]
            elif m := _SP.search(line):
                stack, st, ld = (int(g) for g in m.groups())
                spills = [max(spills[0], stack), spills[1] + st, spills[2] + ld]
            elif current in entries and (m := _RG.search(line)):
                entries[current].setdefault("registers", int(m[1]))
                if s := _SMEM.search(line):
                    entries[current].setdefault("shared_bytes", int(s[1]))
        elif m := _LINK_FN.match(line):
            link_entry = m[1] if m[1] in entries else None
        elif link_entry and (m := _LINK_USE.match(line)):
            entries[link_entry].update(registers=int(m[1]), shared_bytes=int(m[3]))
            link_entry = None
    return {name: Resources(stack_bytes=spills[0], spill_store_bytes=spills[1],
                            spill_load_bytes=spills[2], **vals)
            for name, vals in entries.items()}


def ptx_to_cubin(ptx: str, arch: str = DEFAULT_ARCH, options: tuple[str, ...] = ()) -> Compiled:
    """Assemble and link PTX with nvJitLink. Raises CompileError carrying the ptxas log.

    nvJitLink may answer PTX it has linked before from its own cache (CUDA 13.0's, in
    ~/.nv/ComputeCache: H100 run S15-9); its info log then lacks ptxas's lines, which hold the
    spill counts. Such a link is done again with a comment that makes the PTX new to the cache."""
    _target(arch)
    opts = [f"-arch={arch}", "-verbose", "-Xptxas=-v", *options]
    start = time.perf_counter()
    cubin, log = _link(ptx, opts)
    if _COMPILING.search(log) is None and ".entry" in ptx:
        cubin, log = _link(f"{ptx}\n// sparsert: linked again for ptxas's log ({uuid.uuid4()})\n",
                           opts)
    return Compiled(cubin, log, time.perf_counter() - start, parse_ptxas(log))


def _link(ptx: str, opts: list[str]) -> tuple[bytes, str]:
    """(cubin, info log) of one nvJitLink run over `ptx`."""
    from cuda.bindings import nvjitlink

    data = ptx.encode()
    try:
        handle = nvjitlink.create(len(opts), opts)
    except nvjitlink.nvJitLinkError as exc:
        raise CompileError(f"nvJitLink refused the options {opts}: {exc}") from None
    try:
        try:  # PTX is assembled inside add_data(): errors come from there, not only complete()
            nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel.ptx")
            nvjitlink.complete(handle)
        except nvjitlink.nvJitLinkError as exc:
            size = nvjitlink.get_error_log_size(handle)
            buf = bytearray(size)
            if size:
                nvjitlink.get_error_log(handle, buf)
            raise CompileError(f"nvJitLink rejected the PTX: {exc}",
                               log=buf.decode(errors="replace").rstrip("\x00")) from None
        cubin = bytearray(nvjitlink.get_linked_cubin_size(handle))
        nvjitlink.get_linked_cubin(handle, cubin)
        info = bytearray(nvjitlink.get_info_log_size(handle))
        if info:
            nvjitlink.get_info_log(handle, info)
    finally:
        nvjitlink.destroy(handle)
    return bytes(cubin), info.decode(errors="replace").rstrip("\x00")


def _nvrtc_check(result):
    err, *out = result
    if int(err) != 0:
        raise CompileError(f"NVRTC call failed: {err!r}")
    return out[0] if len(out) == 1 else tuple(out)


def cpp_to_cubin(source: str, arch: str = DEFAULT_ARCH, options: tuple[str, ...] = (),
                 name: str = "kernel.cu") -> Compiled:
    """Compile CUDA C++ straight to cubin with NVRTC (no driver needed)."""
    from cuda.bindings import nvrtc

    _target(arch)
    opts = [f"-arch={arch}", "--ptxas-options=-v", "-std=c++17", *options]
    start = time.perf_counter()
    prog = _nvrtc_check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []))
    try:
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
        size = _nvrtc_check(nvrtc.nvrtcGetProgramLogSize(prog))
        logbuf = bytearray(size)        # NVRTC writes into it: never into an immutable bytes
        _nvrtc_check(nvrtc.nvrtcGetProgramLog(prog, logbuf))
        log = bytes(logbuf).rstrip(b"\x00 ").decode(errors="replace")
        if int(err) != 0:
            raise CompileError("NVRTC failed to compile the generated CUDA C++", log=log)
        cubin = bytearray(_nvrtc_check(nvrtc.nvrtcGetCUBINSize(prog)))
        _nvrtc_check(nvrtc.nvrtcGetCUBIN(prog, cubin))
        cubin = bytes(cubin)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return Compiled(cubin, log, time.perf_counter() - start, parse_ptxas(log))


def cpp_to_ptx(source: str, arch: str = DEFAULT_ARCH, options: tuple[str, ...] = (),
               name: str = "kernel.cu") -> tuple[str, float]:
    """Compile CUDA C++ to PTX text with NVRTC: (ptx, seconds)."""
    from cuda.bindings import nvrtc

    _target(arch)
    opts = [f"-arch=compute_{arch_number(arch)}", "-std=c++17", *options]
    start = time.perf_counter()
    prog = _nvrtc_check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []))
    try:
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
        if int(err) != 0:
            size = _nvrtc_check(nvrtc.nvrtcGetProgramLogSize(prog))
            logbuf = bytearray(size)
            _nvrtc_check(nvrtc.nvrtcGetProgramLog(prog, logbuf))
            raise CompileError("NVRTC failed to compile the generated CUDA C++",
                               log=bytes(logbuf).rstrip(b"\x00 ").decode(errors="replace"))
        ptx = bytearray(_nvrtc_check(nvrtc.nvrtcGetPTXSize(prog)))
        _nvrtc_check(nvrtc.nvrtcGetPTX(prog, ptx))
        ptx = bytes(ptx)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return ptx.rstrip(b"\x00 ").decode(), time.perf_counter() - start
