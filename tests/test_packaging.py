"""A non-editable install works: the shipped problems, configs and tuned plans are package data,
found from any working directory (issue 14, item 7). CI also installs a real wheel (.ci/run)."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import run_main

from sparsert_cli.errors import UserError
from sparsert_cli.paths import CONFIG_DIR, DATA_DIR, PROBLEM_DIR, SHIPPED_TUNED, tuned_db_path


def _pyproject(repo: Path) -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((repo / "pyproject.toml").read_text())


def test_package_data_globs_cover_every_shipped_file(repo):
    globs = _pyproject(repo)["tool"]["setuptools"]["package-data"]["sparsert_cli"]
    package = repo / "sparsert_cli"
    files = [p.relative_to(package).as_posix() for p in DATA_DIR.rglob("*") if p.is_file()
             if "__pycache__" not in p.parts]
    assert len(files) > 30
    assert [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)] == []


def test_license_is_an_spdx_string(repo):
    doc = _pyproject(repo)
    assert doc["project"]["license"] == "Apache-2.0"      # no setuptools deprecation warning
    assert any(r.startswith("setuptools>=77") for r in doc["build-system"]["requires"])


def test_top_level_dirs_are_links_into_the_package(repo):
    """README paths (configs/ci.yaml, problems/) stay true in a checkout."""
    assert (repo / "configs").resolve() == CONFIG_DIR
    assert (repo / "problems").resolve() == PROBLEM_DIR
    assert (repo / "configs" / "ci.yaml").is_file()


def _installed_copy(repo: Path, tmp_path: Path) -> tuple[Path, dict]:
    """The package alone, as a wheel lays it out, with no source tree around it."""
    site = tmp_path / "site"
    shutil.copytree(repo / "sparsert_cli", site / "sparsert_cli",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), SPARSERT_CACHE_DIR=str(tmp_path / "cache"), NO_COLOR="1")
    return site, env


def _sparsert(args, env, cwd):
    proc = subprocess.run([sys.executable, "-m", "sparsert_cli.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_an_installed_package_finds_its_data_from_any_directory(repo, tmp_path):
    site, env = _installed_copy(repo, tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    shipped = sorted(p.stem for p in (repo / "problems").glob("*.yaml"))
    listed = json.loads(_sparsert(["problems", "--json"], env, work))
    assert sorted(d["id"] for d in listed) == shipped
    paper20 = json.loads(_sparsert(["problems", "paper20", "--json"], env, work))  # shipped ids
    assert len(paper20) == 20
    one = ["--compile-only", "--problems", "ci_gemm_odd", "--sparsity", "0.8"]
    for config in ("ci", "configs/ci.yaml"):     # by name, and the README's path
        _sparsert(["bench", config, *one, "--out", "r.json"], env, work)
        doc = json.loads((work / "r.json").read_text())
        assert doc["failures"] == [] and len(doc["cases"]) == 1
        assert Path(doc["config"]["path"]).is_relative_to(site)
    code = ("from sparsert_cli.paths import tuned_db_path; from sparsert_cli.tune import TunedDB;"
            "p = tuned_db_path(); print(p); print(len(TunedDB(p).entries))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=work, capture_output=True,
                          text=True, timeout=60, check=True)
    path, entries = proc.stdout.split()
    assert Path(path).is_relative_to(site) and int(entries) > 0


def test_tuned_db_default_reads_the_shipped_copy_and_writes_only_a_local_one(tmp_path,
                                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tuned_db_path() == SHIPPED_TUNED
    with pytest.raises(UserError, match="--db"):
        tuned_db_path(write=True)
    assert tuned_db_path("mine.json", write=True) == Path("mine.json")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tuned.json").write_text('{"entries": {}}')
    assert tuned_db_path() == tuned_db_path(write=True) == Path("configs/tuned.json")


def test_tune_without_a_local_database_asks_for_db(tmp_path, monkeypatch, capsys):
    """`tune` never writes into the installed package (checked before any GPU work)."""
    import sparsert_cli.gpu.runtime as runtime

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runtime, "have_gpu", lambda: True)
    code, _, err = run_main(["tune", "ci"], capsys)
    assert code == 2 and "--db" in err and len(err.strip().splitlines()) == 1


def test_an_unknown_config_name_lists_the_shipped_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(["bench", "nosuch"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "nosuch: no such config file" in err and "paper20-fp16" in err
