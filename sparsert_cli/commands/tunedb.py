"""`sparsert tunedb show|export|merge|calibrate`: the tuning database (every measurement,
SQLite)."""

from __future__ import annotations

import click

from ..console import console, print_json, table

_db_arg = click.argument("db_path", metavar="DB", type=click.Path(dir_okay=False))


@click.group("tunedb")
def command():
    """The tuning database that `tune` records every measurement into."""


@command.command("show")
@_db_arg
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def show(db_path, as_json):
    """Measurements per GPU, precision and kernel family: jobs, verified, failed, winners; and
    how many tuning runs wrote them."""
    from ..tunedb import TuneDB

    with TuneDB(db_path, create=False) as db:
        groups: dict[tuple, dict] = {}
        for r in db.rows():
            key = (r["gpu_name"], r["driver"], r["precision"],
                   f"{r['family']}@{r['family_version']}")
            g = groups.setdefault(key, {"rows": 0, "verified": 0, "failed": 0, "cases": set(),
                                        "hosts": set()})
            g["rows"] += 1
            g["verified" if r["verified"] else "failed"] += 1
            g["cases"].add((r["pattern_hash"], r["shape"]))
            g["hosts"].add(r["host"])
        best = db.best()
        runs = db.runs()
    docs = [{"gpu": k[0], "driver": k[1], "precision": k[2], "family": k[3], "rows": g["rows"],
             "verified": g["verified"], "failed": g["failed"], "cases": len(g["cases"]),
             "winners": sum(1 for b in best if (b[2], b[3], f"{b[4]}@{b[5]}") ==
                            (k[0], k[2], k[3])),
             "hosts": len(g["hosts"])} for k, g in sorted(groups.items())]
    if as_json:
        print_json({"path": db_path, "runs": runs, "groups": docs})
        return
    console.print(table(f"{db_path}: {sum(d['rows'] for d in docs)} measurements, "
                        f"{runs} tuning run(s)",
                        ["GPU", "Driver", "Precision", "Family", "rows", "verified", "failed",
                         "cases", "winners", "hosts"],
                        [[d["gpu"], d["driver"], d["precision"], d["family"], d["rows"],
                          d["verified"], d["failed"], d["cases"], d["winners"], d["hosts"]]
                         for d in docs]))


@command.command("export")
@_db_arg
@click.option("-o", "--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="Tuned-plan JSON to write into (default: configs/tuned.json); its other "
                   "entries are kept.")
@click.option("--all-versions", is_flag=True,
              help="Also export winners of older kernel family versions.")
def export(db_path, out_path, all_versions):
    """Write the best verified plan per (pattern, shape, GPU, precision, family) into the
    JSON, each family's from the newest run that measured it."""
    from ..build import EMITTERS
    from ..families import families as registered
    from ..jobs import family_version
    from ..tune import TUNED_PATH
    from ..tunedb import TuneDB, export as export_db

    families = None if all_versions else {family_version(f.name, e) for f in registered()
                                          for e in EMITTERS}
    with TuneDB(db_path, create=False) as db:
        count = export_db(db, out_path or TUNED_PATH, families)
    console.print(f"{count} tuned plans from {db_path} written to {out_path or TUNED_PATH}")


@command.command("merge")
@click.argument("out_path", metavar="OUT", type=click.Path(dir_okay=False))
@click.argument("inputs", metavar="DB...", nargs=-1, required=True,
                type=click.Path(dir_okay=False))
def merge(out_path, inputs):
    """Copy the measurements of several databases (e.g. one per host) into OUT, once each."""
    from ..tunedb import TuneDB

    for path in inputs:     # every input checked before OUT is created or touched
        TuneDB(path, create=False).close()
    with TuneDB(out_path) as db:
        for path in inputs:
            added = db.merge(path)
            console.print(f"{path}: {added} new measurements")
        console.print(f"{out_path}: {db.count()} measurements")


@command.command("calibrate")
@_db_arg
@click.option("--gpu", "gpu_name", required=True, metavar="NAME",
              help="The GPU whose measurements to fit (as `tunedb show` names it).")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="Cost-model file to write the fitted entry into (its other GPUs kept); "
                   "without it the fit is only reported.")
@click.option("--keep-ratios", is_flag=True,
              help="Fit only the launch term and one scale of the fallback's other coefficients "
                   "(for measurements that vary the plan too little to pin every term).")
@click.option("--json", "as_json", is_flag=True, help="Print the fit as JSON.")
def calibrate(db_path, gpu_name, out_path, keep_ratios, as_json):
    """Fit the cost model's coefficients for one GPU to every measurement in the database."""
    from .. import costmodel
    from ..paths import check_output
    from ..tunedb import TuneDB, latest
    from pathlib import Path

    if out_path:
        check_output(Path(out_path), "--out")
        if Path(out_path).exists():
            costmodel.load_coefficients(out_path)      # a malformed file: refused before fitting
    with TuneDB(db_path, create=False) as db:
        rows = latest(db.rows())
    ratios = costmodel.coefficients_for(costmodel.FALLBACK)[1]["coefficients"] \
        if keep_ratios else None
    fitted, bare = costmodel.calibrate(rows, gpu_name, db_path, ratios)
    coefs, quality, sms = fitted["coefficients"], fitted["fit"], fitted["sms"]
    entry = {"sms": sms, "coefficients": coefs, "fit": quality,
             "source": f"sparsert tunedb calibrate {db_path}"
                       f"{' --keep-ratios' if keep_ratios else ''} ({quality['samples']} "
                       f"measurements)", **fitted}
    if out_path:
        costmodel.save_entry(out_path, gpu_name, entry)
    if as_json:
        print_json({"gpu": gpu_name, "skipped_without_features": bare, **entry})
        return
    console.print(table(f"{db_path}: cost model for {gpu_name} ({sms} SMs), "
                        f"{quality['samples']} measurements"
                        + (f", {bare} without features skipped" if bare else ""),
                        ["term", "coefficient (us per unit)"],
                        [[t, f"{coefs[t]:.4g}"] for t in costmodel.TERMS]))
    for name, fam in entry.get("families", {}).items():
        console.print(f"{name} alone ({fam['fit']['samples']} measurements): |error| median "
                      f"{fam['fit']['median_rel_error']:.1%}, 90th percentile "
                      f"{fam['fit']['p90_rel_error']:.1%}")
    console.print(f"|error|: median {quality['median_rel_error']:.1%}, 90th percentile "
                  f"{quality['p90_rel_error']:.1%}, max {quality['max_rel_error']:.1%}"
                  + (f"; wrote {out_path}" if out_path else ""))
