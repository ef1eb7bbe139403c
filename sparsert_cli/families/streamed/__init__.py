"""The streamed family: weights and tap offsets as compact data read by one short loop that
stays hot, activations reused through L1 by the rows of a block (see plan.py)."""

from __future__ import annotations

from ..base import Family
from .lower import lower
from .plan import (StreamParams, StreamPlan, build_plan, candidates, default_params,
                   fit_params, fits_arch)

from .tuning import estimate, features  # noqa: E402

FAMILY = Family(name="streamed", version="streamed-1", params=StreamParams, plan_type=StreamPlan,
                build_plan=build_plan, fit_params=fit_params, lower=lower,
                default_params=default_params, candidates=candidates, features=features,
                estimate=estimate, fits=fits_arch)

__all__ = ["FAMILY", "StreamParams", "StreamPlan", "build_plan", "candidates", "default_params",
           "estimate", "features", "fit_params", "lower"]
