"""sparsert: compile a sparse weight's pattern into a GPU kernel (SparseRT, PACT 2020).

The public API (`import sparsert_cli as sparsert`) is loaded on first use, so importing the
package stays light. Kernels: compile_kernel, compile_kernels, Kernel, Layer, problem_layer,
config_layers, Epilogue, PlanParams, StreamParams; fused pointwise -> depthwise kernels:
fuse_pointwise_depthwise, FusedKernel. Checking and timing: verify_cpu,
benchmark_layer, measure_floors, run_benchmark, load_config, Gpu, have_gpu. Tuning: tune_config (through an
executor), LocalExecutor, TunedDB; the job machinery under it: make_cases, run_jobs, winners,
current_family, candidates, TuneDB (every measurement), gpu_count, parse_gpus. Results and
reports: load_results, stamp, git_commit, markdown_table. Shapes and costs: Geometry,
code_units. Also KernelCache, KernelFailure, UserError.
"""

__version__ = "0.1.0"

_API = {"compile_kernel": "api", "compile_kernels": "api", "Kernel": "api", "Layer": "api",
        "problem_layer": "api", "config_layers": "api", "KernelFailure": "api",
        "fuse_pointwise_depthwise": "fused", "FusedKernel": "fused",
        "load_config": "config", "run_benchmark": "bench", "Gpu": "gpu.runtime",
        "have_gpu": "gpu.runtime",
        "Epilogue": "problem_shape", "PlanParams": "families.immediate",
        "StreamParams": "families.streamed",
        "verify_cpu": "benchmark", "benchmark_layer": "benchmark",
        "measure_floors": "benchmark",
        "tune_config": "executors", "LocalExecutor": "executors",
        "TunedDB": "tune", "KernelCache": "cache", "UserError": "errors",
        "make_cases": "jobs", "winners": "jobs", "current_family": "jobs",
        "run_jobs": "executors", "gpu_count": "executors", "parse_gpus": "executors",
        "candidates": "tune", "TuneDB": "tunedb",
        "load_results": "results", "stamp": "results", "git_commit": "bench",
        "markdown_table": "report", "Geometry": "problem_shape", "code_units": "build"}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'sparsert_cli' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
