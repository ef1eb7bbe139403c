"""`sparsert gen`: one pattern -> kernel source, cubin and manifest.json."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import click
import numpy as np

from ..console import console, print_json
from ..errors import UserError
from ..options import arch_option, check_plan_width, parse_plan_options, plan_option
from ..paths import check_output, tuned_db_path

OPS = ("gemm", "conv1x1", "conv3x3")


def _infer_op(weight: np.ndarray, op: str | None, where: str) -> str:
    if op:
        return op
    if weight.ndim == 2:
        return "gemm"
    return "conv3x3" if weight.shape[2:] == (3, 3) else "conv1x1"


def _problem(path: Path, weight: np.ndarray, op: str, n, height, width, batch, stride, padding):
    from ..patterns import fit_to_op
    from ..problems import Problem

    where = str(path)
    weight = fit_to_op(weight, op, where)
    m, c = weight.shape[:2]
    pid = path.stem
    if op == "gemm":
        for flag, value in (("--height", height), ("--width", width), ("--batch", batch),
                            ("--stride", stride), ("--padding", padding)):
            if value is not None:
                raise UserError(f"{where}: {flag} is for convolutions; a gemm takes --n")
        if n is None:
            raise UserError(f"{where}: a gemm needs --n (the number of activation columns)")
        problem = Problem(pid, op, m, c, height=1, width=n)
    else:
        if n is not None:
            raise UserError(f"{where}: --n is for gemm; a convolution takes --height and --width")
        if height is None or width is None:
            raise UserError(f"{where}: a {op} needs --height and --width (input size)")
        pad = padding if padding is not None else (1 if op == "conv3x3" else 0)
        problem = Problem(pid, op, m, c, height=height, width=width, batch=batch or 1,
                          stride=stride or 1, padding=pad)
    return problem.validate(where), weight


def _bias(path: str | None, rows: int) -> tuple[float, ...] | None:
    if path is None:
        return None
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable .npy bias file ({exc})") from None
    values = np.asarray(values)
    if values.dtype.kind not in "fiu" or values.shape != (rows,):
        raise UserError(f"{path}: bias must be a numeric vector of {rows} values, got shape "
                        f"{values.shape}")
    with np.errstate(over="ignore"):
        values32 = values.astype(np.float32)
    if not np.all(np.isfinite(values)) or not np.all(np.isfinite(values32)):
        raise UserError(f"{path}: bias holds NaN/Inf values or values beyond the float32 range")
    return tuple(float(v) for v in values32)


def manifest(problem, plan, build, weight, emitter: str) -> dict:
    from .. import __version__
    from ..patterns import pattern_hash

    geo = plan.geometry
    shapes = {"x": [geo.batch, geo.in_channels, geo.height, geo.width],
              "y": [geo.batch, geo.out_channels, geo.out_height, geo.out_width],
              "res": [geo.batch, geo.out_channels, geo.out_height, geo.out_width],
              "z": [geo.in_channels, geo.height, geo.width]}
    roles = {"x": "input activations (NCHW; a gemm's K x N matrix)",
             "y": "output (NCHW; a gemm's M x N matrix), fully overwritten",
             "res": "residual added before the activation, same shape as y",
             "z": "all-zero buffer read for padding taps (must hold zeros)"}
    res = build.resources
    return {
        "sparsert_version": __version__,
        "entry": plan.entry,
        "cubin": "kernel.cubin",
        "source": "kernel.ptx" if emitter == "ptx" else "kernel.cu",
        "emitter": emitter,
        "arch": build.arch,
        "dtype": plan.dtype,
        "accumulate": plan.accumulate,
        "grid": list(plan.grid),
        "block": list(plan.block),
        "shared_bytes": plan.shared_bytes,
        "arguments": [{"name": a, "shape": shapes[a],
                       "dtype": "float16" if plan.dtype == "fp16" else "float32", "role": roles[a]}
                      for a in plan.arguments],
        "problem": {"op": problem.op, "m": problem.m, "k": problem.k, "n": problem.n,
                    "batch": geo.batch, "in_channels": geo.in_channels,
                    "height": geo.height, "width": geo.width, "kernel": geo.kernel,
                    "stride": geo.stride, "padding": geo.padding,
                    "out_height": geo.out_height, "out_width": geo.out_width},
        "epilogue": {"bias": plan.epilogue.bias is not None,
                     "activation": plan.epilogue.activation,
                     "residual": plan.epilogue.residual},
        "plan": {"name": plan.params.name(), **plan.params.__dict__,
                 "row_groups": len(plan.groups), "loads": plan.loads},
        "nnz": plan.nnz,
        "density": plan.nnz / (geo.out_channels * geo.taps),
        "pattern_hash": pattern_hash(weight),
        "registers": res.registers,
        "spill_store_bytes": res.spill_store_bytes,
        "spill_load_bytes": res.spill_load_bytes,
        "stack_bytes": res.stack_bytes,
        "compile_seconds": round(build.compile_seconds, 3),
        "cached": build.cached,
        "cubin_bytes": len(build.cubin),
        "cubin_sha256": hashlib.sha256(build.cubin).hexdigest(),
    }


@click.command("gen")
@click.option("--pattern", "pattern_path", required=True, type=click.Path(dir_okay=False),
              help="Weight file: scipy.sparse .npz, or .npz/.npy dense 2-D (M x K) or 4-D OIHW.")
@click.option("--sparsity", type=float, default=None,
              help="Magnitude-prune the weight to this sparsity first (0 <= S < 1).")
@click.option("--op", type=click.Choice(OPS), default=None,
              help="Operation (default: gemm for 2-D weights, conv1x1/conv3x3 for 4-D).")
@click.option("--n", type=int, default=None, help="gemm: activation columns (tokens).")
@click.option("--height", type=int, default=None, help="conv: input height.")
@click.option("--width", type=int, default=None, help="conv: input width.")
@click.option("--batch", type=int, default=None, help="conv: batch size (default 1).")
@click.option("--stride", type=int, default=None, help="conv: stride (default 1).")
@click.option("--padding", type=int, default=None, help="conv: padding (default 1 for 3x3, else 0).")
@click.option("--emit", "emitter", type=click.Choice(["ptx", "cuda"]), default="ptx",
              show_default=True, help="Emitter: PTX (fast to compile) or readable CUDA C++.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Storage of x, y and the residual.")
@click.option("--accumulate", type=click.Choice(["fp32", "fp16"]), default=None,
              help="Sum registers: fp32, or fp16 with half2 FMAs (default: the --dtype).")
@arch_option
@click.option("--bias", "bias_path", default=None, help="Fuse a per-channel bias (.npy, M values).")
@click.option("--activation", type=click.Choice(["none", "relu", "relu6"]), default="none",
              show_default=True, help="Fused activation.")
@click.option("--residual", is_flag=True, help="Fuse a residual add (extra input `res`).")
@plan_option
@click.option("-o", "--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Output directory (default: ./<pattern name>.sparsert).")
@click.option("--no-cache", is_flag=True, help="Compile even if the kernel cache has it.")
@click.option("--no-tuned", is_flag=True,
              help="Ignore tuned plans (./configs/tuned.json, else the shipped ones).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--allow-fp16-flush", is_flag=True,
              help="fp16: drop weights that round to zero in fp16 (and say how many).")
def command(pattern_path, sparsity, op, n, height, width, batch, stride, padding, emitter, dtype,
            accumulate, arch, bias_path, activation, residual, plan_items, out_dir, no_cache,
            no_tuned, as_json, allow_fp16_flush):
    """Generate one kernel specialised to a weight's sparsity pattern."""
    from ..build import (build_kernel, check_emitter, detect_arch, detect_gpu_name, geometry_for,
                         make_plan)
    from ..cache import KernelCache
    from ..config import check_sparsity
    from ..patterns import count_nonzeros, load_pattern
    from ..problem_shape import Epilogue, precision_label

    path = Path(pattern_path)
    try:
        precision = precision_label(dtype, accumulate or dtype)
        check_emitter(emitter, precision, arch or "sm_90")
    except UserError as exc:
        raise UserError(f"{path}: {exc.message}") from None
    if sparsity is not None:
        check_sparsity(sparsity, f"{path}: --sparsity")
    for flag, value, low in (("--n", n, 1), ("--height", height, 1), ("--width", width, 1),
                             ("--batch", batch, 1), ("--stride", stride, 1),
                             ("--padding", padding, 0)):
        if value is not None and value < low:
            raise UserError(f"{path}: {flag} must be >= {low}, got {value}")
    overrides = parse_plan_options(plan_items)
    try:
        check_plan_width(overrides, dtype)
    except UserError as exc:
        raise UserError(f"--plan {exc.message}") from None
    out = Path(out_dir) if out_dir else Path(f"{path.stem}.sparsert")
    _check_out(out)      # before the compile, which can take a minute
    weight = load_pattern(path, sparsity)
    op = _infer_op(weight, op, str(path))
    problem, weight = _problem(path, weight, op, n, height, width, batch, stride, padding)
    from ..patterns import check_matches
    check_matches(weight, problem, str(path))
    epilogue = Epilogue(_bias(bias_path, problem.out_channels), activation, residual)
    params = None
    if not no_tuned and not overrides:  # a tuned winner for this pattern, shape and GPU
        from ..patterns import pattern_hash
        from ..tune import TunedDB

        params = TunedDB(tuned_db_path()).lookup(pattern_hash(weight), geometry_for(problem),
                                                 detect_gpu_name(), precision)
    try:
        plan = make_plan(problem, weight, params, epilogue=epilogue, overrides=overrides,
                         precision=precision, allow_fp16_flush=allow_fp16_flush)
    except UserError as exc:   # fp16 range, size budgets: name the file the values came from
        source = bias_path if bias_path and exc.message.startswith("bias:") else path
        raise UserError(f"{source}: {exc.message}") from None
    flushed = count_nonzeros(weight) - plan.nnz
    if flushed:
        from ..console import err_console
        err_console.print(f"[yellow]{path}:[/] dropped {flushed} weight(s) that round to zero "
                          f"in fp16 (--allow-fp16-flush)", soft_wrap=True)
    arch = arch or detect_arch()
    cache = None if no_cache else KernelCache()
    with console.status(f"compiling {plan.nnz} nonzeros ({emitter} -> {arch} cubin)...",
                        spinner="dots") if not as_json else _null():
        build, source = build_kernel(plan, emitter, arch, cache, threads=os.cpu_count() or 1,
                                     keep_source=True)
    doc = manifest(problem, plan, build, weight, emitter)
    _write(out, {doc["source"]: source.encode(), "kernel.cubin": build.cubin,
                 "manifest.json": (json.dumps(doc, indent=2) + "\n").encode()})
    if as_json:
        print_json(doc)
        return
    from .inspect_cmd import render
    render(doc, out)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


OUTPUT_FILES = {"kernel.ptx", "kernel.cu", "kernel.cubin", "manifest.json"}


def _check_out(out: Path) -> None:
    """The output directory can be made, or is a previous `gen` output (nothing else in it)."""
    check_output(out, "-o", directory=True)
    if out.is_dir():
        try:
            foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_FILES)
        except OSError as exc:
            raise UserError(f"{out}: cannot be read ({exc.strerror or exc})") from None
        if foreign:
            raise UserError(f"{out}: holds files that are not a sparsert output "
                            f"({', '.join(foreign[:3])}); choose another -o")


def _write(out: Path, files: dict[str, bytes]) -> None:
    """Write the outputs without ever touching anything else: a new directory is filled in a
    temporary sibling and renamed into place; an existing one may hold only a previous `gen`
    output, whose files are replaced one by one (each atomically)."""
    _check_out(out)     # again: something may have appeared during the compile
    try:
        if out.exists():
            for name, data in files.items():
                tmp = out / f".{name}.tmp"
                tmp.write_bytes(data)
                os.replace(tmp, out / name)
            for stale in OUTPUT_FILES - set(files):       # e.g. kernel.cu after --emit ptx
                (out / stale).unlink(missing_ok=True)
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            for name, data in files.items():
                (tmp_dir / name).write_bytes(data)
            tmp_dir.chmod(0o755)
            os.replace(tmp_dir, out)
        except OSError:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    except OSError as exc:
        raise UserError(f"{out}: cannot write output: {exc.strerror or exc}") from None
