"""The cost model: a layer's time predicted from its plan's cost features, linear in a few
per-GPU coefficients; it picks the untuned plan ("auto") across every kernel family.

    us = launch·launches + fetch·(code bytes per SM) + flop·flops + dram·(DRAM bytes)
         + l2·(L2 -> SM bytes) + issue·(longest thread's instructions x waves)

Families report the features (Family.features / Family.estimate, e.g. families/immediate/
tuning.py); `terms` turns them into the model's terms for a GPU's SM count. The coefficients
live in sparsert_cli/data/costmodel.json keyed by GPU name; GPUs it does not name get the
"fallback" entry, derived from the H100 floors of docs/perf-notes.md. `sparsert tunedb
calibrate` fits them to every measurement in a tuning database (non-negative least squares on
relative error). A sum of floors overestimates where the hardware overlaps them (loads under
instruction fetch): the fitted coefficients absorb that, the fallback does not.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .errors import UserError
from .problem_shape import PRECISIONS, Epilogue, Geometry

COEFFICIENTS_PATH = Path(__file__).parent / "data" / "costmodel.json"
SCHEMA = 1
FALLBACK = "fallback"
TERMS = ("launch", "fetch", "flop", "dram", "l2", "issue")
# What Family.features must report (numbers; more keys are kept in the database, unused here).
FEATURES = ("launches", "blocks", "threads_per_block", "fetched_code_bytes",
            "max_block_code_bytes", "flops", "dram_bytes", "l2_bytes", "serial_instructions")
MAX_THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32
CHOOSE_LIMIT = 32        # candidates per family the model ranks
FIT_SPARE = 8            # candidates asked for beyond the limit, for those a target cannot hold
# A family registered after the first (the immediate family) is chosen only when predicted at
# least this much faster: run S6-6's misses were near-ties the model called the other way
# (rn50_c4_reduce fp32: streamed 4.89 us predicted against immediate 5.03, measured 5.93
# against 4.14; rn50_c3_reduce, mbv1_pw6 likewise), while every layer the streamed family wins
# is predicted 9% or more ahead (mbv1_pw11 fp16: 4.21 against 4.52 us).
OTHER_FAMILY_MARGIN = 1.05
# Code that runs once reaches an SM at ~3.2 GB/s (H100, issue 10's measurements: 3.0-3.4 GB/s per
# SM whatever the warps or code streams), so a straight-line kernel's block cannot finish before
# its own code has arrived: the floor that choose() holds such families' predictions to.
FETCH_BYTES_PER_US = 3.2e3
# ... when one SM alone runs a block's code. Where several blocks run the same code (the
# immediate family's column tiles of one row group: features' "code_sharers"), it arrives
# faster: H100 tuning runs (paper20 fp32 and fp16 at 90%, S16/S17; bf16 S18-2), the largest
# block's code over (time - launch) reached at most 5.0 GB/s per SM with one tile (163 plans),
# but up to 9.8 with two tiles, 9.0 with 3-7 and 13.0 with 8 or more (203 plans; 111 of them
# ran faster than the 3.2 GB/s floor allows, e.g. bf16 rn50_c3_reduce r2v4t128: 15 KB of code
# a block, 2.79 us against a 5.56 us floor). Shared code is held to this many times the rate.
SHARED_FETCH_FACTOR = 4.0
# A streamed worker walks its entries as a chain: 32 at a time, each chunk a dependent table
# load plus its 32 activation loads and FMAs. On pruned rows (max/mean row nonzeros 5-14) the
# longest worker sets the kernel's time, which the linear fit (made on uniform patterns)
# misses: H100 run S5-8, mbv1_pw12 (one row per worker, ~710 entries) 12.0 us streamed against
# 8.2 us immediate. Held to launch + 0.025 us per entry of the longest worker, the family pick
# matched the better default on every pruned MobileNet layer but one and changed no paper20
# pick but one (for the better): docs/perf-notes.md, session 5 (one scalar, chosen on those
# 76 cases: 0.025-0.03 gave the same picks, 0.04 worse).
ENTRY_LATENCY_US = 0.025


def fetch_floor_us(features: dict, launch_us: float,
                   bytes_per_us: float = FETCH_BYTES_PER_US) -> float:
    """launch + the largest block's code at the fetch rate of code that runs once (a GPU entry
    may carry its own measured `fetch_bytes_per_us`; the default is the H100's), or
    SHARED_FETCH_FACTOR times that rate where several blocks run each block's code
    (features' "code_sharers" > 1)."""
    if float(features.get("code_sharers", 1.0)) > 1:
        bytes_per_us *= SHARED_FETCH_FACTOR
    return launch_us + float(features.get("max_block_code_bytes", 0.0)) / bytes_per_us


def chain_floor_us(features: dict, launch_us: float, entry_us: float | None = None) -> float:
    """launch + the longest worker's table entries at ENTRY_LATENCY_US each: the chain bound of
    families whose workers walk their entries in order (features with `max_worker_entries`)."""
    per_entry = ENTRY_LATENCY_US if entry_us is None else entry_us
    return launch_us + float(features.get("max_worker_entries", 0.0)) * per_entry


def _predicted(features: dict, entry: dict, family) -> float:
    """The model's time for one plan of `family` (a Family, or a name: no floor then), held to
    the fetch floor where the family's code runs once, and to the chain bound where its
    features give the longest worker's entries. A plan whose features carry "throughput_us"
    (the immediate family's batch-32 floors, families/immediate/tuning.py) is predicted as
    launch + that instead."""
    coefs = family_coefficients(entry, getattr(family, "name", family))
    if "throughput_us" in features:   # throughput layers: the fit (batch 1) extrapolates badly
        return float(coefs[0]) + float(features["throughput_us"])
    predicted = float(terms(features, int(entry["sms"])) @ coefs)
    if getattr(family, "code_runs_once", False):   # the linear fit can fall below this floor
        predicted = max(predicted, fetch_floor_us(
            features, float(coefs[0]), float(entry.get("fetch_bytes_per_us", FETCH_BYTES_PER_US))))
    if "max_worker_entries" in features and not isinstance(family, str):
        predicted = max(predicted, chain_floor_us(features, float(coefs[0])))
    return predicted


def terms(features: dict, sms: int) -> np.ndarray:
    """The model's terms (TERMS order) of one plan's features on a GPU with `sms` SMs. Code runs
    once per block: an SM fetches its share of every block's code, and at least one block's."""
    missing = [name for name in FEATURES if name not in features]
    if missing:
        raise ValueError(f"cost features lack {', '.join(missing)}")
    f = {name: float(features[name]) for name in FEATURES}
    resident = max(1, min(MAX_BLOCKS_PER_SM, MAX_THREADS_PER_SM // max(1, f["threads_per_block"])))
    waves = math.ceil(f["blocks"] / (sms * resident)) if f["blocks"] else 1
    return np.array([f["launches"], max(f["fetched_code_bytes"] / sms, f["max_block_code_bytes"]),
                     f["flops"], f["dram_bytes"], f["l2_bytes"],
                     f["serial_instructions"] * waves])


# ---- coefficients ------------------------------------------------------------------------------
def load_coefficients(path: str | Path | None = None) -> dict[str, dict]:
    """{gpu name: {"sms": int, "coefficients": {term: us per unit}, ...}} of a coefficients
    file (default: the shipped one). A malformed file is one line naming it."""
    return _load(str(path or COEFFICIENTS_PATH))


@lru_cache(maxsize=8)
def _load(path: str) -> dict[str, dict]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such cost-model file") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise UserError(f"{path}: not a cost-model JSON file ({str(exc).splitlines()[0]})"
                        ) from None
    gpus = doc.get("gpus") if isinstance(doc, dict) else None
    if not isinstance(gpus, dict) or doc.get("schema") != SCHEMA:
        raise UserError(f"{path}: not a cost-model file (expected schema {SCHEMA} and a 'gpus' "
                        f"mapping)")
    for name, entry in gpus.items():
        coefs = entry.get("coefficients") if isinstance(entry, dict) else None
        sms = entry.get("sms") if isinstance(entry, dict) else None
        if (not isinstance(coefs, dict) or set(coefs) != set(TERMS)
                or not all(_number(v) and v >= 0 for v in coefs.values())
                or not (_number(sms) and sms >= 1)):
            raise UserError(f"{path}: GPU {name!r} needs 'sms' (>= 1) and 'coefficients' with "
                            f"non-negative {', '.join(TERMS)}")
        for family, own in (entry.get("families") or {}).items():
            own = own.get("coefficients") if isinstance(own, dict) else None
            if (not isinstance(own, dict) or set(own) != set(TERMS)
                    or not all(_number(v) and v >= 0 for v in own.values())):
                raise UserError(f"{path}: GPU {name!r}, family {family!r}: 'coefficients' needs "
                                f"non-negative {', '.join(TERMS)}")
    return gpus


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def coefficients_for(gpu_name: str | None = None, path: str | Path | None = None
                     ) -> tuple[str, dict]:
    """(entry name, entry) for a GPU: its own, else the fallback. gpu_name None: this machine's
    GPU (the H100's name without a driver)."""
    gpus = load_coefficients(path)
    if gpu_name is None:
        from .gpu.runtime import detect_gpu_name
        gpu_name = detect_gpu_name()
    name = gpu_name if gpu_name in gpus else FALLBACK
    if name not in gpus:
        raise UserError(f"{path or COEFFICIENTS_PATH}: no entry for {gpu_name!r} and no "
                        f"{FALLBACK!r} entry")
    return name, gpus[name]


def family_coefficients(entry: dict, family: str | None) -> np.ndarray:
    """The coefficients (TERMS order) an entry has for `family`: its own fit when the entry
    holds one ("families"), else the entry's shared ones."""
    own = (entry.get("families") or {}).get(family) if family else None
    return np.array([(own or entry)["coefficients"][t] for t in TERMS])


def predict_features(features: dict, gpu_name: str | None = None,
                     path: str | Path | None = None, family: str | None = None) -> float:
    """Predicted microseconds of a plan of `family` with these cost features on `gpu_name`."""
    from .families import families

    _, entry = coefficients_for(gpu_name, path)
    return _predicted(features, entry, next((f for f in families() if f.name == family), family))


def predict_us(plan, gpu_name: str | None = None, path: str | Path | None = None) -> float:
    """Predicted microseconds of a built plan (any family with a features hook)."""
    from .families import family_of

    family = family_of(plan)
    if family.features is None:
        raise UserError(f"the {family.name} family reports no cost features")
    return predict_features(family.features(plan), gpu_name, path, family.name)


# ---- choosing ----------------------------------------------------------------------------------
def choose(geometry: Geometry, csr, precision: str = "fp32", gpu_name: str | None = None,
           families=None, limit: int = CHOOSE_LIMIT, path: str | Path | None = None,
           arch: str | None = None):
    """(family, params) of the lowest predicted time (default: every registered family that can
    choose, in registration order; the predictions of every family after the pool's first
    count OTHER_FAMILY_MARGIN slower; ties: the earlier family in the pool, then its earlier
    candidate). Features come from
    each family's cheap estimate where it has one (exact: the planner's own grouping, without
    building the plan); otherwise the candidate is planned (~0.1-1 s for 236k nonzeros).

    With per-family coefficients (a GPU entry's "families", fitted by `tunedb calibrate` from a
    tuning run of both families) each family's *rule default* is ranked, not its whole candidate
    list (`limit` = 1): on the H100's run-4 database (docs/perf-notes.md) the linear model picks
    the family well but ranks plans inside the immediate family worse than its rules do
    (geomean 1.23x the best against 1.13x).

    `arch`: rank only the candidates a block of that target holds (a family's `fits`; e.g. the
    streamed tile stage's image on sm_86, 99 KB a block), so a default too large for the target
    gives way to the family's next candidate."""
    from . import families as registry

    dtype, accumulate = PRECISIONS[precision]
    pool = [f for f in (registry.families() if families is None else families) if f.choosable]
    if not pool:
        names = ", ".join(f.name for f in (families or ())) or "none"
        raise UserError(f"no kernel family here can choose plans on its own ({names}: no cost "
                        f"model hooks); give the family's plan parameters")
    csr = sp.csr_matrix(csr, dtype=np.float32)
    csr.sort_indices()
    csr.eliminate_zeros()
    _, entry = coefficients_for(gpu_name, path)
    if entry.get("families"):
        limit = 1
    best, errors = None, []
    for order, family in enumerate(pool):
        tries = family.candidates(geometry, int(csr.nnz), precision=precision,
                                  limit=limit if arch is None or family.fits is None
                                  else limit + FIT_SPARE)
        if arch is not None and family.fits is not None:
            tries = [p for p in tries if family.fits(geometry, p, arch)][:limit]
        for index, params in enumerate(tries):
            try:
                if index == 0 and family.refine_default is not None:
                    params = family.refine_default(geometry, csr, params, precision)
                if family.estimate is not None:
                    features = family.estimate(geometry, csr, params, precision)
                else:
                    features = family.features(family.build_plan(
                        csr, geometry, params, Epilogue(), dtype, accumulate))
            except UserError as exc:      # a candidate that does not fit this layer
                errors.append(exc.message)
                continue
            margin = 1.0 if order == 0 else OTHER_FAMILY_MARGIN
            key = (_predicted(features, entry, family) * margin, order, index)
            if best is None or key < best[0]:
                best = (key, family, params)
    if best is None:
        raise UserError(f"no candidate plan fits this layer ({errors[0] if errors else 'none'})")
    return best[1], best[2]


# ---- calibration -------------------------------------------------------------------------------
def fit(samples: list[tuple[dict, float]], sms: int, ratios: dict | None = None
        ) -> tuple[dict[str, float], dict]:
    """Coefficients (non-negative least squares on relative error: every layer counts alike,
    small or large) of `samples` = [(features, measured us)], and the fit's quality. With
    `ratios` (coefficients, e.g. the fallback's) only the launch term and one scale of the other
    terms are fitted, keeping their ratios: for measurements that vary the plan too little to
    pin every term (a full fit then extrapolates badly to plans nobody measured)."""
    from scipy.optimize import nnls

    need = 2 if ratios else len(TERMS)
    if len(samples) < need:
        raise UserError(f"calibration needs at least {need} measurements with cost "
                        f"features, got {len(samples)}")
    rows = np.array([terms(f, sms) for f, _ in samples])
    us = np.array([t for _, t in samples], dtype=np.float64)
    if ratios:
        shape = np.array([0.0] + [ratios[t] for t in TERMS[1:]])
        design = np.stack([rows[:, 0], rows @ shape], axis=1)
    else:
        design = rows
    scale = design.max(axis=0)
    scale[scale == 0] = 1.0                      # an unused term keeps coefficient 0
    solution, _ = nnls(design / scale / us[:, None], np.ones(len(us)),
                       maxiter=50 * len(TERMS))
    solution = solution / scale
    coefs = (np.concatenate([[solution[0]], solution[1] * shape[1:]]) if ratios
             else solution)
    errors = np.abs(rows @ coefs - us) / us
    quality = {"samples": len(us), "median_rel_error": float(np.median(errors)),
               "p90_rel_error": float(np.percentile(errors, 90)),
               "max_rel_error": float(errors.max())}
    return {t: float(c) for t, c in zip(TERMS, coefs)}, quality


def calibration_samples(rows: list[dict], gpu_name: str, where: str, family: str | None = None
                        ) -> tuple[list[tuple[dict, float]], int, int]:
    """(samples, SM count, rows without features) of tuning-database rows (tunedb.latest of
    them) for one GPU: every verified, timed measurement that stored its cost features.
    `where` names the database in errors."""
    names = sorted({r["gpu_name"] for r in rows})
    rows = [r for r in rows if r["gpu_name"] == gpu_name and r["verified"]
            and r["median_us"] is not None and r["median_us"] > 0
            and (family is None or r.get("family") == family)]
    if not rows:
        raise UserError(f"{where}: no verified measurements on {gpu_name!r} (GPUs in it: "
                        f"{', '.join(names) or 'none'})")
    samples, bare = [], 0
    for r in rows:
        try:
            features = json.loads(r.get("features_json") or "null")
        except ValueError:
            features = None
        if not isinstance(features, dict) or not all(_number(features.get(k))
                                                     for k in FEATURES):
            bare += 1
            continue
        samples.append((features, float(r["median_us"])))
    sms = [r["sm_count"] for r in rows if r.get("sm_count")]
    return samples, max(set(sms), key=sms.count) if sms else 132, bare


def calibrate(rows: list[dict], gpu_name: str, where: str, ratios: dict | None = None
              ) -> tuple[dict, int]:
    """(cost-model entry, rows without features) fitted to tuning-database rows (tunedb.latest
    of them) for one GPU: coefficients over every family, and each family measured enough
    (4 samples per term) its own ("families", when more than one is). What `sparsert tunedb
    calibrate` writes; scripts/defaults_eval.py fits the same way, leaving layers out."""
    samples, sms, bare = calibration_samples(rows, gpu_name, where)
    if not samples:
        raise UserError(f"{where}: none of the {bare} verified measurements on {gpu_name!r} "
                        f"stored cost features (measured by an older sparsert: tune again)")
    coefs, quality = fit(samples, sms, ratios)
    entry = {"sms": sms, "coefficients": coefs, "fit": quality}
    families = {}
    for family in sorted({r.get("family") for r in rows if r.get("family")}):
        own, _, _ = calibration_samples(rows, gpu_name, where, family)
        if len(own) >= 4 * len(TERMS):
            fam_coefs, fam_quality = fit(own, sms, ratios)
            families[family] = {"coefficients": fam_coefs, "fit": fam_quality}
    if len(families) > 1:
        entry["families"] = families
    return entry, bare


def save_entry(path: str | Path, gpu_name: str, entry: dict) -> None:
    """Write `entry` for `gpu_name` into a coefficients file (its other GPUs kept; a new file
    gets the shipped fallback too, so it can stand alone)."""
    path = Path(path)
    gpus = dict(load_coefficients(path)) if path.exists() else {
        FALLBACK: load_coefficients()[FALLBACK]}
    gpus[gpu_name] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema": SCHEMA, "terms": list(TERMS),
                                "gpus": dict(sorted(gpus.items()))}, indent=1) + "\n")
    _load.cache_clear()
