"""How good the untuned defaults are, judged offline on a tuning run's measurements: for each
case of the configs that the database measured, the plan `costmodel.choose` picks (with the
cost model fitted to the database the way `sparsert tunedb calibrate` fits it), its measured
time, the fastest verified candidate of the run and their ratio; then per precision the
geomean and worst ratio against issue 10's bar (1.10 / 1.25). A chosen plan the run did not
measure is "not measured" and counted apart, never guessed.

  python scripts/defaults_eval.py DB [--loo] [--gpu NAME] [--config CFG ...]

--loo: leave one layer out, for each layer (problem) fit the coefficients without its
measurements (every sparsity and precision) and choose for it; without it the fit is in-sample.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

from sparsert_cli import costmodel
from sparsert_cli.api import config_layers
from sparsert_cli.config import load_config
from sparsert_cli.errors import UserError
from sparsert_cli.jobs import GAP_CASE, GAP_GEOMEAN, default_gap
from sparsert_cli.patterns import pattern_hash, to_csr
from sparsert_cli.tune import shape_key
from sparsert_cli.tunedb import TuneDB, latest

CONFIGS = ("configs/paper20.yaml", "configs/paper20-fp16.yaml", "configs/mobilenet.yaml")


def evaluate(db_path: str, configs=CONFIGS, gpu: str | None = None, loo: bool = False) -> dict:
    """{"gpu", "cases": [per case: problem, sparsity, precision, family, plan, us (None: not
    measured), best_family, best_plan, best_us, ratio], "summary": {config/precision: ...},
    "not_in_database": {config: cases the run did not measure at all}}."""
    with TuneDB(db_path, create=False) as db:
        rows = [r for r in latest(db.rows()) if r["verified"] and r["median_us"]]
    names = Counter(r["gpu_name"] for r in rows)
    if not names:
        raise UserError(f"{db_path}: no verified measurements")
    gpu = gpu or names.most_common(1)[0][0]
    if gpu not in names:
        raise UserError(f"{db_path}: no verified measurements on {gpu!r} (GPUs in it: "
                        f"{', '.join(sorted(names))})")
    rows = [r for r in rows if r["gpu_name"] == gpu]
    by_case: dict[tuple, list[dict]] = {}
    for r in rows:
        by_case.setdefault((r["pattern_hash"], r["shape"], r["precision"]), []).append(r)
    cases, absent = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        fits: dict = {}

        def coefficients(left_out: str | None) -> Path:
            if left_out not in fits:         # one coefficients file per fold
                kept = [r for r in rows if r["problem"] != left_out]
                entry, _ = costmodel.calibrate(kept, gpu, db_path)
                fits[left_out] = Path(tmp) / f"fold{len(fits)}.json"
                costmodel.save_entry(fits[left_out], gpu, entry)
            return fits[left_out]

        for config in configs:
            for layer in config_layers(load_config(config)):
                key = (pattern_hash(layer.weight), shape_key(layer.geometry), layer.precision)
                measured = by_case.get(key)
                if not measured:
                    absent[Path(config).stem] = absent.get(Path(config).stem, 0) + 1
                    continue
                problem = layer.info["problem"]
                family, params = costmodel.choose(
                    layer.geometry, to_csr(layer.weight), layer.precision, gpu,
                    path=coefficients(problem if loo else None))
                times = {(r["family"], r["plan_name"]): r["median_us"] for r in measured}
                us = times.get((family.name, params.name()))
                (best_family, best_plan), best_us = min(times.items(), key=lambda t: t[1])
                cases.append({"config": Path(config).stem, "problem": problem,
                              "sparsity": float(layer.info["sparsity"]),
                              "precision": layer.precision, "family": family.name,
                              "plan": params.name(), "us": us, "best_family": best_family,
                              "best_plan": best_plan, "best_us": best_us,
                              "ratio": us / best_us if us else None})
    return {"gpu": gpu, "loo": loo, "cases": cases, "summary": summary(cases),
            "not_in_database": absent}


def summary(cases: list[dict]) -> dict:
    """Per precision (and config): cases, unmeasured choices, geomean and worst ratio, ok (the
    tuner's own default-vs-best summary, jobs.default_gap, over the measured choices)."""
    out = {}
    for group in sorted({(c["config"], c["precision"]) for c in cases}):
        mine = [c for c in cases if (c["config"], c["precision"]) == group]
        gap = default_gap([{**c, "default_us": c["us"]} for c in mine])
        out["/".join(group)] = {
            "cases": len(mine), "not_measured": len(mine) - gap["cases"],
            "geomean": gap["geomean_default_over_best"], "worst": gap["worst"],
            "ok": bool(gap["ok"])}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("db")
    parser.add_argument("--loo", action="store_true", help="leave one layer out")
    parser.add_argument("--gpu", default=None, help="GPU name (default: the most measured one)")
    parser.add_argument("--config", action="append", default=None,
                        help=f"config(s) whose cases to judge (default: {', '.join(CONFIGS)})")
    args = parser.parse_args(argv)
    try:
        doc = evaluate(args.db, args.config or CONFIGS, args.gpu, args.loo)
    except UserError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    fit = "leave-one-layer-out" if args.loo else "in-sample"
    print(f"{args.db}: {doc['gpu']}, cost model fitted {fit}")
    print(f"{'config':12} {'case':24} {'prec':5} {'chosen':24} {'us':>12} {'best':24} "
          f"{'us':>8} {'ratio':>6}")
    for c in doc["cases"]:
        us = f"{c['us']:12.2f}" if c["us"] else "not measured"
        ratio = f"{c['ratio']:6.3f}" if c["ratio"] else "     ?"
        print(f"{c['config']:12} {c['problem'] + ' @' + str(c['sparsity']):24} "
              f"{c['precision']:5} {c['family'][:3] + ' ' + c['plan']:24} {us:>12} "
              f"{c['best_family'][:3] + ' ' + c['best_plan']:24} {c['best_us']:8.2f} {ratio}")
    for group, s in doc["summary"].items():
        worst = s["worst"]
        print(f"{group}: {s['cases']} cases, {s['not_measured']} chosen plans not measured; "
              + (f"geomean {s['geomean']:.3f}, worst {worst['ratio']:.3f} ({worst['problem']} "
                 f"@{worst['sparsity']}); target {GAP_GEOMEAN} / {GAP_CASE}: "
                 f"{'met' if s['ok'] else 'missed'}" if worst else "nothing to judge"))
    for config, count in doc["not_in_database"].items():
        print(f"{config}: {count} cases not in the database (unjudged)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
