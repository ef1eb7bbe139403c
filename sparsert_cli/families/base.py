"""What every kernel family provides (see families/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..ir import KernelIR


@dataclass(frozen=True)
class Family:
    """name: the registry key; version: changes whenever the family's emitted code changes (it
    enters cache and tuned-plan keys); params: the tunables dataclass; build_plan(csr, geometry,
    params, epilogue, dtype, accumulate) -> plan; fit_params(geometry, params, dtype) -> params;
    lower(plan) -> KernelIR; plan_type: the class of its plans."""

    name: str
    version: str
    params: type
    plan_type: type
    build_plan: Callable[..., Any]
    fit_params: Callable[..., Any]
    lower: Callable[[Any], KernelIR]
