"""bf16 kernels without a GPU: bf16 storage (x, y, residual) with fp32 sums. The rounding helpers
against an independent float32 bit-level rounding, the interpreter's roundings and epilogue order,
every kernel shape class against float64 within the bf16 tolerance with both printers parsed
back, wrong conversions caught, the PTX/CUDA compiled for sm_80 and sm_90, the range check, and
the config / CLI / API surface."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_helpers import run_main
from sparsert_cli import storage
from sparsert_cli.benchmark import _baseline_specs, floor_us
from sparsert_cli.build import build_kernel, check_emitter, default_params, make_plan
from sparsert_cli.config import config_from_dict
from sparsert_cli.errors import UserError
from sparsert_cli.families.immediate import PlanParams, build_plan, lower
from sparsert_cli.interp import PlanExecutionError, execute
from sparsert_cli.patterns import pruned_weights, to_csr, uniform_weights
from sparsert_cli.problem_shape import Epilogue, Geometry, precision_label
from sparsert_cli.problems import Problem
from sparsert_cli.reference import check, tolerance
from sparsert_cli.render import PrintedMismatch, cuda, parse_cuda, ptx
from sparsert_cli.render.parse_ptx import check_printed

bf16 = storage.bf16


def _rne_float32_bits(values: np.ndarray) -> np.ndarray:
    """Independent reference: round float32 to bf16 on the bits (add 0x7FFF + lsb, truncate)."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


def _plan(weight, geometry, params=PlanParams(), epilogue=Epilogue()):
    return build_plan(to_csr(weight), geometry, params, epilogue, "bf16")


# ------------------------------------------------------------------ rounding


def test_bf16_rounding_matches_the_bit_level_rounding_of_float32():
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(200_000) * 10.0 ** rng.integers(-44, 38, 200_000)).astype(
        np.float32)
    assert np.array_equal(bf16(values), _rne_float32_bits(values))


@pytest.mark.parametrize("value, want", [
    (1 + 2 ** -8, 1.0),                          # a tie: to the even neighbour
    (1 + 3 * 2 ** -8, 1 + 2 ** -6),
    (storage.BF16_MAX, storage.BF16_MAX),
    (3.4e38, np.inf), (-3.4e38, -np.inf),       # past BF16_MAX + half a spacing
    (2.0 ** -133, 2.0 ** -133), (2.0 ** -134, 0.0), (3 * 2.0 ** -135, 2.0 ** -133),
    (2.0 ** -127 + 2.0 ** -133, 2.0 ** -127 + 2.0 ** -133),   # subnormal: fp32's exponent range
])
def test_bf16_rounding_edges(value, want):
    assert bf16(value) == want


def test_bf16_bits_round_trip_and_device_encoding():
    values = np.array([0.0, -1.5, 1 / 3, 3.0e38, 2.0 ** -130])
    bits = storage.bf16_bits(values)
    assert bits.dtype == np.uint16 and bits[1] == 0xBFC0
    assert np.array_equal(storage.from_bf16_bits(bits), bf16(values))
    assert np.array_equal(storage.decode(storage.encode(values, "bf16"), "bf16"), bf16(values))
    assert np.isnan(storage.decode(np.full(3, 0xFFFF, np.uint16), "bf16")).all()   # poison
    assert storage.device_type("bf16") is np.uint16


# ------------------------------------------------------------------ interpreter


def test_bf16_sums_are_fp32_and_the_epilogue_rounds_once_at_the_store():
    """256 + 1 + 1: summed in bf16 each +1 would be lost (spacing 2 at 256); fp32 sums, bias and
    residual added in fp32, then one rounding: 256 + 1 + 1 + 1 (bias) + 1 (residual) = 260."""
    geometry = Geometry(1, 3, 1, 2, 1)
    weight = np.array([[256.0, 1.0, 1.0]], dtype=np.float32).reshape(1, 3, 1, 1)
    plan = _plan(weight, geometry, PlanParams(vector_width=2),
                 Epilogue(bias=(1.0,), residual=True))
    assert plan.precision == "bf16" and plan.accumulate == "fp32"
    out = execute(plan, np.ones((1, 3, 1, 2)), np.ones(2))
    assert np.all(out == 260.0)
    out = execute(plan, np.ones((1, 3, 1, 2)), np.full(2, 0.5))   # 259.5: rounds to 260
    assert np.all(out == 260.0)


def test_bf16_weights_are_fp32_immediates_and_outputs_bf16_values():
    geometry = Geometry(1, 1, 1, 8, 1)
    weight = np.full((1, 1, 1, 1), 1 / 3, dtype=np.float32)
    out = execute(_plan(weight, geometry, PlanParams(vector_width=8)), np.ones((1, 1, 1, 8)))
    assert np.all(out == bf16(np.float32(1 / 3)))     # the fp32 weight, rounded once


def test_bf16_plan_rejects_inputs_that_are_not_bf16_values():
    plan = _plan(np.ones((2, 4, 1, 1), dtype=np.float32), Geometry(1, 4, 1, 8, 2))
    with pytest.raises(PlanExecutionError, match="not bf16 values"):
        execute(plan, np.full((1, 4, 1, 8), 1 + 2 ** -10))     # an fp16 value, not a bf16 one


def _check_bf16(plan, weight, rng, gen):
    geo = plan.geometry
    x, res = gen.random_inputs(geo, plan.epilogue.residual, rng)
    x, res = bf16(x), (bf16(res) if res is not None else None)
    ir = lower(plan)
    out = execute(ir, x, res)
    check_printed(ir, ptx.print_ptx(ir))                  # what runs is what was executed
    parse_cuda.check_printed(ir, cuda.print_cuda(ir))
    ref, mag = gen.reference_for(plan, weight, x, res)
    ok, err, message = check(out, ref, mag, "bf16", geo.taps)
    assert ok, (plan.params.name(), message)
    assert np.array_equal(out, bf16(out)), "bf16 outputs must be bf16 values"
    return x, res, out, ref, mag


SHAPES = {   # every kernel shape class, each with a part of the epilogue
    "gemm": (Geometry(1, 48, 1, 80, 24), PlanParams(vector_width=8, k_split=2),
             Epilogue()),
    "conv1x1_bias": (Geometry(1, 32, 6, 8, 20), PlanParams(vector_width=4, rows_per_group=3),
                     Epilogue(bias=tuple(np.linspace(-2, 2, 20)))),
    "conv3x3_pad_stride2": (Geometry(1, 6, 9, 9, 10, kernel=3, stride=2, padding=1),
                            PlanParams(rows_per_group=4, k_split=3), Epilogue()),
    "conv3x3_batch3": (Geometry(3, 5, 7, 6, 8, kernel=3, padding=1), PlanParams(col_threads=32),
                       Epilogue(activation="relu")),
    "residual": (Geometry(2, 16, 4, 8, 12), PlanParams(vector_width=2),
                 Epilogue(residual=True)),
    "relu6_all": (Geometry(1, 24, 8, 8, 16), PlanParams(vector_width=8),
                  Epilogue(bias=tuple([0.5] * 16), activation="relu6", residual=True)),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_shape_class_matches_float64_within_bf16_tolerance(gen, name):
    geometry, params, epilogue = SHAPES[name]
    rng = np.random.default_rng(len(name))
    weight = gen.conv_weight("random", geometry, 0.3, rng)
    x, res, out, ref, mag = _check_bf16(_plan(weight, geometry, params, epilogue), weight, rng,
                                        gen)
    if epilogue.activation == "relu6":
        assert out.max() == 6.0 and out.min() == 0.0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_bf16_plans_match_float64_within_bf16_tolerance(gen, data):
    geometry = gen.draw_geometry(data)
    kind = data.draw(st.sampled_from(gen.PATTERN_KINDS), label="pattern")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    weight = gen.conv_weight(kind, geometry, data.draw(st.sampled_from([0.05, 0.3]), "d"), rng)
    params = gen.draw_params(data)
    params = PlanParams(**{**params.__dict__,
                           "vector_width": data.draw(st.sampled_from([1, 2, 4, 8]), label="V")})
    try:
        plan = _plan(weight, geometry, params,
                     gen.draw_epilogue(data, geometry.out_channels, rng))
    except UserError:     # e.g. k_split partials beyond shared memory
        return
    _check_bf16(plan, weight, rng, gen)


def test_bf16_tolerance_catches_data_read_as_fp16(gen):
    """A kernel converting bf16 bits as if they were fp16 (the wrong cvt) computes with other
    numbers entirely: the bf16 check fails it; the right conversion passes."""
    geometry = Geometry(1, 32, 1, 64, 16)
    weight = uniform_weights((16, 32, 1, 1), 0.5, 4)
    rng = np.random.default_rng(0)
    x, *_ = _check_bf16(_plan(weight, geometry, PlanParams(vector_width=8)), weight, rng, gen)
    as_fp16 = storage.bf16_bits(x).view(np.float16).astype(np.float64)
    fp32_plan = build_plan(to_csr(weight), geometry, PlanParams(vector_width=8))
    wrong = bf16(execute(fp32_plan, as_fp16))
    ref, mag = gen.reference_for(fp32_plan, weight, x, None)
    assert not check(wrong, ref, mag, "bf16", 32)[0]


def test_bf16_tolerance_stays_tight_at_large_k(gen):
    """K = 4608 (a 3x3 layer over 512 channels): bf16 outputs of fp32 sums pass with the bound
    2^-7 + 8 sqrt(K) 2^-23 of sum |w||x|; one weight's sign error and an all-zero output fail
    (8 sqrt(K) 2^-7, fp16's form, would be 4.2x the magnitude and pass both)."""
    geometry = Geometry(1, 4608, 1, 16, 4)
    rng = np.random.default_rng(5)
    weight = uniform_weights((4, 4608, 1, 1), 0.9, 5)
    x, _, out, ref, mag = _check_bf16(_plan(weight, geometry, PlanParams(vector_width=8)),
                                      weight, rng, gen)
    assert tolerance("bf16", 4608) == pytest.approx(2.0 ** -7 + 8 * np.sqrt(4608) * 2.0 ** -23)
    assert not check(np.zeros_like(out), ref, mag, "bf16", 4608)[0]
    wrong = weight.copy()
    row, col = np.unravel_index(np.argmax(np.abs(weight[:, :, 0, 0])), (4, 4608))
    wrong[row, col] *= -1.0
    out = execute(_plan(wrong, geometry, PlanParams(vector_width=8)), x)
    assert not check(out, ref, mag, "bf16", 4608)[0]


def test_bf16_tolerance_catches_a_wrong_weight(gen):
    geometry = Geometry(1, 32, 1, 64, 16)
    weight = uniform_weights((16, 32, 1, 1), 0.5, 4)
    rng = np.random.default_rng(0)
    x, *_ = _check_bf16(_plan(weight, geometry, PlanParams(vector_width=8)), weight, rng, gen)
    wrong = weight.copy()
    row, col = np.argwhere(weight[:, :, 0, 0] != 0)[0]
    wrong[row, col] *= -1.0
    out = execute(_plan(wrong, geometry, PlanParams(vector_width=8)), x)
    ref, mag = gen.reference_for(_plan(weight, geometry), weight, x, None)
    assert not check(out, ref, mag, "bf16", 32)[0]


# ------------------------------------------------------------------ printers and cubins


@pytest.mark.parametrize("rule, replacement, width", [
    ("widen", "cvt.f32.f16 {dst}, {src};", 1),               # single columns: cvt.f32.bf16
    ("widen_lo", "shl.b32 {dst}, {src}, 8;", 8),             # pairs: one bit operation each
    ("widen_lo", "and.b32 {dst}, {src}, 0xFFFF0000;", 8),    # the high column for the low one
    ("widen_hi", "shl.b32 {dst}, {src}, 16;", 8),
    ("widen_hi", "and.b32 {dst}, {src}, 0x0000FFFF;", 8),
    ("pack2", "cvt.rn.f16x2.f32 {dst}, {hi}, {lo};", 8),
    ("pack2", "cvt.rn.{ty}x2.f32 {dst}, {lo}, {hi};", 8),   # columns swapped in the pair
])
def test_a_wrong_ptx_conversion_is_caught(monkeypatch, rule, replacement, width):
    plan = _plan(uniform_weights((8, 16, 1, 1), 0.5, 1), Geometry(1, 16, 4, 8, 8),
                 PlanParams(vector_width=width))
    ir = lower(plan)
    check_printed(ir, ptx.print_ptx(ir))
    monkeypatch.setitem(ptx.RULES, rule, replacement)
    with pytest.raises(PrintedMismatch, match="printed PTX differs"):
        check_printed(ir, ptx.print_ptx(ir))


@pytest.mark.parametrize("name", ["h2f", "f2h2", "f2h"])
def test_a_wrong_cuda_conversion_helper_is_caught(monkeypatch, name):
    width = 1 if name == "f2h" else 2
    plan = _plan(uniform_weights((4, 8, 1, 1), 0.5, 1), Geometry(1, 8, 1, 16, 4),
                 PlanParams(vector_width=width))
    ir = lower(plan)
    parse_cuda.check_printed(ir, cuda.print_cuda(ir))
    monkeypatch.setitem(cuda.CONVERSIONS, name, cuda.CONVERSIONS[name].replace("{ty}", "f16"))
    with pytest.raises(PrintedMismatch, match=f"sparsert_{name} must be one"):
        parse_cuda.check_printed(ir, cuda.print_cuda(ir))


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("params", [PlanParams(vector_width=8, k_split=2),
                                    PlanParams(vector_width=1, rows_per_group=5, k_split=3)],
                         ids=lambda p: p.name())
@pytest.mark.parametrize("emitter", ["ptx", "cuda"])
def test_bf16_kernels_compile_without_spills(isolated_cache, arch, params, emitter):
    problem = Problem("g", "gemm", 13, 24, height=1, width=48)
    plan = make_plan(problem, uniform_weights(problem.weight_shape, 0.7, 2), params,
                     Epilogue(tuple([0.5] * 13), "relu6", residual=True), precision="bf16")
    build, source = build_kernel(plan, emitter, arch, keep_source=True)
    assert build.resources.spills == 0
    assert "f16 " not in source.replace("bf16 ", "")
    width = plan.vector_width
    if emitter == "ptx" and width > 1:     # pairs widen by bit operations, single columns by cvt
        assert "shl.b32" in source and "0xFFFF0000" in source and "cvt.f32.bf16" not in source
    else:
        assert "cvt.f32.bf16" in source
    if emitter == "ptx":
        assert ("ld.global.nc.v4.b32" if width == 8 else "ld.global.nc.b16") in source
        assert ("cvt.rn.bf16x2.f32" if width > 1 else "cvt.rn.bf16.f32") in source
        assert "fma.rn.f32" in source
    else:
        assert "sparsert_hfma" not in source         # fp32 sums: no half arithmetic helpers


def test_bf16_needs_sm_80_and_has_default_plans_like_fp16acc32():
    for emitter in ("ptx", "cuda"):
        check_emitter(emitter, "bf16", "sm_80")
        with pytest.raises(UserError, match="bf16 kernels need sm_80 or newer, not sm_75"):
            check_emitter(emitter, "bf16", "sm_75")
    geometry = Geometry(1, 64, 14, 14, 64)
    assert default_params(geometry, 400, precision="bf16") == default_params(
        geometry, 400, precision="fp16acc32")


# ------------------------------------------------------------------ range


def test_bf16_weights_and_bias_that_overflow_are_refused_tiny_ones_kept():
    problem = Problem("g", "gemm", 2, 2, height=1, width=8)
    weight = np.array([[3.4e38, 0.0], [1.0, 1e-40]], dtype=np.float32)
    with pytest.raises(UserError, match=r"weights: 1 value\(s\) overflow bf16.*largest 3\.4e\+38"):
        make_plan(problem, weight, precision="bf16")
    weight[0, 0] = 3.38e38              # below BF16_MAX: fine, and so is a float32 subnormal
    assert make_plan(problem, weight, precision="bf16").nnz == 3
    with pytest.raises(UserError, match=r"bias: 1 value\(s\) overflow bf16"):
        make_plan(problem, weight, epilogue=Epilogue(bias=(0.0, -3.4e38)), precision="bf16")
    assert make_plan(problem, np.array([[3.4e38, 0], [0, 1]], np.float32)).nnz == 2   # fp32


def test_gen_bf16_overflow_is_one_line_naming_the_file(tmp_path, capsys, isolated_cache):
    path = tmp_path / "w.npy"
    np.save(path, np.array([[1.0, 3.4e38], [0.5, 0.0]], dtype=np.float32))
    out = tmp_path / "k"
    code, stdout, err = run_main(["gen", "--pattern", str(path), "--n", "8", "--dtype", "bf16",
                                  "-o", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "w.npy: weights: 1 value(s) overflow bf16" in err and not out.exists()


# ------------------------------------------------------------------ config, CLI, API


def test_config_dtype_bf16_sums_in_fp32():
    base = {"problems": ["mbv1_pw3"], "sparsity": [0.9]}
    config = config_from_dict({**base, "dtype": "bf16"}, "c.yaml")
    assert (config.dtype, config.accumulate, config.precision) == ("bf16", "fp32", "bf16")
    with pytest.raises(UserError, match=r"^c.yaml: 'accumulate: fp16' needs 'dtype: fp16' "
                                        r"\(bf16 data is summed in fp32\)$"):
        config_from_dict({**base, "dtype": "bf16", "accumulate": "fp16"}, "c.yaml")
    with pytest.raises(UserError, match="no kernel stores bf16 and accumulates in fp16"):
        precision_label("bf16", "fp16")
    assert precision_label("bf16") == "bf16" and precision_label("fp16") == "fp16"


def test_shipped_paper20_bf16_config(repo):
    from sparsert_cli.config import load_config

    bf, fp16 = (load_config(repo / "configs" / f"paper20-{p}.yaml") for p in ("bf16", "fp16"))
    assert bf.precision == "bf16" and bf.name == "paper20-bf16"
    assert bf.problems == fp16.problems and bf.sparsities == fp16.sparsities


def test_bench_compile_only_bf16_verifies_on_the_cpu(repo, tmp_path, capsys, isolated_cache,
                                                     wide_terminal):
    out = tmp_path / "r.json"
    code, _, err = run_main(["bench", str(repo / "configs" / "ci.yaml"), "--dtype", "bf16",
                             "--compile-only", "--out", str(out)], capsys)
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert (doc["config"]["dtype"], doc["config"]["accumulate"]) == ("bf16", "fp32")
    assert doc["precision"] == "bf16"
    for case in doc["cases"]:
        assert case["verify_cpu"]["ok"], case
        assert case["compile"]["spill_bytes"] == 0
    code, _, err = run_main(["bench", str(repo / "configs" / "ci.yaml"), "--dtype", "bf16",
                             "--accumulate", "fp16", "--compile-only"], capsys)
    assert code == 2 and "--accumulate fp16 needs --dtype fp16 (bf16 data" in err


@pytest.mark.parametrize("emitter", ["ptx", "cuda"])
def test_gen_bf16_writes_a_bfloat16_manifest(tmp_path, capsys, isolated_cache, emitter):
    path = tmp_path / "w.npy"
    np.save(path, uniform_weights((16, 32), 0.8, 0))
    out = tmp_path / "k"
    code, _, err = run_main(["gen", "--pattern", str(path), "--n", "64", "--dtype", "bf16",
                             "--plan", "vector_width=4",        # widened pairs to print
                             "--emit", emitter, "-o", str(out), "--json"], capsys)
    assert code == 0, err
    doc = json.loads((out / "manifest.json").read_text())
    assert (doc["dtype"], doc["accumulate"], doc["precision"]) == ("bf16", "fp32", "bf16")
    assert {a["dtype"] for a in doc["arguments"]} == {"bfloat16"}
    source = (out / f"kernel.{'ptx' if emitter == 'ptx' else 'cu'}").read_text()
    # the PTX printer widens bf16 pairs with shl/and, the CUDA printer with cvt.f32.bf16
    assert ("and.b32" if emitter == "ptx" else "cvt.f32.bf16") in source
    from sparsert_cli.api import Kernel

    loaded = Kernel.from_dir(out)
    assert loaded.precision == "bf16" and loaded.verify_cpu()["ok"]


def test_api_bf16_kernel_runs_and_checks_on_the_cpu():
    import sparsert_cli as sparsert

    w = pruned_weights((8, 16, 3, 3), 0.7, 3)
    kernel = sparsert.compile_kernel(w, op="conv", input_shape=(2, 16, 6, 6), padding=1,
                                     dtype="bf16", epilogue={"residual": True}, cache=None,
                                     arch="sm_90", tuned=False)
    assert kernel.precision == "bf16" and kernel.storage is np.uint16
    x, res = kernel.random_inputs(np.random.default_rng(1))
    assert np.array_equal(x, bf16(x)) and np.array_equal(res, bf16(res))
    y = kernel.run_cpu(x * (1 + 2.0 ** -10), res)   # rounded to bf16 first, as the kernel reads
    assert np.array_equal(y, kernel.run_cpu(x, res)) and np.array_equal(y, bf16(y))
    assert kernel.check(y, x, res)[0] and kernel.verify_cpu()["ok"]


def test_bf16_layers_add_bf16_baselines_and_count_two_byte_floors():
    import sparsert_cli as sparsert

    w = uniform_weights((8, 16, 1, 1), 0.5, 0)
    names, kernels = {}, {}
    for dtype in ("bf16", "fp16"):
        kernel = kernels[dtype] = sparsert.compile_kernel(
            w, op="conv", input_shape=(1, 16, 4, 8), dtype=dtype, cache=None, arch="sm_90",
            tuned=False)
        specs = _baseline_specs(kernel, kernel.random_inputs(np.random.default_rng(0))[0])
        names[dtype] = {name: tol for name, _, _, _, tol in specs}
    assert names["bf16"]["cublas_bf16"] == names["bf16"]["cudnn_bf16"] == "bf16"
    assert not {"cublas_bf16", "cudnn_bf16"} & set(names["fp16"])
    floors = {"fp32_gflops": 1e9, "bandwidth_gbs": 1.0, "launch_us": 0.0}
    assert floor_us(kernels["bf16"], floors)["bytes_us"] == pytest.approx(2 * (512 + 256) / 1e3)


def test_sparsify_dry_run_in_bf16_verifies_conv_and_linear():
    torch = pytest.importorskip("torch")
    from torch import nn

    from sparsert_cli.torch import prune_, sparsify_

    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                          nn.ReLU(), nn.Conv2d(16, 16, 1, stride=2), nn.Flatten(),
                          nn.Linear(16 * 4 * 4, 10)).eval()
    prune_(model, 0.8)
    x = torch.randn(1, 8, 8, 8)
    rows = sparsify_(model.to(torch.bfloat16), (x.to(torch.bfloat16),), dtype="bf16",
                     dry_run=True, tuned=False, cache=False)
    assert [r["reason"] for r in rows] == ["dry run: verified"] * 3
    assert all(r["max_rel_err"] < 2e-2 for r in rows)


# ------------------------------------------------------------------ the host side of a GPU run


class _Buffer:
    def __init__(self, data: bytes):
        self.data, self.ptr = bytearray(data), id(self)

    def free(self) -> None:
        pass


class _FakeGpu:
    """Device memory as bytearrays: what benchmark_layer uploads and downloads, byte for byte."""

    device, stream = 0, None

    def __init__(self):
        self.buffers = {}

    def _keep(self, buf):
        self.buffers[buf.ptr] = buf
        return buf

    def alloc(self, nbytes):
        return self._keep(_Buffer(bytes(nbytes)))

    def upload(self, array):
        return self._keep(_Buffer(np.ascontiguousarray(array).tobytes()))

    def download(self, buf, shape, dtype):
        return np.frombuffer(bytes(buf.data), dtype=dtype).reshape(shape)

    def poison(self, buf):
        buf.data[:] = b"\xff" * len(buf.data)

    def synchronize(self):
        pass


class _Device:
    """A loaded kernel that runs the CPU interpreter on the bytes it is given: bf16 bits in,
    bits of `written` ("bf16", or "fp16" for a kernel that packs with the wrong conversion) out."""

    registers = local_bytes = 0

    def __init__(self, kernel, gpu, written):
        self.kernel, self.gpu, self.written = kernel, gpu, written

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self, ptr, shape):
        bits = np.frombuffer(bytes(self.gpu.buffers[ptr].data), np.uint16)
        return storage.decode(bits, "bf16").reshape(shape)

    def launch(self, stream, x_ptr, y_ptr, residual_ptr=None):
        k = self.kernel
        res = None if residual_ptr is None else self.read(residual_ptr, k.output_shape)
        y = k.run_cpu(self.read(x_ptr, k.input_shape), res)
        self.gpu.buffers[y_ptr].data[:] = storage.encode(y, self.written).tobytes()


@pytest.mark.parametrize("written, ok", [("bf16", True), ("fp16", False)])
def test_benchmark_layer_moves_bf16_bits_and_checks_them(monkeypatch, written, ok):
    import sparsert_cli as sparsert
    from sparsert_cli import benchmark
    from sparsert_cli.api import Kernel

    kernel = sparsert.compile_kernel(pruned_weights((8, 16, 1, 1), 0.6, 2), op="conv",
                                     input_shape=(1, 16, 4, 8), dtype="bf16", cache=None,
                                     arch="sm_90", tuned=False, epilogue={"residual": True})
    gpu = _FakeGpu()
    monkeypatch.setattr(Kernel, "to_device", lambda self, device=0: _Device(self, gpu, written))
    monkeypatch.setattr(benchmark, "time_enqueue", lambda *a, **k: {"median_us": 1.0})
    result = benchmark.benchmark_layer(gpu, kernel, baselines=False, seed=1)
    assert result["verify_gpu"]["ok"] is ok, result["verify_gpu"]
    assert ("sparsert" in result) is ok


def test_tuning_a_bf16_config_records_bf16_winners(tmp_path, repo):
    """The tuner's compile jobs, inputs and records carry the new precision label (keys keep
    their format; fake timings, one worker)."""
    from fake_measure import FakeMeasure

    from sparsert_cli.commands.bench import select
    from sparsert_cli.config import load_config
    from sparsert_cli.executors import run_jobs
    from sparsert_cli.executors.local import LocalExecutor
    from sparsert_cli.jobs import case_inputs, current_family, make_cases, winners
    from sparsert_cli.tunedb import TuneDB

    config = select(load_config(repo / "configs" / "ci.yaml"), ["ci_3x3_pad1"], ["0.8"], "bf16")
    cases, jobs = make_cases(config, 2)
    assert {c.precision for c in cases} == {"bf16"}
    x, res, ref, mag = case_inputs(cases[0])
    assert np.array_equal(x, bf16(x))
    executor = LocalExecutor([0], cache_root=str(tmp_path / "cache"), jobs=1,
                             measure=FakeMeasure(), job_timeout=120)
    family = current_family()
    with TuneDB(tmp_path / "t.sqlite") as db:
        stats = run_jobs(executor, lambda gpu: (cases, jobs), db, family)
        rows = db.rows()
        best = winners(cases, jobs, db, stats["gpu"], family)
    assert rows and {r["precision"] for r in rows} == {"bf16"} and all(r["verified"] for r in rows)
    assert [b["status"] for b in best] == ["ok"]
