"""The immediate family (SparseRT's): weights as instruction immediates, tap offsets as immediate
address offsets, one straight-line body per row group (and k-split slice)."""

from __future__ import annotations

from ..base import Family
from .lower import INLINE_LIMIT, lower
from .plan import Plan, PlanParams, build_plan, fit_params, fit_vector_width
from .tuning import candidates, code_units, default_params, estimate, features, refine_default

FAMILY = Family(name="immediate", version="immediate-1", params=PlanParams, plan_type=Plan,
                build_plan=build_plan, fit_params=fit_params, lower=lower,
                default_params=default_params, candidates=candidates, features=features,
                estimate=estimate, code_runs_once=True,
                refine_default=refine_default)

__all__ = ["FAMILY", "INLINE_LIMIT", "Plan", "PlanParams", "build_plan", "candidates",
           "code_units", "default_params", "estimate", "features", "fit_params",
           "fit_vector_width", "lower", "refine_default"]
