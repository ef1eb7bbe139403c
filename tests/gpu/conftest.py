"""The GPU suite's shared fixture, `gpu` (one sparsert Gpu a module: its primary context current
on the test's thread), and the suite split over several device calls: with SPARSERT_GPU_SHARD=i/n (scripts/gpu-check
SHARD=i/n) only every n-th collected GPU test is kept, from the i-th (1-based), so n calls of a
few minutes each run the whole suite once (the suite outgrew one 10-minute call: session 24).
Consecutive tests go to different shards, so each shard gets a share of every file and
parametrisation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SHARD_VARIABLE = "SPARSERT_GPU_SHARD"


def shard_of(spec: str) -> tuple[int, int]:
    """(i, n) of "i/n" with 1 <= i <= n; pytest.UsageError naming the variable otherwise."""
    first, _, count = spec.strip().partition("/")
    try:
        i, n = int(first), int(count)
    except ValueError:
        i = n = 0
    if not 1 <= i <= n:
        raise pytest.UsageError(f"{SHARD_VARIABLE}={spec!r}: expected i/n with 1 <= i <= n, "
                                "e.g. 2/3")
    return i, n


def pytest_collection_modifyitems(config, items):
    spec = os.environ.get(SHARD_VARIABLE)
    if not spec:
        return
    i, n = shard_of(spec)
    ours = [item for item in items if Path(str(item.path)).resolve().is_relative_to(HERE)]
    drop = {id(item) for k, item in enumerate(ours) if k % n != i - 1}
    if drop:
        config.hook.pytest_deselected(items=[item for item in items if id(item) in drop])
        items[:] = [item for item in items if id(item) not in drop]


@pytest.fixture(scope="module")
def gpu():
    from sparsert_cli.gpu.runtime import Gpu

    with Gpu() as g:
        yield g
