"""sparsert_cli.torch on the CPU: pruning, BatchNorm folding, chain discovery, the custom op
(CPU impl = plan interpreter, fake kernel for torch.compile) and layer replacement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sparsert_cli.errors import UserError  # noqa: E402
from sparsert_cli.torch import prune_, report_table, sparsify_  # noqa: E402
from sparsert_cli.torch.fuse import find_chains, folded  # noqa: E402
from sparsert_cli.torch.sparsify import SparseLayer, _sparsify  # noqa: E402

nn = torch.nn


def _cpu(model, inputs, **options):
    """sparsify_ on the CPU (kernels run by the plan interpreter), tests' defaults."""
    args = dict(dtype="fp32", tuned=False, verify=True, min_speedup=1.0, min_sparsity=0.5,
                dry_run=False, arch=None, cache=False, include=None, device=torch.device("cpu"))
    return _sparsify(model, inputs, **(args | options))


def _sparsified(model, inputs, sparsity=0.7, **options):
    """Prune model, sparsify it on the CPU and check it computes what the pruned dense model
    did: (the report rows, that output)."""
    prune_(model, sparsity)
    with torch.no_grad():
        want = model(*inputs).clone()
    rows = _cpu(model, inputs, **options)
    with torch.no_grad():
        assert torch.allclose(model(*inputs), want, atol=1e-5, rtol=1e-5)
    return rows, want


class Block(nn.Module):
    """ResNet-style: one shared ReLU module, a residual add (not fusable in place)."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


def small_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        Block(8),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),           # depthwise: not pruned
        nn.Conv2d(8, 16, 1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 5 * 5, 10))
    for module in model.modules():      # non-trivial running statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def test_prune_layer_and_global():
    model = small_cnn()
    rows = prune_(model, 0.75)
    names = [r["layer"] for r in rows]
    assert "4" not in names                        # the depthwise conv is left alone
    for row in rows:
        size = int(np.prod(row["shape"]))
        assert row["nnz"] == size - round(0.75 * size)
    model = small_cnn()
    layers = {r["layer"]: None for r in prune_(small_cnn(), 0.0)}
    before = {n: m.weight.detach().abs().clone() for n, m in model.named_modules() if n in layers}
    rows = prune_(model, 0.6, scope="global")
    total = sum(int(np.prod(r["shape"])) for r in rows)
    assert sum(r["nnz"] for r in rows) == total - round(0.6 * total)
    modules = dict(model.named_modules())
    dropped = max(float(before[n][modules[n].weight == 0].max()) for n in layers)
    kept = min(float(before[n][modules[n].weight != 0].min()) for n in layers)
    assert dropped <= kept                       # one threshold over all layers
    assert len({round(r["sparsity"], 2) for r in rows}) > 1      # not the same per layer
    with pytest.raises(UserError):
        prune_(model, 1.0)
    with pytest.raises(UserError):
        prune_(model, 0.5, scope="tensor")
    prune_(model, 0.5, include=["9"])


def test_chains_found_by_fx_and_sequential():
    model = small_cnn()
    chains = {c.layer: c for c in find_chains(model)}
    assert (chains["0"].bn, chains["0"].activation, chains["0"].act_module) == ("1", "relu6", "2")
    # shared ReLU: fused (idempotent) but the module stays
    assert (chains["3.conv1"].bn, chains["3.conv1"].activation) == ("3.bn1", "relu")
    assert chains["3.conv1"].act_module is None
    assert (chains["3.conv2"].bn, chains["3.conv2"].activation) == ("3.bn2", "none")  # add first
    assert (chains["6"].activation, chains["6"].act_module) == ("relu", "7")
    assert chains["9"].activation == "none"


def test_bn_folding_matches_module():
    model = small_cnn()
    conv, bn = model[0], model[1]
    weight, bias = folded(conv, bn)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        want = bn(conv(x))
        got = torch.nn.functional.conv2d(x, weight, bias, 2, 1)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_sparsify_replaces_on_cpu_and_matches_the_dense_model():
    model = small_cnn()
    prune_(model, 0.7)
    x = torch.randn(1, 3, 9, 9)
    with torch.no_grad():
        want = model(x).clone()
    rows = _cpu(model, (x,))
    by = {r["layer"]: r for r in rows}
    # the unpruned depthwise conv as a block-diagonal 8x8x3x3 kernel, bias and ReLU fused
    assert (by["4"]["op"], by["4"]["fused"], by["4"]["nnz"]) == ("dw3x3", "relu", 72)
    assert by["4"]["shape"] == "8x3x3 dw @ 5x5 p1" and by["4"]["sparsity"] == 0.0
    fused = "3.conv2_residual.conv"          # conv2 + bn2 + residual add + shared ReLU
    assert all(by[n]["replaced"] for n in ("0", "3.conv1", fused, "4", "6", "9")), rows
    assert all(by[n]["max_rel_err"] < 1e-5 for n in ("0", "3.conv1", fused, "4", "9"))
    assert model[4].groups == 8 and isinstance(model[5], nn.Identity)
    assert by[fused]["fused"] == "bn+add+relu" and by["3.conv1"]["fused"] == "bn+relu"
    assert isinstance(model[0], SparseLayer) and isinstance(model[1], nn.Identity)
    # after the residual rewrite the shared ReLU has one use left: fused into conv1, gone
    assert isinstance(model[2], nn.Identity) and isinstance(model[3].relu, nn.Identity)
    assert isinstance(model[3], torch.fx.GraphModule)
    assert isinstance(model[3].conv2_residual.sparse, SparseLayer)
    with torch.no_grad():
        got = model(x)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    # other shapes run the dense (folded) op, with one warning
    with torch.no_grad(), pytest.warns(UserWarning, match="compiled for input"):
        other = model(torch.randn(1, 3, 9, 9).repeat(2, 1, 1, 1))
    assert other.shape == (2, 10)
    with pytest.raises(RuntimeError, match="inference-only"):
        model(x.clone().requires_grad_())
    table = report_table(rows)
    assert table.row_count == len(rows)


def test_sparsify_linear_token_major_and_fp16():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16)).eval()
    prune_(model, 0.8)
    x = torch.randn(2, 5, 32)                       # (batch, tokens, features)
    with torch.no_grad():
        want = model(x).clone()
    rows = _cpu(model, (x,))
    assert [r["replaced"] for r in rows] == [True, True] and rows[0]["fused"] == "relu"
    assert rows[0]["shape"] == "48x32, N=10"
    assert {r["family"] for r in rows} == {"streamed"}
    with torch.no_grad():
        assert torch.allclose(model(x), want, atol=1e-5, rtol=1e-5)
    # the last kernel writes N x M (token-major, as nn.Linear): the op's own output needs no
    # transpose (the first one hands its M x N output to it: test_linear_hands_...)
    layer = model[2]
    assert isinstance(layer, SparseLayer) and layer.token_major and model[0].feeds == "2"
    with torch.no_grad():
        hidden = model[1](model[0](x))
        columns = hidden.reshape(-1, 48).t().contiguous()
        op_out = torch.ops.sparsert.run(columns, None, layer.kernel_id)
        assert op_out.shape == (10, 16)
        assert torch.allclose(op_out, layer(hidden).reshape(10, 16))
    half = nn.Sequential(nn.Linear(32, 48)).eval()
    prune_(half, 0.8)
    rows = _cpu(half, (x,), dtype="fp16", dry_run=True)
    assert "input is torch.float32" in rows[0]["reason"]


def test_dry_run_leaves_the_model_and_cpu_refusal():
    model = small_cnn()
    prune_(model, 0.8)
    x = torch.randn(1, 3, 9, 9)
    with pytest.raises(UserError, match="dry_run=True"):
        sparsify_(model, (x,))
    rows = sparsify_(model, (x,), dry_run=True, tuned=False, cache=False)
    assert not any(isinstance(m, SparseLayer) for m in model.modules())
    verified = [r for r in rows if r["reason"].startswith("dry run")]
    assert len(verified) == 6 and all(r["max_err"] is not None for r in verified)
    assert isinstance(model[3], Block)                   # the caller's model is not rewritten
    dense = sparsify_(small_cnn(), (x,), dry_run=True, tuned=False, cache=False)
    assert all("below min_sparsity" in r["reason"] for r in dense if r["layer"] != "4")
    with pytest.raises(UserError, match="dtype"):
        sparsify_(model, (x,), dtype="int8", dry_run=True)


def test_op_traces_under_compile_with_the_fake_kernel():
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU()).eval()
    prune_(model, 0.5)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        want = model(x).clone()
    _cpu(model, (x,))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        got = compiled(x)
    assert torch.allclose(got, want, atol=1e-5)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        out = torch.ops.sparsert.run(fake, None, model[0].kernel_id)
    assert tuple(out.shape) == (1, 8, 6, 6)


# ---- `sparsert model` on a CPU box ---------------------------------------------------------
def _tiny_onnx(path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    w1[np.abs(w1) < 1.0] = 0                                    # ~68% zeros
    w2 = rng.standard_normal((16, 6)).astype(np.float32)       # MatMul weight K x M
    w2[np.abs(w2) < 1.2] = 0
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MatMul", ["t", "w2"], ["y2"], name="mm")]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6]),
                        helper.make_tensor_value_info("t", TensorProto.FLOAT, [5, 16])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def test_model_command_on_cpu(tmp_path, capsys):
    from cli_helpers import run_main

    from sparsert_cli.results import load_results

    code, out, err = run_main(["model", "mobilenet_v1", "--out", str(tmp_path / "m.json")],
                              capsys)
    assert code == 3 and "--compile-only" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.json").exists()
    code, _, err = run_main(["model", "vgg16"], capsys)
    assert code == 2 and "unknown model 'vgg16'" in err
    code, _, err = run_main(["model", "resnet50", "--sparsity", "1.5"], capsys)
    assert code == 2 and "--sparsity" in err
    (tmp_path / "bad.onnx").write_bytes(b"\x08garbage")
    code, _, err = run_main(["model", str(tmp_path / "bad.onnx"), "--compile-only"], capsys)
    assert code == 2 and "bad.onnx" in err and len(err.strip().splitlines()) == 1
    _tiny_onnx(tmp_path / "tiny.onnx")
    code, out, err = run_main(["model", str(tmp_path / "tiny.onnx"), "--compile-only",
                               "--no-cache", "--no-tuned", "--out", str(tmp_path / "r.json")],
                              capsys)
    assert code == 0, err
    doc = load_results(tmp_path / "r.json", kinds=("models",))
    (row,) = doc["models"]
    assert row["mode"] == "compile-only" and row["verified"] and row["verified_layers"] == 2
    assert [r["op"] for r in row["layers"]] == ["conv3x3", "linear"]
    assert row["layers"][0]["fused"] == "relu" and row["max_rel_err"] < 1e-5
    assert (tmp_path / "r.csv").read_text().startswith("model,dtype,sparsity")
    code, out, err = run_main(["model", str(tmp_path / "tiny.onnx"), "--compile-only",
                               "--no-cache", "--no-tuned", "--sparsity", "0.9", "--out",
                               str(tmp_path / "r9.json"), "--no-fuse-depthwise"], capsys)
    assert code == 0, err
    doc = load_results(tmp_path / "r9.json")
    (row,) = doc["models"]
    assert all(abs(r["sparsity"] - 0.9) < 0.02 for r in row["layers"])
    assert doc["options"]["fuse_depthwise"] is False


def test_model_runs_compile_for_dependent_launch_unless_told(tmp_path, capsys):
    """Kernels are compiled for programmatic dependent launch (sm_90, the default arch without
    a GPU) unless run_model / `sparsert model --no-dependent-launch` says otherwise; the row's
    kernel stats count them and the results' options record the choice."""
    from cli_helpers import run_main

    from sparsert_cli.results import load_results
    from sparsert_cli.torch.endtoend import run_model

    for asked, want in ((None, True), (False, False)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1))
        row = run_model("tiny", model, torch.randn(1, 8, 6, 6), sparsity=0.8, dtype="fp32",
                        tuned=False, dry_run=True, verify=False, cache=False, jobs=1,
                        dependent_launch=asked)
        kernels = row["kernels"]
        assert kernels["kernels"] == 2
        assert kernels["dependent_launch"] == (2 if want else 0)
    _tiny_onnx(tmp_path / "tiny.onnx")
    code, _, err = run_main(["model", str(tmp_path / "tiny.onnx"), "--compile-only", "--no-cache",
                             "--no-tuned", "--no-dependent-launch", "--out",
                             str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    doc = load_results(tmp_path / "r.json", kinds=("models",))
    assert doc["models"][0]["options"]["dependent_launch"] is False


def test_builtin_models_build_and_trace():
    from sparsert_cli.models import build

    for name, layers, bns, fused in (("resnet50", 54, 53, 33), ("mobilenet_v1", 28, 27, 27),
                                     ("bert_base", 72, 0, 12)):
        model, x = build(name, resolution=32, tokens=4)
        chains = find_chains(model)
        assert (len(chains), sum(c.bn is not None for c in chains),
                sum(c.activation != "none" for c in chains)) == (layers, bns, fused)
        with torch.no_grad():
            assert torch.isfinite(model(x)).all()
    # BERT: each ffn_up fuses its GELU module and feeds its ffn_down alone
    feeds = {c.layer: c.feeds for c in chains if c.feeds}
    assert feeds == {f"layers.{i}.ffn_up": f"layers.{i}.ffn_down" for i in range(12)}
    assert {c.act_module for c in chains if c.activation == "gelu"} == {
        f"layers.{i}.act" for i in range(12)}


def test_models_rows_feed_the_model_plot():
    from sparsert_cli.plots.data import model_rows
    from sparsert_cli.torch.endtoend import layer_records

    base = {"op": "conv", "shape": "", "sparsity": 0.9, "fused": "", "plan": None,
            "speedup": None, "max_rel_err": None, "reason": ""}
    rows = [{**base, "layer": "a", "replaced": True, "dense_us": 4.0, "sparse_us": 2.0},
            {**base, "layer": "b", "replaced": False, "dense_us": 3.0, "sparse_us": 5.0},
            {**base, "layer": "c", "replaced": False, "dense_us": 1.0, "sparse_us": None}]
    # a sibling run by another layer's kernel has no time of its own (BERT's key and value)
    sibling = {**base, "layer": "d", "replaced": True, "reason": "in a's kernel",
               "dense_us": None, "sparse_us": None}
    doc = {"models": [{"name": "m fp32 S=0.9 b1", "sparsert_us": 8.0,
                       "layers": layer_records(rows + [sibling])}]}
    got = {r["layer"]: (r["engine"], r["us"]) for r in model_rows([("m.json", doc)])["rows"]}
    assert got == {"a": ("sparsert", 2.0), "b": ("dense", 3.0), "c": ("dense", 1.0),
                   "other": ("other", 2.0)}


def test_dry_run_fp16_conv_and_linear():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                          nn.ReLU(), nn.Conv2d(16, 16, 1, stride=2), nn.Flatten(),
                          nn.Linear(16 * 4 * 4, 10)).eval()
    prune_(model, 0.8)
    x = torch.randn(1, 8, 8, 8)
    rows = sparsify_(model.half(), (x.half(),), dtype="fp16", dry_run=True, tuned=False,
                     cache=False)
    assert [r["reason"] for r in rows] == ["dry run: verified"] * 3
    assert all(r["max_rel_err"] < 1e-2 for r in rows) and rows[0]["fused"] == "bn+relu"


def test_residual_rewrite_alone_changes_nothing():
    from sparsert_cli.torch.residual import ResidualChain, fuse_residuals

    model = small_cnn()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        want = model(x).clone()
    assert fuse_residuals(model) == ["3"]
    assert isinstance(model[3].conv2_residual, ResidualChain) and model[3].conv2_residual.bn
    assert not hasattr(model[3], "conv2") and not hasattr(model[3], "bn2")
    with torch.no_grad():
        assert torch.equal(model(x), want)
    assert fuse_residuals(model) == []                   # nothing left to fuse
    chains = {c.layer: c for c in find_chains(model)}
    chain = chains["3.conv2_residual.conv"]
    assert (chain.bn, chain.activation, chain.residual) == ("3.conv2_residual.bn", "relu",
                                                            "3.conv2_residual")


class Bottleneck(nn.Module):
    """torchvision's shape of block: one ReLU module called three times."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + x)


def test_shared_relu_calls_get_their_own_copies():
    from sparsert_cli.torch.residual import unshare_activations

    torch.manual_seed(3)
    model = nn.Sequential(Bottleneck(8), nn.ReLU()).eval()
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        want = model(x).clone()
    assert unshare_activations(model) == ["0"]
    assert {n for n, m in model[0].named_children() if isinstance(m, nn.ReLU)} == {
        "relu", "relu_1", "relu_2"}
    assert model[0].relu is not model[0].relu_1
    with torch.no_grad():
        assert torch.equal(model(x), want)
    assert unshare_activations(model) == []             # nothing shared any more
    chains = {c.layer: c for c in find_chains(model)}
    assert chains["0.conv1"].act_module == "0.relu" and chains["0.conv2"].act_module == "0.relu_1"


def test_sparsify_takes_fused_shared_relus_out_of_the_model():
    torch.manual_seed(4)
    model = nn.Sequential(Bottleneck(8)).eval()
    prune_(model, 0.6)
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        want = model(x).clone()
    rows = _cpu(model, (x,))
    assert [r["fused"] for r in rows] == ["bn+relu", "bn+relu", "bn+add+relu"]
    assert all(r["replaced"] for r in rows), rows
    # every ReLU ran in a kernel's epilogue: none is left as a module of its own
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(x), want, atol=1e-5)


def test_sparsify_takes_a_7x7_stem():
    """ResNet's stem: 7x7, stride 2, padding 3, three input channels, BatchNorm and ReLU."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False),
                          nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 5, padding=2)).eval()
    prune_(model, 0.8)
    x = torch.randn(1, 3, 15, 15)
    with torch.no_grad():
        want = model(x).clone()
    rows = _cpu(model, (x,))
    assert [(r["op"], r["shape"], r["replaced"]) for r in rows] == [
        ("conv7x7", "16x3x7x7 @ 15x15 s2 p3", True), ("conv5x5", "8x16x5x5 @ 8x8 p2", True)]
    assert isinstance(model[0], SparseLayer) and isinstance(model[2], nn.Identity)
    with torch.no_grad():
        assert torch.allclose(model(x), want, atol=1e-4)
    odd = nn.Sequential(nn.Conv2d(3, 4, (3, 5), padding=1)).eval()
    rows = _cpu(odd, (x,), min_sparsity=0.0, dry_run=True)
    assert rows[0]["reason"].startswith("kernel (3, 5)")


def test_sparsified_residual_block_under_compile():
    torch.manual_seed(6)
    block = Block(8).eval()
    prune_(block, 0.6)
    holder = nn.Sequential(block)                 # the root itself is never rewritten
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        want = holder(x).clone()
    rows = _cpu(holder, (x,))
    assert [r["fused"] for r in rows if r["replaced"]] == ["bn+relu", "bn+add+relu"]
    compiled = torch.compile(holder, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), want, atol=1e-5)
        assert torch.allclose(holder(x), want, atol=1e-5)


def test_tune_layer_records_the_winner_where_compile_layer_looks(tmp_path):
    """sparsify_(tune=True) / `sparsert model --tune`: one layer through the tuning jobs (a fake
    GPU timer in a spawned worker), the winner keyed as the public API looks it up."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fake_measure import FakeMeasure

    from sparsert_cli.api import Layer, tuned_params
    from sparsert_cli.torch.backend import tune_layer

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    weight[rng.random(weight.shape) < 0.8] = 0.0
    tuned = tmp_path / "tuned.json"
    entry = tune_layer(weight, op="conv", label="layer1", input_shape=(1, 4, 6, 6), padding=1,
                       epilogue={"activation": "relu"}, tuned=tuned, limit=4,
                       db_path=tmp_path / "db.sqlite", measure=FakeMeasure())
    assert entry["status"] == "ok" and entry["candidates"] == 4
    layer = Layer.of("layer1", weight, op="conv", input_shape=(1, 4, 6, 6), padding=1)
    found = tuned_params(layer.geometry, layer.weight, "fp32", tuned=tuned, gpu_name="Fake GPU")
    assert found is not None and found.name() == entry["best"]
    # a Linear layer (token-major output): the streamed family's candidates, tuned as the same
    # loop with a channel-major output, the winner found for the token-major kernel
    linear = rng.standard_normal((48, 32)).astype(np.float32)
    linear[rng.random(linear.shape) < 0.8] = 0.0
    entry = tune_layer(linear, op="gemm", label="fc", n=10,
                       epilogue={"activation": "relu", "token_major": True}, tuned=tuned,
                       limit=4, db_path=tmp_path / "db.sqlite", measure=FakeMeasure())
    assert entry["status"] == "ok" and entry["candidates"] == 4
    from sparsert_cli.api import plan_for

    fc = Layer.of("fc", linear, op="gemm", n=10, epilogue={"token_major": True})
    plan, was_tuned = plan_for(fc, tuned, "Fake GPU")
    assert was_tuned and plan.params.name() == entry["best"] and plan.family == "streamed"
    assert plan.epilogue.token_major


class Attention(nn.Module):
    """Query, key and value on one input (siblings), then an output projection."""

    def __init__(self, d=24):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.query(x), self.key(x), self.value(x)
        return self.out(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v)


def test_sibling_linears_on_one_input_become_one_kernel():
    from sparsert_cli.torch.sparsify import SiblingHead, SiblingSlice

    torch.manual_seed(3)
    model = Attention().eval()
    prune_(model, 0.7)
    x = torch.randn(1, 6, 24)
    with torch.no_grad():
        want = model(x).clone()
        want_q, want_k = model.query(x).clone(), model.key(x).clone()
    dry = _cpu(model, (x,), dry_run=True)
    by = {r["layer"]: r for r in dry}
    assert by["query"]["shape"] == "72x24, N=6" and by["query"]["siblings"] == ["key", "value"]
    assert by["key"]["reason"] == "with query: dry run: verified" and by["out"]["shape"] == \
        "24x24, N=6"
    rows = _cpu(model, (x,))
    assert [r["replaced"] for r in rows] == [True] * 4
    assert rows[1]["reason"] == "in query's kernel" and rows[1]["plan"] == rows[0]["plan"]
    assert rows[1]["nnz"] == int(torch.count_nonzero(model.key.dense.weight)) < rows[0]["nnz"]
    assert isinstance(model.query, SiblingHead) and model.query.rows == (0, 24)
    assert isinstance(model.value, SiblingSlice) and model.value.rows == (48, 72)
    assert isinstance(model.out, SparseLayer)
    # equal siblings: the kernel writes 3 planes of 6 x 24; each sibling's output is its plane
    # as it is (contiguous, no copy: the three are adjacent in one buffer)
    assert model.query.layer.planes == 24 and model.out.planes == 0
    with torch.no_grad():
        q, k = model.query(x), model.key(x)
        assert q.shape == k.shape == (1, 6, 24) and q.is_contiguous() and k.is_contiguous()
        assert k.data_ptr() == q.data_ptr() + 6 * 24 * q.element_size()
        assert torch.allclose(q, want_q, atol=1e-5) and torch.allclose(k, want_k, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(model(x), want, atol=1e-5)
        # a sibling called on another input than the head's runs its own dense op
        other = torch.randn(1, 6, 24)
        model.query(x)
        assert torch.allclose(model.key(other), model.key.dense(other))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), want, atol=1e-5)
    alone = Attention().eval()
    prune_(alone, 0.7)
    rows = _cpu(alone, (x,), dry_run=True, fuse_siblings=False)
    assert [r["shape"] for r in rows] == ["24x24, N=6"] * 4


class GroupedAttention(nn.Module):
    """Grouped-query attention's projections: query 24 rows, key and value 12 each."""

    def __init__(self, d=24):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, 12), nn.Linear(d, 12)

    def forward(self, x):
        q, k, v = self.query(x), self.key(x), self.value(x)
        return torch.softmax(q[..., :12] @ k.transpose(-1, -2), dim=-1) @ v


class GeluSiblings(nn.Module):
    """Two Linear layers on one input, each followed by its own GELU module (called once)."""

    def __init__(self, d=16):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)
        self.ga, self.gb = nn.GELU(), nn.GELU()

    def forward(self, x):
        return self.ga(self.a(x)) + 2 * self.gb(self.b(x))


def test_siblings_with_a_fused_gelu_stay_apart_so_gelu_applies_once():
    """GELU is not idempotent: stacked siblings would leave their GELU modules in the model
    (applied a second time after the kernel's), so such layers are not grouped; each gets its
    own kernel with GELU fused and its module replaced by Identity."""
    torch.manual_seed(6)
    model = GeluSiblings().eval()
    prune_(model, 0.7)
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        want = model(x).clone()
    rows = _cpu(model, (x,))
    assert [r["replaced"] for r in rows] == [True, True]
    assert all("siblings" not in r and r["fused"] == "gelu" for r in rows)
    assert isinstance(model.ga, nn.Identity) and isinstance(model.gb, nn.Identity)
    with torch.no_grad():
        assert torch.allclose(model(x), want, atol=1e-5)


def test_unequal_siblings_share_a_kernel_without_planes():
    torch.manual_seed(5)
    model = GroupedAttention().eval()
    prune_(model, 0.7)
    x = torch.randn(1, 6, 24)
    with torch.no_grad():
        want, want_v = model(x).clone(), model.value(x).clone()
    rows = _cpu(model, (x,))
    assert rows[0]["siblings"] == ["key", "value"] and rows[0]["shape"] == "48x24, N=6"
    assert model.query.layer.planes == 0
    with torch.no_grad():
        assert torch.allclose(model(x), want, atol=1e-5)
        v = model.value(x)
        assert v.shape == (1, 6, 12) and v.is_contiguous()
        assert torch.allclose(v, want_v, atol=1e-5)


class FFN(nn.Module):
    """BERT's feed-forward block: up, a GELU module, down; the residual add and LayerNorm."""

    def __init__(self, d=16, hidden=48):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.down(self.act(self.up(x))))


class FunctionalGelu(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.up, self.down = nn.Linear(d, 32), nn.Linear(32, d)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


class SharedGelu(nn.Module):
    """One GELU module called twice: not fused (GELU applied twice is not GELU)."""

    def __init__(self, d=16):
        super().__init__()
        self.a, self.b, self.act = nn.Linear(d, d), nn.Linear(d, d), nn.GELU()

    def forward(self, x):
        return self.act(self.b(self.act(self.a(x))))


class TwoUsers(nn.Module):
    """up's output feeds down and the residual add: it stays token-major."""

    def __init__(self, d=16):
        super().__init__()
        self.up, self.down = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = self.up(x)
        return self.down(h) + h


def test_a_gelu_module_is_fused_and_a_functional_or_shared_one_is_not():
    torch.manual_seed(6)
    x = torch.randn(2, 5, 16)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8),
                          nn.GELU(approximate="tanh")).eval()
    prune_(model, 0.7)
    with torch.no_grad():
        want = model(x).clone()
    rows = _cpu(model, (x,))
    assert [r["fused"] for r in rows] == ["gelu", ""] and all(r["replaced"] for r in rows)
    assert isinstance(model[1], nn.Identity) and model[0].activation == "gelu"
    assert isinstance(model[3], nn.GELU)        # the tanh approximation is no kernel's
    with torch.no_grad():
        assert torch.allclose(model(x), want, atol=1e-5, rtol=1e-5)
    for net, fused in ((FunctionalGelu(), ["", ""]), (SharedGelu(), ["", ""])):
        net.eval()
        prune_(net, 0.7)
        with torch.no_grad():
            want = net(x).clone()
        rows = _cpu(net, (x,))
        assert [r["fused"] for r in rows] == fused and all(r["replaced"] for r in rows)
        assert all(layer.activation == "none" for layer in net.modules()
                   if isinstance(layer, SparseLayer))
        assert "layout" not in rows[0]          # a kept GELU is a kernel between: no hand-off
        with torch.no_grad():
            assert torch.allclose(net(x), want, atol=1e-5, rtol=1e-5)
    assert isinstance(net.act, nn.GELU)


def _compiled_graphs(model, x):
    """model(x) under torch.compile(fullgraph=True) through AOTAutograd, and the aten graphs it
    ran (as aot_eager does)."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=keep), fullgraph=True)
    with torch.no_grad():
        out = compiled(x)
    return out, graphs


def test_linear_hands_its_output_channel_major_to_the_linear_it_feeds_alone():
    """BERT's FFN: up (+ GELU) writes M x N, returned as a transposed view, which down reads as
    its K x N columns as it is: no transpose copy between the two kernels, in eager mode and
    under torch.compile; verified against float64 like any layer."""
    torch.manual_seed(7)
    model = FFN().eval()
    prune_(model, 0.7)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        want = model(x).clone()
        want_up = torch.nn.functional.gelu(model.up(x)).clone()
    rows = _cpu(model, (x,))
    by = {r["layer"]: r for r in rows}
    assert by["up"]["fused"] == "gelu" and by["up"]["layout"] == "channel-major (feeds down)"
    assert by["up"]["replaced"] and by["down"]["replaced"] and "layout" not in by["down"]
    assert by["up"]["max_rel_err"] < 1e-5          # check.verify read the view
    assert model.up.feeds == "down" and not model.up.token_major and model.down.token_major
    assert isinstance(model.act, nn.Identity)
    with torch.no_grad():
        h = model.up(x)
        assert h.shape == (2, 5, 48) and not h.is_contiguous() and h.stride() == (5, 1, 10)
        assert torch.allclose(h, want_up, atol=1e-5, rtol=1e-5)
        columns = h.reshape(-1, 48).t()
        assert columns.is_contiguous() and columns.contiguous().data_ptr() == h.data_ptr()
        assert torch.allclose(model(x), want, atol=1e-5, rtol=1e-5)
    out, graphs = _compiled_graphs(model, x)
    assert torch.allclose(out, want, atol=1e-5, rtol=1e-5)
    copies = [n for g in graphs for n in g.graph.nodes
              if n.op == "call_function" and ("clone" in str(n.target) or "copy" in str(n.target))]
    assert len(copies) == 1              # x's transpose for up; none between up and down
    with torch.no_grad():
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert torch.allclose(compiled(x), want, atol=1e-5, rtol=1e-5)
    # the dense op of `down` (a kept layer) reads the view too
    with torch.no_grad():
        assert torch.allclose(model.down.dense(h), torch.nn.functional.linear(
            h.contiguous(), model.down.weight, model.down.bias), atol=1e-6)


def test_a_linear_output_with_two_users_or_feeding_no_kernel_stays_token_major():
    torch.manual_seed(8)
    x = torch.randn(2, 5, 16)
    model = TwoUsers().eval()
    prune_(model, 0.7)
    with torch.no_grad():
        want = model(x).clone()
    rows = _cpu(model, (x,))
    assert all(r["replaced"] for r in rows) and not any("layout" in r for r in rows)
    assert model.up.token_major and model.up.feeds is None and model.up(x).is_contiguous()
    with torch.no_grad():
        assert torch.allclose(model(x), want, atol=1e-5, rtol=1e-5)
    # down left dense (include leaves it out): up is built token-major
    ffn = FFN().eval()
    prune_(ffn, 0.7)
    rows = _cpu(ffn, (x,), include=lambda name, module: name == "up")
    assert [r["layer"] for r in rows] == ["up"] and "layout" not in rows[0]
    assert ffn.up.token_major and ffn.up.feeds is None


class LaunchNet(nn.Module):
    """conv+BN+ReLU, conv (its functional ReLU stays in the model), max pool, conv, conv."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.c, self.d = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.d(self.c(self.pool(torch.relu(self.b(self.a(x))))).flatten(2).view(
            1, 8, 3, 3))


def test_dependent_launch_is_kept_only_after_our_own_kernels():
    """The launch order sparsify_ reads after its swaps: a kernel keeps programmatic dependent
    launch only when the launch before it is one of our kernels (views launch nothing; a plane
    of stacked siblings launches nothing; a Linear layer's input transpose is a copy)."""
    from sparsert_cli.torch.sparsify import _launch_order, _plain_launches

    torch.manual_seed(0)
    net = LaunchNet().eval()
    prune_(net, 0.8)
    _cpu(net, (torch.randn(1, 8, 6, 6),))
    order = _launch_order(net)
    assert [(layer is not None, ends, handed) for layer, ends, handed in order] == [
        (True, True, False), (True, True, False), (False, False, False), (False, False, False),
        (True, True, False), (True, True, False)]
    assert _plain_launches(order) == {net.a[0].kernel_id, net.c.kernel_id}
    attention = Attention().eval()
    prune_(attention, 0.7)
    _cpu(attention, (torch.randn(1, 6, 24),))
    order = _launch_order(attention)
    # the head's kernel; key and value: planes (nothing); two matmuls and softmax; out
    assert [layer is not None for layer, _, _ in order] == [True, False, False, False, True]
    assert _plain_launches(order) == {attention.query.layer.kernel_id, attention.out.kernel_id}
    # a Linear layer handed its input channel-major (no transpose copy) keeps it: BERT's
    # ffn_down (its residual add fused) after ffn_up (the Identity left by the GELU launches
    # nothing); after the LayerNorm, a Linear layer whose input is a copy does not
    ffn = nn.Sequential(FFN(), nn.Linear(16, 16)).eval()
    prune_(ffn, 0.7)
    _cpu(ffn, (torch.randn(2, 5, 16),))
    order = _launch_order(ffn)
    up, down, last = ffn[0].up, ffn[0].down_residual.sparse, ffn[1]
    assert up.feeds == "0.down_residual.conv" and down.residual
    assert [(layer, handed) for layer, _, handed in order] == [
        (up, False), (down, True), (None, False), (last, False)]
    assert _plain_launches(order) == {up.kernel_id, last.kernel_id}
    down.feeds = None          # (as if the two were not handed over: the copy is back)
    up.feeds = None
    assert _plain_launches(_launch_order(ffn)) == {up.kernel_id, down.kernel_id,
                                                   last.kernel_id}


class CrossAttention(nn.Module):
    """Keys and values from `memory` when given, else from x (self-attention)."""

    def __init__(self, d=16):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, memory=None):
        source = x if memory is None else memory
        q, k, v = self.query(x), self.key(source), self.value(source)
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


class Mutating(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        y = self.a(x)
        x.mul_(2)
        return y + self.b(x)


def test_siblings_follow_the_inputs_they_are_called_on():
    """Recorded as self-attention, called as cross-attention: key and value run on their own
    input in eager mode and under torch.compile; a sibling whose input changed in place since
    the head ran is no sibling; Linear outputs are contiguous, as nn.Linear's."""
    torch.manual_seed(4)
    model = CrossAttention().eval()
    prune_(model, 0.7)
    x, memory = torch.randn(1, 5, 16), torch.randn(1, 7, 16)
    with torch.no_grad():
        want_self, want_cross = model(x).clone(), model(x, memory).clone()
    rows = _cpu(model, (x,))
    assert rows[0]["siblings"] == ["key", "value"]
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for run in (model, compiled):
            assert torch.allclose(run(x), want_self, atol=1e-5)
            assert torch.allclose(run(x, memory), want_cross, atol=1e-5)
        assert model.query(x).is_contiguous() and model.key(x).is_contiguous()
        assert model.query(x).view(1, -1).shape == (1, 80)
    mutating = Mutating().eval()
    prune_(mutating, 0.7)
    with torch.no_grad():
        want = mutating(x.clone())
    rows = _cpu(mutating, (x.clone(),))
    assert "siblings" not in rows[0] and rows[1]["reason"] == "replaced"
    with torch.no_grad():
        assert torch.allclose(mutating(x.clone()), want, atol=1e-5)


@pytest.mark.parametrize("kernel,stride,groups,residual,activation", [
    (1, 1, 1, False, "relu"), (1, 1, 1, True, "relu"), (1, 2, 1, False, "none"),
    (3, 1, 1, True, "relu6"), (3, 2, 1, False, "relu"), (3, 1, 8, False, "relu6")])
def test_folded_dense_forms_compute_the_chain(kernel, stride, groups, residual, activation):
    """The dense op a raced layer keeps when its kernel loses (GPU: sparsify_ swaps in the
    fastest): BatchNorm folded, residual add and activation after it, as conv2d and, for a
    stride-1 1x1 convolution, as one batched GEMM; every form equals conv -> BatchNorm -> add ->
    activation in eval mode."""
    from sparsert_cli.torch.sparsify import FoldedDense, folded_dense_forms

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8 if groups > 1 else 12, kernel, stride, kernel // 2,
                           groups=groups, bias=False)
    bn = torch.nn.BatchNorm2d(conv.out_channels)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    conv.eval(), bn.eval()
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        ref = bn(conv(x))
        res = torch.randn_like(ref) if residual else None
        ref = ref + res if residual else ref
        ref = {"relu": torch.relu, "relu6": torch.nn.functional.relu6}.get(
            activation, lambda t: t)(ref)
        weight, bias = folded(conv, bn)
        layer = SparseLayer(0, "conv", weight, bias, activation, stride, kernel // 2,
                            tuple(x.shape), residual=residual, groups=groups)
        forms = folded_dense_forms(layer)
        gemm = kernel == 1 and stride == 1 and groups == 1
        assert [f.gemm for f in forms] == ([False, True] if gemm else [False])
        assert all(isinstance(f, FoldedDense) for f in forms)
        for form in forms:
            out = form(x, res) if residual else form(x)
            assert out.shape == ref.shape and out.is_contiguous()
            assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5), form


def test_folded_dense_linear_and_under_compile():
    """A Linear layer's folded form is F.linear; the GEMM form traces under
    torch.compile(fullgraph=True) (a kept layer sits in a compiled sparse model)."""
    from sparsert_cli.torch.sparsify import FoldedDense

    torch.manual_seed(1)
    lin = torch.nn.Linear(16, 24)
    x = torch.randn(3, 5, 16)
    form = FoldedDense(lin.weight.detach(), lin.bias.detach(), "relu", kind="linear")
    with torch.no_grad():
        assert torch.allclose(form(x), torch.relu(lin(x)), atol=1e-6)
        gemm = FoldedDense(torch.randn(12, 8, 1, 1), torch.randn(12), "none", gemm=True)
        y = torch.randn(2, 8, 4, 4)
        compiled = torch.compile(gemm, fullgraph=True, backend="eager")
        assert torch.allclose(compiled(y), gemm(y), atol=1e-6)
        assert torch.allclose(gemm(y), torch.nn.functional.conv2d(
            y, gemm.weight.view(12, 8, 1, 1), gemm.bias), atol=1e-5)


class _CompiledForm:
    """A compiled dense form as _race_on_cpu makes it (torch.compile, eager backend)."""

    def __init__(self, form):
        self.fn = torch.compile(form, backend="eager", fullgraph=True)

    def __call__(self, *args):
        return self.fn(*args)


def _race_on_cpu(monkeypatch, times, compile_fails=False):
    """_sparsify with the GPU race forced on the CPU: kernels run the plan interpreter, timings
    come from `times(fn)`, and compiled forms are torch.compile(backend="eager")."""
    from sparsert_cli.torch import sparsify as S

    check = S._check_layer

    def on_gpu(*args, **kwargs):
        args = list(args)
        args[9] = True                          # on_gpu: race and swap
        return check(*args, **kwargs)

    def compiled(form):
        if compile_fails:
            def broken(*a):
                raise RuntimeError("inductor said no")
            return broken
        return _CompiledForm(form)

    monkeypatch.setattr(S, "_check_layer", on_gpu)
    monkeypatch.setattr(S, "time_cold_us", lambda fn, inputs, samples=15: times(fn))
    monkeypatch.setattr(S, "_compiled", compiled)
    return S


@pytest.mark.parametrize("compiled", [False, True])
def test_the_race_keeps_the_fastest_uncompiled_dense_form(monkeypatch, compiled):
    """Kernels that lose keep the dense op, as its fastest uncompiled form (the 1x1 GEMM form
    here, conv2d for 3x3 layers), swapped in for conv, BatchNorm, add and activation: the model
    computes what it did. With compiled_dense a faster compiled form wins the race (the row
    says so) but the model holds the uncompiled form (a compiled model compiles it)."""
    from sparsert_cli.models import Bottleneck
    from sparsert_cli.torch.sparsify import FoldedDense, SparseLayer

    def times(fn):
        if isinstance(fn, _CompiledForm):
            return 0.2
        if isinstance(fn, FoldedDense):
            return 0.5 if fn.gemm else 1.0
        return 100.0 if isinstance(fn, SparseLayer) else 10.0

    S = _race_on_cpu(monkeypatch, times)
    torch.manual_seed(0)
    block = nn.Sequential(Bottleneck(64, 16), Bottleneck(64, 16))
    for bn in (m for m in block.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    prune_(block, 0.9)
    block.eval()
    x = torch.randn(2, 64, 6, 6)
    with torch.no_grad():
        want = block(x).clone()
    rows = S._sparsify(block, (x,), dtype="fp32", tuned=False, verify=True, min_speedup=1.0,
                       min_sparsity=0.5, dry_run=False, arch=None, cache=False, include=None,
                       device=torch.device("cpu"), compiled_dense=compiled)
    assert len(rows) == 6 and not any(r["replaced"] for r in rows)
    kept = [m for m in block.modules() if isinstance(m, FoldedDense)]
    assert len(kept) == 6
    from sparsert_cli.torch.residual import ResidualChain

    chains = [m for m in block.modules() if isinstance(m, ResidualChain)]
    assert len(chains) == 2 and all(isinstance(c.sparse, FoldedDense) for c in chains)
    for r in rows:
        one = r["op"] == "conv1x1"
        assert r["dense_form"] == ("folded compiled" if compiled
                                   else "folded gemm" if one else "folded")
        assert r["reason"].endswith(f"kept as the {'folded gemm' if one else 'folded'} dense op")
        assert r["dense_us"] == (0.2 if compiled else 0.5 if one else 1.0)
    assert sorted(m.gemm for m in kept) == [False, False, True, True, True, True]
    with torch.no_grad():
        assert torch.allclose(block(x), want, atol=1e-5, rtol=1e-5)


def test_a_dense_form_that_fails_to_compile_is_skipped_and_said(monkeypatch):
    from sparsert_cli.torch.sparsify import FoldedDense, SparseLayer

    def times(fn):
        if isinstance(fn, FoldedDense):
            return 1.0
        if isinstance(fn, SparseLayer):
            return 0.5
        if getattr(fn, "__name__", "") == "broken":
            fn()                                   # what time_cold_us would hit
        return 10.0

    S = _race_on_cpu(monkeypatch, times, compile_fails=True)
    model = small_cnn()
    prune_(model, 0.9)
    x = torch.randn(2, 3, 10, 10)
    rows = S._sparsify(model, (x,), dtype="fp32", tuned=False, verify=True, min_speedup=1.0,
                       min_sparsity=0.5, dry_run=False, arch=None, cache=False, include=None,
                       device=torch.device("cpu"), compiled_dense=True)
    raced = [r for r in rows if "dense_form" in r]
    assert raced and all(r["replaced"] for r in raced)
    assert all(r["dense_compile_failed"] == "RuntimeError: inductor said no" for r in raced)
    assert all(r["dense_us"] == 1.0 and r["dense_form"].startswith("folded") for r in raced)


def test_folded_dense_gemm_form_refuses_other_convolutions():
    from sparsert_cli.torch.sparsify import FoldedDense

    with pytest.raises(ValueError, match="stride-1, unpadded, ungrouped 1x1"):
        FoldedDense(torch.randn(8, 4, 1, 1), None, "none", stride=2, gemm=True)
    with pytest.raises(ValueError, match="1x1"):
        FoldedDense(torch.randn(8, 4, 3, 3), None, "none", padding=1, gemm=True)


def test_the_timer_gate_sleeps_longer_until_the_host_has_queued_everything(monkeypatch):
    """check.gated queues a timer's samples behind a GPU sleep; if the GPU woke before the last
    sample was queued (host time would fall between events), it sleeps 4x longer and queues
    them again; without torch.cuda._sleep the samples are queued ungated."""
    from sparsert_cli.torch import check

    slept, queued = [], []
    woke_early = iter([True, True, False])

    order = []

    class Event:
        def record(self):
            order.append("gate")

        def query(self):
            return next(woke_early)

    monkeypatch.setattr(torch.cuda, "_sleep", lambda c: slept.append(c) or order.append("sleep"),
                        raising=False)
    monkeypatch.setattr(torch.cuda, "Event", lambda *a, **k: Event())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    assert check.gated(lambda: queued.append(len(queued)) or order.append("queue")
                       or "pairs") == "pairs"
    assert order == ["sleep", "gate", "queue"] * 3
    assert slept == [check.GATE_CYCLES, 4 * check.GATE_CYCLES, 16 * check.GATE_CYCLES]
    assert queued == [0, 1, 2]
    woke_early = iter([True] * 10)       # never late enough: the last try's samples are kept
    slept.clear()
    with pytest.warns(RuntimeWarning, match="may include host delay"):
        assert check.gated(lambda: "last") == "last"
    assert len(slept) == check._GATE_TRIES
    monkeypatch.delattr(torch.cuda, "_sleep")
    slept.clear()
    assert check.gated(lambda: "ungated") == "ungated" and not slept


def test_timed_replays_refresh_then_replay_between_events(monkeypatch):
    """The timers' sample: before() (eviction, input copies), start event, replay, end event."""
    from sparsert_cli.torch import check

    log = []

    class Event:
        def __init__(self, *a, **k):
            pass

        def record(self):
            log.append("event")

    class Graph:
        def replay(self):
            log.append("replay")

    monkeypatch.setattr(torch.cuda, "Event", Event)
    pairs = check._replays(Graph(), 2, lambda: log.append("before"))
    assert len(pairs) == 2 and all(len(p) == 2 for p in pairs)
    assert log == ["before", "event", "replay", "event"] * 2
    log.clear()
    check._replays(Graph(), 1)
    assert log == ["event", "replay", "event"]


def test_a_layer_whose_tuning_finds_nothing_warns_and_keeps_its_default_plan(monkeypatch):
    from sparsert_cli.torch import sparsify as sparsify_module

    calls = []

    def no_winner(weight, **options):
        calls.append(options["epilogue"])
        return {"status": "no candidate verified", "candidates": 0}

    monkeypatch.setattr(sparsify_module, "tune_layer", no_winner)
    model = nn.Sequential(nn.Linear(32, 48)).eval()
    prune_(model, 0.8)
    x = torch.randn(5, 32)
    with pytest.warns(UserWarning, match="tuning 0: no candidate verified; its default plan"):
        rows = _cpu(model, (x,), tune=True)
    assert rows[0]["replaced"] and calls[0]["token_major"]


class Broadcast(nn.Module):
    """A Linear layer whose output gets a broadcast (M,) add: not a residual the kernel reads."""

    def __init__(self, d=16):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x, shift):
        return self.fc(x) + shift


def test_linear_residual_adds_are_fused_into_their_kernels():
    """A BERT encoder layer (not the root: the root is never rewritten): the attention output
    and FFN down kernels add their residual (the LayerNorm's input) in the epilogue, FFN up
    still hands FFN down its output channel-major, and the model computes what it did, eagerly
    and under torch.compile, with no add left in its graph."""
    from sparsert_cli.models import EncoderLayer
    from sparsert_cli.torch.residual import ResidualChain
    from sparsert_cli.torch.sparsify import _launch_order, _plain_launches

    torch.manual_seed(11)
    model = nn.Sequential(EncoderLayer(hidden=16, heads=2, ffn=48)).eval()
    x = torch.randn(1, 6, 16)
    rows, want = _sparsified(model, (x,))
    rows = {r["layer"]: r for r in rows}
    assert all(r["replaced"] for r in rows.values()), rows
    for name in ("0.attn_out_residual.conv", "0.ffn_down_residual.conv"):
        assert rows[name]["fused"] == "add" and rows[name]["max_rel_err"] < 1e-5
    assert rows["0.ffn_up"]["layout"] == "channel-major (feeds 0.ffn_down_residual.conv)"
    layer = model[0]
    assert isinstance(layer.attn_out_residual, ResidualChain)
    down = layer.ffn_down_residual.sparse
    assert down.residual and down.token_major and not hasattr(layer, "ffn_down")
    adds = [n for n in layer.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert adds == []
    # FFN down, handed its input, keeps dependent launch; attention output (after attention)
    # and the stacked query/key/value kernel (after a LayerNorm or the input) launch plainly
    order = _launch_order(model)
    assert _plain_launches(order) == {layer.query.layer.kernel_id,
                                      layer.attn_out_residual.sparse.kernel_id,
                                      layer.ffn_up.kernel_id}
    out, _ = _compiled_graphs(model, x)
    assert torch.allclose(out, want, atol=1e-5, rtol=1e-5)


def test_a_broadcast_add_after_a_linear_layer_keeps_the_layer_dense_and_says_why():
    torch.manual_seed(12)
    x, shift = torch.randn(2, 5, 16), torch.randn(16)

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Broadcast()

        def forward(self, x, shift):
            return self.block(x, shift)

    root = Root().eval()
    prune_(root, 0.7)
    with torch.no_grad():
        want = root(x, shift).clone()
    rows = _cpu(root, (x, shift))
    assert [r["layer"] for r in rows] == ["block.fc_residual.conv"]
    assert not rows[0]["replaced"] and "broadcast add stays dense" in rows[0]["reason"]
    with torch.no_grad():
        assert torch.equal(root(x, shift), want)


def test_the_linear_reference_includes_the_residual(monkeypatch):
    """check.verify compares a Linear kernel with a residual against float64 with that
    residual: a kernel that dropped it fails."""
    from sparsert_cli.torch.check import verify

    torch.manual_seed(13)
    model = nn.Sequential(EncoderBlockLite()).eval()
    prune_(model, 0.7)
    x = torch.randn(1, 4, 16)
    _cpu(model, (x,))
    layer = model[0].fc_residual.sparse
    res = torch.randn(1, 4, 16)
    assert verify(layer, x, res, "fp32")["ok"]
    run = layer.run
    monkeypatch.setattr(layer, "run", lambda x, residual: run(x, torch.zeros_like(residual)))
    result = verify(layer, x, res, "fp32")
    assert not result["ok"] and "off" in result["message"]


class EncoderBlockLite(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.fc, self.norm = nn.Linear(d, d), nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.fc(x))


class SelfOutput(nn.Module):
    """HF BERT's BertSelfOutput: dense, dropout, then LayerNorm of the sum with the input."""

    def __init__(self, d=16):
        super().__init__()
        self.dense, self.dropout, self.norm = nn.Linear(d, d), nn.Dropout(0.1), nn.LayerNorm(d)

    def forward(self, hidden, input_tensor):
        return self.norm(self.dropout(self.dense(hidden)) + input_tensor)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.out = SelfOutput()

    def forward(self, hidden, input_tensor):
        return self.out(hidden, input_tensor)


def test_a_dropout_between_the_linear_layer_and_its_residual_add_is_stepped_over():
    """In eval mode the dropout is the identity: the add is fused all the same; the rewritten
    chain keeps the dropout for its own (unfused) forward."""
    from sparsert_cli.torch.residual import ResidualChain

    torch.manual_seed(14)
    model = TwoInputs().eval()
    hidden, skip = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    rows, want = _sparsified(model, (hidden, skip))
    assert [(r["layer"], r["fused"], r["replaced"]) for r in rows] == [
        ("out.dense_residual.conv", "add", True)]
    chain = model.out.dense_residual
    assert isinstance(chain, ResidualChain) and isinstance(chain.dropout, nn.Dropout)
    with torch.no_grad():
        chain.sparse = None                       # the chain's own forward: the same numbers
        assert torch.allclose(model(hidden, skip), want, atol=1e-6, rtol=1e-6)


class Embeddings(nn.Module):
    """MobileBERT's embeddings, reduced: a forward testing an optional argument (`is None` is
    not traced: tracing takes the branch of a call that passes it), then Linear + add."""

    def __init__(self, d=16):
        super().__init__()
        self.word, self.proj, self.pos = nn.Embedding(50, d), nn.Linear(d, d), nn.Embedding(8, d)

    def forward(self, input_ids=None, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.word(input_ids)
        positions = torch.arange(inputs_embeds.shape[1])
        return self.proj(inputs_embeds) + self.pos(positions)


class Masked(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.fc, self.heads = nn.Linear(d, d), 2

    def forward(self, x, mask=None):
        h = x if mask is None else x * mask
        return x + self.fc(h)


def test_a_forward_that_tests_an_optional_argument_is_not_rewritten():
    """fuse_residuals used to rewrite only modules with Conv2d children; with Linear children a
    transformer module whose forward tests `mask is None` / `inputs_embeds is None` was traced
    with the argument given, and the model then failed when called without it."""

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.block = Embeddings(), Masked()

        def forward(self, ids):
            return self.block(self.emb(input_ids=ids))

    torch.manual_seed(15)
    root = Root().eval()
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.rand(2, 6, 16)
    prune_(root, 0.7)
    with torch.no_grad():
        masked = root.block(root(ids), mask).clone()
    rows, want = _sparsified(root, (ids,))
    assert all(not r["fused"].startswith("add") for r in rows), rows
    with torch.no_grad():
        assert torch.allclose(root.block(want, mask), masked, atol=1e-5, rtol=1e-5)


def test_a_rewritten_module_keeps_its_plain_attributes():
    """The GraphModule put in a rewritten module's place keeps what its parent may read."""

    class Block(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.fc, self.heads = nn.Linear(d, d), 2

        def forward(self, x):
            return x + self.fc(x)

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(x) * self.block.heads

    torch.manual_seed(16)
    rows, _ = _sparsified(Root().eval(), (torch.randn(2, 3, 16),))
    assert rows[0]["fused"] == "add" and rows[0]["replaced"]


class PositionBias(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.pos = nn.Parameter(torch.randn(5, d))

    def forward(self, x):
        return self.fc(x) + self.pos


def test_a_parameter_added_after_a_linear_layer_is_not_a_residual():
    """`fc(x) + self.pos` keeps its add (a parameter is a constant, and a trainable one would
    make the kernel's residual require grad): the layer is replaced alone, and the model runs
    with grad enabled as the dense one did."""
    torch.manual_seed(17)
    root = nn.Sequential(PositionBias()).eval()
    prune_(root, 0.7)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        want = root(x).clone()
    rows = _cpu(root, (x,))
    assert [(r["layer"], r["fused"], r["replaced"]) for r in rows] == [("0.fc", "", True)]
    assert torch.allclose(root(x), want, atol=1e-5, rtol=1e-5)      # grad enabled: no error


class GELUActivation(nn.Module):
    """Hugging Face's exact GELU module, as transformers.activations defines it (F.gelu)."""

    def __init__(self):
        super().__init__()
        self.act = torch.nn.functional.gelu

    def forward(self, x):
        return self.act(x)


class Intermediate(nn.Module):
    def __init__(self, d=16, hidden=48, act=None):
        super().__init__()
        self.dense, self.act = nn.Linear(d, hidden), act if act is not None else GELUActivation()

    def forward(self, x):
        return self.act(self.dense(x))


class Gated(nn.Module):
    """A part whose forward has a defaulted argument (and tests it): not read by tracing."""

    def __init__(self, d=48):
        super().__init__()
        self.fc, self.act = nn.Linear(d, d), nn.ReLU()

    def forward(self, x, gate=None):
        y = self.fc(x)
        return self.act(y) if gate is not None else y


class Untraceable(nn.Module):
    """Data-dependent control flow at the root (as Hugging Face models have): torch.fx cannot
    trace it whole, so its parts are read one by one."""

    def __init__(self, shared_act=False):
        super().__init__()
        act = GELUActivation()
        self.inter = Intermediate(act=act)
        self.gated = Gated()
        self.other = Intermediate(d=48, hidden=48, act=act if shared_act else None)

    def forward(self, x):
        h = self.inter(x)
        if float(h.sum()) > 1e9:        # never true; fx cannot trace a tensor's value
            h = -h
        return self.other(self.gated(h))


def test_a_model_that_does_not_trace_is_read_by_its_parts():
    """Hugging Face-style: the root does not trace, each part that does is read as a traced
    model: GELUActivation (matched by name) is fused with its Linear layer and leaves the
    model; a part testing a defaulted argument keeps its activation; an activation module
    shared by two parts is fused into neither."""
    torch.manual_seed(18)
    x = torch.randn(2, 5, 16)
    for shared in (False, True):
        model = Untraceable(shared_act=shared).eval()
        chains = {c.layer: c for c in find_chains(model)}
        assert set(chains) == {"inter.dense", "gated.fc", "other.dense"}
        assert chains["gated.fc"].activation == "none"
        for name in ("inter", "other"):
            chain = chains[f"{name}.dense"]
            assert (chain.activation, chain.act_module) == (
                ("none", None) if shared else ("gelu", f"{name}.act"))
        rows = {r["layer"]: r for r in _sparsified(model, (x,))[0]}
        assert all(r["replaced"] for r in rows.values())
        assert rows["inter.dense"]["fused"] == ("" if shared else "gelu")
        assert isinstance(model.inter.act, nn.Identity) is not shared


class SkipUnlessGated(nn.Module):
    """`fc(x) + x` unless a gate is given: `gate is None` leaves no node in a traced graph."""

    def __init__(self, d=16):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x, gate=None):
        y = self.fc(x)
        return y + x if gate is None else y


def test_a_forward_with_a_defaulted_argument_is_never_rewritten():
    from sparsert_cli.torch.residual import fuse_residuals

    torch.manual_seed(19)
    model = nn.Sequential(SkipUnlessGated()).eval()
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        want = model[0](x, gate=torch.ones(1)).clone()
    assert fuse_residuals(model) == []
    with torch.no_grad():
        assert torch.equal(model[0](x, gate=torch.ones(1)), want)


def test_the_readme_pytorch_example_runs_as_written(isolated_cache):
    """README, "Your own PyTorch model": the CPU dry run, exactly as printed there."""
    import re

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("**Your own PyTorch model.**", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    rows = scope["rows"]
    assert [(r["layer"], r["fused"], r["reason"]) for r in rows] == [
        (f"{i}.{name}", fused, "dry run: verified") for i in (0, 1)
        for name, fused in (("up", "gelu"), ("down_residual.conv", "add"))]


class ParentCallsPartsAct(nn.Module):
    """The root (untraceable) calls its part's activation module directly: reading the part
    alone sees one call of `block.act`, the model makes two."""

    def __init__(self):
        super().__init__()
        self.block, self.head = Intermediate(d=16, hidden=16), nn.Linear(16, 16)

    def forward(self, x):
        h = self.block(x)
        if float(h.sum()) > 1e9:        # never true; fx cannot trace a tensor's value
            h = -h
        return self.block.act(self.head(h))


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x))


class ParentCallsPartsBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.conv2 = ConvBN(), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        h = self.block(x)
        if float(h.sum()) > 1e9:
            h = -h
        return self.block.bn(self.conv2(h))


@pytest.mark.parametrize("make,x", [(ParentCallsPartsAct, (2, 5, 16)),
                                    (ParentCallsPartsBN, (2, 8, 4, 4))])
def test_a_parts_module_called_from_outside_the_part_is_not_absorbed(make, x):
    torch.manual_seed(20)
    model, x = make().eval(), torch.randn(*x)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    rows, _ = _sparsified(model, (x,), sparsity=0.8)
    assert all(r["replaced"] for r in rows)
    assert all(r["fused"] == "" for r in rows)      # block.act / block.bn stay in the model


class MaskWithoutDefault(nn.Module):
    """`mask` has no default but may be None: tracing takes the `is not None` branch."""

    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(16, 16), nn.GELU()

    def forward(self, x, mask):
        if mask is None:
            return self.act(self.fc(x) * 2)
        return self.act(self.fc(x)) * mask


class HoldsMaskWithoutDefault(nn.Module):
    def __init__(self):
        super().__init__()
        self.part = MaskWithoutDefault()

    def forward(self, x, mask=None):
        h = self.part(x, mask)
        if float(h.sum()) > 1e9:
            h = -h
        return h


@pytest.mark.xfail(strict=True, reason="not fixed: a part testing `arg is None` on an argument "
                   "without a default is read from the branch the trace takes")
def test_a_part_testing_an_argument_without_default_for_none():
    torch.manual_seed(21)
    model, x = HoldsMaskWithoutDefault().eval(), torch.randn(2, 5, 16)
    prune_(model, 0.8)
    with torch.no_grad():
        want = model(x).clone()
    _cpu(model, (x, torch.ones(16)))            # sparsified with a mask, called without
    with torch.no_grad():
        assert torch.allclose(model(x), want, atol=1e-5, rtol=1e-5)


class FFNOutput(nn.Module):
    """HF BERT's BertOutput, reduced: dense, dropout, LayerNorm of the sum with the input."""

    def __init__(self, hidden=48, d=16):
        super().__init__()
        self.dense, self.dropout, self.norm = nn.Linear(hidden, d), nn.Dropout(0.1), nn.LayerNorm(d)

    def forward(self, h, input_tensor):
        return self.norm(self.dropout(self.dense(h)) + input_tensor)


class PartsFFN(nn.Module):
    """HF BERT's feed-forward as its parts hold it: Intermediate (Linear + GELUActivation) and
    FFNOutput are separate modules, called by a root torch.fx cannot trace (a tensor's value in
    an `if`). `leak` gives the intermediate output another reader: "call" (a torch call),
    "return" (the forward returns it too), "attr" (a module keeps it); "meta" only reads its
    shape and dtype (not a use of its values)."""

    def __init__(self, leak=None):
        super().__init__()
        self.intermediate, self.output, self.leak = Intermediate(), FFNOutput(), leak
        self.kept = None

    def forward(self, x):
        if float(x.sum()) > 1e9:        # never true; fx cannot trace a tensor's value
            x = -x
        h = self.intermediate(x)
        if self.leak == "meta":
            assert h.shape[-1] == 48 and h.dtype == x.dtype and h.dim() == 3
        y = self.output(h, x)
        if self.leak == "attr":
            self.kept = h
        return y + h[..., :16] if self.leak == "call" else (y, h) if self.leak == "return" else y


def test_a_model_read_by_parts_hands_the_ffn_over_as_the_example_forward_shows():
    """The FFN's two Linear layers sit in different parts, so no traced graph links them; the
    recording forward does: the intermediate output (after the fused GELU) went to the output
    part's Linear layer and to no other torch call, so it is handed over channel-major (no
    transpose copy). Read elsewhere too (`leak`: by a torch call, returned, or kept by a module),
    it stays token-major; reading its shape and dtype is no such read."""
    torch.manual_seed(21)
    x = torch.randn(1, 5, 16)
    model = PartsFFN(leak="meta").eval()
    prune_(model, 0.7)
    rows, want = _sparsified(model, (x,))
    by = {r["layer"]: r for r in rows}
    reader = "output.dense_residual.conv"
    assert set(by) == {"intermediate.dense", reader}
    assert by["intermediate.dense"]["fused"] == "gelu"
    assert by["intermediate.dense"]["layout"] == f"channel-major (feeds {reader})"
    assert all(r["replaced"] for r in rows) and by[reader]["fused"] == "add"
    layer = model.intermediate.dense
    assert layer.feeds == reader and not layer.token_major
    with torch.no_grad():
        h = model.intermediate(x)
        assert not h.is_contiguous() and h.reshape(-1, 48).t().is_contiguous()
        assert torch.allclose(model(x), want, atol=1e-5, rtol=1e-5)

    for leak in ("call", "return", "attr"):
        leaky = PartsFFN(leak=leak).eval()
        prune_(leaky, 0.7)
        with torch.no_grad():
            want = leaky(x)
        rows = _cpu(leaky, (x,))
        assert all(r["replaced"] for r in rows) and not any("layout" in r for r in rows), leak
        assert leaky.intermediate.dense.feeds is None and leaky.intermediate.dense.token_major
        with torch.no_grad():
            got = leaky(x)
        for a, b in zip(got if leak == "return" else (got,), want if leak == "return" else (want,)):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
        if leak != "call":
            h = got[1] if leak == "return" else leaky.kept
            assert h.is_contiguous() and h.view(-1).numel() == 5 * 48


def _separable(width=0.5, blocks=9, seed=4):
    from sparsert_cli.models import MobileNetV1

    torch.manual_seed(seed)
    model = nn.Sequential(*list(MobileNetV1(width=width).features)[:blocks]).eval()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model


def test_pointwise_depthwise_pairs_become_one_kernel_each():
    """Each 1x1 layer whose output only feeds a depthwise layer runs with it as one fused
    kernel (CPU: every pair that verifies); the model computes what the pruned dense model
    did, the depthwise modules are gone, and another input shape runs both dense ops."""
    from sparsert_cli.torch.pairs import FusedPair

    model = _separable()
    x = torch.randn(1, 3, 64, 64)
    stats = {}
    rows, want = _sparsified(model, (x,), 0.9, stats=stats)
    by = {r["layer"]: r for r in rows}
    assert stats["fused_pairs"] == 3
    for pw, dw in (("2.0", "3.0"), ("4.0", "5.0"), ("6.0", "7.0")):
        assert by[pw]["pair"] == f"fused with {dw}" and by[pw]["plan"].endswith("+dw")
        assert by[pw]["max_rel_err"] < 1e-5
        assert by[dw]["replaced"] and by[dw]["reason"] == f"in {pw}'s fused kernel"
        assert by[pw]["family"] == "immediate" and by[dw]["plan"] is None
        assert by[dw]["max_rel_err"] is None
        assert isinstance(model.get_submodule(pw), FusedPair)
        assert isinstance(model.get_submodule(dw), nn.Identity)
    assert "pair" not in by["8.0"] and type(model.get_submodule("8.0")) is SparseLayer
    with torch.no_grad(), pytest.warns(UserWarning, match="compiled for input"):
        other = model(x.repeat(2, 1, 1, 1))
    assert torch.allclose(other[:1], want, atol=1e-4, rtol=1e-4)
    assert "fused with 3.0" in "".join(str(c) for c in report_table(rows).columns[-1].cells)


def test_pairs_stay_apart_when_told_or_when_the_output_has_another_user():
    from sparsert_cli.torch.fuse import find_chains
    from sparsert_cli.torch.pairs import FusedPair

    model = _separable(blocks=5)
    x = torch.randn(1, 3, 32, 32)
    rows, _ = _sparsified(model, (x,), 0.9, fuse_depthwise=False)
    assert not any(isinstance(m, FusedPair) for m in model.modules())
    assert not any(r.get("pair") for r in rows)

    class TwoUsers(nn.Module):      # the 1x1 output also goes to the model's output
        def __init__(self):
            super().__init__()
            self.pw = nn.Conv2d(8, 16, 1, bias=False)
            self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)

        def forward(self, x):
            y = torch.relu(self.pw(x))
            return self.dw(y), y

    chains = {c.layer: c for c in find_chains(TwoUsers())}
    assert chains["pw"].depthwise_next is None
    chains = {c.layer: c for c in find_chains(_separable(blocks=5))}
    assert chains["2.0"].depthwise_next == "3.0" and chains["4.0"].depthwise_next is None


def test_a_fused_pair_slower_than_its_two_kernels_is_not_fused(monkeypatch):
    """On a GPU the fused kernel must time faster than the pointwise and depthwise kernels back
    to back (forced on the CPU here: no device load, a fake timer): the slower one is dropped,
    said in its row, and its two kernels stay; the faster one replaces them."""
    from sparsert_cli.fused import FusedKernel
    from sparsert_cli.torch import pairs

    times = iter([3.0, 2.0, 1.0, 2.0])      # per pair: fused, then the two kernels
    monkeypatch.setattr(pairs, "time_cold_us", lambda fn, inputs, samples=15: next(times))
    monkeypatch.setattr(FusedKernel, "to_device", lambda self, device=0: None)
    fuse = pairs.fuse_pairs
    monkeypatch.setattr(pairs, "fuse_pairs", lambda *a, **k: fuse(*a, **{**k, "on_gpu": True}))
    model = _separable(blocks=7)
    x = torch.randn(1, 3, 32, 32)
    rows, _ = _sparsified(model, (x,), 0.9)
    by = {r["layer"]: r for r in rows}
    assert by["2.0"]["pair"] == ("not fused with 3.0: slower (3.00 against 2.00 us for the "
                                 "two kernels)")
    assert type(model.get_submodule("2.0")) is SparseLayer
    assert type(model.get_submodule("3.0")) is SparseLayer
    assert by["4.0"]["pair"] == "fused with 5.0" and isinstance(model.get_submodule("4.0"),
                                                                pairs.FusedPair)
    assert (by["4.0"]["sparse_us"], by["4.0"]["pair_unfused_us"]) == (1.0, 2.0)
    assert by["5.0"]["sparse_us"] == 0.0 and by["5.0"]["reason"] == "in 4.0's fused kernel"
