"""Your own weights: `FILE[#TENSOR]` from .npy, .npz (a dense member or a scipy.sparse matrix),
.safetensors (read here with json + numpy: no torch needed) or a PyTorch state dict
(.pt/.pth/.bin, `torch.load(weights_only=True)`; needs the `[torch]` extra).

`load_weight(spec)` returns (weight, meta): a float32 numpy array (2-D M x K or 4-D M x C x R x S)
or a float32 scipy.sparse CSR matrix (kept sparse), and what was read. Every bad file is one
UserError line naming the file: truncated, wrong magic, a header that lies about sizes, objects,
NaN/Inf, the wrong number of dimensions, or more elements than a dense weight may have.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .errors import UserError
from .limits import MAX_DENSE_ELEMS
MAX_SAFETENSORS_HEADER = 100 << 20
NPY_MAGIC = b"\x93NUMPY"
SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8",
                      "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1"}
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin")
SUFFIXES = (".npy", ".npz", ".safetensors") + STATE_DICT_SUFFIXES


def split_spec(spec: str) -> tuple[Path, str | None]:
    """'FILE#TENSOR' -> (FILE, TENSOR); a path that exists as written keeps any '#'."""
    text = str(spec)
    if "#" in text and not Path(text).exists():
        path, name = text.rsplit("#", 1)
        if not name:
            raise UserError(f"{text}: empty tensor name after '#'")
        return Path(path), name
    return Path(text), None


def _names(keys, limit: int = 6) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _pick(path: Path, keys: list[str], name: str | None) -> str:
    """The member to read: the named one, the only one, or 'weight'."""
    if name is not None:
        if name not in keys:
            raise UserError(f"{path}: no tensor {name!r} (it has {_names(keys)})")
        return name
    if len(keys) == 1:
        return keys[0]
    if "weight" in keys:
        return "weight"
    if not keys:
        raise UserError(f"{path}: holds no tensors")
    raise UserError(f"{path}: holds {len(keys)} tensors; pick one as {path}#NAME "
                    f"(it has {_names(keys)})")


def _check_size(path: Path, shape, what: str = "weight") -> None:
    elems = math.prod(int(d) for d in shape)
    if elems > MAX_DENSE_ELEMS:
        raise UserError(f"{path}: {what} of shape {tuple(shape)} has {elems} elements, beyond the "
                        f"{MAX_DENSE_ELEMS} a dense weight may have (save it as scipy.sparse .npz)")


# ---- .npy / .npz ------------------------------------------------------------------------------
def _npy_header(fh, path: Path, member: str = "") -> tuple[tuple, np.dtype]:
    where = f"{path}{f' ({member})' if member else ''}"
    if fh.read(len(NPY_MAGIC)) != NPY_MAGIC:
        raise UserError(f"{where}: not a .npy array (bad magic)")
    fh.seek(0)
    try:
        version = np.lib.format.read_magic(fh)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(fh)
    except (ValueError, EOFError, OSError, SyntaxError) as exc:
        raise UserError(f"{where}: damaged .npy header ({exc})") from None
    if dtype.hasobject:
        raise UserError(f"{where}: holds Python objects (dtype object), not numbers")
    return shape, dtype


def _read_npy(path: Path) -> np.ndarray:
    with open(path, "rb") as fh:
        shape, dtype = _npy_header(fh, path)
    if dtype.kind in "fiub":
        _check_size(path, shape)
    return np.load(path, allow_pickle=False)


def _read_npz(path: Path, name: str | None):
    with zipfile.ZipFile(path) as archive:
        members = archive.namelist()
        headers = {}
        for member in members:
            with archive.open(member) as fh:
                headers[member.removesuffix(".npy")] = _npy_header(fh, path, member)
    keys = list(headers)
    if {"indptr", "indices", "data", "shape"} <= set(keys) and name is None:
        return _read_scipy(path), None
    key = _pick(path, keys, name)
    shape, dtype = headers[key]
    if dtype.kind in "fiub":
        _check_size(path, shape)
    with np.load(path, allow_pickle=False) as archive:
        return archive[key], key


def _read_scipy(path: Path) -> sp.csr_matrix:
    matrix = sp.load_npz(path)
    if hasattr(matrix, "check_format"):   # bad indices would read out of bounds later
        matrix.check_format(full_check=True)
    if matrix.data.dtype.kind not in "fiub":
        raise UserError(f"{path}: sparse weight of dtype {matrix.data.dtype}, not numbers")
    if matrix.nnz > MAX_DENSE_ELEMS or max(matrix.shape) >= 2**31:
        raise UserError(f"{path}: sparse weight of shape {matrix.shape} with {matrix.nnz} "
                        f"nonzeros is too large")
    csr = sp.csr_matrix(matrix)
    csr.sum_duplicates()
    return csr


# ---- .safetensors -----------------------------------------------------------------------------
def safetensors_header(path: Path) -> tuple[dict, int]:
    """The checked JSON header ({name: {dtype, shape, data_offsets}}) and where data starts."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: not a .safetensors file (shorter than its 8-byte header)")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise UserError(f"{path}: not a .safetensors file (header length {length} does not "
                            f"fit the {size}-byte file)")
        raw = fh.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise UserError(f"{path}: not a .safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a .safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - length
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise UserError(f"{where}: header entry lacks dtype/shape/data_offsets")
        shape, offsets = info["shape"], info["data_offsets"]
        if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets)):
            raise UserError(f"{where}: malformed shape or data_offsets in the header")
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise UserError(f"{where}: dtype {info['dtype']!r} is not supported "
                            f"({', '.join(SAFETENSORS_DTYPES)})")
        begin, end = offsets
        itemsize = np.dtype(SAFETENSORS_DTYPES[info["dtype"]]).itemsize
        if end < begin or end > data_bytes or end - begin != math.prod(shape) * itemsize:
            raise UserError(f"{where}: header says {shape} {info['dtype']} at bytes "
                            f"{begin}..{end}, which the {data_bytes} data bytes do not hold "
                            f"(truncated or damaged file)")
    return header, 8 + length


def _read_safetensors(path: Path, name: str | None) -> tuple[np.ndarray, str]:
    header, start = safetensors_header(path)
    key = _pick(path, list(header), name)
    info = header[key]
    _check_size(path, info["shape"], f"tensor {key!r}")
    begin, end = info["data_offsets"]
    raw = np.fromfile(path, dtype=SAFETENSORS_DTYPES[info["dtype"]],
                      count=math.prod(info["shape"]), offset=start + begin)
    if info["dtype"] == "BF16":           # bfloat16 is the top half of a float32
        raw = (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.reshape(info["shape"]), key


# ---- PyTorch state dicts ----------------------------------------------------------------------
def _read_state_dict(path: Path, name: str | None):
    try:
        import torch
    except ImportError:
        raise UserError(f"{path}: reading a PyTorch state dict needs torch: "
                        f"pip install 'sparsert[torch]'") from None
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a loadable PyTorch state dict ({reason})") from None
    for wrapper in ("state_dict", "model"):     # checkpoints often nest the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if isinstance(state, torch.Tensor):
        state = {"tensor": state}
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    key = _pick(path, list(tensors), name)
    tensor = tensors[key].detach()
    if tensor.layout != torch.strided:       # a torch sparse tensor stays sparse
        coo = tensor.to_sparse_coo().coalesce()
        if coo.dim() != 2:
            raise UserError(f"{path}: sparse tensor {key!r} is {coo.dim()}-D, not 2-D")
        rows, cols = coo.indices().numpy()
        return sp.csr_matrix((coo.values().float().numpy(), (rows, cols)),
                             shape=tuple(coo.shape)), key
    _check_size(path, tensor.shape, f"tensor {key!r}")
    if tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise UserError(f"{path}: tensor {key!r} is {tensor.dtype}, not real numbers")
    if tensor.dtype.is_floating_point and tensor.dtype != torch.float64:
        tensor = tensor.float()
    return tensor.numpy(), key


# ---- checks ------------------------------------------------------------------------------------
def checked_float32(values: np.ndarray, path: Path) -> np.ndarray:
    """float32 copies of the values, refusing NaN/Inf and what float32 cannot hold."""
    if not np.all(np.isfinite(values)):
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        raise UserError(f"{path}: weight holds {bad} NaN/Inf value(s)")
    with np.errstate(over="ignore", under="ignore"):
        out = values.astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise UserError(f"{path}: weight holds values beyond the float32 range")
    if np.any((values != 0) & (out == 0)):
        raise UserError(f"{path}: some nonzero weights underflow to zero in float32")
    return out


def _checked(weight, path: Path):
    if sp.issparse(weight):
        if weight.ndim != 2 or 0 in weight.shape:
            raise UserError(f"{path}: sparse weight of shape {weight.shape} is empty or not 2-D")
        csr = sp.csr_matrix((checked_float32(weight.data, path), weight.indices, weight.indptr),
                            shape=weight.shape)
        csr.eliminate_zeros()
        csr.sort_indices()
        return csr
    if not isinstance(weight, np.ndarray) or weight.dtype.kind not in "fiub":
        kind = getattr(weight, "dtype", type(weight).__name__)
        raise UserError(f"{path}: weight must be a numeric array, got {kind}")
    if weight.ndim not in (2, 4):
        raise UserError(f"{path}: weight must be 2-D (M x K) or 4-D (M x C x R x S), got "
                        f"{weight.ndim}-D shape {weight.shape}")
    if weight.size == 0:
        raise UserError(f"{path}: weight is empty (shape {weight.shape})")
    return checked_float32(weight, path)


def load_weight(spec: str | Path):
    """Read `FILE[#TENSOR]` -> (float32 array or float32 scipy CSR, meta dict)."""
    path, name = split_spec(str(spec))
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"{path}: unknown weight file type {suffix or '(none)'!r} "
                        f"(supported: {', '.join(SUFFIXES)})")
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a weight file")
    key = None
    try:
        if suffix == ".npy":
            if name is not None:
                raise UserError(f"{path}: a .npy file holds one array; drop '#{name}'")
            weight = _read_npy(path)
        elif suffix == ".npz":
            weight, key = _read_npz(path, name)
        elif suffix == ".safetensors":
            weight, key = _read_safetensors(path, name)
        else:
            weight, key = _read_state_dict(path, name)
    except UserError:
        raise
    except MemoryError:
        raise UserError(f"{path}: out of memory while reading the weight") from None
    except (OSError, ValueError, IndexError, TypeError, KeyError, zipfile.BadZipFile,
            EOFError, struct.error) as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not a readable {suffix} weight file ({reason})") from None
    source_dtype = str(weight.dtype)
    weight = _checked(weight, path)
    meta = {"file": str(path), "tensor": key, "format": suffix.lstrip("."),
            "shape": list(weight.shape), "dtype": source_dtype, "sparse": sp.issparse(weight),
            "nnz": int(weight.nnz if sp.issparse(weight) else np.count_nonzero(weight))}
    return weight, meta
