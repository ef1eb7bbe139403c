"""ONNX import: Conv/Gemm/MatMul weights (initializers and Constant nodes), shapes from shape
inference, fused activations, and one line for a bad file."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from sparsert_cli.errors import UserError  # noqa: E402
from sparsert_cli.onnx_import import onnx_layers  # noqa: E402


def _model(path, batch="N"):
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b1 = rng.standard_normal(4).astype(np.float32)
    w2 = rng.standard_normal((6, 4, 1, 1)).astype(np.float32)
    w3 = rng.standard_normal((5, 6 * 4 * 4)).astype(np.float32)       # Gemm transB=1
    w4 = rng.standard_normal((5, 7)).astype(np.float32)               # MatMul K x M
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", strides=[2, 2],
                         pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(w2, "w2")),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["f"]),
        helper.make_node("Gemm", ["f", "w3"], ["g"], name="fc", transB=1, alpha=2.0),
        helper.make_node("MatMul", ["g", "w4"], ["y"], name="proj"),
        helper.make_node("MatMul", ["g", "g2"], ["z"], name="dynamic"),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w1, "w1"), (b1, "b1"), (w3, "w3"), (w4, "w4"), (np.float32(0), "lo"),
              (np.float32(6), "hi"))]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8]),
                        helper.make_tensor_value_info("g2", TensorProto.FLOAT, [5, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(path))
    return w1, b1, w2, w3, w4


def test_layers_from_a_generated_model(tmp_path):
    w1, b1, w2, w3, w4 = _model(tmp_path / "m.onnx")
    layers, skipped = onnx_layers(tmp_path / "m.onnx", batch=2)
    by = {layer.name: layer for layer in layers}
    assert list(by) == ["conv1", "conv2", "fc", "proj"]
    conv1 = by["conv1"]
    assert conv1.input_shape == (2, 3, 8, 8) and (conv1.stride, conv1.padding) == (2, 1)
    assert conv1.activation == "relu" and np.array_equal(conv1.bias, b1)
    assert np.array_equal(conv1.weight, w1)
    assert by["conv2"].input_shape == (2, 4, 4, 4) and by["conv2"].activation == "relu6"
    assert np.array_equal(by["conv2"].weight, w2)               # from a Constant node
    assert by["fc"].input_shape == (96, 2) and np.array_equal(by["fc"].weight, 2 * w3)
    assert by["proj"].weight.shape == (7, 5) and np.array_equal(by["proj"].weight, w4.T)
    assert skipped == [("dynamic", "no constant weight operand")]
    assert by["conv1"].problem()["op"] == "conv3x3" and by["fc"].shape_text() == "5x96, N=2"
    from sparsert_cli.problems import problem_from_dict

    for layer in layers:                  # every layer is a valid problem spec
        problem_from_dict(layer.problem(), "onnx")


def test_symbolic_batch_needs_a_value(tmp_path):
    _model(tmp_path / "m.onnx")
    layers, skipped = onnx_layers(tmp_path / "m.onnx")
    assert not layers and any("--batch" in why for _, why in skipped)


def test_bad_onnx_files(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"\x00\xffnot a protobuf at all" * 10)
    with pytest.raises(UserError, match="junk.onnx"):
        onnx_layers(tmp_path / "junk.onnx")
    with pytest.raises(UserError, match="no such ONNX file"):
        onnx_layers(tmp_path / "missing.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(UserError, match="empty.onnx"):
        onnx_layers(tmp_path / "empty.onnx")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_layers_from_a_torch_export(tmp_path):
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 1, stride=2), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 4 * 4, 10)).eval()
    try:
        torch.onnx.export(model, (torch.randn(1, 3, 8, 8),), str(tmp_path / "t.onnx"),
                          dynamo=False)
    except Exception as exc:  # noqa: BLE001 - an exporter that needs extra packages
        pytest.skip(f"torch.onnx.export unavailable here: {exc}")
    layers, skipped = onnx_layers(tmp_path / "t.onnx")
    assert [layer.op for layer in layers] == ["conv", "conv", "gemm"] and not skipped
    assert layers[0].activation == "relu" and layers[1].stride == 2
    assert np.allclose(layers[2].weight, model[4].weight.detach().numpy())
    assert layers[2].input_shape == (64, 1)


@pytest.mark.parametrize("approximate, fused", [(None, "gelu"), ("none", "gelu"),
                                                ("tanh", "none")])
def test_a_gelu_after_a_matmul_is_fused_only_when_exact(tmp_path, approximate, fused):
    """ONNX Gelu (opset 20): exact (erf) GELU is the kernel's activation; tanh GELU stays."""
    w = np.random.default_rng(1).standard_normal((6, 5)).astype(np.float32)
    extra = {} if approximate is None else {"approximate": approximate}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="up"),
             helper.make_node("Gelu", ["h"], ["y"], **extra)]
    graph = helper.make_graph(
        nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.save(model, str(tmp_path / "g.onnx"))
    (layer,), skipped = onnx_layers(tmp_path / "g.onnx")
    assert layer.activation == fused and not skipped

