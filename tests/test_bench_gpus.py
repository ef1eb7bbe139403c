"""`bench --gpus`: cases spread over spawned workers (a fake per-case measure on the CPU)."""

from __future__ import annotations

import json

import pytest

from cli_helpers import run_main
from fake_measure import FakeBenchMeasure
from sparsert_cli.bench import run_benchmark
from sparsert_cli.commands.bench import select
from sparsert_cli.config import load_config
from sparsert_cli.errors import UserError

PROBLEMS = ["ci_gemm_odd", "ci_pw_stride2", "ci_3x3_pad0"]


@pytest.fixture(scope="module")
def config():
    return select(load_config("configs/ci.yaml"), PROBLEMS, [], None)


def bench(config, tmp_path, gpu_ids=None, **fake):
    from sparsert_cli.cache import KernelCache

    # plans for the GPU that runs them (the workers report "Fake GPU": the serial run too)
    return run_benchmark(config, tuned=False, cache=KernelCache(tmp_path / "cache"), jobs=1,
                         gpu_ids=gpu_ids, measure=FakeBenchMeasure(config, **fake),
                         gpu_name="Fake GPU")


def test_cases_split_over_two_workers_each_once(config, tmp_path):
    serial = bench(config, tmp_path)
    doc = bench(config, tmp_path, [0, 1], delay={i: 0.3 for i in range(6)})
    assert [(r["problem"], r["sparsity"]) for r in doc["cases"]] == \
        [(p.id, s) for p, s in config.cases()]
    assert not doc["failures"] and all(r["verify_gpu"]["ok"] for r in doc["cases"])
    assert [sorted(set(r) - {"gpu_slot"}) for r in doc["cases"]] == \
        [sorted(r) for r in serial["cases"]]
    assert {r["gpu_slot"] for r in doc["cases"]} == {0, 1}
    assert [g["device"] for g in doc["gpus"]] == ["0", "1"]
    assert [g["gpu"]["visible"] for g in doc["gpus"]] == ["0", "1"]   # CUDA_VISIBLE_DEVICES
    assert sum(g["cases"] for g in doc["gpus"]) == len(doc["cases"])
    assert doc["gpu"]["name"] == "Fake GPU" and doc["floors"] == doc["gpus"][0]["floors"]
    assert "gpus" not in serial and "gpu_slot" not in serial["cases"][0]
    assert json.loads(json.dumps(doc))["geomean"] == serial["geomean"]


def test_document_order_is_the_configs_not_completion(config, tmp_path):
    doc = bench(config, tmp_path, [0, 1], delay={0: 2.0})   # the first case finishes last
    assert [(r["problem"], r["sparsity"]) for r in doc["cases"]] == \
        [(p.id, s) for p, s in config.cases()]
    assert doc["cases"][0]["verify_gpu"]["ok"]


@pytest.mark.parametrize("what", ["exit", "sticky"])
def test_a_dead_worker_is_restarted_and_its_case_retried(config, tmp_path, what):
    doc = bench(config, tmp_path, [0, 1], crash={2: what}, marker_dir=str(tmp_path))
    assert not doc["failures"] and all(r["verify_gpu"]["ok"] for r in doc["cases"])
    assert sum(g["restarts"] for g in doc["gpus"]) == 1
    assert (tmp_path / "case-2").exists()


def test_a_case_that_kills_its_worker_twice_is_recorded_failed(config, tmp_path):
    doc = bench(config, tmp_path, [0, 1], crash={1: "exit"})
    bad = doc["cases"][1]
    assert doc["failures"] == [f"{bad['problem']}@{bad['sparsity']:g}"]
    assert bad["verify_gpu"] == {"ok": False, "message":
                                 "worker died (exit code 7) (after 2 attempts)"}
    assert all(r["verify_gpu"]["ok"] for i, r in enumerate(doc["cases"]) if i != 1)


def test_a_sticky_error_in_a_record_replaces_the_worker(config, tmp_path):
    doc = bench(config, tmp_path, [0], crash={0: "sticky-baseline"})
    assert doc["cases"][0]["baselines"]["cusparse"]["ok"] is False    # kept as measured
    assert doc["gpus"][0]["restarts"] == 1 and not doc["failures"]
    assert doc["gpus"][0]["cases"] == len(doc["cases"])


def test_different_gpu_models_are_refused(config):
    with pytest.raises(UserError, match=r"different models \(Fake GPU 0 / Fake GPU 1\)"):
        run_benchmark(config, tuned=False, gpu_ids=[0, 1],
                      measure=FakeBenchMeasure(config, mixed=True))


@pytest.mark.parametrize("value, message", [
    ("0,0", "--gpus: expected distinct device numbers, got '0,0'"),
    ("2", "--gpus: no device 2 (this machine has 2 GPU(s): 0..1)"),
    ("x", "--gpus: expected 'all' or device numbers like 0,1, got 'x'")])
def test_gpus_errors_are_one_line(capsys, monkeypatch, tmp_path, value, message):
    import sparsert_cli.executors as executors

    monkeypatch.setattr(executors, "gpu_count", lambda: 2)
    code, out, err = run_main(["bench", "configs/ci.yaml", "--gpus", value, "--out",
                               str(tmp_path / "r.json")], capsys)
    assert code == 2 and err.strip().splitlines() == [f"sparsert: {message}"]
    assert not (tmp_path / "r.json").exists()


def test_gpus_without_a_gpu_is_one_line_exit_3(capsys, monkeypatch, tmp_path):
    import sparsert_cli.executors as executors

    monkeypatch.setattr(executors, "gpu_count", lambda: 0)
    code, out, err = run_main(["bench", "configs/ci.yaml", "--gpus", "all", "--out",
                               str(tmp_path / "r.json")], capsys)
    assert code == 3 and len(err.strip().splitlines()) == 1 and "no GPU" in err
    code, out, err = run_main(["bench", "configs/ci.yaml", "--gpus", "all", "--compile-only"],
                              capsys)
    assert code == 2 and "--gpus and --compile-only exclude each other" in err


def test_a_worker_that_cannot_open_its_gpu_is_one_line_exit_3(capsys, monkeypatch, tmp_path):
    """The real BenchMeasure, pickled into a spawned worker that finds no GPU."""
    import sparsert_cli.executors as executors

    monkeypatch.setattr(executors, "gpu_count", lambda: 1)
    code, out, err = run_main(["bench", "configs/ci.yaml", "--gpus", "0", "--force-workers",
                               "--problems", "ci_gemm_odd", "--sparsity", "0.8", "--out",
                               str(tmp_path / "r.json")], capsys)
    assert code == 3, err
    assert err.strip().splitlines()[-1].startswith(
        "sparsert: GPU 0: bench worker did not start (NoGpuError: no CUDA driver or GPU")
    assert not (tmp_path / "r.json").exists()
