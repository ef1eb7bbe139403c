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
                  Step, TapBase)
from . import PrintedMismatch
from .parse_ptx import _first_difference

_LANES = {"": 0, ".x": 0, ".y": 1, ".z": 2, ".w": 3}
_NUM = r"(-?0x[0-9a-f.]+p[-+]\d+)f"
_RE = {name: re.compile(pattern) for name, pattern in {
    "decl": r"  float ((?:a\d+(?:, )?)+);",
    "base": (r"  const float\* __restrict__ xb(\d+)(\d+) = \(\(unsigned\)\(ih \+ (\d+)\) < (\d+)u "
             r"&& \(unsigned\)\(iw \+ (\d+)\) < (\d+)u\) \? x : z \+ \((-?\d+)\);"),
    "load": r"    const (float\d?) b(\d+) = __ldg\(reinterpret_cast<const \1\*>\((\w+) \+ (-?\d+)\)\);",
    "fma": r"    a(\d+) = fmaf\(b(\d+)(\.[xyzw])?, " + _NUM + r", a(\d+)\);",
    "mul": r"    a(\d+) = b(\d+)(\.[xyzw])? \* " + _NUM + ";",
    "zero": r"  a(\d+) = 0\.0f;",
    "bias": r"  ([as][\d_]+) \+= " + _NUM + ";",
    "res_load": r"    const (float\d?) r = __ldg\(reinterpret_cast<const \1\*>\(res \+ (-?\d+)\)\);",
    "res_add": r"    ([as][\d_]+) \+= r(\.[xyzw])?;",
    "max": r"  ([as][\d_]+) = fmaxf\(\1, " + _NUM + r"\);",
    "min": r"  ([as][\d_]+) = fminf\(\1, " + _NUM + r"\);",
    "store": r"  if \(act\) \*reinterpret_cast<(float\d?)\*>\(y \+ (-?\d+)\) = (.+);",
    "partial": r"  \*reinterpret_cast<(float\d?)\*>\(sp \+ (\d+)\) = (.+);",
    "row": r"  float ((?:s\d+_\d+ = 0\.0f(?:, )?)+);",
    "ld_part": r"    const (float\d?) p(\d+) = \*reinterpret_cast<const \1\*>\(sp \+ (\d+)\);",
    "add_part": r"    (s\d+_\d+) \+= p(\d+)(\.[xyzw])?;",
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


def _value(text: str) -> list[str]:
    """Registers of a stored value: `a0` or `make_float4(a0, a1, a2, a3)`."""
    m = re.fullmatch(r"make_float\d\((.*)\)", text)
    return [v.strip() for v in m.group(1).split(",")] if m else [text]


class _Body:
    def __init__(self, ir: KernelIR, where: str):
        self.ir, self.where, self.width = ir, where, ir.vector_width
        self.steps: dict[str, list] = {}
        self.vt = "float" if self.width == 1 else f"float{self.width}"

    def fail(self, line: str, message: str) -> None:
        _fail(self.where, f"{message} in `{line.strip()}`")

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
                self.step(m.group(1), kind, float.fromhex(m.group(2)))
                return True
        m = _RE["res_load"].fullmatch(line)
        if m:
            if m.group(1) != self.vt:
                self.fail(line, f"a residual load of {m.group(1)}, not {self.vt}")
            residual[:] = [int(m.group(2))]
            return True
        m = _RE["res_add"].fullmatch(line)
        if m:
            if not residual:
                self.fail(line, "a residual added before it was loaded")
            lane = _LANES[m.group(2) or ""]
            if lane != self.lane(m.group(1)):
                self.fail(line, "a residual column added to another column")
            self.step(m.group(1), "residual", residual[0])
            return True
        return False

    def lane(self, reg: str) -> int:
        return int(reg.split("_")[1]) if reg.startswith("s") else int(reg[1:]) % self.width


def _compute(ir: KernelIR, lines: list[str], where: str) -> Compute:
    body, width = _Body(ir, where), ir.vector_width
    slots, bases, batches, zero, outputs = 0, [], [], {}, []
    loads, fmas, started, residual = None, [], set(), []
    for line in lines:
        m = _RE["fma"].fullmatch(line) or _RE["mul"].fullmatch(line)
        if m:
            init = m.re is _RE["mul"]
            acc, src, lane = int(m.group(1)), int(m.group(2)), _LANES[m.group(3) or ""]
            if not init and int(m.group(5)) != acc or loads is None or src >= len(loads):
                body.fail(line, "an FMA that does not accumulate a loaded value into its sum")
            if lane != acc % width:
                body.fail(line, "an FMA reads another column than it sums")
            slot, weight = acc // width, float.fromhex(m.group(4))
            if lane == 0:
                fmas.append([slot, weight, src, init, 1])
            elif not fmas or fmas[-1][:4] != [slot, weight, src, init] or fmas[-1][4] != lane:
                body.fail(line, "an FMA misses columns")
            else:
                fmas[-1][4] += 1
            continue
        m = _RE["load"].fullmatch(line)
        if m:
            if loads is None or int(m.group(2)) != len(loads) or m.group(1) != body.vt:
                body.fail(line, "a load outside a block, out of order or of the wrong width")
            base = m.group(3)
            index = -1 if base == "x" else next(
                (i for i, b in enumerate(bases) if base == f"xb{b.r}{b.s}"), None)
            if index is None:
                body.fail(line, f"a load from unknown base {base}")
            loads.append(Load(index, int(m.group(4))))
            continue
        if line == "  {":
            loads, fmas = [], []
        elif line == "  }":
            if loads:
                if any(f[4] != width for f in fmas):
                    _fail(where, "an FMA misses columns")
                batches.append((tuple(loads), tuple(tuple(f[:4]) for f in fmas)))
            loads, residual = None, []
        elif (m := _RE["decl"].fullmatch(line)):
            slots = len(m.group(1).split(", ")) // width
        elif (m := _RE["base"].fullmatch(line)):
            r, s, r2, h, s2, w, shift = (int(v) for v in m.groups())
            if (r, s) != (r2, s2) or (h, w) != (ir.geometry.height, ir.geometry.width):
                body.fail(line, "a tap base whose bounds are not its tap's")
            bases.append(TapBase(r, s, shift))
        elif (m := _RE["zero"].fullmatch(line)):
            acc = int(m.group(1))
            if acc % width != zero.get(acc // width, 0):
                body.fail(line, "a sum zeroed out of order")
            zero[acc // width] = acc % width + 1
        elif (m := _RE["store"].fullmatch(line)) or (m := _RE["partial"].fullmatch(line)):
            regs = _value(m.group(3))
            accs = [int(r[1:]) if r.startswith("a") else -1 for r in regs]
            slot = accs[0] // width
            if m.group(1) != body.vt or accs != [slot * width + u for u in range(width)]:
                body.fail(line, "a store of columns that are not one row's sums in order")
            if m.re is _RE["store"]:
                outputs.append(body.finish(line, regs, slot, int(m.group(2))))
            else:
                outputs.append(Partial(slot, int(m.group(2)) * ir.acc_bytes))
        elif not body.epilogue(line, residual):
            body.fail(line, "a line outside the printed subset")
    if body.steps:
        _fail(where, "epilogue steps on a sum that is never stored")
    return Compute(slots, tuple(bases), tuple(Batch(*b) for b in batches), tuple(zero),
                   tuple(outputs))


def _reduce(ir: KernelIR, lines: list[str], where: str) -> Reduce:
    body, width = _Body(ir, where), ir.vector_width
    rows, offsets, parts, residual, names = [], [], {}, [], []
    for line in lines:
        if (m := _RE["row"].fullmatch(line)):
            names = [v.split(" = ")[0] for v in m.group(1).split(", ")]
            if names != [f"{names[0].split('_')[0]}_{u}" for u in range(width)]:
                body.fail(line, "a row's sums are not its columns in order")
            offsets, parts = [], {}
        elif (m := _RE["ld_part"].fullmatch(line)):
            if m.group(1) != body.vt or int(m.group(2)) != len(offsets):
                body.fail(line, "a partial load out of order or of the wrong width")
            offsets.append(int(m.group(3)) * ir.acc_bytes)
        elif (m := _RE["add_part"].fullmatch(line)):
            lane = _LANES[m.group(3) or ""]
            if int(m.group(2)) != len(offsets) - 1 or m.group(1) != names[lane]:
                body.fail(line, "a partial added to another column or out of order")
            parts[len(offsets) - 1] = parts.get(len(offsets) - 1, 0) + 1
        elif line in ("  {", "  }"):
            if line == "  }":
                residual.clear()
        elif (m := _RE["store"].fullmatch(line)):
            regs = _value(m.group(3))
            if regs != names or any(parts.get(i) != width for i in range(len(offsets))):
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


def parse(ir: KernelIR, text: str) -> KernelIR:
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
    shared = int(m.group(1)) * 4 if m else 0
    signed = set()
    columns, pointers, phases, slot, stride = [], [], [], None, None
    qualifiers = set()
    want_sig = ", ".join(f"{n}" for _, n in ir.body_args)
    body_lines = lines[start + 3:lines.index("}", start)]
    k = 0
    while k < len(body_lines):
        line = body_lines[k]
        k += 1
        if line.startswith("  const unsigned tx = threadIdx.x, ty = threadIdx.y, bx = blockIdx.x,"):
            continue
        if line.startswith("  unsigned ") or line.startswith("  int "):
            if line.startswith("  int "):
                signed = {v.strip() for v in line[len("  int "):].rstrip(";").split(",")}
            continue
        if (m := re.fullmatch(r"  (\w+) \+= (\w+);", line)):
            pointers.append((m.group(1), m.group(2)))
            continue
        if (m := re.fullmatch(r"  float\* sp = sparsert_partials \+ tx \* (\d+);", line)):
            stride = int(m.group(1)) * ir.acc_bytes
            continue
        if line == "  __syncthreads();":
            continue
        if line == "  switch (idx) {":
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
        inline=qualifiers == {"__forceinline__"} if qualifiers else ir.inline)


def check_printed(ir: KernelIR, text: str) -> None:
    """Raise PrintedMismatch unless the printed CUDA `text` implements exactly `ir`."""
    got = parse(ir, text)
    if got == ir:
        return
    for field in dataclasses.fields(ir):
        a, b = getattr(ir, field.name), getattr(got, field.name)
        if a != b:
            _fail(field.name, _first_difference(a, b, field.name))
