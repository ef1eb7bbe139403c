"""Tuning at scale on the CPU: the tuning database, the job model, the multi-GPU executor (with a
fake timer in spawned workers), resume, crash isolation, and the Ray backend."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
from pathlib import Path

import pytest

from cli_helpers import run_main
from fake_measure import FakeMeasure, fake_us
from sparsert_cli.commands.bench import select
from sparsert_cli.config import load_config
from sparsert_cli.errors import UserError
from sparsert_cli.executors import parse_gpus, run_jobs
from sparsert_cli.executors.local import LocalExecutor
from sparsert_cli.jobs import (Job, case_inputs, compile_job, current_family, make_cases,
                               measure_job, winners)
from sparsert_cli.tune import TunedDB
from sparsert_cli.tunedb import TuneDB, export_entries

REPO = Path(__file__).resolve().parent.parent
FAMILY = current_family()


def small_config():
    return select(load_config(REPO / "configs" / "ci.yaml"), ["ci_gemm_odd", "ci_3x3_pad1"],
                  ["0.8"], None)


def _row(i: int, **kw) -> dict:
    row = {"pattern_hash": f"p{i % 3}", "shape": "b1c4h1w8m4k1s1p0", "precision": "fp32",
           "family": FAMILY[0], "family_version": FAMILY[1], "plan_name": f"plan{i}",
           "plan_json": json.dumps({"rows_per_group": 2 + i}), "candidate": i,
           "problem": "x", "sparsity": 0.9, "gpu_name": "G", "driver": "1", "median_us": 10.0 - i,
           "verified": True}
    return {**row, **kw}


def _writer(path: str, worker: int, count: int) -> None:
    with TuneDB(path) as db:
        for i in range(count):
            db.insert(_row(i, plan_name=f"w{worker}-{i}"))


def test_concurrent_writers_lose_no_rows(tmp_path):
    path = str(tmp_path / "t.sqlite")
    TuneDB(path).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with TuneDB(path) as db:
        assert db.count() == 160
        assert len({r["plan_name"] for r in db.rows()}) == 160
        assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_merge_copies_each_row_once(tmp_path):
    a, b, out = (str(tmp_path / n) for n in ("a.sqlite", "b.sqlite", "out.sqlite"))
    with TuneDB(a) as db:
        for i in range(3):
            db.insert(_row(i))
    with TuneDB(b) as db:
        for i in range(2):
            db.insert(_row(i, host="other"))
    with TuneDB(out) as db:
        assert db.merge(a) == 3 and db.merge(b) == 2
        assert db.merge(a) == 0 and db.merge(b) == 0
        assert db.count() == 5
    with TuneDB(a) as db:            # and back: only b's rows are new to a
        assert db.merge(out) == 2 and db.count() == 5


def test_export_keeps_the_best_verified_row(tmp_path):
    with TuneDB(tmp_path / "t.sqlite") as db:
        same = {"pattern_hash": "p0"}
        db.insert(_row(0, median_us=5.0, **same))                 # the default candidate
        db.insert(_row(1, median_us=3.0, **same))
        db.insert(_row(2, median_us=1.0, verified=False, error="verify: mismatch", **same))
        db.insert(_row(4, median_us=2.0, family_version="old", **same))  # an older family
        db.insert(_row(5, median_us=4.0, timestamp="2020-01-01T00:00:00+00:00", **same))
        db.insert(_row(5, median_us=6.0, timestamp="2021-01-01T00:00:00+00:00", **same))
        db.insert(_row(5, median_us=0.5, timestamp="2019-01-01T00:00:00+00:00", **same))
        entries = export_entries(db, {FAMILY})
    key = "p0|b1c4h1w8m4k1s1p0|G|fp32|" + "@".join(FAMILY)   # family@version: item 4
    assert list(entries) == [key]
    assert entries[key]["params"] == {"rows_per_group": 3}
    assert entries[key]["us"] == 3.0 and entries[key]["default_us"] == 5.0
    # the plan default_us timed travels with it (a later rule may default to another plan)
    assert entries[key]["default_params"] == json.loads(_row(0)["plan_json"])
    assert entries[key]["default_family"] == FAMILY[0]
    # plan 5 was re-measured: its latest time (6.0) counts, not its fastest (0.5)
    assert entries[key]["candidates"] == 4 and entries[key]["verified"] == 3


def test_bad_database_files_are_one_line(tmp_path):
    (tmp_path / "junk.sqlite").write_text("not a database\n" * 100)
    with pytest.raises(UserError, match="junk.sqlite: not a usable tuning database"):
        TuneDB(tmp_path / "junk.sqlite")
    with pytest.raises(UserError, match="no such tuning database"):
        TuneDB(tmp_path / "missing.sqlite", create=False)
    with pytest.raises(UserError, match="is a directory"):
        TuneDB(tmp_path)
    path = tmp_path / "future.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(UserError, match="version 99 is newer"):
        TuneDB(path)
    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE measurements (id INTEGER PRIMARY KEY, x TEXT)")
    conn.close()
    with pytest.raises(UserError, match="not a sparsert tuning database"):
        TuneDB(other)
    foreign = tmp_path / "foreign.sqlite"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE songs (title TEXT)")
    conn.commit()
    conn.close()
    before = foreign.read_bytes()
    for create in (True, False):
        with pytest.raises(UserError, match="no measurements table"):
            TuneDB(foreign, create=create)
    assert foreign.read_bytes() == before


def test_tunedb_commands(tmp_path, capsys):
    a, b, out = (tmp_path / n for n in ("a.sqlite", "b.sqlite", "out.sqlite"))
    with TuneDB(a) as db:
        db.insert(_row(0))
        db.insert(_row(1))
    with TuneDB(b) as db:
        db.insert(_row(2, precision="fp16"))
    code, text, _ = run_main(["tunedb", "merge", str(out), str(a), str(b)], capsys)
    assert code == 0 and "out.sqlite: 3 measurements" in text.replace("\n", "")
    code, text, _ = run_main(["tunedb", "show", str(out), "--json"], capsys)
    groups = json.loads(text)["groups"]
    assert code == 0 and sorted(g["precision"] for g in groups) == ["fp16", "fp32"]
    tuned = tmp_path / "tuned.json"
    code, text, _ = run_main(["tunedb", "export", str(out), "-o", str(tuned)], capsys)
    assert code == 0 and "3 tuned plans" in text
    assert len(TunedDB(tuned).entries) == 3
    code, out_text, err = run_main(["tunedb", "show", str(tmp_path / "nope.sqlite")], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "no such tuning database" in err
    assert not (tmp_path / "nope.sqlite").exists()
    (tmp_path / "junk.sqlite").write_text("junk\n" * 100)
    code, _, err = run_main(["tunedb", "merge", str(tmp_path / "new.sqlite"), str(a),
                             str(tmp_path / "junk.sqlite")], capsys)
    assert code == 2 and "junk.sqlite: not a usable tuning database" in err
    assert not (tmp_path / "new.sqlite").exists()


def test_tune_option_conflicts_and_missing_ray(tmp_path, capsys, monkeypatch):
    import sys

    config = str(REPO / "configs" / "ci.yaml")
    code, _, err = run_main(["tune", config, "--gpus", "0", "--ray", "auto"], capsys)
    assert code == 2 and "exclude each other" in err
    monkeypatch.setitem(sys.modules, "ray", None)       # as if the [ray] extra were missing
    code, _, err = run_main(["tune", config, "--ray", "auto", "--db",
                             str(tmp_path / "t.json")], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "sparsert[ray]" in err
    assert not (tmp_path / "t.json").exists()


def test_gpus_option():
    assert parse_gpus("all", 2) == [0, 1] and parse_gpus(None, 3) == [0, 1, 2]
    assert parse_gpus("1", 2) == [1]
    for bad, message in (("2", "no device 2"), ("a", "expected 'all'"), ("0,0", "distinct")):
        with pytest.raises(UserError, match=message):
            parse_gpus(bad, 2)
    with pytest.raises(UserError, match="no GPU on this machine"):
        parse_gpus("all", 0)


def test_default_database_is_data_not_cache(tmp_path, monkeypatch):
    from sparsert_cli.tunedb import default_db_path

    monkeypatch.delenv("SPARSERT_TUNEDB", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_db_path() == tmp_path / "sparsert" / "tunedb.sqlite"
    monkeypatch.setenv("SPARSERT_TUNEDB", str(tmp_path / "x.sqlite"))
    assert default_db_path() == tmp_path / "x.sqlite"


def test_tune_gpus_without_a_gpu_is_one_line(tmp_path, capsys):
    from sparsert_cli.gpu.runtime import have_gpu

    if have_gpu():
        pytest.skip("this machine has a GPU")
    code, _, err = run_main(["tune", str(REPO / "configs" / "ci.yaml"), "--gpus", "0,1",
                             "--db", str(tmp_path / "t.json")], capsys)
    assert code == 3 and err.strip().count("\n") == 0 and "--gpus 0,1" in err
    assert not (tmp_path / "t.json").exists()


def _run(tmp_path, measure, gpus=(0, 1), db_name="t.sqlite", on_event=None, config=None,
         limit=3, job_timeout=60):
    cases, jobs = make_cases(config or small_config(), limit)
    executor = LocalExecutor(list(gpus), cache_root=str(tmp_path / "cache"), jobs=2,
                             measure=measure, job_timeout=job_timeout)
    with TuneDB(tmp_path / db_name) as db:
        stats = run_jobs(executor, lambda gpu: (cases, jobs), db, FAMILY, on_event=on_event)
        rows = db.rows()
        best = winners(cases, jobs, db, stats["gpu"], FAMILY)
    return cases, jobs, stats, rows, best


def test_a_gelu_case_gets_only_streamed_candidates_that_compile_and_verify(tmp_path):
    """GELU is the streamed family's alone: under "auto" a tuning case offers no immediate
    plan (each would fail to build), and its candidates compile and verify on the CPU."""
    from dataclasses import replace

    from sparsert_cli.config import EpilogueSpec

    config = replace(small_config(), epilogue=EpilogueSpec(bias=True, activation="gelu"))
    cases, jobs = make_cases(config, 3)
    assert {job.family[0] for job in jobs} == {"streamed"} and len(jobs) == 6
    assert {case.epilogue.activation for case in cases} == {"gelu"}
    for job in jobs[::3]:
        done = compile_job(cases[job.case], job, "ptx", "sm_90", str(tmp_path), verify_seed=0)
        assert done.error is None and done.cpu_verify["ok"], done.error


def test_workers_are_spawned_one_gpu_each(tmp_path):
    cases, jobs, stats, rows, best = _run(tmp_path, FakeMeasure())
    assert sorted(g["device"] for g in stats["gpus"]) == ["0", "1"]
    assert len(rows) == len(jobs) and all(r["verified"] for r in rows)
    assert {r["cubin_sha256"] is not None for r in rows} == {True}
    assert all(b["status"] == "ok" for b in best)


def test_dead_worker_job_is_retried_then_recorded(tmp_path):
    """A worker that dies is replaced: a job that kills it once is retried and measured; one
    that kills it every time (or leaves a sticky CUDA error, or hangs past the job timeout) is
    recorded as failed; every other job is measured exactly once."""
    markers, log = tmp_path / "markers", tmp_path / "log"
    markers.mkdir()
    log.mkdir()
    measure = FakeMeasure(crash={(0, 1): "exit", (0, 2): "exit"}, marker_dir=str(markers),
                          log_dir=str(log))
    _, jobs, stats, rows, _ = _run(tmp_path, measure)
    assert len(rows) == len(jobs) and all(r["verified"] for r in rows)
    assert sum(g["restarts"] for g in stats["gpus"]) == 2
    # a job queued behind the one that killed its worker is measured once, by the next worker
    starts = sorted("-".join(name.split("-")[:2]) for name in os.listdir(log))
    assert starts == sorted(f"{j.case}-{j.candidate}" for j in jobs for _ in
                            range(2 if j.id in ((0, 1), (0, 2)) else 1))

    measure = FakeMeasure(crash={(0, 1): "exit", (1, 0): "sticky", (1, 2): "error",
                                 (0, 0): "hang"})
    # 15 s: long enough that a loaded 2-core box does not time out an ordinary job
    _, jobs, stats, rows, _ = _run(tmp_path, measure, db_name="always.sqlite", job_timeout=15)
    by_job = {(r["problem"], r["candidate"]): r for r in rows}
    assert len(rows) == len(jobs) == len(by_job)
    assert "worker died (exit code 7) (after 2 attempts)" in by_job["ci_gemm_odd", 1]["error"]
    assert "CUDA_ERROR_ILLEGAL_ADDRESS" in by_job["ci_3x3_pad1", 0]["error"]
    assert "CUDA_ERROR_INVALID_IMAGE" in by_job["ci_3x3_pad1", 2]["error"]
    assert "job timed out after 15 s (after 2 attempts)" in by_job["ci_gemm_odd", 0]["error"]
    assert sum(not r["verified"] for r in rows) == 4
    assert sum(g["restarts"] for g in stats["gpus"]) == 6   # 2 attempts x 3 fatal jobs


def test_interrupted_run_resumes_without_remeasuring(tmp_path):
    log1, log2 = tmp_path / "log1", tmp_path / "log2"
    log1.mkdir()
    log2.mkdir()
    seen = []

    def interrupt(kind, job, info):
        if kind == "measured":
            seen.append(job.id)
            if len(seen) == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, FakeMeasure(log_dir=str(log1)), on_event=interrupt)
    with TuneDB(tmp_path / "t.sqlite") as db:
        stored = {(r["problem"], r["candidate"]) for r in db.rows()}
    assert len(stored) == 3
    cases, jobs, stats, rows, _ = _run(tmp_path, FakeMeasure(log_dir=str(log2)))
    again = {(cases[int(c)].problem.id, int(i)) for c, i, _ in
             (name.split("-") for name in os.listdir(log2))}
    assert stats["skipped"] == 3 and not again & stored
    assert len(rows) == len(jobs) == len({(r["problem"], r["candidate"]) for r in rows})


def test_same_winners_as_the_serial_tuner(tmp_path):
    """The serial tuner's rule, run in this process: every candidate timed in order, sorted by
    time (stable), the first wins. The executor over two workers must pick the same plans."""
    config = select(load_config(REPO / "configs" / "ci.yaml"), ["ci_gemm_vec", "ci_pw_batch2"],
                    [], None)
    cases, jobs, _, _, best = _run(tmp_path, FakeMeasure(), config=config, limit=4)
    measure = FakeMeasure()
    serial = {}
    for case in cases:
        inputs = case_inputs(case)
        timed = []
        for job in (j for j in jobs if j.case == case.index):
            compiled = compile_job(case, job, "ptx", "sm_90", str(tmp_path / "cache"))
            result = measure(measure_job(compiled, case), inputs)
            if result["verified"]:
                timed.append((result["median_us"], job))
        timed.sort(key=lambda t: t[0])
        serial[case.key] = timed[0][1].params.name()
    assert {b["case"]: b["best"] for b in best} == serial
    assert all(b["us"] == fake_us(b["case"], b["best"]) for b in best)


def test_tune_records_winners_and_skips_stored_jobs(tmp_path, isolated_cache):
    from sparsert_cli.commands.tune import run_tuner

    tuned, db = tmp_path / "tuned.json", tmp_path / "t.sqlite"
    out = run_tuner(small_config(), limit=2, db_path=tuned, db_sqlite=db,
                    measure=FakeMeasure(), gpu_ids=[0, 1], arch="sm_90")
    assert out["run"]["skipped"] == 0 and all(r["status"] == "ok" for r in out["summary"])
    db_json = TunedDB(tuned)
    entries = db_json.entries
    assert all("|Fake GPU|fp32" in k for k in entries)
    # one entry per case and family measured (the winner's and each other family's fastest),
    # each keyed by the code version tuned
    assert len(entries) == sum(len(r["family_best"]) for r in out["summary"])
    for r in out["summary"]:
        key = db_json.key(r["pattern_hash"], r["geometry"], "Fake GPU", r["precision"],
                          *r["family"])
        assert entries[key]["us"] == r["us"], key
    assert any(k.endswith("|" + "@".join(FAMILY)) for k in entries)
    again = run_tuner(small_config(), limit=2, db_path=tuned, db_sqlite=db,
                      measure=FakeMeasure(), gpu_ids=[0], arch="sm_90")
    assert again["run"]["skipped"] == again["run"]["jobs"] == 4
    assert [r["best"] for r in again["summary"]] == [r["best"] for r in out["summary"]]


def test_ray_backend_matches_the_local_backend(tmp_path):
    """On a local Ray instance (2 CPUs, 2 declared GPUs): compile + CPU verification of ci.yaml
    give the same cubins, the same CPU verdicts, the same measurements and winners."""
    pytest.importorskip("ray")
    from sparsert_cli.executors.ray_backend import RayExecutor

    config = load_config(REPO / "configs" / "ci.yaml")
    cases, jobs = make_cases(config, 2)
    cache = str(tmp_path / "cache")
    results = {}
    paths = os.pathsep.join([str(REPO), str(REPO / "tests")])
    executors = {
        "local": LocalExecutor([0, 1], cache_root=cache, jobs=2, measure=FakeMeasure(),
                               verify_seed=0),
        "ray": RayExecutor(None, cache_root=cache, measure=FakeMeasure(), verify_seed=0,
                           init_kwargs={"num_cpus": 2, "num_gpus": 2, "runtime_env": {
                               "env_vars": {"PYTHONPATH": paths}}})}
    for name, executor in executors.items():
        with TuneDB(tmp_path / f"{name}.sqlite") as db:
            stats = run_jobs(executor, lambda gpu: (cases, jobs), db, FAMILY)
            rows = {(r["problem"], r["sparsity"], r["candidate"]):
                    (r["cubin_sha256"], r["cpu_verified"], r["verified"], r["median_us"])
                    for r in db.rows()}
            results[name] = (rows, [b.get("best") for b in
                                    winners(cases, jobs, db, stats["gpu"], FAMILY)])
        assert len(rows) == len(jobs)
    assert results["ray"] == results["local"]
    assert all(v[1] == 1 for v in results["ray"][0].values())


def _script():
    """scripts/tune-scale as a module (it has no .py suffix)."""
    from importlib.machinery import SourceFileLoader
    from importlib.util import module_from_spec, spec_from_loader

    loader = SourceFileLoader("tune_scale", str(REPO / "scripts" / "tune-scale"))
    module = module_from_spec(spec_from_loader("tune_scale", loader))
    loader.exec_module(module)
    return module


def test_tune_scale_script_writes_a_scale_result(tmp_path, monkeypatch):
    """scripts/tune-scale end to end on a fake timer: three runs of the same jobs, a speedup,
    and full winner agreement (the fake timer is deterministic)."""
    from sparsert_cli.results import load_results

    monkeypatch.setenv("SPARSERT_CACHE_DIR", str(tmp_path / "unused"))
    script = _script()
    script.main([str(tmp_path), "--config", str(REPO / "configs" / "ci.yaml"),
                 "--problems", "ci_gemm_odd,ci_pw_stride2", "--max-candidates", "2"],
                measure=FakeMeasure(), gpu_ids=[0, 1])
    doc = load_results(tmp_path / "tune-scale.json", kinds=("scale",))
    assert [(r["phase"], r["gpus"]) for r in doc["runs"]] == [("cold", 2), ("warm", 1),
                                                               ("warm", 2)]
    assert all(r["jobs"] == r["verified"] == 8 for r in doc["runs"])
    assert doc["speedup"] > 0 and doc["agreement"]["fraction"] == 1.0
    assert doc["agreement"]["ok"] and doc["cases"] == 4
    assert all(0 <= g["busy_fraction"] <= 1 for r in doc["runs"] for g in r["per_gpu"])


def test_scale_agreement_counts_gaps():
    script = _script()
    one = [{"status": "ok", "case": f"c{i}", "best": "a", "us": 1.0, "problem": f"c{i}",
            "sparsity": 0.9} for i in range(10)]
    two = [dict(r) for r in one]
    two[3]["best"] = "b"
    rows = [{"problem": "c3", "sparsity": 0.9, "plan_name": "b", "median_us": 1.02,
             "verified": 1}]
    result = script.agreement(one, two, rows)
    assert result["fraction"] == 0.9 and result["ok"] and result["differ"][0]["gap"] == 0.02
    rows[0]["median_us"] = 1.05
    assert not script.agreement(one, two, rows)["ok"]


def _measure_phase(workers: int, cases, jobs) -> float:
    """Seconds of the measure phase of a staged run over `workers` fake GPUs (5 ms a job); a
    case's inputs reach each worker once (at most one more case is shared at the end)."""
    from fake_measure import fake_compile, fake_inputs

    executor = LocalExecutor(list(range(workers)), jobs=2, measure=FakeMeasure(delay=0.005),
                             staged=True, compile_fn=fake_compile, inputs_fn=fake_inputs)
    done = []
    executor.start()
    try:
        stats = executor.run(cases, jobs, lambda job, c, result, slot: done.append(
            (job.id, result["verified"])))
    finally:
        executor.stop()
    assert sorted(done) == sorted((j.id, True) for j in jobs)
    assert sum(g["inputs_sent"] for g in stats["gpus"]) <= len(cases) + workers - 1
    assert all(g["busy_fraction"] > 0.5 for g in stats["gpus"])
    return stats["measure_seconds"]


def test_two_workers_measure_almost_twice_as_fast():
    """The dispatch path keeps two fake GPUs busy: 200 jobs of 5 ms over 10 cases (each with a
    50 ms, 4 MB reference) run >= 1.85x faster on two workers than on one. Timing on a shared
    CPU is noisy, so the best of three tries counts (a dispatch-bound executor stays ~1.6x)."""
    from dataclasses import replace

    two, jobs = make_cases(small_config(), 1)
    cases = [replace(two[i % 2], index=i) for i in range(10)]
    jobs = [Job(c.index, i, jobs[0].params) for c in cases for i in range(20)]
    best = 0.0
    for _ in range(3):
        one, two = _measure_phase(1, cases, jobs), _measure_phase(2, cases, jobs)
        print(f"measure phase: 1 worker {one:.3f} s, 2 workers {two:.3f} s, {one / two:.2f}x")
        best = max(best, one / two)
        if best >= 1.85:
            break
    assert best >= 1.85


def test_tune_results_file_feeds_the_tune_plot(tmp_path, isolated_cache):
    """`tune --out`: a kind "tune" results file with the default's time, the winner's and every
    verified candidate, which `plot --kind tune` reads."""
    from sparsert_cli import results
    from sparsert_cli.bench import metadata
    from sparsert_cli.commands.tune import run_tuner
    from sparsert_cli.jobs import tune_results
    from sparsert_cli.plots.data import tune_rows

    config = small_config()
    out = run_tuner(config, limit=3, db_path=tmp_path / "tuned.json",
                    db_sqlite=tmp_path / "t.sqlite", measure=FakeMeasure(), gpu_ids=[0],
                    arch="sm_90")
    doc = tune_results(out["summary"], out["run"], metadata(config, "gpu"))
    path = tmp_path / "tune.json"
    path.write_text(json.dumps(doc, default=str))
    loaded = results.load_results(path, kinds=("tune",))
    assert loaded["kind"] == "tune" and len(loaded["cases"]) == 2
    for case, entry in zip(loaded["cases"], out["summary"]):
        assert case["best_us"] == entry["us"] == min(c["median_us"] for c in case["candidates"])
        assert case["default_plan"] == case["candidates"][0]["plan"]
        assert case["default_us"] == case["candidates"][0]["median_us"]
    tuned = json.loads((tmp_path / "tuned.json").read_text())["entries"]
    for case in loaded["cases"]:    # tuned.json keeps the plan its default_us timed
        entry = next(e for e in tuned.values() if (e["problem"], e["sparsity"])
                     == (case["problem"], case["sparsity"]))
        assert entry["default_us"] == case["default_us"]
        assert entry["default_family"] == case["default_family"]
        assert entry["default_params"]
    for case in loaded["cases"]:
        assert all(c["median_us"] == fake_us(f"{case['problem']}@{case['sparsity']:g}",
                                             c["plan"]) for c in case["candidates"])
    rows = tune_rows([(path, loaded)])["rows"]
    assert {r["role"] for r in rows} == {"candidate", "default", "winner"}
    # the default is the cost model's choice for the GPU measured, and every job kept its
    # plan's cost features: the database calibrates the model
    from sparsert_cli import costmodel
    from sparsert_cli.build import geometry_for
    from sparsert_cli.patterns import generate, to_csr
    from sparsert_cli.tunedb import latest

    for case, (problem, sparsity) in zip(loaded["cases"], config.cases()):
        csr = to_csr(generate(problem, sparsity, config.pattern, config.seed))
        family, params = costmodel.choose(geometry_for(problem), csr, config.precision,
                                          "Fake GPU")
        assert case["default_plan"] == params.name()
        assert case["default_family"] == case["best_family"] == family.name == "immediate"
    assert loaded["summary"]["cases"] == 2 and loaded["summary"]["geomean_default_over_best"] >= 1
    with TuneDB(tmp_path / "t.sqlite") as db:
        samples, sms, bare = costmodel.calibration_samples(latest(db.rows()), "Fake GPU", "t")
    assert len(samples) == 6 and sms == 4 and bare == 0


def test_retuning_measures_the_stored_winner_again(tmp_path, isolated_cache):
    """A layer's current winner is a candidate of the next tuning run (measured in that run), so
    a run whose own candidates are all slower cannot replace it with one of them."""
    from sparsert_cli.commands.tune import run_tuner
    from sparsert_cli.families.immediate import PlanParams

    tuned, db = tmp_path / "tuned.json", tmp_path / "t.sqlite"
    run_tuner(small_config(), limit=2, db_path=tuned, db_sqlite=db, measure=FakeMeasure(),
              gpu_ids=[0], arch="sm_90")
    doc = json.loads(tuned.read_text())
    stored = PlanParams(rows_per_group=3, vector_width=1, col_threads=32, load_batch=5)
    for entry in doc["entries"].values():           # a winner no default candidate list has
        entry["params"] = {k: v for k, v in stored.__dict__.items()}
    tuned.write_text(json.dumps(doc))
    run_tuner(small_config(), limit=2, db_path=tuned, db_sqlite=db, measure=FakeMeasure(),
              gpu_ids=[0], arch="sm_90")
    with TuneDB(db) as tdb:
        names = {(r["problem"], r["plan_name"]) for r in tdb.rows()}
    for problem in ("ci_gemm_odd", "ci_3x3_pad1"):
        assert any(p == problem and n.startswith("r3v1t32k1b5") for p, n in names), names


def test_an_interrupted_tune_saves_the_fully_measured_cases(tmp_path, isolated_cache):
    """Ctrl-C / SIGTERM (e.g. `timeout`) after some jobs: the winners of cases whose every
    candidate was measured are saved, the others are not, and the CLI writes --out and exits 130
    in one line."""
    from sparsert_cli.executors import TuneInterrupted, tune_config

    measured = []

    def interrupt(kind, job, info):
        if kind == "measured":
            measured.append(job.case)
            if len(measured) == 4:               # 4 of the 6 jobs of 2 cases
                raise KeyboardInterrupt

    tuned = tmp_path / "tuned.json"
    config = small_config()
    with pytest.raises(TuneInterrupted) as caught:
        tune_config(config, limit=3, tuned_path=tuned, db_path=tmp_path / "t.sqlite",
                    measure=FakeMeasure(), gpu_ids=[0], arch="sm_90", jobs=1,
                    on_event=interrupt)
    summary = caught.value.result["summary"]
    complete = [all(m["error"] != "not measured" for m in s["measured"]) for s in summary]
    assert [s["status"] == "ok" for s in summary] == complete and not all(complete)
    assert {s["status"] for s in summary if s["status"] != "ok"} == {
        "interrupted before every candidate was measured"}
    assert caught.value.result["run"]["interrupted"] is True
    cases = {tuple(k.split("|")[:2]) for k in TunedDB(tuned).entries}   # pattern, shape
    assert len(cases) == sum(complete)


def test_tune_cli_on_sigterm_writes_out_and_exits_130(tmp_path, isolated_cache, monkeypatch,
                                                      capsys):
    import signal

    from cli_helpers import run_main
    from sparsert_cli.commands import tune as tune_cmd

    real, before = tune_cmd.run_tuner, signal.getsignal(signal.SIGTERM)

    def fake_run(config, *args, **kwargs):       # SIGTERM arrives after two measurements
        count = []

        def on_event(kind, job, info):
            if kind == "measured":
                count.append(1)
                if len(count) == 2:
                    signal.raise_signal(signal.SIGTERM)
        from sparsert_cli.executors import tune_config
        return tune_config(config, limit=2, tuned_path=tmp_path / "tuned.json",
                           db_path=tmp_path / "t.sqlite", measure=FakeMeasure(), gpu_ids=[0],
                           arch="sm_90", on_event=on_event)

    monkeypatch.setattr(tune_cmd, "run_tuner", fake_run)
    out = tmp_path / "tune.json"
    code, _, text = run_main(["tune", str(REPO / "configs" / "ci.yaml"), "--problems",
                              "ci_gemm_odd,ci_3x3_pad1", "--sparsity", "0.8", "--out", str(out)],
                             capsys)
    import re

    found = re.search(r"interrupted: winners of the (\d) fully measured case\(s\) saved", text)
    assert code == 130 and found and text.count("\n") == 1, text
    doc = json.loads(out.read_text())
    assert doc["kind"] == "tune" and doc["run"]["interrupted"] is True
    assert len(doc["cases"]) == int(found[1]) < 2
    assert real is not fake_run and signal.getsignal(signal.SIGTERM) is before   # restored


def test_tune_records_every_measured_family_so_a_stale_time_cannot_override_the_winner(
        tmp_path, isolated_cache):
    """Each family's entry holds its fastest plan of this run: a losing family's faster time
    recorded by another run (on another machine) no longer wins the lookup the bench makes."""
    from sparsert_cli.executors import tune_config
    from sparsert_cli.families import get_family
    from sparsert_cli.build import code_version

    tuned_path = tmp_path / "tuned.json"

    def run():
        return tune_config(small_config(), limit=16, tuned_path=tuned_path,
                           db_path=tmp_path / "t.sqlite", measure=FakeMeasure(), gpu_ids=[0],
                           arch="sm_90", jobs=1)["summary"]

    summary = run()
    mixed = [s for s in summary if s["status"] == "ok"
             and len({m["family"] for m in s["measured"] if m["verified"]}) > 1]
    assert mixed, "no case measured both families"
    tuned = TunedDB(tuned_path)
    for s in mixed:
        for family in {m["family"] for m in s["measured"] if m["verified"]}:
            times = [m["median_us"] for m in s["measured"]
                     if m["verified"] and m["family"] == family]
            name, version = family.split("@")
            entry = tuned.entries[tuned.key(s["pattern_hash"], s["geometry"], "Fake GPU",
                                            s["precision"], name, version)]
            assert entry["us"] == min(times), (family, entry)
    # a stale, faster time of each losing family, as another run would have left it
    for s in mixed:
        for m in s["measured"]:
            name, version = m["family"].split("@")
            if (name, version) != tuple(s["family"]):
                key = tuned.key(s["pattern_hash"], s["geometry"], "Fake GPU", s["precision"],
                                name, version)
                tuned.entries[key]["us"] = 0.001
    tuned.save()
    run()
    tuned = TunedDB(tuned_path)
    for s in mixed:
        family, _ = tuned.best(s["pattern_hash"], s["geometry"], "Fake GPU", s["precision"])
        assert (family.name, code_version(family, "ptx")) == tuple(s["family"]), s["case"]
        assert get_family(family.name) is family
