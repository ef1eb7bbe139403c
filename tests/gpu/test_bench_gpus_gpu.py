"""`bench --gpus all` on whatever GPUs this host has: the cases measured in spawned workers
(--force-workers: even with one GPU), every case verified on the GPU. Skipped without a GPU."""

from __future__ import annotations

import json

import pytest

from cli_helpers import run_main
from sparsert_cli.executors import gpu_count

if gpu_count() < 1:
    pytest.skip("no CUDA driver or GPU", allow_module_level=True)

pytestmark = pytest.mark.gpu


def test_bench_gpus_all_verifies_every_case_in_workers(tmp_path, capsys):
    out = tmp_path / "ci.json"
    code, stdout, err = run_main(["bench", "configs/ci.yaml", "--gpus", "all", "--force-workers",
                                  "--problems", "ci_gemm_odd,ci_3x3_pad1", "--no-tuned",
                                  "--out", str(out)], capsys)
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert len(doc["cases"]) == 4 and not doc["failures"]
    assert all(r["verify_gpu"]["ok"] and r["sparsert"]["median_us"] > 0 for r in doc["cases"])
    assert len(doc["gpus"]) == gpu_count()
    assert {r["gpu_slot"] for r in doc["cases"]} <= set(range(gpu_count()))
    assert all(g["floors"]["fp32_gflops"] > 0 for g in doc["gpus"])
    assert "cases/s" in stdout
