"""Layers of an ONNX model: Conv / Gemm / MatMul nodes whose weight is a constant (an initializer
or a Constant node), with activation shapes from ONNX shape inference.

Each layer comes out in the kernel's terms: conv weight M x C x R x S with input (B, C, H, W), or
gemm weight M x K (out x in) with N activation columns, plus stride, padding, groups, bias and
the ReLU/ReLU6 that directly follows (fusable). Layers that cannot be read are listed with why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError


@dataclass(frozen=True, eq=False)
class OnnxLayer:
    name: str
    op: str                      # "conv" or "gemm"
    weight: np.ndarray           # conv M x C x R x S; gemm M x K (float32)
    input_shape: tuple           # conv (B, C, H, W); gemm (K, N)
    stride: int = 1
    padding: int = 0
    groups: int = 1
    activation: str = "none"     # a directly following Relu / Clip(0, 6)
    bias: np.ndarray | None = None

    @property
    def sparsity(self) -> float:
        return 1.0 - np.count_nonzero(self.weight) / self.weight.size

    def shape_text(self) -> str:
        if self.op == "gemm":
            return f"{self.weight.shape[0]}x{self.weight.shape[1]}, N={self.input_shape[1]}"
        m, c, r, _ = self.weight.shape
        b, _, h, w = self.input_shape
        return (f"{m}x{c}" + (f"x{r}x{r}" if r > 1 else "") + f" @ {h}x{w}"
                + (f" s{self.stride}" if self.stride > 1 else "")
                + (f" p{self.padding}" if self.padding else "") + (f" b{b}" if b > 1 else ""))

    def problem(self, problem_id: str | None = None) -> dict:
        """The layer as a problem spec (config `problems:` entry)."""
        pid = problem_id or "".join(ch if ch.isalnum() or ch in "_.-" else "_" for ch in self.name)
        if self.op == "gemm":
            return {"id": pid, "op": "gemm", "m": int(self.weight.shape[0]),
                    "k": int(self.weight.shape[1]), "n": int(self.input_shape[1])}
        b, c, h, w = self.input_shape
        return {"id": pid, "op": f"conv{self.weight.shape[2]}x{self.weight.shape[2]}",
                "out_channels": int(self.weight.shape[0]), "in_channels": int(c),
                "height": int(h), "width": int(w), "batch": int(b), "stride": self.stride,
                "padding": self.padding}


def _onnx():
    try:
        import onnx
    except ImportError:
        raise UserError("reading ONNX files needs onnx: pip install 'sparsert[onnx]'") from None
    return onnx


def _constants(onnx, graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _shapes(graph, batch: int | None) -> dict[str, tuple]:
    """Static shapes of every value shape inference knows; a symbolic leading dim -> batch."""
    out = {}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        tensor = info.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        dims = []
        for i, dim in enumerate(tensor.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                dims.append(int(dim.dim_value))
            elif i == 0 and batch is not None:
                dims.append(batch)
            else:
                dims = None
                break
        if dims is not None:
            out[info.name] = tuple(dims)
    return out


def _attrs(onnx, node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _activation(node, consumers, constants) -> str:
    users = consumers.get(node.output[0], [])
    if len(users) != 1:
        return "none"
    user = users[0]
    if user.op_type == "Relu":
        return "relu"
    if user.op_type == "Gelu":        # opset 20; exact unless approximate="tanh"
        approximate = {a.name: a.s for a in user.attribute}.get("approximate", b"none")
        return "gelu" if approximate in (b"none", "none") else "none"
    if user.op_type == "Clip":
        bounds = [float(constants[n]) if n in constants else None for n in user.input[1:3]]
        attrs = {a.name: a.f for a in user.attribute}
        low = attrs.get("min", bounds[0] if bounds else None)
        high = attrs.get("max", bounds[1] if len(bounds) > 1 else None)
        if (low, high) == (0.0, 6.0):
            return "relu6"
    return "none"


def _conv(onnx, node, constants, shapes) -> OnnxLayer | str:
    a = _attrs(onnx, node)
    if len(node.input) < 2 or node.input[1] not in constants:
        return "weight is not a constant"
    weight = constants[node.input[1]]
    if weight.ndim != 4:
        return f"{weight.ndim}-D weight (only 2-D convolutions)"
    x_shape = shapes.get(node.input[0])
    if x_shape is None or len(x_shape) != 4:
        return "input shape unknown after shape inference (give --batch for a symbolic batch)"
    strides = a.get("strides", [1, 1])
    pads = a.get("pads", [0, 0, 0, 0])
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return "auto_pad (write explicit pads)"
    if len(set(strides)) != 1 or len(set(pads)) != 1 or set(a.get("dilations", [1])) != {1}:
        return f"unequal strides {strides} / pads {pads} or dilation"
    bias = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return OnnxLayer(node.name or node.output[0], "conv", weight.astype(np.float32), x_shape,
                     int(strides[0]), int(pads[0]), int(a.get("group", 1)), bias=None
                     if bias is None else bias.astype(np.float32))


def _gemm(onnx, node, constants, shapes) -> OnnxLayer | str:
    """Gemm Y = alpha A' B' + beta C, or MatMul: the constant operand is the weight."""
    a = _attrs(onnx, node) if node.op_type == "Gemm" else {}
    left, right = node.input[0], node.input[1]
    alpha, bias = float(a.get("alpha", 1.0)), None
    if right in constants:                  # activations (N x K) @ B -> weight B^T (M x K)
        if a.get("transA", 0):
            return "transA=1 activations"
        w = constants[right]
        if w.ndim != 2:
            return f"{w.ndim}-D constant operand (only 2-D weights)"
        weight = (w if a.get("transB", 0) else w.T) * alpha
        x_shape = shapes.get(left)
        if x_shape is None:
            return "input shape unknown after shape inference (give --batch)"
        n = int(np.prod(x_shape[:-1]))
        if len(node.input) > 2 and node.input[2] in constants:
            c = constants[node.input[2]] * float(a.get("beta", 1.0))
            if c.size != weight.shape[0]:
                return "bias C is not one value per output"
            bias = c.reshape(-1).astype(np.float32)
    elif left in constants and node.op_type == "MatMul":   # W (M x K) @ X (K x N): our layout
        weight = constants[left]
        x_shape = shapes.get(right)
        if weight.ndim != 2 or x_shape is None or len(x_shape) != 2:
            return "constant left operand with an unknown or non-2-D right operand"
        n = x_shape[1]
    else:
        return "no constant weight operand"
    if x_shape[-1 if right in constants else 0] != weight.shape[1]:
        return f"activation shape {x_shape} does not fit weight {weight.shape}"
    return OnnxLayer(node.name or node.output[0], "gemm", np.ascontiguousarray(weight,
                     dtype=np.float32), (int(weight.shape[1]), int(n)), bias=bias)


def onnx_layers(path: str | Path, batch: int | None = None
                ) -> tuple[list[OnnxLayer], list[tuple[str, str]]]:
    """(layers, skipped): every Conv/Gemm/MatMul with a constant weight, and (node, why) for
    those that cannot become a kernel layer."""
    onnx = _onnx()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path))
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # noqa: BLE001 - protobuf and onnx raise many kinds
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a readable ONNX model ({reason})") from None
    graph = model.graph
    if not graph.node:
        raise UserError(f"{path}: not an ONNX model with a graph (no nodes)")
    constants = _constants(onnx, graph)
    shapes = _shapes(graph, batch)
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    layers, skipped = [], []
    for node in graph.node:
        if node.op_type == "Conv":
            layer = _conv(onnx, node, constants, shapes)
        elif node.op_type in ("Gemm", "MatMul"):
            layer = _gemm(onnx, node, constants, shapes)
        else:
            continue
        name = node.name or node.output[0]
        if isinstance(layer, str):
            skipped.append((name, layer))
            continue
        if not np.all(np.isfinite(layer.weight)):
            skipped.append((name, "weight holds NaN/Inf"))
            continue
        layers.append(OnnxLayer(**{**layer.__dict__,
                                   "activation": _activation(node, consumers, constants)}))
    return layers, skipped
