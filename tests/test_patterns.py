"""Weights: generated patterns hit their sparsity exactly and deterministically; weight files of
every supported kind load, and every bad one is a one-line UserError naming the file."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from sparsert_cli import patterns
from sparsert_cli.errors import UserError
from sparsert_cli.problems import Problem


def _zeros(weight: np.ndarray) -> int:
    return int(weight.size - np.count_nonzero(weight))


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("maker", [patterns.uniform_weights, patterns.pruned_weights])
@pytest.mark.parametrize("shape, sparsity", [((37, 53, 1, 1), 0.8), ((24, 16, 3, 3), 0.95),
                                             ((64, 48, 1, 1), 0.5), ((7, 5, 3, 3), 0.0),
                                             ((129, 31, 1, 1), 0.9)])
def test_generated_weights_hit_the_exact_sparsity(maker, shape, sparsity):
    weight = maker(shape, sparsity, seed=3)
    assert weight.shape == shape and weight.dtype == np.float32
    assert _zeros(weight) == int(round(sparsity * weight.size))
    assert np.all(np.isfinite(weight))


def test_generate_for_a_problem_has_the_problem_weight_shape_and_sparsity():
    problem = Problem("c", "conv3x3", 24, 16, height=13, width=10, padding=1)
    for kind in ("uniform", "pruned"):
        weight = patterns.generate(problem, 0.9, kind, seed=0)
        assert weight.shape == problem.weight_shape
        assert _zeros(weight) == int(round(0.9 * weight.size))


def test_generate_keeps_one_weight_when_sparsity_rounds_everything_away():
    problem = Problem("tiny", "gemm", 1, 3, height=1, width=4)
    weight = patterns.generate(problem, 0.9, "uniform", seed=0)
    assert np.count_nonzero(weight) == 1


def test_pruned_like_rows_are_much_more_uneven_than_uniform_rows():
    shape = (256, 256, 1, 1)
    pruned = np.count_nonzero(patterns.pruned_weights(shape, 0.9, 1).reshape(256, -1), axis=1)
    uniform = np.count_nonzero(patterns.uniform_weights(shape, 0.9, 1).reshape(256, -1), axis=1)
    assert pruned.max() >= 4 * pruned.mean()
    assert pruned.max() >= 5 * max(1, np.percentile(pruned, 10))
    assert pruned.std() / pruned.mean() > 0.8
    assert uniform.std() / uniform.mean() < 0.3
    assert uniform.max() < 2 * uniform.mean()


@pytest.mark.parametrize("maker", [patterns.uniform_weights, patterns.pruned_weights])
def test_generation_is_deterministic_in_the_seed(maker):
    a = maker((40, 24, 3, 3), 0.8, seed=11)
    b = maker((40, 24, 3, 3), 0.8, seed=11)
    c = maker((40, 24, 3, 3), 0.8, seed=12)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_case_seed_is_stable_and_separates_cases():
    s = patterns.case_seed(0, "mbv1_pw0", 0.9)
    assert s == patterns.case_seed(0, "mbv1_pw0", 0.9)
    assert len({s, patterns.case_seed(1, "mbv1_pw0", 0.9), patterns.case_seed(0, "mbv1_pw1", 0.9),
                patterns.case_seed(0, "mbv1_pw0", 0.95),
                patterns.case_seed(0, "mbv1_pw0", 0.9, "bias")}) == 5
    p = Problem("x", "gemm", 16, 16, height=1, width=8)
    assert np.array_equal(patterns.generate(p, 0.7, "pruned", 5),
                          patterns.generate(p, 0.7, "pruned", 5))


def test_magnitude_prune_drops_the_smallest_magnitudes():
    weight = np.array([[0.5, -4.0, 0.1], [3.0, -0.2, 2.0]], dtype=np.float32)
    pruned = patterns.magnitude_prune(weight, 0.5)
    assert pruned.tolist() == [[0.0, -4.0, 0.0], [3.0, 0.0, 2.0]]


def test_pattern_hash_depends_on_values_and_shape():
    w = patterns.uniform_weights((8, 8, 1, 1), 0.5, 0)
    h = patterns.pattern_hash(w)
    assert h == patterns.pattern_hash(w.copy())
    changed = w.copy()
    changed.ravel()[np.flatnonzero(changed)[0]] *= 2
    assert patterns.pattern_hash(changed) != h
    assert patterns.pattern_hash(w.reshape(8, 8)) != h


def test_to_csr_uses_tap_order_c_r_s():
    weight = np.zeros((2, 3, 3, 3), dtype=np.float32)
    weight[1, 2, 1, 0] = 5.0
    csr = patterns.to_csr(weight)
    assert csr.shape == (2, 27)
    assert csr[1, (2 * 3 + 1) * 3 + 0] == 5.0 and csr.nnz == 1


# ---------------------------------------------------------------- loading files


def _dense(m=12, k=18, seed=0, density=0.3):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, k)).astype(np.float32)
    w[rng.random((m, k)) >= density] = 0
    w[0, 0] = 1.25        # never all zero
    return w


def test_load_scipy_save_npz_csr_and_coo(tmp_path):
    w = _dense()
    for fmt in ("csr", "coo", "csc"):
        path = tmp_path / f"w_{fmt}.npz"
        sp.save_npz(path, sp.csr_matrix(w).asformat(fmt))
        loaded = patterns.load_pattern(path)
        assert isinstance(loaded, patterns.SparseWeight) and loaded.shape == w.shape
        assert loaded.csr.dtype == np.float32 and loaded.csr.has_canonical_format
        assert np.array_equal(patterns.dense(loaded), w)


def test_load_dense_npy_2d_and_4d(tmp_path):
    w2 = _dense()
    np.save(tmp_path / "w2.npy", w2)
    assert np.array_equal(patterns.load_pattern(tmp_path / "w2.npy"), w2)
    w4 = _dense(8, 36).reshape(8, 4, 3, 3)
    np.save(tmp_path / "w4.npy", w4.astype(np.float64))
    loaded = patterns.load_pattern(tmp_path / "w4.npy")
    assert loaded.shape == (8, 4, 3, 3) and loaded.dtype == np.float32
    assert np.array_equal(loaded, w4)


def test_load_dense_npz_single_array_and_named_weight(tmp_path):
    w = _dense()
    np.savez(tmp_path / "one.npz", w)
    assert np.array_equal(patterns.load_pattern(tmp_path / "one.npz"), w)
    np.savez(tmp_path / "named.npz", weight=w, bias=np.ones(12))
    assert np.array_equal(patterns.load_pattern(tmp_path / "named.npz"), w)


def test_load_integer_weights(tmp_path):
    w = (np.arange(12).reshape(3, 4) % 3).astype(np.int32)
    np.save(tmp_path / "int.npy", w)
    assert np.array_equal(patterns.load_pattern(tmp_path / "int.npy"), w.astype(np.float32))


def test_load_with_sparsity_magnitude_prunes_to_the_exact_count(tmp_path):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((20, 30)).astype(np.float32)
    np.save(tmp_path / "dense.npy", w)
    pruned = patterns.load_pattern(tmp_path / "dense.npy", sparsity=0.9)
    assert _zeros(pruned) == 540
    kept = np.abs(w[pruned != 0])
    dropped = np.abs(w[pruned == 0])
    assert kept.min() >= dropped.max()


def _write_bad(tmp_path, kind):
    """Make one bad weight file; returns its path."""
    if kind == "missing":
        return tmp_path / "missing.npy"
    if kind == "missing_npz":
        return tmp_path / "missing.npz"
    if kind == "directory":
        path = tmp_path / "adir.npy"
        path.mkdir()
        return path
    if kind == "garbage_npy":
        path = tmp_path / "garbage.npy"
        path.write_bytes(b"\x00\x01not a numpy file at all" * 10)
        return path
    if kind == "garbage_npz":
        path = tmp_path / "garbage.npz"
        path.write_bytes(b"PK\x03\x04 truncated zip" + bytes(range(256)))
        return path
    if kind == "empty_file":
        path = tmp_path / "empty.npy"
        path.write_bytes(b"")
        return path
    if kind == "truncated_npy":
        path = tmp_path / "trunc.npy"
        np.save(path, _dense(40, 40))
        path.write_bytes(path.read_bytes()[:200])
        return path
    arrays = {
        "one_d": np.ones(5),
        "three_d": np.ones((2, 3, 4)),
        "five_d": np.ones((1, 2, 3, 1, 1)),
        "scalar": np.array(3.0),
        "nan": np.array([[1.0, np.nan], [0.0, 2.0]]),
        "inf": np.array([[1.0, -np.inf], [0.0, 2.0]]),
        "all_zero": np.zeros((4, 4)),
        "empty_2d": np.zeros((0, 4)),
        "strings": np.array([["a", "b"], ["c", "d"]]),
        "complex": np.ones((2, 2), dtype=np.complex64),
        "underflow": np.array([[1e-60, 1.0]]),
    }
    path = tmp_path / f"{kind}.npy"
    np.save(path, arrays[kind])
    return path


BAD_FILES = ["missing", "missing_npz", "directory", "garbage_npy", "garbage_npz", "empty_file",
             "truncated_npy", "one_d", "three_d", "five_d", "scalar", "nan", "inf", "all_zero",
             "empty_2d", "strings", "complex", "underflow"]


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_weight_file_is_one_line_user_error_naming_the_file(tmp_path, kind):
    path = _write_bad(tmp_path, kind)
    with pytest.raises(UserError) as caught:
        patterns.load_pattern(path)
    assert str(path) in caught.value.message
    assert "\n" not in caught.value.message


def test_object_array_file_is_rejected(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([[1.0, None], [2.0, 3.0]], dtype=object), allow_pickle=True)
    with pytest.raises(UserError) as caught:
        patterns.load_pattern(path)
    assert str(path) in caught.value.message and "\n" not in caught.value.message


def test_npz_with_several_unnamed_arrays_asks_for_weight(tmp_path):
    path = tmp_path / "many.npz"
    np.savez(path, a=np.ones((2, 2)), b=np.ones((2, 2)))
    with pytest.raises(UserError, match="'weight'"):
        patterns.load_pattern(path)


@pytest.mark.parametrize("suffix", [".txt", ".pt", ".csv", ""])
def test_wrong_suffix_is_rejected_before_reading(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    np.save(tmp_path / "real.npy", _dense())
    path.write_bytes((tmp_path / "real.npy").read_bytes())
    # .pt is a PyTorch state dict (weights.py): an .npy under that name is not one
    want = "state dict" if suffix == ".pt" else r"unknown weight file type .*\.npy, \.npz"
    with pytest.raises(UserError, match=want):
        patterns.load_pattern(path)


def test_nan_message_counts_the_bad_values(tmp_path):
    path = tmp_path / "nans.npy"
    np.save(path, np.array([[np.nan, np.inf, 1.0]]))
    with pytest.raises(UserError, match="2 NaN/Inf"):
        patterns.load_pattern(path)


def test_pruning_to_all_zeros_is_rejected(tmp_path):
    path = tmp_path / "small.npy"
    np.save(path, np.ones((2, 2)))
    with pytest.raises(UserError, match="all zeros"):
        patterns.load_pattern(path, sparsity=0.99)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_values_that_overflow_float32_are_rejected(tmp_path):
    path = tmp_path / "huge.npy"
    np.save(path, np.array([[1e300, 1.0], [0.0, 2.0]]))
    with pytest.raises(UserError) as caught:
        patterns.load_pattern(path)
    assert str(path) in caught.value.message


# ---------------------------------------------------------------- fitting to an op


def test_fit_to_op_reshapes_2d_weights():
    w = np.ones((4, 18), dtype=np.float32)
    assert patterns.fit_to_op(w, "gemm", "w").shape == (4, 18, 1, 1)
    assert patterns.fit_to_op(w, "conv1x1", "w").shape == (4, 18, 1, 1)
    assert patterns.fit_to_op(w, "conv3x3", "w").shape == (4, 2, 3, 3)


def test_fit_to_op_2d_conv3x3_keeps_tap_order():
    w = np.arange(18, dtype=np.float32).reshape(1, 18) + 1
    fitted = patterns.fit_to_op(w, "conv3x3", "w")
    assert np.array_equal(patterns.to_csr(fitted).toarray(), w)


@pytest.mark.parametrize("shape, op, words", [
    ((4, 10), "conv3x3", ["K = 9*C", "K=10"]),
    ((4, 2, 3, 3), "conv1x1", ["1x1 kernel", "3x3"]),
    ((4, 2, 3, 3), "gemm", ["1x1 kernel"]),
    ((4, 2, 1, 1), "conv3x3", ["3x3 kernel", "1x1"]),
    ((4, 2, 5, 5), "conv3x3", ["3x3 kernel", "5x5"]),
])
def test_fit_to_op_rejects_shapes_that_do_not_fit(shape, op, words):
    with pytest.raises(UserError) as caught:
        patterns.fit_to_op(np.ones(shape, dtype=np.float32), op, "where.npy")
    assert caught.value.message.startswith("where.npy: ")
    for word in words:
        assert word in caught.value.message


def test_check_matches_names_both_shapes():
    problem = Problem("p", "conv3x3", 8, 4, height=6, width=6, padding=1)
    patterns.check_matches(np.ones((8, 4, 3, 3), dtype=np.float32), problem, "w.npy")
    with pytest.raises(UserError) as caught:
        patterns.check_matches(np.ones((8, 5, 3, 3), dtype=np.float32), problem, "w.npy")
    message = caught.value.message
    assert "w.npy" in message and "(8, 5, 3, 3)" in message and "(8, 4, 3, 3)" in message


# ---------------------------------------------------------------- sparse end to end (issue 14)


def test_sparse_and_dense_copies_of_a_weight_hash_and_plan_alike(tmp_path):
    from sparsert_cli.build import make_plan
    from sparsert_cli.problems import Problem

    w = _dense(12, 18)
    np.save(tmp_path / "d.npy", w)
    sp.save_npz(tmp_path / "s.npz", sp.csr_matrix(w))
    dense_w = patterns.fit_to_op(patterns.load_pattern(tmp_path / "d.npy"), "conv3x3", "d")
    sparse_w = patterns.fit_to_op(patterns.load_pattern(tmp_path / "s.npz"), "conv3x3", "s")
    assert isinstance(sparse_w, patterns.SparseWeight) and sparse_w.shape == (12, 2, 3, 3)
    assert patterns.pattern_hash(sparse_w) == patterns.pattern_hash(dense_w)
    problem = Problem("p", "conv3x3", 12, 2, height=5, width=6, padding=1)
    assert make_plan(problem, sparse_w).digest() == make_plan(problem, dense_w).digest()


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
def test_sparse_file_is_pruned_exactly_like_the_dense_one(tmp_path, sparsity):
    w = _dense(20, 30, seed=3, density=0.6)
    w[1, :4] = w[2, :4] = 0.75                     # ties, broken by position
    np.save(tmp_path / "d.npy", w)
    sp.save_npz(tmp_path / "s.npz", sp.coo_matrix(w))
    dense_w = patterns.load_pattern(tmp_path / "d.npy", sparsity)
    sparse_w = patterns.load_pattern(tmp_path / "s.npz", sparsity)
    assert np.array_equal(patterns.dense(sparse_w), dense_w)


def test_scipy_file_with_duplicate_coo_entries_sums_them_like_toarray(tmp_path):
    m = sp.coo_matrix(([1.0, 2.0, 0.5], ([0, 0, 1], [1, 1, 2])), shape=(2, 3))
    sp.save_npz(tmp_path / "dup.npz", m)
    loaded = patterns.load_pattern(tmp_path / "dup.npz")
    assert np.array_equal(patterns.dense(loaded), m.toarray()) and loaded.nnz == 2


@pytest.mark.parametrize("kind", ["uniform", "pruned"])
def test_huge_layers_are_generated_sparsely_with_the_exact_count(kind, monkeypatch):
    import tracemalloc

    from sparsert_cli.problems import Problem

    problem = Problem("huge", "gemm", 12000, 6000, width=8)     # 7.2e7 > GENERATE_DENSE_LIMIT
    tracemalloc.start()
    weight = patterns.generate(problem, 0.999, kind, 0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert isinstance(weight, patterns.SparseWeight) and peak < 64 * 2**20   # dense: ~1.4 GB
    assert weight.nnz == 72000 and weight.shape == problem.weight_shape
    csr = weight.csr
    assert csr.has_canonical_format and np.all(csr.data != 0)
    assert patterns.pattern_hash(weight) == patterns.pattern_hash(
        patterns.generate(problem, 0.999, kind, 0))
    rows = np.diff(csr.indptr)
    if kind == "pruned":        # log-normal row scales: rows far from the mean, as in pruning
        assert rows.max() > 4 * rows.mean() and np.sum(rows == 0) > 100
    else:
        assert rows.std() < 1.2 * np.sqrt(rows.mean())      # hypergeometric spread only


def test_sparse_generators_follow_the_dense_distributions():
    dense_w = patterns.to_csr(patterns.pruned_weights((2000, 512, 1, 1), 0.95, 3))
    sparse_w = patterns.sparse_pruned((2000, 512, 1, 1), 0.95, 3).csr
    assert sparse_w.nnz == dense_w.nnz
    for a, b in ((np.diff(dense_w.indptr), np.diff(sparse_w.indptr)),
                 (np.abs(dense_w.data), np.abs(sparse_w.data))):
        assert np.allclose(np.percentile(a, [25, 50, 75, 95]),
                           np.percentile(b, [25, 50, 75, 95]), rtol=0.1, atol=2)
    assert patterns.sparse_uniform((300, 7, 3, 3), 0.5, 1).nnz == 300 * 63 // 2


def test_layers_below_the_limit_keep_their_dense_weights_and_tuned_hashes(repo):
    import json

    from sparsert_cli.config import load_config

    tuned = {key.split("|")[0] for key in json.loads(
        (repo / "configs" / "tuned.json").read_text())["entries"]}
    config = load_config(repo / "configs" / "paper20.yaml")
    for problem, sparsity in config.cases()[:6]:
        weight = patterns.generate(problem, sparsity, config.pattern, config.seed)
        assert isinstance(weight, np.ndarray)
        assert patterns.pattern_hash(weight) in tuned, (problem.id, sparsity)
