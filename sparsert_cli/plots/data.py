"""What each figure plots, as plain rows (no matplotlib); the CSV beside every figure holds them.

Every function takes `[(path, doc), ...]` as `results.load_results` returned them and raises
UserError naming the file when a document cannot give the figure what it needs.

Records the non-bench kinds must hold (the minimum each figure reads):

    tune:   {"kind": "tune", "schema": 2, "cases": [{"problem", "sparsity", "default_us",
             "best_us", "candidates": [{"plan", "median_us", "family"?}, ...]}, ...]}
    models: {"kind": "models", "schema": 2, "models": [{"name", "sparsert_us",
             "layers": [{"name", "sparsert_us" | "dense_us" | neither}, ...]}, ...]}
"""

from __future__ import annotations

import math

from ..errors import UserError
from ..report import COLUMNS

LABELS = dict(COLUMNS)
BASELINES = tuple(LABELS)


def geomean(values) -> float | None:
    values = [v for v in values if isinstance(v, (int, float)) and v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def percentiles(timing: dict) -> tuple[float, float, float]:
    """(median, p20, p80) in us: from the stored samples when there are any (numpy's linear
    percentiles, as the harness computes them), else the stored summary."""
    samples = sorted(s for s in timing.get("samples_us") or [] if isinstance(s, (int, float)))

    def pct(q):
        pos = (len(samples) - 1) * q / 100
        lo, hi = math.floor(pos), math.ceil(pos)
        return samples[lo] + (samples[hi] - samples[lo]) * (pos - lo)
    if samples:
        return pct(50), pct(20), pct(80)
    med = timing["median_us"]
    return med, timing.get("p20_us", med), timing.get("p80_us", med)


def timed(case: dict) -> dict | None:
    """The kernel's timing of a case verified on the GPU, else None (CPU-only or failed)."""
    verify = case.get("verify_gpu")
    mine = case.get("sparsert")
    if isinstance(verify, dict) and verify.get("ok") and isinstance(mine, dict) \
            and isinstance(mine.get("median_us"), (int, float)):
        return mine
    return None


def baseline_timing(case: dict, name: str) -> dict | None:
    b = (case.get("baselines") or {}).get(name)
    return b if isinstance(b, dict) and b.get("ok") and isinstance(b.get("median_us"),
                                                                   (int, float)) else None


def timed_cases(path, doc) -> list[dict]:
    cases = [c for c in doc["cases"] if timed(c)]
    if not cases:
        raise UserError(f"{path}: no case was timed on a GPU (a CPU-only run, or every case "
                        f"failed); nothing to plot")
    return cases


def _guard(paths, fn, *args):
    """Run a row builder; a document lacking fields is one line naming the file(s)."""
    try:
        return fn(*args)
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise UserError(f"{', '.join(map(str, paths))}: lacks the fields this figure reads "
                        f"({type(exc).__name__}: {exc})") from None


def pick_baselines(docs, wanted: tuple[str, ...] | None) -> list[str]:
    present = {n for _, d in docs for c in d["cases"] for n in (c.get("baselines") or {})}
    present |= {n for _, d in docs for c in d["cases"] for n in (c.get("speedup") or {})}
    names = [n for n in BASELINES if n in present]
    if wanted:
        missing = [n for n in wanted if n not in present]
        if missing:
            raise UserError(f"{docs[0][0]}: no {missing[0]} timings in these results "
                            f"(present: {', '.join(names) or 'none'})")
        names = [n for n in BASELINES if n in wanted]
    return names


def labels(docs) -> list[str]:
    """One short label per file: its config name, or the file name where names repeat."""
    names = [str((d.get("config") or {}).get("name") or p.stem) for p, d in docs]
    return [n if names.count(n) == 1 else p.stem for n, (p, _) in zip(names, docs)]


# ---- speedup vs sparsity ---------------------------------------------------------------------

def break_even(curve: list[tuple[float, float]]) -> tuple[float | None, str]:
    """The sparsity from which the geomean speedup stays >= 1, by log-linear interpolation
    between the last sparsity below 1 and the next one. (None, why) when it is not inside."""
    curve = sorted(curve)
    below = [i for i, (_, g) in enumerate(curve) if g < 1.0]
    if not below:
        return None, f"below range (>= 1 already at {curve[0][0]:g})"
    i = below[-1]
    if i == len(curve) - 1:
        return None, f"none (below 1 up to {curve[-1][0]:g})"
    (s0, g0), (s1, g1) = curve[i], curve[i + 1]
    return s0 + (0.0 - math.log(g0)) / (math.log(g1) - math.log(g0)) * (s1 - s0), "interpolated"


def speedup_rows(docs, wanted=None) -> dict:
    """Per-problem and geomean speedups per baseline and sparsity, and the break-even points."""
    seen: dict = {}
    points = []
    for path, doc in docs:
        for c in timed_cases(path, doc):
            key = (c["problem"], c.get("batch", 1), float(c["sparsity"]))
            if key in seen:
                raise UserError(f"{path}: {c['problem']} at {c['sparsity']:g} is also in "
                                f"{seen[key]}; plot one run per file set")
            seen[key] = path
            for name, value in (c.get("speedup") or {}).items():
                if isinstance(value, (int, float)) and value > 0:
                    points.append({"series": c["problem"], "baseline": name,
                                   "sparsity": float(c["sparsity"]), "speedup": value})
    sparsities = sorted({p["sparsity"] for p in points})
    if len(sparsities) < 2:
        raise UserError(f"{docs[0][0]}: speedup vs sparsity needs cases at two or more "
                        f"sparsities; these results have {len(sparsities)}")
    names = pick_baselines(docs, wanted)
    points = [p for p in points if p["baseline"] in names]
    means, even = [], []
    for name in names:
        curve = []
        for s in sparsities:
            g = geomean(p["speedup"] for p in points if p["baseline"] == name
                        and p["sparsity"] == s)
            if g:
                curve.append((s, g))
                means.append({"series": "geomean", "baseline": name, "sparsity": s,
                              "speedup": g})
        at, note = break_even(curve) if len(curve) >= 2 else (None, "too few points")
        even.append({"series": "break_even", "baseline": name, "sparsity": at,
                     "speedup": 1.0 if at is not None else None, "note": note})
    return {"baselines": names, "points": points, "geomean": means, "break_even": even}


# ---- per-layer bars --------------------------------------------------------------------------

def layer_rows(docs, wanted=None) -> dict:
    """Bars per case: sparsert of every file, then each baseline (from the first file that has
    it), with p20-p80 whiskers from the samples."""
    names = pick_baselines(docs, wanted)
    tags = labels(docs)
    cases: dict = {}
    for (path, doc), tag in zip(docs, tags):
        for c in timed_cases(path, doc):
            key = (c["problem"], float(c["sparsity"]))
            bars = cases.setdefault(key, {})
            series = "sparsert" if len(docs) == 1 else f"sparsert {tag}"
            bars[series] = percentiles(timed(c))
            for name in names:
                b = baseline_timing(c, name)
                if b and name not in bars:
                    bars[name] = percentiles(b)
    series = (["sparsert"] if len(docs) == 1 else [f"sparsert {t}" for t in tags]) + names
    rows = [{"problem": p, "sparsity": s, "series": name, "median_us": v[0], "p20_us": v[1],
             "p80_us": v[2]}
            for (p, s), bars in cases.items() for name in series if (v := bars.get(name))]
    return {"series": series, "rows": rows}


# ---- roofline --------------------------------------------------------------------------------

def floors_of(path, doc) -> dict:
    floors = doc.get("floors")
    if not isinstance(floors, dict) or not all(
            isinstance(floors.get(k), (int, float)) and floors[k] > 0
            for k in ("fp32_gflops", "bandwidth_gbs", "launch_us")):
        raise UserError(f"{path}: no measured floors (fp32_gflops, bandwidth_gbs, launch_us); "
                        f"a roofline needs a GPU run")
    return floors


def roofline_rows(docs) -> dict:
    """Per case: useful flops / bytes moved (x), achieved GFLOP/s (y), its floor and % of it.
    Flops and bytes are recovered from the floor terms bench stored with the same floors."""
    rows, roofs = [], []
    for (path, doc), tag in zip(docs, labels(docs)):
        floors = floors_of(path, doc)
        half2 = doc.get("precision") == "fp16"       # half2 sums count at twice the FP32 rate
        peak = floors["fp32_gflops"] * (2.0 if half2 else 1.0)
        roofs.append({"file": tag, "peak_gflops": peak, "bandwidth_gbs": floors["bandwidth_gbs"],
                      "launch_us": floors["launch_us"], "half2": half2})
        for c in timed_cases(path, doc):
            flops = 2.0 * c["nnz"] * c["n"]
            nbytes = c["bytes_us"] * floors["bandwidth_gbs"] * 1e3
            t = timed(c)["median_us"]
            floor = max(flops / (peak * 1e3), c["bytes_us"], floors["launch_us"])
            rows.append({"file": tag, "problem": c["problem"], "sparsity": float(c["sparsity"]),
                         "flops": flops, "bytes": nbytes, "intensity": flops / nbytes,
                         "time_us": t, "gflops": flops / (t * 1e3), "floor_us": floor,
                         "floor_gflops": flops / (floor * 1e3),
                         "floor_pct": 100.0 * floor / t})
    return {"roofs": roofs, "rows": rows}


# ---- compare two runs ------------------------------------------------------------------------

def compare_rows(docs) -> dict:
    """`sparsert compare`'s rows (its noise-aware statuses) for BASE NEW, with each ratio's noise
    band (new p20 / base p80 .. new p80 / base p20), sorted by ratio; cases without a ratio
    (missing, failed, new) come last."""
    from ..commands.compare import SLACK_US, check_timings, compare

    if len(docs) != 2:
        raise UserError(f"{docs[0][0]}: --kind compare takes two files, BASE NEW; got {len(docs)}")
    (bpath, base), (npath, new) = docs
    check_timings(base, bpath), check_timings(new, npath)
    rows = []
    for r in compare(base, new, 0.05, SLACK_US)[0]:
        low = high = r["ratio"]
        if r["ratio"] and r["base_range"] and r["new_range"]:
            (base_low, base_high), (new_low, new_high) = r["base_range"], r["new_range"]
            low, high = new_low / base_high, new_high / base_low
        rows.append({"case": r["case"], "base_us": r["base_us"], "new_us": r["new_us"],
                     "ratio": r["ratio"], "low": low, "high": high, "status": r["status"]})
    if not any(r["ratio"] for r in rows):
        raise UserError(f"{npath}: no case in common with {bpath}; nothing to compare")
    rows.sort(key=lambda r: (r["ratio"] is None, r["ratio"] or 0.0))
    return {"base": str(bpath), "new": str(npath), "rows": rows}


# ---- tuning ----------------------------------------------------------------------------------

def tune_rows(docs) -> dict:
    rows = []
    for path, doc in docs:
        for c in doc["cases"]:
            case = f"{c['problem']} @{float(c['sparsity']):g}"
            default, best = float(c["default_us"]), float(c["best_us"])
            if not c["candidates"]:
                raise UserError(f"{path}: {case} has no candidates")
            for cand in c["candidates"]:
                rows.append({"case": case, "role": "candidate", "plan": str(cand["plan"]),
                             "family": str(cand.get("family") or "-"),
                             "median_us": float(cand["median_us"])})
            rows += [{"case": case, "role": "default", "plan": str(c.get("default_plan", "")),
                      "family": "-", "median_us": default},
                     {"case": case, "role": "winner", "plan": str(c.get("best_plan", "")),
                      "family": "-", "median_us": best}]
    return {"rows": rows}


# ---- models ----------------------------------------------------------------------------------

def model_rows(docs) -> dict:
    """Each layer's share of its model's end-to-end time (what is left is 'other')."""
    rows = []
    for path, doc in docs:
        for m in doc["models"]:
            total = float(m["sparsert_us"])
            if not total > 0:
                raise UserError(f"{path}: model {m['name']}: sparsert_us must be > 0")
            for layer in m["layers"]:
                engine = "sparsert" if "sparsert_us" in layer else "dense"
                if layer.get(f"{engine}_us") is None:
                    continue    # run inside another layer's kernel (BERT's key and value in
                    # the query's stacked GEMM): no time of its own
                us = float(layer[f"{engine}_us"])
                rows.append({"model": str(m["name"]), "layer": str(layer["name"]),
                             "engine": engine, "us": us, "share": us / total})
            rest = total - sum(r["us"] for r in rows if r["model"] == str(m["name"]))
            if rest > 1e-9 * total:
                rows.append({"model": str(m["name"]), "layer": "other", "engine": "other",
                             "us": rest, "share": rest / total})
    return {"rows": rows}


# ---- batch x sparsity map --------------------------------------------------------------------

DENSE = ("cublas_fp32", "cublas_tf32", "cublas_fp16", "cusparse")


def map_rows(docs, wanted=None) -> dict:
    """Per layer, batch and sparsity: sparsert's speedup over the fastest of the baselines
    (default: cuBLAS fp32, TF32, fp16 tensor cores, cuSPARSE) and which one that is.
    bench folds a config's batch into a gemm's N (its case says batch 1), so a gemm takes the
    batch of the convolutions in its file."""
    names = [n for n in pick_baselines(docs, wanted) if wanted or n in DENSE]
    rows, seen = [], {}
    for path, doc in docs:
        file_batch = max(int(c.get("batch", 1)) for c in doc["cases"])
        for c in timed_cases(path, doc):
            batch = file_batch if c.get("op") == "gemm" else int(c.get("batch", 1))
            key = (c["problem"], batch, float(c["sparsity"]))
            if key in seen:
                raise UserError(f"{path}: {c['problem']} batch {key[1]} at {key[2]:g} is also "
                                f"in {seen[key]}; give one file per batch")
            seen[key] = path
            speedups = {n: v for n in names if isinstance(v := (c.get("speedup") or {}).get(n),
                                                          (int, float)) and v > 0}
            if speedups:
                against = min(speedups, key=speedups.get)
                rows.append({"problem": key[0], "batch": key[1], "sparsity": key[2],
                             "n": c.get("n"), "speedup": speedups[against],
                             "against": against})
    if not rows:
        raise UserError(f"{docs[0][0]}: no speedups against {', '.join(names)} to map")
    return {"baselines": names, "rows": rows}


BUILDERS = {"speedup": speedup_rows, "layers": layer_rows, "roofline": roofline_rows,
            "compare": compare_rows, "tune": tune_rows, "model": model_rows, "map": map_rows}
TAKES_BASELINES = ("speedup", "layers", "map")


def rows_for(kind: str, docs, wanted=None) -> dict:
    args = (docs, wanted) if kind in TAKES_BASELINES else (docs,)
    return _guard([p for p, _ in docs], BUILDERS[kind], *args)
