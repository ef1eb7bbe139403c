"""Shared fixtures and test-matrix generators for the CPU test suite.

Generators live here once (Sputnik-style): odd geometries, edge-case sparsity patterns, plan
parameters and epilogues, plus the float64 check every plan test uses. Hypothesis tests draw through
`st.data()` with the session-scoped `gen` fixture, so no test module imports this file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from sparsert_cli import reference
from sparsert_cli.families.immediate import PlanParams
from sparsert_cli.problem_shape import Epilogue, Geometry

REPO = Path(__file__).resolve().parent.parent

# Hypothesis keeps its files under ./.hypothesis by default; keep the repository clean.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "sparsert-tests-hypothesis")

# Named sparsity patterns every plan/emitter must handle (M x K views of the weight).
PATTERN_KINDS = ("random", "empty_rows", "empty_cols", "single_row", "single_col", "dense_row",
                 "one_col_all", "single_nonzero", "all_zero", "dense")


def weight_matrix(kind: str, m: int, k: int, density: float, rng: np.random.Generator
                  ) -> np.ndarray:
    """An M x K float32 matrix with the named pattern; nonzeros are N(0,1) and never exactly 0."""
    values = rng.standard_normal((m, k)).astype(np.float32)
    values[values == 0] = 0.5
    keep = rng.random((m, k)) < density
    if kind == "random":
        pass
    elif kind == "empty_rows":
        keep[rng.random(m) < 0.5] = False
    elif kind == "empty_cols":
        keep[:, rng.random(k) < 0.5] = False
    elif kind == "single_row":
        keep[:] = False
        keep[rng.integers(m)] = rng.random(k) < max(density, 0.3)
    elif kind == "single_col":
        keep[:] = False
        keep[:, rng.integers(k)] = True
    elif kind == "dense_row":
        keep[rng.integers(m)] = True
    elif kind == "one_col_all":        # every nonzero of the matrix sits in one column
        keep[:] = False
        keep[:, rng.integers(k)] = rng.random(m) < max(density, 0.5)
    elif kind == "single_nonzero":
        keep[:] = False
        keep[rng.integers(m), rng.integers(k)] = True
    elif kind == "all_zero":
        keep[:] = False
    elif kind == "dense":
        keep[:] = True
    else:
        raise ValueError(kind)
    return np.where(keep, values, np.float32(0)).astype(np.float32)


def conv_weight(kind: str, geometry: Geometry, density: float, rng: np.random.Generator
                ) -> np.ndarray:
    """(M, C, k, k) weight for `geometry` with the named pattern over its M x (C*k*k) view."""
    flat = weight_matrix(kind, geometry.out_channels, geometry.taps, density, rng)
    return flat.reshape(geometry.out_channels, geometry.in_channels, geometry.kernel,
                        geometry.kernel)


def draw_geometry(data: st.DataObject) -> Geometry:
    """gemm (1x1, H=1, W=N), 1x1 conv with batch/stride/padding, or 3x3 stride 1/2 pad 0/1."""
    kind = data.draw(st.sampled_from(["gemm", "conv1x1", "conv3x3"]), label="op")
    m = data.draw(st.integers(1, 40), label="M")
    c = data.draw(st.integers(1, 40), label="C")
    if kind == "gemm":
        n = data.draw(st.integers(1, 150), label="N")
        return Geometry(batch=1, in_channels=c, height=1, width=n, out_channels=m)
    kernel = 1 if kind == "conv1x1" else 3
    stride = data.draw(st.sampled_from([1, 2]), label="stride")
    padding = data.draw(st.sampled_from([0, 1]), label="padding")
    low = max(1, kernel - 2 * padding)
    height = data.draw(st.integers(low, 11), label="H")
    width = data.draw(st.integers(low, 11), label="W")
    batch = data.draw(st.integers(1, 3), label="batch")
    return Geometry(batch=batch, in_channels=c, height=height, width=width, out_channels=m,
                    kernel=kernel, stride=stride, padding=padding)


def draw_params(data: st.DataObject) -> PlanParams:
    return PlanParams(
        rows_per_group=data.draw(st.integers(1, 16), label="rows_per_group"),
        vector_width=data.draw(st.sampled_from([1, 2, 4]), label="vector_width"),
        col_threads=data.draw(st.sampled_from([32, 64, 128]), label="col_threads"),
        k_split=data.draw(st.integers(1, 4), label="k_split"),
        load_batch=data.draw(st.integers(1, 16), label="load_batch"),
        balance=data.draw(st.sampled_from(["nnz", "contiguous"]), label="balance"),
        grid_order=data.draw(st.sampled_from(["tiles", "groups"]), label="grid_order"))


def draw_epilogue(data: st.DataObject, rows: int, rng: np.random.Generator) -> Epilogue:
    bias = None
    if data.draw(st.booleans(), label="bias"):
        bias = tuple(float(v) for v in rng.standard_normal(rows).astype(np.float32))
    return Epilogue(bias=bias,
                    activation=data.draw(st.sampled_from(["none", "relu", "relu6"]),
                                         label="activation"),
                    residual=data.draw(st.booleans(), label="residual"))


def random_inputs(geometry: Geometry, residual: bool, rng: np.random.Generator):
    x = rng.standard_normal((geometry.batch, geometry.in_channels, geometry.height,
                             geometry.width))
    res = (rng.standard_normal((geometry.batch, geometry.out_channels, geometry.out_height,
                                geometry.out_width)) if residual else None)
    return x, res


def reference_for(plan, weight: np.ndarray, x: np.ndarray, res):
    """(float64 reference output, magnitude sum |w||x| + |bias| + |res|) for a plan's inputs."""
    geo, epi = plan.geometry, plan.epilogue
    ref = reference.conv_reference(weight, x, geo.stride, geo.padding, epi.bias, res,
                                   epi.activation)
    mag = reference.conv_reference(weight, x, geo.stride, geo.padding, epi.bias, res,
                                   absolute=True)
    return ref, mag


def assert_matches_float64(out: np.ndarray, ref: np.ndarray, mag: np.ndarray,
                           rel: float = 1e-12) -> None:
    """Element-wise |out - ref| <= rel * (sum |w||x| + ...): float64 rounding only."""
    out = np.asarray(out, dtype=np.float64).reshape(ref.shape)
    assert np.all(np.isfinite(out)), "unwritten (NaN) outputs"
    err = np.abs(out - ref)
    bound = rel * mag + 1e-300
    bad = np.argwhere(err > bound)
    assert bad.size == 0, (f"{len(bad)} outputs off; first at {tuple(bad[0])}: "
                           f"got {out[tuple(bad[0])]!r}, want {ref[tuple(bad[0])]!r}")


class Generators:
    """Namespace handed to tests by the `gen` fixture."""

    PATTERN_KINDS = PATTERN_KINDS
    weight_matrix = staticmethod(weight_matrix)
    conv_weight = staticmethod(conv_weight)
    draw_geometry = staticmethod(draw_geometry)
    draw_params = staticmethod(draw_params)
    draw_epilogue = staticmethod(draw_epilogue)
    random_inputs = staticmethod(random_inputs)
    reference_for = staticmethod(reference_for)
    assert_matches_float64 = staticmethod(assert_matches_float64)


@pytest.fixture(scope="session")
def gen() -> type[Generators]:
    return Generators


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """Point the kernel cache at a per-test directory: tests never touch ~/.cache."""
    root = tmp_path / "kernel-cache"
    monkeypatch.setenv("SPARSERT_CACHE_DIR", str(root))
    return root


@pytest.fixture
def wide_terminal(monkeypatch):
    """Rich tables at 250 columns so long entry names and paths are not cut with an ellipsis."""
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setenv("NO_COLOR", "1")


@pytest.fixture
def subprocess_env(isolated_cache) -> dict:
    """Environment for `python -m sparsert_cli.cli ...` from any directory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["SPARSERT_CACHE_DIR"] = str(isolated_cache)
    env["COLUMNS"] = "250"
    env["NO_COLOR"] = "1"
    return env
