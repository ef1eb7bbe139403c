"""Staged entries (stages "tile" and "smem", session 24) on the CPU: a block's run of (offset,
weight) entries copied into `int2 sparsert_block_ent[N]` with 16-byte cp.async pieces. The
interpreter does not model the copy, so these tests check what the GPU relies on from the plan
and the printed source: every block's run starts at a multiple of PAD entries and is whole
16-byte pieces, fits N, holds every entry its rows read; the table is 16-byte aligned; the static
shared memory fits 48 KB; every thread reaches the barrier before the staged array is read; the
parse-back catches tampering with the staging; build.lowered()'s shared-memory check."""

from __future__ import annotations

import re
import tempfile
from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sps

import sparsert_cli as sparsert
from sparsert_cli.build import lowered
from sparsert_cli.arch import block_shared_bytes
from sparsert_cli.errors import UserError
from sparsert_cli.families import lower
from sparsert_cli.families.streamed import StreamParams
from sparsert_cli.families.streamed import plan as sp
from sparsert_cli.families.streamed.plan import PAD, build_plan, tile_layout
from sparsert_cli.problem_shape import Epilogue, Geometry
from sparsert_cli.render import PrintedMismatch
from sparsert_cli.render import stream as S


def csr(m, k, density, seed, empty=()):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, k)).astype(np.float32)
    w[w == 0] = 0.5
    w[rng.random((m, k)) >= density] = 0
    w[[r for r in empty if r < m]] = 0
    return sps.csr_matrix(w)


# name: (geometry, density, empty rows, params, epilogue, dtype)
SMEM = "smem"
PLANS = {
    "gemm_odd": (Geometry(1, 53, 1, 129, 37), 0.3, (), StreamParams(32, 2, 2, 3, 4, SMEM),
                 Epilogue(), "fp32"),
    # many column tiles (grid y > 1), one row a worker
    "gemm_col_tiles": (Geometry(1, 300, 1, 1000, 200), 0.05, (),
                       StreamParams(32, 1, 4, 1, 4, SMEM), Epilogue(), "fp16"),
    # token-major GEMM view: the output staged per block (tile_rows) streams its entries, a
    # k-split one (no tile_rows) stages them beside sparsert_last
    "gemm_tokens_tile_rows": (Geometry(1, 64, 1, 64, 40), 0.3, (3, 4),
                              StreamParams(32, 2, 2, 2, 4, SMEM), Epilogue(token_major=True),
                              "fp16"),
    "gemm_tokens_ksplit": (Geometry(1, 96, 1, 48, 40), 0.3, (3, 4),
                           StreamParams(32, 2, 2, 2, 4, SMEM, 3), Epilogue(token_major=True),
                           "fp32"),
    # exactly 40 KB in a block: 5 dense rows of 1024, in two K-slices
    "gemm_40kb_ksplit": (Geometry(1, 1024, 1, 64, 10), 1.0, (),
                         StreamParams(32, 2, 5, 1, 4, SMEM, 2), Epilogue(), "fp32"),
    # 5 rows on 8 workers in blocks of 4: workers without rows
    "idle_workers": (Geometry(1, 40, 1, 33, 5), 0.5, (1,), StreamParams(32, 1, 4, 1, 4, SMEM),
                     Epilogue(), "fp32"),
    "pw_batch2": (Geometry(2, 24, 9, 12, 40), 0.3, (0, 5, 6, 7), StreamParams(64, 2, 2, 3, 4, SMEM),
                  Epilogue(bias=tuple(np.linspace(-1, 1, 40)), residual=True), "fp16"),
    "pw_stride2": (Geometry(1, 12, 11, 9, 20, 1, 2, 0), 0.3, (), StreamParams(32, 1, 3, 2, 2, SMEM),
                   Epilogue(activation="relu"), "bf16"),
    # padded 3x3: nine tap segments, many of them empty at this density
    "3x3_pad1_sparse": (Geometry(1, 16, 13, 10, 24, 3, 1, 1), 0.05, (2,),
                        StreamParams(32, 2, 2, 3, 4, SMEM), Epilogue(), "fp16"),
    "3x3_pad1_ksplit": (Geometry(1, 16, 9, 9, 16, 3, 1, 1), 0.3, (0, 1, 2, 3),
                        StreamParams(32, 1, 2, 2, 4, SMEM, 2), Epilogue(), "fp16"),
    "3x3_s2_b2": (Geometry(2, 8, 9, 7, 12, 3, 2, 1), 0.3, (), StreamParams(32, 2, 4, 1, 8, SMEM, 3),
                  Epilogue(activation="relu6"), "fp32"),
    "3x3_pad0": (Geometry(1, 6, 8, 8, 10, 3, 1, 0), 0.4, (), StreamParams(32, 1, 1, 7, 4, SMEM),
                 Epilogue(), "fp32"),
    # blocks past MAX_STAGED_ENTRY_BYTES stream their entries
    "over_40kb": (Geometry(1, 4096, 1, 16, 8), 0.6, (), StreamParams(32, 1, 2, 3, 4, SMEM),
                  Epilogue(), "fp16"),
    # stage tile
    "tile_pairs": (Geometry(1, 16, 14, 14, 12, 3, 1, 1), 0.2, (), StreamParams(
        stage="tile", vector_width=2, warps=2, rows_per_worker=2), Epilogue(), "fp16"),
    "tile_single_b2": (Geometry(2, 8, 7, 7, 12, 3, 1, 1), 0.3, (0, 1, 2, 7), StreamParams(
        stage="tile", vector_width=1, warps=4, rows_per_worker=1), Epilogue(), "fp16"),
    "tile_empty_rows": (Geometry(1, 8, 6, 6, 12, 3, 1, 1), 0.2, (3, 4, 5, 6, 7, 8), StreamParams(
        stage="tile", vector_width=2, warps=1, rows_per_worker=5), Epilogue(), "fp16"),
    "tile_long_rows": (Geometry(1, 64, 4, 4, 12, 3, 1, 1), 0.9, (), StreamParams(
        stage="tile", vector_width=2, warps=3, rows_per_worker=1, chains=8), Epilogue(), "fp16"),
}
STAGED = {"gemm_odd", "gemm_col_tiles", "gemm_tokens_ksplit", "gemm_40kb_ksplit", "idle_workers",
          "pw_batch2", "pw_stride2", "3x3_pad1_sparse", "3x3_pad1_ksplit", "3x3_s2_b2",
          "3x3_pad0", "tile_pairs", "tile_single_b2", "tile_empty_rows", "tile_long_rows"}

_PLANS: dict[str, object] = {}


def plan(name):
    if name not in _PLANS:
        g, density, empty, params, epi, dtype = PLANS[name]
        _PLANS[name] = build_plan(csr(g.out_channels, g.taps, density, len(name), empty), g,
                                  params, epi, dtype)
    return _PLANS[name]


_SHARED = re.compile(r"__shared__ (?:__align__\(\d+\) )?(int2|unsigned short|unsigned|float) "
                     r"(\w+)((?:\[\d+\])*);")
_BYTES = {"int2": 8, "unsigned": 4, "float": 4, "unsigned short": 2}


def static_shared(source: str) -> dict[str, int]:
    """{array: bytes} of every static __shared__ declaration in a printed kernel."""
    out = {}
    for ty, name, dims in _SHARED.findall(source):
        out[name] = _BYTES[ty] * int(np.prod([int(d) for d in re.findall(r"\d+", dims)] or [1]))
    assert source.count("__shared__") == len(out) + source.count("extern __shared__")
    return out


def printed(name, dependent=False):
    ir = lower(plan(name))
    if dependent:
        ir = replace(ir, dependent_launch=True)
    source = S.print_stream(ir)
    S.check_printed(ir, source)
    return ir, source


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("dependent", [False, True])
@pytest.mark.parametrize("name", sorted(PLANS))
def test_block_runs_are_whole_aligned_pieces_within_the_array(name, dependent, prefetch,
                                                              monkeypatch):
    monkeypatch.setattr(S, "PREFETCH", prefetch)
    p = plan(name)
    ir, source = printed(name, dependent)
    n = ir.staged
    assert n == p.staged_entries and bool(n) == (name in STAGED)
    shared = static_shared(source)
    assert sum(shared.values()) + 1024 <= 48 << 10, shared
    if p.params.stage == "tile":        # the plan's count is what the kernel declares
        assert sum(shared.values()) == (8 * p.staged_entries if p.staged_entries
                                        else p.warp_buffer_bytes)
    if not n:
        assert "cp.async" not in source and "sparsert_block_ent" not in source
        return
    assert shared["sparsert_block_ent"] == 8 * n
    assert set(shared) <= {"sparsert_block_ent", "sparsert_last"}
    # the table the copy reads: 16-byte aligned (cp.async.cg 16; to_cubin gives the PTX
    # table the source's alignment)
    _, found = S.split_tables(source)
    assert found["sparsert_ent"][0] % 16 == 0 and "sparsert_span" in found
    span = np.array([int(w) for w in found["sparsert_span"][1].split(",")])
    assert np.array_equal(span, S.spans(ir))
    first, runs = span[0::2], np.diff(span[0::2])
    assert len(first) == ir.grid[0] + 1 and first[-1] == len(ir.offsets)
    assert (first % PAD == 0).all() and (runs >= 0).all() and (runs % 2 == 0).all()
    assert runs.max() == n                              # N holds the largest copy exactly
    assert (ir.seg % PAD == 0).all()                    # every chunk start: whole int4 pairs
    starts = ir.work[::ir.warps]
    for b in range(ir.grid[0]):                         # every entry a block's rows read
        rows = ir.seg[starts[b]:starts[b + 1]]
        if rows.size:
            assert first[b] <= rows.min() and rows.max() <= first[b + 1], b


def _depth_lines(source: str):
    """(brace depth inside the kernel body, line) for the kernel's lines."""
    body = source[source.index('extern "C" __global__'):]
    depth, out = 0, []
    for line in body.splitlines():
        out.append((depth, line))
        depth += line.count("{") - line.count("}")
    return out


def _enclosing(lines, i):
    """The opening lines of the blocks that enclose line i."""
    depth, out = lines[i][0], []
    for j in range(i - 1, -1, -1):
        d, line = lines[j]
        if d < depth and line.count("{") > line.count("}"):
            out.append(line.strip())
            depth = d
    return out


@pytest.mark.parametrize("dependent", [False, True])
@pytest.mark.parametrize("name", ["pw_batch2", "3x3_pad1_ksplit", "gemm_tokens_ksplit",
                                  "idle_workers", "tile_pairs", "tile_empty_rows"])
def test_every_thread_reaches_the_barrier_before_the_staged_array_is_read(name, dependent):
    ir, source = printed(name, dependent)
    lines = _depth_lines(source)
    text = [line.strip() for _, line in lines]
    copy = next(i for i, t in enumerate(text) if "cp.async.cg.shared.global" in t)
    commit = text.index('asm volatile("cp.async.commit_group;" ::: "memory");')
    wait = text.index('asm volatile("cp.async.wait_all;" ::: "memory");')
    assert copy < commit < wait
    assert text[wait + 1] == "__syncthreads();"          # the barrier right after the wait
    barrier = wait + 1
    # the commit, wait and barrier run unconditionally: inside the kernel body or bare blocks
    for i in (commit, wait, barrier):
        assert not any(re.match(r"(if|for|while|else|do)\b", t) for t in _enclosing(lines, i))
    assert not any("return" in t for t in text[:barrier])
    # nothing between the wait and the barrier touches the staged array; its reads come after
    uses = [i for i, t in enumerate(text) if "sparsert_block_ent" in t
            and "__shared__" not in t and "cvta_generic_to_shared(sparsert_block_ent);" not in t]
    assert uses and all(i > barrier for i in uses)
    if ir.stage == "tile":              # read by ld.shared at qa, computed after the barrier
        assert all(i > barrier for i, t in enumerate(text) if "ld.volatile.shared.v4" in t)
    if dependent:                       # the copy (constant data) before the grid wait
        assert copy < text.index('asm volatile("griddepcontrol.wait;" ::: "memory");')


@pytest.mark.parametrize("name", ["3x3_pad1_ksplit", "tile_pairs"])
def test_tampering_with_the_staging_is_caught(name):
    ir, source = printed(name)
    n = ir.staged
    span = S.spans(ir)
    words = ",".join(map(str, span.tolist()))
    bumped = span.copy()
    bumped[2] += 2
    changes = {
        "array length": (f"sparsert_block_ent[{n}]", f"sparsert_block_ent[{n - 8}]"),
        "span word": (f"sparsert_span[{len(span)}] = {{{words}}}",
                      f"sparsert_span[{len(span)}] = {{{','.join(map(str, bumped.tolist()))}}}"),
        "wait dropped": ('asm volatile("cp.async.wait_all;" ::: "memory");\n', ""),
        "barrier dropped": ('asm volatile("cp.async.wait_all;" ::: "memory");\n  __syncthreads();',
                            'asm volatile("cp.async.wait_all;" ::: "memory");'),
        "alignment": ("__align__(16) int sparsert_ent[", "__align__(8) int sparsert_ent["),
        "copy size": ("shared.global [%0], [%1], 16;", "shared.global [%0], [%1], 8;"),
        "first entry": ("const int e0 = __ldg(sparsert_span + 2 * blockIdx.x);",
                        "const int e0 = __ldg(sparsert_span + 2 * blockIdx.x + 1);"),
    }
    for what, (old, new) in changes.items():
        assert source.count(old) >= 1, what
        with pytest.raises(PrintedMismatch):
            S.check_printed(ir, source.replace(old, new, 1))


# kernels compiled by NVRTC/ptxas: the cubin's static shared memory is the source's, and the
# interpreter agrees with float64 (it reads sparsert_ent, not the staged copy)
COMPILED = {
    "ksplit_idle": ((5, 40), dict(n=33), "fp32",
                    StreamParams(32, 1, 4, 1, 4, SMEM, 2), None),
    "tokens_ksplit": ((40, 96), dict(n=48), "fp16", StreamParams(32, 2, 2, 2, 4, SMEM, 3),
                      {"token_major": True, "bias": np.ones(40)}),
    "40kb_ksplit": ((10, 1024), dict(n=64), "fp32",
                    StreamParams(32, 2, 5, 1, 4, SMEM, 2), {"activation": "relu"}),
    "pw_stride2_b2": ((20, 12, 1, 1), dict(op="conv", input_shape=(2, 12, 11, 9),
                                                     stride=2), "bf16",
                      StreamParams(32, 1, 3, 2, 2, SMEM), {"residual": True}),
    "tile_empty_b2": ((12, 8, 3, 3), dict(op="conv", input_shape=(2, 8, 7, 7),
                                                    padding=1), "fp16",
                      StreamParams(stage="tile", vector_width=2, warps=3, rows_per_worker=2),
                      {"activation": "relu", "bias": np.ones(12)}),
}


@pytest.mark.parametrize("name", sorted(COMPILED))
def test_staged_kernels_compile_and_verify(name):
    shape, kwargs, dtype, params, epi = COMPILED[name]
    rng = np.random.default_rng(len(name))
    w = rng.standard_normal(shape).astype(np.float32)
    if name != "40kb_ksplit":
        w[rng.random(shape) >= 0.4] = 0
        w[: shape[0] // 3] = 0                              # empty rows, empty blocks' runs
    kernel = sparsert.compile_kernel(w, **kwargs, dtype=dtype, tuned=False, cache=None,
                                     epilogue=epi, plan=params)
    n = kernel.plan.staged_entries
    assert n > 0
    if name == "40kb_ksplit":
        assert 8 * n == sp.MAX_STAGED_ENTRY_BYTES
    ir = lower(kernel.plan)
    source = S.print_stream(ir)
    S.check_printed(ir, source)
    # ptxas's count: the declared arrays, and on sm_90 the 1 KB it reserves
    declared = sum(static_shared(source).values())
    assert 8 * n <= declared <= kernel.resources.shared_bytes <= declared + 1024
    assert kernel.resources.shared_bytes <= 48 << 10
    verified = kernel.verify(3).verified
    assert verified["ok"], verified


def test_lowered_accepts_what_a_block_of_each_arch_holds():
    """static (the staged entries or the per-warp buffers) + dynamic (the image) against the
    arch's per-block opt-in limit, exactly at the boundary."""
    for name in ("tile_pairs", "tile_long_rows"):
        p = plan(name)
        need = p.dynamic_shared_bytes + 8 * p.staged_entries + 1024
        assert p.staged_entries
        for arch in ("sm_80", "sm_86", "sm_89", "sm_90"):
            assert need <= block_shared_bytes(arch)
            assert lowered(p, arch).staged == p.staged_entries
    # a 195-KB image and 3936 entries (31 KB): within 1,264 bytes of sm_90's 227 KB a block
    # (TILE_BLOCK_BYTES keeps 1 KB for what ptxas reserves)
    g = Geometry(1, 390, 14, 14, 4, 3, 1, 1)
    rng = np.random.default_rng(0)
    w = np.zeros((4, g.taps), np.float32)
    for r in range(4):
        w[r, rng.choice(g.taps, 980, replace=False)] = 1.0     # runs of 984 with the padding
    big = build_plan(sps.csr_matrix(w), g, StreamParams(stage="tile", vector_width=2, warps=4,
                                                        rows_per_worker=1), Epilogue(), "fp16")
    assert big.staged_entries == 3936 and big.dynamic_shared_bytes == tile_layout(g, 2).bytes
    need = big.dynamic_shared_bytes + 8 * big.staged_entries
    assert block_shared_bytes("sm_90") - 2048 < need <= block_shared_bytes("sm_90") - 1024
    ir = lowered(big, "sm_90")
    assert ir.staged == 3936
    for arch in ("sm_80", "sm_86", "sm_89"):            # the image alone is past their limit
        with pytest.raises(UserError, match="shared memory"):
            lowered(big, arch)


@pytest.mark.parametrize("arch,channels", [("sm_80", 256), ("sm_86", 128)])
def test_lowered_does_not_refuse_a_tile_plan_that_fits_unstaged(arch, channels):
    g = Geometry(1, channels, 14, 14, 8, 3, 1, 1)
    p = build_plan(csr(8, g.taps, 0.5 if channels == 256 else 1.0, 1), g,
                   StreamParams(stage="tile", vector_width=2, warps=4, rows_per_worker=1),
                   Epilogue(), "fp16")
    unstaged = 256 * (p.params.col_threads // 32) * p.params.warps
    assert p.dynamic_shared_bytes + unstaged <= block_shared_bytes(arch)   # it fits streamed
    assert p.dynamic_shared_bytes + 8 * p.staged_entries > block_shared_bytes(arch)
    ir = lowered(p, arch)           # its entries streamed on this arch, staged on sm_90
    assert ir.staged == 0 and p.staged_entries and lowered(p, "sm_90").staged
    source = S.print_stream(ir)
    S.check_printed(ir, source)
    assert "cp.async" not in source and "sparsert_stage[" in source


def _fp32_smem(arch):
    w = csr(16, 24 * 9, 0.3, 3).toarray().reshape(16, 24, 3, 3)
    return sparsert.compile_kernel(w, op="conv", input_shape=(1, 24, 9, 9), padding=1,
                                   dtype="fp32", tuned=False, cache=None, arch=arch,
                                   plan=StreamParams(stage="smem", warps=2, rows_per_worker=3))


def test_sm75_smem_kernels_compile_without_staging(monkeypatch):
    """The control for the test below: streamed entries (no cp.async) compile for sm_75."""
    monkeypatch.setattr(sp, "MAX_STAGED_ENTRY_BYTES", 0)
    kernel = _fp32_smem("sm_75")
    assert kernel.plan.staged_entries == 0 and kernel.cubin[:4] == b"\x7fELF"


def test_sm75_staged_smem_kernels_compile(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))     # where a failed source goes
    kernel = _fp32_smem("sm_75")      # staged on sm_80+, streamed here (no cp.async)
    assert kernel.plan.staged_entries > 0 and "cp.async" not in kernel.source
    assert "cp.async" in _fp32_smem("sm_80").source
