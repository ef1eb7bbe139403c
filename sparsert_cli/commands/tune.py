"""`sparsert tune CONFIG`: time candidate plans on the GPU; store the winners in configs/tuned.json."""

from __future__ import annotations

import click
import numpy as np

from ..console import console, table
from ..errors import NoGpuError
from ..options import arch_option


def run_tuner(config, arch=None, jobs=None, no_cache=False, limit=16, db_path=None,
              replays=5) -> list[dict]:
    """Compile every candidate of every case, verify each on the GPU, time it, keep the fastest."""
    from .. import bench as B
    from ..build import epilogue_for, geometry_for
    from ..cache import KernelCache
    from ..gpu.runtime import Gpu, have_gpu
    from ..patterns import generate, pattern_hash, to_csr
    from ..plan import PRECISIONS, build_plan
    from ..tune import TUNED_PATH, TunedDB, candidates
    from .bench import progress_bar

    if not have_gpu():
        raise NoGpuError("sparsert tune needs a GPU (no CUDA driver or GPU found)")
    db = TunedDB(db_path or TUNED_PATH)
    cache = None if no_cache else KernelCache()
    summary = []
    with Gpu() as gpu, progress_bar() as progress:
        arch = arch or gpu.arch
        groups = []
        for problem, sparsity in config.cases():
            weight = generate(problem, sparsity, config.pattern, config.seed)
            csr = to_csr(weight)
            epilogue = epilogue_for(problem, config.epilogue, config.seed, sparsity)
            dtype, accumulate = PRECISIONS[config.precision]
            geometry = geometry_for(problem)
            seeds = tuple(found for other in PRECISIONS if other != config.precision
                          if (found := db.lookup(pattern_hash(weight), geometry, gpu.name, other)))
            cands = [B.Case(problem, sparsity, weight,
                            build_plan(csr, geometry, params, epilogue, dtype, accumulate))
                     for params in candidates(geometry, csr.nnz, limit, config.precision,
                                              seeds)]
            groups.append(cands)
        flat = [c for g in groups for c in g]
        task = progress.add_task("compile", total=len(flat), item="")
        B.compile_cases(flat, config.emit, arch, cache, jobs,
                        lambda case, build, s: progress.update(
                            task, advance=1, item=f"{case.key} {case.plan.params.name()}"))
        floors = {"fp32_gflops": 1.0, "bandwidth_gbs": 1.0, "launch_us": 1.0}  # unused here
        task = progress.add_task("tune", total=len(flat), item="")
        for cands in groups:
            timed = []
            rng = np.random.default_rng(0)
            x, res = B.random_inputs(cands[0], rng)
            inputs = (x, res, *B.reference(cands[0], x, res))   # one reference per case
            for case in cands:
                progress.update(task, advance=1, item=f"{case.key} {case.plan.params.name()}")
                if not isinstance(case.build, B.KernelBuild):
                    continue
                try:
                    result = B.run_gpu_case(gpu, case, floors, config.seed, False,
                                            baselines=False, inputs=inputs, replays=replays)
                except Exception:  # noqa: BLE001 - a candidate that cannot run is skipped
                    continue
                if result.get("verify_gpu", {}).get("ok") and "sparsert" in result:
                    timed.append((result["sparsert"]["median_us"], case))
            first = cands[0]
            if not timed:
                summary.append({"case": first.key, "status": "no candidate verified"})
                continue
            timed.sort(key=lambda t: t[0])
            best_us, best = timed[0]
            default_us = next((us for us, c in timed if c is first), None)
            db.record(pattern_hash(first.weight), first.plan.geometry, gpu.name, config.precision,
                      best.plan.params,
                      {"us": best_us, "default_us": default_us, "candidates": len(cands),
                       "verified": len(timed), "problem": first.problem.id,
                       "sparsity": first.sparsity})
            summary.append({"case": first.key, "status": "ok", "best": best.plan.params.name(),
                            "us": best_us, "default_us": default_us,
                            "verified": len(timed), "candidates": len(cands)})
    db.save()
    return summary


@click.command("tune")
@click.argument("config_path", metavar="CONFIG")
@click.option("--problems", "problem_ids", multiple=True, metavar="ID[,ID...]")
@click.option("--sparsity", "sparsities", multiple=True, metavar="S[,S...]")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default=None,
              help="Override the config's storage type (the accumulator follows it).")
@click.option("--accumulate", type=click.Choice(["fp32", "fp16"]), default=None,
              help="Override the accumulator type (fp16 data only).")
@click.option("--max-candidates", type=click.IntRange(1, 64), default=16, show_default=True,
              help="Candidate plans per case.")
@click.option("--db", "db_path", default=None, type=click.Path(dir_okay=False),
              help="Tuned-plan database (default: configs/tuned.json).")
@arch_option
@click.option("--jobs", type=click.IntRange(1, 256), default=None)
@click.option("--no-cache", is_flag=True)
def command(config_path, problem_ids, sparsities, dtype, accumulate, max_candidates, db_path, arch,
            jobs, no_cache):
    """Autotune plan parameters per (pattern, GPU, dtype) on the GPU."""
    from ..config import load_config
    from .bench import select, split_values

    config = select(load_config(config_path), split_values(problem_ids),
                    split_values(sparsities), dtype, accumulate)
    rows = run_tuner(config, arch, jobs, no_cache, max_candidates, db_path)
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else "-"  # noqa: E731
    console.print(table("sparsert tune: fastest verified plan per case",
                        ["Case", "Status", "Best plan", "best us", "default us", "gain",
                         "verified"],
                        [[r["case"], r["status"], r.get("best", "-"), fmt(r.get("us")),
                          fmt(r.get("default_us")),
                          f"{r['default_us'] / r['us']:.2f}x" if r.get("default_us") else "-",
                          f"{r.get('verified', 0)}/{r.get('candidates', 0)}"] for r in rows]))
