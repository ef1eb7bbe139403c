"""Printed CUDA C++ -> kernel IR, for `check_printed` (the CUDA printer's counterpart of
parse_ptx.py): the subset render/cuda.py prints — per function the tap bases, load blocks,
fmaf/multiply lines, zeroing, epilogue lines, stores and shared-memory partials; in the entry the
index arithmetic, pointer offsets, partials base and switch tables — is read back into a
KernelIR that must equal the lowered one. Any other line is an error.
"""

from __future__ import annotations

import dataclasses
import re

from ..ir import (Batch, Compute, Finish, IndexOp, KernelIR, Load, Partial, Reduce, ReduceRow,
                  Shift, Step, TapBase)
from . import PrintedMismatch
from .cuda import GRID_DEPENDENCY, CFmt
from .parse_ptx import _f16, require_equal

_LANES = {"": 0, ".x": 0, ".y": 1, ".z": 2, ".w": 3}
_NUM = r"((?:\(unsigned short\))?-?0x[0-9a-fA-F.]+(?:p[-+]\d+f|u)?)"
_T = r"(float\d?|unsigned short|unsigned|uint\d)"
# fp16 sums print their arithmetic as helper calls; read them as the fp32 forms they mean
_HALF = [(re.compile(r"(\w+) = sparsert_hfma2?\((\S+), (.+), (\w+)\);"), r"\1 = fmaf(\2, \3, \4);"),
         (re.compile(r"(\w+) = sparsert_hmul2?\((\S+), (.+)\);"), r"\1 = \2 * \3;"),
         (re.compile(r"(\w+) = sparsert_hadd2?\(\1, (.+)\);"), r"\1 += \2;"),
         (re.compile(r"(\w+) = sparsert_hmax2?\(\1, (.+)\);"), r"\1 = fmaxf(\1, \2);"),
         (re.compile(r"(\w+) = sparsert_hmin2?\(\1, (.+)\);"), r"\1 = fminf(\1, \2);"),
         (re.compile(r"(\w+) = 0;"), r"\1 = 0.0f;")]
_COLUMN = re.compile(r"\(unsigned short\)\((\w+)(\.[xyzw])? >> 16\)|\(unsigned short\)(\w+)(\.[xyzw])?|(\w+)")
_RE = {name: re.compile(pattern) for name, pattern in {
    "decl": r"  (?:float|unsigned short|unsigned) ((?:a\d+(?:, )?)+);",
    "base": (r"  const (?:float|unsigned short)\* __restrict__ xb(\d+)(\d+) = \(\(unsigned\)\(ih \+ (\d+)\) < (\d+)u "
             r"&& \(unsigned\)\(iw \+ (\d+)\) < (\d+)u\) \? x : z \+ \((-?\d+)\);"),
    "load": r"    const " + _T + r" b(\d+) = __ldg\(reinterpret_cast<const \1\*>\((\w+) \+ (-?\d+)\)\);",
    "shift": r"    const unsigned b(\d+) = __byte_perm\(b(\d+), b(\d+), 0x5432\);",
    "widen": r"    const float c(\d+)_(\d+) = sparsert_h2f\((.+)\);",
    "fma": r"    a(\d+) = fmaf\((\w+)(\.[xyzw])?, " + _NUM + r", a(\d+)\);",
    "mul": r"    a(\d+) = (\w+)(\.[xyzw])? \* " + _NUM + ";",
    "zero": r"  a(\d+) = 0\.0f;",
    "bias": r"  ([as][\d_]+) \+= " + _NUM + ";",
    "res_load": r"    const " + _T + r" r = __ldg\(reinterpret_cast<const \1\*>\(res \+ (-?\d+)\)\);",
    "res_add": r"    ([as][\d_]+) \+= (?:r(\.[xyzw])?|sparsert_h2f\((.+)\));",
    "max": r"  ([as][\d_]+) = fmaxf\(\1, " + _NUM + r"\);",
    "min": r"  ([as][\d_]+) = fminf\(\1, " + _NUM + r"\);",
    "store": r"  if \(act\) \*reinterpret_cast<" + _T + r"\*>\(y \+ (-?\d+)\) = (.+);",
    "partial": r"  \*reinterpret_cast<" + _T + r"\*>\(sp \+ (\d+)\) = (.+);",
    "row": r"  (?:float|unsigned short|unsigned) ((?:s\d+_\d+ = 0(?:\.0f)?(?:, )?)+);",
    "ld_part": r"    const " + _T + r" ([pq])(\d+) = \*reinterpret_cast<const \1\*>\(sp \+ (\d+)\);",
    "add_part": r"    (s\d+_\d+) \+= ([pq])(\d+)(\.[xyzw])?;",
}.items()}
_INDEX = [("mad", re.compile(r"  (\w+) = (\w+) \* (\w+) \+ (\w+);")),
          ("mul", re.compile(r"  (\w+) = (\w+) \* (\w+);")),
          ("add", re.compile(r"  (\w+) = (\w+) \+ (\w+);")),
          ("sub", re.compile(r"  (\w+) = (\w+) - (\w+);")),
          ("div", re.compile(r"  (\w+) = (\w+) / (\w+);")),
          ("rem", re.compile(r"  (\w+) = (\w+) % (\w+);")),
          ("min", re.compile(r"  (\w+) = min\((\w+), (\w+)\);")),
          ("lt", re.compile(r"  (\w+) = (\w+) < (\w+);"))]


def _fail(where: str, message: str) -> None:
    raise PrintedMismatch(f"printed CUDA differs from the kernel IR: {where}: {message}")


def _value(text: str, fmt: CFmt, line: str, where: str) -> list[str]:
    """Sum registers of a stored value, in column order: `a0`, `make_float4(a0, ...)`, or fp32
    sums packed to fp16 (`make_uint2(sparsert_f2h2(a1, a0), ...)`, high half first)."""
    packed = "sparsert_f2h" in text
    if packed != (fmt.widen and not text.startswith("make_float")):
        _fail(where, f"a store that {'packs' if packed else 'does not pack'} its sums in `{line}`")
    text = re.sub(r"sparsert_f2h2\((\w+), (\w+)\)", r"\2, \1", text)
    text = re.sub(r"sparsert_f2h\((\w+)\)", r"\1", text)
    m = re.fullmatch(r"make_\w+\((.*)\)", text)
    return [v.strip() for v in (m.group(1) if m else text).split(",")]


def _const(text: str, fmt: CFmt, line: str, where: str) -> float:
    """A printed constant: a float32 hex literal, a paired fp16 `0xHHHHHHHHu` or a single one."""
    m = re.fullmatch(r"0x([0-9A-F]{4})([0-9A-F]{4})u|\(unsigned short\)0x([0-9A-F]{4})", text)
    if fmt.half_acc != bool(m):
        _fail(where, f"a constant of the wrong precision in `{line}`")
    if not m:
        return float.fromhex(text[:-1])
    if m.group(1) and m.group(1) != m.group(2):
        _fail(where, f"the two halves of a paired fp16 constant differ in `{line}`")
    return _f16(int(m.group(1) or m.group(3), 16))


def _column(text: str) -> tuple[str, int]:
    """(register, column) of an fp16 column expression: `(unsigned short)(b0.y >> 16)` is
    column 3 of b0; `b0` (one column per thread) column 0."""
    m = _COLUMN.fullmatch(text)
    if not m:
        return "", -1
    if m.group(1):
        return m.group(1), 2 * _LANES[m.group(2) or ""] + 1
    if m.group(3):
        return m.group(3), 2 * _LANES[m.group(4) or ""]
    return m.group(5), 0


class _Body:
    def __init__(self, ir: KernelIR, where: str):
        self.ir, self.where, self.fmt = ir, where, CFmt(ir)
        self.units = self.fmt.units
        self.steps: dict[str, list] = {}

    def fail(self, line: str, message: str) -> None:
        _fail(self.where, f"{message} in `{line.strip()}`")

    def normal(self, line: str) -> str:
        if self.fmt.half_acc:
            for pattern, replacement in _HALF:
                line, n = pattern.subn(replacement, line)
                if n:
                    break
        return line

    def const(self, text: str, line: str) -> float:
        return _const(text, self.fmt, line, self.where)

    def step(self, reg: str, kind: str, value) -> None:
        self.steps.setdefault(reg, []).append(Step(kind, value))

    def finish(self, line: str, regs: list[str], slot: int, offset: int) -> Finish:
        steps = [tuple(self.steps.pop(r, [])) for r in regs]
        if len(set(steps)) != 1:
            self.fail(line, "epilogue steps differ between the columns of one row")
        return Finish(slot, offset, steps[0])

    def epilogue(self, line: str, residual: list) -> bool:
        for kind in ("bias", "max", "min"):
            m = _RE[kind].fullmatch(line)
            if m:
                self.step(m.group(1), kind, self.const(m.group(2), line))
                return True
        m = _RE["res_load"].fullmatch(line)
        if m:
            if m.group(1) != self.fmt.vt:
                self.fail(line, f"a residual load of {m.group(1)}, not {self.fmt.vt}")
            residual[:] = [int(m.group(2))]
            return True
        m = _RE["res_add"].fullmatch(line)
        if m:
            if not residual:
                self.fail(line, "a residual added before it was loaded")
            if self.fmt.widen:
                reg, lane = _column(m.group(3) or "")
                ok = reg == "r" and lane == self.lane(m.group(1))
            else:
                ok = m.group(3) is None and _LANES[m.group(2) or ""] == self.lane(m.group(1))
            if not ok:
                self.fail(line, "a residual column added to another column")
            self.step(m.group(1), "residual", residual[0])
            return True
        return False

    def lane(self, reg: str) -> int:
        """The sum unit a register holds (a column, or a column pair with half2 sums)."""
        return int(reg.split("_")[1]) if reg.startswith("s") else int(reg[1:]) % self.units


def _compute(ir: KernelIR, lines: list[str], where: str) -> Compute:
    body = _Body(ir, where)
    fmt, units = body.fmt, body.units
    slots, bases, batches, zero, outputs = 0, [], [], {}, []
    loads, fmas, residual, widened, partial_end = None, [], [], {}, 0
    shifts: list[Shift] = []
    for line in lines:
        line = body.normal(line)
        m = _RE["fma"].fullmatch(line) or _RE["mul"].fullmatch(line)
        if m:
            init = m.re is _RE["mul"]
            acc, src, suffix = int(m.group(1)), m.group(2), m.group(3) or ""
            if not init and int(m.group(5)) != acc or loads is None:
                body.fail(line, "an FMA that does not accumulate a loaded value into its sum")
            if fmt.widen:
                source, lane = widened.get(src, (-1, -1))
                ok = not suffix and lane == acc % units
            else:
                source = int(src[1:]) if re.fullmatch(r"b\d+", src) else -1
                ok = _LANES[suffix] == acc % units and (fmt.raw_count > 1 or not suffix)
            if not ok or not 0 <= source < len(loads) + len(shifts):
                body.fail(line, "an FMA reads another column than it sums")
            slot, weight, unit = acc // units, body.const(m.group(4), line), acc % units
            if unit == 0:
                fmas.append([slot, weight, source, init, 1])
            elif not fmas or fmas[-1][:4] != [slot, weight, source, init] or fmas[-1][4] != unit:
                body.fail(line, "an FMA misses columns")
            else:
                fmas[-1][4] += 1
            continue
        m = _RE["load"].fullmatch(line)
        if m:
            if loads is None or int(m.group(2)) != len(loads) or m.group(1) != fmt.vt or shifts:
                body.fail(line, "a load outside a block, out of order or of the wrong type")
            base = m.group(3)
            index = -1 if base == "x" else next(
                (i for i, b in enumerate(bases) if base == f"xb{b.r}{b.s}"), None)
            if index is None:
                body.fail(line, f"a load from unknown base {base}")
            loads.append(Load(index, int(m.group(4))))
            continue
        if (m := _RE["shift"].fullmatch(line)):
            i, a, b = (int(v) for v in m.groups())
            if not ir.pair_windows or loads is None or fmas or i != len(loads) + len(shifts) \
                    or max(a, b) >= len(loads):
                body.fail(line, "a shifted window that is not two of its block's pairs in order")
            shifts.append(Shift(a, b))
        elif (m := _RE["widen"].fullmatch(line)):
            i, lane = int(m.group(1)), int(m.group(2))
            if not fmt.widen or loads is None or _column(m.group(3)) != (f"b{i}", lane) \
                    or i >= len(loads) + len(shifts):
                body.fail(line, "a widened column that is not its load's")
            widened[f"c{i}_{lane}"] = (i, lane)
        elif line == "  {":
            loads, fmas, widened, shifts = [], [], {}, []
        elif line == "  }":
            if loads:
                if any(f[4] != units for f in fmas):
                    _fail(where, "an FMA misses columns")
                batches.append((tuple(loads), tuple(tuple(f[:4]) for f in fmas), tuple(shifts)))
            loads, residual = None, []
        elif (m := _RE["decl"].fullmatch(line)):
            slots = len(m.group(1).split(", ")) // units
        elif (m := _RE["base"].fullmatch(line)):
            r, s, r2, h, s2, w, shift = (int(v) for v in m.groups())
            if (r, s) != (r2, s2) or (h, w) != (ir.geometry.height, ir.geometry.width):
                body.fail(line, "a tap base whose bounds are not its tap's")
            bases.append(TapBase(r, s, shift))
        elif (m := _RE["zero"].fullmatch(line)):
            acc = int(m.group(1))
            if acc % units != zero.get(acc // units, 0):
                body.fail(line, "a sum zeroed out of order")
            zero[acc // units] = acc % units + 1
        elif (m := _RE["store"].fullmatch(line)) or (m := _RE["partial"].fullmatch(line)):
            stored = m.re is _RE["store"]
            regs = (_value(m.group(3), fmt, line, where) if stored
                    else [v.strip() for v in re.sub(r"make_\w+\((.*)\)", r"\1",
                                                    m.group(3)).split(",")])
            accs = [int(r[1:]) if re.fullmatch(r"a\d+", r) else -1 for r in regs]
            slot, first = divmod(accs[0], units)
            count = units if stored else min(units - first, 4)
            if m.group(1) != (fmt.vt if stored else fmt.acc_vt) or \
                    accs != [accs[0] + u for u in range(count)]:
                body.fail(line, "a store of columns that are not one row's sums in order")
            if stored:
                if first:
                    body.fail(line, "a store that starts inside a row")
                outputs.append(body.finish(line, regs, slot, int(m.group(2))))
            elif first == 0:
                outputs.append(Partial(slot, int(m.group(2)) * ir.acc_bytes))
                partial_end = count
            elif not outputs or not isinstance(outputs[-1], Partial) or \
                    outputs[-1].slot != slot or partial_end != first or int(m.group(2)) * \
                    ir.acc_bytes != outputs[-1].offset + first * fmt.unit_elems * ir.acc_bytes:
                body.fail(line, "a partial store misses columns")
            else:
                partial_end += count
        elif not body.epilogue(line, residual):
            body.fail(line, "a line outside the printed subset")
    if body.steps:
        _fail(where, "epilogue steps on a sum that is never stored")
    return Compute(slots, tuple(bases), tuple(Batch(*b) for b in batches), tuple(zero),
                   tuple(outputs))


def _reduce(ir: KernelIR, lines: list[str], where: str) -> Reduce:
    body = _Body(ir, where)
    fmt, units = body.fmt, body.units
    rows, offsets, parts, residual, names = [], [], {}, [], []
    for line in lines:
        line = body.normal(line)
        if (m := _RE["row"].fullmatch(line)):
            names = [v.split(" = ")[0] for v in m.group(1).split(", ")]
            if names != [f"{names[0].split('_')[0]}_{u}" for u in range(units)]:
                body.fail(line, "a row's sums are not its columns in order")
            offsets, parts = [], {}
        elif (m := _RE["ld_part"].fullmatch(line)):
            second, index, offset = m.group(2) == "q", int(m.group(3)), int(m.group(4))
            if m.group(1) != fmt.acc_vt or index != len(offsets) - second or (second and (
                    offset * ir.acc_bytes != offsets[-1] + 4 * fmt.unit_elems * ir.acc_bytes)):
                body.fail(line, "a partial load out of order or of the wrong type")
            if not second:
                offsets.append(offset * ir.acc_bytes)
        elif (m := _RE["add_part"].fullmatch(line)):
            lane = _LANES[m.group(4) or ""] + 4 * (m.group(2) == "q")
            if int(m.group(3)) != len(offsets) - 1 or m.group(1) != names[lane]:
                body.fail(line, "a partial added to another column or out of order")
            parts[len(offsets) - 1] = parts.get(len(offsets) - 1, 0) + 1
        elif line in ("  {", "  }"):
            if line == "  }":
                residual.clear()
        elif (m := _RE["store"].fullmatch(line)):
            regs = _value(m.group(3), fmt, line, where)
            if m.group(1) != fmt.vt or regs != names or \
                    any(parts.get(i) != units for i in range(len(offsets))):
                body.fail(line, "a row stored before all its partials were added")
            rows.append(ReduceRow(tuple(offsets), body.finish(line, regs, 0, int(m.group(2)))))
        elif not body.epilogue(line, residual):
            body.fail(line, "a line outside the printed subset")
    return Reduce(tuple(rows))


def _functions(lines: list[str]) -> dict[str, tuple[str, str, list[str]]]:
    """name -> (qualifier, signature, body lines) of every __device__ function."""
    out, i = {}, 0
    while i < len(lines):
        m = re.fullmatch(r"__device__ (\w+) void (\w+)\((.*)\)", lines[i])
        if m:
            end = lines.index("}", i)
            out[m.group(2)] = (m.group(1), m.group(3), lines[i + 2:end])
            i = end
        i += 1
    return out


def _conversions(ir: KernelIR, text: str) -> None:
    """2-byte storage: the printed conversion helpers convert the kernel's own type (a bf16
    kernel read through cvt.f32.f16 would compute with garbage)."""
    ty = {"fp16": "f16", "bf16": "bf16"}.get(ir.dtype)
    if ty is None:
        return
    for name, want in (("h2f", f"cvt.f32.{ty}"), ("f2h2", f"cvt.rn.{ty}x2.f32"),
                       ("f2h", f"cvt.rn.{ty}.f32")):
        m = re.search(rf'sparsert_{name}\([^)]*\) {{[^}}]*asm\("(\S+) ', text)
        if not m or m.group(1) != want:
            _fail("helpers", f"sparsert_{name} must be one {want} for a {ir.precision} kernel, "
                             f"found {m.group(1) if m else 'none'}")


def parse(ir: KernelIR, text: str) -> KernelIR:
    _conversions(ir, text)
    lines = text.split("\n")
    funcs = _functions(lines)
    start = next((i for i, ln in enumerate(lines) if ln.startswith('extern "C" __global__')), None)
    if start is None:
        _fail("entry", 'no extern "C" __global__ function')
    bound = re.fullmatch(r'extern "C" __global__ void __(launch_bounds|maxnreg)__\((\d+)\)',
                         lines[start])
    head = re.fullmatch(r"(\w+)\((.*)\)", lines[start + 1])
    if not bound or not head:
        _fail("entry", "unreadable declaration")
    arguments = tuple(a.split()[-1] for a in head.group(2).split(", "))
    m = re.search(r"sparsert_partials\[(\d+)\]", text)
    shared = int(m.group(1)) * ir.acc_bytes if m else 0
    signed = set()
    columns, pointers, phases, slot, stride = [], [], [], None, None
    qualifiers, barriers, groups_on_x = set(), 0, None
    want_sig = ", ".join(f"{n}" for _, n in ir.body_args)
    body_lines = lines[start + 3:lines.index("}", start)]
    dependent = tuple(body_lines[:len(GRID_DEPENDENCY)]) == GRID_DEPENDENCY
    k = len(GRID_DEPENDENCY) if dependent else 0
    while k < len(body_lines):
        line = body_lines[k]
        k += 1
        if (m := re.fullmatch(r"  const unsigned tx = threadIdx.x, ty = threadIdx.y, "
                              r"bx = blockIdx\.([xy]), by = blockIdx\.([xy]);", line)):
            if m.group(1) == m.group(2):
                _fail("entry", f"bx and by both read blockIdx.{m.group(1)}")
            groups_on_x = m.group(1) == "y"
            continue
        if line.startswith("  unsigned ") or line.startswith("  int "):
            if line.startswith("  int "):
                signed = {v.strip() for v in line[len("  int "):].rstrip(";").split(",")}
            continue
        if (m := re.fullmatch(r"  (\w+) \+= (\w+);", line)):
            pointers.append((m.group(1), m.group(2)))
            continue
        if (m := re.fullmatch(r"  (?:float|unsigned short)\* sp = sparsert_partials \+ tx \* (\d+);",
                              line)):
            stride = int(m.group(1)) * ir.acc_bytes
            continue
        if line == "  __syncthreads();":
            barriers += 1
            continue
        if line == "  switch (idx) {":
            if barriers != len(phases):    # phase p > 0 reads what phase p - 1 wrote
                _fail("entry", f"phase {len(phases)} starts without a block barrier")
            bodies = []
            while body_lines[k] != "  }":
                m = re.fullmatch(r"  case (\d+): (\w+)\((.*)\); break;", body_lines[k])
                k += 1
                where = f"phase {len(phases)} case {len(bodies)}"
                if not m or int(m.group(1)) != len(bodies) or m.group(2) not in funcs:
                    _fail(where, f"unreadable or out-of-order case `{body_lines[k - 1]}`")
                qualifier, sig, lines_ = funcs[m.group(2)]
                if m.group(3) != want_sig or [a.split()[-1] for a in sig.split(", ")] != \
                        want_sig.split(", "):
                    _fail(where, f"{m.group(2)} takes ({sig}), is called with ({m.group(3)})")
                qualifiers.add(qualifier)
                parse_body = _compute if not phases else _reduce
                bodies.append(parse_body(ir, lines_, where))
            k += 1
            phases.append(tuple(bodies))
            continue
        for name, pattern in _INDEX:
            m = pattern.fullmatch(line)
            if m:
                vals = [int(v) if v.isdigit() else v for v in m.groups()]
                op = IndexOp(name, vals[0], vals[1], vals[2], vals[3] if len(vals) > 3 else None,
                             vals[0] in signed)
                if op.dst == "idx":
                    slot = op
                else:
                    columns.append(op)
                break
        else:
            _fail("entry", f"`{line.strip()}`: a line outside the printed subset")
    threads = ir.col_threads * ir.k_split
    if bound.group(1) == "launch_bounds" and (int(bound.group(2)) != threads or ir.max_registers):
        _fail("entry", f"launch bounds {bound.group(2)} for {threads} threads")
    if bound.group(1) == "maxnreg" and int(bound.group(2)) != ir.max_registers:
        _fail("entry", f"__maxnreg__({bound.group(2)}) for a cap of {ir.max_registers}")
    if len(qualifiers) > 1:
        _fail("entry", "bodies mix inline and call qualifiers")
    return dataclasses.replace(
        ir, entry=head.group(1), arguments=arguments, columns=tuple(columns),
        pointers=tuple(pointers), slot=slot, shared_bytes=shared,
        partial_stride=stride or ir.partial_stride, phases=tuple(phases),
        inline=qualifiers == {"__forceinline__"} if qualifiers else ir.inline,
        groups_on_x=groups_on_x if groups_on_x is not None else _fail("entry", "no block ids"),
        dependent_launch=dependent)


def check_printed(ir: KernelIR, text: str) -> None:
    """Raise PrintedMismatch unless the printed CUDA `text` implements exactly `ir`."""
    require_equal(ir, parse(ir, text), _fail)
