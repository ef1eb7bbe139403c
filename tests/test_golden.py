"""The immediate family's PTX is pinned: fixed weights and explicit plans must print byte-identical
text (apart from the entry name and the header comment) to the fixtures in tests/golden/."""

from __future__ import annotations

import pytest

from golden.cases import normalise, plans, read
from sparsert_cli.build import emit

PLANS = plans()


@pytest.mark.parametrize("name", sorted(PLANS))
def test_ptx_is_byte_identical_to_golden(name):
    plan = PLANS[name]
    text = normalise(emit(plan, "ptx", "sm_90"), plan.entry)
    golden = read(name)
    if text != golden:
        for i, (a, b) in enumerate(zip(text.split("\n"), golden.split("\n"))):
            assert a == b, f"{name}: line {i + 2} differs"
    assert text == golden


def test_golden_cases_cover_the_issue_list():
    names = {n: p for n, p in PLANS.items()}
    gemm = names["gemm_v4_k2"]
    assert (gemm.vector_width, gemm.k_split) == (4, 2)
    conv = names["conv3x3_s2_p1_b2_epilogue"].geometry
    assert (conv.kernel, conv.stride, conv.padding, conv.batch) == (3, 2, 1, 2)
    assert names["fp16_1x1_half2"].precision == "fp16"
    assert names["fp16_1x1_acc32"].precision == "fp16acc32"
    bf = names["bf16_1x1_v8_epilogue"]
    assert (bf.precision, bf.vector_width, bf.k_split) == ("bf16", 8, 2)
    from sparsert_cli.families.immediate import INLINE_LIMIT
    big = names["gemm_funcs"]
    assert INLINE_LIMIT < big.nnz * big.vector_width < 1.05 * INLINE_LIMIT
