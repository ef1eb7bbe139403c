"""Issue 14 hardening of the commands: outputs checked before any compile, Ctrl-C ends a cold
compile at once, `inspect` fails on a damaged kernel, and the command line itself (help with no
arguments, --debug anywhere, help for every option, tables not cut in CI logs)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import click
import numpy as np
import pytest
from cli_helpers import run_main

from sparsert_cli import build as B
from sparsert_cli.cli import group


@pytest.fixture(autouse=True)
def _isolated(isolated_cache, wide_terminal):
    return isolated_cache


def one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1


def weight_file(tmp_path):
    w = np.zeros((6, 8), np.float32)
    w[0, 1], w[3, 4], w[5, 0] = 1.5, -2.0, 0.25
    path = tmp_path / "w.npy"
    np.save(path, w)
    return path


def config_file(tmp_path, name="small", extra=""):
    path = tmp_path / "c.yaml"
    path.write_text(f"name: {name}\nproblems: [{{id: g, op: gemm, m: 8, k: 12, n: 16}}]\n"
                    f"sparsity: 0.5\n{extra}")
    return path


@pytest.fixture
def no_compile(monkeypatch):
    """Any compile fails the test: the error must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("compiled before checking the outputs")
    monkeypatch.setattr(B, "build_kernel", refuse)
    monkeypatch.setattr(B, "build_all", refuse)


# ---------------------------------------------------------------- Ctrl-C during a cold compile


def _interrupting_worker(plan, emitter, arch, root, threads, dependent_launch=False):
    """A compile that takes long; the first one to start presses Ctrl-C in the parent."""
    try:
        os.close(os.open(os.environ["SPARSERT_TEST_FLAG"], os.O_CREAT | os.O_EXCL))
        os.kill(os.getppid(), signal.SIGINT)
    except FileExistsError:
        pass
    time.sleep(10)
    return None, 10.0


@pytest.fixture
def interrupting(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSERT_TEST_FLAG", str(tmp_path / "interrupted"))
    monkeypatch.setattr(B, "_worker", _interrupting_worker)


def _no_new_children(before, wait=3.0):
    """No worker started by the call is still alive (children other tests left are not ours)."""
    deadline = time.perf_counter() + wait
    while time.perf_counter() < deadline:
        left = set(multiprocessing.active_children()) - before
        if not left:
            return True
        time.sleep(0.05)
    return False


def _fake_plans(count):
    return [SimpleNamespace(nnz=100 - i, vector_width=1, precision="fp32") for i in range(count)]


def test_ctrl_c_cancels_queued_compiles_and_ends_running_ones(interrupting):
    before = set(multiprocessing.active_children())
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        B.build_all(_fake_plans(6), jobs=2)
    assert time.perf_counter() - start < 5       # not 3 rounds of 10 s
    assert _no_new_children(before)


def test_ctrl_c_is_prompt_after_nvrtc_ran_in_this_process(interrupting):
    """NVRTC's signal handlers stop SIGINT from waking a blocked wait: build_all polls."""
    from sparsert_cli.problems import Problem

    weight = np.zeros((6, 8), np.float32)
    weight[0, 1] = 1.0
    plan = B.make_plan(Problem("g", "gemm", 6, 8, height=1, width=16), weight)
    B.build_kernel(plan, "cuda", "sm_90")
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        B.build_all(_fake_plans(6), jobs=2)
    assert time.perf_counter() - start < 5


def test_an_interrupt_in_the_progress_callback_stops_the_pool_too(monkeypatch):
    def on_done(i, build, seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(B, "_worker", _quick_then_slow)
    before = set(multiprocessing.active_children())
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        B.build_all(_fake_plans(6), jobs=2, on_done=on_done)
    assert time.perf_counter() - start < 5
    assert _no_new_children(before)


def _quick_then_slow(plan, emitter, arch, root, threads):
    time.sleep(0 if plan.nnz == 100 else 10)
    return None, 0.0


def test_ctrl_c_in_bench_prints_interrupted_and_exits_130(tmp_path, capsys, monkeypatch,
                                                           interrupting):
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    before = set(multiprocessing.active_children())
    code, _, err = run_main(["bench", "ci", "--compile-only", "--no-cache"], capsys)
    assert code == 130 and err.strip().splitlines()[-1] == "interrupted"
    assert time.perf_counter() - start < 5
    assert not (tmp_path / "results").exists()
    assert _no_new_children(before)


# ---------------------------------------------------------------- outputs checked first


def test_a_config_name_too_long_for_a_file_fails_before_compiling(tmp_path, capsys,
                                                                  monkeypatch, no_compile):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(["bench", str(config_file(tmp_path, "x" * 300))], capsys)
    assert code == 2 and one_line(err) and "'name' must be up to 100" in err
    assert not (tmp_path / "results").exists()


def test_out_and_csv_naming_the_same_file_is_refused(tmp_path, capsys, no_compile):
    same = tmp_path / "r.json"
    code, _, err = run_main(["bench", str(config_file(tmp_path)), "--out", str(same),
                             "--csv", str(same)], capsys)
    assert code == 2 and one_line(err) and "same file" in err and not same.exists()


def test_out_that_is_a_directory_is_refused(tmp_path, capsys, no_compile):
    code, _, err = run_main(["bench", str(config_file(tmp_path)), "--csv", str(tmp_path)],
                            capsys)
    assert code == 2 and one_line(err) and "is a directory" in err


def test_a_missing_tuned_database_is_an_error_not_an_untuned_run(tmp_path, capsys, no_compile):
    missing = tmp_path / "missing.json"
    code, _, err = run_main(["bench", str(config_file(tmp_path)), "--tuned", str(missing),
                             "--out", str(tmp_path / "r.json")], capsys)
    assert code == 2 and one_line(err) and str(missing) in err
    assert not (tmp_path / "r.json").exists()


def test_gen_with_foreign_files_in_the_output_is_refused_before_compiling(tmp_path, capsys,
                                                                          no_compile):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_main(["gen", "--pattern", str(weight_file(tmp_path)), "--n", "8",
                             "-o", str(out)], capsys)
    assert code == 2 and one_line(err) and "notes.txt" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_gen_output_under_a_file_names_the_file(tmp_path, capsys, no_compile):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = run_main(["gen", "--pattern", str(weight_file(tmp_path)), "--n", "8",
                             "-o", str(afile / "sub")], capsys)
    assert code == 2 and one_line(err) and f"{afile} is a file" in err
    assert "File exists" not in err


# ---------------------------------------------------------------- output names, plan widths


def test_bench_dtype_fp16_names_its_results_by_precision(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = config_file(tmp_path)
    for args in ([], ["--dtype", "fp16"], ["--dtype", "fp16", "--accumulate", "fp32"]):
        code, _, err = run_main(["bench", str(config), "--compile-only", *args], capsys)
        assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "results" / "local").glob("*.json")) == [
        "small-fp16.json", "small-fp16acc32.json", "small.json"]
    assert json.loads((tmp_path / "results/local/small.json").read_text())["precision"] == "fp32"


def test_a_config_of_its_own_precision_keeps_its_name(repo):
    from sparsert_cli.commands.bench import output_paths, select
    from sparsert_cli.config import load_config

    config = load_config(repo / "configs" / "paper20-fp16.yaml")
    assert output_paths(config, config.precision)[0].name == "paper20-fp16.json"
    fp32 = select(config, [], [], "fp32")
    assert output_paths(fp32, config.precision)[0].name == "paper20-fp16-fp32.json"


def test_gen_refuses_a_vector_width_fp32_cannot_load(tmp_path, capsys, no_compile):
    code, _, err = run_main(["gen", "--pattern", str(weight_file(tmp_path)), "--n", "64",
                             "--plan", "vector_width=8", "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and one_line(err) and "vector_width 8" in err and "at most 4" in err


def test_gen_accepts_vector_width_8_for_fp16(tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = run_main(["gen", "--pattern", str(weight_file(tmp_path)), "--n", "64",
                             "--dtype", "fp16", "--plan", "vector_width=8", "-o", str(out),
                             "--json"], capsys)
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["plan"]["vector_width"] == 8


def test_bench_refuses_a_config_vector_width_its_dtype_cannot_load(tmp_path, capsys,
                                                                   no_compile):
    config = config_file(tmp_path, extra="plan: {vector_width: 8}\n")
    code, _, err = run_main(["bench", str(config), "--out", str(tmp_path / "r.json")], capsys)
    assert code == 2 and one_line(err) and str(config) in err and "at most 4" in err


# ---------------------------------------------------------------- inspect of a damaged kernel


@pytest.fixture
def generated(tmp_path, capsys):
    out = tmp_path / "k"
    code, _, err = run_main(["gen", "--pattern", str(weight_file(tmp_path)), "--n", "8",
                             "-o", str(out)], capsys)
    assert code == 0, err
    return out


def _edit_manifest(out, **changes):
    doc = json.loads((out / "manifest.json").read_text())
    doc.update(changes)
    (out / "manifest.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("cubin", [None, 3, "", "../k/kernel.cubin"])
def test_inspect_of_a_manifest_with_a_bad_cubin_name_is_one_line(generated, capsys, cubin):
    _edit_manifest(generated, cubin=cubin)
    for args in ([], ["--json"]):
        code, out, err = run_main(["inspect", str(generated), *args], capsys)
        assert code == 2 and one_line(err) and "'cubin'" in err and out == ""


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_inspect_of_a_damaged_or_missing_cubin_is_exit_2(generated, capsys, damage):
    cubin = generated / "kernel.cubin"
    if damage == "missing":
        cubin.unlink()
    else:
        cubin.write_bytes(cubin.read_bytes()[:-1])
    for args in ([], ["--json"]):
        code, out, err = run_main(["inspect", str(generated), *args], capsys)
        assert code == 2 and one_line(err) and str(cubin) in err and out == ""


# ---------------------------------------------------------------- the command line itself


def test_no_arguments_prints_the_help(capsys):
    code, out, err = run_main([], capsys)
    assert code == 0 and out.startswith("Usage: sparsert") and "bench" in out and err == ""


def test_debug_works_after_the_subcommand(tmp_path, capsys):
    missing = tmp_path / "nope.npy"
    code, out, err = run_main(["gen", "--pattern", str(missing), "--n", "4", "--debug"], capsys)
    assert code == 2 and "Traceback" in out + err and "no such file" in err


@pytest.mark.parametrize("name", ["bench", "gen", "tune", "inspect", "problems"])
def test_every_option_has_help_text(name):
    command = group.get_command(click.Context(group), name)
    bare = [p.opts[0] for p in command.params if isinstance(p, click.Option) and not p.help]
    assert bare == []


def test_tables_are_not_cut_to_80_columns_in_a_pipe(tmp_path, subprocess_env):
    env = {k: v for k, v in subprocess_env.items() if k != "COLUMNS"}
    proc = subprocess.run([sys.executable, "-m", "sparsert_cli.cli", "problems"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout and "rn50_c5_3x3_s2" in proc.stdout
    assert max(len(line) for line in proc.stdout.splitlines()) > 80
