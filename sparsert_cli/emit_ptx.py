"""Plan -> PTX text. Prints the plan; decides nothing about what is computed.

Layout: one `.func` per (row group, slice) holding that slice's straight-line loads and FMAs
(weights as hex-float immediates, tap offsets as immediate address offsets), plus one small `.func`
per (row group, thread row) for the shared-memory reduction when k_split > 1. The entry computes each
thread's column bases once and jumps through a `brx.idx` table on (blockIdx.y, threadIdx.y).
Short functions keep ptxas close to linear in the number of nonzeros (LAB_NOTES §1).

Precisions (plan.precision): fp32; fp16 storage with half2 sums (`fma.rn.f16x2`, one instruction
per nonzero and column *pair*, weights as paired immediates); fp16 storage with fp32 sums (loads
widened with cvt, stores packed with cvt.rn.f16x2.f32).
"""

from __future__ import annotations

import struct

import numpy as np

from . import __version__
from .compile import arch_number
from .plan import Load, Plan, RowGroup

EMITTER_VERSION = "ptx-2"
INLINE_LIMIT = 16384
PARTIALS = "sparsert_partials"
_VEC = {1: "", 2: ".v2", 4: ".v4"}


def f32(value: float) -> str:
    """A float32 as a PTX hex immediate (exact)."""
    return "0f%08X" % struct.unpack("<I", struct.pack("<f", value))[0]


def f16_bits(value: float) -> int:
    """The fp16 bit pattern of `value` (round to nearest even)."""
    return int(np.array([value], dtype=np.float16).view(np.uint16)[0])


class _Fmt:
    """How one plan's numbers are stored, loaded and summed.

    raw:   the registers one vector load fills (fp32: one .f32 per column; fp16: one .b32 per
           column pair, or one .b16 for a single column);
    units: the registers one row's partial sum occupies (fp32 sums: one .f32 per column; fp16
           sums: the raw registers, summed with .f16x2 / .f16 arithmetic).
    """

    def __init__(self, plan: Plan):
        self.width = plan.vector_width
        self.elem = plan.element_bytes
        self.half_storage = plan.dtype == "fp16"
        self.half_acc = plan.accumulate == "fp16"
        w = self.width
        if self.half_storage:
            self.raw_count, self.raw_type = (1, "b16") if w == 1 else (w // 2, "b32")
        else:
            self.raw_count, self.raw_type = w, "f32"
        if self.half_acc:
            self.units, self.unit_type = self.raw_count, self.raw_type
            self.op = "f16" if w == 1 else "f16x2"
        else:
            self.units, self.unit_type, self.op = w, "f32", "f32"

    def ld_type(self) -> str:
        return f"{_VEC[self.raw_count]}.{self.raw_type}"

    def const(self, fn: _Func, value: float) -> str:
        """`value` as an operand of the sum's arithmetic (fp16: a register ptxas folds into the
        instruction as a paired immediate; PTX has no f16 immediates)."""
        if not self.half_acc:
            return f32(value)
        bits = f16_bits(value)
        if self.width == 1:
            fn.emit(f"mov.b16 %wh, 0x{bits:04X};")
            return "%wh"
        fn.emit(f"mov.b32 %w, 0x{bits:04X}{bits:04X};")
        return "%w"


def ptx_version(arch: str) -> str:
    """The oldest PTX ISA that knows `arch` (sm_88 and sm_110 arrived with ISA 9.0)."""
    number = arch_number(arch)
    if number in (88, 110) or number > 121:
        return "9.0"
    return "8.0" if number < 100 else "8.8"


def _vec(regs: list[str]) -> str:
    return regs[0] if len(regs) == 1 else "{" + ", ".join(regs) + "}"


class _Func:
    """Collects one function's body and the registers it needs."""

    def __init__(self):
        self.lines: list[str] = []

    def emit(self, line: str) -> None:
        self.lines.append("\t" + line)


def _params(plan: Plan) -> list[tuple[str, str]]:
    params = [("u64", "x"), ("u64", "y")]
    if plan.epilogue.residual:
        params.append(("u64", "res"))
    if plan.geometry.masked:
        params += [("u64", "z"), ("u32", "ih"), ("u32", "iw")]
    params.append(("u32", "act"))
    if plan.k_split > 1:
        params.append(("u32", "sp"))
    return params


def _func_header(name: str, plan: Plan) -> list[str]:
    decl = ", ".join(f".param .{t} p_{n}" for t, n in _params(plan))
    lines = [f".func {name}({decl})", "{"]
    for t, n in _params(plan):
        lines.append(f"\t.reg .{t} %{n};")
        lines.append(f"\tld.param.{t} %{n}, [p_{n}];")
    return lines


def _emit_tap_bases(fn: _Func, plan: Plan, loads: tuple[Load, ...]) -> dict[tuple[int, int], str]:
    """Per kernel tap (r, s): the base register its loads use, chosen once per function.

    A tap whose window position falls in the padding reads from the all-zero buffer instead of x,
    at the same immediate offset: no per-load branch or select, and no out-of-bounds read
    (zeros + c*H*W stays inside a one-image zero buffer). Predicated loads were avoided on purpose:
    ptxas 13.5 hit an internal error on them for sm_90.
    """
    geo = plan.geometry
    used = sorted({geo.tap_rs(ld.tap)[1:] for ld in loads})
    if not geo.masked:
        return {rs: "%x" for rs in used}
    if not used:
        return {}
    fn.emit(".reg .u32 %t;")
    fn.emit(f".reg .pred %pr<{geo.kernel}>, %pc<{geo.kernel}>, %pm;")
    fn.emit(f".reg .u64 %zb, %xb<{geo.kernel ** 2}>;")
    # (ih + r) < H as unsigned also rejects ih + r < 0: one compare per bound pair.
    for r in sorted({r for r, _ in used}):
        fn.emit(f"add.u32 %t, %ih, {r};")
        fn.emit(f"setp.lt.u32 %pr{r}, %t, {geo.height};")
    for s in sorted({s for _, s in used}):
        fn.emit(f"add.u32 %t, %iw, {s};")
        fn.emit(f"setp.lt.u32 %pc{s}, %t, {geo.width};")
    bases = {}
    for r, s in used:
        base = f"%xb{r * geo.kernel + s}"
        fn.emit(f"and.pred %pm, %pr{r}, %pc{s};")
        fn.emit(f"add.s64 %zb, %z, {-(r * geo.width + s) * plan.element_bytes};")
        fn.emit(f"selp.b64 {base}, %x, %zb, %pm;")
        bases[(r, s)] = base
    return bases


def _emit_epilogue_store(fn: _Func, fmt: _Fmt, plan: Plan, row: int, regs: list[str]) -> None:
    """Bias, residual, activation, then the store of one row; `regs` are the row's sum units."""
    geo, epi = plan.geometry, plan.epilogue
    offset = row * geo.out_pixels * fmt.elem
    op = fmt.op
    if epi.bias is not None and epi.bias[row] != 0.0:
        bias = fmt.const(fn, epi.bias[row])
        for reg in regs:
            fn.emit(f"add.{op} {reg}, {reg}, {bias};")
    if epi.residual:
        raw = [f"%r{u}" for u in range(fmt.raw_count)]
        fn.emit(f"ld.global.nc{fmt.ld_type()} {_vec(raw)}, [%res+{offset}];")
        addends = raw if fmt.half_acc or not fmt.half_storage else _widen(fn, fmt, raw, "%q")
        for reg, t in zip(regs, addends):
            fn.emit(f"add.{op} {reg}, {reg}, {t};")
    if epi.activation in ("relu", "relu6"):
        zero = fmt.const(fn, 0.0)
        for reg in regs:
            fn.emit(f"max.{op} {reg}, {reg}, {zero};")
    if epi.activation == "relu6":
        six = fmt.const(fn, 6.0)
        for reg in regs:
            fn.emit(f"min.{op} {reg}, {reg}, {six};")
    if fmt.half_storage and not fmt.half_acc:     # pack fp32 sums to fp16
        if fmt.width == 1:
            fn.emit(f"cvt.rn.f16.f32 %h0, {regs[0]};")
            regs = ["%h0"]
        else:
            packed = [f"%p{u}" for u in range(fmt.raw_count)]
            for u, p in enumerate(packed):   # the first column goes to the low half
                fn.emit(f"cvt.rn.f16x2.f32 {p}, {regs[2 * u + 1]}, {regs[2 * u]};")
            regs = packed
    fn.emit(f"@%pact st.global{fmt.ld_type()} [%y+{offset}], {_vec(regs)};")


def _widen(fn: _Func, fmt: _Fmt, raw: list[str], prefix: str, first: int = 0) -> list[str]:
    """fp16 raw registers -> fp32 registers prefix<first>.., one per column."""
    out = [f"{prefix}{first + lane}" for lane in range(fmt.width)]
    if fmt.width == 1:
        fn.emit(f"cvt.f32.f16 {out[0]}, {raw[0]};")
        return out
    for u, reg in enumerate(raw):
        fn.emit(f"mov.b32 {{%h0, %h1}}, {reg};")
        fn.emit(f"cvt.f32.f16 {out[2 * u]}, %h0;")
        fn.emit(f"cvt.f32.f16 {out[2 * u + 1]}, %h1;")
    return out


def _declare(fn: _Func, fmt: _Fmt, sums: int, raws: int) -> None:
    """Registers of a body: %a sums, %b raw loads, %r/%q residual, %h/%p/%w scratch, %c widened."""
    fn.emit(f".reg .{fmt.unit_type} %a<{sums}>;")
    fn.emit(f".reg .{fmt.raw_type} %b<{raws}>, %r<{fmt.raw_count}>;")
    fn.emit(f".reg .f32 %q<{fmt.width}>, %c<{raws // fmt.raw_count * fmt.width}>;")
    fn.emit(".reg .b16 %h<2>, %wh;")
    fn.emit(f".reg .b32 %p<{fmt.raw_count}>, %w;")
    fn.emit(".reg .pred %pact;")
    fn.emit("setp.ne.u32 %pact, %act, 0;")


def _shared_chunks(fmt: _Fmt, regs: list[str]):
    """A row's partial-sum units as (byte offset, vector suffix, type, registers) shared accesses
    of at most 16 bytes."""
    unit_bytes = 2 if fmt.unit_type == "b16" else 4
    for start in range(0, len(regs), 4):
        chunk = regs[start:start + 4]
        yield start * unit_bytes, _VEC[len(chunk)], fmt.unit_type, chunk


def _partial_offset(plan: Plan, index: int, slot: int) -> int:
    return ((index * plan.rows_max + slot) * plan.col_threads) * plan.vector_width * plan.acc_bytes


def _slice_body(plan: Plan, group: RowGroup, index: int) -> list[str]:
    geo = plan.geometry
    fmt = _Fmt(plan)
    units, raw = fmt.units, fmt.raw_count
    loads = group.slices[index]
    rows = len(group.rows)
    batch = plan.params.load_batch
    fn = _Func()
    _declare(fn, fmt, rows * units, batch * raw)
    bases = _emit_tap_bases(fn, plan, loads)
    touched: set[int] = set()
    for start in range(0, len(loads), batch):
        chunk = loads[start:start + batch]
        sources = []
        for i, load in enumerate(chunk):
            regs = [f"%b{i * raw + u}" for u in range(raw)]
            base = bases[geo.tap_rs(load.tap)[1:]]
            fn.emit(f"ld.global.nc{fmt.ld_type()} {_vec(regs)}, "
                    f"[{base}+{geo.tap_offset(load.tap) * fmt.elem}];")
            sources.append(regs)
        if fmt.half_storage and not fmt.half_acc:
            sources = [_widen(fn, fmt, regs, "%c", i * fmt.width)
                       for i, regs in enumerate(sources)]
        for load, srcs in zip(chunk, sources):
            for slot, value in load.uses:
                weight = fmt.const(fn, value)
                for u in range(units):
                    acc = f"%a{slot * units + u}"
                    if slot in touched:
                        fn.emit(f"fma.rn.{fmt.op} {acc}, {srcs[u]}, {weight}, {acc};")
                    else:
                        fn.emit(f"mul.rn.{fmt.op} {acc}, {srcs[u]}, {weight};")
                touched.add(slot)
    for slot in range(rows):
        if slot not in touched:
            for u in range(units):
                fn.emit(f"mov.b{16 if fmt.unit_type == 'b16' else 32} %a{slot * units + u}, 0;")
    for slot, row in enumerate(group.rows):
        regs = [f"%a{slot * units + u}" for u in range(units)]
        if plan.k_split == 1:
            _emit_epilogue_store(fn, fmt, plan, row, regs)
        else:
            offset = _partial_offset(plan, index, slot)
            for extra, vec, typ, chunk_regs in _shared_chunks(fmt, regs):
                fn.emit(f"st.shared{vec}.{typ} [%sp+{offset + extra}], {_vec(chunk_regs)};")
    return fn.lines


def _reduce_body(plan: Plan, group: RowGroup, thread_row: int) -> list[str]:
    fmt = _Fmt(plan)
    units = fmt.units
    fn = _Func()
    _declare(fn, fmt, 2 * units, 1)
    acc = [f"%a{u}" for u in range(units)]
    part = [f"%a{units + u}" for u in range(units)]
    for slot, row in enumerate(group.rows):
        if slot % plan.k_split != thread_row:
            continue
        for index in range(plan.k_split):
            offset = _partial_offset(plan, index, slot)
            target = acc if index == 0 else part
            for extra, vec, typ, chunk_regs in _shared_chunks(fmt, target):
                fn.emit(f"ld.shared{vec}.{typ} {_vec(chunk_regs)}, [%sp+{offset + extra}];")
            if index:
                for a, b in zip(acc, part):
                    fn.emit(f"add.{fmt.op} {a}, {a}, {b};")
        _emit_epilogue_store(fn, fmt, plan, row, acc)
    return fn.lines


def _entry(plan: Plan, phases: list[list[list[str]]], inline: bool) -> list[str]:
    """The kernel entry. `phases` holds, per phase (compute, then reduce), one body per jump-table
    slot; with `inline` the bodies are scoped blocks inside the entry, else calls to g{i}p{phase}."""
    geo, width = plan.geometry, plan.vector_width
    params = [f".param .u64 arg_{name}" for name in plan.arguments]
    call_args = ", ".join(f"%{n}" for _, n in _params(plan))
    lines = [f".visible .entry {plan.entry}({', '.join(params)})",
             f".maxntid {plan.col_threads}, {plan.k_split}, 1"]
    if plan.params.max_registers:
        lines.append(f".maxnreg {plan.params.max_registers}")
    lines.append("{")
    e = lines.append
    e("\t.reg .u32 %tx, %ty, %bx, %by, %j, %img, %pix, %oh, %ow, %act, %idx, %sp;")
    e("\t.reg .s32 %ih, %iw, %inoff, %outoff;")
    e("\t.reg .u64 %x, %y, %res, %z, %w;")
    e("\t.reg .pred %pa;")
    for arg in plan.arguments:
        e(f"\tld.param.u64 %{arg}, [arg_{arg}];")
        e(f"\tcvta.to.global.u64 %{arg}, %{arg};")
    e("\tmov.u32 %tx, %tid.x;")
    e("\tmov.u32 %ty, %tid.y;")
    e("\tmov.u32 %bx, %ctaid.x;")
    e("\tmov.u32 %by, %ctaid.y;")
    e(f"\tmad.lo.u32 %j, %bx, {plan.col_threads}, %tx;")
    e(f"\tmul.lo.u32 %j, %j, {width};")
    e(f"\tsetp.lt.u32 %pa, %j, {geo.columns};")
    e("\tselp.u32 %act, 1, 0, %pa;")
    # Idle threads of the last tile compute a valid column and skip the store: no OOB loads.
    e(f"\tmin.u32 %j, %j, {geo.columns - width};")
    e(f"\tdiv.u32 %img, %j, {geo.out_pixels};")
    e(f"\trem.u32 %pix, %j, {geo.out_pixels};")
    e(f"\tdiv.u32 %oh, %pix, {geo.out_width};")
    e(f"\trem.u32 %ow, %pix, {geo.out_width};")
    e(f"\tmul.lo.s32 %ih, %oh, {geo.stride};")
    e(f"\tsub.s32 %ih, %ih, {geo.padding};")
    e(f"\tmul.lo.s32 %iw, %ow, {geo.stride};")
    e(f"\tsub.s32 %iw, %iw, {geo.padding};")
    e(f"\tmul.lo.s32 %inoff, %img, {geo.image_elems};")
    e(f"\tmad.lo.s32 %inoff, %ih, {geo.width}, %inoff;")
    e("\tadd.s32 %inoff, %inoff, %iw;")
    e(f"\tmul.lo.s32 %outoff, %img, {geo.out_channels * geo.out_pixels};")
    e("\tadd.s32 %outoff, %outoff, %pix;")
    for arg, off in [("x", "%inoff"), ("y", "%outoff")] + (
            [("res", "%outoff")] if plan.epilogue.residual else []):
        e(f"\tmul.wide.s32 %w, {off}, {plan.element_bytes};")
        e(f"\tadd.s64 %{arg}, %{arg}, %w;")
    e(f"\tmad.lo.u32 %idx, %by, {plan.k_split}, %ty;")
    if plan.k_split > 1:
        e(f"\tmov.u32 %sp, {PARTIALS};")
        e(f"\tmad.lo.u32 %sp, %tx, {width * plan.acc_bytes}, %sp;")
    for phase, bodies in enumerate(phases):
        if not bodies:
            continue
        if phase:
            e("\tbar.sync 0;")
        targets = [f"L{phase}_{i}" for i in range(len(bodies))]
        e(f"\tT{phase}: .branchtargets {', '.join(targets)};")
        e(f"\tbrx.idx.uni %idx, T{phase};")
        for i, (target, body) in enumerate(zip(targets, bodies)):
            e(f"{target}:")
            if inline:
                lines += ["\t{"] + ["\t" + line for line in body] + ["\t}"]
            else:
                e(f"\tcall.uni {_func_name(i, phase)}, ({call_args});")
            e(f"\tbra.uni DONE{phase};")
        e(f"DONE{phase}:")
    e("\tret;")
    e("}")
    return lines


def _func_name(slot: int, phase: int) -> str:
    return f"g{slot}p{phase}"


def emit_ptx(plan: Plan, arch: str = "sm_90", inline_limit: int = INLINE_LIMIT) -> str:
    """PTX for `plan`. Kernels of at most `inline_limit` FMA lanes (nnz x vector width) get their
    bodies inline in the entry; larger ones one `.func` per body, which keeps ptxas near-linear at
    the price of an ABI save/restore of a few registers per call."""
    header = [f"// Generated by sparsert {__version__} ({EMITTER_VERSION}): {plan.params.name()}, "
              f"{plan.nnz} nonzeros, {len(plan.groups)} row groups",
              f".version {ptx_version(arch)}", f".target {arch}", ".address_size 64", ""]
    body: list[str] = []
    if plan.k_split > 1:
        body.append(f".shared .align 16 .b8 {PARTIALS}[{plan.shared_bytes}];")
    phases = [[_slice_body(plan, g, si) for g in plan.groups for si in range(plan.k_split)]]
    if plan.k_split > 1:
        phases.append([_reduce_body(plan, g, ty) for g in plan.groups
                       for ty in range(plan.k_split)])
    inline = plan.nnz * plan.vector_width <= inline_limit
    if not inline:
        for phase, bodies in enumerate(phases):
            for slot, lines in enumerate(bodies):
                body += (_func_header(_func_name(slot, phase), plan) + lines + ["\tret;", "}"])
    return "\n".join(header + body + _entry(plan, phases, inline)) + "\n"
