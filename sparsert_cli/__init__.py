"""sparsert: compile a sparse weight's pattern into a GPU kernel (SparseRT, PACT 2020).

The public API (`import sparsert_cli as sparsert`) is loaded on first use, so importing the
package stays light. Kernels: compile_kernel, compile_kernels, Kernel, Layer, problem_layer,
config_layers, Epilogue, PlanParams. Checking and timing: verify_cpu, benchmark_layer,
measure_floors, run_benchmark, load_config, Gpu, have_gpu. Tuning: tune_config (through an
executor), LocalExecutor, TunedDB. Also KernelCache, KernelFailure, UserError.
"""

__version__ = "0.1.0"

_API = {"compile_kernel": "api", "compile_kernels": "api", "Kernel": "api", "Layer": "api",
        "problem_layer": "api", "config_layers": "api", "KernelFailure": "api",
        "load_config": "config", "run_benchmark": "bench", "Gpu": "gpu.runtime",
        "have_gpu": "gpu.runtime",
        "Epilogue": "problem_shape", "PlanParams": "families.immediate",
        "verify_cpu": "benchmark", "benchmark_layer": "benchmark",
        "measure_floors": "benchmark",
        "tune_config": "executors", "LocalExecutor": "executors",
        "TunedDB": "tune", "KernelCache": "cache", "UserError": "errors"}
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
