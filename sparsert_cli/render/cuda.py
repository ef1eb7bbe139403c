"""Kernel IR -> readable CUDA C++ (compiled by NVRTC), by rule tables: the same kernel as the PTX
printer, for inspection, debugging and small layers (NVRTC is 50-90x slower than the PTX route on
large patterns). fp32 only: fp16 would need cuda_fp16.h, which this NVRTC route does not ship.
"""

from __future__ import annotations

from .. import __version__
from ..ir import Batch, Compute, Finish, IndexOp, KernelIR, Reduce

VERSION = "cuda-2"
PRECISIONS = ("fp32",)
_VTYPE = {1: "float", 2: "float2", 4: "float4"}
_LANE = ("x", "y", "z", "w")

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
    "load": "const {vt} b{i} = __ldg(reinterpret_cast<const {vt}*>({base} + {offset}));",
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
    "ld_shared": "const {vt} p{i} = *reinterpret_cast<const {vt}*>(sp + {offset});",
    "add_partial": "{acc} += {src};",
}


def render(rule: str, **fields) -> str:
    template = RULES[rule]
    return template(**fields) if callable(template) else template.format(**fields)


def f32(value: float) -> str:
    """Exact float32 literal (hex float)."""
    return f"{float(value).hex()}f"


def _lane(var: str, width: int, lane: int) -> str:
    return var if width == 1 else f"{var}.{_LANE[lane]}"


def _pack(ir: KernelIR, regs: list[str]) -> str:
    width = ir.vector_width
    return regs[0] if width == 1 else f"make_{_VTYPE[width]}({', '.join(regs)})"


_C_TYPES = {"x": "const float* __restrict__", "y": "float* __restrict__",
            "res": "const float* __restrict__", "z": "const float* __restrict__", "ih": "int",
            "iw": "int", "act": "bool", "sp": "float*"}


def _signature(ir: KernelIR) -> str:
    return ", ".join(f"{_C_TYPES[n]} {n}" for _, n in ir.body_args)


def _emit(out: list[str], indent: str, rule: str, **fields) -> None:
    text = render(rule, **fields)
    if text:
        out.append(indent + text)


def _operand(value) -> str:
    return value if isinstance(value, str) else f"{value}"


def _finish(out: list[str], ir: KernelIR, finish: Finish, acc: list[str]) -> None:
    vt = _VTYPE[ir.vector_width]
    for step in finish.steps:
        if step.op == "residual":
            out.append("  {")
            _emit(out, "    ", "residual_load", vt=vt, offset=step.value)
            for i, a in enumerate(acc):
                _emit(out, "    ", "step_residual", acc=a, src=_lane("r", ir.vector_width, i))
            out.append("  }")
        else:
            for a in acc:
                _emit(out, "  ", f"step_{step.op}", acc=a,
                      c=f32(step.value))
    _emit(out, "  ", "store", vt=vt, offset=finish.offset, src=_pack(ir, acc))


def _base(ir: KernelIR, body: Compute, tap: int) -> str:
    return "x" if tap < 0 else f"xb{body.bases[tap].r}{body.bases[tap].s}"


def _batch(out: list[str], ir: KernelIR, body: Compute, batch: Batch) -> None:
    width, vt = ir.vector_width, _VTYPE[ir.vector_width]
    out.append("  {")
    for i, load in enumerate(batch.loads):
        _emit(out, "    ", "load", vt=vt, i=i, base=_base(ir, body, load.tap), offset=load.offset)
    for fma in batch.fmas:
        for lane in range(width):
            _emit(out, "    ", "mul_first" if fma.init else "fma",
                  acc=f"a{fma.slot * width + lane}", src=_lane(f"b{fma.source}", width, lane),
                  w=f32(fma.weight))
    out.append("  }")


def _compute(ir: KernelIR, name: str, body: Compute, qualifier: str) -> list[str]:
    geo, width = ir.geometry, ir.vector_width
    out = [f"__device__ {qualifier} void {name}({_signature(ir)})", "{"]
    acc = [[f"a{slot * width + lane}" for lane in range(width)] for slot in range(body.slots)]
    if body.slots:
        out.append("  float " + ", ".join(a for row in acc for a in row) + ";")
    for b in body.bases:   # padding taps read the all-zero buffer at the same offsets
        out.append(f"  const float* __restrict__ xb{b.r}{b.s} = ((unsigned)(ih + {b.r}) < "
                   f"{geo.height}u && (unsigned)(iw + {b.s}) < {geo.width}u) ? x : "
                   f"z + ({b.zero_shift});")
    for batch in body.batches:
        _batch(out, ir, body, batch)
    for slot in body.zero:
        for a in acc[slot]:
            _emit(out, "  ", "zero", acc=a)
    for item in body.outputs:
        if isinstance(item, Finish):
            _finish(out, ir, item, acc[item.slot])
        else:
            _emit(out, "  ", "st_shared", vt=_VTYPE[width], offset=item.offset // ir.acc_bytes,
                  src=_pack(ir, acc[item.slot]))
    return out + ["}", ""]


def _reduce(ir: KernelIR, name: str, body: Reduce, qualifier: str) -> list[str]:
    width, vt = ir.vector_width, _VTYPE[ir.vector_width]
    out = [f"__device__ {qualifier} void {name}({_signature(ir)})", "{"]
    for n, row in enumerate(body.rows):
        acc = [f"s{n}_{lane}" for lane in range(width)]
        out.append("  float " + ", ".join(f"{a} = 0.0f" for a in acc) + ";")
        for i, offset in enumerate(row.offsets):
            out.append("  {")
            _emit(out, "    ", "ld_shared", vt=vt, i=i, offset=offset // ir.acc_bytes)
            for lane, a in enumerate(acc):
                _emit(out, "    ", "add_partial", acc=a, src=_lane(f"p{i}", width, lane))
            out.append("  }")
        _finish(out, ir, row.finish, acc)
    return out + ["}", ""]


def _index(out: list[str], op: IndexOp) -> None:
    _emit(out, "  ", op.op, dst=op.dst, a=_operand(op.a), b=_operand(op.b), c=_operand(op.c))


def print_cuda(ir: KernelIR, arch: str = "sm_90") -> str:
    del arch      # NVRTC gets the target as an option
    qualifier = "__forceinline__" if ir.inline else "__noinline__"
    out = [f"// Generated by sparsert {__version__} ({VERSION}): {ir.comment}", ""]
    if ir.k_split > 1:
        out.append(f"__shared__ __align__(16) float sparsert_partials[{ir.shared_bytes // 4}];")
        out.append("")
    names = []
    for phase, bodies in enumerate(ir.phases):
        names.append([])
        for i, body in enumerate(bodies):
            names[-1].append(f"g{i}p{phase}")
            make = _compute if isinstance(body, Compute) else _reduce
            out += make(ir, names[-1][-1], body, qualifier)
    # NVRTC takes __maxnreg__ or __launch_bounds__, not both.
    bound = (f"__maxnreg__({ir.max_registers})" if ir.max_registers
             else f"__launch_bounds__({ir.col_threads * ir.k_split})")
    signed = {op.dst for op in ir.columns if op.signed}
    unsigned = [op.dst for op in ir.columns if op.dst not in signed]
    out += [f'extern "C" __global__ void {bound}',
            f"{ir.entry}({', '.join(f'{_C_TYPES[a]} {a}' for a in ir.arguments)})", "{",
            "  const unsigned tx = threadIdx.x, ty = threadIdx.y, bx = blockIdx.x, "
            "by = blockIdx.y;",
            f"  unsigned {', '.join(dict.fromkeys(unsigned + [ir.slot.dst]))};",
            f"  int {', '.join(dict.fromkeys(d for d in (op.dst for op in ir.columns) if d in signed))};"]
    for op in ir.columns + (ir.slot,):
        _index(out, op)
    for ptr, var in ir.pointers:
        _emit(out, "  ", "pointer", ptr=ptr, var=var)
    if ir.k_split > 1:
        out.append(f"  float* sp = sparsert_partials + tx * {ir.partial_stride // ir.acc_bytes};")
    args = ", ".join(n for _, n in ir.body_args)
    for phase, bodies in enumerate(names):
        if phase:
            out.append("  __syncthreads();")
        out.append("  switch (idx) {")
        out += [f"  case {i}: {n}({args}); break;" for i, n in enumerate(bodies)]
        out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"
