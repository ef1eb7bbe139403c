"""Kernel IR -> PTX text, by rule tables. Prints the IR; decides nothing about what is computed.

`RULES` maps each IR operation to a template (a format string, or a function of the same fields
for the few guarded cases); `Fmt` is the precision overlay: the register and instruction types
of fp32, fp16-with-half2-sums and fp16/bf16-with-fp32-sums kernels. Weights are hex-float immediates
(fp16: a paired immediate in a register ptxas folds into HFMA2), tap offsets immediate address
offsets. Bodies are scoped blocks inside the entry, or (large kernels) one `.func` each, behind a
`brx.idx` jump table on (row group, threadIdx.y).

A ChainIR (fused kernels) prints as one entry: its head once, then per stage a marker comment, a
block barrier before every stage but the first, and the stage's part of an entry (pointers from
the kernel arguments its bindings name, columns, slot, jump tables), labels and functions
prefixed per stage. A KernelIR prints exactly as it did before chains existed.
"""

from __future__ import annotations

import struct

import numpy as np

from .. import __version__
from ..arch import arch_number, ptx_version  # noqa: F401 (ptx_version: re-exported)
from ..ir import Batch, ChainIR, Compute, Finish, IndexOp, KernelIR, Reduce
from ..problem_shape import HALF_DTYPES

VERSION = "ptx-3"
PRECISIONS = ("fp32", "fp16", "fp16acc32", "bf16")
PARTIALS = "sparsert_partials"
# programmatic dependent launch (KernelIR.dependent_launch): the entry's first two instructions
GRID_DEPENDENCY = ("griddepcontrol.wait;", "griddepcontrol.launch_dependents;")
_VEC = {1: "", 2: ".v2", 4: ".v4"}

RULES = {
    # entry index arithmetic (IndexOp.op); {t} is u32 or s32
    "mad": "mad.lo.{t} {dst}, {a}, {b}, {c};",
    "mul": "mul.lo.{t} {dst}, {a}, {b};",
    "add": "add.{t} {dst}, {a}, {b};",
    "sub": "sub.{t} {dst}, {a}, {b};",
    "div": "div.{t} {dst}, {a}, {b};",
    "rem": "rem.{t} {dst}, {a}, {b};",
    "min": "min.{t} {dst}, {a}, {b};",
    "lt": "setp.lt.{t} %pa, {a}, {b};\nselp.u32 {dst}, 1, 0, %pa;",
    "pointer": "mul.wide.s32 %w, %{var}, {elem};\nadd.s64 %{ptr}, %{ptr}, %w;",
    "barrier": "bar.sync 0;",
    # bodies: a padding tap's base is x inside the image, else the zero buffer shifted
    "tap_base": ("and.pred %pm, %pr{r}, %pc{s};\nadd.s64 %zb, %z, {shift};\n"
                 "selp.b64 {base}, %x, %zb, %pm;"),
    "load": "ld.global.nc{ty} {dst}, [{base}+{offset}];",
    # KernelIR.coherent_loads: a stage that reads what an earlier stage of the kernel wrote
    "load_coherent": "ld.global{ty} {dst}, [{base}+{offset}];",
    # a column-pair window one column right of pair a: a's high half, then b's low half
    "shift": "prmt.b32 {dst}, {a}, {b}, 0x5432;",
    "mul_first": "mul.rn.{op} {acc}, {src}, {w};",
    "fma": "fma.rn.{op} {acc}, {src}, {w}, {acc};",
    "zero": "mov.b{bits} {acc}, 0;",
    "const_f16": "mov.b16 %wh, 0x{bits:04X};",          # PTX has no f16 immediates
    "const_f16x2": "mov.b32 %w, 0x{bits:04X}{bits:04X};",
    # 2-byte storage <-> fp32 sums; {ty} is f16 or bf16 (cvt.f32.bf16 and the packs: sm_80+)
    "widen": "cvt.f32.{ty} {dst}, {src};",
    # a bf16 is the top half of an fp32: a column pair widens with one bit operation per column
    # (cvt.f32.bf16 of each half took three instructions a pair in SASS: docs/perf-notes.md)
    "widen_lo": "shl.b32 {dst}, {src}, 16;",
    "widen_hi": "and.b32 {dst}, {src}, 0xFFFF0000;",
    "pack": "cvt.rn.{ty}.f32 {dst}, {src};",
    "pack2": "cvt.rn.{ty}x2.f32 {dst}, {hi}, {lo};",
    "step_bias": "add.{op} {acc}, {acc}, {c};",
    "residual_load": "ld.global.nc{ty} {dst}, [%res+{offset}];",
    "step_residual": "add.{op} {acc}, {acc}, {src};",
    "step_max": "max.{op} {acc}, {acc}, {c};",
    "step_min": "min.{op} {acc}, {acc}, {c};",
    "store": "@%pact st.global{ty} [%y+{offset}], {src};",
    "st_shared": "st.shared{vec}.{ty} [%sp+{offset}], {src};",
    "ld_shared": "ld.shared{vec}.{ty} {dst}, [%sp+{offset}];",
    "add_partial": "add.{op} {acc}, {acc}, {src};",
}


def render(rule: str, **fields) -> str:
    template = RULES[rule]
    return template(**fields) if callable(template) else template.format(**fields)


def f32(value: float) -> str:
    """A float32 as a PTX hex immediate (exact)."""
    return "0f%08X" % struct.unpack("<I", struct.pack("<f", value))[0]


def f16_bits(value: float) -> int:
    """The fp16 bit pattern of `value` (round to nearest even)."""
    return int(np.array([value], dtype=np.float16).view(np.uint16)[0])


class Fmt:
    """How one kernel's numbers are stored, loaded and summed.

    raw:   the registers one vector load fills (fp32: one .f32 per column; fp16 / bf16: one .b32
           per column pair, or one .b16 for a single column; `half_type` f16 / bf16);
    units: the registers one row's partial sum occupies (fp32 sums: one .f32 per column; fp16
           sums: the raw registers, summed with .f16x2 / .f16 arithmetic).
    """

    def __init__(self, ir: KernelIR):
        self.width = w = ir.vector_width
        self.elem = ir.element_bytes
        self.half_storage = ir.dtype in HALF_DTYPES
        self.half_type = {"fp16": "f16", "bf16": "bf16"}.get(ir.dtype)
        self.half_acc = ir.accumulate == "fp16"
        self.widen = self.half_storage and not self.half_acc
        if self.half_storage:
            self.raw_count, self.raw_type = (1, "b16") if w == 1 else (w // 2, "b32")
        else:
            self.raw_count, self.raw_type = w, "f32"
        if self.half_acc:
            self.units, self.unit_type = self.raw_count, self.raw_type
            self.op = "f16" if w == 1 else "f16x2"
        else:
            self.units, self.unit_type, self.op = w, "f32", "f32"
        self.ld_type = f"{_VEC[self.raw_count]}.{self.raw_type}"

    def const(self, fn: list[str], value: float) -> str:
        """`value` as an operand of the sum's arithmetic (fp16: a register ptxas folds into the
        instruction as a paired immediate; PTX has no f16 immediates)."""
        if not self.half_acc:
            return f32(value)
        if self.width == 1:
            _emit(fn, "const_f16", bits=f16_bits(value))
            return "%wh"
        _emit(fn, "const_f16x2", bits=f16_bits(value))
        return "%w"


def _vec(regs: list[str]) -> str:
    return regs[0] if len(regs) == 1 else "{" + ", ".join(regs) + "}"


def _emit(fn: list[str], rule: str, **fields) -> None:
    text = render(rule, **fields)
    if text:
        fn.extend("\t" + line for line in text.split("\n"))


def _operand(value) -> str:
    return f"%{value}" if isinstance(value, str) else str(value)


def _index(fn: list[str], op: IndexOp) -> None:
    _emit(fn, op.op, t="s32" if op.signed else "u32", dst=f"%{op.dst}", a=_operand(op.a),
          b=_operand(op.b), c=_operand(op.c))


def _func_header(name: str, ir: KernelIR) -> list[str]:
    decl = ", ".join(f".param .{t} p_{n}" for t, n in ir.body_args)
    lines = [f".func {name}({decl})", "{"]
    for t, n in ir.body_args:
        lines.append(f"\t.reg .{t} %{n};")
        lines.append(f"\tld.param.{t} %{n}, [p_{n}];")
    return lines


def _tap_bases(fn: list[str], ir: KernelIR, body: Compute) -> None:
    """Padding taps read the all-zero buffer at the same offset: no per-load branch or select and
    no out-of-bounds read. (ih + r) < H as unsigned also rejects ih + r < 0. Predicated loads
    were avoided on purpose: ptxas 13.5 hit an internal error on them for sm_90."""
    if not body.bases:
        return
    geo, stride = ir.geometry, ir.tap_stride
    fn.append("\t.reg .u32 %t;")
    fn.append(f"\t.reg .pred %pr<{geo.kernel}>, %pc<{stride}>, %pm;")
    fn.append(f"\t.reg .u64 %zb, %xb<{geo.kernel * stride}>;")
    for r in sorted({b.r for b in body.bases}):
        fn.append(f"\tadd.u32 %t, %ih, {r};")
        fn.append(f"\tsetp.lt.u32 %pr{r}, %t, {geo.height};")
    for s in sorted({b.s for b in body.bases}):
        fn.append(f"\tadd.u32 %t, %iw, {s};")
        fn.append(f"\tsetp.lt.u32 %pc{s}, %t, {geo.width};")
    for b in body.bases:
        _emit(fn, "tap_base", r=b.r, s=b.s, shift=b.zero_shift * ir.element_bytes,
              base=_base_reg(ir, body, body.bases.index(b)))


def _base_reg(ir: KernelIR, body: Compute, tap: int) -> str:
    if tap < 0:
        return "%x"
    b = body.bases[tap]
    return f"%xb{b.r * ir.tap_stride + b.s}"


def _widen(fn: list[str], fmt: Fmt, raw: list[str], prefix: str, first: int = 0) -> list[str]:
    """fp16 / bf16 raw registers -> fp32 registers prefix<first>.., one per column."""
    out = [f"{prefix}{first + lane}" for lane in range(fmt.width)]
    if fmt.width == 1:
        _emit(fn, "widen", ty=fmt.half_type, dst=out[0], src=raw[0])
        return out
    for u, reg in enumerate(raw):
        if fmt.half_type == "bf16":
            _emit(fn, "widen_lo", dst=out[2 * u], src=reg)
            _emit(fn, "widen_hi", dst=out[2 * u + 1], src=reg)
            continue
        fn.append(f"\tmov.b32 {{%h0, %h1}}, {reg};")
        _emit(fn, "widen", ty=fmt.half_type, dst=out[2 * u], src="%h0")
        _emit(fn, "widen", ty=fmt.half_type, dst=out[2 * u + 1], src="%h1")
    return out


def _declare(fn: list[str], fmt: Fmt, sums: int, raws: int, shifts: int = 0) -> None:
    """Registers of a body: %a sums, %b raw loads, %r/%q residual, %h/%p/%w scratch, %c widened,
    %s shifted windows."""
    fn.append(f"\t.reg .{fmt.unit_type} %a<{sums}>;")
    fn.append(f"\t.reg .{fmt.raw_type} %b<{raws}>, %r<{fmt.raw_count}>;")
    fn.append(f"\t.reg .f32 %q<{fmt.width}>, %c<{(raws // fmt.raw_count + shifts) * fmt.width}>;")
    fn.append("\t.reg .b16 %h<2>, %wh;")
    fn.append(f"\t.reg .b32 %p<{fmt.raw_count}>, %w;")
    fn.append("\t.reg .pred %pact;")
    if shifts:
        fn.append(f"\t.reg .b32 %s<{shifts}>;")
    fn.append("\tsetp.ne.u32 %pact, %act, 0;")


def _finish(fn: list[str], fmt: Fmt, finish: Finish) -> None:
    """Epilogue steps in the IR's order, then the store of one row."""
    regs = [f"%a{finish.slot * fmt.units + u}" for u in range(fmt.units)]
    offset = finish.offset * fmt.elem
    for step in finish.steps:
        if step.op == "residual":
            raw = [f"%r{u}" for u in range(fmt.raw_count)]
            _emit(fn, "residual_load", ty=fmt.ld_type, dst=_vec(raw),
                  offset=step.value * fmt.elem)
            addends = _widen(fn, fmt, raw, "%q") if fmt.widen else raw
            for reg, src in zip(regs, addends):
                _emit(fn, "step_residual", op=fmt.op, acc=reg, src=src)
        else:
            c = fmt.const(fn, step.value)
            for reg in regs:
                _emit(fn, f"step_{step.op}", op=fmt.op, acc=reg, c=c)
    if fmt.widen:     # pack fp32 sums to fp16 / bf16
        if fmt.width == 1:
            _emit(fn, "pack", ty=fmt.half_type, dst="%h0", src=regs[0])
            regs = ["%h0"]
        else:
            packed = [f"%p{u}" for u in range(fmt.raw_count)]
            for u, p in enumerate(packed):   # the first column goes to the low half
                _emit(fn, "pack2", ty=fmt.half_type, dst=p, hi=regs[2 * u + 1], lo=regs[2 * u])
            regs = packed
    _emit(fn, "store", ty=fmt.ld_type, offset=offset, src=_vec(regs))


def _shared_chunks(fmt: Fmt, regs: list[str]):
    """A row's partial-sum units as (byte offset, vector suffix, type, registers) shared accesses
    of at most 16 bytes."""
    unit_bytes = 2 if fmt.unit_type == "b16" else 4
    for start in range(0, len(regs), 4):
        chunk = regs[start:start + 4]
        yield start * unit_bytes, _VEC[len(chunk)], fmt.unit_type, chunk


def _rule(rule: str):
    """The rule as a function of its fields (hot loops bind it once)."""
    template = RULES[rule]
    return template if callable(template) else template.format


def _batch(fn: list[str], ir: KernelIR, fmt: Fmt, body: Compute, batch: Batch) -> None:
    raw = fmt.raw_count
    sources = []
    load_rule = "load_coherent" if ir.coherent_loads else "load"
    for i, load in enumerate(batch.loads):
        regs = [f"%b{i * raw + u}" for u in range(raw)]
        _emit(fn, load_rule, ty=fmt.ld_type, dst=_vec(regs), base=_base_reg(ir, body, load.tap),
              offset=load.offset * fmt.elem)
        sources.append(regs)
    for k, shift in enumerate(batch.shifts):    # pair windows: (a.hi, b.lo), one PRMT each
        _emit(fn, "shift", dst=f"%s{k}", a=sources[shift.a][0], b=sources[shift.b][0])
        sources.append([f"%s{k}"])
    if fmt.widen:
        sources = [_widen(fn, fmt, regs, "%c", i * fmt.width) for i, regs in enumerate(sources)]
    units, op, const, put = fmt.units, fmt.op, fmt.const, fn.append
    first, fma_rule = _rule("mul_first"), _rule("fma")
    for fma in batch.fmas:
        w = const(fn, fma.weight)
        srcs, rule, base = sources[fma.source], first if fma.init else fma_rule, fma.slot * units
        for u in range(units):
            text = rule(op=op, acc=f"%a{base + u}", src=srcs[u], w=w)
            if text:
                put("\t" + text)


def _compute(ir: KernelIR, body: Compute) -> list[str]:
    fmt = Fmt(ir)
    fn: list[str] = []
    _declare(fn, fmt, body.slots * fmt.units, ir.load_batch * fmt.raw_count,
             max((len(b.shifts) for b in body.batches), default=0))
    _tap_bases(fn, ir, body)
    for batch in body.batches:
        _batch(fn, ir, fmt, body, batch)
    for slot in body.zero:
        for u in range(fmt.units):
            _emit(fn, "zero", bits=16 if fmt.unit_type == "b16" else 32,
                  acc=f"%a{slot * fmt.units + u}")
    for out in body.outputs:
        if isinstance(out, Finish):
            _finish(fn, fmt, out)
            continue
        regs = [f"%a{out.slot * fmt.units + u}" for u in range(fmt.units)]
        for extra, vec, ty, chunk in _shared_chunks(fmt, regs):
            _emit(fn, "st_shared", vec=vec, ty=ty, offset=out.offset + extra, src=_vec(chunk))
    return fn


def _reduce(ir: KernelIR, body: Reduce) -> list[str]:
    fmt = Fmt(ir)
    units = fmt.units
    fn: list[str] = []
    _declare(fn, fmt, 2 * units, 1)
    acc = [f"%a{u}" for u in range(units)]
    part = [f"%a{units + u}" for u in range(units)]
    for row in body.rows:
        for index, offset in enumerate(row.offsets):
            target = acc if index == 0 else part
            for extra, vec, ty, chunk in _shared_chunks(fmt, target):
                _emit(fn, "ld_shared", vec=vec, ty=ty, dst=_vec(chunk), offset=offset + extra)
            if index:
                for a, b in zip(acc, part):
                    _emit(fn, "add_partial", op=fmt.op, acc=a, src=b)
        _finish(fn, fmt, row.finish)
    return fn


def _entry_head(entry: str, arguments: tuple[str, ...], block: tuple[int, int, int],
                max_registers: int, dependent_launch: bool) -> list[str]:
    """The entry's declaration, launch bounds, registers and (dependent launch) grid waits."""
    params = [f".param .u64 arg_{name}" for name in arguments]
    lines = [f".visible .entry {entry}({', '.join(params)})",
             f".maxntid {block[0]}, {block[1]}, 1"]
    if max_registers:
        lines.append(f".maxnreg {max_registers}")
    lines.append("{")
    e = lines.append
    e("\t.reg .u32 %tx, %ty, %bx, %by, %j, %img, %pix, %oh, %ow, %act, %idx, %sp;")
    e("\t.reg .s32 %ih, %iw, %inoff, %outoff;")
    e("\t.reg .u64 %x, %y, %res, %z, %w;")
    e("\t.reg .pred %pa;")
    if dependent_launch:     # nothing global is touched before the grid before is done
        lines += ["\t" + ins for ins in GRID_DEPENDENCY]
    return lines


def _entry_stage(ir: KernelIR, phases: list[list[list[str]]],
                 bindings: tuple[tuple[str, str], ...], prefix: str = "") -> list[str]:
    """One kernel's part of an entry: its pointers from the kernel arguments `bindings` names,
    column bases once per thread, then per phase a jump through a table of bodies (scoped
    blocks inline, or calls to {prefix}g{i}p{phase}); labels carry `prefix`."""
    call_args = ", ".join(f"%{n}" for _, n in ir.body_args)
    lines: list[str] = []
    e = lines.append
    for ptr, arg in bindings:
        e(f"\tld.param.u64 %{ptr}, [arg_{arg}];")
        e(f"\tcvta.to.global.u64 %{ptr}, %{ptr};")
    e("\tmov.u32 %tx, %tid.x;")
    e("\tmov.u32 %ty, %tid.y;")
    e(f"\tmov.u32 %bx, %{ir.block_ids['bx']};")
    e(f"\tmov.u32 %by, %{ir.block_ids['by']};")
    for op in ir.columns:
        _index(lines, op)
    for ptr, var in ir.pointers:
        _emit(lines, "pointer", var=var, elem=ir.element_bytes, ptr=ptr)
    _index(lines, ir.slot)
    if ir.k_split > 1:
        e(f"\tmov.u32 %sp, {PARTIALS};")
        e(f"\tmad.lo.u32 %sp, %tx, {ir.partial_stride}, %sp;")
    for phase, bodies in enumerate(phases):
        if not bodies:
            continue
        if phase:
            _emit(lines, "barrier")
        targets = [f"{prefix}L{phase}_{i}" for i in range(len(bodies))]
        e(f"\t{prefix}T{phase}: .branchtargets {', '.join(targets)};")
        e(f"\tbrx.idx.uni %idx, {prefix}T{phase};")
        for i, (target, body) in enumerate(zip(targets, bodies)):
            e(f"{target}:")
            if ir.inline:
                lines += ["\t{"] + ["\t" + line for line in body] + ["\t}"]
            else:
                e(f"\tcall.uni {prefix}{func_name(i, phase)}, ({call_args});")
            e(f"\tbra.uni {prefix}DONE{phase};")
        e(f"{prefix}DONE{phase}:")
    return lines


def _entry(ir: KernelIR, phases: list[list[list[str]]]) -> list[str]:
    """The kernel entry: its head, then its one stage, each pointer from its own argument."""
    return (_entry_head(ir.entry, ir.arguments, ir.block, ir.max_registers, ir.dependent_launch)
            + _entry_stage(ir, phases, tuple((a, a) for a in ir.arguments))
            + ["\tret;", "}"])


def stage_prefix(stage: int) -> str:
    """Labels and function names of a ChainIR's stage `stage` start with this."""
    return f"s{stage}_"


def stage_marker(stage: int) -> str:
    """The comment line that opens stage `stage`'s part of a ChainIR entry."""
    return f"\t// stage {stage}"


def func_name(slot: int, phase: int) -> str:
    return f"g{slot}p{phase}"


def _bodies(ir: KernelIR) -> list[list[list[str]]]:
    """Each phase's bodies, printed."""
    return [[_compute(ir, b) if isinstance(b, Compute) else _reduce(ir, b) for b in bodies]
            for bodies in ir.phases]


def _functions(ir: KernelIR, phases: list[list[list[str]]], prefix: str = "") -> list[str]:
    """One `.func` per body, unless the bodies are inline."""
    out: list[str] = []
    if not ir.inline:
        for phase, bodies in enumerate(phases):
            for slot, lines in enumerate(bodies):
                out += (_func_header(prefix + func_name(slot, phase), ir) + lines
                        + ["\tret;", "}"])
    return out


def print_ptx(ir: KernelIR | ChainIR, arch: str = "sm_90") -> str:
    """PTX for `ir`, targeting `arch`."""
    header = [f"// Generated by sparsert {__version__} ({VERSION}): {ir.comment}",
              f".version {ptx_version(arch)}", f".target {arch}", ".address_size 64", ""]
    if isinstance(ir, ChainIR):
        return "\n".join(header + _chain(ir)) + "\n"
    body: list[str] = []
    if ir.k_split > 1:
        body.append(f".shared .align 16 .b8 {PARTIALS}[{ir.shared_bytes}];")
    phases = _bodies(ir)
    body += _functions(ir, phases)
    return "\n".join(header + body + _entry(ir, phases)) + "\n"


def _chain(chain: ChainIR) -> list[str]:
    """A ChainIR's functions and entry: the head once (dependent-launch waits included), then
    per stage its marker, a block barrier after the first (the stage reads what the one before
    wrote) and its part of the entry."""
    functions: list[str] = []
    stages: list[str] = []
    for i, (ir, bindings) in enumerate(zip(chain.stages, chain.bindings)):
        if ir.k_split != 1 or ir.block != chain.block:
            raise ValueError(f"stage {i} of {chain.entry}: k_split {ir.k_split}, block "
                             f"{ir.block}; a chain's stages share one block without k-split")
        phases = _bodies(ir)
        functions += _functions(ir, phases, stage_prefix(i))
        stages.append(stage_marker(i))
        if i:
            _emit(stages, "barrier")
        stages += _entry_stage(ir, phases, bindings, stage_prefix(i))
    head = _entry_head(chain.entry, chain.arguments, chain.block, chain.max_registers,
                       chain.dependent_launch)
    return functions + head + stages + ["\tret;", "}"]
