"""Weight files (`FILE[#TENSOR]`): every format, and one line naming the file for every bad one."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import scipy.sparse as sp

from sparsert_cli.errors import UserError
from sparsert_cli.weights import load_weight


def _safetensors(path, tensors: dict, header_patch=None) -> None:
    """Write a .safetensors file by hand: {name: (dtype tag, array as raw little-endian)}."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (tag, array) in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": tag, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if header_patch:
        header_patch(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def _bad(spec, *words):
    with pytest.raises(UserError) as info:
        load_weight(str(spec))
    message = info.value.message
    assert "\n" not in message and str(spec).split("#")[0] in message
    for word in words:
        assert word in message, message
    return message


@pytest.fixture
def w4():
    rng = np.random.default_rng(0)
    return rng.standard_normal((8, 3, 3, 3)).astype(np.float32)


def test_npy_and_npz(tmp_path, w4):
    np.save(tmp_path / "w.npy", w4)
    weight, meta = load_weight(str(tmp_path / "w.npy"))
    assert np.array_equal(weight, w4) and meta["format"] == "npy" and meta["tensor"] is None
    np.savez(tmp_path / "many.npz", conv1=w4, fc=w4[:, :, 0, 0].copy())
    weight, meta = load_weight(f"{tmp_path / 'many.npz'}#fc")
    assert weight.shape == (8, 3) and meta["tensor"] == "fc"
    assert _bad(tmp_path / "many.npz", "conv1", "fc", "#NAME")
    _bad(f"{tmp_path / 'many.npz'}#nope", "no tensor 'nope'", "conv1")


def test_scipy_sparse_stays_sparse(tmp_path):
    matrix = sp.random(64, 40, density=0.1, format="csr", random_state=1, dtype=np.float64)
    sp.save_npz(tmp_path / "s.npz", matrix)
    weight, meta = load_weight(str(tmp_path / "s.npz"))
    assert sp.issparse(weight) and weight.dtype == np.float32 and meta["sparse"]
    assert np.allclose(weight.toarray(), matrix.toarray()) and meta["nnz"] == matrix.nnz


def test_safetensors_dtypes(tmp_path, w4):
    bf16 = (w4.view(np.uint32) >> 16).astype(np.uint16)      # truncated to bfloat16
    _safetensors(tmp_path / "m.safetensors", {
        "a.f32": ("F32", w4), "b.f16": ("F16", w4.astype(np.float16)),
        "c.bf16": ("BF16", bf16), "d.f64": ("F64", w4.astype(np.float64))})
    path = tmp_path / "m.safetensors"
    assert np.array_equal(load_weight(f"{path}#a.f32")[0], w4)
    assert np.array_equal(load_weight(f"{path}#b.f16")[0], w4.astype(np.float16).astype(np.float32))
    expect = (bf16.astype(np.uint32) << 16).view(np.float32)
    got, meta = load_weight(f"{path}#c.bf16")
    assert np.array_equal(got, expect) and np.allclose(got, w4, rtol=1e-2)
    assert load_weight(f"{path}#d.f64")[0].dtype == np.float32
    _bad(path, "4 tensors", "a.f32")


def test_safetensors_matches_the_library(tmp_path, w4):
    safetensors = pytest.importorskip("safetensors.numpy")
    safetensors.save_file({"layer.weight": w4, "other": w4[0]}, str(tmp_path / "lib.safetensors"))
    got, meta = load_weight(f"{tmp_path / 'lib.safetensors'}#layer.weight")
    assert np.array_equal(got, w4) and meta["shape"] == [8, 3, 3, 3]


@pytest.mark.parametrize("damage, words", [
    ("truncate", ["truncated"]),
    ("short", ["8-byte"]),
    ("length", ["header length"]),
    ("json", ["not JSON"]),
    ("lie", ["do not hold"]),
    ("dtype", ["F8_E4M3", "not supported"]),
])
def test_bad_safetensors(tmp_path, w4, damage, words):
    path = tmp_path / "bad.safetensors"
    patch = None
    if damage == "lie":
        patch = lambda h: h["w"].update(shape=[9, 3, 3, 3])  # noqa: E731
    if damage == "dtype":
        patch = lambda h: h["w"].update(dtype="F8_E4M3")  # noqa: E731
    _safetensors(path, {"w": ("F32", w4)}, patch)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:-10])
    elif damage == "short":
        path.write_bytes(data[:5])
    elif damage == "length":
        path.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    elif damage == "json":
        (length,) = struct.unpack("<Q", data[:8])
        path.write_bytes(data[:8] + b"{" * length + data[8 + length:])
    _bad(path, *words)


def test_bad_numpy_files(tmp_path, w4):
    np.save(tmp_path / "w.npy", w4)
    good = (tmp_path / "w.npy").read_bytes()
    (tmp_path / "trunc.npy").write_bytes(good[:-7])
    _bad(tmp_path / "trunc.npy")
    (tmp_path / "magic.npy").write_bytes(b"NOTNUMPY" + good[8:])
    _bad(tmp_path / "magic.npy", "magic")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _bad(tmp_path / "obj.npy", "objects")
    nan = w4.copy()
    nan[0, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    _bad(tmp_path / "nan.npy", "NaN/Inf")
    inf = w4.astype(np.float64)
    inf[1, 1, 1, 1] = 1e300
    np.save(tmp_path / "big.npy", inf)
    _bad(tmp_path / "big.npy", "float32 range")
    np.save(tmp_path / "three.npy", w4[0])
    _bad(tmp_path / "three.npy", "3-D")
    np.save(tmp_path / "text.npy", np.array(["a", "b"]))
    _bad(tmp_path / "text.npy", "numeric")
    (tmp_path / "zip.npz").write_bytes(b"PK\x03\x04 not really a zip")
    _bad(tmp_path / "zip.npz")
    _bad(f"{tmp_path / 'w.npy'}#x", "one array")


def test_too_large_header_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.npy"
    with open(path, "wb") as fh:     # a header claiming 2^30 floats, with no data behind it
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "<f4", "fortran_order": False, "shape": (1 << 15, 1 << 15)})
    _bad(path, "beyond")
    _safetensors(tmp_path / "huge.safetensors", {"w": ("F32", np.zeros((2, 2), np.float32))},
                 lambda h: h["w"].update(shape=[1 << 15, 1 << 15],
                                         data_offsets=[0, 1 << 32]))
    _bad(tmp_path / "huge.safetensors")


def test_other_bad_specs(tmp_path, w4):
    _bad(tmp_path / "missing.npy", "no such file")
    (tmp_path / "w.txt").write_text("1 2 3")
    _bad(tmp_path / "w.txt", "unknown weight file type")
    (tmp_path / "dir.npy").mkdir()
    _bad(tmp_path / "dir.npy", "directory")
    sp.save_npz(tmp_path / "e.npz", sp.csr_matrix((0, 4), dtype=np.float32))
    _bad(tmp_path / "e.npz", "empty")


def test_state_dict(tmp_path, w4):
    torch = pytest.importorskip("torch")
    state = {"conv.weight": torch.from_numpy(w4), "conv.bias": torch.zeros(8),
             "fc.weight": torch.from_numpy(w4.reshape(8, -1)).to(torch.bfloat16)}
    torch.save(state, tmp_path / "model.pt")
    got, meta = load_weight(f"{tmp_path / 'model.pt'}#conv.weight")
    assert np.array_equal(got, w4) and meta["format"] == "pt"
    got, _ = load_weight(f"{tmp_path / 'model.pt'}#fc.weight")
    assert got.shape == (8, 27) and np.allclose(got, w4.reshape(8, -1), rtol=1e-2)
    _bad(f"{tmp_path / 'model.pt'}#conv.bias", "1-D")
    _bad(tmp_path / "model.pt", "3 tensors")
    torch.save({"state_dict": {"w": torch.from_numpy(w4)}}, tmp_path / "ckpt.pth")
    assert load_weight(str(tmp_path / "ckpt.pth"))[0].shape == w4.shape
    (tmp_path / "junk.bin").write_bytes(b"\x80\x02junk")
    _bad(tmp_path / "junk.bin", "not a loadable PyTorch state dict")

    class Evil:                               # weights_only refuses arbitrary pickles
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    _bad(tmp_path / "evil.pt", "not a loadable")


def test_state_dict_without_torch(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("no torch")
        return real_import(name, *args, **kwargs)

    (tmp_path / "m.pt").write_bytes(b"PK whatever")
    monkeypatch.setattr(builtins, "__import__", no_torch)
    _bad(tmp_path / "m.pt", "pip install 'sparsert[torch]'")


# ---- `weights:` in a config, and gen --pattern FILE#TENSOR -------------------------------------
def _config(tmp_path, weights: str, m=16, k=32) -> str:
    (tmp_path / "c.yaml").write_text(
        "name: own\nsparsity: [0.8]\nproblems:\n"
        f"  - {{id: mine, op: gemm, m: {m}, k: {k}, n: 8, weights: '{weights}'}}\n")
    return str(tmp_path / "c.yaml")


def test_config_weights_drive_bench(tmp_path, capsys):
    import json

    from cli_helpers import run_main

    from sparsert_cli.config import load_config
    from sparsert_cli.patterns import generate, magnitude_prune, pattern_hash

    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 32)).astype(np.float32)
    _safetensors(tmp_path / "m.safetensors", {"fc.weight": ("F32", w), "other": ("F32", w[0])})
    config = load_config(_config(tmp_path, "m.safetensors#fc.weight"))   # relative to the config
    (problem,) = config.problems
    assert problem.weights == str(tmp_path / "m.safetensors#fc.weight")
    got = generate(problem, 0.8, "uniform", 0)
    want = magnitude_prune(w.reshape(16, 32, 1, 1), 0.8)
    assert np.array_equal(got, want)
    out = tmp_path / "r.json"
    code, _, err = run_main(["bench", config.path, "--compile-only", "--no-cache", "--no-tuned",
                             "--out", str(out)], capsys)
    assert code == 0, err
    (case,) = json.loads(out.read_text())["cases"]
    assert case["pattern_hash"] == pattern_hash(want) and case["verify_cpu"]["ok"]


@pytest.mark.parametrize("spec, words", [
    ("missing.npy", ["missing.npy", "no such file"]),
    ("m.safetensors#nope", ["no tensor 'nope'"]),
    ("m.safetensors#other", ["1-D"]),
    ("wrong.npy", ["does not match problem mine"]),
])
def test_config_weights_bad_files(tmp_path, capsys, spec, words):
    from cli_helpers import run_main

    w = np.ones((16, 32), np.float32)
    _safetensors(tmp_path / "m.safetensors", {"fc.weight": ("F32", w), "other": ("F32", w[0])})
    np.save(tmp_path / "wrong.npy", np.ones((8, 32), np.float32))
    out = tmp_path / "r.json"
    code, _, err = run_main(["bench", _config(tmp_path, spec), "--compile-only", "--no-cache",
                             "--out", str(out)], capsys)
    errors = [line for line in err.splitlines() if line.startswith("sparsert:")]
    assert code == 2 and len(errors) == 1 and not out.exists()     # (after the progress bar)
    for word in words:
        assert word in errors[0], err


def test_config_weights_key_is_checked(tmp_path):
    from sparsert_cli.config import load_config

    (tmp_path / "c.yaml").write_text("sparsity: 0.5\nproblems:\n"
                                     "  - {id: a, op: gemm, m: 4, k: 4, n: 4, weights: 3}\n")
    with pytest.raises(UserError, match="'weights' must be a file name"):
        load_config(tmp_path / "c.yaml")


def test_gen_reads_any_weight_file(tmp_path, capsys, w4):
    from cli_helpers import run_main

    _safetensors(tmp_path / "m.safetensors", {"conv.weight": ("F32", w4), "b": ("F32", w4[0])})
    code, _, err = run_main(["gen", "--pattern", f"{tmp_path / 'm.safetensors'}#conv.weight",
                             "--sparsity", "0.5", "--height", "6", "--width", "6", "-o",
                             str(tmp_path / "k"), "--no-cache"], capsys)
    assert code == 0, err
    assert (tmp_path / "k" / "manifest.json").is_file()
    code, _, err = run_main(["gen", "--pattern", str(tmp_path / "m.safetensors"), "--n", "4"],
                            capsys)
    assert code == 2 and "#NAME" in err
