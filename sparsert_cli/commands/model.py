"""`sparsert model resnet50|mobilenet_v1|bert_base|FILE.onnx`: a whole pruned network, end to end.

Built-in models get random weights and magnitude pruning; an ONNX file's Conv/Gemm/MatMul layers
are sparsified one by one (its other ops are not run: the times are sums over these layers).
Writes results JSON (kind "models") and a CSV, like `bench`; with --merge the JSON keeps the
entries of earlier runs (models_results.py) and is rewritten after every entry.
"""

from __future__ import annotations

import csv
import datetime
import io
import platform
from pathlib import Path

import click

from ..console import console, err_console
from ..errors import NoGpuError, UserError
from ..options import arch_option
from ..paths import can_create_in
from .bench import RESULTS_DIR, split_values

CSV_FIELDS = ["model", "dtype", "sparsity", "batch", "mode", "sparsert_us", "sparsert_config",
              "eager_us",
              "graph_us", "compile_us", "compile_mode", "compile_mode_best", "tf32_graph_us",
              "best_dense", "best_dense_us", "best_dense_config", "dense_source", "speedup",
              "verified", "max_rel_err", "dense_rel_err", "rel_err_bound", "replaced",
              "layers_total", "sparsert_graph_pdl_us", "sparsert_graph_serial_us",
              "dependent_launch_kept", "git_commit", "timestamp", "variant"]


def csv_text(doc: dict) -> str:
    from ..models_results import variant

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in doc["models"]:
        dense = row.get("dense") or {}
        writer.writerow({**row, **{k: dense.get(k) for k in ("eager_us", "graph_us",
                                                              "compile_us", "compile_mode")},
                         "tf32_graph_us": (row.get("tf32") or {}).get("graph_us"),
                         "variant": variant(row)})
    return buf.getvalue()


def _sparsities(values) -> list[float | None]:
    from ..config import check_sparsity

    out = []
    for text in split_values(values):
        try:
            out.append(check_sparsity(float(text), "--sparsity"))
        except ValueError:
            raise UserError(f"--sparsity: not a number: {text!r}") from None
    if len(set(out)) != len(out):
        raise UserError("--sparsity: a value is listed twice")
    return out


def _check_outputs(*paths: Path) -> None:
    import os

    for path in paths:
        if path.is_dir():
            raise UserError(f"{path}: is a directory; --out/--csv take file names")
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK) or not can_create_in(
                ancestor):
            raise UserError(f"{path}: cannot be written ({ancestor} is not a writable directory)")


@click.command("model")
@click.argument("name", metavar="resnet50|mobilenet_v1|bert_base|FILE.onnx")
@click.option("--sparsity", "sparsities", multiple=True, metavar="S[,S...]",
              help="Magnitude-prune every Conv2d/Linear to this (default: 0.9 for built-in "
                   "models; an ONNX file keeps its own zeros).")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["fp32", "fp16", "bf16"]),
              help="Precision (repeat for several; default fp32).")
@click.option("--batch", type=click.IntRange(1, 4096), default=1, show_default=True)
@click.option("--resolution", type=click.IntRange(16, 4096), default=224, show_default=True,
              help="Input height and width of the CNNs.")
@click.option("--tokens", type=click.IntRange(1, 65536), default=128, show_default=True,
              help="Sequence length of bert_base.")
@click.option("--tune", is_flag=True, help="Tune every layer's kernel first (GPU).")
@click.option("--tuned", "tuned_path", default=None, type=click.Path(dir_okay=False),
              help="Tuned-plan database (default: configs/tuned.json).")
@click.option("--no-tuned", is_flag=True, help="Ignore the tuned-plan database.")
@click.option("--dense-compile", type=click.Choice(["max-autotune", "default", "best", "none"]),
              default="best", show_default=True,
              help="The strong dense baseline's torch.compile mode: best (max-autotune and "
                   "default, the faster counted: default mode beat max-autotune on ResNet-50 "
                   "fp16), max-autotune, default or none (eager and CUDA graph only). "
                   "max-autotune takes minutes per model, over 10 in fp32 for ResNet-50: use "
                   "default there. Unless none, the sparsified model is compiled too (mode "
                   "default) and the faster of it and its CUDA graph counted.")
@click.option("--compile-only", is_flag=True,
              help="Compile and verify every layer on the CPU (slow for full-size models); "
                   "no timings.")
@click.option("--no-verify", is_flag=True,
              help="With --compile-only: compile only, no CPU check (times the compile phase).")
@click.option("--jobs", type=click.IntRange(1, 256), default=None,
              help="Compile processes (default: one per core).")
@click.option("--merge", is_flag=True,
              help="Keep the entries already in --out (same model, dtype, sparsity, batch and "
                   "variant: replaced; --no-fuse-depthwise, --no-dependent-launch and --tune "
                   "make a variant, kept beside the default entry); the file is rewritten "
                   "after every entry.")
@click.option("--no-cache", is_flag=True, help="Ignore the kernel cache.")
@click.option("--no-dependent-launch", is_flag=True,
              help="Compile and launch the kernels without programmatic dependent launch "
                   "(by default on sm_90+: each kernel starts while the one before it ends; "
                   "turned off after timing when the model's graph runs faster without it).")
@click.option("--no-fuse-depthwise", is_flag=True,
              help="Keep each 1x1 layer and the depthwise layer after it as two kernels (by "
                   "default the pair runs as one fused kernel where that times faster).")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@arch_option
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="Results JSON (default: results/local/models-<name>.json).")
@click.option("--csv", "csv_path", default=None, type=click.Path(dir_okay=False),
              help="Results CSV (default: next to the JSON).")
def command(name, sparsities, dtypes, batch, resolution, tokens, tune, tuned_path, no_tuned,
            dense_compile, compile_only, no_verify, jobs, merge, no_cache, no_dependent_launch,
            no_fuse_depthwise, seed, arch, out_path, csv_path):
    """Prune and sparsify a whole network; time it against dense eager, CUDA graph and
    torch.compile (max-autotune and default mode, freezing, channels_last; NCHW too for grouped
    convolutions), verify the output."""
    try:
        import torch
    except ImportError:
        raise UserError("sparsert model needs PyTorch: pip install 'sparsert[torch]'") from None
    from ..models import MODELS, build
    from ..results import stamp

    onnx_file = name.lower().endswith(".onnx")
    if not onnx_file and name not in MODELS:
        raise UserError(f"unknown model {name!r} (built in: {', '.join(MODELS)}, or FILE.onnx)")
    levels = _sparsities(sparsities) or ([None] if onnx_file else [0.9])
    dtypes = list(dict.fromkeys(dtypes)) or ["fp32"]
    if tune and no_tuned:
        raise UserError("--tune records winners in the tuned database; drop --no-tuned")
    if no_verify and not compile_only:
        raise UserError("--no-verify is for --compile-only (on a GPU every kernel is checked)")
    stem = Path(name).stem if onnx_file else name
    out = Path(out_path) if out_path else RESULTS_DIR / f"models-{stem}.json"
    csv_out = Path(csv_path) if csv_path else out.with_suffix(".csv")
    _check_outputs(out, csv_out)
    from ..models_results import load_models

    earlier = load_models(out) if merge else None      # a bad file: one line, before any work
    layers = None
    if onnx_file:
        from ..onnx_import import onnx_layers

        layers, skipped = onnx_layers(name, batch=batch)
        for node, why in skipped:
            err_console.print(f"[yellow]skipped[/] {node}: {why}")
        if not layers:
            raise UserError(f"{name}: no Conv/Gemm/MatMul layer with a constant weight")
    gpu = torch.cuda.is_available()
    if not gpu and not compile_only:
        raise NoGpuError("no CUDA GPU: `sparsert model` times on a GPU; --compile-only compiles "
                         "and verifies every layer on the CPU instead")
    if tune and compile_only:
        raise UserError("--tune measures on a GPU; drop --compile-only")
    tuned = False if no_tuned else tuned_path
    from ..torch.endtoend import run_model, run_onnx

    options = {"resolution": resolution, "tokens": tokens, "seed": seed,
               "dense_compile": dense_compile, "tune": tune,
               "dependent_launch": not no_dependent_launch,
               "fuse_depthwise": not no_fuse_depthwise}
    meta = {"sparsert_version": _version(), "git_commit": _commit()}
    state = {"doc": earlier, "rows": [], "bases": []}

    def save():
        """Write what is measured so far (merged over the earlier file with --merge)."""
        from ..models_results import dumps, merge as merged, write_atomic

        doc = stamp({**meta, "timestamp": _now(), "host": {
            "python": platform.python_version(), "machine": platform.machine()},
                     "options": options, "models": state["rows"]}, "models")
        if state["bases"]:
            doc["dense_baselines"] = state["bases"]
        doc = merged(state["doc"], doc) if merge else doc
        if doc["models"] or doc.get("dense_baselines"):
            write_atomic(out, dumps(doc))
            write_atomic(csv_out, csv_text(doc))

    def on_dense(record):
        state["bases"].append({**record, **meta, "timestamp": _now()})
        if merge:
            save()

    from ._common import progress_bar, progress_callback

    for dtype in dtypes:
        for sparsity in levels:
            err_console.print(f"{stem} {dtype} sparsity={sparsity} batch={batch} ...")
            with progress_bar() as progress:
                common = dict(sparsity=sparsity, dtype=dtype, tuned=tuned, tune=tune,
                              dry_run=compile_only, cache=not no_cache, arch=arch,
                              dependent_launch=False if no_dependent_launch else None)
                if onnx_file:
                    row = run_onnx(stem, layers, **common)
                    row["batch"] = batch
                else:
                    model, x = build(name, batch=batch, resolution=resolution, tokens=tokens,
                                     seed=seed)
                    cached = list((earlier or {}).get("dense_baselines", [])) + state["bases"]
                    row = run_model(name, model, x, dense_compile=dense_compile,
                                    dense_cached=cached, on_dense=on_dense,
                                    verify=not no_verify, jobs=jobs,
                                    fuse_depthwise=not no_fuse_depthwise,
                                    on_progress=progress_callback(progress), **common)
            row.update(meta, timestamp=_now(), options=options)
            state["rows"].append(row)
            _print_row(row)
            if merge:
                save()
    save()
    console.print(f"wrote {out} and {csv_out}")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _print_row(row: dict) -> None:
    from ..torch.sparsify import report_table

    title = f"{row['model']} {row['dtype']} S={row['sparsity']} batch={row['batch']}"
    console.print(report_table(row["layers"], title=title))
    kernels = row.get("kernels") or {}
    if kernels:
        console.print(f"{kernels.get('kernels', 0)} kernels ({kernels.get('cached', 0)} cached):"
                      f" planned in {kernels.get('plan_seconds', 0):.1f} s, compiled in "
                      f"{kernels.get('compile_seconds', 0):.1f} s" + (
                          f"; {kernels['fused_pairs']} pointwise -> depthwise pairs fused "
                          "into one kernel each" if kernels.get("fused_pairs") else ""))
    if row["mode"] == "compile-only":
        if row.get("max_rel_err") is None and not row.get("verified_layers"):
            console.print("compiled only (--no-verify): no kernel checked")
        else:
            console.print(f"{row.get('verified_layers', '')} layers verified on the CPU; max "
                          f"relative error {row['max_rel_err']}")
        return
    dense = ", ".join(f"{k.removesuffix('_us')} {v:.1f} us" for k, v in row["dense"].items()
                      if k.endswith("_us") and v)
    console.print(f"sparsert {row['sparsert_us']:.1f} us ({row.get('sparsert_config', 'graph')})"
                  f" vs dense {dense}: "
                  f"[bold]{row['speedup']:.2f}x[/] the best ({row['best_dense_config']}); "
                  f"{row['replaced']}/{row['layers_total']} layers replaced; "
                  f"max rel err {row['max_rel_err']:.2e}"
                  + (f" (bound {row['rel_err_bound']:g})" if row.get("rel_err_bound") else ""))
    if row.get("speedup") is not None and row["speedup"] < 1.0 and row.get("replaced"):
        console.print(f"[yellow]warning:[/] the sparsified model is slower than the best dense "
                      f"configuration ({row['sparsert_us']:.1f} against "
                      f"{row['best_dense_us']:.1f} us): each replaced layer beat its dense form "
                      f"alone, but not the model; on this GPU keep the dense model at batch "
                      f"{row['batch']}")
    if row.get("sparsert_graph_serial_us"):
        with_it = row.get("sparsert_graph_pdl_us", row["sparsert"]["graph_us"])
        kept = row.get("dependent_launch_kept")
        console.print(f"programmatic dependent launch: graph {with_it:.1f} us,"
                      f" {row['sparsert_graph_serial_us']:.1f} us without it"
                      + ("" if kept is None else " (kept)" if kept
                         else " (turned off: faster without)"))


def _version() -> str:
    from .. import __version__

    return __version__


def _commit():
    from ..bench import git_commit

    return git_commit()
