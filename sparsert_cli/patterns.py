"""Sparse weights: generated (uniform, pruned-like) or read from a file, always validated.

A weight is a dense float32 array of shape (M, C, kh, kw) whose zeros are the pattern; a GEMM weight
is (M, K, 1, 1). Its CSR view is M x (C*kh*kw), column t = (c*kh + r)*kw + s. Weights read from a
scipy.sparse file, and generated weights of huge layers, stay sparse (SparseWeight) end to end.
"""

from __future__ import annotations

import hashlib
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import scipy.sparse as sp
from scipy import special

from . import limits
from .errors import UserError
from .problems import Problem
from .weights import checked_float32

# Generated weights above this many elements are drawn sparsely (a dense draw and argsort would
# take ~20 bytes per element); below it the dense generators keep every committed pattern hash.
GENERATE_DENSE_LIMIT = 1 << 26


@dataclass(frozen=True, eq=False)
class SparseWeight:
    """A weight kept sparse end to end: its M x (C*kh*kw) CSR (float32, sorted, no explicit
    zeros; column t = (c*kh + r)*kw + s) and the shape it stands for, (M, K) or (M, C, kh, kw).
    Only what the pipeline asks of a weight is offered; `dense()` says where memory is spent."""

    csr: sp.csr_matrix
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        return int(self.csr.nnz)

    def reshape(self, *shape: int) -> SparseWeight:
        if shape[0] != self.shape[0] or math.prod(shape) != self.size:
            raise ValueError(f"cannot view a {self.shape} weight as {shape}")
        return SparseWeight(self.csr, tuple(shape))

    def dense(self) -> np.ndarray:
        return self.csr.toarray().reshape(self.shape)


Weight = Union[np.ndarray, SparseWeight]


def dense(weight: Weight) -> np.ndarray:
    """The weight as a dense float32 array (the references and dense baselines need one)."""
    return weight.dense() if isinstance(weight, SparseWeight) else weight


def count_nonzeros(weight: Weight) -> int:
    return weight.nnz if isinstance(weight, SparseWeight) else int(np.count_nonzero(weight))


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


def generate(problem: Problem, sparsity: float, kind: str, seed: int) -> Weight:
    """The config's weight for one case: dense, or sparse above GENERATE_DENSE_LIMIT elements
    (the same distributions, drawn nonzero by nonzero; smaller layers keep their exact weights,
    so tuned plans keyed by pattern hash stay valid)."""
    if problem.weights:
        return file_weight(problem, sparsity)
    per_case = case_seed(seed, problem.id, sparsity)
    size = math.prod(problem.weight_shape)
    limits.check_nonzeros(expected_nonzeros(size, sparsity))
    if size > GENERATE_DENSE_LIMIT:
        maker = sparse_uniform if kind == "uniform" else sparse_pruned
        return maker(problem.weight_shape, sparsity, per_case)
    maker = uniform_weights if kind == "uniform" else pruned_weights
    weight = maker(problem.weight_shape, sparsity, per_case)
    if not np.any(weight):           # tiny layers at high sparsity: keep at least one weight
        weight.ravel()[per_case % weight.size] = 1.0
    return weight


def file_weight(problem: Problem, sparsity: float) -> Weight:
    """A problem's own weights (`weights: FILE[#TENSOR]`), shaped for its op and magnitude-pruned
    to `sparsity` (zeros already in the file count towards it)."""
    weight = load_pattern(problem.weights, sparsity)
    weight = fit_to_op(weight, problem.op, problem.weights)
    check_matches(weight, problem, problem.weights)
    return weight


def expected_nonzeros(size: int, sparsity: float) -> int:
    """Nonzeros of a generated weight (at least one), from Python ints: no array needed."""
    return max(1, size - int(round(sparsity * size)))


def _distinct_columns(rng: np.random.Generator, counts: np.ndarray, k: int) -> np.ndarray:
    """Flat positions row*k + col: counts[r] distinct random columns in row r, sorted."""
    m = len(counts)
    rows = np.arange(m, dtype=np.int64)
    full = counts * 4 > k              # dense rows: a permutation; the rest: draws, deduplicated
    parts = [r * k + rng.permutation(k)[:counts[r]] for r in np.flatnonzero(full)]
    want = np.where(full, 0, counts).astype(np.int64)
    have, need = np.empty(0, dtype=np.int64), want
    while need.any():
        extra = need + need // 8 + (need > 0)
        keys = np.concatenate((have, np.repeat(rows, extra) * k
                               + rng.integers(0, k, int(extra.sum()), dtype=np.int64)))
        keys.sort()
        have = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
        need = np.maximum(want - np.bincount(have // k, minlength=m), 0)
    owner = have // k                  # rows that drew too many keep a random want[r] of them
    order = np.lexsort((rng.random(len(have)), owner))
    starts = np.concatenate(([0], np.cumsum(np.bincount(owner, minlength=m))[:-1]))
    rank = np.arange(len(have)) - starts[owner[order]]
    parts.append(have[order][rank < want[owner[order]]])
    return np.sort(np.concatenate(parts))


def _sparse_weight(shape, positions: np.ndarray, values: np.ndarray) -> SparseWeight:
    m, k = shape[0], math.prod(shape[1:])
    rows, cols = np.divmod(positions, k)
    indptr = np.concatenate(([0], np.cumsum(np.bincount(rows, minlength=m))))
    csr = sp.csr_matrix((values.astype(np.float32), cols, indptr), shape=(m, k))
    return SparseWeight(csr, tuple(shape))


def sparse_uniform(shape: tuple[int, ...], sparsity: float, seed: int) -> SparseWeight:
    """uniform_weights drawn sparsely: the nonzeros at uniformly random distinct positions."""
    rng = np.random.default_rng(seed)
    m, k = shape[0], math.prod(shape[1:])
    keep = expected_nonzeros(m * k, sparsity)
    counts = rng.multivariate_hypergeometric(np.full(m, k), keep, method="marginals")
    values = rng.standard_normal(keep).astype(np.float32)
    values[values == 0] = 1.0
    return _sparse_weight(shape, _distinct_columns(rng, counts, k), values)


def sparse_pruned(shape: tuple[int, ...], sparsity: float, seed: int,
                  row_spread: float = 0.6) -> SparseWeight:
    """pruned_weights drawn sparsely: the magnitude threshold t that keeps the wanted count in
    expectation, each row's count from its scale, values from the Gaussian tail beyond t."""
    rng = np.random.default_rng(seed)
    m, k = shape[0], math.prod(shape[1:])
    keep = expected_nonzeros(m * k, sparsity)
    scale = np.exp(row_spread * rng.standard_normal(m))

    def kept(t: float) -> np.ndarray:        # expected survivors of |scale * z| > t per row
        return k * special.erfc(t / (scale * math.sqrt(2)))

    low, high = 0.0, float(scale.max()) * 40
    for _ in range(200):                     # the largest t that keeps at least `keep`
        mid = (low + high) / 2
        low, high = (mid, high) if kept(mid).sum() >= keep else (low, mid)
    expect = kept(low)
    counts = np.minimum(np.floor(expect).astype(np.int64), k)
    short = keep - int(counts.sum())
    if short > 0:          # the largest fractional parts round up (never past a full row)
        frac = np.where(counts < k, expect - counts, -1.0)
        counts[np.argsort(-frac, kind="stable")[:short]] += 1
    positions = _distinct_columns(rng, counts, k)
    row_scale = np.repeat(scale, counts)
    tail = special.ndtr(-low / row_scale)    # P(z > t / scale): draw z from that tail
    magnitude = -special.ndtri((1.0 - rng.random(len(positions))) * tail) * row_scale
    sign = np.where(rng.random(len(positions)) < 0.5, -1.0, 1.0)
    values = (sign * magnitude).astype(np.float32)
    values[values == 0] = np.float32(1e-3)
    return _sparse_weight(shape, positions, values)


NPY_MAGIC = b"\x93NUMPY"


def _check_member(fh, where: str, text_ok: bool = False) -> None:
    """Read a .npy header (nothing else) and refuse what must not be loaded: objects, text,
    records, and dense arrays beyond MAX_DENSE_ELEMS."""
    try:
        version = np.lib.format.read_magic(fh)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(fh)
    except (ValueError, EOFError, OSError, SyntaxError):
        raise UserError(f"{where}: not a .npy array") from None
    if dtype.hasobject:
        raise UserError(f"{where}: holds Python objects (dtype object), not numbers")
    if dtype.kind not in "fiub" and not (text_ok and dtype.kind in "US"):
        raise UserError(f"{where}: weight must be a numeric array, got dtype {dtype}")
    elems = math.prod(shape)
    if elems > limits.MAX_DENSE_ELEMS:
        raise UserError(f"{where}: shape {shape} is {elems} elements ({4 * elems / 1e9:.1f} GB "
                        f"as float32), beyond the {limits.MAX_DENSE_ELEMS} a dense weight may "
                        f"have: save it sparse (scipy.sparse.save_npz)")


def _read_npz(path: Path) -> Weight:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if not names:
            raise UserError(f"{path}: holds no arrays")
        for name in names:
            with archive.open(name) as fh:
                _check_member(fh, f"{path}: {name}", text_ok=name == "format.npy")
    keys = [n[:-4] if n.endswith(".npy") else n for n in names]
    if {"indptr", "indices", "data", "shape"} <= set(keys) or "format" in keys:
        return _read_scipy(path)
    key = keys[0] if len(keys) == 1 else next((k for k in ("weight", "w", "arr_0") if k in keys),
                                              None)
    if key is None:
        raise UserError(f"{path}: holds several arrays ({', '.join(keys)}); "
                        "name the weight 'weight'")
    with np.load(path, allow_pickle=False) as archive:
        return archive[key]


def _read_scipy(path: Path) -> SparseWeight:
    matrix = sp.load_npz(path)
    if hasattr(matrix, "check_format"):    # CSR/CSC/BSR: bad indices would read out of bounds
        matrix.check_format(full_check=True)
    csr = sp.csr_matrix(matrix)
    csr.sum_duplicates()                   # canonical: sorted, one entry per position
    if csr.data.dtype.kind not in "fiub":
        raise UserError(f"{path}: weight must be a numeric array, got dtype {csr.data.dtype}")
    return SparseWeight(csr, tuple(int(d) for d in csr.shape))


def _read_array(path: Path) -> Weight:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(NPY_MAGIC))
            if magic == NPY_MAGIC:
                fh.seek(0)
                _check_member(fh, str(path))
        if magic == NPY_MAGIC:
            return np.load(path, allow_pickle=False)
        if magic[:2] == b"PK":
            return _read_npz(path)
        raise UserError(f"{path}: not a .npy/.npz file")
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a weight file") from None
    except MemoryError:
        raise UserError(f"{path}: out of memory while reading the weight") from None
    except (OSError, ValueError, IndexError, TypeError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"{path}: not a readable .npy/.npz weight file ({exc})") from None


def _prune_sparse(weight: SparseWeight, sparsity: float) -> SparseWeight:
    """magnitude_prune without the zeros: they rank first, then |value|, ties by position."""
    csr = weight.csr.copy()
    extra = int(round(sparsity * weight.size)) - (weight.size - csr.nnz)
    if extra > 0:
        csr.data[np.argsort(np.abs(csr.data), kind="stable")[:extra]] = 0.0
        csr.eliminate_zeros()
    return SparseWeight(csr, weight.shape)


def _checked_array(array, path: Path) -> Weight:
    """What a .npy/.npz held, checked: a numeric 2-D or 4-D non-empty array of finite float32
    values (a scipy.sparse matrix stays sparse)."""
    if not isinstance(array, (np.ndarray, SparseWeight)) or (
            isinstance(array, np.ndarray) and array.dtype.kind not in "fiub"):
        raise UserError(f"{path}: weight must be a numeric array")
    if array.ndim not in (2, 4):
        raise UserError(f"{path}: weight must be a 2-D (M x K) or 4-D (O x I x kh x kw) array, "
                        f"got {array.ndim}-D shape {array.shape}")
    if array.size == 0:
        raise UserError(f"{path}: weight is empty (shape {array.shape})")
    if isinstance(array, np.ndarray):
        return checked_float32(array, path)
    csr = array.csr
    csr = sp.csr_matrix((checked_float32(csr.data, path), csr.indices, csr.indptr),
                        shape=csr.shape)
    csr.eliminate_zeros()
    return SparseWeight(csr, array.shape)


def load_pattern(path: str | Path, sparsity: float | None = None) -> Weight:
    """Read a weight file and check it; with `sparsity`, magnitude-prune it first. A scipy.sparse
    file stays sparse (a SparseWeight); a dense one is a float32 array."""
    path = Path(path)
    if path.suffix in (".npz", ".npy"):
        weight = _checked_array(_read_array(path), path)
    else:        # .safetensors, state dicts and FILE#TENSOR specs: weights.py checks them
        from .weights import load_weight

        weight, meta = load_weight(str(path))
        path = Path(meta["file"] + (f"#{meta['tensor']}" if meta["tensor"] else ""))
        if sp.issparse(weight):
            weight = SparseWeight(sp.csr_matrix(weight), tuple(int(d) for d in weight.shape))
    if sparsity is not None:
        weight = (_prune_sparse(weight, sparsity) if isinstance(weight, SparseWeight)
                  else magnitude_prune(weight, sparsity))
    if not count_nonzeros(weight):
        raise UserError(f"{path}: weight is all zeros: there is nothing to compute")
    return weight


def fit_to_op(weight: Weight, op: str, where: str) -> Weight:
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


def check_matches(weight: Weight, problem: Problem, where: str) -> None:
    if weight.shape != problem.weight_shape:
        raise UserError(f"{where}: weight shape {weight.shape} does not match problem "
                        f"{problem.id} (expects {problem.weight_shape})")


def to_csr(weight: Weight) -> sp.csr_matrix:
    """M x (C*kh*kw) CSR, float32, sorted indices (a SparseWeight's own matrix: do not modify)."""
    if isinstance(weight, SparseWeight):
        return weight.csr
    mat = sp.csr_matrix(weight.reshape(weight.shape[0], -1).astype(np.float32))
    mat.sort_indices()
    return mat


def pattern_hash(weight: Weight) -> str:
    """Hash of shape and values (values are compiled into the kernel, so they are the pattern).

    Up to GENERATE_DENSE_LIMIT elements the dense float32 bytes are hashed (whether the weight is
    held dense or sparse); above it, the CSR arrays, so a huge sparse weight is never densified."""
    h = hashlib.sha256(repr(tuple(weight.shape)).encode())
    if weight.size <= GENERATE_DENSE_LIMIT:
        h.update(np.ascontiguousarray(dense(weight), dtype=np.float32).tobytes())
    else:
        csr = to_csr(weight)
        for part in (b"csr", csr.indptr.astype(np.int64), csr.indices.astype(np.int64),
                     csr.data.astype(np.float32)):
            h.update(part if isinstance(part, bytes) else part.tobytes())
    return h.hexdigest()[:16]
