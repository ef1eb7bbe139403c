"""`sparsert bench CONFIG`: generate, compile, verify and time every case of a config."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import click

from ..console import console, err_console
from ..errors import NoGpuError, UserError
from ..options import arch_option, check_family, family_option
from ..paths import check_output, tuned_db_path
from ..problem_shape import DTYPES
from ._common import progress_bar, progress_callback, select, split_values  # noqa: F401

RESULTS_DIR = Path("results") / "local"


def output_paths(config, precision: str, out_path=None, csv_path=None) -> tuple[Path, Path]:
    """The results JSON and CSV, checked before any work: by default results/local/<name>.json,
    <name>-<precision>.json when --dtype/--accumulate changed the config's own precision (so an
    fp16 run never overwrites the fp32 results of the same config)."""
    name = config.name if config.precision == precision else f"{config.name}-{config.precision}"
    out = Path(out_path) if out_path else RESULTS_DIR / f"{name}.json"
    csv_out = Path(csv_path) if csv_path else out.with_suffix(".csv")
    if out.resolve() == csv_out.resolve():
        raise UserError(f"{out}: --out and --csv name the same file")
    check_output(out, "--out")
    check_output(csv_out, "--csv")
    return out, csv_out


@click.command("bench")
@click.argument("config_path", metavar="CONFIG")
@click.option("--problems", "problem_ids", multiple=True, metavar="ID[,ID...]",
              help="Only these problems (repeat or comma-separate).")
@click.option("--sparsity", "sparsities", multiple=True, metavar="S[,S...]",
              help="Override the config's sparsity levels.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
              help="Override the config's storage type (the accumulator follows it).")
@click.option("--accumulate", type=click.Choice(["fp32", "fp16"]), default=None,
              help="Sum fp16 data in fp32 or fp16 (half2) registers (default: the config's; "
                   "fp16 for dtype fp16, fp32 for bf16).")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="Results JSON (default: results/local/<config name>.json; "
                   "<name>-<precision>.json after --dtype/--accumulate).")
@click.option("--csv", "csv_path", default=None, type=click.Path(dir_okay=False),
              help="Results CSV (default: next to the JSON).")
@click.option("--cold-l2", is_flag=True, help="Flush L2 before every timed launch.")
@click.option("--require-gpu", is_flag=True, help="Exit 3 when there is no GPU.")
@click.option("--compile-only", is_flag=True, help="Compile and verify on the CPU; no GPU work.")
@click.option("--no-baselines", is_flag=True, help="Time only the generated kernels.")
@click.option("--emit", "emitter", type=click.Choice(["ptx", "cuda"]), default=None,
              help="Override the config's emitter.")
@arch_option
@click.option("--jobs", type=click.IntRange(1, 256), default=None,
              help="Parallel compile processes (default: all cores).")
@click.option("--no-cache", is_flag=True, help="Ignore the kernel cache.")
@click.option("--no-tuned", is_flag=True, help="Ignore the tuned-plan database (untuned plans).")
@click.option("--tuned", "tuned_path", default=None, type=click.Path(dir_okay=False),
              help="Tuned-plan database (default: ./configs/tuned.json if there is one, else the "
                   "one shipped with sparsert).")
@click.option("--tune", "tune_first", is_flag=True,
              help="Run the tuner on this config first (GPU), then benchmark its winners.")
@click.option("--allow-fp16-flush", is_flag=True,
              help="fp16: drop weights that round to zero in fp16 (as allow_fp16_flush: true).")
@click.option("--gpus", default=None, metavar="all|0,1,...",
              help="GPUs of this host to spread the cases over, one worker process each "
                   "(default: this process on GPU 0).")
@family_option
@click.option("--force-workers", is_flag=True, hidden=True,
              help="Use worker processes even for one GPU (tests).")
def command(config_path, problem_ids, sparsities, dtype, accumulate, out_path, csv_path, cold_l2,
            require_gpu, compile_only, no_baselines, emitter, arch, jobs, no_cache, no_tuned,
            tuned_path, tune_first, allow_fp16_flush, gpus, family, force_workers):
    """Benchmark a config: compile, verify, time vs cuBLAS/cuSPARSE/cuDNN, write JSON/CSV."""
    from .. import bench as B
    from ..build import check_emitter, detect_arch
    from ..cache import KernelCache
    from ..config import load_config
    from ..gpu.runtime import have_gpu
    from ..options import check_plan_width
    from ..report import compile_table, csv_text, results_table
    from ..tune import TunedDB

    loaded = load_config(config_path)
    config = select(loaded, split_values(problem_ids), split_values(sparsities), dtype,
                    accumulate)
    if emitter:
        config = replace(config, emit=emitter)
    if allow_fp16_flush:
        config = replace(config, allow_fp16_flush=True)
    if check_family(family):
        config = replace(config, family=family)
    try:
        check_emitter(config.emit, config.precision, arch or "sm_90")
    except UserError as exc:
        raise UserError(f"{config.path}: {exc.message}") from None
    try:
        check_plan_width(config.plan, config.dtype)
    except UserError as exc:
        raise UserError(f"{config.path}: plan {exc.message}") from None
    out, csv_out = output_paths(config, loaded.precision, out_path, csv_path)
    if tuned_path and not no_tuned and not tune_first and not Path(tuned_path).is_file():
        raise UserError(f"{tuned_path}: no such tuned-plan database (--tuned)")
    gpu_ids = None
    if gpus is not None:
        from .. import executors
        if compile_only:
            raise UserError("--gpus and --compile-only exclude each other")
        gpu_ids = executors.parse_gpus(gpus, executors.gpu_count())   # no GPU: exit 3
    gpu_ok = gpu_ids is not None or have_gpu()
    if require_gpu and not gpu_ok:
        raise NoGpuError("no CUDA driver or GPU found and --require-gpu was given")
    if not gpu_ok and not compile_only:
        err_console.print("[yellow]no GPU found:[/] compiling and verifying on the CPU only "
                          "(no timings)")
    use_gpu = gpu_ok and not compile_only
    if tune_first and not use_gpu:
        raise NoGpuError("--tune needs a GPU")
    tuned_path = None if no_tuned else tuned_db_path(tuned_path, write=tune_first)
    if tune_first:
        from .tune import run_tuner
        run_tuner(config, arch, jobs, no_cache, db_path=tuned_path, gpus=gpus)
    gpu_name = B.DEFAULT_TARGET_GPU
    gpu = None
    workers = gpu_ids if gpu_ids and (len(gpu_ids) > 1 or force_workers) else None
    if use_gpu and not workers:
        from ..gpu.runtime import Gpu
        gpu = Gpu(gpu_ids[0] if gpu_ids else 0)
        gpu_name = gpu.name
    try:
        arch = arch or (gpu.arch if gpu else None if workers else detect_arch())
        tuned = None if no_tuned else TunedDB(tuned_path)
        cache = None if no_cache else KernelCache()
        with progress_bar() as progress:
            doc = B.run_benchmark(config, gpu=gpu, gpu_name=gpu_name, arch=arch, tuned=tuned,
                                  cache=cache, jobs=jobs, cold_l2=cold_l2,
                                  baselines=not no_baselines, gpu_ids=workers,
                                  on_progress=progress_callback(progress))
    finally:
        if gpu is not None:
            gpu.close()
    flushed = {f"{r['problem']}@{r['sparsity']:g}": r["fp16_flushed"] for r in doc["cases"]
               if r.get("fp16_flushed")}
    if flushed:
        err_console.print(f"[yellow]{config.path}:[/] dropped weights that round to zero in "
                          f"fp16: " + ", ".join(f"{k} {n}" for k, n in flushed.items()),
                          soft_wrap=True)
    for path, text in ((out, json.dumps(doc, indent=1) + "\n"), (csv_out, csv_text(doc))):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    console.print(results_table(doc) if use_gpu else compile_table(doc))
    for g in doc.get("gpus", []):
        rate = f"{g['cases_per_second']:.2f} cases/s" if g.get("cases_per_second") else "-"
        console.print(f"  GPU {g['device']} ({g['gpu']['name']}): {g['cases']} cases, {rate}"
                      + (f", {g['restarts']} worker restart(s)" if g.get("restarts") else ""))
    failures = doc["failures"]
    console.print(f"wrote {out} and {csv_out}" + (f"; [red]{len(failures)} failure(s)[/]: "
                                                  + ", ".join(failures) if failures else ""))
    if failures:
        sys.exit(1)
