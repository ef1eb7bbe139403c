"""Programmatic dependent launch (sm_90): kernels that wait for the grid before them, compiled
for a model's layers (sparsify_), printed and parsed back like every other IR field, built under
their own cache key, kept through save/load; `bench` and `tune` kernels stay without it. The
launches themselves run on the GPU (tests/gpu/test_torch_gpu.py)."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from golden.cases import plans

import sparsert_cli as sparsert
from sparsert_cli import build as B
from sparsert_cli.api import Layer, compile_plans, plan_layers
from sparsert_cli.cache import KernelCache
from sparsert_cli.errors import UserError
from sparsert_cli.families import lower
from sparsert_cli.families.streamed import StreamParams, build_plan as stream_plan
from sparsert_cli.problem_shape import Epilogue, Geometry
from sparsert_cli.render import PrintedMismatch, cuda, parse_cuda, parse_ptx, ptx, stream

PLANS = plans()
WAIT, GO = "griddepcontrol.wait;", "griddepcontrol.launch_dependents;"


def _first_statements(text: str, entry: str, count: int) -> list[str]:
    """The first `count` statements of the kernel entry's body (declarations skipped)."""
    body = text[text.index(entry):]
    lines = [ln.strip() for ln in body.split("\n")[1:]]
    lines = [ln for ln in lines if ln and ln != "{" and not ln.startswith((".reg", ".maxntid",
                                                                          ".maxnreg"))]
    return lines[:count]


@pytest.mark.parametrize("name", sorted(PLANS))
def test_immediate_printers_put_the_wait_first_and_parse_it_back(name):
    ir = dataclasses.replace(lower(PLANS[name]), dependent_launch=True)
    text = ptx.print_ptx(ir)
    assert _first_statements(text, ".visible .entry", 2) == [WAIT, GO]
    parse_ptx.check_printed(ir, text)
    plain = dataclasses.replace(ir, dependent_launch=False)
    with pytest.raises(PrintedMismatch, match="dependent_launch"):
        parse_ptx.check_printed(plain, text)
    with pytest.raises(PrintedMismatch, match="dependent_launch"):
        parse_ptx.check_printed(ir, ptx.print_ptx(plain))
    if ir.precision in cuda.PRECISIONS:
        source = cuda.print_cuda(ir)
        head = source[source.index('extern "C" __global__'):].split("\n")[3:5]
        assert tuple(head) == cuda.GRID_DEPENDENCY
        parse_cuda.check_printed(ir, source)
        with pytest.raises(PrintedMismatch, match="dependent_launch"):
            parse_cuda.check_printed(plain, source)


@pytest.mark.parametrize("mutate, why", [
    # the wait after the pointers are loaded: the check must refuse any other place
    (lambda s: s.replace(f"\t{WAIT}\n", "", 1).replace("\tmov.u32 %tx, %tid.x;",
                                                     f"\t{WAIT}\n\tmov.u32 %tx, %tid.x;", 1),
     "after the entry started"),
    (lambda s: s.replace(f"\t{WAIT}\n\t{GO}", f"\t{GO}\n\t{WAIT}", 1), "out of order"),
    (lambda s: s.replace(f"\t{GO}\n", "", 1), "without launch_dependents"),
])
def test_a_misplaced_wait_in_ptx_is_caught(mutate, why):
    ir = dataclasses.replace(lower(PLANS["gemm_v4_k2"]), dependent_launch=True)
    text = ptx.print_ptx(ir)
    changed = mutate(text)
    assert changed != text
    with pytest.raises(PrintedMismatch, match=why):
        parse_ptx.check_printed(ir, changed)


def _stream_ir(dependent: bool, stage: str = "shfl", slices: int = 1):
    geometry = Geometry(1, 16, 7, 7, 12, 3, 1, 1)
    rng = np.random.default_rng(3)
    import scipy.sparse as sp

    dense = rng.standard_normal((12, 16 * 9)).astype(np.float32)
    dense[rng.random(dense.shape) > 0.3] = 0
    plan = stream_plan(sp.csr_matrix(dense), geometry,
                       StreamParams(32, 1, 2, 3, 4, stage, k_slices=slices),
                       Epilogue(activation="relu", residual=True), "fp32", "fp32")
    return dataclasses.replace(lower(plan), dependent_launch=dependent)


@pytest.mark.parametrize("stage, slices", [("shfl", 1), ("smem", 1), ("ring", 1),
                                           ("smem", 2)])
def test_streamed_printer_waits_before_the_first_activation_and_its_check_sees_it(stage,
                                                                                   slices):
    """The printed streamed kernel lets the next launch start at once, reads its constant
    tables, and waits before its first load of x or res and its first store (K-slices:
    partials too). The source order is what this checks: ptxas may hoist the wait above the
    table loads (ir.py), never below a load of x."""
    ir = _stream_ir(True, stage, slices)
    source = stream.print_stream(ir)
    body = source[source.index('extern "C" __global__'):]
    assert body.split("\n")[3] == cuda.GRID_DEPENDENCY[1]
    wait = body.index(cuda.GRID_DEPENDENCY[0].strip())
    # the entries: copied into shared memory (stage smem, session 24) or loaded, before the wait
    entries = "cp.async.cg.shared.global" if ir.staged else "__ldg(ent"
    assert (ir.staged > 0) == (stage == "smem")
    assert body.index(entries) < wait
    assert "b0 + off" in body and "res + o" in body and "y + o" in body
    for use in ("b0 + off", "res + o", "y + o", "P[", "sparsert_count"):
        if use in body:
            assert wait < body.index(use), use
    if slices > 1:      # workers without rows wait before the partials and counters too
        assert body.index(cuda.GRID_DEPENDENCY[0], wait + 1) < body.index("atom.release")
    stream.check_printed(ir, source)
    assert stream.to_cubin(source, "sm_90", 1).cubin        # NVRTC takes it
    with pytest.raises(PrintedMismatch, match="dependent_launch"):
        stream.check_printed(_stream_ir(False, stage, slices), source)
    moved = source.replace(cuda.GRID_DEPENDENCY[0] + "\n", "", 1).replace(
        "  const int w = ", cuda.GRID_DEPENDENCY[0] + "\n  const int w = ", 1)
    assert moved != source
    with pytest.raises(PrintedMismatch, match="not what its IR prints"):
        stream.check_printed(ir, moved)


@pytest.mark.parametrize("stage, slices", [("smem", 1), ("ring", 1), ("smem", 2)])
def test_streamed_kernel_prefetches_its_blocks_pattern_data_before_the_wait(stage, slices):
    """With dependent launch each block asks L2 for exactly its own row headers and entries
    before the wait: the span table bounds every block's reads of both tables, the tables
    consecutive blocks read touch, and a span table that says otherwise is caught."""
    ir = _stream_ir(True, stage, slices)
    source = stream.print_stream(ir)
    body = source[source.index('extern "C" __global__'):]
    wait = body.index(cuda.GRID_DEPENDENCY[0].strip())
    assert body.index("prefetch.global.L2") < wait
    assert body.count("prefetch.global.L2") == 2
    span = stream.spans(ir)
    stride = ir.seg.shape[1] + 1
    assert len(span) == 2 * (ir.grid[0] + 1)
    assert span[0] == 0 and span[-2] == len(ir.offsets) and span[-1] == len(ir.row_out) * stride
    for b in range(ir.grid[0]):             # block b's workers' rows and their nonzeros
        rows = range(ir.work[b * ir.warps], ir.work[(b + 1) * ir.warps])
        assert span[2 * b + 1] == rows.start * stride and span[2 * b + 3] == rows.stop * stride
        for r in rows:
            assert span[2 * b] <= ir.seg[r, 0] <= ir.seg[r, -1] <= span[2 * b + 2]
    assert np.all(np.diff(span[0::2]) >= 0) and np.all(np.diff(span[1::2]) >= 0)
    stream.check_printed(ir, source)
    words = ",".join(map(str, span.tolist()))
    wrong = ",".join(map(str, (span + np.arange(len(span)) % 2).tolist()))
    changed = source.replace(f"sparsert_span[{len(span)}] = {{{words}}}",
                             f"sparsert_span[{len(span)}] = {{{wrong}}}")
    assert changed != source
    with pytest.raises(PrintedMismatch, match="not what its IR prints"):
        stream.check_printed(ir, changed)
    plain = stream.print_stream(_stream_ir(False, stage, slices))
    assert "prefetch" not in plain          # a staged kernel still reads its span table
    assert ("sparsert_span" in plain) == (ir.staged > 0) == (stage == "smem")


@pytest.mark.parametrize("rows, params", [
    (1, StreamParams(32, 1, 1, 1, 4, "smem")),      # one row with nonzeros, 11 empty blocks
    (12, StreamParams(32, 1, 2, 3, 4, "smem", k_slices=2)),
    (12, StreamParams(64, 2, 3, 1, 2, "ring"))])
def test_every_prefetch_lies_in_its_blocks_range_and_the_tables_are_line_aligned(rows, params):
    """The printed prefetch loop, run in Python for every thread of every block: each address
    lies inside the block's range of its table (a block without entries prefetches nothing,
    even where its range starts inside a line), so no prefetch leaves its table; both tables
    are aligned to L2 lines, so the loop's lines are the L2's."""
    import scipy.sparse as sp

    rng = np.random.default_rng(rows)
    dense = np.zeros((12, 64), np.float32)
    dense[:rows] = rng.standard_normal((rows, 64))
    dense[:rows][rng.random((rows, 64)) > 0.05] = 0
    dense[0, :3] = 1.0
    plan = stream_plan(sp.csr_matrix(dense), Geometry(1, 64, 1, 64, 12), params, Epilogue(),
                       "fp32", "fp32")
    ir = dataclasses.replace(lower(plan), dependent_launch=True)
    source = stream.print_stream(ir)
    assert "__align__(128) int sparsert_ent[" in source
    assert "__align__(128) int sparsert_rows[" in source
    assert "e0 < e1 && o < e1;" in source and "h0 < h1 && o < h1;" in source   # as run below
    span, threads = stream.spans(ir), ir.col_threads * ir.warps
    tables = {0: 8 * len(ir.offsets), 1: 4 * ir.seg.size + 4 * len(ir.row_out)}
    empty = 0
    for b in range(ir.grid[0]):
        for which, unit in ((0, 8), (1, 4)):
            a, e = unit * span[2 * b + which], unit * span[2 * b + 2 + which]
            empty += a == e
            hits = [max(o, a) for t in range(threads)      # for (o...; a < b && o < b; ...)
                    for o in range((a & -stream.LINE) + t * stream.LINE, e,
                                   threads * stream.LINE) if a < e]
            assert all(a <= h < e <= tables[which] for h in hits), (b, which, a, e)
            assert len(hits) == (-(-e // stream.LINE) - a // stream.LINE if a < e else 0)
    assert rows > 1 or empty


def test_the_prefetch_switch_has_its_own_cache_key(monkeypatch):
    """A streamed dependent-launch kernel built without the prefetch has its own key; the
    switch changes no other kernel's key (immediate, fused, or without dependent launch)."""
    import scipy.sparse as sp

    rng = np.random.default_rng(3)
    dense = rng.standard_normal((12, 16)).astype(np.float32)
    dense[rng.random(dense.shape) > 0.3] = 0
    streamed = stream_plan(sp.csr_matrix(dense), Geometry(1, 16, 7, 7, 12),
                           StreamParams(32, 1, 2, 3, 4, "smem"), Epilogue(), "fp32", "fp32")
    immediate = PLANS["gemm_v4_k2"]

    def keys():
        return [B._key(p, "ptx", "sm_90", dependent_launch=d)
                for p in (streamed, immediate) for d in (True, False)]

    on = keys()
    monkeypatch.setattr(stream, "PREFETCH", False)
    off = keys()
    assert on[0] != off[0] and on[1:] == off[1:]
    ir = _stream_ir(True)
    assert "prefetch" not in stream.print_stream(ir)
    stream.check_printed(ir, stream.print_stream(ir))


def test_builds_with_dependent_launch_have_their_own_cache_entries(tmp_path):
    plan = PLANS["gemm_v4_k2"]
    cache = KernelCache(tmp_path)
    plain, _ = B.build_kernel(plan, "ptx", "sm_90", cache)
    waits, source = B.build_kernel(plan, "ptx", "sm_90", cache, keep_source=True,
                                   dependent_launch=True)
    assert not plain.dependent_launch and waits.dependent_launch
    assert waits.key != plain.key and not waits.cached and plain.cubin != waits.cubin
    assert WAIT in source and WAIT not in B.emit(plan, "ptx", "sm_90")
    again, _ = B.build_kernel(plan, "ptx", "sm_90", cache, dependent_launch=True)
    assert again.cached and again.dependent_launch and again.cubin == waits.cubin
    (hit,) = B.build_all([plan], "ptx", "sm_90", cache, jobs=1, dependent_launch=True)
    assert hit.cached and hit.dependent_launch and hit.key == waits.key
    with pytest.raises(UserError, match="sm_90 or newer, not sm_80"):
        B.lowered(plan, "sm_80", dependent_launch=True)


def _layers(dtype="fp32"):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    w[rng.random(w.shape) < 0.9] = 0
    return [Layer.of("g", w, op="gemm", n=64, dtype=dtype),
            dataclasses.replace(Layer.of("s", w, op="gemm", n=64, dtype=dtype),
                                family="streamed")]


@pytest.mark.parametrize("arch, asked, want", [
    ("sm_90", None, True), ("sm_90", False, False), ("sm_80", None, False),
    ("sm_90", True, True)])
def test_compile_plans_turns_it_on_where_the_arch_has_it(arch, asked, want):
    layers = _layers()
    planned = plan_layers(layers, False, None, labels=False)
    kernels = compile_plans(layers, planned, arch=arch, cache=False, jobs=1,
                            dependent_launch=asked)
    for kernel in kernels:
        assert kernel.dependent_launch is want
        assert (WAIT in kernel.source) is want and kernel.verify_cpu()["ok"]


def test_bench_kernels_do_not_wait_and_sm80_refuses_it():
    layers = _layers()
    planned = plan_layers(layers, False, None, labels=False)
    assert not any(k.dependent_launch for k in compile_plans(layers, planned, arch="sm_90",
                                                             cache=False, jobs=1))
    with pytest.raises(UserError, match="sm_90 or newer"):
        compile_plans(layers, planned, arch="sm_80", cache=False, jobs=1, dependent_launch=True)


def test_saved_kernels_keep_it(tmp_path):
    layers = _layers()
    planned = plan_layers(layers, False, None, labels=False)
    for i, kernel in enumerate(compile_plans(layers, planned, arch="sm_90", cache=False, jobs=1,
                                             dependent_launch=True)):
        kernel.save(tmp_path / f"k{i}")
        again = sparsert.Kernel.from_dir(tmp_path / f"k{i}")
        assert again.dependent_launch and again.manifest()["dependent_launch"] is True
        assert WAIT in again.source and again.verify_cpu()["ok"]
    manifest = tmp_path / "k0" / "manifest.json"
    manifest.write_text(re.sub(r',\s*"dependent_launch": true', "", manifest.read_text()))
    assert not sparsert.Kernel.from_dir(tmp_path / "k0").dependent_launch   # older files
    plain = compile_plans(layers, planned, arch="sm_90", cache=False, jobs=1)[0]
    plain.save(tmp_path / "plain")
    manifest = tmp_path / "plain" / "manifest.json"      # a flag its cubin does not honour
    manifest.write_text(manifest.read_text().replace('"dependent_launch": false',
                                                     '"dependent_launch": true'))
    with pytest.raises(UserError, match="does not wait for the kernel before it"):
        sparsert.Kernel.from_dir(tmp_path / "plain")


def test_set_dependent_launch_flips_only_kernels_compiled_to_wait(monkeypatch):
    from sparsert_cli.gpu.loaded import LoadedKernel
    from sparsert_cli.torch import ops

    def fake(waits):        # a LoadedKernel without a device: only its switch is used
        loaded = LoadedKernel.__new__(LoadedKernel)
        loaded.entry, loaded.waits, loaded._dependent = "k", waits, waits
        return loaded

    able, unable = fake(True), fake(False)
    monkeypatch.setattr(ops, "_REGISTRY", {1: ops.Entry(None, False, (), (), able, 0),
                                           2: ops.Entry(None, False, (), (), unable, 0),
                                           3: ops.Entry(None, False, (), ())})
    other = fake(True)
    ops._REGISTRY[4] = ops.Entry(None, False, (), (), other, 0)
    assert ops.dependent_launch_states() == {1: True, 4: True}
    before = ops.dependent_launch_states({1, 2, 3})
    assert before == {1: True}
    assert ops.set_dependent_launch(False, before) == 1          # one model's kernels only
    assert not able.dependent_launch and other.dependent_launch
    ops.restore_dependent_launch(before)
    assert able.dependent_launch
    assert ops.set_dependent_launch(False) == 2
    assert not able.dependent_launch and not unable.dependent_launch and not other.dependent_launch
    assert ops.set_dependent_launch(True) == 2
    assert able.dependent_launch and not unable.dependent_launch
    with pytest.raises(ValueError, match="not compiled for programmatic dependent launch"):
        unable.dependent_launch = True


def test_sparsify_compiles_model_kernels_to_wait():
    torch = pytest.importorskip("torch")
    from sparsert_cli.torch.backend import LayerSpec, compile_layers

    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    w[rng.random(w.shape) < 0.9] = 0
    (kernel,) = compile_layers([LayerSpec("fc", w, "gemm", n=8)], tuned=False, arch="sm_90",
                               cache=False, jobs=1)
    assert kernel.dependent_launch and WAIT in kernel.source
    (kernel,) = compile_layers([LayerSpec("fc", w, "gemm", n=8)], tuned=False, arch="sm_90",
                               cache=False, jobs=1, dependent_launch=False)
    assert not kernel.dependent_launch
    from sparsert_cli.torch import sparsify_

    model = torch.nn.Sequential(torch.nn.Linear(16, 32))
    with pytest.raises(UserError, match="dependent_launch must be True, False or None"):
        sparsify_(model, (torch.randn(8, 16),), dry_run=True, dependent_launch="yes")


def test_model_summary_says_what_dependent_launch_saved(capsys):
    """`sparsert model` prints the graph time without dependent launch beside the result (the
    committed MobileNet v1 fp16 entry of S8-3 has both)."""
    import json
    from pathlib import Path

    from sparsert_cli.commands.model import _print_row

    doc = json.loads((Path(__file__).parents[1] / "results/h100/models.json").read_text())
    row = next(r for r in doc["models"] if r.get("sparsert_graph_serial_us"))
    _print_row(row)
    out = " ".join(capsys.readouterr().out.split())
    assert (f"graph {row['sparsert']['graph_us']:.1f} us, "
            f"{row['sparsert_graph_serial_us']:.1f} us without it") in out
    del row["sparsert_graph_serial_us"]
    _print_row(row)
    assert "without it" not in capsys.readouterr().out
    # since session 13 the faster state is kept: both times and the state are printed
    row.update(sparsert_graph_pdl_us=97.7, sparsert_graph_serial_us=93.1,
               dependent_launch_kept=False)
    row["sparsert"] = dict(row["sparsert"], graph_us=93.1)
    _print_row(row)
    out = " ".join(capsys.readouterr().out.split())
    assert "graph 97.7 us, 93.1 us without it (turned off: faster without)" in out
    row.update(sparsert_graph_serial_us=99.0, dependent_launch_kept=True)
    _print_row(row)
    assert "graph 97.7 us, 99.0 us without it (kept)" in " ".join(
        capsys.readouterr().out.split())


def test_a_model_that_does_not_trace_is_read_from_the_work_it_launches():
    """An untraceable model's launch order comes from the profiler's record of one forward:
    a kernel keeps dependent launch only where every launch of it follows one of ours."""
    pytest.importorskip("torch")
    from sparsert_cli.torch.sparsify import plain_after_theirs

    names = {"sparsert_a": {1}, "sparsert_b": {2}, "sparsert_c": {3}, "sparsert_d": {4, 5}}
    work = ["layer_norm", "sparsert_a", "sparsert_b", "Memcpy DtoD", "sparsert_c",
            "sparsert_d", "gelu", "sparsert_b"]
    # a starts after torch's kernel; b follows a once but torch's gelu once; c follows a copy;
    # d (two ids of one entry) follows c
    assert plain_after_theirs(work, names) == {1, 2, 3}
    assert plain_after_theirs(["sparsert_a"], names) == {1}     # first in the forward
    assert plain_after_theirs(["gemm", "softmax"], names) is None    # none of ours seen


def test_the_profiled_order_reads_gpu_work_only_in_start_order(monkeypatch):
    """_profiled_plain_launches with a stand-in profiler: CPU events (the launch calls) are not
    GPU work, events are taken by start time, a memset counts as torch's work, and a kernel
    right after one of ours keeps dependent launch."""
    torch = pytest.importorskip("torch")
    import types

    import torch.profiler
    from torch.autograd import DeviceType

    from sparsert_cli.torch import ops
    from sparsert_cli.torch import sparsify as S

    def event(name, start, device):
        return types.SimpleNamespace(name=name, device_type=device,
                                     time_range=types.SimpleNamespace(start=start))

    class Profile:
        def __init__(self, **kw):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def events(self):
            cpu, gpu = DeviceType.CPU, DeviceType.CUDA
            return [event("cuLaunchKernelEx", 1, cpu), event("sparsert_b", 30, gpu),
                    event("layer_norm", 5, gpu), event("sparsert_a", 10, gpu),
                    event("cudaLaunchKernel", 12, cpu), event("Memset (Device)", 40, gpu),
                    event("sparsert_c", 50, gpu)]

    class Layer(torch.nn.Module):
        def __init__(self, kernel_id):
            super().__init__()
            self.kernel_id = kernel_id

        def forward(self, x):
            return x

    monkeypatch.setattr(torch.profiler, "profile", Profile)
    monkeypatch.setattr(S, "SparseLayer", Layer)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    ids = []
    for name in "abc":
        entry = ops.Entry(None, True, (1,), (1,))
        entry.loaded = types.SimpleNamespace(entry=f"sparsert_{name}", waits=True,
                                             dependent_launch=True)
        ids.append(ops.register(entry))
    try:
        model = torch.nn.Sequential(*[Layer(i) for i in ids])
        a, b, c = ids      # order on the GPU: layer_norm, a, b, memset, c
        assert S._profiled_plain_launches(model, (torch.zeros(1),)) == {a, c}
    finally:
        for i in ids:
            ops._REGISTRY.pop(i, None)


@pytest.mark.parametrize("pdl_us, serial_us, keep_faster, kept", [
    (90.0, 95.0, True, True), (97.7, 93.1, True, False), (97.7, 93.1, False, True)])
def test_the_faster_launch_state_is_kept_for_what_is_timed_next(monkeypatch, pdl_us,
                                                                   serial_us, keep_faster, kept):
    """graph_launch_choice times the graph both ways and leaves the faster state set (unless
    told to keep the one sparsify_ chose); both times are reported."""
    torch = pytest.importorskip("torch")
    import types

    from sparsert_cli.torch import endtoend as e
    from sparsert_cli.torch import ops

    class Layer(torch.nn.Module):
        def __init__(self, kernel_id):
            super().__init__()
            self.kernel_id = kernel_id

    entry = ops.Entry(None, True, (1,), (1,))
    entry.loaded = types.SimpleNamespace(entry="sparsert_a", waits=True, dependent_launch=True)
    kernel = ops.register(entry)
    try:
        monkeypatch.setattr(e, "SparseLayer", Layer)
        monkeypatch.setattr(e, "time_graph", lambda model, x: (
            pdl_us if entry.loaded.dependent_launch else serial_us))
        out = e.graph_launch_choice(torch.nn.Sequential(Layer(kernel)), None, keep_faster)
        assert out == {"graph_us": pdl_us if kept else serial_us, "sparsert_graph_pdl_us": pdl_us,
                       "sparsert_graph_serial_us": serial_us, "dependent_launch_kept": kept}
        assert entry.loaded.dependent_launch == kept
    finally:
        ops._REGISTRY.pop(kernel, None)


def test_model_summary_warns_when_the_sparse_model_is_slower(capsys):
    """A model whose sparsified forward loses to the best dense configuration (the committed
    ResNet-50 fp16 batch-8 entry) gets a warning saying to keep the dense model; a faster one,
    or one with no layer replaced, none."""
    import json
    from pathlib import Path

    from sparsert_cli.commands.model import _print_row

    doc = json.loads((Path(__file__).parents[1] / "results/h100/models.json").read_text())
    slow = next(r for r in doc["models"] if r["speedup"] < 1.0 and r["replaced"])
    _print_row(slow)
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: the sparsified model is slower than the best dense configuration" in out
    assert f"keep the dense model at batch {slow['batch']}" in out
    fast = next(r for r in doc["models"] if r["speedup"] > 1.0)
    _print_row(fast)
    assert "warning" not in capsys.readouterr().out
    # nothing replaced: the sparsified model is the dense one (BERT fp16 at 0.999x is noise)
    same = next(r for r in doc["models"] if r["speedup"] < 1.0 and not r["replaced"])
    _print_row(same)
    assert "warning" not in capsys.readouterr().out
