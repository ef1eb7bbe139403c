"""`sparsert gen`: one pattern -> kernel source, cubin and manifest.json."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ..console import console, print_json
from ..errors import UserError
from ..options import (arch_option, check_family, check_plan_width, family_option,
                       parse_plan_options, plan_option)
from ..paths import check_output, tuned_db_path
from ..problem_shape import ACTIVATIONS, DTYPES

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
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True,
              help="Storage of x, y and the residual.")
@click.option("--accumulate", type=click.Choice(["fp32", "fp16"]), default=None,
              help="Sum registers: fp32, or fp16 with half2 FMAs (default: the --dtype; fp32 "
                   "for bf16).")
@arch_option
@click.option("--bias", "bias_path", default=None, help="Fuse a per-channel bias (.npy, M values).")
@click.option("--activation", type=click.Choice(list(ACTIVATIONS)), default="none",
              show_default=True, help="Fused activation (gelu: exact, erf; streamed family).")
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
@family_option
def command(pattern_path, sparsity, op, n, height, width, batch, stride, padding, emitter, dtype,
            accumulate, arch, bias_path, activation, residual, plan_items, out_dir, no_cache,
            no_tuned, as_json, allow_fp16_flush, family):
    """Generate one kernel specialised to a weight's sparsity pattern."""
    from ..api import Layer, compile_layer, plan_for
    from ..build import check_emitter, detect_arch, detect_gpu_name, geometry_for
    from ..cache import KernelCache
    from ..config import check_sparsity
    from ..patterns import count_nonzeros, load_pattern
    from ..problem_shape import Epilogue, precision_label
    from ..tune import TunedDB

    path = Path(pattern_path)
    check_family(family)
    try:
        precision = precision_label(dtype, accumulate)
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
    overrides = parse_plan_options(plan_items, family)
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
    layer = Layer(path.stem, "gemm" if op == "gemm" else "conv", weight, geometry_for(problem),
                  epilogue, precision, plan=overrides or "auto",
                  allow_fp16_flush=allow_fp16_flush, family=family or "auto")
    # --plan gives the parameters outright: no tuned winner replaces them
    tuned = False if no_tuned or overrides else TunedDB(tuned_db_path())
    try:
        planned = plan_for(layer, tuned, detect_gpu_name(), emitter, arch or detect_arch())
    except UserError as exc:   # fp16 range, size budgets: name the file the values came from
        source = bias_path if bias_path and exc.message.startswith("bias:") else path
        raise UserError(f"{source}: {exc.message}") from None
    flushed = count_nonzeros(weight) - planned[0].nnz
    if flushed:
        from ..console import err_console
        err_console.print(f"[yellow]{path}:[/] dropped {flushed} weight(s) that round to zero "
                          f"in fp16 (--allow-fp16-flush)", soft_wrap=True)
    arch = arch or detect_arch()
    with console.status(f"compiling {planned[0].nnz} nonzeros ({emitter} -> {arch} cubin), "
                        f"then checking it on the CPU...",
                        spinner="dots") if not as_json else _null():
        kernel = compile_layer(layer, planned, emit=emitter, arch=arch,
                               cache=None if no_cache else KernelCache()).verify()
    if not kernel.verified["ok"]:    # never write a kernel the CPU check rejects
        raise UserError(f"{path}: the generated kernel {kernel.entry} failed its CPU check "
                        f"({kernel.verified['message']}); nothing written", code=1)
    _check_out(out)     # again: something may have appeared during the compile
    kernel.save(out)
    doc = kernel.manifest()
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




def _check_out(out: Path) -> None:
    """The output directory can be made, or is a previous `gen` output (nothing else in it)."""
    from ..api import OUTPUT_FILES    # source, cubin, manifest.json, weights.npz
    check_output(out, "-o", directory=True)
    if out.is_dir():
        try:
            foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_FILES)
        except OSError as exc:
            raise UserError(f"{out}: cannot be read ({exc.strerror or exc})") from None
        if foreign:
            raise UserError(f"{out}: holds files that are not a sparsert output "
                            f"({', '.join(foreign[:3])}); choose another -o")
