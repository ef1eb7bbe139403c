"""Execute a kernel's IR on the CPU, the way the GPU runs it, in float64 (vectorised over threads).

It evaluates the IR's own thread->column arithmetic, tap bases, loads, FMAs, shared-memory partials
and epilogue steps, and checks what the GPU cannot report: every load in bounds (the zero buffer
included), every vector load aligned, every FMA chain started once, every partial read written,
every output element written exactly once. A ChainIR (a fused kernel) runs block by block
(execute_chain), its scratch buffer poisoned for each block.

fp16 kernels run with their roundings: fp16 weights and bias (the IR holds them rounded), every
half2 FMA rounded once to fp16 (float64 holds a product of two halves plus a half exactly, so
rounding that is a fused multiply-add), fp16 epilogue arithmetic, and fp16 outputs. bf16 kernels
sum in fp32 (held in float64, as fp16acc32's are) and round their outputs to bf16.
"""

from __future__ import annotations

import numpy as np

from .interp_base import PlanExecutionError, _f16, evaluate, thread_env  # noqa: F401
from .interp_stream import execute_stream
from .ir import ChainIR, Compute, Finish, KernelIR, Reduce, StreamIR
from .storage import rounded


class _Machine:
    """One kernel's buffers and per-thread registers; bodies run on every thread at once."""

    def __init__(self, ir: KernelIR, x: np.ndarray, residual: np.ndarray | None):
        self.ir, self.x, self.residual = ir, x, residual
        geo, width = ir.geometry, ir.vector_width
        env = thread_env(ir)
        self.active = env["act"].astype(bool)
        self.ih, self.iw = env["ih"], env["iw"]
        self.base = {ptr: env[var] for ptr, var in ir.pointers}
        self.lanes = np.arange(width, dtype=np.int64)
        self.half = ir.accumulate == "fp16"
        self.out = np.full(geo.output_elems, np.nan)
        self.writes = np.zeros(geo.output_elems, dtype=np.int64)
        self.sp = env["tx"] * ir.partial_stride        # shared byte address of each thread
        self.shared = None
        # a ChainIR stage: which elements of x an earlier stage of this block wrote (None: all
        # of x is the kernel's input)
        self.readable: np.ndarray | None = None

    def rnd(self, values):
        return _f16(values) if self.half else values

    def gather(self, body: Compute, loads) -> np.ndarray:
        """Values of `loads` for every thread lane: (len(loads), threads, width)."""
        geo, width = self.ir.geometry, self.ir.vector_width
        offsets = np.array([ld.offset for ld in loads], dtype=np.int64)
        addr = self.base["x"][None, :, None] + offsets[:, None, None] + self.lanes[None, None, :]
        mask = np.ones(addr.shape, dtype=bool)
        taps = np.array([ld.tap for ld in loads], dtype=np.int64)
        if np.any(taps >= 0):
            if not geo.masked:
                raise PlanExecutionError("a load reads a padding tap base of an unpadded kernel")
            table = np.array([tuple(b) for b in body.bases], dtype=np.int64).reshape(-1, 3)
            r, s, shift = table[np.maximum(taps, 0)].T
            inside = (((self.ih[None, :] + r[:, None]) % 2**32 < geo.height)
                      & ((self.iw[None, :] + s[:, None]) % 2**32 < geo.width))
            inside |= (taps < 0)[:, None]
            mask = np.broadcast_to(inside[:, :, None], addr.shape)
            padded = taps >= 0       # z + shift + offset must stay inside one zero image
            zero = shift[padded] + offsets[padded]
            if zero.size and (zero.min() < 0 or zero.max() + width > geo.image_elems):
                raise PlanExecutionError("zero-buffer read out of bounds")
        if width > 1 and np.any((addr[:, :, 0] % width)[mask[:, :, 0]]):
            raise PlanExecutionError("a vector load is not aligned to its width")
        live = addr[mask]
        if live.size and (live.min() < 0 or live.max() >= self.x.size):
            raise PlanExecutionError(f"out-of-bounds load: address range {live.min()}.."
                                     f"{live.max()} outside 0..{self.x.size - 1}")
        if self.readable is not None and not np.all(self.readable[live]):
            bad = live[~self.readable[live]]
            raise PlanExecutionError(f"a load reads {bad.size} element(s) (first at {bad[0]}) "
                                     "that no earlier stage of this block wrote")
        values = np.zeros(addr.shape, dtype=np.float64)
        values[mask] = self.x[live]
        return values

    def sources(self, body: Compute, values: np.ndarray) -> np.ndarray:
        """Per batch its loads' values, then its shifts' (KernelIR.pair_windows): columns 1..
        of load a followed by column 0 of load b."""
        if not self.ir.pair_windows:
            raise PlanExecutionError("a shifted window in a kernel without pair windows")
        out, first = [], 0
        for batch in body.batches:
            mine = values[first:first + len(batch.loads)]
            out.append(mine)
            for shift in batch.shifts:
                if not (0 <= shift.a < len(mine) and 0 <= shift.b < len(mine)):
                    raise PlanExecutionError(f"a shift of loads {shift} in a batch of {len(mine)}")
                out.append(np.concatenate([mine[shift.a][:, 1:], mine[shift.b][:, :1]],
                                          axis=1)[None])
            first += len(batch.loads)
        return np.concatenate(out)

    def compute(self, body: Compute) -> None:
        threads, width = len(self.active), self.ir.vector_width
        acc = np.zeros((body.slots, threads, width))
        loads = [load for batch in body.batches for load in batch.loads]
        values = self.gather(body, loads) if loads else None
        if any(batch.shifts for batch in body.batches):
            values = self.sources(body, values)
        started: set[int] = set()
        fmas = []                       # (slot, weight, index into `values`, init) in order
        first = 0
        for batch in body.batches:
            count = len(batch.loads) + len(batch.shifts)
            for fma in batch.fmas:
                if fma.init == (fma.slot in started):
                    raise PlanExecutionError(f"slot {fma.slot}: sum {'re' if fma.init else 'not '}"
                                             "started by its first FMA")
                if not 0 <= fma.source < count:
                    raise PlanExecutionError(f"an FMA reads source {fma.source} of a batch of "
                                             f"{count}")
                started.add(fma.slot)
                fmas.append((fma.slot, fma.weight, first + fma.source, fma.init))
            first += count
        if self.half:      # one rounded FMA per (load, row), in the IR's order
            for slot, weight, source, init in fmas:
                acc[slot] = _f16((0.0 if init else acc[slot]) + weight * values[source])
        elif fmas:
            slots, weights, sources, _ = zip(*fmas)
            matrix = np.zeros((body.slots, len(values)))
            np.add.at(matrix, (np.array(slots), np.array(sources)), np.array(weights))
            acc += np.einsum("rl,ltw->rtw", matrix, values)
        if set(body.zero) != set(range(body.slots)) - started:
            raise PlanExecutionError("zeroed slots are not exactly the slots no FMA touched")
        for out in body.outputs:
            if isinstance(out, Finish):
                self.finish(out, acc[out.slot])
            else:
                self.shared_access(out.offset, acc[out.slot])

    def shared_access(self, offset: int, values: np.ndarray | None = None) -> np.ndarray:
        """Store `values` (threads, width) at sp + offset, or load from there when None."""
        ir = self.ir
        if offset % ir.acc_bytes or offset < 0:
            raise PlanExecutionError(f"misaligned shared-memory offset {offset}")
        index = (self.sp[:, None] + offset) // ir.acc_bytes + self.lanes[None, :]
        if index.max() * ir.acc_bytes >= ir.shared_bytes:
            raise PlanExecutionError("shared-memory access past the partials buffer")
        tiles = self.ir.tiles
        block = np.repeat(np.arange(tiles), ir.col_threads)[:, None]
        if values is not None:
            if np.any(~np.isnan(self.shared[block, index])):
                raise PlanExecutionError("two partial sums stored to one shared-memory slot")
            self.shared[block, index] = values
            return values
        got = self.shared[block, index]
        if np.any(np.isnan(got)):
            raise PlanExecutionError("a partial sum read before it was written")
        return got

    def reduce(self, body: Reduce) -> None:
        for row in body.rows:
            acc = self.shared_access(row.offsets[0])
            for offset in row.offsets[1:]:
                acc = self.rnd(acc + self.shared_access(offset))
            self.finish(row.finish, acc)

    def finish(self, finish: Finish, y: np.ndarray) -> None:
        y = y[self.active]
        addr = self.base["y"][self.active][:, None] + finish.offset + self.lanes[None, :]
        for step in finish.steps:
            if step.op == "bias":
                y = self.rnd(y + step.value)
            elif step.op == "residual":
                at = self.base["res"][self.active][:, None] + step.value + self.lanes[None, :]
                y = self.rnd(y + self.residual[at])
            elif step.op == "max":
                y = np.maximum(y, step.value)
            elif step.op == "min":
                y = np.minimum(y, step.value)
            else:
                raise PlanExecutionError(f"unknown epilogue step {step.op!r}")
        if addr.size and (addr.min() < 0 or addr.max() >= self.out.size):
            raise PlanExecutionError("out-of-bounds store")
        self.out[addr] = y if self.ir.dtype == "fp32" else rounded(y, self.ir.dtype)
        np.add.at(self.writes, addr.ravel(), 1)

    def run_group(self, by: int) -> None:
        """Every block of row group `by` (one per column tile, all at once)."""
        ir = self.ir
        self.shared = np.full((ir.tiles, max(1, ir.shared_bytes // ir.acc_bytes)), np.nan)
        for bodies in ir.phases:           # phases meet at a block barrier
            for ty in range(ir.k_split):
                idx = int(evaluate((ir.slot,), {"by": by, "ty": ty})["idx"])
                if not 0 <= idx < len(bodies):
                    raise PlanExecutionError(f"jump-table slot {idx} outside the table")
                body = bodies[idx]
                self.compute(body) if isinstance(body, Compute) else self.reduce(body)

    def run(self) -> np.ndarray:
        ir = self.ir
        for by in range(ir.groups):
            self.run_group(by)
        if not np.all(self.writes == 1):
            raise PlanExecutionError(f"{int(np.sum(self.writes == 0))} outputs never written, "
                                     f"{int(np.sum(self.writes > 1))} written more than once")
        return self.out


def execute_chain(chain: ChainIR, x: np.ndarray) -> np.ndarray:
    """Run a ChainIR block by block, as the GPU does: for block by, every buffer a stage writes
    and a later stage reads (the scratch t) starts as NaN (poison), stage after stage runs its
    group `by` only (after a barrier the next reads what this block wrote, rounded to the
    storage type as the kernel stores it), and a load of an element no earlier stage of the
    block wrote is an error. The last stage's output collects each block's rows; every element
    of it, and of each scratch buffer over all blocks, must be written exactly once."""
    for i, ir in enumerate(chain.stages):
        if ir.tiles != 1 or ir.k_split != 1 or ir.groups != chain.stages[0].groups:
            raise PlanExecutionError(f"stage {i} runs {ir.tiles} tiles, k_split {ir.k_split}, "
                                     f"{ir.groups} groups: a chain's blocks run one group each")
        if "res" in ir.arguments:
            raise PlanExecutionError("a chain's stage adds a residual")
    bound = [dict(b) for b in chain.bindings]
    machines = [_Machine(ir, None, None) for ir in chain.stages]
    last = machines[-1]
    out = np.full(last.out.size, np.nan)
    writes = {b["y"]: np.zeros(m.out.size, dtype=np.int64) for b, m in zip(bound, machines)}
    for by in range(chain.stages[0].groups):
        buffers: dict[str, np.ndarray] = {"x": x}
        readable: dict[str, np.ndarray | None] = {"x": None}
        for i, (ir, binding, machine) in enumerate(zip(chain.stages, bound, machines)):
            source = binding["x"]
            if source not in buffers:
                raise PlanExecutionError(f"stage {i} reads {source}, which nothing wrote")
            machine.x, machine.readable = buffers[source], readable[source]
            machine.out = np.full(machine.out.size, np.nan)         # poison
            machine.writes = np.zeros(machine.out.size, dtype=np.int64)
            machine.run_group(by)
            if np.any(machine.writes > 1):
                raise PlanExecutionError(f"block {by}, stage {i}: an element written twice")
            writes[binding["y"]] += machine.writes
            buffers[binding["y"]] = rounded(machine.out, ir.dtype)
            readable[binding["y"]] = machine.writes > 0
        done = last.writes > 0
        out[done] = last.out[done]
    for name, count in writes.items():
        if not np.all(count == 1):
            raise PlanExecutionError(f"{name}: {int(np.sum(count == 0))} elements never written, "
                                     f"{int(np.sum(count > 1))} written more than once")
    return out


def execute(kernel, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
    """Run a kernel (its KernelIR, or a family plan, lowered first) on input `x` (any shape with
    the geometry's element count); returns the output as a flat float64 array of batch*M*Ho*Wo
    elements (NCHW)."""
    if not isinstance(kernel, (KernelIR, StreamIR, ChainIR)):
        from .families import lower

        kernel = lower(kernel)
    geo = (kernel.stages[0] if isinstance(kernel, ChainIR) else kernel).geometry
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size != geo.input_elems:
        raise PlanExecutionError(f"input has {x.size} elements, plan expects {geo.input_elems}")
    if "res" in kernel.arguments:
        if residual is None:
            raise PlanExecutionError("plan adds a residual but none was given")
        residual = np.asarray(residual, dtype=np.float64).ravel()
    if kernel.dtype != "fp32":   # the kernel reads fp16/bf16: inputs must be representable
        if any(v is not None and not np.array_equal(v, rounded(v, kernel.dtype))
               for v in (x, residual)):
            raise PlanExecutionError(f"{kernel.dtype} plan given inputs that are not "
                                     f"{kernel.dtype} values")
    if isinstance(kernel, StreamIR):
        return execute_stream(kernel, x, residual)
    if isinstance(kernel, ChainIR):
        if residual is not None:
            raise PlanExecutionError("a chain takes no residual")
        return execute_chain(kernel, x)
    return _Machine(kernel, x, residual).run()
