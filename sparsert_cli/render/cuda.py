"""Kernel IR -> readable CUDA C++ (compiled by NVRTC), by rule tables: the same kernel as the PTX
printer, for inspection, debugging and small layers (NVRTC is 50-90x slower than the PTX route on
large patterns).

`RULES` maps IR operations to C++ templates; fp16 kernels overlay `HALF_RULES` (half2 sums) on
it, and `CFmt` holds each precision's types. fp16 values live in `unsigned` (a column pair) or
`unsigned short` registers and their arithmetic is a small inline-PTX helper per instruction
(printed once at the top): NVRTC has no cuda_fp16.h on its default include path. bf16 kernels
(fp32 sums) are printed the same way, with bf16 conversion helpers (cvt.f32.bf16, cvt.rn.bf16x2.f32)
instead of cuda_bf16.h's __nv_bfloat16, which needs the same missing include path.
"""

from __future__ import annotations

from .. import __version__
from ..errors import UserError
from ..ir import Batch, ChainIR, Compute, Finish, IndexOp, KernelIR, Reduce
from ..problem_shape import HALF_DTYPES
from .ptx import f16_bits

# programmatic dependent launch (KernelIR.dependent_launch): the entry's first two statements
GRID_DEPENDENCY = ('  asm volatile("griddepcontrol.wait;" ::: "memory");',
                   '  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");')

VERSION = "cuda-2"
PRECISIONS = ("fp32", "fp16", "fp16acc32", "bf16")
_LANE = ("x", "y", "z", "w")
_FLOAT_VEC = {1: "float", 2: "float2", 4: "float4"}
_PAIR_VEC = {1: "unsigned", 2: "uint2", 4: "uint4"}

RULES = {
    "mad": "{dst} = {a} * {b} + {c};",
    "mul": "{dst} = {a} * {b};",
    "add": "{dst} = {a} + {b};",
    "sub": "{dst} = {a} - {b};",
    "div": "{dst} = {a} / {b};",
    "rem": "{dst} = {a} % {b};",
    "min": "{dst} = min({a}, {b});",
    "lt": "{dst} = {a} < {b};",
    "pointer": "{ptr} += {var};",
    "barrier": "__syncthreads();",
    "load": "const {vt} b{i} = __ldg(reinterpret_cast<const {vt}*>({base} + {offset}));",
    # a column-pair window one column right of pair a: a's high half, then b's low half
    "shift": "const unsigned b{i} = __byte_perm(b{a}, b{b}, 0x5432);",
    "widen": "const float {dst} = sparsert_h2f({src});",
    "mul_first": "{acc} = {src} * {w};",
    "fma": "{acc} = fmaf({src}, {w}, {acc});",
    "zero": "{acc} = 0.0f;",
    "step_bias": "{acc} += {c};",
    "residual_load": "const {vt} r = __ldg(reinterpret_cast<const {vt}*>(res + {offset}));",
    "step_residual": "{acc} += {src};",
    "step_max": "{acc} = fmaxf({acc}, {c});",
    "step_min": "{acc} = fminf({acc}, {c});",
    "store": "if (act) *reinterpret_cast<{vt}*>(y + {offset}) = {src};",
    "st_shared": "*reinterpret_cast<{vt}*>(sp + {offset}) = {src};",
    "ld_shared": "const {vt} {name} = *reinterpret_cast<const {vt}*>(sp + {offset});",
    "add_partial": "{acc} += {src};",
}
# fp16 sums: {h} is "2" for column pairs (f16x2), "" for single columns (f16)
HALF_RULES = {
    "mul_first": "{acc} = sparsert_hmul{h}({src}, {w});",
    "fma": "{acc} = sparsert_hfma{h}({src}, {w}, {acc});",
    "zero": "{acc} = 0;",
    "step_bias": "{acc} = sparsert_hadd{h}({acc}, {c});",
    "step_residual": "{acc} = sparsert_hadd{h}({acc}, {src});",
    "step_max": "{acc} = sparsert_hmax{h}({acc}, {c});",
    "step_min": "{acc} = sparsert_hmin{h}({acc}, {c});",
    "add_partial": "{acc} = sparsert_hadd{h}({acc}, {src});",
}


# 2-byte storage <-> fp32 conversions, one inline-PTX instruction each; {ty} is f16 or bf16
CONVERSIONS = {
    "h2f": ('float sparsert_h2f(unsigned short h) {{ float f; asm("cvt.f32.{ty} %0, %1;" '
            ': "=f"(f) : "h"(h)); return f; }}'),
    "f2h2": ('unsigned sparsert_f2h2(float hi, float lo) {{ unsigned r; asm("cvt.rn.{ty}x2.f32'
             ' %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r; }}'),
    "f2h": ('unsigned short sparsert_f2h(float f) {{ unsigned short r; asm("cvt.rn.{ty}.f32 '
            '%0, %1;" : "=h"(r) : "f"(f)); return r; }}'),
}


def _helpers(ty: str = "f16") -> list[str]:
    """Inline-PTX helpers (one instruction each): fp16 arithmetic and conversions, or (`ty`
    bf16) the bf16 <-> fp32 conversions alone (bf16 kernels sum in fp32)."""
    fn = "__device__ __forceinline__"
    half_sums = ty == "f16"          # only fp16 data is summed in its own type (half2)
    out = [f"// {'fp16 arithmetic' if half_sums else 'bf16 conversions'} as inline PTX, one "
           "instruction per helper"]
    for h, t, c, op_ty in (("2", "unsigned", "r", "f16x2"), ("", "unsigned short", "h", "f16")
                           ) if half_sums else ():
        out.append(f'{fn} {t} sparsert_hfma{h}({t} x, {t} w, {t} a) {{ asm("fma.rn.{op_ty} '
                   f'%0, %1, %2, %0;" : "+{c}"(a) : "{c}"(x), "{c}"(w)); return a; }}')
        for name, op in (("mul", "mul.rn"), ("add", "add"), ("max", "max"), ("min", "min")):
            out.append(f'{fn} {t} sparsert_h{name}{h}({t} a, {t} b) {{ {t} r; asm("{op}.{op_ty} '
                       f'%0, %1, %2;" : "={c}"(r) : "{c}"(a), "{c}"(b)); return r; }}')
    return out + [f"{fn} {CONVERSIONS[name].format(ty=ty)}" for name in ("h2f", "f2h2", "f2h")
                  ] + [""]


def f32(value: float) -> str:
    """Exact float32 literal (hex float)."""
    return f"{float(value).hex()}f"


class CFmt:
    """One kernel's C++ types. raw: what one load fills (vt, raw_count registers/lanes); units:
    one row's sum registers (acc_t, acc_vt)."""

    def __init__(self, ir: KernelIR):
        w = self.width = ir.vector_width
        self.half_storage, self.half_acc = ir.dtype in HALF_DTYPES, ir.accumulate == "fp16"
        self.half_type = {"fp16": "f16", "bf16": "bf16"}.get(ir.dtype)
        self.widen = self.half_storage and not self.half_acc
        self.elem = "unsigned short" if self.half_storage else "float"
        if self.half_storage:
            self.raw_count = 1 if w == 1 else w // 2
            self.vt = "unsigned short" if w == 1 else _PAIR_VEC[w // 2]
        else:
            self.raw_count, self.vt = w, _FLOAT_VEC[w]
        if self.half_acc:
            self.units, self.acc_vt = self.raw_count, self.vt
            self.acc_t = "unsigned" if w > 1 else "unsigned short"
        else:
            self.units, self.acc_t, self.acc_vt = w, "float", _FLOAT_VEC[min(w, 4)]
        # shared-memory partials move in chunks of at most 16 bytes (acc_vt)
        self.chunk = min(self.units, 4)
        self.unit_elems = 2 if self.half_acc and w > 1 else 1
        self.h = "2" if w > 1 else ""
        self.rules = {**RULES, **HALF_RULES} if self.half_acc else RULES

    def rule(self, rule: str, **fields) -> str:
        template = self.rules[rule]
        return template(h=self.h, **fields) if callable(template) else template.format(
            h=self.h, **fields)

    def raw(self, var: str, unit: int) -> str:
        return var if self.raw_count == 1 else f"{var}.{_LANE[unit]}"

    def acc_lane(self, var: str, unit: int) -> str:
        return var if self.chunk == 1 else f"{var}.{_LANE[unit % 4]}"

    def chunks(self, regs: list[str], offset: int):
        """(element offset, registers) of a row's shared-memory accesses."""
        for c in range(0, len(regs), self.chunk):
            yield offset + c * self.unit_elems, regs[c:c + self.chunk]

    def column(self, var: str, lane: int) -> str:
        """fp16 column `lane` of a loaded raw vector, as an unsigned short expression."""
        if self.width == 1:
            return var
        reg = self.raw(var, lane // 2)
        return f"(unsigned short)({reg} >> 16)" if lane % 2 else f"(unsigned short){reg}"

    def pack(self, regs: list[str]) -> str:
        if self.widen:    # fp32 sums -> fp16 storage, first column in the low half
            if self.width == 1:
                return f"sparsert_f2h({regs[0]})"
            return self.vector([f"sparsert_f2h2({regs[2 * u + 1]}, {regs[2 * u]})"
                                for u in range(self.raw_count)], self.vt)
        return self.vector(regs, self.acc_vt)

    @staticmethod
    def vector(regs: list[str], vt: str) -> str:
        return regs[0] if len(regs) == 1 else f"make_{vt}({', '.join(regs)})"

    def const(self, value: float) -> str:
        if not self.half_acc:
            return f32(value)
        bits = f16_bits(value)
        return f"0x{bits:04X}{bits:04X}u" if self.width > 1 else f"(unsigned short)0x{bits:04X}"


def _types(fmt: CFmt) -> dict[str, str]:
    e = fmt.elem
    return {"x": f"const {e}* __restrict__", "y": f"{e}* __restrict__",
            "res": f"const {e}* __restrict__", "z": f"const {e}* __restrict__", "ih": "int",
            "iw": "int", "act": "bool", "sp": f"{'unsigned short' if fmt.half_acc else 'float'}*"}


def _signature(ir: KernelIR, fmt: CFmt) -> str:
    types = _types(fmt)
    return ", ".join(f"{types[n]} {n}" for _, n in ir.body_args)


def _emit(out: list[str], indent: str, fmt: CFmt, rule: str, **fields) -> None:
    text = fmt.rule(rule, **fields)
    if text:
        out.append(indent + text)


def _operand(value) -> str:
    return value if isinstance(value, str) else f"{value}"


def _finish(out: list[str], fmt: CFmt, finish: Finish, acc: list[str]) -> None:
    for step in finish.steps:
        if step.op == "residual":
            out.append("  {")
            _emit(out, "    ", fmt, "residual_load", vt=fmt.vt, offset=step.value)
            for i, a in enumerate(acc):
                src = (f"sparsert_h2f({fmt.column('r', i)})" if fmt.widen else fmt.raw("r", i))
                _emit(out, "    ", fmt, "step_residual", acc=a, src=src)
            out.append("  }")
        else:
            c = fmt.const(step.value)
            for a in acc:
                _emit(out, "  ", fmt, f"step_{step.op}", acc=a, c=c)
    _emit(out, "  ", fmt, "store", vt=fmt.vt, offset=finish.offset, src=fmt.pack(acc))


def _base(body: Compute, tap: int) -> str:
    return "x" if tap < 0 else f"xb{body.bases[tap].r}{body.bases[tap].s}"


def _batch(out: list[str], fmt: CFmt, body: Compute, batch: Batch) -> None:
    out.append("  {")
    for i, load in enumerate(batch.loads):
        _emit(out, "    ", fmt, "load", vt=fmt.vt, i=i, base=_base(body, load.tap),
              offset=load.offset)
    count = len(batch.loads)
    for k, shift in enumerate(batch.shifts):     # pair windows: b{loads + k}, as a load's value
        _emit(out, "    ", fmt, "shift", i=count + k, a=shift.a, b=shift.b)
    count += len(batch.shifts)
    if fmt.widen:
        sources = [[f"c{i}_{lane}" for lane in range(fmt.width)] for i in range(count)]
        for i, names in enumerate(sources):
            for lane, name in enumerate(names):
                _emit(out, "    ", fmt, "widen", dst=name, src=fmt.column(f"b{i}", lane))
    else:
        sources = [[fmt.raw(f"b{i}", u) for u in range(fmt.units)] for i in range(count)]
    for fma in batch.fmas:
        w = fmt.const(fma.weight)
        for unit in range(fmt.units):
            _emit(out, "    ", fmt, "mul_first" if fma.init else "fma",
                  acc=f"a{fma.slot * fmt.units + unit}", src=sources[fma.source][unit], w=w)
    out.append("  }")


def _compute(ir: KernelIR, fmt: CFmt, name: str, body: Compute, qualifier: str) -> list[str]:
    geo, units = ir.geometry, fmt.units
    out = [f"__device__ {qualifier} void {name}({_signature(ir, fmt)})", "{"]
    acc = [[f"a{slot * units + u}" for u in range(units)] for slot in range(body.slots)]
    if body.slots:
        out.append(f"  {fmt.acc_t} " + ", ".join(a for row in acc for a in row) + ";")
    for b in body.bases:   # padding taps read the all-zero buffer at the same offsets
        out.append(f"  const {fmt.elem}* __restrict__ xb{b.r}{b.s} = ((unsigned)(ih + {b.r}) < "
                   f"{geo.height}u && (unsigned)(iw + {b.s}) < {geo.width}u) ? x : "
                   f"z + ({b.zero_shift});")
    for batch in body.batches:
        _batch(out, fmt, body, batch)
    for slot in body.zero:
        for a in acc[slot]:
            _emit(out, "  ", fmt, "zero", acc=a)
    for item in body.outputs:
        if isinstance(item, Finish):
            _finish(out, fmt, item, acc[item.slot])
        else:
            for offset, regs in fmt.chunks(acc[item.slot], item.offset // ir.acc_bytes):
                _emit(out, "  ", fmt, "st_shared", vt=fmt.acc_vt, offset=offset,
                      src=fmt.vector(regs, fmt.acc_vt))
    return out + ["}", ""]


def _reduce(ir: KernelIR, fmt: CFmt, name: str, body: Reduce, qualifier: str) -> list[str]:
    units, vt = fmt.units, fmt.acc_vt
    out = [f"__device__ {qualifier} void {name}({_signature(ir, fmt)})", "{"]
    zero = "0" if fmt.half_acc else "0.0f"
    for n, row in enumerate(body.rows):
        acc = [f"s{n}_{u}" for u in range(units)]
        out.append(f"  {fmt.acc_t} " + ", ".join(f"{a} = {zero}" for a in acc) + ";")
        for i, offset in enumerate(row.offsets):
            out.append("  {")
            names = []
            for c, (elem, regs) in enumerate(fmt.chunks(acc, offset // ir.acc_bytes)):
                names += [f"{'pq'[c]}{i}"] * len(regs)
                _emit(out, "    ", fmt, "ld_shared", vt=vt, name=names[-1], offset=elem)
            for u, (a, name) in enumerate(zip(acc, names)):
                _emit(out, "    ", fmt, "add_partial", acc=a, src=fmt.acc_lane(name, u))
            out.append("  }")
        _finish(out, fmt, row.finish, acc)
    return out + ["}", ""]


def _index(out: list[str], fmt: CFmt, op: IndexOp) -> None:
    _emit(out, "  ", fmt, op.op, dst=op.dst, a=_operand(op.a), b=_operand(op.b),
          c=_operand(op.c))


def print_cuda(ir: KernelIR, arch: str = "sm_90") -> str:
    del arch      # NVRTC gets the target as an option
    if isinstance(ir, ChainIR):
        raise UserError("fused kernels print only as PTX (emit ptx)")
    fmt = CFmt(ir)
    qualifier = "__forceinline__" if ir.inline else "__noinline__"
    out = [f"// Generated by sparsert {__version__} ({VERSION}): {ir.comment}", ""]
    if fmt.half_storage:
        out += _helpers(fmt.half_type)
    if ir.k_split > 1:
        sp_t = "unsigned short" if fmt.half_acc else "float"
        out.append(f"__shared__ __align__(16) {sp_t} sparsert_partials"
                   f"[{ir.shared_bytes // ir.acc_bytes}];")
        out.append("")
    names = []
    for phase, bodies in enumerate(ir.phases):
        names.append([])
        for i, body in enumerate(bodies):
            names[-1].append(f"g{i}p{phase}")
            make = _compute if isinstance(body, Compute) else _reduce
            out += make(ir, fmt, names[-1][-1], body, qualifier)
    # NVRTC takes __maxnreg__ or __launch_bounds__, not both.
    bound = (f"__maxnreg__({ir.max_registers})" if ir.max_registers
             else f"__launch_bounds__({ir.col_threads * ir.k_split})")
    signed = {op.dst for op in ir.columns if op.signed}
    unsigned = [op.dst for op in ir.columns if op.dst not in signed]
    types = _types(fmt)
    out += [f'extern "C" __global__ void {bound}',
            f"{ir.entry}({', '.join(f'{types[a]} {a}' for a in ir.arguments)})", "{",
            *(GRID_DEPENDENCY if ir.dependent_launch else ()),
            "  const unsigned tx = threadIdx.x, ty = threadIdx.y, "
            f"bx = blockIdx.{ir.block_ids['bx'][-1]}, by = blockIdx.{ir.block_ids['by'][-1]};",
            f"  unsigned {', '.join(dict.fromkeys(unsigned + [ir.slot.dst]))};",
            f"  int {', '.join(dict.fromkeys(op.dst for op in ir.columns if op.signed))};"]
    for op in ir.columns + (ir.slot,):
        _index(out, fmt, op)
    for ptr, var in ir.pointers:
        _emit(out, "  ", fmt, "pointer", ptr=ptr, var=var)
    if ir.k_split > 1:
        sp_t = "unsigned short" if fmt.half_acc else "float"
        out.append(f"  {sp_t}* sp = sparsert_partials + tx * "
                   f"{ir.partial_stride // ir.acc_bytes};")
    args = ", ".join(n for _, n in ir.body_args)
    for phase, bodies in enumerate(names):
        if phase:
            _emit(out, "  ", fmt, "barrier")
        out.append("  switch (idx) {")
        out += [f"  case {i}: {n}({args}); break;" for i, n in enumerate(bodies)]
        out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"
