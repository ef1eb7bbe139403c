"""Figures from results files: `plot(kind, paths, out_dir)` writes DIR/<kind>.png, .svg and .csv.

data.py turns results into the rows a figure shows (plain Python, tested without matplotlib);
draw.py draws them (matplotlib, Agg, imported only here, on demand).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from .. import results
from ..errors import UserError
from .data import BASELINES, rows_for

# Which results kinds each figure reads.
INPUTS = {"speedup": ("bench", "sweep"), "layers": ("bench", "sweep"),
          "roofline": ("bench", "sweep"), "compare": ("bench", "sweep"), "tune": ("tune",),
          "model": ("models",), "map": ("bench", "sweep")}
KINDS = tuple(INPUTS)


def require_matplotlib():
    """The drawing module, or one line saying how to get matplotlib."""
    try:
        from . import draw
    except ImportError as exc:
        raise UserError(f"figures need matplotlib ({exc}); install it with "
                        f"pip install 'sparsert[plot]'") from None
    return draw


def load(paths, kind: str) -> list:
    """[(path, doc)] for a figure of `kind`; refuses files of another results kind."""
    return [(Path(p), results.load_results(p, kinds=INPUTS[kind])) for p in paths]


def csv_text(kind: str, data: dict) -> str:
    """The plotted numbers, one row per point (speedup: per problem, geomean, break-even)."""
    rows = (data["points"] + data["geomean"] + data["break_even"] if kind == "speedup"
            else data["rows"])
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def prepare(kind: str, paths, baselines: tuple[str, ...] | None = None) -> dict:
    """Load and check everything a figure needs (raises UserError; writes nothing)."""
    if kind not in INPUTS:
        raise UserError(f"unknown figure kind {kind!r} (known: {', '.join(KINDS)})")
    unknown = [b for b in baselines or () if b not in BASELINES]
    if unknown:
        raise UserError(f"--baselines: unknown baseline {unknown[0]!r} "
                        f"(known: {', '.join(BASELINES)})")
    return rows_for(kind, load(paths, kind), baselines)


def plot(kind: str, paths, out_dir, baselines: tuple[str, ...] | None = None
         ) -> tuple[list[str], dict]:
    """Write DIR/<kind>.png, .svg, .csv; returns (paths written, the plotted data).
    Every input is checked before DIR is created."""
    draw = require_matplotlib()
    data = prepare(kind, paths, baselines)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    fig = draw.figure(kind, data)
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = draw.save(fig, out / kind)
    finally:
        draw.close(fig)
    (out / f"{kind}.csv").write_text(csv_text(kind, data))
    return written + [str(out / f"{kind}.csv")], data


def svg(kind: str, data: dict) -> str:
    """One figure as inline <svg> text (for the HTML report)."""
    draw = require_matplotlib()
    fig = draw.figure(kind, data)
    try:
        return draw.svg_text(fig)
    finally:
        draw.close(fig)
