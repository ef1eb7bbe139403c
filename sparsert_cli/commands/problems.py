"""`sparsert problems [CONFIG]`: the problems, their shapes, nonzeros and dense work."""

from __future__ import annotations

import click

from ..console import console, print_json, table


@click.command("problems")
@click.argument("config", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def command(config, as_json):
    """List problems (all shipped ones, or a config's) with nnz at each sparsity."""
    from ..config import load_config
    from ..problems import builtin_problems

    if config:
        cfg = load_config(config)
        problems, sparsities, title = cfg.problems, cfg.sparsities, f"problems of {cfg.path}"
    else:
        problems, sparsities, title = tuple(builtin_problems().values()), (0.9, 0.95), "problems/"
    docs = []
    for p in problems:
        dense = p.m * p.k
        docs.append({"id": p.id, "op": p.op, "shape": p.shape_text(), "m": p.m, "k": p.k,
                     "n": p.n, "dense_gflop": p.dense_flops() / 1e9,
                     "nnz": {f"{s:g}": dense - int(round(s * dense)) for s in sparsities},
                     "source": p.source})
    if as_json:
        print_json(docs)
        return
    cols = ["Problem", "Op", "Shape", "m", "k", "n", "dense GFLOP"] + [
        f"nnz@{s:g}" for s in sparsities]
    rows = [[d["id"], d["op"], d["shape"], d["m"], d["k"], d["n"], f"{d['dense_gflop']:.3f}"]
            + [d["nnz"][f"{s:g}"] for s in sparsities] for d in docs]
    console.print(table(title, cols, rows))
