"""`sparsert compare --retime` on a real GPU, end to end: two cases of configs/ci.yaml benched
with run_benchmark, a baseline made ambiguous for one of them, then compare re-times that case
on the GPU and decides it again. Skipped without a GPU."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from sparsert_cli.gpu.runtime import have_gpu

if not have_gpu():
    pytest.skip("no CUDA driver or GPU", allow_module_level=True)

from cli_helpers import run_main  # noqa: E402
from sparsert_cli.bench import run_benchmark  # noqa: E402
from sparsert_cli.commands._common import select  # noqa: E402
from sparsert_cli.commands.compare import compare  # noqa: E402
from sparsert_cli.config import load_config  # noqa: E402
from sparsert_cli.gpu.runtime import Gpu  # noqa: E402
from sparsert_cli.paths import tuned_db_path  # noqa: E402
from sparsert_cli.tune import TunedDB  # noqa: E402

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]


def test_compare_retime_re_times_an_ambiguous_case(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)           # configs/ci.yaml and the tuned plans, as bench finds them
    config = select(load_config("configs/ci.yaml"), ["ci_gemm_odd", "ci_pw_batch2"], ["0.8"],
                    None)
    gpu = Gpu()
    try:
        new = run_benchmark(config, gpu=gpu, gpu_name=gpu.name, arch=gpu.arch,
                            tuned=TunedDB(tuned_db_path(None)), baselines=False)
    finally:
        gpu.close()
    assert not new["failures"], new["failures"]
    base = copy.deepcopy(new)
    # the first case: BASE 1.5x faster by its median, but with samples wide enough to overlap
    timing = base["cases"][0]["sparsert"]
    median = new["cases"][0]["sparsert"]["median_us"]
    timing["median_us"] = median / 1.5
    timing["samples_us"] = [median * (0.3 + 1.2 * i / 19) for i in range(20)]
    rows, _ = compare(base, new, 0.05, slack_us=0.0)     # no slack: a ~1 us kernel counts
    assert [r["status"] for r in rows] == ["ambiguous", "same"], rows
    key = rows[0]["case"]
    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "new.json").write_text(json.dumps(new))
    code, out, err = run_main(["compare", str(tmp_path / "base.json"),
                               str(tmp_path / "new.json"), "--slack-us", "0", "--retime",
                               "--json", "--retime-out", str(tmp_path / "re.json")], capsys)
    assert code in (0, 1), err
    assert f"re-timed 1 of 1 ambiguous case(s): {key} ->" in err
    result = json.loads(out)
    row = next(r for r in result["rows"] if r["case"] == key)
    assert row["retimed"] > 0
    assert code == (1 if row["status"] == "slower" else 0)
    assert [r["status"] for r in result["rows"] if r["case"] != key] == ["same"]
    retimed = json.loads((tmp_path / "re.json").read_text())
    samples = retimed["cases"][0]["sparsert"]["samples_us"]
    assert len(samples) == len(new["cases"][0]["sparsert"]["samples_us"]) + row["retimed"]
    assert retimed["retimed"] == [key]
