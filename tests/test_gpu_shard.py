"""tests/gpu/conftest.py's shards (SPARSERT_GPU_SHARD=i/n), run on the CPU: a copy of the
conftest beside dummy tests, so no GPU is needed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parent / "gpu" / "conftest.py"


def _run(tmp_path: Path, shard: str | None) -> subprocess.CompletedProcess:
    suite = tmp_path / "gpu"
    suite.mkdir(exist_ok=True)
    shutil.copy(CONFTEST, suite / "conftest.py")
    (suite / "test_dummy.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('k', range(10))\ndef test_k(k):\n"
        "    print('ran', k)\n")
    env = {k: v for k, v in os.environ.items() if k != "SPARSERT_GPU_SHARD"}
    if shard is not None:
        env["SPARSERT_GPU_SHARD"] = shard
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                           "-p", "no:randomly", str(suite)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def _ran(result) -> list[int]:
    return sorted(int(k) for k in re.findall(r"ran (\d+)", result.stdout))


def test_shards_partition_the_suite(tmp_path):
    seen = []
    for i in (1, 2, 3):
        result = _run(tmp_path, f"{i}/3")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "deselected" in result.stdout
        seen.append(_ran(result))
    assert seen == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    whole = _run(tmp_path, None)
    assert _ran(whole) == list(range(10)) and "deselected" not in whole.stdout


@pytest.mark.parametrize("spec", ["0/3", "4/3", "two/3", "3", "1/0"])
def test_a_bad_shard_is_one_clear_error(tmp_path, spec):
    result = _run(tmp_path, spec)
    assert result.returncode != 0
    assert "SPARSERT_GPU_SHARD" in result.stderr + result.stdout and "1 <= i <= n" in (
        result.stderr + result.stdout)
