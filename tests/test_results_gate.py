"""The performance-regression gate over committed results: every results/h100/<name>.json is
compared with its baseline (baseline.json for paper20, baseline-<name>.json otherwise) by the
rule of `sparsert compare`: no case *slower* (beyond 5% and 0.3 us, with separated p20-p80 sample
ranges), missing or failing. Promote a baseline deliberately by copying the new results over it
(README, "Results")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsert_cli.commands.compare import compare, device_mismatch, load_results

RESULTS = Path(__file__).resolve().parent.parent / "results" / "h100"
PAIRS = [(RESULTS / ("baseline.json" if p.stem == "paper20" else f"baseline-{p.stem}.json"), p)
         for p in sorted(RESULTS.glob("*.json"))
         if not p.stem.startswith("baseline") and (RESULTS / (
             "baseline.json" if p.stem == "paper20" else f"baseline-{p.stem}.json")).exists()]


def _scaled(case, factor):
    """`case` as if every launch took `factor` times as long."""
    timing = case["sparsert"]
    timing["median_us"] *= factor
    timing["samples_us"] = [s * factor for s in timing["samples_us"]]


def test_every_gated_result_has_a_baseline():
    assert (RESULTS / "paper20.json").exists() and (RESULTS / "baseline.json").exists()
    assert any(new.stem == "paper20" for _, new in PAIRS)


@pytest.mark.parametrize("base, new", PAIRS, ids=[n.stem for _, n in PAIRS])
def test_committed_results_do_not_regress(base, new):
    base_doc, new_doc = load_results(base), load_results(new)
    # Every committed file comes from the same H100 and driver: the gate needs no allow flag.
    assert device_mismatch(base_doc, new_doc, base, new) is None
    rows, problems = compare(base_doc, new_doc, max_regression=0.05)
    assert rows, f"{base.name} holds no cases"
    assert not problems, "; ".join(problems)
    assert all(r["status"] in ("same", "faster", "ambiguous") for r in rows)


@pytest.mark.parametrize("base, new", PAIRS, ids=[n.stem for _, n in PAIRS])
def test_committed_results_are_verified_gpu_runs(base, new):
    doc = json.loads(new.read_text())
    assert doc["mode"] == "gpu" and "H100" in doc["gpu"]["name"]
    assert doc["failures"] == []
    for case in doc["cases"]:
        assert case["verify_gpu"]["ok"], case["problem"]
        assert len(case["sparsert"]["samples_us"]) >= 3, case["problem"]


def test_gate_catches_a_regression():
    base = load_results(RESULTS / "baseline.json")
    slower = json.loads(json.dumps(base))
    _scaled(slower["cases"][0], 1.5)
    del slower["cases"][1]
    slower["cases"][2]["verify_gpu"]["ok"] = False
    _, problems = compare(base, slower, 0.05)
    statuses = " ".join(problems)
    assert "slower" in statuses and "missing" in statuses and "failed" in statuses


def test_gate_refuses_a_nan_time(tmp_path):
    from sparsert_cli.errors import UserError

    doc = json.loads((RESULTS / "baseline.json").read_text())
    doc["cases"][4]["sparsert"]["median_us"] = float("nan")
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(UserError, match="nan.json: case .* median_us nan"):
        load_results(path)


def test_compare_command_exit_codes(tmp_path):
    from click.testing import CliRunner

    from sparsert_cli.cli import group

    base = RESULTS / "baseline.json"
    ok = CliRunner().invoke(group, ["compare", str(base), str(base)])
    assert ok.exit_code == 0, ok.output
    doc = json.loads(base.read_text())
    _scaled(doc["cases"][0], 2)
    worse = tmp_path / "worse.json"
    worse.write_text(json.dumps(doc))
    bad = CliRunner().invoke(group, ["compare", str(base), str(worse)])
    assert bad.exit_code == 1 and "slower" in bad.output


def test_gate_slack_ignores_sub_slack_shifts_of_tiny_kernels():
    def case(problem, us):
        return {"problem": problem, "sparsity": 0.9, "verify_gpu": {"ok": True},
                "sparsert": {"median_us": us, "samples_us": [us * 0.99, us, us * 1.01]}}

    base = {"cases": [case("p", 2.0), case("q", 20.0)]}
    new = {"cases": [case("p", 2.25),        # +12.5% but only 0.25 us
                     case("q", 21.5)]}       # +7.5% and 1.5 us
    rows, problems = compare(base, new, 0.05)
    assert [r["status"] for r in rows] == ["same", "slower"] and len(problems) == 1
    _, strict = compare(base, new, 0.05, slack_us=0.0)
    assert len(strict) == 2
