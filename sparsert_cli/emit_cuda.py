"""Plan -> readable CUDA C++ (compiled by NVRTC). The same kernel as emit_ptx, for inspection,
debugging and small layers: NVRTC is 50-90x slower than the PTX route on large patterns.
"""

from __future__ import annotations

from . import __version__
from .emit_ptx import INLINE_LIMIT
from .plan import Plan, RowGroup

EMITTER_VERSION = "cuda-1"
_VTYPE = {1: "float", 2: "float2", 4: "float4"}
_LANE = ("x", "y", "z", "w")


def f32(value: float) -> str:
    """Exact float32 literal (hex float)."""
    return f"{float(value).hex()}f"


def _lane(var: str, width: int, lane: int) -> str:
    return var if width == 1 else f"{var}.{_LANE[lane]}"


def _signature(plan: Plan) -> str:
    args = ["const float* __restrict__ x", "float* __restrict__ y"]
    if plan.epilogue.residual:
        args.append("const float* __restrict__ res")
    if plan.geometry.masked:
        args += ["const float* __restrict__ z", "int ih", "int iw"]
    args.append("bool act")
    if plan.k_split > 1:
        args.append("float* sp")
    return ", ".join(args)


def _call_args(plan: Plan) -> str:
    names = ["x", "y"] + (["res"] if plan.epilogue.residual else [])
    names += (["z", "ih", "iw"] if plan.geometry.masked else []) + ["act"]
    return ", ".join(names + (["sp"] if plan.k_split > 1 else []))


def _store(plan: Plan, row: int, acc: list[str], out: list[str]) -> None:
    geo, width, epi = plan.geometry, plan.vector_width, plan.epilogue
    offset = row * geo.out_pixels
    if epi.bias is not None and epi.bias[row] != 0.0:
        out += [f"  {a} += {f32(epi.bias[row])};" for a in acc]
    if epi.residual:
        out.append(f"  {{ const {_VTYPE[width]} r = __ldg(reinterpret_cast<const {_VTYPE[width]}*>"
                   f"(res + {offset}));")
        out += [f"    {a} += {_lane('r', width, i)};" for i, a in enumerate(acc)]
        out.append("  }")
    if epi.activation in ("relu", "relu6"):
        out += [f"  {a} = fmaxf({a}, 0.0f);" for a in acc]
    if epi.activation == "relu6":
        out += [f"  {a} = fminf({a}, 6.0f);" for a in acc]
    value = acc[0] if width == 1 else f"make_{_VTYPE[width]}({', '.join(acc)})"
    out.append(f"  if (act) *reinterpret_cast<{_VTYPE[width]}*>(y + {offset}) = {value};")


def _slice_fn(plan: Plan, name: str, group: RowGroup, index: int, qualifier: str) -> list[str]:
    geo, width = plan.geometry, plan.vector_width
    loads = group.slices[index]
    rows = len(group.rows)
    out = [f"__device__ {qualifier} void {name}({_signature(plan)})", "{"]
    acc = [[f"a{slot * width + lane}" for lane in range(width)] for slot in range(rows)]
    out.append("  float " + ", ".join(f"{a} = 0.0f" for row in acc for a in row) + ";")
    used = sorted({geo.tap_rs(ld.tap)[1:] for ld in loads})
    for r, s in used:
        if geo.masked:  # padding taps read the all-zero buffer at the same offset (see emit_ptx)
            out.append(f"  const float* __restrict__ xb{r}{s} = ((unsigned)(ih + {r}) < {geo.height}u"
                       f" && (unsigned)(iw + {s}) < {geo.width}u) ? x : z - {r * geo.width + s};")
        else:
            out.append(f"  const float* __restrict__ xb{r}{s} = x;")
    for load in loads:
        r, s = geo.tap_rs(load.tap)[1:]
        out.append(f"  {{ const {_VTYPE[width]} b = __ldg(reinterpret_cast<const {_VTYPE[width]}*>"
                   f"(xb{r}{s} + {geo.tap_offset(load.tap)}));")
        for slot, value in load.uses:
            for lane in range(width):
                a = acc[slot][lane]
                out.append(f"    {a} = fmaf({_lane('b', width, lane)}, {f32(value)}, {a});")
        out.append("  }")
    for slot, row in enumerate(group.rows):
        if plan.k_split == 1:
            _store(plan, row, acc[slot], out)
        else:
            offset = (index * plan.rows_max + slot) * plan.col_threads * width
            value = acc[slot][0] if width == 1 else f"make_{_VTYPE[width]}({', '.join(acc[slot])})"
            out.append(f"  *reinterpret_cast<{_VTYPE[width]}*>(sp + {offset}) = {value};")
    return out + ["}", ""]


def _reduce_fn(plan: Plan, name: str, group: RowGroup, thread_row: int, qualifier: str) -> list[str]:
    width = plan.vector_width
    out = [f"__device__ {qualifier} void {name}({_signature(plan)})", "{"]
    for slot, row in enumerate(group.rows):
        if slot % plan.k_split != thread_row:
            continue
        acc = [f"s{slot}_{lane}" for lane in range(width)]
        out.append("  float " + ", ".join(f"{a} = 0.0f" for a in acc) + ";")
        for index in range(plan.k_split):
            offset = (index * plan.rows_max + slot) * plan.col_threads * width
            out.append(f"  {{ const {_VTYPE[width]} p = *reinterpret_cast<const {_VTYPE[width]}*>"
                       f"(sp + {offset});")
            out += [f"    {a} += {_lane('p', width, i)};" for i, a in enumerate(acc)]
            out.append("  }")
        _store(plan, row, acc, out)
    return out + ["}", ""]


def emit_cuda(plan: Plan, inline_limit: int = INLINE_LIMIT) -> str:
    geo, width = plan.geometry, plan.vector_width
    qualifier = "__forceinline__" if plan.nnz * width <= inline_limit else "__noinline__"
    out = [f"// Generated by sparsert {__version__} ({EMITTER_VERSION}): {plan.params.name()}, "
           f"{plan.nnz} nonzeros, {len(plan.groups)} row groups", ""]
    if plan.k_split > 1:
        out.append(f"__shared__ __align__(16) float sparsert_partials[{plan.shared_bytes // 4}];")
        out.append("")
    phases = [[], []]
    for gi, group in enumerate(plan.groups):
        for si in range(plan.k_split):
            phases[0].append(f"g{gi}s{si}")
            out += _slice_fn(plan, phases[0][-1], group, si, qualifier)
    if plan.k_split > 1:
        for gi, group in enumerate(plan.groups):
            for ty in range(plan.k_split):
                phases[1].append(f"g{gi}r{ty}")
                out += _reduce_fn(plan, phases[1][-1], group, ty, qualifier)
    pointer_args = {"x": "const float* __restrict__ x", "y": "float* __restrict__ y",
                    "res": "const float* __restrict__ res", "z": "const float* __restrict__ z"}
    # NVRTC takes __maxnreg__ or __launch_bounds__, not both.
    bound = (f"__maxnreg__({plan.params.max_registers})" if plan.params.max_registers
             else f"__launch_bounds__({plan.col_threads * plan.k_split})")
    out += [f'extern "C" __global__ void {bound}',
            f"{plan.entry}({', '.join(pointer_args[a] for a in plan.arguments)})", "{",
            f"  unsigned j = (blockIdx.x * {plan.col_threads}u + threadIdx.x) * {width}u;",
            f"  const bool act = j < {geo.columns}u;",
            "  // Idle threads of the last tile compute a valid column and skip the store.",
            f"  j = min(j, {geo.columns - width}u);",
            f"  const int img = j / {geo.out_pixels}u, pix = j % {geo.out_pixels}u;",
            f"  const int ih = (pix / {geo.out_width}) * {geo.stride} - {geo.padding};",
            f"  const int iw = (pix % {geo.out_width}) * {geo.stride} - {geo.padding};",
            f"  x += img * {geo.image_elems} + ih * {geo.width} + iw;",
            f"  const int outoff = img * {geo.out_channels * geo.out_pixels} + pix;",
            "  y += outoff;"]
    if plan.epilogue.residual:
        out.append("  res += outoff;")
    if plan.k_split > 1:
        out.append(f"  float* sp = sparsert_partials + threadIdx.x * {width};")
    out.append(f"  const unsigned idx = blockIdx.y * {plan.k_split}u + threadIdx.y;")
    for phase, names in enumerate(phases):
        if not names:
            continue
        if phase:
            out.append("  __syncthreads();")
        out.append("  switch (idx) {")
        out += [f"  case {i}: {n}({_call_args(plan)}); break;" for i, n in enumerate(names)]
        out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"
