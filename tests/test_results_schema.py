"""Results files say what they are; the loader refuses the wrong kind with one line."""

from __future__ import annotations

import json

import pytest

from sparsert_cli import results
from sparsert_cli.errors import UserError


def _write(tmp_path, doc, name="r.json"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_legacy_bench_files_load_as_bench():
    doc = results.load_results("results/h100/paper20.json", kinds=("bench",))
    assert doc["kind"] == "bench" and doc["cases"]


def test_stamp_puts_kind_and_schema_first():
    doc = results.stamp({"cases": [{}], "schema": 1}, "sweep")
    assert list(doc)[:2] == ["kind", "schema"] and doc["schema"] == results.SCHEMA


@pytest.mark.parametrize("doc, words", [
    ("not json", "not a results JSON"),
    ([1, 2], "top level is not an object"),
    ({"kind": "bench", "cases": [{}]}, "no integer 'schema'"),
    ({"kind": "bench", "schema": 99, "cases": [{}]}, "newer than"),
    ({"kind": "weather", "schema": 2, "cases": [{}]}, "kind 'weather'"),
    ({"kind": "tune", "schema": 2, "cases": [{}]}, "holds tune results"),
    ({"kind": "bench", "schema": 2, "cases": []}, "with no cases"),
    ({"kind": "bench", "schema": 2, "cases": {}}, "without a 'cases' list"),
    ({"kind": "bench", "schema": 2, "cases": [1]}, "not all objects"),
])
def test_bad_results_files_are_one_line(tmp_path, doc, words):
    path = _write(tmp_path, doc)
    with pytest.raises(UserError) as info:
        results.load_results(path, kinds=("bench",))
    assert words in info.value.message and str(path) in info.value.message
    assert "\n" not in info.value.message


def test_missing_and_directory(tmp_path):
    with pytest.raises(UserError, match="no such results file"):
        results.load_results(tmp_path / "nope.json")
    with pytest.raises(UserError, match="is a directory"):
        results.load_results(tmp_path)
