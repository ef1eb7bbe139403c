"""A `kind: tune` results file (default vs best per case) from a tuning database, without a GPU:
for each case of CONFIG, the plan the cost model picks now (`costmodel.choose`, untuned) and the
fastest verified candidate, both as measured in the database's run. Used when a tuning run ended
before writing its own `--out` file, or after the cost model was calibrated on that run (then the
default's choice is in-sample: say so with --note).

  python scripts/tune_report.py CONFIG TUNEDB --gpu NAME --out FILE [--note TEXT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparsert_cli import costmodel
from sparsert_cli.api import config_layers
from sparsert_cli.config import load_config
from sparsert_cli.jobs import default_gap
from sparsert_cli.patterns import to_csr
from sparsert_cli.results import stamp
from sparsert_cli.tunedb import TuneDB, latest

parser = argparse.ArgumentParser()
parser.add_argument("config")
parser.add_argument("tunedb")
parser.add_argument("--gpu", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--note", default="")
args = parser.parse_args()

with TuneDB(args.tunedb, create=False) as db:
    rows = [r for r in latest(db.rows()) if r["gpu_name"] == args.gpu]
by_case: dict = {}
for r in rows:
    by_case.setdefault((r["problem"], float(r["sparsity"]), r["precision"]), []).append(r)
config = load_config(args.config)
cases, missing = [], []
for layer in config_layers(config):
    key = (layer.info["problem"], float(layer.info["sparsity"]), layer.precision)
    measured = [r for r in by_case.get(key, []) if r["verified"] and r["median_us"]]
    family, params = costmodel.choose(layer.geometry, to_csr(layer.weight), layer.precision,
                                      args.gpu)
    default = [r for r in measured if r["family"] == family.name
               and r["plan_name"] == params.name()]
    if not measured or not default:
        missing.append(f"{key}: {'default ' + params.name() if measured else 'case'} not measured")
        continue
    best = min(measured, key=lambda r: r["median_us"])
    cases.append({"problem": key[0], "sparsity": key[1], "precision": key[2],
                  "pattern_hash": best["pattern_hash"], "default_plan": params.name(),
                  "default_us": default[0]["median_us"], "default_family": family.name,
                  "best_plan": best["plan_name"], "best_us": best["median_us"],
                  "best_family": best["family"],
                  "candidates": [{"family": r["family"], "plan": r["plan_name"],
                                  "median_us": r["median_us"], "verified": bool(r["verified"])}
                                 for r in sorted(measured, key=lambda r: r["median_us"])]})
first = rows[0] if rows else {}
doc = stamp({"config": {"name": config.name, "path": args.config, "dtype": config.dtype,
                        "accumulate": config.accumulate}, "source": f"scripts/tune_report.py from {args.tunedb}",
             "note": args.note, "gpu": {"name": args.gpu, "driver": first.get("driver"),
                                        "sm_count": first.get("sm_count"),
                                        "clocks": json.loads(first.get("clocks_json") or "null")},
             "cases": cases, "summary": default_gap(cases), "failed": missing}, "tune")
Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
print(f"{args.out}: {len(cases)} cases, {len(missing)} missing; summary {doc['summary']}")
