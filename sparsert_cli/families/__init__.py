"""Kernel families: each is a folder holding its parameters, its planner and its lowering to the
kernel IR (ir.py), and nothing else; the printers (render/) and the CPU interpreter (interp.py)
are shared. A new strategy (streamed weights, tensor cores) is a new folder registered here.
"""

from __future__ import annotations

from dataclasses import fields

from ..errors import UserError
from ..ir import KernelIR
from .base import Family
from .immediate import FAMILY as IMMEDIATE
from .streamed import FAMILY as STREAMED

_REGISTRY: dict[str, Family] = {IMMEDIATE.name: IMMEDIATE, STREAMED.name: STREAMED}


def families() -> tuple[Family, ...]:
    """Every registered family, in registration order."""
    return tuple(_REGISTRY.values())


def get_family(name: str = "auto") -> Family:
    """The family called `name`; "auto": the immediate family (plans pick per layer)."""
    if name == "auto":
        return IMMEDIATE
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown kernel family {name!r} (known: auto, "
                        f"{', '.join(_REGISTRY)})") from None


def family_of(plan) -> Family:
    """The family whose planner made `plan`."""
    for family in _REGISTRY.values():
        if isinstance(plan, family.plan_type):
            return family
    raise TypeError(f"{type(plan).__name__} is no registered family's plan")


def family_of_params(params) -> Family:
    """The family whose parameters `params` are."""
    for family in _REGISTRY.values():
        if isinstance(params, family.params):
            return family
    raise TypeError(f"{type(params).__name__} is no registered family's parameters")


def check_overrides(doc: dict, family: str = "auto") -> None:
    """Plan parameter overrides that some family (or `family`) takes whole: names, types and
    ranges; one line otherwise."""
    pool = families() if family == "auto" else (get_family(family),)
    takers = [f for f in pool if set(doc) <= {x.name for x in fields(f.params)}]
    if not takers:
        known = "; ".join(f"{f.name}: {', '.join(x.name for x in fields(f.params))}" for f in pool)
        which = ("no family takes the", "together") if family == "auto" else (
            f"the {family} family takes no", "")
        raise UserError(f"{which[0]} plan parameter(s) {', '.join(sorted(map(str, doc)))}"
                        f"{' ' + which[1] if which[1] else ''} ({known})")
    errors = []
    for f in takers:
        try:
            f.params.from_dict({**f.params().__dict__, **doc})
            return
        except UserError as exc:
            errors.append(exc.message)
    raise UserError(errors[0])


def lower(plan, **options) -> KernelIR:
    """`plan` lowered to the kernel IR by its own family."""
    return family_of(plan).lower(plan, **options)


__all__ = ["Family", "check_overrides", "families", "family_of", "family_of_params", "get_family",
           "lower"]
