"""The family registry and the kernel IR it lowers to: one family today ("immediate"), "auto"
resolves to it, printers are chosen by name and refuse precisions they cannot print, and the IR
states the kernel's decisions once (the interpreter and both printers read the same numbers)."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from sparsert_cli import build as B
from sparsert_cli.build import check_emitter, emit
from sparsert_cli.errors import UserError
from sparsert_cli.families import families, family_of, get_family, lower
from sparsert_cli.families.immediate import INLINE_LIMIT, Plan, PlanParams, build_plan
from sparsert_cli.ir import Compute, Finish, KernelIR, Partial, Reduce
from sparsert_cli.patterns import to_csr, uniform_weights
from sparsert_cli.problem_shape import Epilogue, Geometry
from sparsert_cli.render import get_printer, printers


def _plan(k_split=1, epilogue=Epilogue(), geometry=None, **params):
    geometry = geometry or Geometry(1, 24, 1, 64, 16)
    weight = uniform_weights((geometry.out_channels, geometry.in_channels, geometry.kernel,
                              geometry.kernel), 0.6, 1)
    return build_plan(to_csr(weight), geometry, PlanParams(k_split=k_split, **params), epilogue)


def test_registry_has_both_families_and_auto_resolves_to_immediate():
    fam = get_family("auto")
    assert fam is get_family("immediate")
    assert [f.name for f in families()] == ["immediate", "streamed"]
    assert fam.params is PlanParams and fam.plan_type is Plan and fam.version
    assert family_of(_plan()) is fam


def test_unknown_family_and_printer_are_user_errors():
    with pytest.raises(UserError, match="unknown kernel family 'tensor'.*immediate"):
        get_family("tensor")
    with pytest.raises(UserError, match="unknown emitter 'sass'"):
        get_printer("sass")
    with pytest.raises(TypeError, match="no registered family"):
        family_of(object())


def test_printers_declare_their_precisions(monkeypatch):
    assert set(printers()) == {"ptx", "cuda"}
    for printer in printers().values():
        assert set(printer.precisions) == {"fp32", "fp16", "fp16acc32", "bf16"}
        check_emitter(printer.name, "fp16", "sm_90")
        with pytest.raises(UserError, match="sm_80 or newer"):
            check_emitter(printer.name, "fp16", "sm_75")
    narrow = dataclasses.replace(printers()["cuda"], precisions=("fp32",))
    monkeypatch.setattr(B, "get_printer", lambda name: narrow if name == "cuda"
                        else printers()[name])
    with pytest.raises(UserError, match="fp16acc32 kernels are emitted as PTX only"):
        check_emitter("cuda", "fp16acc32", "sm_90")


def test_ir_states_columns_epilogue_order_and_partial_layout_once():
    epi = Epilogue(bias=tuple(float(i) for i in range(16)), activation="relu6", residual=True)
    ir = lower(_plan(k_split=2, epilogue=epi, rows_per_group=4))
    assert isinstance(ir, KernelIR) and ir.arguments == ("x", "y", "res")
    assert [op.dst for op in ir.columns][:3] == ["j", "j", "act"]
    assert ir.slot.op == "mad" and ir.slot.b == 2
    compute, reduce = ir.phases
    assert all(isinstance(b, Compute) and all(isinstance(o, Partial) for o in b.outputs)
               for b in compute)
    assert all(isinstance(b, Reduce) for b in reduce)
    finishes = [row.finish for body in reduce for row in body.rows]
    assert sorted(f.offset for f in finishes) == [row * 64 for row in range(16)]
    for f in finishes:    # bias (skipped for a zero bias), residual, relu6 = max then min
        kinds = [s.op for s in f.steps]
        assert kinds == (["bias"] if f.offset else []) + ["residual", "max", "min"]
    offsets = {o.offset for b in compute for o in b.outputs}
    assert max(offsets) < ir.shared_bytes and all(o % 16 == 0 for o in offsets)


def test_padded_conv_tap_bases_shift_the_zero_buffer_by_the_tap_position():
    geo = Geometry(2, 3, 6, 5, 4, kernel=3, stride=2, padding=1)
    ir = lower(_plan(geometry=geo))
    bases = {b for body in ir.phases[0] for b in body.bases}
    assert bases and all(b.zero_shift == -(b.r * 5 + b.s) for b in bases)


def test_inline_limit_is_the_lowering_decision_both_printers_follow():
    plan = _plan()
    assert lower(plan).inline and not lower(plan, inline_limit=0).inline
    assert plan.nnz * plan.vector_width <= INLINE_LIMIT
    ptx = get_printer("ptx").print_source(lower(plan, inline_limit=0), "sm_90")
    cuda = get_printer("cuda").print_source(lower(plan, inline_limit=0), "sm_90")
    assert ".func g0p0(" in ptx and "__noinline__" in cuda
    assert "__forceinline__" in emit(plan, "cuda")


def test_both_printers_print_the_same_weights_and_offsets():
    plan = _plan(geometry=Geometry(1, 5, 7, 6, 8, kernel=3, padding=1))
    ir = lower(plan)
    weights = sorted(f.weight for b in ir.phases[0] for bt in b.batches for f in bt.fmas)
    ptx, cuda = emit(plan, "ptx"), emit(plan, "cuda")
    ptx_w = sorted(np.frombuffer(bytes.fromhex("".join(re.findall(
        r"(?:fma|mul)\.rn\.f32 %a\d+, %b\d+, 0f([0-9A-F]{8})", ptx))), ">f4").tolist())
    cuda_w = sorted(float.fromhex(w) for w in re.findall(
        r"(?:fmaf\(b\d+, |= b\d+ \* )([-0-9a-fx.p+]+)f", cuda))
    assert ptx_w == weights == cuda_w
    loads = sorted(ld.offset for b in ir.phases[0] for bt in b.batches for ld in bt.loads)
    assert sorted(int(o) // 4 for o in re.findall(r"ld\.global\.nc\.f32 %b\d+, \[%xb?\d*\+(\d+)\]",
                                                   ptx)) == loads
    assert sorted(int(o) for o in re.findall(r"\(xb\d\d \+ (\d+)\)", cuda)) == loads


def test_finish_is_the_only_store():
    ir = lower(_plan())
    outs = [o for b in ir.phases[0] for o in b.outputs]
    assert all(isinstance(o, Finish) for o in outs) and len(outs) == 16
