#!/usr/bin/env python3
"""A Hugging Face BERT end to end on the GPU (a measurement, not a test; needs `transformers`).

  scripts/hf_probe.py OUT.json [--dtypes fp32,fp16] [--sparsities 0.9,0.95] [--tokens 128]
                      [--layers 12] [--compile default|max-autotune|none]
                      [--handoff on|off|both]

transformers' `BertModel(BertConfig())` (BERT-base shapes, random init, no download), batch 1,
its last hidden state as the output. Dense: eager, CUDA graph and torch.compile (freezing,
graph-replayed) of the model as written; then magnitude pruning, `sparsify_` (default plans,
the per-layer race) and the sparse model graphed and compiled (fullgraph), its output against
the pruned model in float64. Unlike `sparsert model bert_base` (sparsert's own encoder), the
model here is read by parts (it does not trace whole): this is what a user of transformers
gets. One JSON record per dtype x sparsity (x hand-off setting), written after each.
--handoff: whether the FFN's first Linear layer hands its output to the second channel-major
(read from the recording forward, sparsify.RECORDED_HANDOFFS); "both" measures the sparse
model without, then with it, in the same run.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sparsert_cli.torch import prune_, sparsify_  # noqa: E402
from sparsert_cli.torch import sparsify as sparsify_module  # noqa: E402
from sparsert_cli.torch.endtoend import (  # noqa: E402
    REL_ERR_BOUND, _precision, _rel_err, gpu_meta, graph_launch_choice, sparse_compiled,
    time_compiled, time_eager, time_graph)

MODES = {"default": "default", "max-autotune": "max-autotune-no-cudagraphs", "none": None}


class LastHidden(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).last_hidden_state


def main() -> int:
    import transformers

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--dtypes", default="fp32,fp16")
    ap.add_argument("--sparsities", default="0.9,0.95")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--compile", default="default", choices=MODES)
    ap.add_argument("--handoff", default="on", choices=("on", "off", "both"))
    args = ap.parse_args()
    records = []
    for dtype in args.dtypes.split(","):
        store = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
        torch.manual_seed(0)
        config = transformers.BertConfig(num_hidden_layers=args.layers)
        base = LastHidden(transformers.BertModel(config).eval())
        ids = torch.randint(0, config.vocab_size, (1, args.tokens), device="cuda")
        _precision(dtype)
        dense_model = copy.deepcopy(base).cuda().to(store)
        dense = {"eager_us": time_eager(dense_model, ids), "graph_us": time_graph(dense_model,
                                                                                  ids)}
        if dtype == "fp32":
            _precision(dtype, tf32=True)
            dense["tf32_graph_us"] = time_graph(dense_model, ids)
            _precision(dtype)
        if MODES[args.compile]:
            dense["compile_us"], dense["compile_seconds"] = time_compiled(
                dense_model, ids, MODES[args.compile])
            _precision(dtype)
        del dense_model
        settings = {"on": (True,), "off": (False,), "both": (False, True)}[args.handoff]
        for sparsity, handoff in ((float(s), h) for s in args.sparsities.split(",")
                                  for h in settings):
            sparsify_module.RECORDED_HANDOFFS = handoff
            model = copy.deepcopy(base)
            prune_(model, sparsity)
            model = model.cuda().to(store)
            with torch.no_grad():
                ref = copy.deepcopy(model).double()(ids)
            started = time.perf_counter()
            rows = sparsify_(model.model, (ids,), dtype=dtype)
            seconds = time.perf_counter() - started
            with torch.no_grad():
                out = model(ids)
            launch = graph_launch_choice(model, ids)      # as `sparsert model`
            sparse = {"graph_us": launch.pop("graph_us")}
            if MODES[args.compile]:
                us, spent, compiled_out = sparse_compiled(model, ids)
                sparse.update(compile_us=us, compile_seconds=spent,
                              compile_rel_err=_rel_err(compiled_out, ref))
            best_dense = min(v for k, v in dense.items() if k in ("eager_us", "graph_us",
                                                                  "compile_us"))
            # a compiled model whose output is off the bound is not counted
            counted = [v for k, v in sparse.items() if k.endswith("_us") and (
                k != "compile_us" or sparse["compile_rel_err"] <= REL_ERR_BOUND[dtype])]
            best_sparse = min(counted)
            record = {
                "model": "transformers.BertModel", "transformers": transformers.__version__,
                "dtype": dtype, "sparsity": sparsity, "tokens": args.tokens,
                "layers": args.layers, "dense": dense, "sparse": sparse, **launch,
                "best_dense_us": best_dense, "best_sparse_us": best_sparse,
                "speedup": best_dense / best_sparse, "max_rel_err": _rel_err(out, ref),
                "rel_err_bound": REL_ERR_BOUND[dtype], "sparsify_seconds": round(seconds, 1),
                "recorded_handoffs": handoff,
                "channel_major_layers": sum(bool(r.get("layout")) for r in rows),
                "replaced": sum(r["replaced"] for r in rows), "layers_total": len(rows),
                "rows": [{k: r.get(k) for k in ("layer", "fused", "plan", "family", "replaced",
                                                 "reason", "dense_us", "sparse_us")}
                         for r in rows],
                "gpu": gpu_meta(), "torch": torch.__version__}
            records.append(record)
            print(f"{dtype} S={sparsity} handoff {'on' if handoff else 'off'}: dense {dense} "
                  f"sparse {sparse} -> "
                  f"{record['speedup']:.2f}x, {record['replaced']}/{len(rows)} replaced, "
                  f"rel err {record['max_rel_err']:.2e}", flush=True)
            Path(args.out).write_text(json.dumps(records, indent=1))
            del model
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
