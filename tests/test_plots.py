"""`sparsert plot`: each figure kind writes PNG + SVG + the CSV it plots; bad input writes nothing."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys

import pytest

from cli_helpers import run_main
from plot_docs import SWEEP_SPEEDUPS, models_doc, sweep_doc, tune_doc, write
from sparsert_cli.plots import data as pdata

pytest.importorskip("matplotlib")

PAPER20 = "results/h100/paper20.json"
FP16 = "results/h100/paper20-fp16.json"


def _csv(path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def _plot(capsys, tmp_path, kind, *paths, extra=()):
    out = tmp_path / "figs"
    code, stdout, err = run_main(["plot", *map(str, paths), "--kind", kind, "-o", str(out),
                                  *extra], capsys)
    assert code == 0, err
    for ext in ("png", "svg", "csv"):
        assert (out / f"{kind}.{ext}").stat().st_size > 0
    assert (out / f"{kind}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (out / f"{kind}.svg").read_text()
    return out, stdout


@pytest.mark.parametrize("curve, at, note", [
    ([(0.5, 0.5), (0.7, 0.8), (0.9, 2.0)],
     0.7 + 0.2 * math.log(1 / 0.8) / math.log(2.0 / 0.8), "interpolated"),
    ([(0.5, 0.5), (0.9, 2.0)], 0.7, "interpolated"),           # symmetric in log: the middle
    ([(0.5, 1.1), (0.9, 2.0)], None, "below range (>= 1 already at 0.5)"),
    ([(0.5, 0.2), (0.9, 0.9)], None, "none (below 1 up to 0.9)"),
    # dips below 1 again at 0.8: break-even is where it *stays* above 1
    ([(0.5, 0.5), (0.6, 1.2), (0.8, 0.9), (0.9, 0.9 * (1 / 0.9) ** 2)], 0.85, "interpolated"),
])
def test_break_even_is_log_linear_and_says_when_out_of_range(curve, at, note):
    got, why = pdata.break_even(curve)
    assert why == note
    assert (got is None and at is None) or got == pytest.approx(at, abs=1e-12)


def test_speedup_from_a_sweep_marks_break_even_per_baseline(capsys, tmp_path):
    path = write(tmp_path, sweep_doc(), "sweep.json")
    out, stdout = _plot(capsys, tmp_path, "speedup", path)
    rows = _csv(out / "speedup.csv")
    even = {r["baseline"]: r for r in rows if r["series"] == "break_even"}
    want = 0.7 + 0.2 * math.log(1 / 0.8) / math.log(2.0 / 0.8)
    assert float(even["cublas_fp32"]["sparsity"]) == pytest.approx(want, rel=1e-5)
    assert even["cublas_tf32"]["note"].startswith("below range")
    assert even["cusparse"]["note"].startswith("none")
    assert f"break-even sparsity vs cublas_fp32: {want:.3f}" in stdout
    geo = {(r["baseline"], float(r["sparsity"])): float(r["speedup"]) for r in rows
           if r["series"] == "geomean"}
    assert geo == pytest.approx({(n, s): v[i] for n, v in SWEEP_SPEEDUPS.items()
                                 for i, s in enumerate((0.5, 0.7, 0.9))})
    assert {r["series"] for r in rows} == {"layer_a", "layer_b", "geomean", "break_even"}


def test_speedup_geomeans_match_the_ones_bench_stored(capsys, tmp_path):
    out, _ = _plot(capsys, tmp_path, "speedup", PAPER20,
                   extra=["--baselines", "cublas_fp32,cusparse"])
    stored = json.loads(open(PAPER20).read())["geomean"]
    rows = [r for r in _csv(out / "speedup.csv") if r["series"] == "geomean"]
    assert {r["baseline"] for r in rows} == {"cublas_fp32", "cusparse"}
    for r in rows:
        assert float(r["speedup"]) == pytest.approx(
            stored[f"{float(r['sparsity']):g}"][r["baseline"]], rel=1e-5)


def test_layers_whiskers_come_from_the_samples(capsys, tmp_path):
    out, _ = _plot(capsys, tmp_path, "layers", PAPER20, FP16)
    rows = _csv(out / "layers.csv")
    series = {r["series"] for r in rows}
    assert {"sparsert paper20", "sparsert paper20-fp16", "cublas_fp32", "cusparse"} <= series
    doc = json.loads(open(PAPER20).read())
    case = doc["cases"][3]
    row = next(r for r in rows if r["series"] == "sparsert paper20"
               and r["problem"] == case["problem"] and float(r["sparsity"]) == case["sparsity"])
    for key in ("median_us", "p20_us", "p80_us"):           # numpy's percentiles of the samples
        assert float(row[key]) == pytest.approx(case["sparsert"][key], rel=1e-5)
    assert len(rows) == 2 * 40 + sum(1 for c in doc["cases"] for b in c["baselines"].values()
                                     if b.get("ok"))


def test_roofline_uses_the_measured_floors(capsys, tmp_path):
    out, _ = _plot(capsys, tmp_path, "roofline", PAPER20, FP16)
    rows = _csv(out / "roofline.csv")
    cases = [c for p in (PAPER20, FP16) for c in json.loads(open(p).read())["cases"]]
    assert len(rows) == len(cases) == 80
    for r, c in zip(rows, cases):
        assert float(r["floor_pct"]) == pytest.approx(c["floor_pct"], rel=1e-5)
        assert float(r["gflops"]) == pytest.approx(
            2 * c["nnz"] * c["n"] / (c["sparsert"]["median_us"] * 1e3), rel=1e-5)
    assert "% of the case" in (out / "roofline.svg").read_text()


def test_compare_sorts_ratios_with_noise_bands(capsys, tmp_path):
    out, _ = _plot(capsys, tmp_path, "compare", "results/h100/paper20-v1-untuned.json",
                   PAPER20)
    rows = _csv(out / "compare.csv")
    ratios = [float(r["ratio"]) for r in rows]
    assert ratios == sorted(ratios) and len(rows) == 40
    assert all(float(r["low"]) <= float(r["ratio"]) <= float(r["high"]) for r in rows)
    assert {r["status"] for r in rows} <= {"same", "faster", "slower", "ambiguous"}
    assert "faster" in {r["status"] for r in rows}       # the tuned run beats the untuned one


def test_compare_uses_the_gate_statuses_and_band(tmp_path):
    base, new = sweep_doc("bench"), sweep_doc("bench")
    for doc in (base, new):
        doc["mode"] = "gpu"
    for c in new["cases"]:                                   # 10% slower: 0.1-0.6 us
        c["sparsert"] = {k: v * 1.1 if k != "samples_us" else [x * 1.1 for x in v]
                         for k, v in c["sparsert"].items()}
    slow = new["cases"][0]
    slow["sparsert"]["samples_us"] = [1.0, 1.0] + slow["sparsert"]["samples_us"][2:]
    new["cases"] = new["cases"][:-1]                         # one case lost
    data = pdata.compare_rows([(tmp_path / "b.json", base), (tmp_path / "n.json", new)])
    rows = {r["case"].split()[0] + r["case"].split()[-1]: r for r in data["rows"]}
    assert rows["layer_b@0.9"]["status"] == "missing" and data["rows"][-1]["ratio"] is None
    timed = [r for r in data["rows"] if r["ratio"]]
    assert [r["ratio"] for r in timed] == sorted(r["ratio"] for r in timed)
    for r in timed:
        assert r["low"] <= r["ratio"] <= r["high"]
        want = "same" if r["new_us"] - r["base_us"] <= 0.3 else "slower"
        assert r["status"] == (want if r is not rows["layer_a@0.5"] else "ambiguous"), r


def test_tune_and_model_figures(capsys, tmp_path):
    out, _ = _plot(capsys, tmp_path, "tune", write(tmp_path, tune_doc(), "tune.json"))
    rows = _csv(out / "tune.csv")
    assert [r["role"] for r in rows].count("winner") == 2 and len(rows) == 2 * 8
    assert {r["family"] for r in rows if r["role"] == "candidate"} == {"rows", "stream"}
    out, _ = _plot(capsys, tmp_path, "model", write(tmp_path, models_doc(), "models.json"))
    share = {r["layer"]: float(r["share"]) for r in _csv(out / "model.csv")}
    assert share == pytest.approx({"conv1": 5 / 16, "pw1": 2 / 16, "pw2": 3 / 16, "fc": 4 / 16,
                                   "other": 2 / 16})


def test_figures_are_deterministic(capsys, tmp_path):
    a, _ = _plot(capsys, tmp_path / "a", "roofline", PAPER20)
    b, _ = _plot(capsys, tmp_path / "b", "roofline", PAPER20)
    for ext in ("png", "svg", "csv"):
        assert (a / f"roofline.{ext}").read_bytes() == (b / f"roofline.{ext}").read_bytes()


@pytest.mark.parametrize("kind, make, words", [
    ("layers", lambda t: write(t, "{nope", "bad.json"), "not a results JSON file"),
    ("layers", lambda t: write(t, tune_doc(), "t.json"), "holds tune results; this needs bench"),
    ("tune", lambda t: write(t, sweep_doc(), "s.json"), "holds sweep results; this needs tune"),
    ("speedup", lambda t: write(t, {**sweep_doc(), "cases": []}, "empty.json"),
     "sweep results with no cases"),
    ("speedup", lambda t: write(t, sweep_doc(sparsities=(0.9,)), "one.json"),
     "needs cases at two or more sparsities; these results have 1"),
    ("roofline", lambda t: write(t, {**sweep_doc(), "floors": {}}, "nofloor.json"),
     "no measured floors"),
    ("layers", lambda t: write(t, {**sweep_doc(), "cases": [
        {**c, "verify_gpu": None} for c in sweep_doc()["cases"]]}, "cpu.json"),
     "no case was timed on a GPU"),
    ("model", lambda t: write(t, {**models_doc(), "models": [{"name": "m"}]}, "m.json"),
     "lacks the fields this figure reads (KeyError: 'sparsert_us')"),
    ("compare", lambda t: write(t, sweep_doc(), "one.json"), "takes two files, BASE NEW"),
])
def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, kind, make, words):
    path = make(tmp_path)
    out = tmp_path / "figs"
    code, _, err = run_main(["plot", str(path), "--kind", kind, "-o", str(out)], capsys)
    assert code == 2 and words in err and str(path) in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_unknown_baseline_and_file_in_the_way(capsys, tmp_path):
    out = tmp_path / "figs"
    code, _, err = run_main(["plot", PAPER20, "--kind", "layers", "-o", str(out),
                             "--baselines", "cublas_fp64"], capsys)
    assert code == 2 and "unknown baseline 'cublas_fp64'" in err and not out.exists()
    out.write_text("x")
    code, _, err = run_main(["plot", PAPER20, "--kind", "layers", "-o", str(out)], capsys)
    assert code == 2 and "is not a directory" in err and out.read_text() == "x"


def test_missing_matplotlib_is_one_line(capsys, tmp_path, monkeypatch):
    import sparsert_cli.plots as plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib -> ImportError
    monkeypatch.delitem(sys.modules, "sparsert_cli.plots.draw", raising=False)
    monkeypatch.delattr(plots, "draw", raising=False)
    out = tmp_path / "figs"
    code, _, err = run_main(["plot", PAPER20, "--kind", "layers", "-o", str(out)], capsys)
    assert code == 2 and "pip install 'sparsert[plot]'" in err and not out.exists()
    assert len(err.strip().splitlines()) == 1


def test_cli_does_not_import_matplotlib_until_a_figure_is_drawn(subprocess_env):
    code = ("import sys; from sparsert_cli.cli import main\n"
            "import sparsert_cli.commands.plot, sparsert_cli.commands.report\n"
            "try: main(['plot', '--help'])\nexcept SystemExit: pass\n"
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'")
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_batch_sparsity_map_against_the_fastest_baseline(capsys, tmp_path):
    paths = []
    for batch, scale in ((1, 1.0), (8, 0.5)):
        doc = sweep_doc()
        for c in doc["cases"]:       # bench folds batch into a gemm's N: its case says 1
            c["op"], c["batch"] = ("gemm", 1) if c["problem"] == "layer_a" else ("conv1x1", batch)
            c["speedup"] = {n: v * scale for n, v in c["speedup"].items()}
        paths.append(write(tmp_path, doc, f"sweep-b{batch}.json"))
    out, _ = _plot(capsys, tmp_path, "map", *paths)
    rows = {(r["problem"], int(r["batch"]), float(r["sparsity"])): r
            for r in _csv(out / "map.csv")}
    assert len(rows) == 2 * 2 * 3
    # cuSPARSE is the fastest baseline everywhere here (its speedups are the smallest)
    assert rows[("layer_a", 8, 0.9)]["against"] == "cusparse"
    assert float(rows[("layer_a", 8, 0.9)]["speedup"]) == pytest.approx(0.45)
    out2 = tmp_path / "m2"
    code, _, err = run_main(["plot", *map(str, paths), "--kind", "map", "-o", str(out2),
                             "--baselines", "cublas_fp32"], capsys)
    assert code == 0, err
    assert float(next(r for r in _csv(out2 / "map.csv") if r["batch"] == "1"
                      and r["sparsity"] == "0.9")["speedup"]) == pytest.approx(2.0)
    code, _, err = run_main(["plot", str(paths[0]), str(paths[0]), "--kind", "map", "-o",
                             str(tmp_path / "m3")], capsys)
    assert code == 2 and "give one file per batch" in err and not (tmp_path / "m3").exists()


@pytest.mark.parametrize("kind", ["layers", "roofline"])
def test_the_readmes_figures_match_the_committed_results(capsys, tmp_path, kind):
    """docs/img/paper20/<kind>.csv is what `scripts/figures` draws from results/h100 today: a
    results file re-committed without `make figures` leaves the README's picture stale."""
    from pathlib import Path

    out, _ = _plot(capsys, tmp_path, kind, PAPER20, FP16)
    committed = Path("docs/img/paper20") / f"{kind}.csv"
    assert _csv(out / f"{kind}.csv") == _csv(committed), (
        f"{committed} is stale: run `make figures` (scripts/figures) and commit docs/img")
