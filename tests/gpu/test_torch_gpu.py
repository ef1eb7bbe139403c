"""sparsify_ on the GPU: a small CNN and a small transformer block, eager vs CUDA graph vs
torch.compile(fullgraph=True), all equal within tolerance; layer choice by timing; errors."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU for torch", allow_module_level=True)

from sparsert_cli.models import EncoderLayer  # noqa: E402
from sparsert_cli.torch import SparseLayer, prune_, sparsify_  # noqa: E402
from sparsert_cli.torch.endtoend import time_graph  # noqa: E402

pytestmark = pytest.mark.gpu
nn = torch.nn
TOL = {"fp32": 1e-4, "fp16": 2e-2}


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(),
        nn.Conv2d(32, 64, 1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 8 * 8, 10)).eval()


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _graph_output(model, x):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        model(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = model(x)
    x_static = x
    graph.replay()
    torch.cuda.synchronize()
    return out.clone(), graph, x_static


def _check_modes(model, x, want, dtype, exact=True):
    with torch.no_grad():
        eager = model(x)
    graphed, graph, _ = _graph_output(model, x)
    torch._dynamo.reset()        # models of earlier tests share forwards (recompile limit)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        comp = compiled(x)
    for got in (eager, graphed, comp):
        assert _rel(got, want) < TOL[dtype]
    if exact:       # same kernels, same order: bit-identical (torch's may differ in a graph)
        assert torch.equal(eager, graphed)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_cnn_eager_graph_compile(dtype):
    store = torch.float32 if dtype == "fp32" else torch.float16
    model = _cnn()
    prune_(model, 0.9)
    model = model.cuda().to(store)
    x = torch.randn(1, 16, 16, 16, device="cuda", dtype=store)
    with torch.no_grad():
        want = model(x).clone()
    rows = sparsify_(model, (x,), dtype=dtype, tuned=False, min_speedup=0.0)
    assert all(r["replaced"] for r in rows), rows
    assert sum(isinstance(m, SparseLayer) for m in model.modules()) == 4
    _check_modes(model, x, want, dtype)


def test_transformer_block_eager_graph_compile():
    torch.manual_seed(1)
    block = EncoderLayer(hidden=128, heads=4, ffn=512).cuda().eval()
    prune_(block, 0.9)
    x = torch.randn(2, 16, 128, device="cuda")
    with torch.no_grad():
        want = block(x).clone()
    rows = sparsify_(block, (x,), tuned=False, min_speedup=0.0)
    assert sum(r["replaced"] for r in rows) == 6, rows
    # query, key and value: one kernel of their stacked weights, run by the query module
    from sparsert_cli.torch.sparsify import SiblingHead, SiblingSlice

    assert isinstance(block.query, SiblingHead) and isinstance(block.value, SiblingSlice)
    assert rows[0]["shape"] == "384x128, N=32" and rows[2]["reason"] == "in query's kernel"
    # ffn_up fuses the GELU and hands its M x N output to ffn_down as a view (no copy)
    by = {r["layer"]: r for r in rows}
    assert by["ffn_up"]["fused"] == "gelu" and block.ffn_up.feeds == "ffn_down"
    assert isinstance(block.act, nn.Identity)
    with torch.no_grad():
        h = block.ffn_up(x)
        assert not h.is_contiguous() and h.reshape(-1, 512).t().is_contiguous()
    _check_modes(block, x, want, "fp32")


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_encoder_layers_in_a_stack_fuse_their_residual_adds(dtype):
    """Inside a container (as in BERT) an encoder layer is rewritten: attention output and FFN
    down add their residual in the kernel's epilogue; FFN down, handed FFN up's output, reads
    it channel-major; eager, graph and compile all match."""
    store = torch.float32 if dtype == "fp32" else torch.float16
    torch.manual_seed(2)
    model = nn.Sequential(EncoderLayer(hidden=128, heads=4, ffn=512),
                          EncoderLayer(hidden=128, heads=4, ffn=512)).eval()
    prune_(model, 0.9)
    model = model.cuda().to(store)
    x = torch.randn(1, 24, 128, device="cuda", dtype=store)
    with torch.no_grad():
        want = model(x).clone()
    rows = sparsify_(model, (x,), dtype=dtype, tuned=False, min_speedup=0.0)
    by = {r["layer"]: r for r in rows}
    for i in range(2):
        for name in (f"{i}.attn_out_residual.conv", f"{i}.ffn_down_residual.conv"):
            assert by[name]["replaced"] and by[name]["fused"] == "add", by[name]
        assert model[i].ffn_down_residual.sparse.residual
        assert model[i].ffn_up.feeds == f"{i}.ffn_down_residual.conv"
    _check_modes(model, x, want, dtype)


class _LastHidden(nn.Module):
    """A Hugging Face encoder's last hidden state as a tensor (what _check_modes compares)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).last_hidden_state


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_hugging_face_bert_matches_in_eager_graph_and_compile(dtype):
    """transformers' BertModel (when the image has it): it does not trace whole, so its
    chains come from its parts read alone; every Linear layer gets a kernel, query/key/value
    stacked, both residual adds per layer and the GELU fused, the FFN's first kernel hands its
    output to the second channel-major (read from the recording forward), and the model
    matches in eager
    mode, in a CUDA graph and under torch.compile(fullgraph=True)."""
    transformers = pytest.importorskip("transformers")
    store = torch.float32 if dtype == "fp32" else torch.float16
    torch.manual_seed(3)
    config = transformers.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=512, vocab_size=1000,
                                     max_position_embeddings=128)
    bert = transformers.BertModel(config).eval()
    prune_(bert, 0.9)
    bert = bert.cuda().to(store)
    ids = torch.randint(0, 1000, (1, 64), device="cuda")
    with torch.no_grad():
        want = bert(ids).last_hidden_state.clone()
    stats = {}
    rows = sparsify_(bert, (ids,), dtype=dtype, tuned=False, min_speedup=0.0, stats=stats)
    by = {r["layer"]: r for r in rows}
    # read from the GPU work of a forward (the model does not trace): every kernel follows one
    # of torch's (LayerNorm, attention, a Linear input's transpose copy), so none starts early,
    # except the FFN's second kernel, handed the first one's output channel-major (no copy)
    from sparsert_cli.torch import ops

    kernels = {m.kernel_id for m in bert.modules() if isinstance(m, SparseLayer)}
    handed = {bert.encoder.layer[i].output.dense_residual.sparse.kernel_id for i in range(2)}
    assert stats["dependent_launch_off"] > 0 and len(kernels) == 9, stats
    states = ops.dependent_launch_states(kernels)
    assert {k for k, on in states.items() if on} == handed, states
    assert len(rows) == 13 and all(r["replaced"] for r in rows), rows
    for i in range(2):
        layer = f"encoder.layer.{i}"
        assert by[f"{layer}.attention.self.query"]["siblings"] == [
            f"{layer}.attention.self.key", f"{layer}.attention.self.value"]
        assert by[f"{layer}.intermediate.dense"]["fused"] == "gelu"
        assert by[f"{layer}.intermediate.dense"]["layout"] == (
            f"channel-major (feeds {layer}.output.dense_residual.conv)")
        for name in ("attention.output", "output"):
            assert by[f"{layer}.{name}.dense_residual.conv"]["fused"] == "add"
    # transformers' own ops do not run bit-identically in a graph (H100, transformers 5.17)
    _check_modes(_LastHidden(bert), ids, want, dtype, exact=False)


def test_dense_is_kept_where_faster_and_inference_only():
    model = _cnn()
    prune_(model, 0.9)
    model = model.cuda()
    x = torch.randn(1, 16, 16, 16, device="cuda")
    rows = sparsify_(model, (x,), tuned=False, min_speedup=1e6)   # nothing is that fast
    assert not any(r["replaced"] for r in rows)
    assert all(r["reason"].startswith("dense is faster") for r in rows)
    assert all(r["dense_us"] > 0 and r["sparse_us"] > 0 for r in rows)
    model = _cnn()
    prune_(model, 0.9)
    model = model.cuda()
    rows = sparsify_(model, (x,), tuned=False, min_speedup=0.0)
    with pytest.raises(RuntimeError, match="inference-only"):
        model(x.clone().requires_grad_())
    assert time_graph(model, x) > 0


def test_sparsified_resnet_block_matches_in_a_graph():
    from sparsert_cli.models import Bottleneck

    torch.manual_seed(2)
    block = nn.Sequential(Bottleneck(64, 16)).cuda().eval()   # the root is never rewritten
    prune_(block, 0.9)
    x = torch.randn(1, 64, 14, 14, device="cuda")
    with torch.no_grad():
        want = block(x).clone()
    rows = sparsify_(block, (x,), tuned=False, min_speedup=0.0)
    assert [r["fused"] for r in rows if r["replaced"]] == ["bn+relu", "bn+relu", "bn+add+relu"]
    # the shared ReLU's three calls all ran in kernels: no ReLU module is left to launch
    assert not any(isinstance(m, nn.ReLU) for m in block.modules())
    # immediate-planned layers raced the streamed family: the faster one (as timed, the
    # streamed one ahead by STREAMED_PREFERENCE) was kept
    from sparsert_cli.torch.sparsify import STREAMED_PREFERENCE

    raced = [r for r in rows if "tried" in r]
    assert raced, rows
    for r in raced:
        assert len(r["tried"]) == 2 and {k.split()[0] for k in r["tried"]} == {
            "immediate", "streamed"}
        scored = {k: us / (STREAMED_PREFERENCE if k.startswith("streamed") else 1.0)
                  for k, us in r["tried"].items()}
        assert f"{r['family']} {r['plan']}" == min(scored, key=scored.get)
        assert r["sparse_us"] == pytest.approx(r["tried"][f"{r['family']} {r['plan']}"],
                                               abs=0.01)
    _check_modes(block, x, want, "fp32")


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_resnet_stem_7x7_eager_graph_compile(dtype):
    store = torch.float32 if dtype == "fp32" else torch.float16
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
                          nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)).eval()
    prune_(model, 0.9)
    model = model.cuda().to(store)
    x = torch.randn(1, 3, 64, 64, device="cuda", dtype=store)
    with torch.no_grad():
        want = model(x).clone()
    rows = sparsify_(model, (x,), dtype=dtype, tuned=False, min_speedup=0.0)
    assert rows[0]["replaced"] and rows[0]["op"] == "conv7x7", rows
    _check_modes(model, x, want, dtype)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_depthwise_separable_eager_graph_compile(dtype):
    """MobileNet's blocks: the depthwise layers as block-diagonal kernels (BN + ReLU6 fused)."""
    from sparsert_cli.models import MobileNetV1

    store = torch.float32 if dtype == "fp32" else torch.float16
    torch.manual_seed(3)
    model = nn.Sequential(*list(MobileNetV1(width=0.25).features)[:5]).eval()
    prune_(model, 0.9)
    model = model.cuda().to(store)
    x = torch.randn(1, 3, 32, 32, device="cuda", dtype=store)
    with torch.no_grad():
        want = model(x).clone()
    rows = sparsify_(model, (x,), dtype=dtype, tuned=False, min_speedup=0.0)
    assert all(r["replaced"] for r in rows), rows
    assert [r["op"] for r in rows] == ["conv3x3", "dw3x3", "conv1x1", "dw3x3", "conv1x1"]
    _check_modes(model, x, want, dtype)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_fused_pointwise_depthwise_pairs_eager_graph_compile(dtype, monkeypatch):
    """MobileNet's pointwise -> depthwise pairs as one fused kernel each (the timing race made
    to choose fusion): the model computes what the pruned dense model did, in eager mode, a
    CUDA graph and under torch.compile(fullgraph=True), and the fused kernels keep
    programmatic dependent launch after ours."""
    from sparsert_cli.models import MobileNetV1
    from sparsert_cli.torch import ops, pairs

    real = pairs.time_cold_us
    monkeypatch.setattr(pairs, "time_cold_us", lambda fn, inputs, samples=15: (
        0.5 * real(fn, inputs) if isinstance(fn, pairs.FusedPair) else real(fn, inputs)))
    store = torch.float32 if dtype == "fp32" else torch.float16
    torch.manual_seed(4)
    model = nn.Sequential(*list(MobileNetV1(width=0.5).features)[:9]).eval()
    prune_(model, 0.9)
    model = model.cuda().to(store)
    x = torch.randn(1, 3, 64, 64, device="cuda", dtype=store)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        want = model(x).clone()         # nine fp32 layers in TF32 drift past TOL
    stats = {}
    rows = sparsify_(model, (x,), dtype=dtype, tuned=False, min_speedup=0.0, stats=stats)
    assert all(r["replaced"] for r in rows), rows
    fused = [m for m in model.modules() if isinstance(m, pairs.FusedPair)]
    # pointwise layers 2, 4, 6 each feed a depthwise layer (3, 5, 7); 8 feeds nothing
    assert stats["fused_pairs"] == len(fused) == 3, [r.get("pair") for r in rows]
    assert all(isinstance(model[i][0], nn.Identity) for i in (3, 5, 7))
    assert all(r["max_rel_err"] < TOL[dtype] for r in rows if r.get("pair"))
    states = ops.dependent_launch_states([m.kernel_id for m in fused])
    assert states and all(states.values())
    _check_modes(model, x, want, dtype)


def test_run_model_merges_and_reuses_the_dense_baseline(tmp_path, capsys):
    """`sparsert model --merge` twice at two sparsities: the second reuses the dense times."""
    from cli_helpers import run_main

    from sparsert_cli.results import load_results

    out = tmp_path / "m.json"
    for sparsity in ("0.9", "0.95"):
        code, _, err = run_main(["model", "mobilenet_v1", "--resolution", "64", "--dtype",
                                 "fp16", "--sparsity", sparsity, "--dense-compile", "none",
                                 "--no-tuned", "--out", str(out), "--merge"], capsys)
        assert code == 0, err
    doc = load_results(out, kinds=("models",))
    first, second = doc["models"]
    assert first["dense_source"] == "measured" and second["dense_source"].startswith("cached")
    assert first["dense"] == second["dense"] and len(doc["dense_baselines"]) == 1
    assert first["best_dense"] in ("eager", "graph") and first["verified"], first
    assert first["gpu"]["name"] and first["kernels"]["kernels"] > 0
    for row in (first, second):     # the faster dependent-launch state is the one counted
        if "sparsert_graph_serial_us" in row:
            kept = row["dependent_launch_kept"]
            counted = row["sparsert_graph_pdl_us" if kept else "sparsert_graph_serial_us"]
            other = row["sparsert_graph_serial_us" if kept else "sparsert_graph_pdl_us"]
            assert row["sparsert"]["graph_us"] == pytest.approx(counted, abs=0.01)
            assert counted <= other + 0.01


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_layers_kept_dense_run_their_fastest_folded_form(dtype):
    """Where no kernel wins, the layer keeps the fastest of its dense forms, timed as the race
    times kernels: the model's own modules, or BatchNorm folded (conv2d, or a stride-1 1x1
    convolution as one batched GEMM) swapped in with its add and activation. The model then
    computes what it did, eager, in a CUDA graph and compiled."""
    from sparsert_cli.models import Bottleneck
    from sparsert_cli.torch.sparsify import FoldedDense

    store = torch.float32 if dtype == "fp32" else torch.float16
    torch.manual_seed(3)
    block = nn.Sequential(Bottleneck(64, 16), Bottleneck(64, 16)).eval()
    for bn in (m for m in block.modules() if isinstance(m, nn.BatchNorm2d)):
        with torch.no_grad():
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    prune_(block, 0.9)
    block = block.cuda().to(store)
    x = torch.randn(2, 64, 14, 14, device="cuda", dtype=store)
    with torch.no_grad():
        want = block(x).clone()
    compiled = dtype == "fp32"          # fp32: the folded forms are also timed compiled
    rows = sparsify_(block, (x,), dtype=dtype, tuned=False, min_speedup=1e6,
                     compiled_dense=compiled)
    assert not any(r["replaced"] for r in rows) and len(rows) == 6
    forms = [r["dense_form"] for r in rows]
    allowed = {"module", "folded", "folded gemm"}
    assert set(forms) <= allowed | ({"folded compiled"} if compiled else set())
    kept = [m for m in block.modules() if isinstance(m, FoldedDense)]
    assert len(kept) == sum("kept as the folded" in r["reason"] for r in rows)
    for r in rows:
        assert r["reason"].startswith("dense is faster")
        if r["dense_form"] in ("folded", "folded gemm"):      # the fastest, uncompiled: kept
            assert r["reason"].endswith(f"kept as the {r['dense_form']} dense op")
        assert "compiled" not in r["reason"]                 # the model holds eager forms
        assert "dense_compile_failed" not in r
    assert all(r["op"] == "conv1x1" for r in rows if "gemm" in r["dense_form"])
    _check_modes(block, x, want, dtype)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_a_chain_of_dependent_launches_reads_only_finished_outputs(dtype):
    """sm_90: sparsify_ compiles every kernel to wait for the grid before it and launches it
    with programmatic stream serialization, so each starts while the one before it ends. A
    chain of small layers (the overlap is largest there) computes the pruned model's output on
    fresh inputs at every replay of its CUDA graph, with the overlap on and off, eager and
    graphed alike; the output buffer is poisoned before each replay."""
    from sparsert_cli.torch import ops

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90")
    store = torch.float32 if dtype == "fp32" else torch.float16
    torch.manual_seed(5)
    layers = []
    for i in range(8):
        layers += [nn.Conv2d(64, 64, 3 if i % 3 == 2 else 1, padding=1 if i % 3 == 2 else 0),
                   nn.ReLU()]
    model = nn.Sequential(*layers).eval()
    prune_(model, 0.9)
    model = model.cuda().to(store)
    dense = copy.deepcopy(model).double()      # float64: cuDNN's fp32 convolutions use TF32
    x = torch.randn(1, 64, 14, 14, device="cuda", dtype=store)
    rows = sparsify_(model, (x,), dtype=dtype, tuned=False, min_speedup=0.0)
    assert all(r["replaced"] for r in rows), rows
    ids = {m.kernel_id for m in model.modules() if isinstance(m, SparseLayer)}
    assert len(ids) == 8
    assert ops.set_dependent_launch(True, ids) == 8      # this model's kernels only
    for overlap in (True, False):
        ops.set_dependent_launch(overlap, ids)
        _graph_output(model, x)                 # warm-up on a side stream
        graph, x_static = torch.cuda.CUDAGraph(), x.clone()
        with torch.no_grad(), torch.cuda.graph(graph):
            out = model(x_static)               # the graph's own output buffer
        for _ in range(20):
            x_static.copy_(torch.randn_like(x_static))
            out.fill_(float("nan"))
            graph.replay()
            with torch.no_grad():
                want, eager = dense(x_static.double()), model(x_static)
            torch.cuda.synchronize()
            assert _rel(out, want) < TOL[dtype] and torch.equal(out, eager)
    ops.set_dependent_launch(True, ids)
