"""Sparse weights: generated (uniform, pruned-like) or read from a file, always validated.

A weight is a dense float32 array of shape (M, C, kh, kw) whose zeros are the pattern; a GEMM weight
is (M, K, 1, 1). Its CSR view is M x (C*kh*kw), column t = (c*kh + r)*kw + s.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .errors import UserError
from .problems import Problem


def case_seed(seed: int, problem_id: str, sparsity: float, salt: str = "weights") -> int:
    """A stable per-case seed: the same config always yields the same weights."""
    text = f"{seed}:{problem_id}:{sparsity:.6f}:{salt}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little")


def magnitude_prune(weight: np.ndarray, sparsity: float) -> np.ndarray:
    """Zero the round(sparsity*size) smallest-magnitude entries (ties broken by position)."""
    flat = weight.astype(np.float32).ravel().copy()
    drop = int(round(sparsity * flat.size))
    if drop:
        order = np.argsort(np.abs(flat), kind="stable")
        flat[order[:drop]] = 0.0
    return flat.reshape(weight.shape)


def uniform_weights(shape: tuple[int, ...], sparsity: float, seed: int) -> np.ndarray:
    """Exactly round(sparsity*size) zeros at uniformly random positions; N(0,1) nonzeros."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    weight = rng.standard_normal(size).astype(np.float32)
    weight[weight == 0] = 1.0      # a drawn exact zero would silently change the density
    weight[rng.permutation(size)[:int(round(sparsity * size))]] = 0.0
    return weight.reshape(shape)


def pruned_weights(shape: tuple[int, ...], sparsity: float, seed: int,
                   row_spread: float = 0.6) -> np.ndarray:
    """Magnitude pruning of Gaussian weights whose rows have log-normal scales.

    Rows with a large scale keep many weights and rows with a small one few, as in real pruned
    networks (a pruned MobileNet v1 layer held 0-159 nonzeros per row around a mean of 51).
    """
    rng = np.random.default_rng(seed)
    scale = np.exp(row_spread * rng.standard_normal(shape[0])).astype(np.float32)
    weight = rng.standard_normal(shape).astype(np.float32)
    weight *= scale.reshape((-1,) + (1,) * (len(shape) - 1))
    weight[weight == 0] = 1e-3
    return magnitude_prune(weight, sparsity)


def generate(problem: Problem, sparsity: float, kind: str, seed: int) -> np.ndarray:
    per_case = case_seed(seed, problem.id, sparsity)
    maker = uniform_weights if kind == "uniform" else pruned_weights
    weight = maker(problem.weight_shape, sparsity, per_case)
    if not np.any(weight):           # tiny layers at high sparsity: keep at least one weight
        weight.ravel()[per_case % weight.size] = 1.0
    return weight


MAX_WEIGHT_ELEMS = 1 << 28


def _read_array(path: Path) -> np.ndarray:
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            if {"indptr", "indices", "data", "shape"} <= set(keys) or "format" in keys:
                matrix = sp.load_npz(path)
                if hasattr(matrix, "check_format"):    # CSR/CSC/BSR: bad indices would read
                    matrix.check_format(full_check=True)   # out of bounds in toarray()
                if np.prod(matrix.shape, dtype=np.float64) > MAX_WEIGHT_ELEMS:
                    raise UserError(f"{path}: weight of shape {matrix.shape} is too large "
                                    f"(more than {MAX_WEIGHT_ELEMS} elements)")
                return matrix.toarray()
            if len(keys) == 1:
                return archive[keys[0]]
            for key in ("weight", "w", "arr_0"):
                if key in keys:
                    return archive[key]
            raise UserError(f"{path}: holds several arrays ({', '.join(keys)}); "
                            "name the weight 'weight'")
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, ValueError, IndexError, TypeError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"{path}: not a readable .npy/.npz weight file ({exc})") from None


def load_pattern(path: str | Path, sparsity: float | None = None) -> np.ndarray:
    """Read a weight file and check it; with `sparsity`, magnitude-prune it first."""
    path = Path(path)
    if path.suffix not in (".npz", ".npy"):
        raise UserError(f"{path}: pattern files must be .npz or .npy")
    array = _read_array(path)
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiub":
        raise UserError(f"{path}: weight must be a numeric array, got dtype {array.dtype}")
    if array.ndim not in (2, 4):
        raise UserError(f"{path}: weight must be a 2-D (M x K) or 4-D (O x I x kh x kw) array, "
                        f"got {array.ndim}-D shape {array.shape}")
    if array.size == 0:
        raise UserError(f"{path}: weight is empty (shape {array.shape})")
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise UserError(f"{path}: weight holds {bad} NaN/Inf value(s)")
    with np.errstate(over="ignore"):
        weight = array.astype(np.float32)
    if not np.all(np.isfinite(weight)):
        raise UserError(f"{path}: weight holds values beyond the float32 range")
    if np.any(np.isfinite(array) & (array != 0) & (weight == 0)):
        raise UserError(f"{path}: some nonzero weights underflow to zero in float32")
    if sparsity is not None:
        weight = magnitude_prune(weight, sparsity)
    if not np.any(weight):
        raise UserError(f"{path}: weight is all zeros: there is nothing to compute")
    return weight


def fit_to_op(weight: np.ndarray, op: str, where: str) -> np.ndarray:
    """Shape a loaded weight as (M, C, kh, kw) for `op`, or say why it does not fit."""
    size = 3 if op == "conv3x3" else 1
    if weight.ndim == 4:
        if weight.shape[2:] != (size, size):
            raise UserError(f"{where}: a {op} weight needs a {size}x{size} kernel, got "
                            f"{weight.shape[2]}x{weight.shape[3]} (shape {weight.shape})")
        return weight
    m, k = weight.shape
    if size == 3:
        if k % 9:
            raise UserError(f"{where}: a 2-D conv3x3 weight needs K = 9*C columns, got K={k}")
        return weight.reshape(m, k // 9, 3, 3)
    return weight.reshape(m, k, 1, 1)


def check_matches(weight: np.ndarray, problem: Problem, where: str) -> None:
    if weight.shape != problem.weight_shape:
        raise UserError(f"{where}: weight shape {weight.shape} does not match problem "
                        f"{problem.id} (expects {problem.weight_shape})")


def to_csr(weight: np.ndarray) -> sp.csr_matrix:
    """M x (C*kh*kw) CSR, float32, sorted indices."""
    mat = sp.csr_matrix(weight.reshape(weight.shape[0], -1).astype(np.float32))
    mat.sort_indices()
    return mat


def pattern_hash(weight: np.ndarray) -> str:
    """Hash of shape and values (values are compiled into the kernel, so they are the pattern)."""
    h = hashlib.sha256(repr(weight.shape).encode())
    h.update(np.ascontiguousarray(weight, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]
