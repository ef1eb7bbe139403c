"""A measure object for the tuning executors without a GPU: a deterministic fake timer.

Pickled into spawned worker processes (tests/ is on their sys.path), so it must stay importable
and free of state that does not pickle. `crash` maps (case, candidate) job ids to what happens:
"exit" (the process dies), "sticky" (a sticky CUDA error), "error" (an ordinary failure),
"hang" (never returns, like a kernel that does not end); with
`marker_dir` a crash happens only the first time that job runs (then the retry succeeds)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from sparsert_cli.bench import BenchMeasure


def fake_us(case_key: str, plan_name: str) -> float:
    digest = hashlib.sha256(f"{case_key}|{plan_name}".encode()).hexdigest()
    return 1.0 + int(digest[:8], 16) % 1000 / 100.0


class FakeMeasure:
    def __init__(self, crash=None, marker_dir=None, delay=0.0, log_dir=None):
        self.crash = dict(crash or {})
        self.marker_dir = marker_dir
        self.delay = delay
        self.log_dir = log_dir

    def open(self) -> dict:
        return {"gpu_name": "Fake GPU", "sm_count": 4, "driver": "0.0",
                "clocks": {"sm_mhz": 1}, "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def __call__(self, job, inputs) -> dict:
        if self.log_dir:   # one file per measurement: tests count re-measurements
            Path(self.log_dir, f"{job.job.case}-{job.job.candidate}-{time.time_ns()}").touch()
        what = self.crash.get(job.job.id)
        if what and self.marker_dir:
            marker = Path(self.marker_dir, f"{job.job.case}-{job.job.candidate}")
            if marker.exists():
                what = None
            else:
                marker.touch()
        if what == "exit":
            os._exit(7)
        if what == "sticky":
            raise RuntimeError("cuLaunchKernel failed: CUDA_ERROR_ILLEGAL_ADDRESS (700)")
        if what == "hang":
            time.sleep(3600)
        if what == "error":
            raise RuntimeError("cuModuleLoadData failed: CUDA_ERROR_INVALID_IMAGE (200)")
        if self.delay:
            time.sleep(self.delay)
        x, _, ref, _ = inputs
        ok = x.shape == tuple(job.problem.input_shape) and ref.shape == tuple(
            job.problem.output_shape) and len(job.build.cubin) > 0
        us = fake_us(job.case_key, job.launch.params.name())
        return {"verified": ok, "error": None if ok else "inputs do not match the problem",
                "median_us": us, "p20_us": us * 0.99, "p80_us": us * 1.01, "n": 5}

    def close(self) -> None:
        pass


def fake_compile(case, job, emitter, arch, cache_root, threads=1, verify_seed=None):
    """compile_job without a compiler: a launch that names the plan and a one-byte 'cubin'."""
    from types import SimpleNamespace

    from sparsert_cli.jobs import Compiled

    return Compiled(job, SimpleNamespace(params=job.params), SimpleNamespace(cubin=b"\0"))


def fake_inputs(case, seconds=0.05, pad_bytes=4 << 20):
    """case_inputs at a fixed cost (`seconds`, sleeping like BLAS without the GIL) and with
    `pad_bytes` of residual, like a big layer's float64 reference travelling to a worker."""
    import numpy as np

    time.sleep(seconds)
    p = case.problem
    return (np.zeros(p.input_shape, np.float32), np.zeros(pad_bytes // 8),
            np.zeros(p.output_shape), np.ones(p.output_shape))


class FakeBenchMeasure(BenchMeasure):
    """bench's per-case GPU part without a GPU: the kernel (light, in a `--gpus` worker) is
    rebuilt from the config as on a GPU, its plan executed on the CPU against float64 for inputs
    from the case's gpu-verify seed; timings are fake_us. `crash` maps case indices to "exit",
    "sticky" (raised) or "sticky-baseline" (recorded, then the worker must go); with
    `marker_dir` only the first time. `delay` maps case indices to seconds of sleep."""

    def __init__(self, config, crash=None, marker_dir=None, delay=None, mixed=False):
        super().__init__(config)
        self.crash, self.marker_dir, self.delay = dict(crash or {}), marker_dir, dict(delay or {})
        self.mixed = mixed      # every device a different model of GPU

    def open(self) -> dict:
        self.floors = {"fp32_gflops": 50000.0, "bandwidth_gbs": 3000.0, "launch_us": 2.0}
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return {"gpu": {"name": f"Fake GPU {visible}" if self.mixed else "Fake GPU",
                        "arch": "sm_90", "driver_version": 1,
                        "visible": visible, "pid": os.getpid()},
                "floors": self.floors}

    def __call__(self, index, kernel):
        what = self.crash.get(index)
        if what and self.marker_dir:
            marker = Path(self.marker_dir, f"case-{index}")
            what = None if marker.exists() else what
            marker.touch()
        if what == "exit":
            os._exit(7)
        if what == "sticky":
            raise RuntimeError("cuLaunchKernel failed: CUDA_ERROR_ILLEGAL_ADDRESS (700)")
        time.sleep(self.delay.get(index, 0.0))
        out = super().__call__(index, kernel)
        if what == "sticky-baseline":
            out["baselines"]["cusparse"] = {"ok": False, "message": "CUDA_ERROR_LAUNCH_FAILED"}
        return out

    def benchmark(self, kernel, rng) -> dict:
        from sparsert_cli.benchmark import floor_us

        x, res = kernel.random_inputs(rng)
        ok, err, message = kernel.check(kernel.run_cpu(x, res), x, res)
        us = fake_us(kernel.entry, kernel.plan_params.name())
        fl = floor_us(kernel, self.floors)
        return {"kernel": {"registers": kernel.resources.registers, "local_bytes": 0},
                "verify_gpu": {"ok": ok, "max_err": err, "message": message},
                "sparsert": {"median_us": us}, "baselines": {"cublas_fp32": {
                    "ok": True, "median_us": 2 * us}}, **fl,
                "floor_pct": 100 * fl["floor_us"] / us, "speedup": {"cublas_fp32": 2.0}}
