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
    assert not rows["dw5"]["replaced"] and "only 1x1 and 3x3" in rows["dw5"]["reason"]
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
