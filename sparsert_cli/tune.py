"""Tuned plans as data: candidate plan parameters per layer, and the database of winners
(configs/tuned.json) keyed by (pattern hash, shape, GPU, precision, kernel family@version) and
reused by `gen`, `bench` and compile_kernel(plan="auto"). The tuning loop is jobs.py +
executors/."""

from __future__ import annotations

import datetime
import json
from dataclasses import fields
from pathlib import Path

from .build import code_version, current_family
from .errors import UserError
from .families import families, get_family
from .families.base import params_key
from .families.immediate import PlanParams
from .families.immediate import candidates as immediate_candidates
from .paths import SHIPPED_TUNED
from .problem_shape import Geometry

TUNED_PATH = SHIPPED_TUNED


def shape_key(geometry: Geometry) -> str:
    """The layer shape part of a key: the best plan depends on N as much as on the pattern."""
    g = geometry
    return (f"b{g.batch}c{g.in_channels}h{g.height}w{g.width}m{g.out_channels}"
            f"k{g.kernel}s{g.stride}p{g.padding}")


SCHEMA = 2        # 2: keys end in |<family>@<version>; 1: four-part keys (migrate_entries)
# Defaults of keys: the code `tune` measures and `bench`/`gen` emit by default (PTX printer).
FAMILY, FAMILY_VERSION = current_family("ptx")


def entry_key(pattern_hash: str, shape: str, gpu_name: str, precision: str, family: str,
              version: str) -> str:
    """A tuned-plan key: the one format, used by TunedDB and by the tuning database's export."""
    return f"{pattern_hash}|{shape}|{gpu_name}|{precision}|{family}@{version}"


def migrate_entries(entries: dict, family: str = FAMILY, version: str = FAMILY_VERSION) -> dict:
    """Schema-1 keys (pattern|shape|gpu|precision) -> schema-2 keys with `family@version`
    appended. For a one-off migration when the family's code did not change: a schema-1 winner
    was measured with the code `version` stands for. Schema-2 keys pass through unchanged."""
    out = {}
    for key, entry in entries.items():
        out[key if key.count("|") == 4 else f"{key}|{family}@{version}"] = entry
    return out


class TunedDB:
    """{"schema": 2, "entries": {"<pattern hash>|<shape>|<gpu>|<precision>|<family>@<version>":
    {"params": {...}, "us": ..}}}

    Keyed by pattern *and* shape: the same weights at batch 1 and batch 32 want different plans;
    and by the kernel family's version: a winner measured with other generated code is never
    reused (it is ignored on lookup and replaced when the layer is tuned again).
    """

    def __init__(self, path: Path = TUNED_PATH):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        if self.path.exists():
            try:
                doc = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError) as exc:
                raise UserError(f"{self.path}: not a valid tuned-plan database "
                                f"({str(exc).splitlines()[0] or type(exc).__name__})") from None
            self.entries = _entries(doc, self.path)

    @staticmethod
    def key(pattern_hash: str, geometry: Geometry, gpu_name: str, dtype: str,
            family: str = FAMILY, version: str = FAMILY_VERSION) -> str:
        return entry_key(pattern_hash, shape_key(geometry), gpu_name, dtype, family, version)

    def lookup(self, pattern_hash: str, geometry: Geometry, gpu_name: str, dtype: str,
               family: str = FAMILY, version: str = FAMILY_VERSION):
        """The winner's parameters for this layer and this version of the family, or None (an
        entry of another version, or of schema 1, does not match)."""
        found = self._entry(pattern_hash, geometry, gpu_name, dtype, family, version)
        return found[0] if found else None

    def _entry(self, pattern_hash, geometry, gpu_name, dtype, family, version):
        entry = self.entries.get(self.key(pattern_hash, geometry, gpu_name, dtype, family,
                                          version))
        if not entry:
            return None
        try:
            params = get_family(family).params.from_dict(entry["params"])
        except (UserError, KeyError, TypeError, AttributeError):
            return None   # written by an older version with other parameters: retune
        us = entry.get("us")
        return params, us if isinstance(us, (int, float)) and not isinstance(us, bool) \
            else float("inf")

    def best(self, pattern_hash: str, geometry: Geometry, gpu_name: str, dtype: str,
             emitter: str = "ptx", only: str = "auto"):
        """(family, params) of the fastest current winner for this layer over every registered
        family (or `only` that one), each looked up under its current code version; None when
        no family has one. Ties go to the family registered first."""
        found = []
        for order, family in enumerate(families() if only == "auto" else (get_family(only),)):
            hit = self._entry(pattern_hash, geometry, gpu_name, dtype, family.name,
                              code_version(family, emitter))
            if hit:
                found.append((hit[1], order, family, hit[0]))
        if not found:
            return None
        _, _, family, params = min(found, key=lambda t: t[:2])
        return family, params

    def record(self, pattern_hash: str, geometry: Geometry, gpu_name: str, dtype: str,
               params, info: dict, family: str = FAMILY,
               version: str = FAMILY_VERSION) -> None:
        """Store a winner under this code version (other versions' entries stay, unused: a
        layer tuned with the CUDA printer and with the PTX printer has one winner for each)."""
        key = self.key(pattern_hash, geometry, gpu_name, dtype, family, version)
        self.entries[key] = {
            "params": params_key(params), **info,
            "tuned_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"schema": SCHEMA, "entries": dict(sorted(self.entries.items()))}
        self.path.write_text(json.dumps(doc, indent=1) + "\n")


def _entries(doc: object, path: Path) -> dict[str, dict]:
    """The entries of a loaded database, refusing a wrong shape or wrong-typed plan values
    (unknown parameter names are kept: lookup treats them as an older version's, to retune)."""
    entries = doc.get("entries", {}) if isinstance(doc, dict) else None
    if not isinstance(entries, dict):
        raise UserError(f"{path}: not a valid tuned-plan database (expected an object whose "
                        f"'entries' maps keys to entries)")
    types = {f.name: (str if f.name in PlanParams.TEXT else int) for f in fields(PlanParams)}
    for key, entry in entries.items():
        params = entry.get("params") if isinstance(entry, dict) else None
        if not isinstance(params, dict):
            raise UserError(f"{path}: entry {key!r} has no 'params' mapping")
        for name, value in params.items():
            want = types.get(name)
            if want and (isinstance(value, bool) or not isinstance(value, want)):
                raise UserError(f"{path}: entry {key!r}: plan parameter {name!r} must be "
                                f"{want.__name__}, got {value!r}")
    return dict(entries)


def candidates(geometry: Geometry, nnz: int, limit: int = 16, precision: str = "fp32",
               seeds: tuple[PlanParams, ...] = ()) -> list[PlanParams]:
    """The immediate family's candidates (families/immediate/tuning.py; the tuner takes every
    family's through jobs.case_candidates)."""
    return immediate_candidates(geometry, nnz, precision, limit, seeds)
