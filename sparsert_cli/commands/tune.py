"""`sparsert tune CONFIG`: time candidate plans on every GPU; store the winners in a tuned-plan
database (--db, default ./configs/tuned.json)."""

from __future__ import annotations

import signal
from pathlib import Path

import click

from ..console import console, table
from ..errors import NoGpuError, UserError
from ..options import arch_option, check_family, family_option
from ..problem_shape import DTYPES


def run_tuner(config, arch=None, jobs=None, no_cache=False, limit=16, db_path=None,
              gpus=None, ray=None, db_sqlite=None, remeasure=False, measure=None,
              gpu_ids=None, family=None) -> dict:
    """Compile every candidate of every case, verify and time each on every GPU (or a Ray
    cluster), keep every measurement in the tuning database and the fastest in the JSON."""
    from ..cache import KernelCache
    from ..executors import tune_config
    from ..gpu.runtime import have_gpu
    from ..paths import check_output, tuned_db_path
    from ._common import progress_bar

    if ray is None and measure is None and not have_gpu():
        raise NoGpuError("sparsert tune needs a GPU (no CUDA driver or GPU found)"
                         + (f"; --gpus {gpus} cannot be used here" if gpus else ""))
    db_path = tuned_db_path(db_path, write=True)    # never the copy inside the package
    check_output(db_path, "--db")                   # before the tuning run, not at its end
    cache = None if no_cache else KernelCache()
    cache_root = str(cache.root) if cache is not None and cache.usable() else None
    with progress_bar() as progress:
        tasks = {}

        def on_event(kind, job, info):
            if kind == "plan":
                tasks["compile"] = progress.add_task("compile", total=info["todo"], item="")
                tasks["measure"] = progress.add_task("measure", total=info["todo"],
                                                     item=f"{info['jobs'] - info['todo']} "
                                                          f"stored, skipped")
            elif kind in ("compiled", "measured"):
                progress.update(tasks["compile" if kind == "compiled" else "measure"],
                                advance=1, item=f"{job.case}:{job.params.name()}")

        return tune_config(config, gpus=gpus, ray=ray, arch=arch, jobs=jobs,
                           cache_root=cache_root, limit=limit, tuned_path=db_path,
                           db_path=db_sqlite, remeasure=remeasure, measure=measure,
                           on_event=on_event, gpu_ids=gpu_ids,
                           family=family or config.family)


@click.command("tune")
@click.argument("config_path", metavar="CONFIG")
@click.option("--problems", "problem_ids", multiple=True, metavar="ID[,ID...]",
              help="Only these problems (repeat or comma-separate).")
@click.option("--sparsity", "sparsities", multiple=True, metavar="S[,S...]",
              help="Override the config's sparsity levels.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
              help="Override the config's storage type (the accumulator follows it).")
@click.option("--accumulate", type=click.Choice(["fp32", "fp16"]), default=None,
              help="Override the accumulator type (fp16 data only).")
@click.option("--max-candidates", type=click.IntRange(1, 64), default=16, show_default=True,
              help="Candidate plans per case.")
@click.option("--db", "db_path", default=None, type=click.Path(dir_okay=False),
              help="Tuned-plan database to update (default: ./configs/tuned.json; the copy "
                   "shipped inside an installed package is never written).")
@click.option("--db-sqlite", "db_sqlite", default=None, type=click.Path(dir_okay=False),
              help="Tuning database keeping every measurement (default: $SPARSERT_TUNEDB, else "
                   "~/.local/share/sparsert/tunedb.sqlite); jobs it holds for this GPU are not "
                   "measured again.")
@click.option("--remeasure", is_flag=True, help="Measure jobs the tuning database already holds.")
@click.option("--gpus", default=None, metavar="all|0,1,...",
              help="GPUs of this host to measure on, one worker process each (default: all).")
@click.option("--ray", default=None, metavar="auto|ADDRESS|local",
              help="Run on a Ray cluster instead (extra [ray]): compile tasks, one timer actor "
                   "per GPU.")
@arch_option
@click.option("--jobs", type=click.IntRange(1, 256), default=None,
              help="Parallel compile processes (default: all cores).")
@click.option("--no-cache", is_flag=True, help="Ignore the kernel cache.")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="Also write a results file (kind: tune): per case the default plan's time "
                   "(the cost model's choice, measured in the same run), the winner's, both "
                   "families, every verified candidate and a default-vs-best summary.")
@family_option
def command(config_path, problem_ids, sparsities, dtype, accumulate, max_candidates, db_path,
            db_sqlite, remeasure, gpus, ray, arch, jobs, no_cache, out_path, family):
    """Autotune plan parameters per (pattern, GPU, dtype) on every GPU of this host."""
    from ..config import load_config
    from ._common import select, split_values

    check_family(family, tuning=True)
    if gpus is not None and ray is not None:
        raise UserError("--gpus and --ray exclude each other (Ray places the timers itself)")
    config = select(load_config(config_path), split_values(problem_ids),
                    split_values(sparsities), dtype, accumulate)
    if out_path:
        from ..paths import check_output
        check_output(Path(out_path), "--out")          # before the tuning run, not at its end
    from ..executors import TuneInterrupted

    previous = signal.signal(signal.SIGTERM, _terminate)   # `timeout`, a batch system: as Ctrl-C
    try:
        out = run_tuner(config, arch, jobs, no_cache, max_candidates, db_path, gpus, ray,
                        db_sqlite, remeasure, family=family)
        stopped = None
    except TuneInterrupted as exc:
        out, stopped = exc.result, exc
    finally:
        signal.signal(signal.SIGTERM, previous)
    _report(out, config, out_path)
    if stopped is not None:
        done = sum(r["status"] == "ok" for r in out["summary"])
        raise UserError(f"interrupted: winners of the {done} fully measured case(s) saved, "
                        f"every measurement kept in the tuning database (run again to resume)",
                        130)


def _terminate(signum, frame):
    raise KeyboardInterrupt


def _report(out: dict, config, out_path) -> None:
    rows, run = out["summary"], out["run"]
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else "-"  # noqa: E731
    console.print(table("sparsert tune: fastest verified plan per case",
                        ["Case", "Status", "Family", "Best plan", "best us", "default us",
                         "gain", "verified"],
                        [[r["case"], r["status"], r["family"][0] if r.get("family") else "-",
                          r.get("best", "-"), fmt(r.get("us")),
                          fmt(r.get("default_us")),
                          f"{r['default_us'] / r['us']:.2f}x" if r.get("default_us") else "-",
                          f"{r.get('verified', 0)}/{r.get('candidates', 0)}"] for r in rows]))
    console.print(f"{run['jobs']} jobs ({run['skipped']} already in the tuning database) in "
                  f"{run['wall_seconds']:.1f} s; compile {run['compile_seconds']:.1f} s, "
                  f"measure {run['measure_seconds']:.1f} s")
    for g in run["gpus"]:
        rate = f"{g['jobs_per_second']:.1f} jobs/s" if g.get("jobs_per_second") else "-"
        console.print(f"  GPU {g['device']} ({run['gpu']['gpu_name']}): {g['jobs']} jobs, {rate}"
                      + (f", {g['restarts']} worker restart(s)" if g.get("restarts") else ""))
    if out_path:
        import json

        from ..bench import metadata
        from ..jobs import tune_results

        doc = tune_results(rows, run, metadata(config, "gpu"))
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(doc, indent=1, default=str) + "\n")
        gap = doc["summary"]
        if gap["cases"]:
            worst = gap["worst"]
            console.print(f"default (cost model) vs best: geomean "
                          f"{gap['geomean_default_over_best']:.3f}x, worst {worst['ratio']:.2f}x "
                          f"({worst['problem']}@{worst['sparsity']:g} {worst['precision']})")
        console.print(f"wrote {out_path}")
