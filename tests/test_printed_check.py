"""What the CPU check verifies is what runs: the printed PTX is parsed back into the kernel IR and
must equal the IR the interpreter executes. Each mutation below breaks one rule of the PTX
printer's table (a printer bug the interpreter alone cannot see, since it runs the IR) and must
be caught on a CPU box: by check_printed, by build_kernel and by `sparsert bench`."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from cli_helpers import run_main
from golden.cases import plans

from sparsert_cli import build as B
from sparsert_cli.families import lower
from sparsert_cli.interp import execute
from sparsert_cli.render import PrintedMismatch, cuda, parse_cuda, ptx
from sparsert_cli.render.parse_ptx import check_printed

PLANS = plans()


def _check(plan) -> None:
    ir = lower(plan)
    check_printed(ir, ptx.print_ptx(ir))


def _shifted(rule: str, field: str, by):
    """RULES[rule] with integer field `field` moved by `by(fields)`."""
    template = ptx.RULES[rule]
    return lambda **f: template.format(**{**f, field: f[field] + by(f)})


def _flip_sign(rule: str):
    """RULES[rule] with its fp32 immediate weight negated."""
    template = ptx.RULES[rule]

    def rule_fn(**f):
        bits = int(f["w"][2:], 16) ^ 0x80000000
        return template.format(**{**f, "w": f"0f{bits:08X}"})
    return rule_fn


def _flip_half_sign(rule: str):
    template = ptx.RULES[rule]
    return lambda **f: template.format(**{**f, "bits": f["bits"] ^ 0x8000})


CONV = "conv3x3_s2_p1_b2_epilogue"
MUTATIONS = {
    # (golden case, {rule: replacement}); row bytes of the conv output: 3*3 pixels x 4 bytes
    "store_to_next_row": (CONV, {"store": _shifted("store", "offset", lambda f: 9 * 4)}),
    "store_to_next_row_fp16_half2": (
        "fp16_1x1_half2", {"store": _shifted("store", "offset", lambda f: 64 * 2)}),
    "reduced_row_to_wrong_row_k_split": (
        "gemm_v4_k2", {"store": _shifted("store", "offset", lambda f: 96 * 4)}),
    "wrong_tap_offset": (CONV, {"load": _shifted("load", "offset", lambda f: 4)}),
    "wrong_tap_offset_funcs": ("gemm_funcs", {"load": _shifted("load", "offset", lambda f: 4)}),
    "bias_dropped": (CONV, {"step_bias": ""}),
    "relu_dropped": (CONV, {"step_max": ""}),
    "residual_dropped": (CONV, {"step_residual": ""}),
    "relu6_dropped_fp16": ("fp16_1x1_half2", {"step_min": ""}),
    "residual_dropped_fp16acc32": ("fp16_1x1_acc32", {"step_residual": ""}),
    "wrong_weight": (CONV, {"fma": _flip_sign("fma"), "mul_first": _flip_sign("mul_first")}),
    "wrong_weight_funcs": ("gemm_funcs", {"fma": _flip_sign("fma")}),
    "wrong_weight_fp16": ("fp16_1x1_half2", {"const_f16x2": _flip_half_sign("const_f16x2")}),
    "partial_not_added": ("gemm_v4_k2", {"add_partial": ""}),
    # bf16 pairs widen with one bit operation per column (shl 16: low, and 0xFFFF0000: high)
    "bf16_low_column_shifted_wrong": ("bf16_1x1_v8_epilogue",
                                      {"widen_lo": "shl.b32 {dst}, {src}, 8;"}),
    "bf16_high_column_read_as_low": ("bf16_1x1_v8_epilogue",
                                     {"widen_hi": "shl.b32 {dst}, {src}, 16;"}),
    "bf16_stored_as_fp16": ("bf16_1x1_v8_epilogue",
                            {"pack2": "cvt.rn.f16x2.f32 {dst}, {hi}, {lo};"}),
    "bf16_pair_swapped": ("bf16_1x1_v8_epilogue",
                          {"pack2": "cvt.rn.{ty}x2.f32 {dst}, {lo}, {hi};"}),
    "residual_dropped_bf16": ("bf16_1x1_v8_epilogue", {"step_residual": ""}),
    "partial_to_wrong_slot": (
        "gemm_v4_k2", {"st_shared": _shifted("st_shared", "offset", lambda f: 16)}),
    "zero_buffer_shift_wrong": (CONV, {"tap_base": _shifted("tap_base", "shift", lambda f: 4)}),
    "barrier_dropped": ("gemm_v4_k2", {"barrier": ""}),
    "pointer_in_bytes_twice": (CONV, {"pointer": "mul.wide.s32 %w, %{var}, 8;\n\t"
                                                 "add.s64 %{ptr}, %{ptr}, %w;"}),
}


def _mad_col_threads(**f):      # j = bx * (col_threads + 1) + tx: columns skipped between tiles
    b = f["b"]
    if f["dst"] == "%j" and b.isdigit():
        b = str(int(b) + 1)
    return "mad.lo.{t} {dst}, {a}, {b}, {c};".format(**{**f, "b": b})


MUTATIONS["wrong_column_tile"] = ("gemm_v4_k2", {"mad": _mad_col_threads})


@pytest.mark.parametrize("name", sorted(PLANS))
def test_printed_ptx_parses_back_to_its_ir(name):
    _check(PLANS[name])


def _swap_xy(text: str, name: str) -> str:
    """`text` with name.x and name.y exchanged (block ids read the wrong way round)."""
    return text.replace(f"{name}.x", f"{name}.T").replace(f"{name}.y", f"{name}.x") \
        .replace(f"{name}.T", f"{name}.y")


@pytest.mark.parametrize("name", ["gemm_v4_k2", "gemm_v4_k2_groups"])
def test_block_ids_read_the_wrong_way_round_are_caught(name):
    """A printer that reads the tile from the row group's block id (or the reverse) runs other
    groups' code on other columns: both parsers refuse the text."""
    ir = lower(PLANS[name])
    text = ptx.print_ptx(ir)
    flipped = _swap_xy(text, "%ctaid")
    assert flipped != text
    with pytest.raises(PrintedMismatch):
        check_printed(ir, flipped)
    source = cuda.print_cuda(ir)
    flipped = _swap_xy(source, "blockIdx")
    assert flipped != source
    with pytest.raises(PrintedMismatch):
        parse_cuda.check_printed(ir, flipped)


@pytest.mark.parametrize("name", ["gemm_v4_k2", "gemm_v4_k2_groups"])
def test_a_block_id_read_wrongly_used_and_then_reread_is_caught(name):
    """The parser keeps one reading per thread or block id: a text that computes its columns
    from the wrong block id and then reads the right one (as a last assignment) is refused."""
    ir = lower(PLANS[name])
    lines = ptx.print_ptx(ir).split("\n")
    first = next(i for i, line in enumerate(lines) if line.strip().startswith("mov.u32 %bx"))
    right = lines[first]
    lines[first] = _swap_xy(right, "%ctaid")
    last_use = max(i for i, line in enumerate(lines) if "%bx" in line and i != first)
    lines.insert(last_use + 1, right)
    with pytest.raises(PrintedMismatch, match="read twice, or after it is used"):
        check_printed(ir, "\n".join(lines))


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_a_broken_printer_rule_is_caught(monkeypatch, mutation):
    case, rules = MUTATIONS[mutation]
    plan = PLANS[case]
    ir = lower(plan)
    good = ptx.print_ptx(ir)
    for rule, replacement in rules.items():
        monkeypatch.setitem(ptx.RULES, rule, replacement)
    bad = ptx.print_ptx(ir)
    assert bad != good, "the mutation must change the text"
    with pytest.raises(PrintedMismatch) as caught:
        check_printed(ir, bad)
    assert "printed PTX differs from the kernel IR" in str(caught.value)


def test_the_interpreter_alone_cannot_see_a_printer_bug(monkeypatch):
    """Why the parse-back exists: the IR the CPU check executes is unchanged by a broken printer."""
    plan = PLANS[CONV]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(plan.geometry.input_elems)
    res = rng.standard_normal(plan.geometry.output_elems)
    before = execute(lower(plan), x, res)
    monkeypatch.setitem(ptx.RULES, "store", _shifted("store", "offset", lambda f: 36))
    assert np.array_equal(execute(lower(plan), x, res), before)
    with pytest.raises(PrintedMismatch, match="offset"):
        _check(plan)


def test_mismatch_names_where_the_text_differs(monkeypatch):
    monkeypatch.setitem(ptx.RULES, "load", _shifted("load", "offset", lambda f: 4))
    with pytest.raises(PrintedMismatch) as caught:
        _check(PLANS[CONV])
    message = str(caught.value)
    assert "loads[0].offset" in message and "IR has" in message and "text has" in message


def test_text_outside_the_printed_subset_is_refused():
    plan = PLANS["gemm_v4_k2"]
    ir = lower(plan)
    text = ptx.print_ptx(ir).replace("\tbar.sync 0;\n", "\tbar.sync 0;\n\tex2.approx.f32 %a0, %a0;\n")
    with pytest.raises(PrintedMismatch, match="outside the printed subset"):
        check_printed(ir, text)


def test_build_kernel_refuses_a_kernel_whose_text_differs_from_its_ir(monkeypatch, tmp_path):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setitem(ptx.RULES, "step_max", "")
    with pytest.raises(PrintedMismatch, match="source saved to"):
        B.build_kernel(PLANS[CONV], "ptx", "sm_90", cache=None)
    assert list(tmp_path.glob("*.ptx")), "the mismatching source is kept for the bug report"


@pytest.mark.usefixtures("isolated_cache", "wide_terminal")
def test_bench_on_a_cpu_box_fails_with_a_broken_printer(repo, tmp_path, capsys, monkeypatch):
    """The issue's experiment: sums stored to the wrong output rows used to pass every CPU check."""
    from sparsert_cli.gpu.runtime import have_gpu

    if have_gpu():
        pytest.skip("CPU-box behaviour")
    monkeypatch.setitem(ptx.RULES, "store", _shifted("store", "offset", lambda f: 96 * 4))
    out = tmp_path / "r.json"
    code, _, _ = run_main(["bench", str(repo / "configs" / "ci.yaml"), "--problems",
                           "ci_gemm_vec", "--sparsity", "0.8", "--jobs", "1", "--out", str(out)],
                          capsys)
    assert code == 1
    case = json.loads(out.read_text())["cases"][0]
    assert not case["compile"]["ok"]
    assert "printed PTX differs from the kernel IR" in case["compile"]["error"]


def test_weights_parse_back_exactly():
    """Hex immediates are exact: denormals and huge values survive the round trip."""
    for value in (1e-42, 3.0e38, -1.5, 2.0 ** -149):
        text = ptx.f32(value)
        assert struct.unpack(">f", bytes.fromhex(text[2:]))[0] == np.float32(value)


# ---------------------------------------------------------------- the CUDA printer, the same way


def _cuda_shifted(rule: str, field: str, by: int):
    template = cuda.RULES[rule]
    return lambda **f: template.format(**{**f, field: f[field] + by})


def _cuda_negated(rule: str):
    template = cuda.RULES[rule]
    return lambda **f: template.format(**{**f, "w": f["w"][1:] if f["w"][0] == "-"
                                          else "-" + f["w"]})


CUDA_MUTATIONS = {
    "store_to_next_row": (CONV, {"store": _cuda_shifted("store", "offset", 9)}),
    "reduced_row_to_wrong_row": ("gemm_v4_k2", {"store": _cuda_shifted("store", "offset", 96)}),
    "wrong_tap_offset": (CONV, {"load": _cuda_shifted("load", "offset", 1)}),
    "bias_dropped": (CONV, {"step_bias": ""}),
    "relu_dropped": (CONV, {"step_max": ""}),
    "residual_dropped": (CONV, {"step_residual": ""}),
    "wrong_weight": ("gemm_funcs", {"fma": _cuda_negated("fma"),
                                    "mul_first": _cuda_negated("mul_first")}),
    "partial_not_added": ("gemm_v4_k2", {"add_partial": ""}),
    "residual_dropped_bf16": ("bf16_1x1_v8_epilogue", {"step_residual": ""}),
    "widened_column_swapped_bf16": ("bf16_1x1_v8_epilogue", {
        "widen": lambda **f: "const float {dst} = sparsert_h2f({src});".format(
            **{**f, "src": f["src"].replace(" >> 16", " >> 0")})}),
    "partial_to_wrong_slot": ("gemm_v4_k2", {"st_shared": _cuda_shifted("st_shared", "offset", 4)}),
    "pointer_offset_wrong": (CONV, {"pointer": "{ptr} += {var} + 1;"}),
    "barrier_dropped": ("gemm_v4_k2", {"barrier": ""}),
}


@pytest.mark.parametrize("name", sorted(PLANS))
@pytest.mark.parametrize("inline_limit", [0, 10**9])
def test_printed_cuda_parses_back_to_its_ir(name, inline_limit):
    ir = lower(PLANS[name], inline_limit=inline_limit)
    parse_cuda.check_printed(ir, cuda.print_cuda(ir))


@pytest.mark.parametrize("mutation", sorted(CUDA_MUTATIONS))
def test_a_broken_cuda_rule_is_caught(monkeypatch, mutation):
    case, rules = CUDA_MUTATIONS[mutation]
    ir = lower(PLANS[case])
    good = cuda.print_cuda(ir)
    for rule, replacement in rules.items():
        monkeypatch.setitem(cuda.RULES, rule, replacement)
    bad = cuda.print_cuda(ir)
    assert bad != good, "the mutation must change the text"
    with pytest.raises(PrintedMismatch, match="printed CUDA differs from the kernel IR"):
        parse_cuda.check_printed(ir, bad)


def _half_negated(rule: str):
    template = cuda.HALF_RULES[rule]

    def rule_fn(**f):
        bits = int(f["w"][2:10], 16) ^ 0x80008000
        return template.format(**{**f, "w": f"0x{bits:08X}u"})
    return rule_fn


HALF_CUDA_MUTATIONS = {
    "store_to_next_row": ("fp16_1x1_half2", cuda.RULES,
                          {"store": _cuda_shifted("store", "offset", 64)}),
    "relu6_min_dropped": ("fp16_1x1_half2", cuda.HALF_RULES, {"step_min": ""}),
    "bias_dropped": ("fp16_1x1_half2", cuda.HALF_RULES, {"step_bias": ""}),
    "wrong_weight": ("fp16_1x1_half2", cuda.HALF_RULES, {"fma": _half_negated("fma"),
                                                        "mul_first": _half_negated("mul_first")}),
    "widened_column_swapped": ("fp16_1x1_acc32", cuda.RULES, {
        "widen": lambda **f: "const float {dst} = sparsert_h2f({src});".format(
            **{**f, "src": f["src"].replace(" >> 16", " >> 0")})}),
    "residual_dropped_acc32": ("fp16_1x1_acc32", cuda.RULES, {"step_residual": ""}),
}


@pytest.mark.parametrize("mutation", sorted(HALF_CUDA_MUTATIONS))
def test_a_broken_fp16_cuda_rule_is_caught(monkeypatch, mutation):
    case, table, rules = HALF_CUDA_MUTATIONS[mutation]
    ir = lower(PLANS[case])
    good = cuda.print_cuda(ir)
    for rule, replacement in rules.items():
        monkeypatch.setitem(table, rule, replacement)
    bad = cuda.print_cuda(ir)
    assert bad != good, "the mutation must change the text"
    with pytest.raises(PrintedMismatch, match="printed CUDA differs from the kernel IR"):
        parse_cuda.check_printed(ir, bad)
