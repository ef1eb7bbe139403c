"""scripts/tc_probe.py on the CPU: its weight tables hold exactly the weight (every nonzero once,
at its tile position, as fp16; padding words point at the scratch slot with value 0), the
cells are laid out in the order the kernel reads them, and every kernel version compiles to an
sm_90 cubin without spills on a BERT-sized tile (version 3 also split over K)."""

from __future__ import annotations

from importlib.machinery import SourceFileLoader
from importlib.util import module_from_spec, spec_from_loader
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]


def _script():
    loader = SourceFileLoader("tc_probe", str(REPO / "scripts" / "tc_probe.py"))
    module = module_from_spec(spec_from_loader("tc_probe", loader))
    loader.exec_module(module)
    return module


def _weight(m, k, density, seed=0):
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((m, k)) * (rng.random((m, k)) < density)
    return sp.csr_matrix(dense.astype(np.float32))


def _tiles_from_words(words, bm, bk, apad):
    """(row-in-tile, col-in-tile, value) of each word, padding words (scratch slot) left out."""
    pos, bits = words >> 16, (words & 0xFFFF).astype(np.uint16)
    real = pos != bm * (bk + apad)
    return pos[real] // (bk + apad), pos[real] % (bk + apad), bits[real].view(np.float16), real


@pytest.mark.parametrize("m,k,bm,bk", [(40, 70, 16, 32), (64, 64, 32, 64), (33, 17, 16, 32)])
def test_version1_cells_rebuild_the_weight(m, k, bm, bk):
    t = _script()
    csr = _weight(m, k, 0.2)
    words, start = t.pack(csr, bm, bk)
    stages = -(-k // bk)
    assert len(start) == -(-m // bm) * stages + 1 and start[-1] == csr.nnz == len(words)
    rebuilt = np.zeros((m, k), np.float64)
    for cell in range(len(start) - 1):
        b, s = divmod(cell, stages)
        r, c, v, _ = _tiles_from_words(words[start[cell]:start[cell + 1]], bm, bk, t.APAD)
        assert np.all(c < bk) and np.all(b * bm + r < m) and np.all(s * bk + c < k)
        np.add.at(rebuilt, (b * bm + r, s * bk + c), v.astype(np.float64))
    want = csr.toarray().astype(np.float16).astype(np.float64)
    np.testing.assert_array_equal(rebuilt, want)


@pytest.mark.parametrize("m,k,bm,bk,threads", [(40, 70, 16, 32, 32), (96, 128, 32, 64, 64)])
def test_version2_cells_are_padded_per_thread_and_rebuild_the_weight(m, k, bm, bk, threads):
    t = _script()
    csr = _weight(m, k, 0.3, seed=1)
    words, e = t.pack2(csr, bm, bk, threads)
    stages, blocks = -(-k // bk), -(-m // bm)
    counts = np.diff(t.pack(csr, bm, bk)[1].astype(np.int64))
    assert e == max(1, -(-counts.max() // threads))
    assert len(words) == blocks * stages * e * threads
    cells = words.reshape(blocks * stages, e * threads)
    rebuilt = np.zeros((m, k), np.float64)
    for cell in range(blocks * stages):
        b, s = divmod(cell, stages)
        r, c, v, real = _tiles_from_words(cells[cell], bm, bk, t.APAD)
        assert real.sum() == counts[cell] and not real[counts[cell]:].any()
        assert np.all((cells[cell][~real] & 0xFFFF) == 0)       # padding adds nothing
        np.add.at(rebuilt, (b * bm + r, s * bk + c), v.astype(np.float64))
    np.testing.assert_array_equal(rebuilt, csr.toarray().astype(np.float16).astype(np.float64))


def test_both_versions_compile_without_spills():
    pytest.importorskip("cuda.bindings.nvrtc")
    from sparsert_cli.compile import cpp_to_cubin

    t = _script()
    m, k, n = 256, 192, 128
    csr = _weight(m, k, 0.1, seed=2)
    _, e = t.pack2(csr, 64, 64, 128)
    _, e3 = t.pack2(csr, 32, 64, 128)
    assert t.shared3(2, 2, 1, 2, 4, e3, 4) <= 48 * 1024
    for text in (t.source(m, k, n, 2, 2, 2, 4, 4), t.source2(m, k, n, 2, 2, 2, 4, 4, e),
                 t.source2(m, k, 49, 4, 1, 1, 2, 4, e), t.source3(m, k, n, 2, 2, 1, 2, 4, e3, 3, 2),
                 t.source3(m, k, n, 2, 2, 1, 2, 4, e3, 4, 1)):
        res = cpp_to_cubin(text).entry_resources("tc_probe")
        assert res.registers > 0 and res.spills == 0
