"""The command line end to end, without a GPU: gen/inspect/problems/bench/cache through click's
CliRunner or a real subprocess, and every bad input as exit code 2 with one line on stderr that
names the file or flag, leaving nothing behind."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from cli_helpers import run_main
from click.testing import CliRunner

from sparsert_cli import __version__
from sparsert_cli.cli import group
from sparsert_cli.gpu.runtime import have_gpu

pytestmark = pytest.mark.usefixtures("isolated_cache", "wide_terminal")

MANIFEST_FIELDS = {"entry", "grid", "block", "shared_bytes", "arguments", "dtype", "arch",
                   "registers", "spill_store_bytes", "spill_load_bytes", "compile_seconds",
                   "nnz", "pattern_hash", "cubin", "source", "emitter", "problem", "plan",
                   "cubin_sha256", "stack_bytes", "epilogue"}

no_gpu_only = pytest.mark.skipif(have_gpu(), reason="checks the no-GPU path")


def _invoke(args, ok=True):
    result = CliRunner().invoke(group, args, catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


_main = run_main


def _gemm_file(tmp_path, name="layer.npy", shape=(20, 30), density=0.2, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) >= density] = 0
    w.ravel()[0] = 1.0
    path = tmp_path / name
    np.save(path, w)
    return path, w


def _conv_file(tmp_path, shape=(8, 4, 3, 3), density=0.4, seed=1):
    return _gemm_file(tmp_path, "conv.npy", shape, density, seed)


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


# ---------------------------------------------------------------- gen


def test_gen_gemm_writes_source_cubin_and_manifest(tmp_path):
    path, weight = _gemm_file(tmp_path)
    out = tmp_path / "out"
    result = _invoke(["gen", "--pattern", str(path), "--n", "33", "-o", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["kernel.cubin", "kernel.ptx",
                                                     "manifest.json", "weights.npz"]
    doc = _manifest(out)
    assert MANIFEST_FIELDS <= set(doc)
    assert doc["verify_cpu"]["ok"] and doc["verify_cpu"]["checks"] == 2   # checked before writing
    assert doc["entry"] in result.output
    cubin = (out / "kernel.cubin").read_bytes()
    assert cubin[:4] == b"\x7fELF"
    assert doc["cubin_sha256"] == hashlib.sha256(cubin).hexdigest()
    assert doc["cubin_bytes"] == len(cubin)
    assert f".visible .entry {doc['entry']}(" in (out / "kernel.ptx").read_text()
    assert doc["nnz"] == int(np.count_nonzero(weight))
    assert doc["problem"]["op"] == "gemm"
    assert (doc["problem"]["m"], doc["problem"]["k"], doc["problem"]["n"]) == (20, 30, 33)
    assert doc["arch"] == "sm_90" and doc["dtype"] == "fp32" and doc["emitter"] == "ptx"
    assert doc["spill_store_bytes"] == doc["spill_load_bytes"] == 0
    assert doc["registers"] > 0 and doc["compile_seconds"] >= 0
    assert [a["name"] for a in doc["arguments"]] == ["x", "y"]
    assert doc["arguments"][0]["shape"] == [1, 30, 1, 33]
    assert doc["arguments"][1]["shape"] == [1, 20, 1, 33]
    threads = doc["block"][0] * doc["block"][1]
    assert doc["grid"][0] * doc["block"][0] * doc["plan"]["vector_width"] >= 33
    assert 32 <= threads <= 1024 and doc["shared_bytes"] >= 0
    assert len(doc["pattern_hash"]) == 16


def test_gen_emit_cuda_writes_kernel_cu(tmp_path):
    path, _ = _gemm_file(tmp_path)
    out = tmp_path / "out_cu"
    _invoke(["gen", "--pattern", str(path), "--n", "16", "--emit", "cuda", "-o", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["kernel.cu", "kernel.cubin",
                                                     "manifest.json", "weights.npz"]
    doc = _manifest(out)
    assert doc["source"] == "kernel.cu" and doc["emitter"] == "cuda"
    assert doc["entry"] in (out / "kernel.cu").read_text()
    assert (out / "kernel.cubin").read_bytes()[:4] == b"\x7fELF"


def test_gen_conv3x3_stride2_pads_by_default_and_takes_a_zero_buffer(tmp_path):
    path, weight = _conv_file(tmp_path)
    out = tmp_path / "out3"
    result = _invoke(["gen", "--pattern", str(path), "--height", "9", "--width", "7",
                      "--stride", "2", "--json", "-o", str(out)])
    printed = json.loads(result.output)
    doc = _manifest(out)
    assert printed == doc
    p = doc["problem"]
    assert p["op"] == "conv3x3" and (p["kernel"], p["stride"], p["padding"]) == (3, 2, 1)
    assert (p["out_height"], p["out_width"]) == (5, 4)
    assert (p["m"], p["k"], p["n"]) == (8, 36, 20)
    assert [a["name"] for a in doc["arguments"]] == ["x", "y", "z"]
    assert doc["arguments"][2]["shape"] == [4, 9, 7]
    assert doc["nnz"] == int(np.count_nonzero(weight))


def test_gen_with_fused_epilogue_and_plan_override(tmp_path):
    path, _ = _gemm_file(tmp_path)
    bias = tmp_path / "bias.npy"
    np.save(bias, np.linspace(-1, 1, 20))
    out = tmp_path / "out_epi"
    _invoke(["gen", "--pattern", str(path), "--n", "64", "--bias", str(bias), "--activation",
             "relu6", "--residual", "--plan", "rows_per_group=4", "--plan", "k_split=2",
             "-o", str(out)])
    doc = _manifest(out)
    assert doc["epilogue"] == {"bias": True, "activation": "relu6", "residual": True}
    assert doc["plan"]["rows_per_group"] == 4 and doc["plan"]["k_split"] == 2
    assert doc["block"][1] == 2 and doc["shared_bytes"] > 0
    assert [a["name"] for a in doc["arguments"]] == ["x", "y", "res"]


def test_gen_gelu_builds_a_streamed_kernel_and_the_immediate_family_refuses_it(tmp_path,
                                                                               capsys):
    path, _ = _gemm_file(tmp_path)
    out = tmp_path / "out_gelu"
    _invoke(["gen", "--pattern", str(path), "--n", "64", "--activation", "gelu", "-o", str(out)])
    doc = _manifest(out)
    assert doc["epilogue"]["activation"] == "gelu" and doc["family"] == "streamed"
    assert "sparsert_gelu" in (out / doc["source"]).read_text()
    code, _, err = _main(["gen", "--pattern", str(path), "--n", "64", "--activation", "gelu",
                          "--family", "immediate", "-o", str(tmp_path / "no")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].endswith("layer.npy: activation gelu is built by the streamed family only")


@no_gpu_only
def test_bench_a_gelu_config_compiles_and_verifies_in_the_streamed_family(tmp_path, capsys):
    config = tmp_path / "gelu.yaml"
    config.write_text("name: gelu\nproblems:\n"
                      "  - {id: g_odd, op: gemm, m: 37, k: 53, n: 129}\n"
                      "  - {id: g_3x3, op: conv3x3, out_channels: 12, in_channels: 8, height: 9,"
                      " width: 7, stride: 2, padding: 1, batch: 2}\n"
                      "sparsity: [0.8]\nepilogue: {bias: true, activation: gelu, residual: true}\n")
    out = tmp_path / "r" / "gelu.json"
    code, _, err = _main(["bench", str(config), "--jobs", "1", "--out", str(out)], capsys)
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert [c["family"] for c in doc["cases"]] == ["streamed", "streamed"]
    assert all(c["compile"]["ok"] and c["verify_cpu"]["ok"] for c in doc["cases"])


def test_gen_sparsity_prunes_a_dense_weight(tmp_path):
    path, _ = _gemm_file(tmp_path, density=1.0)
    out = tmp_path / "pruned"
    _invoke(["gen", "--pattern", str(path), "--n", "8", "--sparsity", "0.9", "-o", str(out)])
    assert _manifest(out)["nnz"] == 60


def test_gen_again_is_a_cache_hit_and_replaces_the_directory(tmp_path):
    path, _ = _gemm_file(tmp_path)
    out = tmp_path / "again"
    args = ["gen", "--pattern", str(path), "--n", "33", "-o", str(out)]
    _invoke(args)
    first = _manifest(out)
    _invoke(args)
    second = _manifest(out)
    assert not first["cached"] and second["cached"]
    assert second["cubin_sha256"] == first["cubin_sha256"]


def test_gen_refuses_to_overwrite_a_foreign_directory(tmp_path, capsys):
    path, _ = _gemm_file(tmp_path)
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = _main(["gen", "--pattern", str(path), "--n", "8", "-o", str(out)], capsys)
    assert code == 2 and str(out) in err
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def _bad_gen_cases(tmp_path):
    good, _ = _gemm_file(tmp_path)
    nan = tmp_path / "nan.npy"
    np.save(nan, np.array([[np.nan, 1.0], [0.0, 2.0]]))
    three = tmp_path / "three.npy"
    np.save(three, np.ones((2, 3, 4)))
    conv, _ = _conv_file(tmp_path)
    g = str(good)
    return {
        # name: (args, text the one stderr line must contain)
        "nan_weights": (["--pattern", str(nan), "--n", "4"], str(nan)),
        "three_d_array": (["--pattern", str(three), "--n", "4"], str(three)),
        "n_zero": (["--pattern", g, "--n", "0"], "--n"),
        "sparsity_too_big": (["--pattern", g, "--n", "4", "--sparsity", "1.5"], "--sparsity"),
        "gemm_without_n": (["--pattern", g], "--n"),
        "gemm_with_height": (["--pattern", g, "--n", "4", "--height", "3"], "--height"),
        "conv_with_n": (["--pattern", str(conv), "--n", "4"], "--n"),
        "conv_without_width": (["--pattern", str(conv), "--height", "4"], "--width"),
        "conv_output_empty": (["--pattern", str(conv), "--height", "1", "--width", "1",
                               "--padding", "0"], "output size"),
        "negative_padding": (["--pattern", str(conv), "--height", "4", "--width", "4",
                              "--padding", "-1"], "--padding"),
        "missing_file": (["--pattern", str(tmp_path / "nope.npy"), "--n", "4"], "nope.npy"),
        "wrong_suffix": (["--pattern", str(tmp_path / "w.txt"), "--n", "4"], "w.txt"),
        "plan_unknown_key": (["--pattern", g, "--n", "4", "--plan", "bogus=1"], "bogus"),
        "plan_not_key_value": (["--pattern", g, "--n", "4", "--plan", "rows"], "--plan"),
        "plan_not_integer": (["--pattern", g, "--n", "4", "--plan", "k_split=two"], "k_split"),
        "plan_out_of_range": (["--pattern", g, "--n", "4", "--plan", "vector_width=3"],
                              "vector_width"),
        "arch_malformed": (["--pattern", g, "--n", "4", "--arch", "sm90x"], "--arch"),
        "n_not_integer": (["--pattern", g, "--n", "abc"], "--n"),
        "unknown_emit": (["--pattern", g, "--n", "4", "--emit", "sass"], "--emit"),
        "op_does_not_fit": (["--pattern", str(conv), "--op", "conv1x1", "--height", "4",
                             "--width", "4"], "1x1 kernel"),
        "bias_wrong_length": (["--pattern", g, "--n", "4", "--bias", str(nan)], str(nan)),
        "missing_pattern_option": (["--n", "4"], "--pattern"),
    }


BAD_GEN = ["nan_weights", "three_d_array", "n_zero", "sparsity_too_big", "gemm_without_n",
           "gemm_with_height", "conv_with_n", "conv_without_width", "conv_output_empty",
           "negative_padding", "missing_file", "wrong_suffix", "plan_unknown_key",
           "plan_not_key_value", "plan_not_integer", "plan_out_of_range", "arch_malformed",
           "n_not_integer", "unknown_emit", "op_does_not_fit", "bias_wrong_length",
           "missing_pattern_option"]


@pytest.mark.parametrize("name", BAD_GEN)
def test_bad_gen_input_is_exit_2_one_line_and_writes_nothing(tmp_path, capsys, isolated_cache,
                                                            name):
    (tmp_path / "w.txt").write_text("not a weight")
    args, needle = _bad_gen_cases(tmp_path)[name]
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    code, stdout, err = _main(["gen", *args, "-o", str(out)], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sparsert: ")
    assert needle in lines[0]
    assert "Traceback" not in err
    assert not out.exists()
    assert not isolated_cache.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("arch", ["sm_90x", "sm_35", "sm_999"])
def test_gen_unusable_arch_is_a_one_line_error(tmp_path, capsys, arch):
    path, _ = _gemm_file(tmp_path)
    out = tmp_path / "out"
    try:
        code, _, err = _main(["gen", "--pattern", str(path), "--n", "4", "--arch", arch,
                              "-o", str(out)], capsys)
    except Exception as exc:            # what the console script would print as a traceback
        pytest.fail(f"traceback instead of a one-line error: {type(exc).__name__}: {exc}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and arch in err
    assert not out.exists()


@pytest.mark.parametrize("flag, value", [("--stride", "2"), ("--padding", "1"), ("--batch", "3")])
def test_gen_gemm_rejects_conv_only_flags(tmp_path, capsys, flag, value):
    path, _ = _gemm_file(tmp_path)
    out = tmp_path / "out"
    code, _, err = _main(["gen", "--pattern", str(path), "--n", "8", flag, value, "-o", str(out)],
                         capsys)
    assert code == 2 and flag in err
    assert not out.exists()


def test_debug_flag_shows_a_traceback_for_user_errors(tmp_path, capsys):
    path = tmp_path / "nope.npy"
    code, out, err = _main(["--debug", "gen", "--pattern", str(path), "--n", "4"], capsys)
    assert code == 2
    assert "Traceback" in out + err and "no such file" in err


# ---------------------------------------------------------------- inspect


def _generated(tmp_path):
    path, _ = _gemm_file(tmp_path)
    out = tmp_path / "gen_out"
    _invoke(["gen", "--pattern", str(path), "--n", "40", "-o", str(out)])
    return out


def test_inspect_shows_entry_and_checks_the_cubin(tmp_path):
    out = _generated(tmp_path)
    doc = _manifest(out)
    result = _invoke(["inspect", str(out)])
    assert doc["entry"] in result.output
    assert "ok" in result.output and doc["pattern_hash"] in result.output


def test_inspect_json_parses_and_reports_cubin_check(tmp_path):
    out = _generated(tmp_path)
    parsed = json.loads(_invoke(["inspect", str(out), "--json"]).output)
    assert parsed["entry"] == _manifest(out)["entry"]
    assert parsed["cubin_check"] == "ok"


def test_inspect_of_a_non_output_directory_is_exit_2(tmp_path, capsys):
    code, _, err = _main(["inspect", str(tmp_path)], capsys)
    assert code == 2 and "no manifest.json" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "manifest.json").write_text("{not json")
    code, _, err = _main(["inspect", str(tmp_path)], capsys)
    assert code == 2 and "not valid JSON" in err


def test_inspect_of_an_incomplete_manifest_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text(json.dumps({"entry": "sparsert_x"}))
    code, _, err = _main(["inspect", str(tmp_path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "manifest.json" in err


# ---------------------------------------------------------------- problems


def test_problems_lists_every_shipped_problem(repo):
    output = _invoke(["problems"]).output
    for path in (repo / "problems").glob("*.yaml"):
        assert path.stem in output


def test_problems_json_lists_every_shipped_problem(repo):
    docs = json.loads(_invoke(["problems", "--json"]).output)
    assert sorted(d["id"] for d in docs) == sorted(p.stem for p in
                                                   (repo / "problems").glob("*.yaml"))


def test_problems_of_ci_config_as_json(repo):
    docs = json.loads(_invoke(["problems", str(repo / "configs" / "ci.yaml"), "--json"]).output)
    assert [d["id"] for d in docs] == ["ci_gemm_odd", "ci_gemm_vec", "ci_pw_batch2",
                                       "ci_pw_stride2", "ci_3x3_pad1", "ci_3x3_s2_b2",
                                       "ci_3x3_pad0"]
    first = docs[0]
    assert (first["m"], first["k"], first["n"]) == (37, 53, 129)
    assert first["nnz"] == {"0.8": 37 * 53 - round(0.8 * 37 * 53),
                            "0.95": 37 * 53 - round(0.95 * 37 * 53)}
    s2 = next(d for d in docs if d["id"] == "ci_3x3_s2_b2")
    assert (s2["k"], s2["n"]) == (72, 2 * 5 * 4)


def test_problems_of_a_bad_config_is_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("problems: [nosuch]\nsparsity: 0.9\n")
    code, _, err = _main(["problems", str(bad)], capsys)
    assert code == 2 and "nosuch" in err and str(bad) in err


# ---------------------------------------------------------------- bench


def _run_cli(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "sparsert_cli.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@no_gpu_only
def test_bench_ci_without_gpu_compiles_and_verifies_every_case(repo, tmp_path, subprocess_env):
    out = tmp_path / "res" / "ci.json"
    proc = _run_cli(["bench", str(repo / "configs" / "ci.yaml"), "--out", str(out)],
                    subprocess_env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "no GPU" in proc.stderr
    doc = json.loads(out.read_text())
    assert doc["mode"] == "compile-only" and doc["failures"] == []
    assert doc["config"]["name"] == "ci" and doc["arch"] == "sm_90"
    assert len(doc["cases"]) == 14
    for case in doc["cases"]:
        assert case["compile"]["ok"], case
        assert case["compile"]["spill_bytes"] == 0
        assert case["verify_cpu"]["ok"], case
        assert case["family"] == "immediate"          # which family ran each case
    rows = list(csv.DictReader(io.StringIO(out.with_suffix(".csv").read_text())))
    assert {row["family"] for row in rows} == {"immediate"}
    assert len(rows) == 14
    assert {r["verified"] for r in rows} == {"True"}
    assert {(r["problem"], float(r["sparsity"])) for r in rows} == {
        (c["problem"], c["sparsity"]) for c in doc["cases"]}
    assert not (tmp_path / "results").exists()
    # the second run is served from the cache
    again = _run_cli(["bench", str(repo / "configs" / "ci.yaml"), "--out", str(out)],
                     subprocess_env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert all(c["compile"]["cached"] for c in json.loads(out.read_text())["cases"])


@pytest.mark.slow
@no_gpu_only
def test_bench_subset_with_cuda_emitter_and_explicit_csv(repo, tmp_path, capsys):
    out, csv_path = tmp_path / "a.json", tmp_path / "b" / "a.csv"
    code, _, err = _main(["bench", str(repo / "configs" / "ci.yaml"), "--problems",
                          "ci_3x3_s2_b2,ci_gemm_odd", "--sparsity", "0.9", "--emit", "cuda",
                          "--jobs", "1", "--out", str(out), "--csv", str(csv_path)], capsys)
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert doc["config"]["emit"] == "cuda"
    assert [(c["problem"], c["sparsity"]) for c in doc["cases"]] == [
        ("ci_3x3_s2_b2", 0.9), ("ci_gemm_odd", 0.9)]
    assert all(c["verify_cpu"]["ok"] for c in doc["cases"])
    assert csv_path.exists()


@no_gpu_only
def test_bench_require_gpu_exits_3_and_writes_nothing(repo, tmp_path, capsys):
    out = tmp_path / "r" / "ci.json"
    code, _, err = _main(["bench", str(repo / "configs" / "ci.yaml"), "--require-gpu",
                          "--out", str(out)], capsys)
    assert code == 3
    assert len(err.strip().splitlines()) == 1 and "GPU" in err
    assert not out.parent.exists()


@pytest.mark.parametrize("args, needle", [
    (["--problems", "nosuch"], "nosuch"),
    (["--sparsity", "1.5"], "sparsity"),
    (["--sparsity", "abc"], "abc"),
    (["--accumulate", "fp16"], "--accumulate fp16 needs --dtype fp16"),
])
def test_bench_bad_selection_is_exit_2_one_line(repo, tmp_path, capsys, args, needle):
    out = tmp_path / "r" / "x.json"
    code, _, err = _main(["bench", str(repo / "configs" / "ci.yaml"), *args, "--out", str(out)],
                         capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert not out.parent.exists()


def test_bench_missing_config_is_exit_2(tmp_path, capsys):
    code, _, err = _main(["bench", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "nope.yaml" in err and len(err.strip().splitlines()) == 1


def test_git_commit_is_none_when_the_repository_has_no_commits(tmp_path, monkeypatch):
    from sparsert_cli import bench as B

    empty = tmp_path / "empty_repo"
    empty.mkdir()
    subprocess.run(["git", "init", "-q", str(empty)], check=True)
    real_run = subprocess.run

    def run_in_empty_repo(cmd, **kwargs):
        kwargs["cwd"] = empty
        return real_run(cmd, **kwargs)

    monkeypatch.setattr(B.subprocess, "run", run_in_empty_repo)
    assert B.git_commit() is None


def test_git_commit_marks_a_dirty_working_tree(tmp_path, monkeypatch):
    from sparsert_cli import bench as B

    repo = tmp_path / "r"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "f").write_text("a")
    subprocess.run(git + ["add", "f"], check=True)
    subprocess.run(git + ["commit", "-qm", "c"], check=True)
    real_run = subprocess.run
    monkeypatch.setattr(B.subprocess, "run", lambda cmd, **kw: real_run(cmd, **{**kw, "cwd": repo}))
    clean = B.git_commit()
    assert clean and len(clean) == 40
    (repo / "f").write_text("b")
    assert B.git_commit() == clean + "+dirty"


# ---------------------------------------------------------------- misc


def test_version_flag_prints_the_package_version():
    result = _invoke(["--version"])
    assert result.output.strip() == f"sparsert, version {__version__}"


def test_version_via_the_module_entry_point(subprocess_env, tmp_path):
    proc = _run_cli(["--version"], subprocess_env, tmp_path)
    assert proc.returncode == 0 and __version__ in proc.stdout


def test_unknown_command_is_exit_2_one_line(capsys):
    code, _, err = _main(["frobnicate"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "frobnicate" in err


def test_help_lists_the_commands():
    output = _invoke(["--help"]).output
    for name in ("bench", "gen", "problems", "inspect", "cache"):
        assert name in output


def test_cache_command_counts_and_clears(tmp_path, isolated_cache):
    _generated(tmp_path)
    output = _invoke(["cache"]).output
    assert str(isolated_cache) in output and "1 kernels" in output
    _invoke(["cache", "--clear"])
    assert not isolated_cache.exists()
    assert "0 kernels" in _invoke(["cache"]).output
