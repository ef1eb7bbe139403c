"""scripts/defaults_eval.py on a tiny synthetic tuning database: every candidate of both
families "measured" at the time a known linear cost model gives it, so the fit recovers that
model and the untuned choice, its time and the best are known."""

from __future__ import annotations

import json
from importlib.machinery import SourceFileLoader
from importlib.util import module_from_spec, spec_from_loader
from pathlib import Path

import numpy as np
import pytest

from sparsert_cli import costmodel, families
from sparsert_cli.api import config_layers
from sparsert_cli.config import load_config
from sparsert_cli.patterns import pattern_hash, to_csr
from sparsert_cli.tune import shape_key
from sparsert_cli.tunedb import TuneDB, plan_json

REPO = Path(__file__).resolve().parents[1]
GPU = "GPU X"
H100 = costmodel.load_coefficients()["NVIDIA H100 80GB HBM3"]
# the H100's fits, the streamed family made cheaper so that both families get chosen
TRUE = {"immediate": costmodel.family_coefficients(H100, "immediate"),
        "streamed": 0.6 * costmodel.family_coefficients(H100, "streamed")}


def _script():
    loader = SourceFileLoader("defaults_eval", str(REPO / "scripts" / "defaults_eval.py"))
    module = module_from_spec(spec_from_loader("defaults_eval", loader))
    loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def no_family_margin(monkeypatch):
    """These tests check the script's bookkeeping against the rule defaults' true times; the
    cost model's family margin (costmodel.OTHER_FAMILY_MARGIN, tested in test_costmodel) would
    turn the fitted model's near-ties on the tiny layers either way."""
    monkeypatch.setattr(costmodel, "OTHER_FAMILY_MARGIN", 1.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config path, database path, {case: (chosen (family, plan), {(family, plan): us})}):
    three small layers at two sparsities, fp32; the immediate rule default of mbv1_pw3 @0.95
    (the cost model's choice there) left out of the database."""
    tmp = tmp_path_factory.mktemp("defaults")
    config, db_path = tmp / "tiny.yaml", tmp / "t.sqlite"
    config.write_text("name: tiny\nproblems: [mbv1_pw3, mbv1_pw5, rn50_c3_reduce]\n"
                      "sparsity: [0.9, 0.95]\n")
    expected = {}
    with TuneDB(db_path) as db:
        for layer in config_layers(load_config(config)):
            csr = to_csr(layer.weight)
            key = (layer.info["problem"], float(layer.info["sparsity"]))
            times, rule = {}, {}
            for family in families.families():
                for i, params in enumerate(family.candidates(layer.geometry, int(csr.nnz),
                                                             precision="fp32", limit=16)):
                    features = family.estimate(layer.geometry, csr, params, "fp32")
                    us = float(costmodel.terms(features, 132) @ TRUE[family.name])
                    times[(family.name, params.name())] = us
                    if i == 0:
                        rule[(family.name, params.name())] = us
                    if key == ("mbv1_pw3", 0.95) and i == 0 and family.name == "immediate":
                        continue                                   # never measured
                    db.insert({"pattern_hash": pattern_hash(layer.weight),
                               "shape": shape_key(layer.geometry), "precision": "fp32",
                               "family": family.name, "family_version": "v",
                               "plan_name": params.name(), "plan_json": plan_json(
                                   params.__dict__), "candidate": i, "problem": key[0],
                               "sparsity": key[1], "gpu_name": GPU, "sm_count": 132,
                               "driver": "d", "median_us": us, "verified": True,
                               "features_json": json.dumps(features)})
            expected[key] = (min(rule, key=rule.get), times)
    return config, db_path, expected


def test_each_case_is_the_cost_models_choice_its_measured_time_and_the_best(tiny):
    config, db_path, expected = tiny
    doc = _script().evaluate(str(db_path), [str(config)])
    assert doc["gpu"] == GPU and len(doc["cases"]) == 6
    assert {c["family"] for c in doc["cases"]} == {"immediate", "streamed"}
    for case in doc["cases"]:
        chosen, times = expected[(case["problem"], case["sparsity"])]
        assert (case["family"], case["plan"]) == chosen
        left_out = (case["problem"], case["sparsity"]) == ("mbv1_pw3", 0.95)
        measured = {k: v for k, v in times.items() if not (left_out and k == chosen)}
        assert case["best_us"] == pytest.approx(min(measured.values()))
        if left_out:
            assert chosen[0] == "immediate" and case["us"] is None and case["ratio"] is None
        else:
            assert case["us"] == pytest.approx(times[chosen])
            assert case["ratio"] == pytest.approx(times[chosen] / case["best_us"])
    summary = doc["summary"]["tiny/fp32"]
    ratios = [c["ratio"] for c in doc["cases"] if c["ratio"]]
    assert summary["cases"] == 6 and summary["not_measured"] == 1
    assert summary["geomean"] == pytest.approx(float(np.exp(np.mean(np.log(ratios)))))
    assert summary["worst"]["ratio"] == max(ratios)
    assert summary["ok"] == (summary["geomean"] <= 1.10 and max(ratios) <= 1.25)


def test_leave_one_layer_out_refits_without_the_layer(tiny, capsys):
    """Exact synthetic times: a fit without any one layer still recovers the model, so the
    left-out choices are the in-sample ones; the printed table says which cases were not
    measured and the summary line."""
    config, db_path, _ = tiny
    script = _script()
    inside = script.evaluate(str(db_path), [str(config)])
    left_out = script.evaluate(str(db_path), [str(config)], loo=True)
    assert [(c["family"], c["plan"]) for c in left_out["cases"]] == \
        [(c["family"], c["plan"]) for c in inside["cases"]]
    assert script.main([str(db_path), "--loo", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "leave-one-layer-out" in out and "not measured" in out
    assert "tiny/fp32: 6 cases, 1 chosen plans not measured; geomean" in out


def test_bad_inputs_are_one_line_exit_2(tiny, tmp_path, capsys):
    config, db_path, _ = tiny
    script = _script()
    assert script.main([str(tmp_path / "none.sqlite"), "--config", str(config)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert script.main([str(db_path), "--gpu", "GPU Y", "--config", str(config)]) == 2
    assert "no verified measurements on 'GPU Y'" in capsys.readouterr().err
    one = tmp_path / "one.yaml"           # one layer: leaving it out leaves nothing to fit
    one.write_text("name: one\nproblems: [mbv1_pw3]\nsparsity: [0.9]\n")
    other = tmp_path / "other.yaml"       # cases the run never measured are counted, not judged
    other.write_text("name: other\nproblems: [mbv1_pw1]\nsparsity: [0.9, 0.95]\n")
    doc = script.evaluate(str(db_path), [str(config), str(other)])
    assert len(doc["cases"]) == 6 and doc["not_in_database"] == {"other": 2}
    assert script.main([str(db_path), "--config", str(other)]) == 0
    assert "other: 2 cases not in the database" in capsys.readouterr().out
    single = tmp_path / "single.sqlite"
    with TuneDB(single) as db, TuneDB(db_path, create=False) as src:
        for row in src.rows("WHERE problem = 'mbv1_pw3'"):
            db.insert({k: v for k, v in row.items() if k != "uid"})
    assert script.main([str(single), "--loo", "--config", str(one)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no verified measurements" in err
