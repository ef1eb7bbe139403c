"""GPU architecture names in one place: the default target, what the toolchain supports,
parsing `sm_XX[a]`, and the PTX ISA and header for a target. Detecting the local GPU's arch is
the device's job (gpu/runtime.detect_arch)."""

from __future__ import annotations

import re

DEFAULT_ARCH = "sm_90"
_ARCH_RE = re.compile(r"sm_(\d{2,3})a?")
# What NVRTC/nvJitLink 13.x can target (nvrtcGetSupportedArchs); sm_XXa variants too.
SUPPORTED_ARCHS = (75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121)


# Shared memory one block may opt in to, by compute capability (CUDA C++ Programming Guide,
# "Technical Specifications per Compute Capability"); an arch not listed gets the smallest.
_BLOCK_SHARED_KB = {75: 64, 80: 163, 86: 99, 87: 163, 89: 99, 90: 227, 100: 227, 103: 227,
                    120: 99, 121: 99}


def block_shared_bytes(arch: str) -> int:
    """The most shared memory (static + dynamic) one block of an `arch` kernel may use."""
    return 1024 * _BLOCK_SHARED_KB.get(arch_number(arch), min(_BLOCK_SHARED_KB.values()))


def arch_number(arch: str) -> int:
    """sm_90a -> 90."""
    return int(arch[3:].rstrip("a"))


def check_arch(arch: str) -> str:
    match = _ARCH_RE.fullmatch(arch)    # fullmatch: "$" would accept a trailing newline
    if not match:
        raise ValueError(f"--arch must look like sm_90 or sm_90a, got {arch!r}")
    if int(match[1]) not in SUPPORTED_ARCHS:
        raise ValueError(f"--arch {arch}: not a target of this toolchain (supported: "
                         + ", ".join(f"sm_{a}" for a in SUPPORTED_ARCHS) + ")")
    if arch.endswith("a") and int(match[1]) < 90:
        raise ValueError(f"--arch {arch}: architecture-specific 'a' targets start at sm_90a")
    return arch


def ptx_version(arch: str) -> str:
    """The oldest PTX ISA that knows `arch` (sm_88 and sm_110 arrived with ISA 9.0)."""
    number = arch_number(arch)
    if number in (88, 110) or number > 121:
        return "9.0"
    return "8.0" if number < 100 else "8.8"


def ptx_header(arch: str) -> str:
    """`.version/.target/.address_size` lines for hand-written PTX. ISA 8.0 covers sm_90(a) and
    older; newer chips need a newer ISA, which nvJitLink 13.x accepts (we never JIT PTX)."""
    return f".version {ptx_version(arch)}\n.target {arch}\n.address_size 64\n\n"
