"""`sparsert compare`: impossible timings are refused, statuses follow the stored samples, runs
from other GPUs or drivers are refused, and the PR-comment / github-action-benchmark outputs."""

from __future__ import annotations

import json
import math

import pytest

from cli_helpers import run_main
from sparsert_cli.commands.compare import compare

H100, DRIVER = "NVIDIA H100 80GB HBM3", "580.159.04"


def _samples(center, spread=0.01, count=10):
    """`count` samples evenly spread over center * (1 +- spread)."""
    return [center * (1 + spread * (2 * i / (count - 1) - 1)) for i in range(count)]


def _case(problem, median, samples=None, ok=True):
    return {"problem": problem, "shape": "8x8", "sparsity": 0.9, "verify_gpu": {"ok": ok},
            "sparsert": {"median_us": median,
                         "samples_us": _samples(median) if samples is None else samples}}


def _doc(cases, name=H100, driver=DRIVER, mode="gpu"):
    return {"kind": "bench", "schema": 2, "mode": mode, "cases": cases,
            "gpu": {"name": name, "nvml_driver": driver, "driver_version": "13.0"}}


def _write(tmp_path, name, doc):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    return str(path)


def _run(tmp_path, capsys, base, new, *flags):
    return run_main(["compare", _write(tmp_path, "base", base), _write(tmp_path, "new", new),
                     *flags], capsys)


def _one_line(err):
    return len(err.strip().splitlines()) == 1


# ------------------------------------------------------------- impossible timings


BAD_TIMINGS = {
    "nan_median": lambda c: c["sparsert"].update(median_us=float("nan")),
    "inf_median": lambda c: c["sparsert"].update(median_us=float("inf")),
    "zero_median": lambda c: c["sparsert"].update(median_us=0.0),
    "negative_median": lambda c: c["sparsert"].update(median_us=-2.5),
    "bool_median": lambda c: c["sparsert"].update(median_us=True),
    "text_median": lambda c: c["sparsert"].update(median_us="2.5"),
    "nan_sample": lambda c: c["sparsert"]["samples_us"].__setitem__(3, float("nan")),
    "zero_sample": lambda c: c["sparsert"]["samples_us"].__setitem__(0, 0),
    "negative_sample": lambda c: c["sparsert"]["samples_us"].__setitem__(0, -1.0),
    "samples_not_a_list": lambda c: c["sparsert"].update(samples_us=2.5),
    "timing_not_an_object": lambda c: c.update(sparsert=[2.5]),
}


@pytest.mark.parametrize("side", ["base", "new"])
@pytest.mark.parametrize("damage", sorted(BAD_TIMINGS))
def test_impossible_timing_is_one_line_exit_2(tmp_path, capsys, damage, side):
    docs = {"base": _doc([_case("p", 2.5), _case("q", 4.0)]),
            "new": _doc([_case("p", 2.5), _case("q", 4.0)])}
    BAD_TIMINGS[damage](docs[side]["cases"][1])
    code, out, err = _run(tmp_path, capsys, docs["base"], docs["new"])
    assert code == 2 and _one_line(err), err
    assert f"{side}.json" in err and "q 8x8 @0.9" in err


@pytest.mark.parametrize("side", ["base", "new"])
def test_a_case_listed_twice_is_one_line_exit_2(tmp_path, capsys, side):
    docs = {"base": _doc([_case("p", 2.5)]), "new": _doc([_case("p", 2.5)])}
    docs[side]["cases"].append(_case("p", 3.5))
    code, _, err = _run(tmp_path, capsys, docs["base"], docs["new"])
    assert code == 2 and _one_line(err) and f"{side}.json" in err and "listed twice" in err


def test_integer_times_are_valid_and_printed(tmp_path, capsys, wide_terminal):
    base = _doc([_case("p", 3, samples=[3, 3, 3])])
    new = _doc([_case("p", 3, samples=[3, 3, 3])])
    code, out, err = _run(tmp_path, capsys, base, new)
    assert code == 0, err
    assert "3.00" in out and "1.000" in out and "same" in out


def test_results_without_gpu_timings_are_one_line(tmp_path, capsys):
    doc = _doc([_case("p", 2.5)])
    code, _, err = _run(tmp_path, capsys, doc, _doc(doc["cases"], mode="compile-only"))
    assert code == 2 and _one_line(err) and "new.json" in err and "no GPU timings" in err


# ------------------------------------------------------------- noise-aware statuses


def _status(base_median, base_samples, new_median, new_samples, **kwargs):
    rows, _ = compare(_doc([_case("p", base_median, base_samples)]),
                      _doc([_case("p", new_median, new_samples)]), 0.05, **kwargs)
    return rows[0]["status"]


def test_statuses_follow_thresholds_and_sample_ranges():
    tight, wide = 0.01, 0.3
    # beyond 5% and 0.3 us, ranges apart
    assert _status(10, _samples(10, tight), 12, _samples(12, tight)) == "slower"
    assert _status(12, _samples(12, tight), 10, _samples(10, tight)) == "faster"
    # beyond both thresholds but the ranges overlap: noise decides nothing
    assert _status(10, _samples(10, wide), 12, _samples(12, wide)) == "ambiguous"
    assert _status(12, _samples(12, wide), 10, _samples(10, wide)) == "ambiguous"
    # too few samples to judge the noise
    assert _status(10, [10.0, 10.0], 12, _samples(12, tight)) == "ambiguous"
    assert _status(10, _samples(10, tight), 12, []) == "ambiguous"
    # within the relative limit, or within the absolute slack, whatever the samples say
    assert _status(10, _samples(10, 0.001), 10.4, _samples(10.4, 0.001)) == "same"
    assert _status(2, _samples(2, 0.001), 2.25, _samples(2.25, 0.001)) == "same"
    assert _status(2, _samples(2, 0.001), 2.25, _samples(2.25, 0.001), slack_us=0.0) == "slower"


def test_missing_failed_and_new_cases():
    base = _doc([_case("kept", 5.0), _case("gone", 5.0), _case("broken", 5.0),
                 _case("was_broken", 5.0, ok=False)])
    new = _doc([_case("kept", 5.0), _case("broken", 5.0, ok=False), _case("was_broken", 5.0),
                _case("added", 5.0)])
    rows, problems = compare(base, new, 0.05)
    assert {r["case"].split()[0]: r["status"] for r in rows} == {
        "kept": "same", "gone": "missing", "broken": "failed", "was_broken": "new",
        "added": "new"}
    assert sorted(p.split()[0] for p in problems) == ["broken", "gone"]


def test_only_slower_missing_and_failed_fail_the_gate(tmp_path, capsys):
    base = _doc([_case("a", 10.0, _samples(10, 0.3)), _case("b", 12.0)])
    ambiguous_and_faster = _doc([_case("a", 12.0, _samples(12, 0.3)), _case("b", 10.0)])
    code, out, err = _run(tmp_path, capsys, base, ambiguous_and_faster)
    assert code == 0, err
    assert "0 slower, 1 faster, 1 ambiguous, 0 same" in out
    slower = _doc([_case("a", 10.0, _samples(10, 0.3)), _case("b", 14.0)])
    code, out, err = _run(tmp_path, capsys, base, slower)
    assert code == 1 and "b 8x8 @0.9: slower" in err


# ------------------------------------------------------------- devices


@pytest.mark.parametrize("other", [dict(name="NVIDIA A100-SXM4-80GB"), dict(driver="575.57.08")])
def test_different_gpu_or_driver_is_refused_unless_allowed(tmp_path, capsys, other):
    base, new = _doc([_case("p", 2.5)]), _doc([_case("p", 2.5)], **other)
    code, out, err = _run(tmp_path, capsys, base, new)
    assert code == 2 and _one_line(err) and "--allow-device-mismatch" in err
    assert "base.json" in err and "new.json" in err
    code, out, err = _run(tmp_path, capsys, base, new, "--allow-device-mismatch")
    assert code == 0 and _one_line(err) and "warning" in err and "1 same" in out


def test_driver_falls_back_to_the_cuda_driver_version(tmp_path, capsys):
    base, new = _doc([_case("p", 2.5)]), _doc([_case("p", 2.5)])
    for doc in (base, new):
        del doc["gpu"]["nvml_driver"]
    assert _run(tmp_path, capsys, base, new)[0] == 0
    new["gpu"]["driver_version"] = "12.8"
    code, _, err = _run(tmp_path, capsys, base, new)
    assert code == 2 and "12.8" in err


# ------------------------------------------------------------- output formats


def _mixed():
    base = _doc([_case("a", 10.0), _case("b", 12.0), _case("c", 3.0),
                 _case("d", 10.0, _samples(10, 0.3))])
    new = _doc([_case("a", 12.0), _case("b", 10.0), _case("c", 3.0),
                _case("d", 12.0, _samples(12, 0.3)), _case("e|x", 7.0)])
    return base, new


def test_markdown_is_a_pr_comment(tmp_path, capsys):
    code, out, _ = _run(tmp_path, capsys, *_mixed(), "--markdown")
    assert code == 1                                     # a slower case still fails the gate
    lines = out.splitlines()
    ratios = [1.2, 10 / 12, 1.0, 1.2]
    gm = math.exp(sum(map(math.log, ratios)) / 4)
    assert lines[0] == (f"**sparsert compare**: 1 slower, 1 faster, 1 ambiguous, 1 same, 1 new; "
                        f"geomean ratio new/base {gm:.3f} over 4 cases")
    table = [line for line in lines if line.startswith("|")]
    assert table[0].startswith("| Case | base us | new us | ratio |") and table[1].startswith("|-")
    body = table[2:]
    assert len(body) == 5 and all(row.count("|") == 8 for row in body)   # '|' in names escaped
    assert "**slower**" in body[0] and body[0].startswith("| a 8x8 @0.9 | 10.00 | 12.00 | 1.200 |")


def test_github_json_is_custom_smaller_is_better(tmp_path, capsys):
    base, new = _mixed()
    new["cases"].append(_case("f", 5.0, ok=False))       # no time: not a data point
    code, out, _ = _run(tmp_path, capsys, base, new, "--github-json")
    points = json.loads(out)
    assert [p["name"] for p in points] == ["a 8x8 @0.9", "b 8x8 @0.9", "c 8x8 @0.9",
                                           "d 8x8 @0.9", "e|x 8x8 @0.9"]
    for point, case in zip(points, new["cases"]):
        assert set(point) == {"name", "unit", "value", "range", "extra"}
        assert point["unit"] == "us" and point["value"] == case["sparsert"]["median_us"]
        assert isinstance(point["range"], str) and point["range"].startswith("± ")
        assert H100 in point["extra"] and "p20-p80" in point["extra"]
    # d: 10 samples over 12 * (1 +- 0.3); p20..p80 is 12 * (1 +- 0.18): half-width 2.16
    assert points[3]["range"] == "± 2.160"


def test_json_keeps_rows_and_problems(tmp_path, capsys):
    code, out, _ = _run(tmp_path, capsys, *_mixed(), "--json")
    doc = json.loads(out)
    assert code == 1 and [r["status"] for r in doc["rows"]] == [
        "slower", "faster", "same", "ambiguous", "new"]
    assert doc["problems"] == ["a 8x8 @0.9: slower"]


def test_only_one_output_format(tmp_path, capsys):
    code, _, err = _run(tmp_path, capsys, *_mixed(), "--json", "--markdown")
    assert code == 2 and _one_line(err)


# ------------------------------------------------------------- --retime

from sparsert_cli.commands import compare as compare_mod  # noqa: E402
from sparsert_cli.commands.compare import retime_ambiguous  # noqa: E402
from sparsert_cli.config import load_config  # noqa: E402


def _ambiguous_pair():
    """BASE ~10 us, NEW ~12 us with wide overlapping samples: ambiguous."""
    return (_doc([_case("a", 10.0, _samples(10, 0.3)), _case("b", 5.0)]),
            _doc([_case("a", 12.0, _samples(12, 0.3)), _case("b", 5.0)]))


@pytest.mark.parametrize("center, status, failing", [(12.0, "slower", True),
                                                      (8.0, "faster", False),
                                                      (10.0, "same", False)])
def test_retimed_ambiguous_case_is_decided_again(center, status, failing):
    base, new = _ambiguous_pair()
    rows, _ = compare(base, new, 0.05)
    assert [r["status"] for r in rows] == ["ambiguous", "same"]
    asked = []

    def fake(keys):
        asked.append(keys)
        return {k: _samples(center, 0.001, 200) for k in keys}
    updated, rows, problems = retime_ambiguous(base, new, rows, fake, 0.05)
    assert asked == [["a 8x8 @0.9"]]
    assert rows[0]["status"] == status and rows[0]["retimed"] == 200
    assert "retimed" not in rows[1]
    assert bool(problems) == failing
    timing = updated["cases"][0]["sparsert"]
    assert len(timing["samples_us"]) == 210 and timing["retimed_samples"] == 200
    assert timing["median_us"] == pytest.approx(center, rel=0.01)
    assert new["cases"][0]["sparsert"]["median_us"] == 12.0   # NEW itself untouched
    assert updated["retimed"] == ["a 8x8 @0.9"]


def test_still_ambiguous_after_retiming_stays_and_does_not_fail():
    base, new = _ambiguous_pair()
    rows, _ = compare(base, new, 0.05)
    _, rows, problems = retime_ambiguous(base, new, rows,
                                         lambda keys: {k: _samples(12, 0.3) for k in keys}, 0.05)
    assert rows[0]["status"] == "ambiguous" and rows[0]["retimed"] == 10 and not problems


def test_nothing_ambiguous_times_nothing():
    base, new = _doc([_case("b", 5.0)]), _doc([_case("b", 5.0)])
    rows, _ = compare(base, new, 0.05)
    _, rows, _ = retime_ambiguous(base, new, rows, lambda keys: pytest.fail("timed"), 0.05)
    assert rows[0]["status"] == "same"


def _ci_pair(config="configs/ci.yaml"):
    """Two results of configs/ci.yaml (its first problem at 0.8): NEW's case ambiguous."""
    cfg = load_config(config)
    problem = cfg.problems[0]
    meta = {"name": cfg.name, "path": cfg.path, "hash": cfg.digest(), "dtype": cfg.dtype,
            "accumulate": cfg.accumulate, "emit": cfg.emit}
    base, new = _ambiguous_pair()
    for doc in (base, new):
        doc["config"] = meta
        doc["cases"] = doc["cases"][:1]
        doc["cases"][0].update(problem=problem.id, shape=problem.shape_text(), sparsity=0.8)
    return base, new


class _FakeGpu:
    name, arch = H100, "sm_90"

    def info(self):
        return {"name": H100, "nvml_driver": DRIVER}

    def close(self):
        pass


def _fake_gpu(monkeypatch, center):
    from sparsert_cli.gpu import runtime
    monkeypatch.setattr(runtime, "have_gpu", lambda: True)
    monkeypatch.setattr(runtime, "Gpu", _FakeGpu)
    groups = []

    def retimer(gpu, configs, new):
        groups.extend(configs)
        return lambda keys: {k: _samples(center, 0.001, 50) for k in keys}
    monkeypatch.setattr(compare_mod, "gpu_retimer", retimer)
    return groups


@pytest.mark.parametrize("center, code, status", [(12.0, 1, "slower"), (8.0, 0, "faster")])
def test_retime_command_gate_follows_the_final_status(tmp_path, capsys, monkeypatch, center,
                                                      code, status):
    groups = _fake_gpu(monkeypatch, center)
    base, new = _ci_pair()
    out_path = tmp_path / "retimed.json"
    got, out, err = _run(tmp_path, capsys, base, new, "--retime", "--retime-out", str(out_path))
    assert got == code, err
    assert "re-timed 1 of 1 ambiguous case(s): ci_gemm_odd" in err
    assert f"-> {status} (+50 samples)" in err and "(re-timed)" in out
    assert [([p.id for p in g.problems], g.sparsities) for g in groups] == [
        (["ci_gemm_odd"], (0.8,))]
    written = json.loads(out_path.read_text())
    assert written["kind"] == "bench" and len(written["cases"][0]["sparsert"]["samples_us"]) == 60
    code, _, err = _run(tmp_path, capsys, base, new)      # without --retime: ambiguous, exit 0
    assert code == 0 and "re-timed" not in err


def test_retime_without_gpu_is_one_line_and_the_usual_exit(tmp_path, capsys, monkeypatch):
    from sparsert_cli.gpu import runtime
    monkeypatch.setattr(runtime, "have_gpu", lambda: False)
    base, new = _ci_pair()
    code, out, err = _run(tmp_path, capsys, base, new, "--retime")
    assert code == 0 and "1 ambiguous" in out
    assert _one_line(err) and "not re-timed" in err and "no GPU" in err


def test_retime_refuses_a_changed_config_unless_given(tmp_path, capsys, monkeypatch):
    _fake_gpu(monkeypatch, 8.0)
    base, new = _ci_pair()
    new["config"]["hash"] = "0123456789abcdef"
    code, out, err = _run(tmp_path, capsys, base, new, "--retime")
    assert code == 2 and _one_line(err) and "changed since" in err and "configs/ci.yaml" in err
    code, out, err = _run(tmp_path, capsys, base, new, "--retime=configs/ci.yaml")
    assert code == 0 and "-> faster" in err


@pytest.mark.parametrize("config", ["no/such.yaml", "configs"])
def test_retime_with_a_bad_config_is_one_line_exit_2(tmp_path, capsys, monkeypatch, config):
    _fake_gpu(monkeypatch, 8.0)
    base, new = _ci_pair()
    code, out, err = _run(tmp_path, capsys, base, new, "--retime", config,
                          "--retime-out", str(tmp_path / "o.json"))
    assert code == 2 and _one_line(err) and config in err
    assert not (tmp_path / "o.json").exists()


def test_retime_config_without_the_ambiguous_problem_is_one_line(tmp_path, capsys, monkeypatch):
    _fake_gpu(monkeypatch, 8.0)
    base, new = _ci_pair()
    new["cases"][0]["problem"] = base["cases"][0]["problem"] = "not_in_ci"
    code, _, err = _run(tmp_path, capsys, base, new, "--retime=configs/ci.yaml")
    assert code == 2 and _one_line(err) and "no problem not_in_ci" in err


def test_retime_out_needs_retime(tmp_path, capsys):
    base, new = _ci_pair()
    code, _, err = _run(tmp_path, capsys, base, new, "--retime-out", str(tmp_path / "o.json"))
    assert code == 2 and _one_line(err) and "--retime" in err


@pytest.mark.parametrize("plan_now, retimed", [("P1", True), ("P2", False)])
def test_gpu_retimer_keeps_samples_of_the_same_plan_only(monkeypatch, capsys, plan_now, retimed):
    from types import SimpleNamespace

    from sparsert_cli import bench
    calls = []

    def fake_run(config, **kwargs):
        calls.append(kwargs)
        return {"cases": [{"problem": p.id, "shape": p.shape_text(), "sparsity": s,
                           "plan": plan_now, "verify_gpu": {"ok": True},
                           "sparsert": {"samples_us": [1.0, 2.0]}} for p, s in config.cases()]}
    monkeypatch.setattr(bench, "run_benchmark", fake_run)
    _, new = _ci_pair()
    new["cases"][0]["plan"], new["arch"] = "P1", "sm_90"
    key = compare_mod._key(new["cases"][0])
    config = compare_mod.retime_config(new, "new.json", None)
    groups = compare_mod.retime_groups(config, new, [key])
    got = compare_mod.gpu_retimer(SimpleNamespace(name=H100, arch="sm_80"), groups, new)([key])
    assert got == ({key: [1.0, 2.0]} if retimed else {})
    assert calls[0]["baselines"] is False and calls[0]["arch"] == "sm_90"
    assert ("plan P2 now, P1 in NEW; not re-timed" in capsys.readouterr().err) != retimed


def test_retime_accepts_the_config_of_a_narrowed_bench():
    from sparsert_cli.commands._common import select
    _, new = _ci_pair()
    narrowed = select(load_config("configs/ci.yaml"), ["ci_gemm_odd"], ["0.8"], None)
    new["config"]["hash"] = narrowed.digest()   # bench ci --problems ci_gemm_odd --sparsity 0.8
    assert compare_mod.retime_config(new, "new.json", None).path.endswith("ci.yaml")


def test_retime_on_another_gpu_is_one_line_not_retimed(tmp_path, capsys, monkeypatch):
    _fake_gpu(monkeypatch, 8.0)
    monkeypatch.setattr(_FakeGpu, "info", lambda self: {"name": H100, "nvml_driver": "575.1"})
    base, new = _ci_pair()
    code, out, err = _run(tmp_path, capsys, base, new, "--retime")
    assert code == 0 and "1 ambiguous" in out
    assert _one_line(err) and "not re-timed" in err and "driver 575.1" in err
