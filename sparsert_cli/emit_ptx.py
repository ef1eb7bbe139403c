"""Plan -> PTX text. Prints the plan; decides nothing about what is computed.

Layout: one `.func` per (row group, slice) holding that slice's straight-line loads and FMAs
(weights as hex-float immediates, tap offsets as immediate address offsets), plus one small `.func`
per (row group, thread row) for the shared-memory reduction when k_split > 1. The entry computes each
thread's column bases once and jumps through a `brx.idx` table on (blockIdx.y, threadIdx.y).
Short functions keep ptxas close to linear in the number of nonzeros (LAB_NOTES §1).
"""

from __future__ import annotations

import struct

from . import __version__
from .plan import Load, Plan, RowGroup

EMITTER_VERSION = "ptx-1"
INLINE_LIMIT = 16384
PARTIALS = "sparsert_partials"
_VEC = {1: "", 2: ".v2", 4: ".v4"}


def f32(value: float) -> str:
    """A float32 as a PTX hex immediate (exact)."""
    return "0f%08X" % struct.unpack("<I", struct.pack("<f", value))[0]


def ptx_version(arch: str) -> str:
    """The oldest PTX ISA that knows `arch` (sm_88 and sm_110 arrived with ISA 9.0)."""
    number = int(arch[3:].rstrip("a"))
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


def _acc(slot: int, lane: int, width: int) -> str:
    return f"%a{slot * width + lane}"


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
        fn.emit(f"add.s64 %zb, %z, {-(r * geo.width + s) * 4};")
        fn.emit(f"selp.b64 {base}, %x, %zb, %pm;")
        bases[(r, s)] = base
    return bases


def _emit_epilogue_store(fn: _Func, plan: Plan, slot: int, row: int, regs: list[str]) -> None:
    geo, width, epi = plan.geometry, plan.vector_width, plan.epilogue
    offset = row * geo.out_pixels * 4
    if epi.bias is not None and epi.bias[row] != 0.0:
        for reg in regs:
            fn.emit(f"add.f32 {reg}, {reg}, {f32(epi.bias[row])};")
    if epi.residual:
        tmp = [f"%r{lane}" for lane in range(width)]
        fn.emit(f"ld.global.nc{_VEC[width]}.f32 {_vec(tmp)}, [%res+{offset}];")
        for reg, t in zip(regs, tmp):
            fn.emit(f"add.f32 {reg}, {reg}, {t};")
    if epi.activation in ("relu", "relu6"):
        for reg in regs:
            fn.emit(f"max.f32 {reg}, {reg}, 0f00000000;")
    if epi.activation == "relu6":
        for reg in regs:
            fn.emit(f"min.f32 {reg}, {reg}, {f32(6.0)};")
    fn.emit(f"@%pact st.global{_VEC[width]}.f32 [%y+{offset}], {_vec(regs)};")


def _slice_body(plan: Plan, group: RowGroup, index: int) -> list[str]:
    geo, width = plan.geometry, plan.vector_width
    loads = group.slices[index]
    rows = len(group.rows)
    batch = plan.params.load_batch
    fn = _Func()
    fn.emit(f".reg .f32 %a<{rows * width}>, %b<{batch * width}>, %r<{width}>;")
    fn.emit(".reg .pred %pact;")
    fn.emit("setp.ne.u32 %pact, %act, 0;")
    bases = _emit_tap_bases(fn, plan, loads)
    touched: set[int] = set()
    for start in range(0, len(loads), batch):
        chunk = loads[start:start + batch]
        for i, load in enumerate(chunk):
            regs = [f"%b{i * width + lane}" for lane in range(width)]
            base = bases[geo.tap_rs(load.tap)[1:]]
            fn.emit(f"ld.global.nc{_VEC[width]}.f32 {_vec(regs)}, "
                    f"[{base}+{geo.tap_offset(load.tap) * 4}];")
        for i, load in enumerate(chunk):
            for slot, value in load.uses:
                for lane in range(width):
                    acc, src = _acc(slot, lane, width), f"%b{i * width + lane}"
                    if slot in touched:
                        fn.emit(f"fma.rn.f32 {acc}, {src}, {f32(value)}, {acc};")
                    else:
                        fn.emit(f"mul.rn.f32 {acc}, {src}, {f32(value)};")
                touched.add(slot)
    for slot in range(rows):
        if slot not in touched:
            for lane in range(width):
                fn.emit(f"mov.b32 {_acc(slot, lane, width)}, 0f00000000;")
    for slot, row in enumerate(group.rows):
        regs = [_acc(slot, lane, width) for lane in range(width)]
        if plan.k_split == 1:
            _emit_epilogue_store(fn, plan, slot, row, regs)
        else:
            offset = ((index * plan.rows_max + slot) * plan.col_threads) * width * 4
            fn.emit(f"st.shared{_VEC[width]}.f32 [%sp+{offset}], {_vec(regs)};")
    return fn.lines


def _reduce_body(plan: Plan, group: RowGroup, thread_row: int) -> list[str]:
    width = plan.vector_width
    fn = _Func()
    fn.emit(f".reg .f32 %a<{width}>, %b<{width}>, %r<{width}>;")
    fn.emit(".reg .pred %pact;")
    fn.emit("setp.ne.u32 %pact, %act, 0;")
    acc = [f"%a{lane}" for lane in range(width)]
    part = [f"%b{lane}" for lane in range(width)]
    for slot, row in enumerate(group.rows):
        if slot % plan.k_split != thread_row:
            continue
        for index in range(plan.k_split):
            offset = ((index * plan.rows_max + slot) * plan.col_threads) * width * 4
            fn.emit(f"ld.shared{_VEC[width]}.f32 {_vec(acc if index == 0 else part)}, "
                    f"[%sp+{offset}];")
            if index:
                for a, b in zip(acc, part):
                    fn.emit(f"add.f32 {a}, {a}, {b};")
        _emit_epilogue_store(fn, plan, slot, row, acc)
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
        e(f"\tmul.wide.s32 %w, {off}, 4;")
        e(f"\tadd.s64 %{arg}, %{arg}, %w;")
    e(f"\tmad.lo.u32 %idx, %by, {plan.k_split}, %ty;")
    if plan.k_split > 1:
        e(f"\tmov.u32 %sp, {PARTIALS};")
        e(f"\tmad.lo.u32 %sp, %tx, {width * 4}, %sp;")
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
