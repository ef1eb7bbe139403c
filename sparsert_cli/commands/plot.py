"""`sparsert plot RESULTS.json... --kind K -o DIR`: a figure (PNG + SVG) and the CSV it plots."""

from __future__ import annotations

import click

from ..console import console


def _baselines(ctx, param, value):
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


@click.command("plot")
@click.argument("paths", nargs=-1, required=True, metavar="RESULTS.json...")
@click.option("--kind", required=True,
              type=click.Choice(["speedup", "layers", "roofline", "compare", "tune", "model",
                                 "map"]),
              help="speedup: vs sparsity (bench/sweep); layers: per-layer bars; roofline: "
                   "measured floors; compare: BASE NEW ratios; tune: candidates (tune "
                   "results); model: layer shares (models results); map: batch x sparsity "
                   "(sweeps at several batches).")
@click.option("-o", "--out", "out_dir", default="figures", show_default=True,
              help="Directory for <kind>.png, <kind>.svg and <kind>.csv.")
@click.option("--baselines", callback=_baselines, metavar="NAME[,NAME...]",
              help="Only these baselines (speedup, layers, map), e.g. cublas_fp32,cusparse.")
def command(paths, kind, out_dir, baselines):
    """Draw one figure from results files (needs matplotlib: pip install 'sparsert[plot]')."""
    from ..plots import plot

    written, data = plot(kind, paths, out_dir, baselines)
    if kind == "speedup":
        for e in data["break_even"]:
            at = f"{e['sparsity']:.3f}" if e["sparsity"] is not None else e["note"]
            console.print(f"break-even sparsity vs {e['baseline']}: {at}", highlight=False)
    console.print(f"wrote {', '.join(written)}", highlight=False, soft_wrap=True)
