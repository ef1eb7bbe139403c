"""cuDNN (frontend) convolution baseline: the fastest correct execution plan."""

from __future__ import annotations

import numpy as np

from ...reference import conv_out_hw, reference_and_magnitude
from ...storage import decode, device_type, encode
from .. import timing
from ..runtime import Gpu, _one_line
from ._base import _Baseline, median_us, mismatch

MAX_WORKSPACE = 1 << 30      # a cuDNN plan asking for more than this is skipped


def conv_graph(x_shape, w_shape, stride: int, padding: int, mode: str, handle=None):
    """cuDNN frontend graph for an NCHW conv: (graph, X, W, Y). Buildable without a GPU up to
    shape inference. Y's dims and NCHW strides are set explicitly: left unset, cuDNN wrote Y
    in NHWC order on an H100 although get_stride() printed NCHW (CUDA_PYTHON_NOTES §6)."""
    import cudnn

    io = {"fp32": cudnn.data_type.FLOAT, "fp16": cudnn.data_type.HALF,
          "bf16": cudnn.data_type.BFLOAT16}[mode]
    fp = cudnn.data_type.FLOAT
    n, c, h, w = x_shape
    k, c2, r, s = w_shape
    if c != c2:
        raise ValueError(f"input has {c} channels but the filter expects {c2}")
    ho, wo = conv_out_hw(h, w, r, s, stride, padding)
    graph = cudnn.pygraph(io_data_type=io, intermediate_data_type=fp, compute_data_type=fp,
                          handle=handle)
    X = graph.tensor(name="X", dim=[n, c, h, w], stride=[c * h * w, h * w, w, 1], data_type=io)
    W = graph.tensor(name="W", dim=[k, c, r, s], stride=[c * r * s, r * s, s, 1], data_type=io)
    Y = graph.conv_fprop(image=X, weight=W, padding=[padding, padding], stride=[stride, stride],
                         dilation=[1, 1], compute_data_type=fp, name="conv")
    Y.set_output(True).set_data_type(io)
    Y.set_dim([n, k, ho, wo]).set_stride([k * ho * wo, ho * wo, wo, 1])
    return graph, X, W, Y


class CudnnConv(_Baseline):
    """NCHW conv forward through the cuDNN frontend, fastest correct execution plan.
    "fp32": FLOAT io and compute, plans with tensor-core / down-convert numeric notes
    deselected (no TF32). "fp16" / "bf16": HALF / BFLOAT16 io, FLOAT compute."""

    def __init__(self, gpu: Gpu, x: np.ndarray, w: np.ndarray, stride: int, padding: int,
                 mode: str = "fp32"):
        super().__init__(gpu)
        import cudnn

        if mode not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"cuDNN mode must be fp32, fp16 or bf16, got {mode!r}")
        self.name, self.dtype = f"cudnn_{mode}", mode
        self._cudnn, self._handle = cudnn, None
        store = device_type(mode)
        n, c, h, wd = x.shape
        k, _, r, s = w.shape
        ho, wo = conv_out_hw(h, wd, r, s, stride, padding)
        self._out_shape, self._store = (n, k, ho, wo), store
        try:
            self._handle = cudnn.create_handle()
            cudnn.set_stream(self._handle, gpu.stream_handle)
            graph, X, W, Y = conv_graph(x.shape, w.shape, stride, padding, mode, self._handle)
            graph.validate()
            graph.build_operation_graph()
            graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            if mode == "fp32":
                note = cudnn.numerical_note
                graph.deselect_numeric_notes([note.TENSOR_CORE, note.DOWN_CONVERT_INPUTS,
                                              note.REDUCED_PRECISION_REDUCTION])
            self._graph = graph
            built, rejected = self._build_plans(graph)
            self._x = self._upload(encode(x, mode))
            self._w = self._upload(encode(w, mode))
            self._out = self._alloc(n * k * ho * wo * np.dtype(store).itemsize)
            self._workspace = self._alloc(max(built.values(), default=0))
            self._pack = {X: self._x.ptr, W: self._w.ptr, Y: self._out.ptr}  # plain ints
            reference, magnitude = reference_and_magnitude(
                np.asarray(w, np.float32), np.asarray(x, np.float32), stride, padding)
            times = self._time_plans(built, reference, magnitude, c * r * s, rejected)
            self.plan_index = min(times, key=lambda i: median_us(times[i]))
            self._chosen = self._runner(self.plan_index)
            names = {i: self._plan_name(i) for i in times}
            self.info = {"library": "cuDNN", "version": cudnn.backend_version(),
                         "plan": names[self.plan_index], "plan_index": self.plan_index,
                         "workspace_bytes": built[self.plan_index],
                         "per_plan_us": {f"{i}:{names[i]}": median_us(t) for i, t in times.items()},
                         "timing_method": {f"{i}:{names[i]}": t.method for i, t in times.items()},
                         "rejected": rejected}
        except BaseException:
            self.close()
            raise

    def _plan_name(self, index: int) -> str:
        try:
            return str(self._graph.get_plan_name_at_index(index))
        except Exception:  # noqa: BLE001 - a name is only for the record
            return f"plan{index}"

    def _build_plans(self, graph) -> tuple[dict[int, int], dict[str, str]]:
        """{plan index: workspace bytes} for every plan that builds, and why the others did not."""
        built, rejected = {}, {}
        for index in range(graph.get_execution_plan_count()):
            try:
                graph.build_plan_at_index(index)
                workspace = int(graph.get_workspace_size_plan_at_index(index))
            except Exception as exc:  # noqa: BLE001 - deselected or unsupported plans
                rejected[f"{index}:{self._plan_name(index)}"] = _one_line(exc)
                continue
            if workspace > MAX_WORKSPACE:
                rejected[f"{index}:{self._plan_name(index)}"] = f"workspace {workspace} bytes"
                continue
            built[index] = workspace
        if not built:
            raise RuntimeError(f"cuDNN built no execution plan for this convolution: {rejected}")
        return built, rejected

    def _time_plans(self, built, reference, magnitude, k, rejected) -> dict:
        times = {}
        for index in built:
            run = self._runner(index)
            try:
                self.gpu.poison(self._out)
                run()
                got = decode(self.gpu.download(self._out, self._out_shape, self._store),
                             self.dtype)
                problem = mismatch(got, reference, magnitude, self.dtype, k)
                if not problem:
                    times[index] = timing.graph(self.gpu, run)
                    continue
            except Exception as exc:  # noqa: BLE001 - a plan that fails to run is skipped
                problem = _one_line(exc)
            rejected[f"{index}:{self._plan_name(index)}"] = problem
        if not times:
            raise RuntimeError(f"no cuDNN plan gave a correct result: {rejected}")
        return times

    def _runner(self, index: int):
        graph, pack, handle = self._graph, self._pack, self._handle
        workspace = self._workspace.ptr
        return lambda: graph.execute_plan_at_index(pack, workspace=workspace, index=index,
                                                   handle=handle)

    def enqueue(self) -> None:
        self._chosen()

    def output(self) -> np.ndarray:
        return decode(self.gpu.download(self._out, self._out_shape, self._store),
                      self.dtype).astype(np.float64)

    def _close_library(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            self._cudnn.destroy_handle(handle)
