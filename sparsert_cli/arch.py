"""GPU architecture names in one place: the default target, what the toolchain supports, and
parsing `sm_XX[a]`. Detecting the local GPU's arch is the device's job (gpu/runtime.py)."""

from __future__ import annotations

import re

DEFAULT_ARCH = "sm_90"
_ARCH_RE = re.compile(r"^sm_(\d{2,3})a?$")
# What NVRTC/nvJitLink 13.x can target (nvrtcGetSupportedArchs); sm_XXa variants too.
SUPPORTED_ARCHS = (75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121)


def arch_number(arch: str) -> int:
    """sm_90a -> 90."""
    return int(arch[3:].rstrip("a"))


def check_arch(arch: str) -> str:
    match = _ARCH_RE.match(arch)
    if not match:
        raise ValueError(f"--arch must look like sm_90 or sm_90a, got {arch!r}")
    if int(match[1]) not in SUPPORTED_ARCHS:
        raise ValueError(f"--arch {arch}: not a target of this toolchain (supported: "
                         + ", ".join(f"sm_{a}" for a in SUPPORTED_ARCHS) + ")")
    if arch.endswith("a") and int(match[1]) < 90:
        raise ValueError(f"--arch {arch}: architecture-specific 'a' targets start at sm_90a")
    return arch
