"""Regressions from the code review: inputs that once deleted files, crashed or printed a
traceback must now give one line, the right exit code, and touch nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from cli_helpers import run_main


@pytest.fixture(autouse=True)
def _cache(isolated_cache):
    return isolated_cache


run = run_main


def one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1


def gemm_weight(tmp_path):
    w = np.zeros((6, 5), np.float32)
    w[0, 1], w[3, 4], w[5, 0] = 1.5, -2.0, 0.25
    path = tmp_path / "w.npy"
    np.save(path, w)
    return path


def test_gen_never_deletes_foreign_files_in_the_output_directory(tmp_path, capsys):
    out = tmp_path / "app"
    out.mkdir()
    (out / "manifest.json").write_text("{}")          # someone else's manifest
    (out / "keep.txt").write_text("precious")
    code, _, err = run(["gen", "--pattern", str(gemm_weight(tmp_path)), "--n", "8",
                        "-o", str(out)], capsys)
    assert code == 2 and one_line(err) and "keep.txt" in err
    assert (out / "keep.txt").read_text() == "precious"


def test_gen_rewrites_its_own_previous_output_in_place(tmp_path, capsys):
    out = tmp_path / "k"
    pattern = str(gemm_weight(tmp_path))
    assert run(["gen", "--pattern", pattern, "--n", "8", "--emit", "cuda", "-o", str(out)],
               capsys)[0] == 0
    assert run(["gen", "--pattern", pattern, "--n", "8", "-o", str(out)], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["kernel.cubin", "kernel.ptx",
                                                      "manifest.json", "weights.npz"]


def test_malformed_scipy_npz_is_rejected_not_read_out_of_bounds(tmp_path, capsys):
    m = sp.csr_matrix(np.eye(3, 4, dtype=np.float32))
    m.indices[1] = 10**8                               # far outside the 4 columns
    path = tmp_path / "bad.npz"
    sp.save_npz(path, m)
    code, _, err = run(["gen", "--pattern", str(path), "--n", "8"], capsys)
    assert code == 2 and one_line(err) and "bad.npz" in err


def test_bias_beyond_float32_is_rejected(tmp_path, capsys):
    bias = tmp_path / "b.npy"
    np.save(bias, np.full(6, 1e40))
    code, _, err = run(["gen", "--pattern", str(gemm_weight(tmp_path)), "--n", "8",
                        "--bias", str(bias), "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and one_line(err) and "float32" in err
    assert not (tmp_path / "o").exists()


def test_non_utf8_config_is_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"name: x\xff\nproblems: [mbv1_pw0]\nsparsity: 0.9\n")
    code, _, err = run(["problems", str(path)], capsys)
    assert code == 2 and one_line(err) and "UTF-8" in err


@pytest.mark.parametrize("name", ["''", "a/b", "../up", ".hidden"])
def test_config_name_must_be_a_plain_file_name(tmp_path, capsys, name):
    path = tmp_path / "c.yaml"
    path.write_text(f"name: {name}\nproblems: [mbv1_pw0]\nsparsity: 0.9\n")
    code, _, err = run(["problems", str(path)], capsys)
    assert code == 2 and "'name'" in err


def test_duplicate_sparsity_is_rejected(tmp_path, capsys, repo):
    code, _, err = run(["bench", str(repo / "configs" / "ci.yaml"), "--sparsity", "0.8,0.8",
                        "--out", str(tmp_path / "r.json")], capsys)
    assert code == 2 and "twice" in err and not (tmp_path / "r.json").exists()


def test_plan_override_that_does_not_fit_a_layer_names_config_and_case(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("problems: [mbv1_pw0]\nsparsity: 0.9\n"
                    "plan: {k_split: 16, rows_per_group: 64}\n")
    code, _, err = run(["bench", str(path), "--no-tuned", "--out", str(tmp_path / "r.json")],
                       capsys)
    last = err.strip().splitlines()[-1]     # after the "no GPU" notice and the progress bar
    assert code == 2 and last.startswith("sparsert:") and str(path) in last and "mbv1_pw0" in last


def test_bench_unwritable_output_fails_before_any_work(tmp_path, capsys, repo):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(["bench", str(repo / "configs" / "ci.yaml"),
                        "--out", str(blocker / "sub" / "r.json")], capsys)
    assert code == 2 and one_line(err) and "cannot be written" in err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_output_on_a_pseudo_file_system_fails_before_any_work(capsys, repo):
    """/proc takes no new files even for root, whose permission bits say it may write."""
    code, _, err = run(["bench", str(repo / "configs" / "ci.yaml"), "--out", "/proc/r.json"],
                       capsys)
    assert code == 2 and one_line(err) and "/proc is not a writable directory" in err


def test_writability_probe_leaves_nothing(tmp_path):
    from sparsert_cli.paths import can_create_in, check_output

    assert can_create_in(tmp_path)
    check_output(tmp_path / "sub" / "r.json", "--out")
    assert list(tmp_path.iterdir()) == []


def test_compare_of_files_with_wrong_fields_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"cases": [{"x": 1}]}))
    code, _, err = run(["compare", str(bad), str(bad)], capsys)
    assert code == 2 and one_line(err)


def test_compare_shows_new_cases_without_failing(tmp_path, capsys, repo):
    base = json.loads((repo / "results" / "h100" / "baseline.json").read_text())
    extra = json.loads(json.dumps(base))
    extra["cases"].append(dict(extra["cases"][0], problem="brand_new"))
    new = tmp_path / "new.json"
    new.write_text(json.dumps(extra))
    code, out, _ = run(["compare", str(repo / "results" / "h100" / "baseline.json"), str(new)],
                       capsys)
    assert code == 0 and "brand_new" in out and "new" in out


def test_inspect_of_a_malformed_manifest_is_one_line(tmp_path, capsys):
    out = tmp_path / "k"
    assert run(["gen", "--pattern", str(gemm_weight(tmp_path)), "--n", "8", "-o", str(out)],
               capsys)[0] == 0
    doc = json.loads((out / "manifest.json").read_text())
    doc["problem"] = {}
    (out / "manifest.json").write_text(json.dumps(doc))
    code, _, err = run(["inspect", str(out)], capsys)
    assert code == 2 and one_line(err) and "manifest" in err


@pytest.mark.parametrize("arch", ["sm_88", "sm_110", "sm_121a"])
def test_every_listed_arch_compiles(tmp_path, capsys, arch):
    code, _, err = run(["gen", "--pattern", str(gemm_weight(tmp_path)), "--n", "8", "--arch",
                        arch, "-o", str(tmp_path / arch)], capsys)
    assert code == 0, err


def test_arch_a_suffix_before_sm90_is_rejected(tmp_path, capsys):
    code, _, err = run(["gen", "--pattern", str(gemm_weight(tmp_path)), "--n", "8", "--arch",
                        "sm_75a"], capsys)
    assert code == 2 and one_line(err) and "sm_75a" in err


def test_unwritable_cache_dir_compiles_uncached_with_one_warning(tmp_path, capsys, monkeypatch):
    from sparsert_cli import cache

    monkeypatch.setattr(cache, "_warned", False)
    blocker = tmp_path / "cachefile"
    blocker.write_text("x")
    monkeypatch.setenv("SPARSERT_CACHE_DIR", str(blocker))
    code, _, err = run(["gen", "--pattern", str(gemm_weight(tmp_path)), "--n", "8",
                        "-o", str(tmp_path / "o")], capsys)
    assert code == 0 and (tmp_path / "o" / "manifest.json").exists()
    assert one_line(err) and "compiling without the cache" in err and blocker.read_text() == "x"


# ---------------------------------------------------------------- issue 14: files that are not
# what they claim, and work far beyond the machine


def _gen(capsys, path, *extra):
    return run(["gen", "--pattern", str(path), "--n", "8", *extra], capsys)


@pytest.mark.parametrize("member, words", [
    (np.array([1, "a", None], dtype=object), "Python objects"),
    (np.float32(3.0), "0-D"),
    (np.array(["abc", "d"]), "numeric"),
    (b"\x80\x04 pickled bytes", "not a .npy array"),
])
def test_npz_member_that_is_not_a_numeric_array_is_one_line(tmp_path, capsys, member, words):
    import zipfile

    path = tmp_path / "w.npz"
    if isinstance(member, bytes):
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("weight.npy", member)
    else:
        np.savez(path, weight=member)
    code, _, err = _gen(capsys, path)
    assert code == 2 and one_line(err) and str(path) in err and words in err


def test_random_bytes_and_empty_archives_say_what_they_are(tmp_path, capsys):
    import zipfile

    for name in ("r.npy", "r.npz"):
        (tmp_path / name).write_bytes(np.random.default_rng(0).bytes(300))
        code, _, err = _gen(capsys, tmp_path / name)
        assert code == 2 and one_line(err) and "not a .npy/.npz file" in err
        assert "pickle" not in err
    zipfile.ZipFile(tmp_path / "e.npz", "w").close()
    code, _, err = _gen(capsys, tmp_path / "e.npz")
    assert code == 2 and "holds no arrays" in err and "several" not in err


def test_dense_file_beyond_the_element_limit_is_refused_from_its_header(tmp_path, capsys):
    path = tmp_path / "huge.npy"
    with open(path, "wb") as fh:     # a header promising 4e8 float32 values, and no data
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "<f4", "fortran_order": False, "shape": (20000, 20000)})
    code, _, err = _gen(capsys, path)
    assert code == 2 and one_line(err) and "400000000 elements" in err and "1.6 GB" in err


def test_config_nested_thousands_deep_is_one_line(tmp_path, capsys):
    path = tmp_path / "deep.yaml"
    path.write_text("problems: " + "[" * 5000 + "]" * 5000 + "\nsparsity: 0.9\n")
    code, _, err = run(["bench", str(path), "--compile-only"], capsys)
    assert code == 2 and one_line(err) and "deep.yaml" in err and "nested too deeply" in err


def error_line(err: str) -> str:
    """The one error line of a bench run (after its progress bar)."""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("sparsert:") and sum("sparsert:" in x for x in lines) == 1
    return lines[-1]


def _inline(tmp_path, spec: str, sparsity: float) -> str:
    path = tmp_path / "big.yaml"
    path.write_text(f"problems: [{spec}]\nsparsity: {sparsity}\n")
    return str(path)


def test_gemm_of_1e11_is_refused_before_numpy_sees_it(tmp_path, capsys):
    config = _inline(tmp_path, "{id: g, op: gemm, m: 100000000000, k: 100000000000, n: 8}", 0.9)
    code, _, err = run(["bench", config, "--compile-only"], capsys)
    err = error_line(err)
    assert code == 2 and "big.yaml" in err and "too large" in err


def test_conv_whose_tensors_exceed_2_31_names_the_config(tmp_path, capsys):
    config = _inline(tmp_path, "{id: c, op: conv1x1, out_channels: 64, in_channels: 64, "
                               "height: 8192, width: 8192}", 0.9)
    code, _, err = run(["bench", config, "--compile-only"], capsys)
    err = error_line(err)
    assert code == 2 and "big.yaml: problems[0] [c]: shape too large" in err


def test_30000_square_gemm_at_99_percent_is_refused_within_a_second(tmp_path, capsys):
    import time

    config = _inline(tmp_path, "{id: g, op: gemm, m: 30000, k: 30000, n: 8}", 0.99)
    started = time.perf_counter()
    code, _, err = run(["bench", config, "--compile-only"], capsys)
    err = error_line(err)
    assert time.perf_counter() - started < 1.0
    assert code == 2 and "big.yaml [g @ 0.99]" in err
    assert "9000000 nonzeros" in err and "MB of SASS" in err and "min to compile" in err


def test_work_beyond_half_the_memory_is_refused_with_the_estimate(tmp_path, capsys, monkeypatch):
    from sparsert_cli import limits

    monkeypatch.setattr(limits, "machine_memory", lambda: 2 * 10**9)   # a 2 GB machine
    config = _inline(tmp_path, "{id: g, op: gemm, m: 8192, k: 8192, n: 64}", 0.999)
    code, _, err = run(["bench", config, "--compile-only"], capsys)
    err = error_line(err)
    assert code == 2 and "big.yaml [g @ 0.999]" in err
    assert "needs ~" in err and "GB of memory" in err and "2.0 GB" in err


def test_out_of_memory_names_the_config_and_case(tmp_path, capsys, monkeypatch):
    from sparsert_cli import bench

    def no_memory(*args):
        raise MemoryError
    monkeypatch.setattr(bench, "generate", no_memory)
    config = _inline(tmp_path, "{id: g, op: gemm, m: 8, k: 8, n: 8}", 0.5)
    code, _, err = run(["bench", config, "--compile-only"], capsys)
    err = error_line(err)
    assert code == 2 and "big.yaml [g @ 0.5]: out of memory" in err


@pytest.mark.parametrize("doc", [
    {"entries": [1, 2]}, {"entries": None}, [1], {"entries": {"k": 1}},
    {"entries": {"k": {"params": [1]}}}, {"entries": {"k": {"params": {"vector_width": "4"}}}},
    {"entries": {"k": {"params": {"balance": 3}}}},
])
def test_malformed_tuned_database_is_one_line_naming_the_file(tmp_path, capsys, repo, doc):
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(doc))
    code, _, err = run(["bench", str(repo / "configs" / "ci.yaml"), "--compile-only",
                        "--problems", "ci_gemm_odd", "--tuned", str(path),
                        "--out", str(tmp_path / "r.json")], capsys)
    assert code == 2 and str(path) in err
    assert not (tmp_path / "r.json").exists()


def test_tuned_entries_of_an_older_version_are_kept_for_retuning(tmp_path):
    from sparsert_cli.problem_shape import Geometry
    from sparsert_cli.tune import TunedDB

    path = tmp_path / "tuned.json"
    geometry = Geometry(1, 4, 1, 8, 4)
    key = TunedDB.key("h", geometry, "G", "fp32")
    path.write_text(json.dumps({"entries": {key: {"params": {"unroll": 4}}}}))
    assert TunedDB(path).lookup("h", geometry, "G", "fp32") is None


def test_huge_scipy_weight_with_three_nonzeros_stays_sparse(tmp_path):
    import time
    import tracemalloc

    from sparsert_cli.build import make_plan
    from sparsert_cli.patterns import fit_to_op, load_pattern, pattern_hash
    from sparsert_cli.problems import Problem

    path = tmp_path / "w.npz"
    sp.save_npz(path, sp.csr_matrix(([1.0, 2.0, 3.0], ([0, 5, 16383], [3, 7, 16000])),
                                    shape=(16384, 16384), dtype=np.float32))
    started = time.perf_counter()
    tracemalloc.start()
    weight = fit_to_op(load_pattern(path), "gemm", str(path))
    plan = make_plan(Problem("w", "gemm", 16384, 16384, width=8), weight)
    digest = pattern_hash(weight)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert plan.nnz == 3 and len(digest) == 16
    assert peak < 32 * 2**20                       # dense would be 1 GiB
    assert time.perf_counter() - started < 10      # ~0.7 s alone; the box is shared


def test_gen_of_a_huge_sparse_weight_refuses_too_many_nonzeros(tmp_path, capsys, monkeypatch):
    from sparsert_cli import limits

    monkeypatch.setattr(limits, "MAX_NONZEROS", 2)
    path = tmp_path / "w.npz"
    sp.save_npz(path, sp.csr_matrix(([1.0, 2.0, 3.0], ([0, 5, 9], [3, 7, 1])), shape=(10, 10)))
    code, _, err = _gen(capsys, path)
    assert code == 2 and "w.npz: 3 nonzeros is beyond the 2" in err
