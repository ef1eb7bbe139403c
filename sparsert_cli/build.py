"""Problem + weight -> plan -> source -> cubin, through the cache, many kernels in parallel."""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, fields, replace
from typing import Callable, Iterable

import numpy as np

from . import __version__, limits
from .arch import block_shared_bytes
from .cache import KernelCache, cache_key
from .compile import DEFAULT_ARCH, Compiled, Resources, arch_number
from .config import EpilogueSpec
from .errors import CompileError, UserError
from .gpu.runtime import detect_arch, detect_gpu_name  # noqa: F401 (re-exported)
from .patterns import case_seed, to_csr
from .families import Family, families, family_of, family_of_params, get_family, lower
from .families.immediate import Plan, PlanParams, build_plan, fit_vector_width  # noqa: F401
from .families.immediate.fuse import VERSION as FUSED_VERSION
from .families.immediate.fuse import FusedPlan, depthwise_csr, lower_fused, plan_fused
from .families.immediate.tuning import (CODE_BUDGET, H100_SMS, LARGE_CODE,  # noqa: F401
                                         code_units)
from .families.immediate.tuning import default_params as immediate_default
from .ir import KernelIR
from .problem_shape import PRECISIONS, Epilogue, Geometry
from .problems import Problem
from .render import PrintedMismatch, get_printer, printer_for, printers

EMITTERS = ("ptx", "cuda")


def geometry_for(problem: Problem) -> Geometry:
    return Geometry(batch=problem.batch, in_channels=problem.in_channels, height=problem.height,
                    width=problem.width, out_channels=problem.out_channels,
                    kernel=problem.kernel_size, stride=problem.stride, padding=problem.padding)


def default_params(geometry: Geometry, nnz: int, sm_count: int = H100_SMS,
                   precision: str = "fp32") -> PlanParams:
    """The immediate family's rule default (families/immediate/tuning.py); "auto" plans come
    from the cost model (costmodel.choose) instead."""
    return immediate_default(geometry, nnz, precision, sm_count)


def epilogue_for(problem: Problem, spec: EpilogueSpec, seed: int, sparsity: float) -> Epilogue:
    bias = None
    if spec.bias:
        rng = np.random.default_rng(case_seed(seed, problem.id, sparsity, "bias"))
        bias = tuple(float(v) for v in rng.standard_normal(problem.out_channels).astype(np.float32))
    return Epilogue(bias=bias, activation=spec.activation, residual=spec.residual)


def make_plan(problem: Problem, weight, params: PlanParams | None = None,
              epilogue: Epilogue = Epilogue(), overrides: dict | None = None,
              precision: str = "fp32", allow_fp16_flush: bool = False, family: str = "auto",
              gpu_name: str | None = None) -> Plan:
    """Plan one kernel. `weight` is a dense array or a patterns.SparseWeight. fp16 kernels refuse
    weights and bias beyond fp16's range, and weights that round to zero unless
    `allow_fp16_flush`, which drops them (plan.nnz counts what the kernel computes)."""
    return plan_weight(geometry_for(problem), weight, params, epilogue, overrides, precision,
                       allow_fp16_flush, family, gpu_name)


def layer_family(epilogue: Epilogue, family: str = "auto") -> str:
    """The family a layer may be planned in: `family`, except that "auto" means the streamed
    family for token-major outputs and GELU (the one family that writes N x M or applies it)."""
    streamed_only = epilogue.token_major or epilogue.activation == "gelu"
    return "streamed" if streamed_only and family == "auto" else family


def plan_weight(geometry: Geometry, weight, params=None, epilogue: Epilogue = Epilogue(),
                overrides: dict | None = None, precision: str = "fp32",
                allow_fp16_flush: bool = False, family: str = "auto",
                gpu_name: str | None = None, arch: str | None = None) -> Plan:
    """make_plan() for a layer shape. params None: the cost model's choice for `gpu_name`
    (costmodel.choose) over every family (`family` "auto") or the one named, among the families
    whose parameters take `overrides`, which then apply over it, and (`arch` given) among the
    plans a block of that target holds."""
    csr, epilogue = fit_precision(to_csr(weight), epilogue, precision, allow_fp16_flush)
    dtype, accumulate = PRECISIONS[precision]
    family = layer_family(epilogue, family)
    pool = families() if family == "auto" else (get_family(family),)
    if params is None:
        from . import costmodel

        names = set(overrides or ())
        fits = [f for f in pool if names <= {x.name for x in fields(f.params)}]
        if not fits:
            raise UserError(f"no {'' if family == 'auto' else family + ' '}family takes plan "
                            f"parameter(s) {', '.join(sorted(names))}")
        chosen, params = costmodel.choose(geometry, csr, precision, gpu_name, fits, arch=arch)
    else:
        chosen = family_of_params(params)
        if chosen not in pool:
            raise UserError(f"plan {params.name()} is a {chosen.name} plan, not {family}")
    if not overrides:
        return chosen.build_plan(csr, geometry, params, epilogue, dtype, accumulate)
    try:
        return chosen.build_plan(csr, geometry, chosen.params.from_dict(
            {**params.__dict__, **overrides}), epilogue, dtype, accumulate)
    except UserError:
        if chosen.name != "immediate":
            raise
        # the batch-8+ throughput defaults and the batch-1 tall groups (tall groups, 128-512
        # threads) leave no room for some overrides (a k-split's partial sums); the latency
        # rules' plan without tall groups may
        from .families.immediate.tuning import rule_params

        base = rule_params(geometry, int(csr.nnz), precision, tall=False)
        try:
            return chosen.build_plan(csr, geometry, chosen.params.from_dict(
                {**base.__dict__, **overrides}), epilogue, dtype, accumulate)
        except UserError:
            pass
        raise


def fit_precision(csr, epilogue: Epilogue, precision: str, allow_fp16_flush: bool = False):
    """(csr, epilogue) a kernel of `precision` computes: nonzeros within the limit, no NaN/Inf,
    within fp16's range (weights that round to zero dropped if `allow_fp16_flush`, see
    _fit_fp16) or bf16's."""
    limits.check_nonzeros(csr.nnz)
    for what, values in (("weights", csr.data), ("bias", epilogue.bias or ())):
        bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        if bad:
            raise UserError(f"{what}: {bad} NaN/Inf value(s)")
    dtype, accumulate = PRECISIONS[precision]
    if dtype == "fp16":
        csr, epilogue = _fit_fp16(csr, epilogue, accumulate, allow_fp16_flush)
    if dtype == "bf16":
        _fit_bf16(csr, epilogue)
    return csr, epilogue


def _fit_fp16(csr, epilogue: Epilogue, accumulate: str, allow_flush: bool):
    """fp16 range of weights and bias. With half2 sums the weights are fp16 immediates: overflow
    is an error, and so is underflow unless `allow_flush` drops them. With fp32 sums they are
    fp32 immediates and only overflow counts (every output lands in fp16 storage). Bias is added
    in fp16 with half2 sums; with fp32 sums only its overflow counts, for the same reason."""
    half_sums = accumulate == "fp16"
    flush = limits.fp16_flush_mask(csr.data, "weights", allow_flush or not half_sums)
    if half_sums and flush.any():
        csr = csr.copy()
        csr.data[flush] = 0.0
        csr.eliminate_zeros()
    if epilogue.bias is not None:
        bias = np.asarray(epilogue.bias, dtype=np.float64)
        lost = limits.fp16_flush_mask(bias, "bias", allow_flush or not half_sums)
        if half_sums and lost.any():
            epilogue = replace(epilogue, bias=tuple(float(v) for v in np.where(lost, 0.0, bias)))
    return csr, epilogue


def _fit_bf16(csr, epilogue: Epilogue) -> None:
    """bf16 range of weights and bias: both are fp32 immediates added to fp32 sums, and bf16 has
    fp32's exponent range, so only a value that overflows the bf16 output can matter: refused.
    Underflow is not (a tiny weight still counts in the fp32 sum)."""
    for what, values in (("weights", csr.data), ("bias", epilogue.bias or ())):
        limits.bf16_overflow(np.asarray(values, dtype=np.float64), what)


def check_emitter(emitter: str, precision: str, arch: str = DEFAULT_ARCH) -> None:
    """A printer prints only its precisions; fp16 and bf16 kernels need sm_80+ (f16x2 max/min,
    packed conversions, cvt.f32.bf16)."""
    printer = get_printer(emitter)
    if precision not in printer.precisions:
        able = [name for name in printers() if precision in get_printer(name).precisions]
        raise UserError(f"{precision} kernels are emitted as {' or '.join(able).upper()} only "
                        f"(use --emit {able[0]} / emit: {able[0]})")
    if precision != "fp32" and arch_number(arch) < 80:
        raise UserError(f"{precision} kernels need sm_80 or newer, not {arch}")


def emit(plan: Plan, emitter: str, arch: str = DEFAULT_ARCH,
         dependent_launch: bool = False) -> str:
    """The plan lowered by its family to the kernel IR and printed by its printer."""
    family = family_of(plan).name
    if family == "immediate":
        check_emitter(emitter, plan.precision, arch)
    return render_source(lowered(plan, arch, dependent_launch), emitter, arch, family)


def lowered(plan: Plan, arch: str = DEFAULT_ARCH, dependent_launch: bool = False):
    """The plan's kernel IR; with dependent_launch, its entry waits for the grid before it and
    lets the next launch start (programmatic dependent launch: sm_90 and newer). A plan whose
    dynamic shared memory a block of `arch` cannot have is refused here (UserError)."""
    ir = lower(plan)
    need = getattr(plan, "dynamic_shared_bytes", 0)
    staged = getattr(ir, "staged", 0)
    if staged and (arch_number(arch) < 80          # cp.async: sm_80 and newer
                   or need + 8 * staged + 1024 > block_shared_bytes(arch)):
        ir, staged = replace(ir, staged=0), 0      # its warps load the entries as they go
    if need:                            # + the staged entries, or the warps' entry buffers
        need += 8 * staged if staged else getattr(plan, "warp_buffer_bytes", 4096)
    if need > block_shared_bytes(arch):
        raise UserError(f"plan {plan.params.name()} keeps {need >> 10} KB in shared memory; "
                        f"a block of {arch} gets at most {block_shared_bytes(arch) >> 10} KB "
                        f"(another plan, or a newer --arch)")
    if not dependent_launch:
        return ir
    require_dependent_launch(arch)
    return replace(ir, dependent_launch=True)


def require_dependent_launch(arch: str) -> None:
    """UserError unless `arch` has programmatic dependent launch (sm_90 and newer)."""
    if arch_number(arch) < 90:
        raise UserError(f"programmatic dependent launch needs sm_90 or newer, not {arch}")


def render_source(ir: KernelIR, emitter: str, arch: str = DEFAULT_ARCH,
                  family: str = "immediate") -> str:
    return printer_for(emitter, family).print_source(ir, arch)


def check_source(ir: KernelIR, emitter: str, source: str, family: str = "immediate") -> None:
    """Parse the printed source back and require it to equal `ir`, the IR the CPU check
    executes (raises render.PrintedMismatch). Printers without a parser are not checked."""
    printer = printer_for(emitter, family)
    if printer.check_printed:
        printer.check_printed(ir, source)


@dataclass(frozen=True)
class KernelBuild:
    """A compiled kernel and what the launcher needs to know about it (no plan inside: the plan
    can be large and stays with the caller)."""

    entry: str
    emitter: str
    arch: str
    cubin: bytes
    resources: Resources
    compile_seconds: float
    cached: bool
    key: str
    source_bytes: int = 0
    dependent_launch: bool = False      # launch with programmatic stream serialization


def code_version(family: Family, emitter: str) -> str:
    """Changes whenever the emitted code does (the family's lowering or the printer): part of
    the kernel cache's keys and of the tuning database's."""
    return f"{family.version}+{printer_for(emitter, family.name).version}"


def current_family(emitter: str = "ptx") -> tuple[str, str]:
    """(family, code version) of the kernels this sparsert emits with `emitter`: the registry's
    "auto" family and its code version. Tuned plans and tuning measurements are keyed by both,
    so a winner measured with other generated code is never reused."""
    family = get_family("auto")
    return family.name, code_version(family, emitter)


# where the printers put griddepcontrol (KernelIR/StreamIR.dependent_launch); part of the cache
# key of such kernels (2: the streamed family lets the next launch start first, waits per row;
# 3: and prefetches its block's pattern data into L2 before the wait; 4: none for an empty range,
# tables aligned to L2 lines)
DEPENDENT_LAUNCH_VERSION = 4


def dependent_launch_tag(streamed: bool = False) -> str:
    """The cache key's part for a dependent-launch kernel (streamed kernels: whether it
    prefetches, render.stream.PREFETCH)."""
    from .render import stream

    return f"dependent_launch-{DEPENDENT_LAUNCH_VERSION}" + (
        "-noprefetch" if streamed and not stream.PREFETCH else "")


def _key(plan: Plan, emitter: str, arch: str, dependent_launch: bool = False) -> str:
    family = family_of(plan)
    return cache_key(plan.digest(), emitter, code_version(family, emitter), arch,
                     *((dependent_launch_tag(family.name == "streamed"),) if dependent_launch
                       else ()))


def _compile(plan: Plan, emitter: str, arch: str, threads: int,
             dependent_launch: bool = False) -> tuple[Compiled, str]:
    family = family_of(plan).name
    printer = printer_for(emitter, family)
    if family == "immediate":
        check_emitter(emitter, plan.precision, arch)
    elif plan.precision not in printer.precisions:
        raise UserError(f"the {family} family cannot print {plan.precision} kernels")
    ir = lowered(plan, arch, dependent_launch)
    source = render_source(ir, emitter, arch, family)
    try:
        compiled = printer.to_cubin(source, arch, threads)
    except CompileError as exc:  # keep the failing source for the bug report
        path = _save_source(plan, emitter, source)
        raise CompileError(str(exc).splitlines()[0], exc.log, path) from None
    try:   # what the CPU check executes (the IR) is what was compiled
        check_source(ir, emitter, source, family)
    except PrintedMismatch as exc:
        raise PrintedMismatch(f"{exc} (source saved to {_save_source(plan, emitter, source)})"
                              ) from None
    return compiled, source


def _save_source(plan, emitter: str, source: str) -> str:
    suffix = (".ptx" if isinstance(plan, FusedPlan)
              else printer_for(emitter, family_of(plan).name).suffix)
    fd, path = tempfile.mkstemp(prefix=f"{plan.entry}-", suffix=suffix)
    with os.fdopen(fd, "w") as fh:
        fh.write(source)
    return path


def build_kernel(plan: Plan, emitter: str = "ptx", arch: str = DEFAULT_ARCH,
                 cache: KernelCache | None = None, threads: int = 1,
                 keep_source: bool = False, dependent_launch: bool = False
                 ) -> tuple[KernelBuild, str | None]:
    """Compile one plan (or fetch it from the cache). Returns the build and, with keep_source,
    the generated source (emitted again on a cache hit: it is cheap next to compiling).
    dependent_launch: see lowered()."""
    key = _key(plan, emitter, arch, dependent_launch)
    hit = cache.get(key) if cache else None
    source = None
    if hit:
        compiled, extra = hit
        cached = True
        size = int(extra.get("source_bytes", 0))
    else:
        compiled, source = _compile(plan, emitter, arch, threads, dependent_launch)
        size = len(source)
        cached = False
        if cache:
            cache.put(key, compiled, {"entry": plan.entry, "source_bytes": size,
                                      "sparsert": __version__})
    if keep_source and source is None:
        source = emit(plan, emitter, arch, dependent_launch)
    build = KernelBuild(plan.entry, emitter, arch, compiled.cubin,
                        compiled.entry_resources(plan.entry), compiled.seconds, cached, key, size,
                        dependent_launch)
    return build, source if keep_source else None


# ---- fused pointwise -> depthwise kernels (families/immediate/fuse.py) ----------------------
def plan_fused_layers(pw_weight, geometry: Geometry, dw_weight, stride: int,
                      pw_epilogue: Epilogue = Epilogue(), dw_epilogue: Epilogue = Epilogue(),
                      precision: str = "fp32", allow_fp16_flush: bool = False,
                      rows_per_group: int | None = None, vector_width: int | None = None,
                      depthwise_pairs: bool | None = None) -> FusedPlan:
    """The fused plan of a pointwise layer (weight M x C x 1 x 1 over `geometry`) and the
    depthwise 3x3 after it (weight M x 3 x 3, padding 1, `stride`), both fitted to the
    precision as plan_weight fits a layer (fit_precision)."""
    pw_csr, pw_epilogue = fit_precision(to_csr(pw_weight), pw_epilogue, precision,
                                        allow_fp16_flush)
    dw_csr = depthwise_csr(dw_weight, geometry.out_channels)
    dw_csr, dw_epilogue = fit_precision(dw_csr, dw_epilogue, precision, allow_fp16_flush)
    return plan_fused(pw_csr, geometry, dw_csr, stride, pw_epilogue, dw_epilogue, precision,
                      rows_per_group, vector_width, depthwise_pairs)


def fused_code_version() -> str:
    """Changes whenever a fused kernel's code does: the fusion's, the immediate family's
    lowering and the PTX printer's versions."""
    return f"{FUSED_VERSION}+{get_family('immediate').version}+{get_printer('ptx').version}"


def emit_fused(plan: FusedPlan, emitter: str = "ptx", arch: str = DEFAULT_ARCH,
               dependent_launch: bool = False) -> str:
    """The fused plan's ChainIR, printed (PTX only)."""
    if emitter != "ptx":
        raise UserError("fused kernels print only as PTX (emit ptx)")
    check_emitter(emitter, plan.precision, arch)
    if dependent_launch:
        require_dependent_launch(arch)
    return render_source(lower_fused(plan, dependent_launch), emitter, arch)


def build_fused(plan: FusedPlan, arch: str = DEFAULT_ARCH, cache: KernelCache | None = None,
                threads: int = 1, keep_source: bool = False, dependent_launch: bool = False
                ) -> tuple[KernelBuild, str | None]:
    """Compile a fused plan (or fetch it from the cache) as build_kernel compiles a plan: its
    printed PTX is parsed back and must equal the ChainIR the CPU interpreter runs."""
    check_emitter("ptx", plan.precision, arch)
    if dependent_launch:
        require_dependent_launch(arch)
    key = _fused_key(plan, arch, dependent_launch)
    hit = cache.get(key) if cache else None
    source = None
    if hit:
        compiled, extra = hit
        size = int(extra.get("source_bytes", 0))
    else:
        printer = get_printer("ptx")
        chain = lower_fused(plan, dependent_launch)
        source = printer.print_source(chain, arch)
        try:
            compiled = printer.to_cubin(source, arch, threads)
        except CompileError as exc:
            path = _save_source(plan, "ptx", source)
            raise CompileError(str(exc).splitlines()[0], exc.log, path) from None
        try:
            printer.check_printed(chain, source)
        except PrintedMismatch as exc:
            raise PrintedMismatch(f"{exc} (source saved to {_save_source(plan, 'ptx', source)})"
                                  ) from None
        size = len(source)
        if cache:
            cache.put(key, compiled, {"entry": plan.entry, "source_bytes": size,
                                      "sparsert": __version__})
    if keep_source and source is None:
        source = emit_fused(plan, "ptx", arch, dependent_launch)
    build = KernelBuild(plan.entry, "ptx", arch, compiled.cubin,
                        compiled.entry_resources(plan.entry), compiled.seconds, bool(hit), key,
                        size, dependent_launch)
    return build, source if keep_source else None


def _fused_key(plan: FusedPlan, arch: str, dependent_launch: bool = False) -> str:
    return cache_key(plan.digest(), "ptx", fused_code_version(), arch,
                     *((dependent_launch_tag(),) if dependent_launch else ()))


def _any_key(plan: Plan | FusedPlan, emitter: str, arch: str,
             dependent_launch: bool = False) -> str:
    if isinstance(plan, FusedPlan):
        return _fused_key(plan, arch, dependent_launch)
    return _key(plan, emitter, arch, dependent_launch)


def _worker(plan: Plan | FusedPlan, emitter: str, arch: str, cache_root: str | None,
            threads: int, dependent_launch: bool = False):
    cache = KernelCache(cache_root) if cache_root is not None else None
    start = time.perf_counter()
    if isinstance(plan, FusedPlan):
        build, _ = build_fused(plan, arch, cache, threads, dependent_launch=dependent_launch)
    else:
        build, _ = build_kernel(plan, emitter, arch, cache, threads,
                                dependent_launch=dependent_launch)
    return build, time.perf_counter() - start


def _code_units(plan: Plan | FusedPlan) -> int:
    width = (plan.pointwise if isinstance(plan, FusedPlan) else plan).vector_width
    return code_units(plan.nnz, width, plan.precision)


def build_all(plans: Iterable[Plan | FusedPlan], emitter: str = "ptx", arch: str = DEFAULT_ARCH,
              cache: KernelCache | None = None, jobs: int | None = None,
              on_done: Callable[[int, KernelBuild | Exception, float], None] | None = None,
              dependent_launch: bool = False) -> list[KernelBuild | Exception]:
    """Compile many plans (fused plans too: build_fused, PTX) across processes. Cache hits are
    served in this process; a failure is returned in place of its build (and reported through
    on_done), never raised. An interrupt (Ctrl-C) cancels the queued compiles, ends the running
    ones and propagates."""
    plans = list(plans)
    results: list[KernelBuild | Exception | None] = [None] * len(plans)
    todo = []
    for i, plan in enumerate(plans):
        key = _any_key(plan, emitter, arch, dependent_launch) if cache else None
        hit = cache.get(key) if cache else None
        if hit:
            compiled, extra = hit
            results[i] = KernelBuild(plan.entry, emitter, arch, compiled.cubin,
                                     compiled.entry_resources(plan.entry), compiled.seconds, True,
                                     key, int(extra.get("source_bytes", 0)), dependent_launch)
            if on_done:
                on_done(i, results[i], 0.0)
        else:
            todo.append(i)
    cores = os.cpu_count() or 1
    # Compiles run in worker processes unless the caller asks for jobs=1: Ctrl-C can end a
    # worker at once, not a compile running in this process.
    serial = jobs == 1 or not todo
    jobs = max(1, min(jobs or cores, len(todo) or 1))
    threads = max(1, cores // jobs)
    # Workers store into the cache only when it can take them (else: one warning, here).
    root = str(cache.root) if cache and todo and cache.usable() else None
    if serial:
        for i in todo:
            try:
                build, seconds = _worker(plans[i], emitter, arch, root, threads,
                                         dependent_launch)
                results[i] = build
            except Exception as exc:  # noqa: BLE001 - reported per kernel, not fatal to the run
                results[i], seconds = exc, 0.0
            if on_done:
                on_done(i, results[i], seconds)
        return results
    context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    # Biggest kernels first so the long poles start early.
    todo.sort(key=lambda i: -_code_units(plans[i]))
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_ignore_sigint)
    try:
        futures = {pool.submit(_worker, plans[i], emitter, arch, root, threads,
                               dependent_launch): i for i in todo}
        pending = set(futures)
        while pending:
            # Wake up twice a second: once NVRTC has run in this process, its signal handlers
            # no longer interrupt a blocking wait, and Ctrl-C would wait for the next kernel.
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for future in done:
                i = futures[future]
                try:
                    results[i], seconds = future.result()
                except Exception as exc:  # noqa: BLE001
                    results[i], seconds = exc, 0.0
                if on_done:
                    on_done(i, results[i], seconds)
    except BaseException:
        _stop(pool)     # Ctrl-C (or an error in on_done): drop the queue, end the compiles now
        raise
    pool.shutdown()
    return results


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the parent, which ends them (no traceback from each worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel every queued compile and end the running ones: a plain shutdown would first finish
    the whole queue (a minute for a cold paper20 run)."""
    workers = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in workers:
        if process.is_alive():
            process.terminate()
    for process in workers:
        process.join(timeout=2)
