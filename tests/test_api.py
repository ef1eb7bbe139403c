"""The public Python API on the CPU: compile_kernel, Kernel (contract, run_cpu, save/from_dir),
the tuned-plan lookup it does, the tuning loop with a stand-in executor, and the README's
Python examples (executed)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

import sparsert_cli as sparsert
from sparsert_cli.costmodel import choose
from sparsert_cli.errors import UserError
from sparsert_cli.gpu.loaded import device_pointer
from sparsert_cli.gpu.runtime import stream_handle
from sparsert_cli.families.immediate import PlanParams, fit_params
from sparsert_cli.problem_shape import Epilogue, Geometry
from sparsert_cli.reference import check, reference_and_magnitude
from sparsert_cli.tune import FAMILY, FAMILY_VERSION, TunedDB, migrate_entries
from sparsert_cli.patterns import pattern_hash

REPO = Path(__file__).resolve().parent.parent


def sparse(shape, density, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) >= density] = 0
    return w


@pytest.fixture
def no_tuned(tmp_path):
    return TunedDB(tmp_path / "empty.json")


def test_gemm_kernel_contract_and_run_cpu(no_tuned):
    w = sparse((24, 40), 0.2, 1)
    kernel = sparsert.compile_kernel(w, op="gemm", n=96, cache=None, tuned=no_tuned)
    plan = kernel.plan
    assert kernel.cubin[:4] == b"\x7fELF" and ".entry " + kernel.entry in kernel.source
    assert (kernel.grid, kernel.block, kernel.shared_bytes) == (plan.grid, plan.block,
                                                                 plan.shared_bytes)
    assert [(a["name"], a["shape"], a["dtype"]) for a in kernel.arguments] == [
        ("x", [1, 40, 1, 96], "float32"), ("y", [1, 24, 1, 96], "float32")]
    assert (kernel.family, kernel.family_version) == (FAMILY, FAMILY_VERSION)
    assert kernel.input_shape == (40, 96) and kernel.output_shape == (24, 96)
    # untuned "auto": the cost model's choice (costmodel.choose), fitted to the shape
    assert kernel.plan_params == fit_params(plan.geometry, choose(plan.geometry, w, "fp32")[1])
    assert not kernel.tuned and kernel.precision == "fp32"
    x = np.random.default_rng(2).standard_normal((40, 96)).astype(np.float32)
    y = kernel.run_cpu(x)
    ref = w.astype(np.float64) @ x.astype(np.float64)
    assert y.shape == (24, 96)
    assert np.all(np.abs(y - ref) <= 1e-12 * (np.abs(w) @ np.abs(x) + 1e-300))
    assert kernel.verify_cpu(seed=3)["ok"]


def test_padded_strided_conv_with_epilogue(no_tuned):
    w = sparse((10, 6, 3, 3), 0.3, 4)
    bias = np.linspace(-1, 1, 10)
    kernel = sparsert.compile_kernel(
        w, op="conv", input_shape=(2, 6, 11, 9), stride=2, padding=1, cache=None,
        tuned=no_tuned, epilogue={"bias": bias, "activation": "relu", "residual": True},
        plan={"rows_per_group": 4, "k_split": 2})
    assert kernel.plan_params.k_split == 2 and kernel.plan_params.rows_per_group == 4
    assert [a["name"] for a in kernel.arguments] == ["x", "y", "res", "z"]
    assert kernel.arguments[3]["shape"] == [6, 11, 9]                    # one zero image
    assert kernel.output_shape == (2, 10, 6, 5) and kernel.shared_bytes > 0
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6, 11, 9)).astype(np.float32)
    res = rng.standard_normal((2, 10, 6, 5)).astype(np.float32)
    y = kernel.run_cpu(x, res)
    ref, mag = reference_and_magnitude(w, x, 2, 1, np.float32(bias), res, "relu")
    assert check(y, ref, mag, "fp32", 54)[0]
    assert np.allclose(y, ref, rtol=0, atol=1e-9) and np.all(y >= 0)
    with pytest.raises(UserError, match="residual"):
        kernel.run_cpu(x)
    with pytest.raises(UserError, match="shape"):
        kernel.run_cpu(x[:1], res)


def test_fp16_kernel_rounds_like_the_kernel(no_tuned):
    w = sparse((16, 32, 1, 1), 0.3, 6)
    kernel = sparsert.compile_kernel(w, op="conv", input_shape=(1, 32, 4, 8), dtype="fp16",
                                     cache=None, tuned=no_tuned, plan={"vector_width": 2})
    assert kernel.precision == "fp16" and kernel.storage is np.float16
    assert {a["dtype"] for a in kernel.arguments} == {"float16"}
    assert ".f16x2" in kernel.source
    x = np.random.default_rng(7).standard_normal((1, 32, 4, 8))
    y = kernel.run_cpu(x)
    assert np.array_equal(y, y.astype(np.float16).astype(np.float64))    # fp16 outputs
    x16 = x.astype(np.float16).astype(np.float64)
    ref, mag = reference_and_magnitude(w, x16, 1, 0)
    assert check(y, ref, mag, "fp16", 32)[0]
    acc32 = sparsert.compile_kernel(w, op="conv", input_shape=(1, 32, 4, 8), dtype="fp16",
                                    accumulate="fp32", cache=None, tuned=no_tuned)
    assert acc32.precision == "fp16acc32" and acc32.verify_cpu()["ok"]


def test_scipy_sparse_weight_and_plan_params(no_tuned):
    w = sp.random(12, 20, density=0.3, format="csr", random_state=8, dtype=np.float32)
    params = PlanParams(rows_per_group=2, vector_width=2, col_threads=32)
    kernel = sparsert.compile_kernel(w, n=64, plan=params, cache=None, tuned=no_tuned)
    assert kernel.plan_params == params and kernel.nnz == w.nnz
    x = np.random.default_rng(9).standard_normal((20, 64)).astype(np.float32)
    assert np.allclose(kernel.run_cpu(x), w.toarray().astype(np.float64) @ x, atol=1e-9)


@pytest.mark.parametrize("kwargs,message", [
    ({"op": "gemm"}, "needs n"),
    ({"op": "matmul", "n": 4}, "op must be"),
    ({"op": "conv", "input_shape": (1, 5, 8, 8)}, "4-D"),
    ({"op": "gemm", "n": 0}, "n must be"),
    ({"op": "gemm", "n": 8, "epilogue": {"bias": [1.0]}}, "bias must hold 6"),
    ({"op": "gemm", "n": 8, "epilogue": {"act": "relu"}}, "unknown epilogue key"),
    ({"op": "gemm", "n": 8, "family": "tensorcore"}, "unknown kernel family"),
    ({"op": "gemm", "n": 8, "dtype": "fp32", "accumulate": "fp16"}, "accumulates in fp16"),
    ({"op": "gemm", "n": 8, "plan": {"k_split": 99}}, "k_split"),
    ({"op": "gemm", "n": 8, "plan": "fast"}, "plan must be"),
    ({"op": "gemm", "n": 8, "arch": "sm_5"}, "sm_90"),
    ({"op": "gemm", "n": 8, "dtype": "fp16", "arch": "sm_75"}, "sm_80 or newer"),
    ({"op": "gemm", "n": 8, "emit": "sass"}, "emit must be"),
])
def test_bad_arguments_are_one_line_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message) as caught:
        sparsert.compile_kernel(sparse((6, 5), 0.5, 1), cache=None, tuned=False, **kwargs)
    assert "\n" not in caught.value.message


def test_conv_channel_mismatch_names_both_counts():
    with pytest.raises(UserError, match="5 channels but the weight expects 3"):
        sparsert.compile_kernel(sparse((4, 3, 3, 3), 0.5, 1), op="conv",
                                input_shape=(1, 5, 8, 8), cache=None, tuned=False)


def test_save_and_from_dir_round_trip(tmp_path, no_tuned):
    w = sparse((10, 6, 3, 3), 0.3, 10)
    kernel = sparsert.compile_kernel(w, op="conv", input_shape=(1, 6, 7, 7), padding=1,
                                     epilogue=Epilogue(tuple([0.25] * 10), "relu6"), cache=None,
                                     tuned=no_tuned)
    assert "verify_cpu" not in kernel.manifest()
    kernel = sparsert.compile_kernel(w, op="conv", input_shape=(1, 6, 7, 7), padding=1,
                                     epilogue=Epilogue(tuple([0.25] * 10), "relu6"), cache=None,
                                     tuned=no_tuned, verify=True)
    assert kernel.verified["ok"] and kernel.manifest()["verify_cpu"] == kernel.verified
    out = kernel.save(tmp_path / "k")
    assert sorted(p.name for p in out.iterdir()) == ["kernel.cubin", "kernel.ptx",
                                                     "manifest.json", "weights.npz"]
    again = sparsert.Kernel.from_dir(out)
    assert again.entry == kernel.entry and again.cubin == kernel.cubin
    assert again.source == kernel.source and again.arguments == kernel.arguments
    assert again.manifest() == kernel.manifest() == json.loads((out / "manifest.json").read_text())
    x = np.random.default_rng(11).standard_normal((1, 6, 7, 7)).astype(np.float32)
    assert np.array_equal(again.run_cpu(x), kernel.run_cpu(x))
    assert again.epilogue == kernel.epilogue and again.verified == kernel.verified


def test_from_dir_refuses_damaged_or_mixed_files(tmp_path, no_tuned):
    kernel = sparsert.compile_kernel(sparse((8, 16), 0.4, 12), n=32, cache=None, tuned=no_tuned)
    other = sparsert.compile_kernel(sparse((8, 16), 0.4, 13), n=32, cache=None, tuned=no_tuned)
    out = kernel.save(tmp_path / "k")
    (out / "weights.npz").write_bytes(other.files()["weights.npz"])
    with pytest.raises(UserError, match="do not rebuild"):
        sparsert.Kernel.from_dir(out)
    (out / "weights.npz").unlink()
    bare = sparsert.Kernel.from_dir(out)           # an older gen output: contract, no CPU run
    assert bare.grid == kernel.grid and bare.arguments == kernel.arguments
    with pytest.raises(UserError, match="weights.npz"):
        bare.run_cpu(np.zeros((16, 32)))
    (out / "kernel.cubin").write_bytes(b"\x7fELF damaged")
    with pytest.raises(UserError, match="does not match"):
        sparsert.Kernel.from_dir(out)
    (out / "stray.txt").write_text("x")
    with pytest.raises(UserError, match="not a sparsert output"):
        kernel.save(out)


def test_plan_auto_uses_a_current_tuned_entry_and_ignores_a_stale_one(tmp_path):
    w = sparse((16, 32), 0.3, 14)
    geometry = Geometry(1, 32, 1, 128, 16)
    phash = pattern_hash(w.reshape(16, 32, 1, 1))
    winner = PlanParams(rows_per_group=2, vector_width=2, col_threads=32, k_split=2)
    db = TunedDB(tmp_path / "tuned.json")
    db.record(phash, geometry, "GPU X", "fp32", winner, {"us": 1.0}, version="old-0")
    stale = sparsert.compile_kernel(w, n=128, tuned=db, gpu_name="GPU X", cache=None)
    assert not stale.tuned and stale.plan_params != winner            # stale: default plan
    db.record(phash, geometry, "GPU X", "fp32", winner, {"us": 1.0})
    assert len(db.entries) == 2      # the stale entry stays, never read
    tuned = sparsert.compile_kernel(w, n=128, tuned=db, gpu_name="GPU X", cache=None)
    assert tuned.tuned and tuned.plan_params == winner and tuned.manifest()["tuned"]
    other_gpu = sparsert.compile_kernel(w, n=128, tuned=db, gpu_name="GPU Y", cache=None)
    assert not other_gpu.tuned
    db.entries = {k.rsplit("|", 1)[0]: v for k, v in db.entries.items()}   # a schema-1 key
    assert not sparsert.compile_kernel(w, n=128, tuned=db, gpu_name="GPU X", cache=None).tuned


def test_migration_appends_the_family_version_once():
    entries = {"abc|b1c4h1w8m4k1s1p0|GPU X|fp32": {"params": {}},
               f"abd|b1c4h1w8m4k1s1p0|GPU X|fp16|{FAMILY}@v9": {"params": {}}}
    migrated = migrate_entries(entries)
    assert set(migrated) == {f"abc|b1c4h1w8m4k1s1p0|GPU X|fp32|{FAMILY}@{FAMILY_VERSION}",
                             f"abd|b1c4h1w8m4k1s1p0|GPU X|fp16|{FAMILY}@v9"}
    assert migrate_entries(migrated) == migrated


def test_committed_tuned_database_is_migrated_and_paper20_runs_tuned():
    from sparsert_cli import bench as B
    from sparsert_cli.config import load_config

    doc = json.loads((REPO / "configs" / "tuned.json").read_text())
    assert doc["schema"] == 2 and doc["entries"]
    assert all(key.count("|") == 4 for key in doc["entries"])
    config = load_config(REPO / "configs" / "paper20.yaml")
    db = TunedDB(REPO / "configs" / "tuned.json")
    from sparsert_cli.build import geometry_for
    from sparsert_cli.patterns import generate

    hits = [db.lookup(pattern_hash(generate(p, s, config.pattern, config.seed)),
                      geometry_for(p), B.DEFAULT_TARGET_GPU, config.precision)
            for p, s in config.cases()]
    assert sum(h is not None for h in hits) == len(hits)


def test_stream_handles_and_pointers_from_foreign_objects():
    assert stream_handle(0) == 0 and stream_handle(1234) == 1234
    assert stream_handle(types.SimpleNamespace(__cuda_stream__=lambda: (0, 77))) == 77
    assert stream_handle(types.SimpleNamespace(cuda_stream=99)) == 99          # torch.cuda.Stream
    assert stream_handle(np.uint64(5)) == 5
    with pytest.raises(TypeError, match="not a CUDA stream"):
        stream_handle("default")
    assert device_pointer(types.SimpleNamespace(data_ptr=lambda: 4096)) == 4096
    assert device_pointer(np.int64(8)) == 8


def test_package_import_stays_light_and_exposes_the_api():
    code = ("import sys, sparsert_cli as s\n"
            "assert 'numpy' not in sys.modules and 'sparsert_cli.api' not in sys.modules\n"
            "assert s.compile_kernel.__module__ == 'sparsert_cli.api'\n"
            "assert s.tune_config.__module__ == 'sparsert_cli.executors'\n"
            "assert 'compile_kernel' in dir(s)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=REPO)


# ---- the README's Python examples run as written -------------------------------------------------
def readme_python_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_python_examples_run(tmp_path, isolated_cache, monkeypatch):
    blocks = readme_python_blocks()
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for block in blocks:
        if "to_device" in block or "torch" in block:    # GPU examples: compiled, not run here
            compile(block, "README.md", "exec")
            continue
        exec(compile(block, "README.md", "exec"), scope)


def test_compile_kernels_plans_like_bench_and_reports_failures(monkeypatch, isolated_cache):
    from sparsert_cli import build
    from sparsert_cli.api import KernelFailure

    config = sparsert.load_config(REPO / "configs" / "ci.yaml")
    layers = sparsert.config_layers(config)[:4]
    seen, stats = [], {}
    kernels = sparsert.compile_kernels(layers, tuned=False, jobs=1, stats=stats,
                                       on_done=lambda i, k: seen.append(i))
    assert sorted(seen) == [0, 1, 2, 3] and stats["compile_seconds"] > 0
    assert all(k.verify_cpu()["ok"] for k in kernels)
    assert [k.plan_params for k in kernels] == [
        sparsert.compile_kernel(layer.weight.reshape(layer.weight.shape[0], -1)
                                if layer.op == "gemm" else layer.weight, op=layer.op,
                                input_shape=None if layer.op == "gemm" else
                                (layer.geometry.batch, layer.geometry.in_channels,
                                 layer.geometry.height, layer.geometry.width),
                                n=layer.geometry.width if layer.op == "gemm" else None,
                                stride=layer.geometry.stride, padding=layer.geometry.padding,
                                epilogue=layer.epilogue, tuned=False).plan_params
        for layer in layers]

    monkeypatch.setattr(build, "render_source", lambda *a: "boom: not ptx")
    monkeypatch.setattr(build, "_save_source", lambda *a: "/dev/null")
    failed = sparsert.compile_kernels(layers[:1], tuned=False, cache=None, jobs=1)
    assert isinstance(failed[0], KernelFailure) and "nvJitLink rejected" in str(failed[0])
    assert failed[0].plan.entry == kernels[0].entry
    bad = [sparsert.Layer(layers[0].label, layers[0].op, layers[0].weight, layers[0].geometry,
                          plan={"k_split": 16, "rows_per_group": 64, "col_threads": 64})]
    with pytest.raises(UserError, match=layers[0].label):
        sparsert.compile_kernels(bad, tuned=False, cache=None)


def test_run_benchmark_compile_only_builds_records(isolated_cache):
    config = sparsert.load_config(REPO / "configs" / "ci.yaml")
    stages = []
    doc = sparsert.run_benchmark(config, jobs=1,
                                 on_progress=lambda stage, done, total, item: stages.append(
                                     (stage, done, total)))
    assert doc["kind"] == "bench" and doc["mode"] == "compile-only" and not doc["failures"]
    assert len(doc["cases"]) == len(config.cases())
    assert all(r["compile"]["ok"] and r["verify_cpu"]["ok"] for r in doc["cases"])
    assert ("compile", len(config.cases()), len(config.cases())) in stages
    assert ("verify", len(config.cases()), len(config.cases())) in stages



def test_gen_writes_what_kernel_from_dir_reads_and_refuses_a_kernel_failing_its_cpu_check(
        tmp_path, monkeypatch, isolated_cache, capsys):
    from cli_helpers import run_main

    from sparsert_cli.api import Kernel

    w = sparse((12, 20), 0.3, 18)
    np.save(tmp_path / "w.npy", w)
    code, _, _ = run_main(["gen", "--pattern", str(tmp_path / "w.npy"), "--n", "24", "-o",
                           str(tmp_path / "ok")], capsys)
    kernel = sparsert.Kernel.from_dir(tmp_path / "ok")
    assert code == 0 and kernel.verified["ok"]
    x = np.random.default_rng(19).standard_normal((20, 24)).astype(np.float32)
    assert np.allclose(kernel.run_cpu(x), w.astype(np.float64) @ x, rtol=0, atol=1e-9)
    monkeypatch.setattr(Kernel, "verify_cpu", lambda self, seed=0, checks=2: {
        "ok": False, "max_err": 1.0, "message": "3 output(s) off"})
    code, _, err = run_main(["gen", "--pattern", str(tmp_path / "w.npy"), "--n", "24", "-o",
                             str(tmp_path / "bad")], capsys)
    assert code == 1 and "failed its CPU check" in err and not (tmp_path / "bad").exists()
