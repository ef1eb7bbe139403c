"""The activations a kernel's epilogue fuses, as torch computes them: a function (dense ops,
references) and a module (dense chains, ONNX layers). gelu is the exact one
(approximate="none"). Shared by fuse.py, residual.py and the checks (no import cycle)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATION_FUNCTIONS = {"relu": F.relu, "relu6": F.relu6, "gelu": F.gelu}
ACTIVATION_MODULES = {"relu": torch.nn.ReLU, "relu6": torch.nn.ReLU6, "gelu": torch.nn.GELU}


def activate(y: torch.Tensor, activation: str) -> torch.Tensor:
    """y through a kernel's fused activation ("none": y itself)."""
    return y if activation == "none" else ACTIVATION_FUNCTIONS[activation](y)


def activation_modules(activation: str) -> list[torch.nn.Module]:
    """The activation as a list of at most one module (to append to an nn.Sequential)."""
    return [] if activation == "none" else [ACTIVATION_MODULES[activation]()]
