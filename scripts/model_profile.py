#!/usr/bin/env python3
"""Where a sparsified model's time goes, kernel by kernel (a measurement, not a test).

  python3 scripts/model_profile.py resnet50 --dtype fp16 --sparsity 0.9 [--batch 1]
      [--tuned configs/tuned.json] [--compiled] [--keep-dense REGEX] --out OUT.json

Builds the model as `sparsert model` does (random init, magnitude pruning), sparsifies it, captures
one forward in a CUDA graph and records REPLAYS replays with torch.profiler (CUPTI). Writes, for
the last replay, every kernel in launch order (name, start offset, duration, gap before it, and
its step: from the previous kernel's end to its own, its share of the critical path when
dependent launch overlaps them), the sums (sparsert kernels, other kernels, gaps, steps), the
graph-timed forward, the sparsify rows (each layer's own time, measured alone) and, per replaced
layer, its kernel's step and time in the forward beside its time alone (`layers`; empty when the
kernels do not pair up with the layers). The question it answers: how far the whole forward is
from the sum of its layers timed alone, and which of that is other ops, which launch gaps, and which
kernels slower in the model than alone (cold code or data).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

import numpy as np
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tuned", default=str(ROOT / "configs" / "tuned.json"))
    ap.add_argument("--replays", type=int, default=5)
    ap.add_argument("--legacy", action="store_true",
                    help="sparsify as before session 4: layers timed warm and alone, no streamed "
                         "rival, shared ReLUs left in the model, 7x7 convolutions dense")
    ap.add_argument("--max-default-slices", type=int, default=None,
                    help="cap the streamed default's K-slices (1: no k-split; an experiment)")
    ap.add_argument("--streamed-preference", type=float, default=None,
                    help="sparsify_'s race keeps a streamed kernel unless the immediate one is "
                         "this much faster (an experiment; default: sparsify's own)")
    ap.add_argument("--compiled", action="store_true",
                    help="profile the sparsified model as `sparsert model` counts it when that "
                         "is faster: the race against compiled dense forms (compiled_dense), "
                         "then the model under torch.compile(mode='default') with freezing")
    ap.add_argument("--keep-dense", default=None, metavar="REGEX",
                    help="layers whose name matches stay dense (e.g. to time a model with some "
                         "layers left out); names as after the residual rewrite, e.g. "
                         "layer3.0.conv3_residual.conv")
    ap.add_argument("--no-handoff", action="store_true",
                    help="build every Linear layer token-major (no channel-major hand-off)")
    ap.add_argument("--no-linear-residual", action="store_true",
                    help="leave residual adds after Linear layers to torch (as before session "
                         "12): only modules with Conv2d children are rewritten")
    ap.add_argument("--no-dependent-launch", action="store_true",
                    help="compile and launch the kernels without dependent launch")
    ap.add_argument("--no-prefetch", action="store_true",
                    help="streamed kernels do not prefetch their pattern data into L2 before "
                         "the dependent-launch wait (as before session 21)")
    ap.add_argument("--no-row-vectors", action="store_true",
                    help="the 7x7 3x3 layers' defaults without row vectors (families/streamed/"
                         "plan.py ROW_VECTOR_DEFAULT)")
    ap.add_argument("--no-tile", action="store_true",
                    help="streamed defaults without the tile stage (as before session 23)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.no_tile:
        from sparsert_cli.families.streamed import plan as streamed_plan

        streamed_plan.TILE = False
    if args.no_row_vectors:
        from sparsert_cli.families.streamed import plan as streamed_plan

        streamed_plan.ROW_VECTOR_DEFAULT = False
    if args.streamed_preference is not None:
        from sparsert_cli.torch import sparsify as sparsify_module

        sparsify_module.STREAMED_PREFERENCE = args.streamed_preference
    if args.no_handoff:
        from sparsert_cli.torch import sparsify as sparsify_module

        sparsify_module._handoffs = lambda *a, **k: set()
    if args.no_linear_residual:
        import torch.fx
        import torch.nn

        from sparsert_cli.torch import residual
        from sparsert_cli.torch import sparsify as sparsify_module

        sparsify_module.fuse_residuals = lambda model: residual._rewrite_children(
            model, torch.nn.Conv2d, residual._rewrite, skip=(torch.fx.GraphModule,))
    if args.no_prefetch:
        from sparsert_cli.render import stream

        stream.PREFETCH = False
    if args.max_default_slices is not None:
        from sparsert_cli.families.streamed import plan as streamed_plan

        streamed_plan.MAX_DEFAULT_SLICES = args.max_default_slices

    import torch
    from torch.profiler import ProfilerActivity, profile

    from sparsert_cli.models import build
    from sparsert_cli.torch.check import captured_graph
    from sparsert_cli.torch.endtoend import _precision, time_graph
    from sparsert_cli.torch.prune import prune_
    from sparsert_cli.torch.sparsify import DTYPES, sparsify_

    model, x = build(args.model, batch=args.batch)
    prune_(model, args.sparsity)
    store = DTYPES[args.dtype]
    model, x = model.to("cuda", store).eval(), x.to("cuda", store)
    _precision(args.dtype)
    torch.backends.cudnn.benchmark = True
    if args.legacy:
        from sparsert_cli.torch import check, sparsify

        sparsify.time_cold_us = check.time_us
        sparsify.unshare_activations = lambda model: []
        rows = sparsify_(model, (x,), dtype=args.dtype, tuned=args.tuned or None, race=False,
                         include=lambda name, m: getattr(m, "kernel_size", (1,))[0] <= 3)
    else:
        include = None
        if args.keep_dense:
            pattern = re.compile(args.keep_dense)
            include = lambda name, m: not pattern.search(name)   # noqa: E731
        rows = sparsify_(model, (x,), dtype=args.dtype, tuned=args.tuned or None,
                         include=include, compiled_dense=args.compiled,
                         dependent_launch=False if args.no_dependent_launch else None)
    forward = model
    if args.compiled:
        import torch._inductor.config as inductor

        torch._dynamo.reset()
        with inductor.patch(freezing=True):
            forward = torch.compile(model, mode="default", fullgraph=True)
            with torch.no_grad():
                for _ in range(3):
                    forward(x)
    forward_us = time_graph(forward, x)

    graph = captured_graph(forward, (x,))
    with torch.no_grad():
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(args.replays):
                graph.replay()
                torch.cuda.synchronize()      # replays apart, so each one's kernels are one run
                time.sleep(0.002)             # (a short forward's replays were < 50 us apart)

    kernels = sorted(((e.name, e.time_range.start, e.time_range.end)
                      for e in prof.events() if e.device_type.name == "CUDA"
                      and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()),
                     key=lambda k: k[1])
    runs, current = [], []
    for k in kernels:                         # split at the idle time between replays
        if current and k[1] - current[-1][2] > 50.0:
            runs.append(current)
            current = []
        current.append(k)
    if current:
        runs.append(current)
    last = runs[-1] if runs else []
    t0 = last[0][1] if last else 0.0
    # step_us: from the previous kernel's end to this one's. With dependent launch a kernel
    # starts before the one before it ends and waits (its `us` counts the wait, its gap is
    # negative): its step is its share of the forward's critical path (steps sum to the span)
    # (prev_end: the latest end so far, so a kernel ending before the one before it has step 0)
    trace, steps, prev_end = [], [], None
    for name, start, end in last:
        step = max(0.0, end - (prev_end if prev_end is not None else start))
        steps.append(step)
        trace.append({"name": name[:120], "start_us": round(start - t0, 2),
                      "us": round(end - start, 2),
                      "gap_us": round(start - prev_end, 2) if prev_end is not None else 0.0,
                      "step_us": round(step, 2), "sparsert": name.startswith("sparsert_")})
        prev_end = end if prev_end is None else max(prev_end, end)
    ours = [t for t in trace if t["sparsert"]]
    summary = {
        "variant": "legacy" if args.legacy else "current", "model": args.model,
        "handoff": not args.no_handoff, "linear_residual": not args.no_linear_residual,
        "dependent_launch": not args.no_dependent_launch, "prefetch": not args.no_prefetch,
        "tile": not args.no_tile, "row_vectors": not args.no_row_vectors,
        "compiled": args.compiled, "keep_dense": args.keep_dense,
        "dtype": args.dtype, "sparsity": args.sparsity, "batch": args.batch,
        "max_default_slices": args.max_default_slices,
        "streamed_preference": args.streamed_preference,
        "gpu": torch.cuda.get_device_name(), "forward_graph_us": round(forward_us, 2),
        "replays_seen": len(runs), "kernels": len(trace),
        "span_us": round(max(k[2] for k in last) - t0, 2) if last else None,
        "sparsert_kernels": len(ours), "sparsert_sum_us": round(sum(t["us"] for t in ours), 2),
        "other_sum_us": round(sum(t["us"] for t in trace if not t["sparsert"]), 2),
        "gaps_sum_us": round(sum(t["gap_us"] for t in trace), 2),
        "sparsert_steps_us": round(sum(st for st, t in zip(steps, trace) if t["sparsert"]), 2),
        "other_steps_us": round(sum(st for st, t in zip(steps, trace) if not t["sparsert"]), 2),
        "layers_alone_sum_us": round(sum(r["sparse_us"] or 0.0 for r in rows if r["replaced"]), 2),
        "replaced": sum(r["replaced"] for r in rows), "layers": len(rows),
    }
    alone = [r for r in rows if r["replaced"]]
    per_layer = []
    # kernels run in the layers' order; the pairing holds only where every kernel's name
    # carries its layer's plan (sparsert_<plan>_<digest>)
    if len(alone) == len(ours) and all(f"_{r.get('plan')}_" in t["name"]
                                       for r, t in zip(alone, ours)):
        per_layer = [{"layer": r["layer"], "family": r.get("family"), "plan": r.get("plan"),
                      "step_us": t["step_us"], "us": t["us"], "alone_us": r.get("sparse_us"),
                      "kernel": t["name"]} for r, t in zip(alone, ours)]
    if len(alone) == len(ours):     # each layer: its time in the forward against its time alone
        pairs = [(t["us"], r["sparse_us"]) for t, r in zip(ours, alone) if r["sparse_us"]]
        summary["alone_over_in_model"] = {
            "geomean": round(float(np.exp(np.mean([np.log(b / a) for a, b in pairs]))), 3),
            "worst_low": round(min(b / a for a, b in pairs), 3),
            "worst_high": round(max(b / a for a, b in pairs), 3)}
    Path(args.out).write_text(json.dumps({"summary": summary, "trace": trace, "rows": rows,
                                          "layers": per_layer},
                                         indent=1, default=str))
    print(json.dumps(summary, indent=1))
    top = sorted(trace, key=lambda t: -t["step_us"])[:15]
    for t in top:
        print(f"{t['step_us']:8.2f} us step  {t['us']:8.2f} us  gap {t['gap_us']:6.2f}  "
              f"{t['name'][:80]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
