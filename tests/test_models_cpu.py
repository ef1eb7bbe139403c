"""Whole models on the CPU: depthwise convolutions as block-diagonal kernels, the compile phase
of sparsify_ (all kernels at once), models results files (merge, markdown) and the
scripts/models-run matrix."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sparsert_cli.errors import UserError  # noqa: E402
from sparsert_cli.torch import prune_, sparsify_  # noqa: E402
from sparsert_cli.torch.backend import block_diagonal  # noqa: E402
from sparsert_cli.torch.sparsify import SparseLayer, _sparsify  # noqa: E402

nn = torch.nn
F = torch.nn.functional


def _cpu_sparsify(model, x, **kw):
    args = dict(dtype="fp32", tuned=False, verify=True, min_speedup=1.0, min_sparsity=0.5,
                dry_run=False, arch=None, cache=False, include=None, device=torch.device("cpu"))
    return _sparsify(model, (x,), **{**args, **kw})


# ---- depthwise -------------------------------------------------------------------------------
def test_block_diagonal_weight():
    w = np.arange(1, 3 * 9 + 1, dtype=np.float32).reshape(3, 1, 3, 3)
    w[1, 0, 1, 1] = 0.0
    full = block_diagonal(w)
    assert full.shape == (3, 3, 3, 3) and full.nnz == 26
    dense = full.dense()
    for c in range(3):
        assert np.array_equal(dense[c, c], w[c, 0])
        assert not np.any(np.delete(dense[c], c, axis=0))
    with pytest.raises(ValueError):
        block_diagonal(np.ones((4, 2, 3, 3), np.float32))


@pytest.mark.parametrize("dtype,stride,act", [("fp32", 1, "relu6"), ("fp32", 2, "none"),
                                              ("fp16", 2, "relu")])
def test_depthwise_kernel_on_the_cpu_matches_torch(dtype, stride, act):
    """The block-diagonal kernel (executed by the plan interpreter) against torch's grouped
    conv: stride 1 and 2, padding 1, bias and activation in the epilogue."""
    from sparsert_cli.api import compile_kernel

    rng = np.random.default_rng(stride)
    c, h = 6, 9
    w = rng.standard_normal((c, 1, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    x = rng.standard_normal((1, c, h, h)).astype(np.float32)
    kernel = compile_kernel(block_diagonal(w), op="conv", input_shape=x.shape, stride=stride,
                            padding=1, dtype=dtype, epilogue={"bias": bias, "activation": act},
                            tuned=False, cache=False, arch="sm_90")
    got = kernel.run_cpu(x)
    xs = x.astype(np.float16).astype(np.float64) if dtype == "fp16" else x.astype(np.float64)
    want = F.conv2d(torch.from_numpy(xs), torch.from_numpy(w.astype(np.float64)),
                    torch.from_numpy(bias.astype(np.float64)), stride, 1, 1, c)
    want = {"relu": F.relu, "relu6": lambda t: t.clamp(0, 6), "none": lambda t: t}[act](want)
    assert got.shape == tuple(want.shape) and kernel.nnz == c * 9
    assert np.allclose(got, want.numpy(), atol=2e-2 if dtype == "fp16" else 1e-5)


class Separable(nn.Module):
    """MobileNet's block (depthwise + BN + ReLU6, pointwise + BN + ReLU), a grouped conv
    (groups=2: no kernel) and a depthwise 5x5 (only 1x1 and 3x3)."""

    def __init__(self, c=8):
        super().__init__()
        self.dw = nn.Sequential(nn.Conv2d(c, c, 3, 2, 1, groups=c, bias=False),
                                nn.BatchNorm2d(c), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c),
                                nn.ReLU())
        self.grouped = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2)
        self.dw5 = nn.Conv2d(2 * c, 2 * c, 5, padding=2, groups=2 * c)

    def forward(self, x):
        return self.dw5(self.grouped(self.pw(self.dw(x))))


def _separable():
    torch.manual_seed(2)
    model = Separable().eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model


def test_prune_leaves_depthwise_alone_unless_asked():
    model = _separable()
    names = [r["layer"] for r in prune_(model, 0.5)]
    assert names == ["pw.0"] and not torch.any(model.dw[0].weight == 0)
    names = [r["layer"] for r in prune_(_separable(), 0.5, depthwise=True)]
    assert names == ["dw.0", "pw.0", "dw5"]              # grouped (groups=2): never
    with pytest.raises(UserError, match="depthwise must be"):
        prune_(model, 0.5, depthwise="yes")
    with pytest.raises(UserError, match="or depthwise"):
        prune_(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), 0.5, depthwise=True)


def test_depthwise_replaced_with_bn_and_relu6_folded():
    model = _separable()
    prune_(model, 0.7)
    x = torch.randn(1, 8, 9, 9)
    with torch.no_grad():
        want = model(x).clone()
    rows = {r["layer"]: r for r in _cpu_sparsify(model, x)}
    dw = rows["dw.0"]
    assert dw["replaced"] and (dw["op"], dw["fused"]) == ("dw3x3", "bn+relu6")
    assert dw["shape"] == "8x3x3 dw @ 9x9 s2 p1" and dw["max_rel_err"] < 1e-5
    assert rows["pw.0"]["replaced"]
    assert not rows["grouped"]["replaced"]
    assert rows["grouped"]["reason"] == "groups=2 (grouped convolution: no kernel, dense)"
    assert rows["dw5"]["replaced"] and rows["dw5"]["op"] == "dw5x5"       # 5x5 depthwise too
    layer = model.dw[0]
    assert isinstance(layer, SparseLayer) and layer.groups == 8
    assert tuple(layer.weight.shape) == (8, 1, 3, 3)            # folded, not block-diagonal
    assert isinstance(model.dw[1], nn.Identity) and isinstance(model.dw[2], nn.Identity)
    with torch.no_grad():
        assert torch.allclose(model(x), want, atol=1e-4, rtol=1e-4)
        # another shape: the dense fallback is the grouped conv
        with pytest.warns(UserWarning, match="compiled for input"):
            other = model.dw(torch.cat([x, x]))
    assert other.shape == (2, 8, 5, 5)
    assert torch.allclose(other[1], model.dw(x)[0], atol=1e-4)


def test_depthwise_min_sparsity_counts_the_block_diagonal_weight():
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, groups=2)).eval()   # 1 - 1/2 sparse
    x = torch.randn(1, 2, 5, 5)
    (row,) = _cpu_sparsify(model, x, min_sparsity=0.6)
    assert row["reason"] == "sparsity 0.50 below min_sparsity 0.6" and row["sparsity"] == 0.0
    (row,) = _cpu_sparsify(model, x, min_sparsity=0.5)
    assert row["replaced"]


# ---- the compile phase -------------------------------------------------------------------------
def test_every_kernel_is_compiled_before_any_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSERT_CACHE_DIR", str(tmp_path / "cache"))
    model = _separable()
    prune_(model, 0.7)
    x = torch.randn(1, 8, 9, 9)
    events, stats = [], {}
    rows = sparsify_(model, (x,), dry_run=True, tuned=False, jobs=2, stats=stats,
                     on_progress=lambda *e: events.append(e))
    stages = [e[0] for e in events]
    assert stages == ["compile"] * 3 + ["check"] * 3         # dw.0, pw.0 and dw5 have kernels
    assert [e[1:3] for e in events] == [(1, 3), (2, 3), (3, 3), (1, 3), (2, 3), (3, 3)]
    assert {e[3] for e in events} == {"dw.0", "pw.0", "dw5"}
    assert stats["kernels"] == 3 and stats["cached"] == 0
    assert stats["plan_seconds"] >= 0 and stats["compile_seconds"] > 0
    assert [r["reason"] for r in rows[:2]] == ["dry run: verified"] * 2
    again = {}
    rows = sparsify_(model, (x,), dry_run=True, tuned=False, verify=False, stats=again)
    assert again["cached"] == 3 and rows[0]["reason"] == "dry run: compiled"
    assert rows[0]["max_err"] is None                          # verify=False: not executed


@pytest.mark.parametrize("jobs", [0, -1, 1.5, True, "2"])
def test_bad_jobs(jobs):
    with pytest.raises(UserError, match="jobs must be"):
        sparsify_(_separable(), (torch.randn(1, 8, 9, 9),), dry_run=True, jobs=jobs)


def test_a_layer_without_a_kernel_does_not_stop_the_others():
    """Planning errors are per layer (here: BatchNorm folding takes a weight past fp16's range)."""
    model = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.Conv2d(4, 4, 1, bias=False),
                          nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        model[1].weight.copy_(3e4 * torch.eye(4).view(4, 4, 1, 1))
        model[2].weight.fill_(4.0)
    rows = sparsify_(model.half(), (torch.randn(1, 4, 3, 3).half(),), dtype="fp16",
                     dry_run=True, tuned=False, cache=False)
    assert rows[0]["reason"] == "dry run: verified"
    assert rows[1]["reason"].startswith("no kernel: ") and "fp16" in rows[1]["reason"]
    assert rows[1]["plan"] is None


# ---- models results: merge, markdown -----------------------------------------------------------
def _onnx_conv(path):
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(5).standard_normal((8, 4, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")])
    import onnx

    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def _model_cli(capsys, tmp_path, *extra):
    from cli_helpers import run_main

    return run_main(["model", str(tmp_path / "one.onnx"), "--compile-only", "--no-cache",
                     "--no-tuned", "--out", str(tmp_path / "m.json"), *extra], capsys)


def test_model_merge_keeps_replaces_and_refuses(tmp_path, capsys):
    import json

    from sparsert_cli.results import load_results

    _onnx_conv(tmp_path / "one.onnx")
    out = tmp_path / "m.json"
    code, _, err = _model_cli(capsys, tmp_path, "--sparsity", "0.9", "--merge", "--jobs", "1")
    assert code == 0, err
    code, _, err = _model_cli(capsys, tmp_path, "--sparsity", "0.8", "--merge")
    assert code == 0, err
    doc = load_results(out, kinds=("models",))
    assert [r["sparsity"] for r in doc["models"]] == [0.9, 0.8]
    assert all(r["git_commit"] == doc["git_commit"] and r["timestamp"] for r in doc["models"])
    doc["models"][0]["marker"] = "old"
    out.write_text(json.dumps(doc))
    code, _, err = _model_cli(capsys, tmp_path, "--sparsity", "0.9", "--merge")
    assert code == 0, err
    rows = load_results(out)["models"]
    assert [r["sparsity"] for r in rows] == [0.9, 0.8] and "marker" not in rows[0]
    assert (tmp_path / "m.csv").read_text().count("\n") == 3          # header + 2 entries
    code, _, err = _model_cli(capsys, tmp_path, "--sparsity", "0.7")    # no --merge: replaced
    assert code == 0, err
    assert [r["sparsity"] for r in load_results(out)["models"]] == [0.7]


@pytest.mark.parametrize("content,message", [
    ('{"kind": "bench", "schema": 2, "cases": [{}]}', "holds bench results"),
    ("{not json", "not a results JSON file"),
    ('{"kind": "models", "schema": 9, "models": [{}]}', "newer than this sparsert"),
    ('{"kind": "models", "schema": 2, "models": [{"model": "m", "dtype": "fp32"}]}',
     "entry 0 lacks sparsity, batch"),
    ('{"kind": "models", "schema": 2, "models": [], "dense_baselines": {}}', "no models"),
    ('{"kind": "models", "schema": 2, "models": [{"model": "m", "dtype": "fp32", "batch": 1, '
     '"sparsity": "x"}]}', "non-numeric sparsity"),
])
def test_model_merge_refuses_another_file(tmp_path, capsys, content, message):
    _onnx_conv(tmp_path / "one.onnx")
    (tmp_path / "m.json").write_text(content)
    code, _, err = _model_cli(capsys, tmp_path, "--sparsity", "0.9", "--merge")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "m.json").read_text() == content and not (tmp_path / "m.csv").exists()


@pytest.mark.parametrize("args,message", [
    (["--no-verify"], "--no-verify is for --compile-only"),
    (["--dense-compile", "fast"], "--dense-compile"),
    (["--jobs", "0"], "--jobs"),
])
def test_model_bad_new_options(tmp_path, capsys, args, message):
    from cli_helpers import run_main

    code, _, err = run_main(["model", "mobilenet_v1", "--out", str(tmp_path / "m.json"),
                             *args], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "m.json").exists()


def test_run_model_refuses_an_unknown_dense_compile_mode():
    from sparsert_cli.torch.endtoend import run_model

    model = nn.Sequential(nn.Conv2d(4, 4, 1))
    with pytest.raises(UserError, match="dense_compile must be one of max-autotune"):
        run_model("m", model, torch.randn(1, 4, 3, 3), sparsity=0.5, dtype="fp32",
                  dense_compile="fast")
    assert not torch.any(model[0].weight == 0)             # refused before pruning


def _row(model="m", dtype="fp16", sparsity=0.9, batch=1, **kw):
    return {"model": model, "dtype": dtype, "sparsity": sparsity, "batch": batch,
            "sparsert_us": 100.0, "dense": {"eager_us": 900.0, "graph_us": 300.0,
                                           "compile_us": 150.0, "compile_mode": "max-autotune"},
            "best_dense": "compile", "speedup": 1.5, "max_rel_err": 1e-3, "verified": True,
            "replaced": 3, "layers_total": 4, "gpu": {"name": "H100"}, **kw}


def test_merge_and_markdown(tmp_path):
    from sparsert_cli.models_results import load_models, markdown, merge
    from sparsert_cli.results import stamp

    base = {"model": "m", "dtype": "fp16", "input_shape": [1, 3, 8, 8],
            "compile_mode": "max-autotune", "gpu": {"name": "H100"}, "dense": {}}
    old = stamp({"git_commit": "a", "models": [_row(tag="old"), _row(sparsity=0.95)],
                 "dense_baselines": [base]}, "models")
    new = stamp({"git_commit": "b", "models": [_row(tag="new"), _row(dtype="fp32")],
                 "dense_baselines": [{**base, "gpu": {"name": "H200"}}]}, "models")
    doc = merge(old, new)
    assert [(r["dtype"], r["sparsity"], r.get("tag")) for r in doc["models"]] == [
        ("fp16", 0.9, "new"), ("fp16", 0.95, None), ("fp32", 0.9, None)]
    assert len(doc["dense_baselines"]) == 2 and doc["git_commit"] == "b"
    assert merge(None, new) is new
    text = markdown(doc)
    lines = text.splitlines()
    assert len(lines) == 2 + 3 and lines[2].startswith("| m | fp16 | 0.9 | 1 | 100.0 |")
    assert "150.0 (max-autotune)" in lines[2] and "**1.50×**" in lines[2]
    both = _row(dense={"compile_us": 412.0, "compile_mode": "best"}, compile_modes_us={
        "max-autotune-no-cudagraphs": 427.4, "default": 412.0})
    assert "412.0 (default; max-autotune 427.4)" in markdown({"models": [both]})
    only_dense = tmp_path / "d.json"              # measured before its first entry finished
    only_dense.write_text(__import__("json").dumps(stamp(
        {"models": [], "dense_baselines": [base]}, "models")))
    assert load_models(only_dense)["dense_baselines"] == [base]
    assert load_models(tmp_path / "absent.json") is None


def test_merge_keeps_an_entry_of_other_options_beside_the_default_one():
    """--no-fuse-depthwise (or --no-dependent-launch, --tune) measures another sparse model:
    merged over the default entry it is kept beside it, shown as its own table row and CSV
    variant; the same options again replace it; entries without options are the default."""
    from sparsert_cli.commands.model import csv_text
    from sparsert_cli.models_results import entry_key, markdown, merge, variant
    from sparsert_cli.results import stamp

    default = {"fuse_depthwise": True, "dependent_launch": True, "tune": False}
    old = stamp({"models": [_row(tag="fused", options=default), _row(sparsity=0.95)]}, "models")
    apart = _row(tag="apart", options={**default, "fuse_depthwise": False})
    doc = merge(old, stamp({"models": [apart]}, "models"))
    assert [r.get("tag") for r in doc["models"]] == ["fused", None, "apart"]
    assert variant(apart) == "no-fuse-depthwise" and variant(_row()) == ""
    assert entry_key(apart)[-1] == "no-fuse-depthwise" and entry_key(doc["models"][0])[-1] == ""
    again = merge(doc, stamp({"models": [{**apart, "tag": "apart2"}]}, "models"))
    assert [r.get("tag") for r in again["models"]] == ["fused", None, "apart2"]
    both = _row(options={**default, "tune": True, "dependent_launch": False})
    assert variant(both) == "no-dependent-launch+tuned"
    lines = markdown(again).splitlines()[2:]
    assert [ln.split(" | ")[0] for ln in lines] == ["| m", "| m (no-fuse-depthwise)", "| m"]
    rows = csv_text(again).splitlines()
    assert rows[0].endswith(",variant") and rows[3].endswith(",no-fuse-depthwise")


def test_an_entry_whose_options_are_not_an_object_is_refused(tmp_path):
    from sparsert_cli.models_results import load_models
    from sparsert_cli.results import stamp

    path = tmp_path / "models.json"
    path.write_text(__import__("json").dumps(stamp({"models": [_row(options=["tune"])]},
                                                   "models")))
    with pytest.raises(UserError, match="entry 0 has options that are not an object"):
        load_models(path)


# ---- scripts/models-run ----------------------------------------------------------------------
def _models_run():
    import importlib.machinery
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "models-run"
    loader = importlib.machinery.SourceFileLoader("models_run", str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("models_run",
                                                                             loader))
    loader.exec_module(module)
    return module


class FakeRunner:
    """Stands in for one `sparsert model ... --merge` process: adds the entry to the file (and
    its dense baseline), advancing a fake clock by `seconds`."""

    def __init__(self, out, seconds=100.0, results=None):
        self.out, self.seconds, self.now, self.calls = out, seconds, 0.0, []
        self.results = list(results or [])

    def clock(self):
        return self.now

    def __call__(self, cmd, log, timeout):
        from sparsert_cli.models_results import dumps, load_models, merge
        from sparsert_cli.results import stamp

        self.calls.append((cmd, timeout))
        result = self.results.pop(0) if self.results else "ok"
        if result == "timeout" or self.seconds > timeout:       # ended at the budget
            result = "timeout"
            self.now += timeout
            return result
        self.now += self.seconds
        if result == "ok":
            i = cmd.index
            entry = dict(model=cmd[i("model") + 1], dtype=cmd[i("--dtype") + 1],
                         sparsity=float(cmd[i("--sparsity") + 1]),
                         batch=int(cmd[i("--batch") + 1]))
            base = {"model": entry["model"], "dtype": entry["dtype"], "compile_seconds": 50.0,
                    "input_shape": [entry["batch"], 3], "compile_mode": "max-autotune"}
            doc = stamp({"models": [{**entry, "sparsify_seconds": 30.0}],
                         "dense_baselines": [base]}, "models")
            self.out.write_text(dumps(merge(load_models(self.out), doc)))
        return result


def test_models_run_matrix_resumes_and_keeps_to_the_budget(tmp_path):
    from sparsert_cli.models_results import load_models

    mr = _models_run()
    entries = mr.matrix()
    assert len(entries) == 13 and entries[0] == {"model": "mobilenet_v1", "dtype": "fp16",
                                                 "sparsity": 0.9, "batch": 1}
    assert entries[8]["batch"] == 8 and all(e["model"] == "bert_base" for e in entries[9:])
    out = tmp_path / "models.json"
    fake = FakeRunner(out, seconds=100.0)
    code = mr.run_matrix(tmp_path, entries[:4], budget=540, dense_compile="max-autotune",
                         runner=fake, clock=fake.clock)
    # estimates: 20 + 60 + 240 = 320 s (first guesses), then resnet's 350 s fits the 440 s left,
    # then 20 + 30 s each (dense baselines cached, sparse part measured)
    ran = [(c[c.index("model") + 1], c[c.index("--sparsity") + 1]) for c, _ in fake.calls]
    assert ran == [("mobilenet_v1", "0.9"), ("resnet50", "0.9"), ("mobilenet_v1", "0.95"),
                   ("resnet50", "0.95")] and code == 0
    assert all("--merge" in c and str(out) in c for c, _ in fake.calls)
    assert fake.calls[0][1] == 540 - mr.MARGIN                 # ended at the budget
    log = (tmp_path / "models-run.log").read_text()
    assert "done: 4 of 4 entries" in log
    # again: everything present, nothing run
    again = FakeRunner(out)
    assert mr.run_matrix(tmp_path, entries[:4], budget=540, dense_compile="max-autotune",
                         runner=again, clock=again.clock) == 0
    assert again.calls == [] and log.count("skipped") == 0
    assert (tmp_path / "models-run.log").read_text().count("already in models.json") == 4
    assert (tmp_path / "models.json").exists() and len(load_models(out)["models"]) == 4
    # an entry measured against another compile mode is kept, and the log says so
    from sparsert_cli.models_results import dumps

    doc = load_models(out)
    doc["models"][0]["dense"] = {"compile_mode": "max-autotune"}
    out.write_text(dumps(doc))
    third = FakeRunner(out)
    assert mr.run_matrix(tmp_path, entries[:1], budget=540, dense_compile="best",
                         runner=third, clock=third.clock) == 0 and third.calls == []
    assert ("(its dense baseline: --dense-compile max-autotune; remove the entry to measure it "
            "with best)") in (tmp_path / "models-run.log").read_text()


def test_models_run_defers_what_does_not_fit_and_stops_at_a_timeout(tmp_path):
    mr = _models_run()
    entries = mr.matrix(models=("mobilenet_v1", "resnet50"), dtypes=("fp16",))
    fake = FakeRunner(tmp_path / "models.json", seconds=150.0)
    code = mr.run_matrix(tmp_path, entries, budget=400, dense_compile="max-autotune",
                         runner=fake, clock=fake.clock)
    # mobilenet 0.9 (320 s guess) runs; resnet 0.9 (350 s) does not fit the 250 s left; mobilenet
    # 0.95 (dense cached: 20 + 30 s) does; the rest need resnet's dense baseline
    ran = [(c[c.index("model") + 1], c[c.index("--sparsity") + 1]) for c, _ in fake.calls]
    assert ran == [("mobilenet_v1", "0.9"), ("mobilenet_v1", "0.95")] and code == 3
    assert "left for the next run" in (tmp_path / "models-run.log").read_text()
    slow = FakeRunner(tmp_path / "models.json", results=["timeout"])
    code = mr.run_matrix(tmp_path, entries, budget=2000, dense_compile="max-autotune",
                         runner=slow, clock=slow.clock)
    assert code == 3 and len(slow.calls) == 1 and slow.now <= 2000
    assert "budget reached" in (tmp_path / "models-run.log").read_text()
    failing = FakeRunner(tmp_path / "models.json", results=["failed"])
    code = mr.run_matrix(tmp_path, entries, budget=5000, dense_compile="none",
                         runner=failing, clock=failing.clock)
    assert code == 1 and len(failing.calls) == 3          # the two present are skipped


@pytest.mark.parametrize("args,message", [
    (["--budget", "0"], "--budget"), (["--models", "vgg"], "--models: vgg"),
    (["--dtypes", ""], "--dtypes: nothing given"), (["--jobs", "0"], "--jobs"),
])
def test_models_run_bad_arguments(tmp_path, capsys, args, message):
    mr = _models_run()
    assert mr.main([str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_models_run_refuses_a_bad_file(tmp_path, capsys):
    mr = _models_run()
    (tmp_path / "models.json").write_text('{"kind": "tune", "schema": 2, "cases": [{}]}')
    assert mr.main([str(tmp_path)]) == 2
    assert "holds tune results" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert mr.main([str(tmp_path / "file")]) == 2
    assert not (tmp_path / "models-run.log").exists()


def test_models_run_process_results(tmp_path):
    """The real runner: exit status, and at the budget the whole process group ended."""
    mr = _models_run()
    with open(tmp_path / "log", "w") as log:
        assert mr.run_process(["true"], log, 10) == "ok"
        assert mr.run_process(["false"], log, 10) == "failed"
        started = __import__("time").monotonic()
        assert mr.run_process(["sh", "-c", "sleep 30 & sleep 30"], log, 1.0) == "timeout"
        assert __import__("time").monotonic() - started < 10


class DwResidual(nn.Module):
    """relu(bn(depthwise(x)) + x): the residual add fused into the depthwise kernel."""

    def __init__(self, c=6):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + x)


def test_depthwise_with_a_fused_residual_add():
    torch.manual_seed(7)
    model = nn.Sequential(DwResidual()).eval()
    model[0].bn.running_mean.uniform_(-0.5, 0.5)
    x = torch.randn(1, 6, 7, 7)
    with torch.no_grad():
        want = model(x).clone()
    (row,) = _cpu_sparsify(model, x)
    assert row["replaced"] and row["fused"] == "bn+add+relu" and row["max_rel_err"] < 1e-5
    with torch.no_grad():
        assert torch.allclose(model(x), want, atol=1e-5)


def test_strong_baseline_compiles_grouped_models_in_nchw_too():
    from sparsert_cli.models import build
    from sparsert_cli.torch.endtoend import compile_layouts

    x = torch.zeros(1, 3, 32, 32)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    grouped = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 8, 3, groups=8))
    assert compile_layouts(plain, x) == ("channels_last",)
    assert compile_layouts(grouped, x) == ("channels_last", "nchw")
    assert compile_layouts(torch.nn.Linear(4, 4), torch.zeros(2, 4)) == ("native",)
    assert compile_layouts(build("mobilenet_v1", resolution=32)[0], x) == ("channels_last", "nchw")
    assert compile_layouts(build("resnet50", resolution=32)[0], x) == ("channels_last",)


def test_dense_compile_best_measures_both_modes_and_keeps_the_faster(monkeypatch):
    """--dense-compile best: max-autotune and default mode, each in every layout; the dense
    compile time is the fastest of all, and the row names the mode that won (default mode
    beat max-autotune on ResNet-50 fp16 in some runs)."""
    from sparsert_cli.torch import endtoend as e

    times = {("max-autotune-no-cudagraphs", True): 500.0, ("max-autotune-no-cudagraphs", False):
             470.0, ("default", True): 450.0, ("default", False): 480.0}
    calls = []

    def compiled(model, x, mode, channels_last):
        calls.append((mode, channels_last))
        return times[(mode, channels_last)], 1.0

    monkeypatch.setattr(e, "time_compiled", compiled)
    monkeypatch.setattr(e, "time_eager", lambda m, x: 900.0)
    monkeypatch.setattr(e, "time_graph", lambda m, x: 800.0)
    monkeypatch.setattr(e, "gpu_meta", lambda: {"name": "fake"})
    grouped = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 8, 3, groups=8))
    x = torch.zeros(1, 3, 8, 8)
    steps = []
    record = e.dense_record("m", grouped, x, "fp16", "best",
                            on_progress=lambda *a: steps.append(a))
    assert sorted(calls) == sorted(times)
    assert [s[1:3] for s in steps] == [(i, 5) for i in range(6)]      # eager/graph, 4, done
    assert {s[0] for s in steps} == {"dense baseline"} and "mode=default (nchw)" in steps[4][3]
    assert record["compile_modes_us"] == {"max-autotune-no-cudagraphs": 470.0, "default": 450.0}
    assert record["compile_mode_best"] == "default" and record["compile_layout"] == "channels_last"
    assert record["compile_layouts_us"] == {"channels_last": 450.0, "nchw": 470.0}
    assert record["dense"]["compile_us"] == 450.0 and record["compile_seconds"] == 4.0
    assert "mode=default +" in e.best_dense_config("compile", "best", "channels_last", "default")
    calls.clear()
    record = e.dense_record("m", grouped, x, "fp16", "max-autotune")     # one mode: as before
    assert {mode for mode, _ in calls} == {"max-autotune-no-cudagraphs"}
    assert "compile_modes_us" not in record and record["dense"]["compile_us"] == 470.0
    assert "mode=max-autotune-no-cudagraphs +" in e.best_dense_config("compile", "max-autotune")
