"""What every kernel family provides (see families/__init__.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

from ..errors import UserError
from ..ir import KernelIR
from ..problem_shape import ACTIVATIONS, PRECISIONS, Epilogue, Geometry, precision_label


def check_layer(csr, geometry: Geometry, epilogue: Epilogue, dtype: str,
                accumulate: str | None) -> tuple[Geometry, str]:
    """What every family's planner checks first: (validated geometry, accumulator type; None:
    the storage type's default); the weight's shape, the activation and the bias length."""
    geometry = geometry.validate()
    accumulate = PRECISIONS[precision_label(dtype, accumulate)][1]
    if csr.shape != (geometry.out_channels, geometry.taps):
        raise UserError(f"weight is {csr.shape[0]}x{csr.shape[1]} but the shape needs "
                        f"{geometry.out_channels}x{geometry.taps}")
    if epilogue.activation not in ACTIVATIONS:
        raise UserError(f"unknown activation {epilogue.activation!r}")
    if epilogue.token_major and not (geometry.batch == 1 and geometry.height == 1
                                     and geometry.kernel == 1 and geometry.stride == 1
                                     and geometry.padding == 0):
        raise UserError("token-major output is for GEMM views (one K x N input), not "
                        "convolutions")
    if epilogue.planes and not (epilogue.token_major and epilogue.planes > 0
                                and geometry.out_channels % epilogue.planes == 0):
        raise UserError(f"planes={epilogue.planes} needs a token-major output whose "
                        f"{geometry.out_channels} rows it divides")
    if epilogue.bias is not None and len(epilogue.bias) != geometry.out_channels:
        raise UserError(f"bias has {len(epilogue.bias)} values for {geometry.out_channels} rows")
    return geometry, accumulate


class Params:
    """Base of every family's frozen parameter dataclass: one-line range errors and a checked
    from_dict (ints, except the fields named in TEXT)."""

    TEXT: tuple[str, ...] = ()

    def key(self) -> dict:
        """The fields as stored in databases and digests (a family may leave out a newer field
        at its old default, so that plans made before it keep their keys)."""
        return asdict(self)

    def _checked(self, checks):
        for ok, message in checks:
            if not ok:
                raise UserError(f"plan parameter out of range: {message} ({self})")
        return self

    @classmethod
    def from_dict(cls, doc: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise UserError(f"unknown plan parameter '{unknown[0]}' (known: "
                            f"{', '.join(sorted(known))})")
        for key, value in doc.items():
            want = str if key in cls.TEXT else int
            if isinstance(value, bool) or not isinstance(value, want):
                raise UserError(f"plan parameter '{key}' must be {want.__name__}, got {value!r}")
        return cls(**doc).validate()


def params_key(params) -> dict:
    """What databases and digests store of a plan's parameters (Params.key; any other
    parameter dataclass: its fields)."""
    return params.key() if isinstance(params, Params) else asdict(params)


@dataclass(frozen=True)
class Family:
    """name: the registry key; version: changes whenever the family's emitted code changes (it
    enters cache and tuned-plan keys); params: the tunables dataclass (name(), validate(),
    from_dict()); build_plan(csr, geometry, params, epilogue, dtype, accumulate) -> plan;
    fit_params(geometry, params, dtype) -> params; lower(plan) -> KernelIR; plan_type: the class
    of its plans.

    Hooks for choosing plans (costmodel.py, the tuner); a family without them is planned only
    when named with explicit parameters:
    default_params(geometry, nnz, precision=...) -> params: its untuned rule default;
    candidates(geometry, nnz, precision=..., limit=...[, seeds=...]) -> [params]: what the tuner
    times and the cost model ranks (the default first; `seeds`, this family's winners at other
    precisions, passed only when there are some); features(plan) -> {name: float}: cost
    features (costmodel.FEATURES); estimate(geometry, csr, params, precision) -> the same
    features without building the plan (None: the cost model builds plans to get them).
    code_runs_once: its code is straight-line (each block fetches its own code once), so the cost
    model never predicts it below launch + a block's code at the measured fetch rate.
    refine_default(geometry, csr, params, precision) -> params: the default adjusted to the
    weight's pattern (the rule default sees only the nonzero count); the cost model applies it
    to the default before ranking (None: the default as is).
    fits(geometry, params, arch) -> bool: whether a block of `arch` can hold a kernel of these
    (fitted) parameters (its shared memory); the cost model ranks only candidates that fit the
    target (None: every plan fits every arch)."""

    name: str
    version: str
    params: type
    plan_type: type
    build_plan: Callable[..., Any]
    fit_params: Callable[..., Any]
    lower: Callable[[Any], KernelIR]
    default_params: Callable[..., Any] | None = None
    candidates: Callable[..., list] | None = None
    features: Callable[[Any], dict] | None = None
    estimate: Callable[..., dict] | None = None
    code_runs_once: bool = False
    refine_default: Callable[..., Any] | None = None
    fits: Callable[..., bool] | None = None

    @property
    def choosable(self) -> bool:
        """Whether the cost model and the tuner can make plans of this family on their own."""
        return None not in (self.default_params, self.candidates, self.features)
