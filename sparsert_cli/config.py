"""Benchmark configs (configs/*.yaml): which problems, at which sparsities, with which options.

Every error names the file, the key and what is wrong, on one line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .errors import UserError
from .paths import CONFIG_DIR, config_path  # noqa: F401 - CONFIG_DIR re-exported
from .problem_shape import ACTIVATIONS, DTYPES, default_accumulate
from .problems import (Problem, builtin_problem, builtin_problems, load_yaml,
                       problem_from_dict, valid_name)


ACCUMULATES = ("fp32", "fp16")        # sum registers (fp16: half2 FMAs, fp16 data only)
PATTERNS = ("uniform", "pruned")
EMITTERS = ("ptx", "cuda")

_TOP_KEYS = {"name", "description", "problems", "sparsity", "dtype", "accumulate", "batch",
             "pattern", "seed", "emit", "epilogue", "plan", "kind", "allow_fp16_flush",
             "family"}
RESULT_KINDS = ("bench", "sweep")        # what `bench` stamps on the results file
_EPILOGUE_KEYS = {"bias", "activation", "residual"}


@dataclass(frozen=True)
class EpilogueSpec:
    bias: bool = False
    activation: str = "none"
    residual: bool = False

    def is_identity(self) -> bool:
        return not self.bias and self.activation == "none" and not self.residual


@dataclass(frozen=True)
class Config:
    name: str
    path: str
    problems: tuple[Problem, ...]
    sparsities: tuple[float, ...]
    dtype: str = "fp32"
    accumulate: str = "fp32"
    pattern: str = "uniform"
    seed: int = 0
    emit: str = "ptx"
    epilogue: EpilogueSpec = EpilogueSpec()
    plan: dict = field(default_factory=dict)
    description: str = ""
    kind: str = "bench"
    allow_fp16_flush: bool = False     # fp16: drop weights that round to zero instead of failing
    family: str = "auto"               # kernel family: auto (every family competes) or a name

    @property
    def precision(self) -> str:
        from .problem_shape import precision_label

        return precision_label(self.dtype, self.accumulate)

    def cases(self) -> list[tuple[Problem, float]]:
        return [(p, s) for p in self.problems for s in self.sparsities]

    def digest(self) -> str:
        """A short hash of everything that decides the results (for result metadata)."""
        doc = {"problems": [p.__dict__ for p in self.problems], "sparsities": self.sparsities,
               "dtype": self.dtype, "accumulate": self.accumulate, "pattern": self.pattern,
               "seed": self.seed, "emit": self.emit, "epilogue": self.epilogue.__dict__, "plan": self.plan}
        if self.allow_fp16_flush:      # only when set: older results keep their digests
            doc["allow_fp16_flush"] = True
        if self.family != "auto":
            doc["family"] = self.family
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def check_sparsity(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}: sparsity must be a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise UserError(f"{where}: sparsity must be in [0, 1), got {value}")
    return float(value)


def _choice(doc: dict, key: str, choices: tuple[str, ...], default: str, where: str) -> str:
    value = doc.get(key, default)
    if value not in choices:
        raise UserError(f"{where}: '{key}' must be one of {', '.join(choices)}, got {value!r}")
    return value


def _epilogue(doc: object, where: str) -> EpilogueSpec:
    if doc is None:
        return EpilogueSpec()
    if not isinstance(doc, dict):
        raise UserError(f"{where}: 'epilogue' must be a mapping")
    unknown = sorted(set(doc) - _EPILOGUE_KEYS, key=str)
    if unknown:
        raise UserError(f"{where}: unknown key 'epilogue.{unknown[0]}' "
                        f"(allowed: {', '.join(sorted(_EPILOGUE_KEYS))})")
    for key in ("bias", "residual"):
        if not isinstance(doc.get(key, False), bool):
            raise UserError(f"{where}: 'epilogue.{key}' must be true or false")
    return EpilogueSpec(bias=doc.get("bias", False),
                        activation=_choice(doc, "activation", ACTIVATIONS, "none",
                                           f"{where} (epilogue)"),
                        residual=doc.get("residual", False))


def _problems(doc: object, where: str) -> tuple[Problem, ...]:
    if doc == "all":
        return tuple(builtin_problems().values())
    if not isinstance(doc, list) or not doc:
        raise UserError(f"{where}: 'problems' must be a non-empty list (ids or inline specs) "
                        f"or 'all'")
    problems: list[Problem] = []
    for i, item in enumerate(doc):
        if isinstance(item, str):
            problem = builtin_problem(item)
            if problem is None:
                raise UserError(f"{where}: problems[{i}]: unknown problem id {item!r}")
            problems.append(problem)
        else:
            problem = problem_from_dict(item, f"{where}: problems[{i}]")
            if problem.weights and not Path(problem.weights).is_absolute():
                # weights files are named relative to the config, as a reader expects
                problem = replace(problem, weights=str(Path(where).parent / problem.weights))
            problems.append(problem)
    ids = [p.id for p in problems]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise UserError(f"{where}: problem {dupes[0]!r} is listed twice")
    return tuple(problems)


def _plan_overrides(doc: object, where: str, family: str = "auto") -> dict:
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise UserError(f"{where}: 'plan' must be a mapping of plan parameters")
    from .families import check_overrides, families

    allowed = {x.name for f in families() for x in fields(f.params)}
    unknown = sorted(set(doc) - allowed, key=str)
    if unknown:
        raise UserError(f"{where}: unknown key 'plan.{unknown[0]}' "
                        f"(allowed: {', '.join(sorted(allowed))})")
    try:
        check_overrides(doc, family)
    except UserError as exc:
        raise UserError(f"{where}: 'plan': {exc.message}") from None
    return dict(doc)


def config_from_dict(doc: object, where: str) -> Config:
    if not isinstance(doc, dict):
        raise UserError(f"{where}: a config must be a YAML mapping")
    unknown = sorted(set(doc) - _TOP_KEYS, key=str)
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}' (allowed: {', '.join(sorted(_TOP_KEYS))})")
    for key in ("problems", "sparsity"):
        if key not in doc:
            raise UserError(f"{where}: missing field '{key}'")
    problems = _problems(doc["problems"], where)
    raw = doc["sparsity"] if isinstance(doc["sparsity"], list) else [doc["sparsity"]]
    if not raw:
        raise UserError(f"{where}: 'sparsity' must list at least one value")
    sparsities = tuple(check_sparsity(s, f"{where}: sparsity") for s in raw)
    if len(set(sparsities)) != len(sparsities):
        raise UserError(f"{where}: 'sparsity' lists a value twice")
    batch = doc.get("batch")
    if batch is not None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
            raise UserError(f"{where}: 'batch' must be a positive integer, got {batch!r}")
        problems = tuple(p.with_batch(batch).validate(f"{where}: batch {batch}")
                         for p in problems)
    seed = doc.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"{where}: 'seed' must be a non-negative integer, got {seed!r}")
    name = doc.get("name", Path(where).stem)
    if not valid_name(name):
        raise UserError(f"{where}: 'name' must be up to 100 letters, digits, _ . - (it names "
                        f"result files), got {name!r}")
    dtype = _choice(doc, "dtype", DTYPES, "fp32", where)
    accumulate = _choice(doc, "accumulate", ACCUMULATES, default_accumulate(dtype), where)
    if accumulate == "fp16" and dtype != "fp16":
        raise UserError(f"{where}: 'accumulate: fp16' needs 'dtype: fp16' ({dtype} data is summed "
                        f"in fp32)")
    emit = _choice(doc, "emit", EMITTERS, "ptx", where)
    flush = doc.get("allow_fp16_flush", False)
    if not isinstance(flush, bool):
        raise UserError(f"{where}: 'allow_fp16_flush' must be true or false, got {flush!r}")
    family = doc.get("family", "auto")
    if family != "auto":
        from .families import families
        names = [f.name for f in families()]
        if family not in names:
            raise UserError(f"{where}: 'family' must be auto or one of {', '.join(names)}, "
                            f"got {family!r}")
    return Config(name=name, path=where, problems=problems, sparsities=sparsities, family=family,
                  dtype=dtype, accumulate=accumulate,
                  pattern=_choice(doc, "pattern", PATTERNS, "uniform", where), seed=seed,
                  emit=emit,
                  epilogue=_epilogue(doc.get("epilogue"), where),
                  plan=_plan_overrides(doc.get("plan"), where, family),
                  description=str(doc.get("description", "")),
                  kind=_choice(doc, "kind", RESULT_KINDS, "bench", where), allow_fp16_flush=flush)


def load_config(path: str | Path) -> Config:
    path = config_path(path)    # `sparsert bench ci` means the shipped configs/ci.yaml
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a config file")
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    return config_from_dict(load_yaml(path), str(path))
