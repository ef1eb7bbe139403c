"""Printed PTX -> kernel IR, for `check_printed`: what the CPU check executes is what runs.

The parser reads the subset of PTX the printer emits, independently of the printer's tables: per
body the tap-base selection, the loads (base register, immediate offset), the FMAs (accumulator,
source register, immediate weight), zeroing, epilogue instructions, stores and shared-memory
partials; in the entry the index arithmetic, pointer offsets, partials base and jump tables. It
rebuilds a KernelIR from them and requires equality with the lowered IR. Any instruction outside
the subset, a register used for the wrong lane, or an instruction type that does not match the
kernel's precision is an error too. Linear in the text: ~1 s per 100k nonzeros.
"""

from __future__ import annotations

import dataclasses
import re
import struct

import numpy as np

from ..ir import (BLOCK_IDS, Batch, ChainIR, Compute, Finish, IndexOp, KernelIR, Load,
                  Partial, Reduce, ReduceRow, Shift, Step, TapBase)
from . import PrintedMismatch
from .ptx import GRID_DEPENDENCY, PARTIALS, Fmt, stage_marker, stage_prefix

_MEM = re.compile(r"\[(%\w+)\+(-?\d+)\]")
_FMA = re.compile(r"\t*(fma|mul)\.rn\.(\w+) (%a\d+), (%\w+), ([^,;]+)(?:, (%a\d+))?;")
_SHIFT = re.compile(r"\t*prmt\.b32 (%s\d+), (%b\d+), (%b\d+), 0x5432;")
_LOAD = re.compile(r"\t*(ld\.global\S*) (\{[^}]*\}|%\w+), \[(%x\w*)\+(-?\d+)\];")
# conversions of 2-byte storage, by the kernel's dtype (independent of the printer's Fmt)
_CVT_TYPE = {"fp16": "f16", "bf16": "bf16"}
_INDEX_OPS = {"mad.lo": "mad", "mul.lo": "mul", "add": "add", "sub": "sub", "div": "div",
              "rem": "rem", "min": "min"}


def _fail(where: str, message: str) -> None:
    raise PrintedMismatch(f"printed PTX differs from the kernel IR: {where}: {message}")


def _operands(rest: str) -> list[str]:
    """Operands of one instruction (without the trailing ';'), vector braces kept together."""
    rest = rest.rstrip(";")
    if "{" not in rest:
        return [a.strip() for a in rest.split(",")] if rest.strip() else []
    out, depth, cur = [], 0, ""
    for ch in rest:
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def _regs(operand: str) -> list[str]:
    return [r.strip() for r in operand.strip("{}").split(",")]


def _number(text: str) -> int:
    return int(text, 0)


def _f32(text: str) -> float:
    if not text.startswith("0f") or len(text) != 10:
        raise ValueError(text)
    return struct.unpack(">f", bytes.fromhex(text[2:]))[0]


def _f16(bits: int) -> float:
    return float(np.array([bits], dtype=np.uint16).view(np.float16)[0])


class _Body:
    """Symbolic state while parsing one body."""

    def __init__(self, ir: KernelIR, fmt: Fmt, where: str):
        self.ir, self.fmt, self.where = ir, fmt, where
        self.consts: dict[str, float] = {}
        self.values: dict[str, tuple] = {}      # register -> what it holds
        self.steps: dict[int, list] = {}        # slot -> parsed epilogue steps (per unit lines)
        self.pact = False

    def fail(self, line: str, message: str) -> None:
        _fail(self.where, f"{message} in `{line.strip()}`")

    def acc(self, reg: str, line: str) -> tuple[int, int]:
        if not reg.startswith("%a"):
            self.fail(line, f"{reg} is not an accumulator")
        n = int(reg[2:])
        return divmod(n, self.fmt.units)

    def const(self, operand: str, line: str) -> float:
        if operand in self.consts:
            return self.consts[operand]
        if self.fmt.half_acc:
            self.fail(line, "fp16 arithmetic with a non-register constant")
        try:
            return _f32(operand)
        except ValueError:
            self.fail(line, f"{operand} is not a constant")

    def mov_const(self, op: str, args: list[str], line: str) -> bool:
        """mov.b32 %w, 0xHHHHHHHH (a paired fp16) or mov.b16 %wh, 0xHHHH."""
        if op == "mov.b32" and args[0] == "%w":
            bits = _number(args[1])
            if bits >> 16 != bits & 0xFFFF:
                self.fail(line, "the two halves of a paired fp16 immediate differ")
            self.consts["%w"] = _f16(bits & 0xFFFF)
            return True
        if op == "mov.b16" and args[0] == "%wh":
            self.consts["%wh"] = _f16(_number(args[1]))
            return True
        return False

    def widen(self, op: str, args: list[str], line: str) -> bool:
        """fp16 / bf16 registers split and converted to fp32: track which (load, lane) each
        holds. The conversion must be from the kernel's storage type."""
        if op == "mov.b32" and args[0] == "{%h0, %h1}":
            held = self.values.get(args[1])
            if held is None:
                self.fail(line, f"{args[1]} holds nothing to split")
            kind, index, first = held
            self.values["%h0"] = (kind, index, first)
            self.values["%h1"] = (kind, index, first + 1)
            return True
        if op in ("shl.b32", "and.b32") and self.fmt.widen:    # bf16 pairs: one bit op a column
            if self.ir.dtype != "bf16":
                self.fail(line, f"{op} widens bf16 pairs only, not {self.ir.dtype}")
            want = "16" if op == "shl.b32" else "0xFFFF0000"
            if len(args) != 3 or args[2] != want:
                self.fail(line, f"{op} must take {want} to widen a bf16 column")
            held = self.values.get(args[1])
            if held is None or held[0] not in ("x", "res") or len(held) != 3:
                self.fail(line, f"{args[1]} holds no loaded bf16 pair")
            kind, index, first = held
            self.values[args[0]] = (kind, index, first + (op == "and.b32"))
            return True
        if op.startswith("cvt.f32.") and self.fmt.widen:
            self.check_type(op, f"cvt.f32.{_CVT_TYPE[self.ir.dtype]}", line)
            held = self.values.get(args[1])
            if held is None:
                self.fail(line, f"{args[1]} holds nothing to widen")
            self.values[args[0]] = held
            return True
        return False

    def lanes_of(self, reg: str, line: str) -> tuple:
        held = self.values.get(reg)
        if held is None:
            self.fail(line, f"{reg} holds no loaded value")
        return held

    def step(self, kind: str, value, args: list[str], line: str) -> None:
        slot, unit = self.acc(args[0], line)
        if args[1] != args[0]:
            self.fail(line, "an epilogue step reads another accumulator")
        lines = self.steps.setdefault(slot, [])
        if unit == 0:
            lines.append([kind, value, 1])
            return
        if not lines or lines[-1][:2] != [kind, value] or lines[-1][2] != unit:
            self.fail(line, "an epilogue step misses a column")
        lines[-1][2] += 1

    def epilogue(self, op: str, args: list[str], line: str) -> bool:
        """bias / residual / max / min on accumulators, the residual load and fp16 packing."""
        fmt = self.fmt
        base, _, typ = op.rpartition(".")
        if op.startswith("ld.global.nc") and _MEM.fullmatch(args[1] or "") and \
                args[1].startswith("[%res+"):
            self.check_type(op, "ld.global.nc" + fmt.ld_type, line)
            offset = int(_MEM.fullmatch(args[1]).group(2))
            for u, reg in enumerate(_regs(args[0])):
                self.values[reg] = ("res", offset, u * (2 if fmt.half_storage and fmt.width > 1
                                                        else 1))
            return True
        if base in ("add", "max", "min") and typ == fmt.op and args[0].startswith("%a"):
            if base == "add" and args[2] in self.values and self.values[args[2]][0] == "res":
                _, offset, lane = self.values[args[2]]
                _, unit = self.acc(args[0], line)
                if lane != self.unit_lane(unit):
                    self.fail(line, "a residual column is added to another column")
                if offset % fmt.elem:
                    self.fail(line, "misaligned residual offset")
                self.step("residual", offset // fmt.elem, args, line)
                return True
            if base == "add" and args[2].startswith("%a"):
                return False
            kind = {"add": "bias", "max": "max", "min": "min"}[base]
            self.step(kind, self.const(args[2], line), args, line)
            return True
        if re.fullmatch(r"cvt\.rn\.b?f16(x2)?\.f32", op) and fmt.widen:
            pair = "x2" if len(args) == 3 else ""
            self.check_type(op, f"cvt.rn.{_CVT_TYPE[self.ir.dtype]}{pair}.f32", line)
            srcs = [self.acc(r, line) for r in args[1:]][::-1]     # low half = first column
            slots = {s for s, _ in srcs}
            if len(slots) != 1:
                self.fail(line, "one packed register mixes rows")
            self.values[args[0]] = ("packed", slots.pop(), tuple(u for _, u in srcs))
            return True
        return False

    def unit_lane(self, unit: int) -> int:
        """First column lane of a sum unit (fp16 sums pack a column pair per unit)."""
        return unit * 2 if self.fmt.half_acc and self.fmt.width > 1 else unit

    def check_type(self, op: str, want: str, line: str) -> None:
        if op != want:
            self.fail(line, f"expected {want} for a {self.ir.precision} kernel")

    def store(self, op: str, args: list[str], line: str, predicated: bool) -> Finish:
        fmt = self.fmt
        if not predicated or not self.pact:
            self.fail(line, "a store not predicated on the thread's act flag")
        self.check_type(op, "st.global" + fmt.ld_type, line)
        m = _MEM.fullmatch(args[0])
        if not m or m.group(1) != "%y" or int(m.group(2)) % fmt.elem:
            self.fail(line, "a store not at %y plus an aligned immediate")
        regs = _regs(args[1])
        if fmt.widen:
            held = [self.values.get(r) for r in regs]
            if any(h is None or h[0] != "packed" for h in held):
                self.fail(line, "stores fp32 sums that were not packed to fp16")
            slots = {h[1] for h in held}
            units = tuple(u for h in held for u in h[2])
        else:
            pairs = [self.acc(r, line) for r in regs]
            slots = {s for s, _ in pairs}
            units = tuple(u for _, u in pairs)
        if len(slots) != 1 or units != tuple(range(fmt.units)):
            self.fail(line, "a store of columns that are not one row's sums in order")
        slot = slots.pop()
        steps = []
        for kind, value, count in self.steps.pop(slot, []):
            if count != fmt.units:
                self.fail(line, f"epilogue step {kind} misses columns")
            steps.append(Step(kind, value))
        return Finish(slot, int(m.group(2)) // fmt.elem, tuple(steps))


def _shared(body: _Body, op: str, args: list[str], line: str, load: bool):
    """A shared-memory partial access: (byte offset of unit 0, slot, first unit, units)."""
    fmt = body.fmt
    mem, regs = (args[1], args[0]) if load else (args[0], args[1])
    m = _MEM.fullmatch(mem)
    if not m or m.group(1) != "%sp":
        body.fail(line, "a shared access not at %sp plus an immediate")
    pairs = [body.acc(r, line) for r in _regs(regs)]
    vec = {1: "", 2: ".v2", 4: ".v4"}[len(pairs)]
    body.check_type(op, f"{'ld' if load else 'st'}.shared{vec}.{fmt.unit_type}", line)
    slots = {s for s, _ in pairs}
    units = [u for _, u in pairs]
    if len(slots) != 1 or units != list(range(units[0], units[0] + len(units))):
        body.fail(line, "a shared access of columns that are not consecutive sums of one row")
    unit_bytes = 2 if fmt.unit_type == "b16" else 4
    return int(m.group(2)) - units[0] * unit_bytes, slots.pop(), units[0], len(units)


def _split(line: str) -> tuple[str, list[str], bool]:
    text = line.strip()
    predicated = text.startswith("@%pact ")
    if predicated:
        text = text[len("@%pact "):]
    op, _, rest = text.partition(" ")
    return op, _operands(rest), predicated


def _tap_bases(body: _Body, lines: list[str], start: int) -> tuple[tuple[TapBase, ...], int]:
    """The padding-tap base selection at the top of a body (see render.ptx._tap_bases)."""
    ir, geo = body.ir, body.ir.geometry
    bound: dict[str, int] = {}
    bases = []
    i, t, pm, shift = start, None, None, None
    while i < len(lines):
        op, args, _ = _split(lines[i])
        if op == "add.u32" and args[0] == "%t" and args[1] in ("%ih", "%iw"):
            t = (args[1], _number(args[2]))
        elif op == "setp.lt.u32" and args[1] == "%t" and t is not None:
            limit = {"%ih": geo.height, "%iw": geo.width}[t[0]]
            if _number(args[2]) != limit or args[0] != f"%p{'r' if t[0] == '%ih' else 'c'}{t[1]}":
                body.fail(lines[i], "a padding bound that does not match the image")
            bound[args[0]] = t[1]
        elif op == "and.pred" and args[0] == "%pm":
            pm = (bound.get(args[1]), bound.get(args[2]))
            if None in pm or not args[1].startswith("%pr") or not args[2].startswith("%pc"):
                body.fail(lines[i], "a tap predicate built from unknown bounds")
        elif op == "add.s64" and args[:2] == ["%zb", "%z"]:
            shift = _number(args[2])
        elif op == "selp.b64" and args[1:] == ["%x", "%zb", "%pm"]:
            if pm is None or shift is None:
                body.fail(lines[i], "a tap base selected before its predicate and shift")
            r, s = pm
            if args[0] != f"%xb{r * ir.tap_stride + s}" or shift % ir.element_bytes:
                body.fail(lines[i], "a tap base register that is not its tap's")
            bases.append(TapBase(r, s, shift // ir.element_bytes))
        elif not op.startswith(".reg"):
            break
        i += 1
    return tuple(bases), i


def _compute(ir: KernelIR, fmt: Fmt, lines: list[str], where: str) -> Compute:
    body = _Body(ir, fmt, where)
    i = 0
    while i < len(lines) and lines[i].strip().startswith(".reg"):
        i += 1
    if i < len(lines) and lines[i].strip() == "setp.ne.u32 %pact, %act, 0;":
        body.pact = True
        i += 1
    bases, i = _tap_bases(body, lines, i)
    base_regs = {f"%xb{b.r * ir.tap_stride + b.s}": n for n, b in enumerate(bases)}
    base_regs["%x"] = -1
    batches: list[Batch] = []
    loads: list[Load] = []
    shifts: list[Shift] = []
    fmas: list[list] = []               # [slot, weight, source, init, units seen]
    zero: dict[int, int] = {}
    outputs: list = []
    partial: list | None = None
    raw = fmt.raw_count

    def close_batch():
        if loads:
            # plain tuples compare equal to the IR's named ones and are cheaper to build
            batches.append(Batch(tuple(loads), tuple((s, w, src, init)
                                                     for s, w, src, init, _ in fmas),
                                 tuple(shifts)))
            for f in fmas:
                if f[4] != fmt.units:
                    _fail(where, f"an FMA of slot {f[0]} misses columns")
        loads.clear()
        shifts.clear()
        fmas.clear()

    values, units, lane_step = body.values, fmt.units, 2 if fmt.half_storage and fmt.width > 1 else 1
    for line in lines[i:]:
        m = _FMA.fullmatch(line)
        if m:
            kind, typ, acc, src, operand, again = m.groups()
            init = kind == "mul"
            if typ != fmt.op:
                body.fail(line, f"expected .{fmt.op} arithmetic for a {ir.precision} kernel")
            if init != (again is None) or (not init and again != acc):
                body.fail(line, "an FMA that does not accumulate into its own sum")
            slot, unit = divmod(int(acc[2:]), units)
            held = values.get(src)
            if held is None or held[0] != "x" or held[2] != body.unit_lane(unit):
                body.fail(line, "an FMA reads another column than it sums")
            weight = body.const(operand, line)
            if unit == 0:
                fmas.append([slot, weight, held[1], init, 1])
            elif not fmas or fmas[-1][:4] != [slot, weight, held[1], init] or \
                    fmas[-1][4] != unit:
                body.fail(line, "an FMA misses columns")
            else:
                fmas[-1][4] += 1
            continue
        m = _SHIFT.fullmatch(line)
        if m:
            dst, a, b = m.groups()
            held = [values.get(a), values.get(b)]
            if not ir.pair_windows or fmas or dst != f"%s{len(shifts)}" or any(
                    h is None or h[0] != "x" or h[1] >= len(loads) or h[2] for h in held):
                body.fail(line, "a shifted window that is not two of its batch's pairs in order")
            values[dst] = ("x", len(loads) + len(shifts), 0)
            shifts.append(Shift(held[0][1], held[1][1]))
            continue
        m = _LOAD.fullmatch(line)
        if m:
            if fmas or shifts:
                close_batch()
            op, dst, base, offset = m.groups()
            load_op = "ld.global" if ir.coherent_loads else "ld.global.nc"
            body.check_type(op, load_op + fmt.ld_type, line)
            if base not in base_regs or int(offset) % fmt.elem:
                body.fail(line, "a load not at a tap base plus an aligned immediate")
            regs = _regs(dst)
            index = len(loads)
            if regs != [f"%b{index * raw + u}" for u in range(raw)]:
                body.fail(line, "a load into registers out of order")
            for u, reg in enumerate(regs):
                values[reg] = ("x", index, u * lane_step)
            loads.append(Load(base_regs[base], int(offset) // fmt.elem))
            continue
        op, args, predicated = _split(line)
        if op.startswith(("ld.global", "fma", "mul")) and not args[-1].startswith("[%res"):
            body.fail(line, "a load or FMA the parser cannot read")
        elif op in ("mov.b32", "mov.b16") and args[0].startswith("%a") and args[1] == "0":
            slot, unit = body.acc(args[0], line)
            if unit != zero.get(slot, 0):
                body.fail(line, "a sum zeroed out of order")
            zero[slot] = unit + 1
        elif body.mov_const(op, args, line) or body.widen(op, args, line):
            continue
        elif op.startswith("st.shared"):
            close_batch()
            offset, slot, first, count = _shared(body, op, args, line, load=False)
            if first == 0:
                partial = [slot, offset, count]
                outputs.append(partial)
            elif partial is None or partial[:2] != [slot, offset] or partial[2] != first:
                body.fail(line, "a partial store misses columns")
            else:
                partial[2] += count
        elif op.startswith("st.global"):
            close_batch()
            outputs.append(body.store(op, args, line, predicated))
        elif body.epilogue(op, args, line):
            close_batch()
        else:
            body.fail(line, "an instruction outside the printed subset")
    close_batch()
    if any(count != fmt.units for count in zero.values()):
        _fail(where, "a sum zeroed in part")
    result = []
    for out in outputs:
        if isinstance(out, list):
            if out[2] != fmt.units:
                _fail(where, f"the partial of slot {out[0]} misses columns")
            result.append(Partial(out[0], out[1]))
        else:
            result.append(out)
    if body.steps:
        _fail(where, "epilogue steps on a sum that is never stored")
    return Compute(_slots(lines, fmt), bases, tuple(batches), tuple(zero), tuple(result))


def _slots(lines: list[str], fmt: Fmt) -> int:
    m = re.search(r"%a<(\d+)>", lines[0]) if lines else None
    return int(m.group(1)) // fmt.units if m else 0


def _reduce(ir: KernelIR, fmt: Fmt, lines: list[str], where: str) -> Reduce:
    body = _Body(ir, fmt, where)
    rows: list[ReduceRow] = []
    offsets: list[int] = []
    loaded: dict[int, int] = {}        # accumulator slot (0: sum, 1: incoming partial) -> units
    added = 0
    for line in lines:
        text = line.strip()
        if text.startswith(".reg"):
            continue
        if text == "setp.ne.u32 %pact, %act, 0;":
            body.pact = True
            continue
        op, args, predicated = _split(line)
        if op.startswith("ld.shared"):
            offset, slot, first, count = _shared(body, op, args, line, load=True)
            if first == 0:
                if slot == 1 and (added != fmt.units * (len(offsets) - 1) or not offsets):
                    body.fail(line, "a partial loaded before the previous one was added")
                if slot == 0 and offsets:
                    body.fail(line, "a row's sum reloaded before its store")
                offsets.append(offset)
                loaded[slot] = 0
            elif offsets[-1] != offset or loaded.get(slot) != first:
                body.fail(line, "a partial load misses columns")
            loaded[slot] += count
        elif op == "add." + fmt.op and args[2].startswith("%a") and \
                body.acc(args[2], line)[0] == 1:
            if args[0] != args[1] or body.acc(args[0], line) != (0, body.acc(args[2], line)[1]):
                body.fail(line, "a partial added to another column")
            if loaded.get(1) != fmt.units:
                body.fail(line, "a partial added before it was loaded")
            added += 1
        elif op.startswith("st.global"):
            if added != fmt.units * (len(offsets) - 1) or loaded.get(0) != fmt.units:
                body.fail(line, "a row stored before all partials were added")
            rows.append(ReduceRow(tuple(offsets), body.store(op, args, line, predicated)))
            offsets, loaded, added = [], {}, 0
        elif body.mov_const(op, args, line) or body.widen(op, args, line):
            continue
        elif not body.epilogue(op, args, line):
            body.fail(line, "an instruction outside the printed subset")
    if offsets:
        _fail(where, "partials summed but never stored")
    return Reduce(tuple(rows))


def _index(op: str, args: list[str]) -> IndexOp | None:
    name, _, typ = op.rpartition(".")
    if typ not in ("u32", "s32") or name not in _INDEX_OPS:
        return None
    vals = [a[1:] if a.startswith("%") else _number(a) for a in args]
    return IndexOp(_INDEX_OPS[name], vals[0], vals[1], vals[2],
                   vals[3] if len(vals) > 3 else None, typ == "s32")


def _blocks(lines: list[str]):
    """Split the text into `.func` bodies and the entry; returns (funcs, entry header, entry)."""
    funcs, i = {}, 0
    entry = None
    while i < len(lines):
        line = lines[i]
        if line.startswith(".func "):
            name, _, decl = line[len(".func "):].partition("(")
            decls = [p.split() for p in decl.rstrip(")").split(", ")]
            params = [d[-1][len("p_"):] for d in decls]
            j = lines.index("}", i)
            start = i + 2 + 2 * len(params)
            want = [ln for d in decls for ln in (f"\t.reg {d[1]} %{d[2][2:]};",
                                                 f"\tld.param{d[1]} %{d[2][2:]}, [{d[2]}];")]
            if lines[i + 2:start] != want:
                _fail(f"function {name}", "parameters not loaded into their registers")
            body = lines[start:j]
            if not body or body[-1].strip() != "ret;":
                _fail(f"function {name}", "does not end in ret")
            funcs[name] = (params, body[:-1])
            i = j + 1
        elif line.startswith(".visible .entry "):
            j = len(lines) - 1
            while lines[j] != "}":
                j -= 1
            entry = (line, lines[i + 1:j])
            i = j + 1
        else:
            i += 1
    if entry is None:
        _fail("text", "no .visible .entry")
    return funcs, entry


def _jump_table(ir: KernelIR, fmt: Fmt, funcs: dict, entry: list[str], k: int, text: str,
                phase: int, prefix: str = "") -> tuple[int, tuple, bool]:
    """One phase: `T: .branchtargets ...; brx.idx.uni %idx, T;` then per target its label, its
    body (an inline block or a call) and the jump to DONE (labels start with `prefix`).
    Returns (next line, bodies, inline)."""
    op = text.split(":", 1)[0]
    targets = [t.strip() for t in text.split(".branchtargets", 1)[1].rstrip(";").split(",")]
    nxt = _split(entry[k])
    k += 1
    if nxt[0] != "brx.idx.uni" or nxt[1] != ["%idx", op]:
        _fail("entry", f"{text}: a jump table not indexed by %idx")
    bodies, inline = [], True
    for n, target in enumerate(targets):
        if entry[k].strip() != f"{target}:":
            _fail("entry", f"jump target {target} is not where its table says")
        k += 1
        where = f"phase {phase} body {n}"
        if entry[k] == "\t{":
            end = entry.index("\t}", k)
            body = [ln[1:] for ln in entry[k + 1:end]]
            k = end + 1
        else:
            call = _split(entry[k])
            k += 1
            fname = call[1][0]
            if call[0] != "call.uni" or fname not in funcs:
                _fail(where, f"calls unknown function {fname}")
            params, body = funcs[fname]
            passed = [a.strip("(%) ") for a in call[1][1:]]
            want = [n for _, n in ir.body_args]
            if passed != want or params != want:
                _fail(where, f"{fname} gets ({', '.join(passed)}), declares "
                             f"({', '.join(params)}), needs ({', '.join(want)})")
            inline = False
        if entry[k].strip() != f"bra.uni {prefix}DONE{phase};":
            _fail(where, "does not jump to the end of its phase")
        k += 1
        bodies.append((_compute if phase == 0 else _reduce)(ir, fmt, body, where))
    return k, tuple(bodies), inline


class _Entry:
    """What one stretch of an entry's lines states: launch bounds, the pointer loads, the
    thread and block ids, the index arithmetic, pointer offsets, partials base and the phases'
    jump tables (labels starting with `prefix`). `last`: the stretch ends the entry (its one
    `ret;` may be its last line; anywhere else it would end the kernel early)."""

    def __init__(self, ir: KernelIR | None, funcs: dict, lines: list[str], prefix: str = "",
                 last: bool = True):
        self.maxntid = self.max_registers = None
        self.columns: list[IndexOp] = []
        self.pointers, self.phases, self.specials = [], [], {}
        self.slot = self.stride = None
        self.loaded: list[tuple[str, str]] = []       # (register, argument)
        self.inline, self.barriers = None, 0
        self.dependent: list[str] = []   # griddepcontrol lines, each before anything else
        fmt = Fmt(ir) if ir is not None else None
        k = 0
        while k < len(lines):
            line = lines[k]
            text = line.strip()
            k += 1
            if text.startswith(".maxntid"):
                self.maxntid = tuple(_number(v) for v in text[len(".maxntid "):].split(", "))
                continue
            if text.startswith(".maxnreg"):
                self.max_registers = _number(text.split()[1])
                continue
            if text == "ret;":      # only as the entry's last line: nothing may follow it
                if not last or k != len(lines):
                    _fail("entry", "`ret;` before the end of the entry")
                continue
            if text == "{" or text.startswith(".reg") or \
                    re.fullmatch(re.escape(prefix) + r"DONE\d+:", text):
                continue
            op, args, _ = _split(line)
            if op in GRID_DEPENDENCY:
                if self.loaded or self.specials or self.columns or \
                        len(self.dependent) >= len(GRID_DEPENDENCY) or \
                        op != GRID_DEPENDENCY[len(self.dependent)]:
                    _fail("entry", f"`{text}` after the entry started, or out of order")
                self.dependent.append(op)
            elif op == "ld.param.u64":
                m = re.fullmatch(r"\[arg_(\w+)\]", args[1])
                if not m:
                    _fail("entry", f"{text}: a pointer not loaded from an argument")
                self.loaded.append((args[0][1:], m.group(1)))
            elif op == "cvta.to.global.u64":
                pass
            elif op == "mov.u32" and args[1].startswith("%tid") or args[1:2] and \
                    args[1].startswith("%ctaid"):
                if args[0][1:] in self.specials or self.columns or self.pointers or \
                        self.slot is not None:
                    _fail("entry", f"{text}: a thread or block id read twice, or after it is "
                                   "used")
                self.specials[args[0][1:]] = args[1][1:]
            elif op == "mov.u32" and args == ["%sp", PARTIALS]:
                pass
            elif op == "mad.lo.u32" and args[0] == "%sp":
                if args[1] != "%tx" or args[3] != "%sp":
                    _fail("entry", f"{text}: partials base not per thread")
                self.stride = _number(args[2])
            elif op == "setp.lt.u32" and args[0] == "%pa":
                nxt = _split(lines[k])
                k += 1
                if nxt[0] != "selp.u32" or nxt[1][1:] != ["1", "0", "%pa"]:
                    _fail("entry", f"{text}: a compare without its select")
                a, b = (v[1:] if v.startswith("%") else _number(v) for v in args[1:3])
                self.columns.append(IndexOp("lt", nxt[1][0][1:], a, b))
            elif op == "mul.wide.s32" and ir is not None:
                nxt = _split(lines[k])
                k += 1
                if _number(args[2]) != ir.element_bytes or nxt[0] != "add.s64" or \
                        nxt[1][2] != "%w" or nxt[1][0] != nxt[1][1]:
                    _fail("entry", f"{text}: a pointer offset not in elements")
                self.pointers.append((nxt[1][0][1:], args[1][1:]))
            elif _index(op, args):
                parsed = _index(op, args)
                if parsed.dst == "idx":
                    self.slot = parsed
                else:
                    self.columns.append(parsed)
            elif op == "bar.sync" and args == ["0"]:
                self.barriers += 1
            elif re.fullmatch(re.escape(prefix) + r"T\d+:", op) and ir is not None:
                if self.barriers != len(self.phases):  # phase p > 0 reads what p - 1 wrote
                    _fail("entry", f"phase {len(self.phases)} starts without a block barrier")
                k, bodies, self.inline = _jump_table(ir, fmt, funcs, lines, k, text,
                                                     len(self.phases), prefix)
                self.phases.append(bodies)
            else:
                _fail("entry", f"`{text}`: an instruction outside the printed subset")
        if self.dependent and tuple(self.dependent) != GRID_DEPENDENCY:
            _fail("entry", "griddepcontrol.wait without launch_dependents")

    def started(self) -> bool:
        """Whether anything but launch bounds and grid waits was read."""
        return bool(self.loaded or self.specials or self.columns or self.pointers
                    or self.phases or self.slot or self.stride or self.barriers)

    def kernel(self, ir: KernelIR, maxntid, max_registers, shared: int) -> KernelIR:
        """`ir` with every field this stretch (and the entry's bounds) states."""
        groups_on_x = next((swap for swap, ids in BLOCK_IDS.items()
                            if self.specials == {"tx": "tid.x", "ty": "tid.y", **ids}), None)
        if groups_on_x is None:
            _fail("entry", f"thread ids read as {self.specials}")
        if maxntid is None:
            _fail("entry", "no .maxntid")
        return dataclasses.replace(
            ir, arguments=tuple(reg for reg, _ in self.loaded), col_threads=maxntid[0],
            k_split=maxntid[1], max_registers=max_registers or 0, columns=tuple(self.columns),
            pointers=tuple(self.pointers), slot=self.slot, shared_bytes=shared,
            partial_stride=self.stride or ir.partial_stride, phases=tuple(self.phases),
            inline=bool(self.inline) if self.inline is not None else ir.inline,
            groups_on_x=groups_on_x)


def _declaration(head: str) -> tuple[str, tuple[str, ...]]:
    """(entry name, pointer arguments) of the `.visible .entry` line."""
    m = re.fullmatch(r"\.visible \.entry (\w+)\((.*)\)", head)
    if not m:
        _fail("entry", f"unreadable declaration `{head}`")
    return m.group(1), tuple(p.split()[-1][len("arg_"):] for p in m.group(2).split(", ") if p)


def parse(ir: KernelIR, text: str) -> KernelIR:
    """The KernelIR the printed `text` implements (fields PTX cannot state come from `ir`)."""
    if isinstance(ir, ChainIR):
        return parse_chain(ir, text)
    lines = text.split("\n")
    shared = 0
    for line in lines[:8]:
        m = re.fullmatch(rf"\.shared \.align 16 \.b8 {PARTIALS}\[(\d+)\];", line)
        if m:
            shared = int(m.group(1))
    funcs, (head, entry) = _blocks(lines)
    name, arguments = _declaration(head)
    read = _Entry(ir, funcs, entry)
    if any(reg != arg for reg, arg in read.loaded):
        _fail("entry", "a pointer loaded from another argument")
    if tuple(reg for reg, _ in read.loaded) != arguments:
        _fail("entry", "pointer arguments loaded out of order")
    got = read.kernel(ir, read.maxntid, read.max_registers, shared)
    return dataclasses.replace(got, entry=name, dependent_launch=bool(read.dependent))


def parse_chain(chain: ChainIR, text: str) -> ChainIR:
    """The ChainIR the printed `text` implements: the entry's head (bounds, grid waits), then
    per stage, after its marker comment (and, past the first, a block barrier), the stage's
    part of the entry, read as a KernelIR's entry is (fields PTX cannot state come from
    `chain`)."""
    lines = text.split("\n")
    if any(line.startswith(".shared") for line in lines):
        _fail("text", "a chain declares shared memory")
    funcs, (head, entry) = _blocks(lines)
    name, arguments = _declaration(head)
    marks = [k for k, line in enumerate(entry) if line.startswith("\t// stage ")]
    if [entry[k] for k in marks] != [stage_marker(i) for i in range(len(chain.stages))]:
        _fail("entry", f"stage markers {[entry[k].strip() for k in marks]} for "
                       f"{len(chain.stages)} stages")
    top = _Entry(None, funcs, entry[:marks[0]], last=False)
    if top.started():
        _fail("entry", "the entry does more than declare before its first stage")
    stages, bindings = [], []
    for i, ir in enumerate(chain.stages):
        section = entry[marks[i] + 1:marks[i + 1] if i + 1 < len(marks) else len(entry)]
        if i:
            if not section or section[0] != "\tbar.sync 0;":
                _fail(f"stage {i}", "starts without a block barrier")
            section = section[1:]
        read = _Entry(ir, funcs, section, stage_prefix(i), last=i + 1 == len(chain.stages))
        if read.dependent or read.maxntid or read.max_registers:
            _fail(f"stage {i}", "launch bounds or grid waits inside a stage")
        stages.append(read.kernel(ir, top.maxntid, top.max_registers, 0))
        bindings.append(tuple(read.loaded))
    return dataclasses.replace(chain, entry=name, arguments=arguments, stages=tuple(stages),
                               bindings=tuple(bindings), dependent_launch=bool(top.dependent))


def _first_difference(want, got, path: str) -> str:
    if isinstance(want, tuple) != isinstance(got, tuple) or (
            not isinstance(want, tuple) and type(want) is not type(got)):
        return f"{path}: IR has {want!r:.200}, text has {got!r:.200}"
    if isinstance(want, tuple) and len(want) == len(got) and want != got:
        fields = getattr(want, "_fields", None)
        for i, (a, b) in enumerate(zip(want, got)):
            if a != b:
                label = f".{fields[i]}" if fields else f"[{i}]"
                return _first_difference(a, b, path + label)
    if isinstance(want, tuple) and len(want) != len(got):
        return f"{path}: IR has {len(want)} items, text has {len(got)}"
    return f"{path}: IR has {want!r:.200}, text has {got!r:.200}"


def require_equal(ir: KernelIR, got: KernelIR, fail) -> None:
    """Call `fail(field, message)` at the first field where the parsed `got` differs from `ir`."""
    if got == ir:
        return
    for field in dataclasses.fields(ir):
        a, b = getattr(ir, field.name), getattr(got, field.name)
        if a != b:
            fail(field.name, _first_difference(a, b, field.name))


def check_printed(ir: KernelIR | ChainIR, text: str) -> None:
    """Raise PrintedMismatch unless the printed PTX `text` implements exactly `ir` (a ChainIR:
    every stage too)."""
    got = parse(ir, text)
    if isinstance(ir, ChainIR):
        for i, (want, stage) in enumerate(zip(ir.stages, got.stages)):
            require_equal(want, stage, lambda field, message, i=i: _fail(
                f"stage {i}", message))
    require_equal(ir, got, _fail)
