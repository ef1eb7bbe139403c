"""The streamed tile stage with row vectors (session 25), from a review: an independent,
source-driven emulation of the printed kernel (the raw cp.async copy, the vector build with the
index expressions read from the printed source, LDS.64 entry words, LDS.128 at
tb + ((ex >> 12) & ~15), PTX generic-mode PRMT with the whole 32-bit entry word as selector,
fma.rn.f16x2, the xor-8/xor-16 shuffles, the epilogue and the stores) compared bit for bit with
the CPU interpreter; cache keys, save/load and tampering; the arch limits; and the review's
findings, fixed: the tuner's candidates and a tuned winner fit the target arch, and an explicit
vector_width 8 on a wide image names the other widths."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import sparsert_cli
from sparsert_cli.api import plan_inputs, plan_layers
from sparsert_cli.build import lowered, plan_weight, _key
from sparsert_cli.errors import UserError
from sparsert_cli.families.streamed import StreamParams
from sparsert_cli.families.streamed.plan import fits_arch
from sparsert_cli.interp import execute
from sparsert_cli.problem_shape import Epilogue, Geometry
from sparsert_cli.families.streamed.plan import ROW_VECTORS, tile_layout
from sparsert_cli.render.stream import check_printed, print_stream, tables

M32 = 0xFFFFFFFF


def f16(v):
    return np.float16(v)


def bits(h):            # float16 -> uint16 int
    return int(np.array(h, dtype=np.float16).view(np.uint16))


def val(b):             # uint16 int -> float
    return float(np.array(b & 0xFFFF, dtype=np.uint16).view(np.float16))


def pair_op(a, b, op):
    return (bits(f16(op(val(a), val(b)))) | bits(f16(op(val(a >> 16), val(b >> 16)))) << 16)


def hfma2(x, w, a):
    def one(xs, ws, as_):
        return bits(f16(np.float64(val(xs)) * np.float64(val(ws)) + np.float64(val(as_))))
    return one(x, w, a) | one(x >> 16, w >> 16, a >> 16) << 16


def hadd2(a, b):
    return pair_op(a, b, lambda u, v: np.float64(u) + np.float64(v))


def hmax2(a, b):
    return pair_op(a, b, max)


def hmin2(a, b):
    return pair_op(a, b, min)


def prmt(a, b, c):
    """PTX prmt.b32 generic mode."""
    src = ((b & M32) << 32) | (a & M32)
    out = 0
    for n in range(4):
        ctl = (c >> (4 * n)) & 0xF
        byte = (src >> (8 * (ctl & 7))) & 0xFF
        if ctl & 8:
            byte = 0xFF if byte & 0x80 else 0x00
        out |= byte << (8 * n)
    return out


def cexpr(expr: str, **env) -> int:
    """Evaluate a small C int expression of the printed source (non-negative operands)."""
    py = expr.replace("/", "//")
    return int(eval(py, {}, env))


def emulate(plan, x, res, arch="sm_90", dependent=False):
    ir = lowered(plan, arch, dependent)
    src = print_stream(ir)
    g = ir.geometry
    lay = tile_layout(g, ROW_VECTORS)
    H, W, C = g.height, g.width, g.in_channels
    hw = H * W
    assert f"__launch_bounds__({32 * ir.warps})" in src
    # --- what the source says (asserted, or read from it) ---
    def need(pattern):
        m = re.search(pattern, src)
        assert m, pattern
        return m
    assert need(r"x \+= blockIdx\.y \* (\d+);")[1] == str(C * hw)
    assert need(r"y \+= blockIdx\.y \* (\d+);")[1] == str(g.out_channels * hw)
    raw_at = int(need(r"__cvta_generic_to_shared\(sparsert_tile \+ (\d+)\)")[1])
    pieces = int(need(r"for \(int i = t; i < (\d+); i \+= (\d+)\)")[1])
    fill_n = int(need(r"for \(int q = t; q < (\d+); q \+= \d+\)")[1])
    ci = need(r"const int c = (.+?), i = (.+?);")
    cond = need(r"if \(i >= 0 && i < (\d+)\) \{")
    s_at = need(r"const unsigned short\* s = X \+ (.+?);")
    hk = re.findall(r"h\[(\d)\] = s\[(\d)\];", src)
    t_at = need(r"T\[(.+?)\] = make_uint4\(h\[0\]")
    tb_m = need(r"const unsigned tb = \(unsigned\)__cvta_generic_to_shared\(sparsert_tile\) \+ "
                r"16u \* \(j < (\d+) \? j : (\d+)\);")
    act_m = need(r"const bool act = lane < (\d+);")
    o_m = need(r"const int o = row \* PIXELS \+ j \* (\d+);")
    assert "(ex[0] >> 12) & ~15u" in src
    assert re.search(r'prmt\.b32 %0, %1, %2, %3;" : "=r"\(p\) : "r"\(v\[0\]\.w\), "r"\(0u\), '
                     r'"r"\(ex\[0\]\)', src)
    masks = re.findall(r"__shfl_xor_sync\(0xffffffffu, a0, (\d+)\)", src)
    assert masks == ["8", "16"], masks
    stores = re.findall(r"y\[o \+ (\d+)\] = \(unsigned short\)\(a(\d)( >> 16)?\);", src)
    assert len(stores) == W
    # --- tables ---
    tab = tables(ir)
    work = tab["sparsert_work"]
    rows_t = tab["sparsert_rows"].reshape(-1, 3)
    ent = tab["sparsert_ent"].astype(np.int64) & M32
    bias_w = tab.get("sparsert_bias")
    xb = np.asarray(x, dtype=np.float16).ravel().view(np.uint16).astype(np.int64)
    rb = (None if res is None else
          np.asarray(res, dtype=np.float16).ravel().view(np.uint16).astype(np.int64))
    out = np.full(g.output_elems, 0xFFFF, dtype=np.int64)     # poisoned (NaN)
    written = np.zeros(g.output_elems, dtype=np.int64)
    for image in range(ir.grid[1]):
        for block in range(ir.grid[0]):
            # shared memory in halves
            sm = np.zeros(lay.halves + lay.raw, dtype=np.int64)
            xs = xb[image * C * hw:(image + 1) * C * hw]
            for i in range(pieces):
                sm[raw_at + 8 * i: raw_at + 8 * i + 8] = xs[8 * i: 8 * i + 8]
            X = raw_at
            sm[0:8] = 0
            for q in range(fill_n):
                c, i = cexpr(ci[1], q=q), cexpr(ci[2], q=q)
                h = [0] * 8
                if 0 <= i < int(cond[1]):
                    s = X + cexpr(s_at[1], c=c, i=i)
                    for dst, k in hk:
                        h[int(dst)] = int(sm[s + int(k)])
                v = cexpr(t_at[1], c=c, i=i)
                assert 0 <= v and 8 * v + 8 <= lay.halves
                sm[8 * v: 8 * v + 8] = h
            words = sm[0:lay.halves:2] | sm[1:lay.halves:2] << 16     # tile as 32-bit words
            for wy in range(ir.warps):
                wid = block * ir.warps + wy
                for r in range(work[wid], work[wid + 1]):
                    row, lo, end = (int(v) for v in rows_t[r])
                    acc = np.zeros((32, 4), dtype=np.int64)
                    for lane in range(32):
                        j, q = lane & 7, lane >> 3
                        tb = 16 * (j if j < int(tb_m[1]) else int(tb_m[2]))
                        for e in range(lo, end, 32):
                            n = min(32, end - e)
                            idx = ([e + q + 4 * k for k in range(8)] if n == 32 else
                                   [e + i + q + 4 * k for i in range(0, n, 8) for k in range(2)])
                            for ei in idx:
                                ex, ew = int(ent[2 * ei]), int(ent[2 * ei + 1])
                                addr = (tb + ((ex >> 12) & ~15 & M32)) & M32
                                assert addr % 16 == 0 and addr + 16 <= 2 * lay.halves, addr
                                v4 = [int(words[addr // 4 + k]) for k in range(4)] + [0]
                                for k in range(4):
                                    p = prmt(v4[k], v4[k + 1], ex)
                                    acc[lane, k] = hfma2(p, ew, int(acc[lane, k]))
                    for m in (8, 16):
                        prev = acc.copy()
                        for lane in range(32):
                            for k in range(4):
                                acc[lane, k] = hadd2(int(prev[lane, k]), int(prev[lane ^ m, k]))
                    for lane in range(int(act_m[1])):
                        j = lane & 7
                        o = row * g.out_pixels + j * int(o_m[1])
                        a = [int(v) for v in acc[lane]]
                        if bias_w is not None:
                            b = int(bias_w[row]) & M32
                            a = [hadd2(v, b) for v in a]
                        if rb is not None:
                            base = image * g.out_channels * hw + o
                            for k in range(4):
                                if 2 * k >= W:
                                    continue
                                wv = int(rb[base + 2 * k]) | (
                                    int(rb[base + 2 * k + 1]) << 16 if 2 * k + 1 < W else 0)
                                a[k] = hadd2(a[k], wv)
                        if ir.activation in ("relu", "relu6"):
                            a = [hmax2(v, 0) for v in a]
                        if ir.activation == "relu6":
                            six = bits(f16(6.0)) * 0x10001
                            a = [hmin2(v, six) for v in a]
                        assert ir.activation in ("none", "relu", "relu6")
                        for ow, k, hi in stores:
                            at = image * g.out_channels * hw + o + int(ow)
                            out[at] = (a[int(k)] >> 16 if hi else a[int(k)]) & 0xFFFF
                            written[at] += 1
    assert np.all(written == 1), "outputs not written exactly once"
    return out.astype(np.uint16).view(np.float16).astype(np.float64)


# ---------------------------------------------------------------------------------------------
def _plan(shape, density, params, epilogue=Epilogue(), seed=0, empty_row=False):
    b, c, h, w, m = shape
    rng = np.random.default_rng(seed)
    wt = rng.standard_normal((m, c, 3, 3)).astype(np.float32)
    wt[rng.random(wt.shape) > density] = 0
    if empty_row:
        wt[m - 1] = 0
    return plan_weight(Geometry(b, c, h, w, m, 3, 1, 1), wt,
                       StreamParams(stage="tile", vector_width=8, **params), epilogue,
                       precision="fp16")


def _epilogue(m, act, bias, residual, seed=0):
    rng = np.random.default_rng(seed + 99)
    return Epilogue(bias=tuple(rng.uniform(-1, 1, m)) if bias else None, activation=act,
                    residual=residual)


CASES = [  # (shape (B, C, H, W, M), density, params, epilogue args, arch, dependent launch)
    ((1, 8, 1, 1, 4), 0.5, dict(warps=1), ("none", False, False), "sm_90", False),
    ((2, 8, 8, 7, 5), 0.4, dict(warps=3, rows_per_worker=1), ("relu", True, True), "sm_90", True),
    ((1, 8, 7, 7, 6), 0.4, dict(warps=2, rows_per_worker=2), ("relu6", True, True), "sm_90", False),
    ((3, 4, 3, 2, 5), 0.6, dict(warps=3, rows_per_worker=1), ("none", False, True), "sm_80", False),
    ((1, 8, 2, 5, 7), 0.4, dict(warps=1, rows_per_worker=4), ("relu", True, False), "sm_90", True),
    ((1, 3, 8, 1, 4), 0.8, dict(warps=4, rows_per_worker=1), ("none", True, False), "sm_90", False),
    ((2, 5, 4, 2, 6), 0.8, dict(warps=2, rows_per_worker=3), ("relu6", False, True), "sm_86", False),
    ((2, 96, 4, 4, 8), 0.6, dict(warps=3, rows_per_worker=1), ("relu", True, True), "sm_90", False),
    ((1, 8, 6, 3, 9), 0.4, dict(warps=4, rows_per_worker=2), ("none", True, True), "sm_90", True),
    # one block, 4 rows of ~1850 entries: past the 40 KB staging limit, so the warps stream them
    ((1, 512, 1, 2, 4), 0.4, dict(warps=1, rows_per_worker=4), ("relu", True, True), "sm_90", True),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_emulated_kernel_matches_interpreter_bitwise(case):
    shape, density, params, (act, bias, residual), arch, dependent = CASES[case]
    plan = _plan(shape, density, params, _epilogue(shape[-1], act, bias, residual, case),
                 seed=case, empty_row=True)
    if shape[1] == 512:
        assert lowered(plan, arch).staged == 0      # the streamed-entries path
    rng = np.random.default_rng(case)
    x, res = plan_inputs(plan, rng)
    ref = execute(plan, x, res)
    got = emulate(plan, x, res, arch=arch, dependent=dependent)
    assert np.array_equal(got, ref) and np.array_equal(np.signbit(got), np.signbit(ref))


def test_prmt_ignores_the_selector_words_upper_half():
    """The entry word (vector << 16 | selector) is the PRMT's c operand as is: PTX's generic
    mode reads c[15:0] only, so the vector index above it does not change the permute."""
    a, b = 0x33332222, 0x55554444
    for sel, want in ((0x3210, a), (0x5432, 0x44443333), (0x7654, b)):
        assert prmt(a, b, sel) == want
        assert prmt(a, b, 0x7FFF0000 | sel) == want


def test_cache_keys_save_load_and_tamper(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 16, 3, 3)).astype(np.float32)
    w[rng.random(w.shape) > 0.3] = 0
    epi = {"bias": np.linspace(-1, 1, 12), "activation": "relu6", "residual": True}
    kernels = {v: sparsert_cli.compile_kernel(
        w, op="conv", input_shape=(2, 16, 7, 7), padding=1, dtype="fp16", tuned=False,
        cache=None, epilogue=epi, plan=StreamParams(stage="tile", vector_width=v, warps=2,
                                                    rows_per_worker=2)) for v in (8, 2, 1)}
    keys = {_key(k.plan, k.emitter, k.arch) for k in kernels.values()}
    assert len(keys) == 3 and len({k.entry for k in kernels.values()}) == 3
    k = kernels[8].verify()
    assert k.verified["ok"]
    k.save(tmp_path / "k")
    back = sparsert_cli.Kernel.from_dir(tmp_path / "k")
    assert back.entry == k.entry and back.plan_params == k.plan_params
    assert back.dynamic_shared_bytes == k.dynamic_shared_bytes == tile_layout(
        k.geometry, 8).bytes
    x, res = back.random_inputs(rng)
    assert np.array_equal(back.run_cpu(x, res), k.run_cpu(x, res))
    ir = lowered(k.plan, k.arch)
    src = (tmp_path / "k" / json.loads((tmp_path / "k" / "manifest.json").read_text())["source"]
           ).read_text()
    check_printed(ir, src)
    for a, b in (('"r"(0u), "r"(ex[0])', '"r"(v[0].x), "r"(ex[0])'), ("& ~15u", "& ~7u"),
                 ("a0, 8)", "a0, 4)"), ("lane < 7;", "lane < 8;")):
        assert a in src
        with pytest.raises(Exception, match="differs|not what its IR prints"):
            check_printed(ir, src.replace(a, b, 1))


def test_arch_handling():
    # staging cleared where the block cannot hold image + entries (sm_86), kept on sm_90
    plan = _plan((1, 256, 7, 7, 16), 0.26, dict(warps=8, rows_per_worker=1))
    assert plan.staged_entries > 0
    assert lowered(plan, "sm_90").staged == plan.staged_entries
    assert lowered(plan, "sm_86").staged == 0
    # an image too large for the arch: explicit plans refused in one line
    big = _plan((1, 512, 7, 7, 8), 0.1, dict(warps=8, rows_per_worker=1))
    for arch in ("sm_86", "sm_89"):
        with pytest.raises(UserError, match=f"a block of {arch} gets at most 99 KB"):
            lowered(big, arch)
    lowered(big, "sm_80")
    assert not fits_arch(big.geometry, big.params, "sm_86")
    assert fits_arch(big.geometry, big.params, "sm_80")


# ---- the review's findings (fixed) -------------------------------------------------------------
def _c5():
    return sparsert_cli.problem_layer("rn50_c5_3x3", 0.9, precision="fp16")


# review finding F1, fixed in session 25
def test_tuner_candidates_fit_the_target_arch():
    from sparsert_cli.jobs import case_candidates
    from sparsert_cli.patterns import to_csr

    layer = _c5()
    try:
        cands = case_candidates(layer.geometry, to_csr(layer.weight), "fp16", 16, arch="sm_86")
    except TypeError as exc:
        pytest.fail(f"case_candidates takes no arch ({exc})")
    for (family, _), params in cands:
        if family == "streamed":
            assert fits_arch(layer.geometry, params, "sm_86"), params.name()


# review finding F2, fixed in session 25
def test_tuned_winner_that_does_not_fit_the_target_gives_way(tmp_path):
    from sparsert_cli.build import code_version
    from sparsert_cli.families import get_family
    from sparsert_cli.patterns import pattern_hash
    from sparsert_cli.tune import TunedDB

    layer = _c5()
    gpu = "NVIDIA H100 80GB HBM3"
    db = TunedDB(tmp_path / "tuned.json")
    db.record(pattern_hash(layer.weight), layer.geometry, gpu, "fp16",
              StreamParams(32, 8, 8, 1, 4, "tile"), {"us": 8.0}, "streamed",
              code_version(get_family("streamed"), "ptx"))
    (planned, _), = plan_layers([layer], db, gpu, "ptx", arch="sm_86")
    assert fits_arch(layer.geometry, planned.params, "sm_86"), planned.params.name()


# review finding F3, fixed in session 25
def test_explicit_tile_vector_width_8_on_a_wide_image():
    w = np.random.default_rng(0).standard_normal((16, 32, 3, 3)).astype(np.float32)
    with pytest.raises(UserError) as info:
        plan_weight(Geometry(1, 32, 14, 14, 16, 3, 1, 1), w,
                    StreamParams(stage="tile", vector_width=8), precision="fp16")
    assert "vector_width 2" in info.value.message, info.value.message
