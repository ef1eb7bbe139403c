"""Regressions from the code review: inputs that once deleted files, crashed or printed a
traceback must now give one line, the right exit code, and touch nothing else."""

from __future__ import annotations

import json

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
                                                      "manifest.json"]


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
