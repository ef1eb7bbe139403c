"""The GPU performance workflow template parses, never runs fork code, and uses only sparsert
commands and flags that exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from cli_helpers import run_main

WORKFLOW = Path(__file__).resolve().parent.parent / ".github" / "workflows" / "gpu-perf.yml"


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def _runs(doc: dict) -> list[str]:
    return [step["run"] for job in doc["jobs"].values() for step in job["steps"] if "run" in step]


def test_triggers_permissions_and_fork_guard(workflow):
    on = workflow.get("on", workflow.get(True))          # YAML 1.1 reads a bare `on` as True
    assert set(on) == {"workflow_dispatch", "schedule", "pull_request"}
    assert workflow["permissions"] == {"contents": "read"}
    assert "group" in workflow["concurrency"]
    (job,) = workflow["jobs"].values()
    guard = " ".join(job["if"].split())
    assert "contains(github.event.pull_request.labels.*.name, 'perf')" in guard
    assert "github.event.pull_request.head.repo.full_name == github.repository" in guard
    assert "self-hosted" in job["runs-on"]
    checkout = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["persist-credentials"] is False
    assert any(s.get("uses", "").startswith("actions/upload-artifact") for s in job["steps"])
    assert any("pytest" in r and "-m gpu" in r for r in _runs(workflow))


def _used(scripts: list[str]) -> dict[str, set[str]]:
    """{subcommand: flags} of every `sparsert ...` line in the shell scripts."""
    used: dict[str, set[str]] = {}
    for script in scripts:
        for line in script.replace("\\\n", " ").splitlines():   # join continued lines
            words = shlex.split(line.split(">")[0].split("|")[0].strip() or "#", comments=True)
            if words[:1] == ["sparsert"]:
                used.setdefault(words[1], set()).update(w.split("=")[0] for w in words[2:]
                                                        if w.startswith("-"))
    return used


def _missing(used: dict[str, set[str]], capsys) -> list[tuple[str, str]]:
    missing = []
    for sub, flags in sorted(used.items()):
        code, out, err = run_main([sub, "--help"], capsys)
        assert code == 0, f"sparsert {sub}: {err}"
        missing += [(sub, f) for f in sorted(flags) if not re.search(rf"(^|[\s,]){f}\b", out)]
    return missing


def test_the_flag_check_catches_a_missing_flag(capsys):
    used = _used(["sparsert plot a.json --kind layers --no-such-flag -o out > log"])
    assert used == {"plot": {"--kind", "--no-such-flag", "-o"}}
    assert _missing(used, capsys) == [("plot", "--no-such-flag")]
    assert _used(["sparsert compare a b \\\n  --no-such-flag > log"]) == {
        "compare": {"--no-such-flag"}}


def test_every_sparsert_command_and_flag_exists(workflow, capsys):
    used = _used(_runs(workflow))
    assert {"bench", "compare", "report", "plot"} <= set(used)
    assert not _missing(used, capsys)
