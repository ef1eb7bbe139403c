"""matplotlib figures from the rows of plots.data (imported only when a figure is drawn)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .data import LABELS  # noqa: E402

STYLE = {"svg.fonttype": "none",            # text stays text: small, searchable SVGs
         "svg.hashsalt": "sparsert",        # stable element ids: the same input, the same SVG
         "font.size": 9, "axes.titlesize": 10, "axes.spines.top": False,
         "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3}
COLORS = plt.get_cmap("tab10").colors
# One colour per baseline in every figure; sparsert series (one per results file) get blues.
BASELINE_COLORS = {"cublas_fp32": "tab:green", "cublas_tf32": "tab:red",
                   "cublas_fp16": "tab:purple", "cublas_bf16": "darkviolet",
                   "cudnn_bf16": "silver",
                   "cusparse": "tab:brown", "cudnn_fp32": "tab:pink", "cudnn_fp16": "tab:gray",
                   "im2col_cusparse": "tab:olive"}
SPARSERT_COLORS = ("tab:blue", "tab:cyan", "navy", "tab:orange")


def _colors(series: list[str]) -> list:
    mine = iter(SPARSERT_COLORS)
    return [BASELINE_COLORS.get(s) or next(mine, "k") for s in series]


def _label(name: str) -> str:
    return LABELS.get(name, name)


def _plain_log(ax) -> None:
    """Log y ticks as plain numbers (2, 5, 10 rather than 2x10^0). Minor ticks are labelled at
    draw time, once the limits are final: all within a decade, 2 and 5 within two."""
    from matplotlib.ticker import FuncFormatter

    def minor(value, _):
        low, high = ax.get_ylim()
        mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
        if high / low < 10 or (high / low < 200 and mantissa in (2, 5)):
            return f"{value:g}"
        return ""
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))
    ax.tick_params(axis="y", which="minor", labelsize=7)


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return math.ceil(n / cols), cols


def speedup(data: dict) -> Figure:
    names = data["baselines"]
    rows, cols = _grid(len(names))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), sharey=True,
                             squeeze=False, layout="constrained")
    problems = sorted({p["series"] for p in data["points"]})
    even = {e["baseline"]: e for e in data["break_even"]}
    for ax, name, color in zip(axes.flat, names, _colors(names)):
        for problem in problems:
            pts = sorted((p["sparsity"], p["speedup"]) for p in data["points"]
                         if p["baseline"] == name and p["series"] == problem)
            if pts:
                ax.plot(*zip(*pts), color="0.55", alpha=0.35, lw=0.8)
        mean = sorted((g["sparsity"], g["speedup"]) for g in data["geomean"]
                      if g["baseline"] == name)
        ax.plot(*zip(*mean), color=color, lw=2.4, marker="o", ms=4, label="geomean")
        ax.axhline(1.0, color="k", lw=0.9)
        e = even[name]
        if e["sparsity"] is not None:
            ax.axvline(e["sparsity"], color=color, ls="--", lw=1)
            ax.plot([e["sparsity"]], [1.0], "D", color=color, ms=6,
                    label=f"break-even {e['sparsity']:.2f}")
        else:
            ax.plot([], [], " ", label=f"break-even: {e['note']}")
        ax.set_yscale("log")
        _plain_log(ax)
        ax.set_title(f"vs {_label(name)}")
        ax.set_xlabel("sparsity")
        ax.legend(loc="upper left", fontsize=7, frameon=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("speedup (x, log)")
    fig.suptitle(f"sparsert speedup vs sparsity ({len(problems)} problems, faint; "
                 f"geomean bold)")
    return fig


def layers(data: dict) -> Figure:
    series, rows = data["series"], data["rows"]
    sparsities = sorted({r["sparsity"] for r in rows})
    by_s = {s: list(dict.fromkeys(r["problem"] for r in rows if r["sparsity"] == s))
            for s in sparsities}
    # one panel per sparsity, as many side by side as fit in 16 inches
    panel = min(16.0, max(4.0, 0.09 * max(map(len, by_s.values())) * (len(series) + 1)))
    cols = max(1, min(len(sparsities), int(16.0 // panel)))
    nrows = math.ceil(len(sparsities) / cols)
    fig, axes = plt.subplots(nrows, cols, squeeze=False, layout="constrained",
                             figsize=(panel * cols, 3.2 * nrows + 0.4))
    width = 0.8 / len(series)
    handles = {}
    for ax, s in zip(axes.flat, sparsities):
        problems = by_s[s]
        for i, (name, color) in enumerate(zip(series, _colors(series))):
            pts = [(j, r) for j, p in enumerate(problems) for r in rows
                   if r["problem"] == p and r["sparsity"] == s and r["series"] == name]
            if not pts:
                continue
            x = [j - 0.4 + width * (i + 0.5) for j, _ in pts]
            med = [r["median_us"] for _, r in pts]
            err = [[r["median_us"] - r["p20_us"] for _, r in pts],
                   [r["p80_us"] - r["median_us"] for _, r in pts]]
            handles[name] = ax.bar(x, med, width, color=color, yerr=err,
                                   error_kw={"elinewidth": 0.7, "capsize": 1.2, "ecolor": "0.2"})
        ax.set_xticks(range(len(problems)), problems, rotation=45, ha="right", fontsize=7)
        ax.set_xlim(-0.6, len(problems) - 0.4)
        ax.set_yscale("log")
        _plain_log(ax)
        ax.set_ylabel("us per launch (median, log)")
        ax.set_title(f"sparsity {s:g}" + (": per-layer time, whiskers p20-p80 of the samples"
                                          if panel >= 8 else ""))
        ax.grid(axis="x", visible=False)
    for ax in axes.flat[len(sparsities):]:
        ax.set_visible(False)
    names = [n for n in series if n in handles]
    fig.legend([handles[n] for n in names], [_label(n) for n in names], fontsize=7,
               ncols=max(1, min(len(names), int(panel * cols / 1.7))),
               loc="outside lower center", frameon=False)
    if panel < 8:
        fig.suptitle("per-layer time, whiskers p20-p80 of the samples")
    return fig


def roofline(data: dict) -> Figure:
    fig, ax = plt.subplots(figsize=(8.0, 6.0), layout="constrained")
    rows = data["rows"]
    lo = min(r["intensity"] for r in rows) / 2
    hi = max(r["intensity"] for r in rows) * 2
    for roof, color in zip(data["roofs"], COLORS):
        ridge = roof["peak_gflops"] / roof["bandwidth_gbs"]
        xs = [min(lo, ridge / 4), ridge, max(hi, ridge * 4)]
        ax.plot(xs, [min(roof["peak_gflops"], x * roof["bandwidth_gbs"]) for x in xs],
                color=color, lw=1.6,
                label=(f"{roof['file']}: {roof['peak_gflops'] / 1e3:.1f} TFLOP/s"
                       f"{' (half2 = 2x FP32)' if roof['half2'] else ''}, "
                       f"{roof['bandwidth_gbs'] / 1e3:.2f} TB/s, launch "
                       f"{roof['launch_us']:.2f} us"))
    files = list(dict.fromkeys(r["file"] for r in rows))
    for f, color, marker in zip(files, COLORS, "osD^v"):
        pts = [r for r in rows if r["file"] == f]
        ax.vlines([r["intensity"] for r in pts], [r["gflops"] for r in pts],
                  [r["floor_gflops"] for r in pts], color=color, alpha=0.25, lw=0.8)
        ax.scatter([r["intensity"] for r in pts], [r["gflops"] for r in pts], s=16,
                   color=color, marker=marker, zorder=3, label=f"{f} kernels (line: up to floor)")
        for r in pts:
            ax.annotate(f"{r['floor_pct']:.0f}%", (r["intensity"], r["gflops"]), fontsize=5.5,
                        xytext=(3, -2), textcoords="offset points", color="0.25")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("useful flop per byte moved (2 nnz N / activation + output bytes)")
    ax.set_ylabel("achieved useful GFLOP/s")
    ax.set_title("roofline with the measured floors; labels: % of the case's floor "
                 "(flops, bytes or launch)")
    fig.legend(fontsize=7, loc="outside lower center", ncols=2, frameon=False)
    return fig


def compare(data: dict) -> Figure:
    rows = [r for r in data["rows"] if r["ratio"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(rows) + 2), 4.2), layout="constrained")
    colors = {"slower": "tab:red", "faster": "tab:green", "ambiguous": "tab:orange",
              "same": "0.4"}
    others = [r for r in data["rows"] if not r["ratio"]]
    x = range(len(rows))
    ax.axhspan(0.95, 1.05, color="0.85", alpha=0.6, label="+-5%")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.vlines(x, [r["low"] for r in rows], [r["high"] for r in rows], color="0.5", lw=2,
              alpha=0.5, label="noise band (p20/p80 of both)")
    for status, color in colors.items():
        pts = [(i, r["ratio"]) for i, r in enumerate(rows) if r["status"] == status]
        if pts:
            ax.scatter(*zip(*pts), color=color, s=14, zorder=3, label=status)
    ax.set_xticks(list(x), [r["case"] for r in rows], rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("new / base time")
    counts = {s: sum(r["status"] == s for r in others) for s in ("missing", "failed", "new")}
    extra = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    ax.set_title(f"{data['new']} vs {data['base']}: sorted ratios (sparsert compare's statuses)"
                 + (f"; not shown: {extra}" if extra else ""))
    ax.legend(fontsize=7, loc="best", framealpha=0.9)
    return fig


def tune(data: dict) -> Figure:
    rows = data["rows"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    families = sorted({r["family"] for r in rows if r["role"] == "candidate"})
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(cases) + 2), 4.2), layout="constrained")
    for fam, color in zip(families, COLORS):
        pts = [(cases.index(r["case"]), r["median_us"]) for r in rows
               if r["role"] == "candidate" and r["family"] == fam]
        ax.scatter(*zip(*pts), s=10, color=color, alpha=0.5,
                   label=f"candidates ({fam})" if fam != "-" else "candidates")
    for role, marker, color in (("default", "s", "k"), ("winner", "*", "tab:red")):
        pts = [(cases.index(r["case"]), r["median_us"]) for r in rows if r["role"] == role]
        ax.scatter(*zip(*pts), marker=marker, s=60 if role == "winner" else 30,
                   facecolor="none" if role == "default" else color, edgecolor=color, zorder=3,
                   label=role)
    for i, case in enumerate(cases):
        d = next(r["median_us"] for r in rows if r["case"] == case and r["role"] == "default")
        w = next(r["median_us"] for r in rows if r["case"] == case and r["role"] == "winner")
        ax.annotate(f"{d / w:.2f}x", (i, w), xytext=(0, -12), textcoords="offset points",
                    ha="center", fontsize=7, color="tab:red")
    ax.set_xticks(range(len(cases)), cases, rotation=45, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.margins(x=0.15, y=0.12)
    _plain_log(ax)
    ax.set_ylabel("us per launch (median, log)")
    ax.set_title("tuning: candidates, default and winner")
    ax.legend(fontsize=7, frameon=False)
    return fig


def model(data: dict) -> Figure:
    rows = data["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    heights = [len([r for r in rows if r["model"] == m]) for m in models]
    fig, axes = plt.subplots(len(models), 1, squeeze=False, layout="constrained",
                             figsize=(7.0, 0.8 + 0.22 * sum(heights) + 0.6 * len(models)),
                             gridspec_kw={"height_ratios": heights})
    colors = {"sparsert": "tab:blue", "dense": "tab:gray", "other": "0.8"}
    for ax, m in zip(axes[:, 0], models):
        pts = [r for r in rows if r["model"] == m]
        y = range(len(pts))
        ax.barh(list(y), [100 * r["share"] for r in pts],
                color=[colors[r["engine"]] for r in pts])
        for i, r in enumerate(pts):
            ax.annotate(f"{100 * r['share']:.1f}% ({r['us']:.1f} us)", (100 * r["share"], i),
                        xytext=(3, 0), textcoords="offset points", va="center", fontsize=6.5)
        ax.set_yticks(list(y), [r["layer"] for r in pts], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, max(100 * r["share"] for r in pts) * 1.3)
        total = sum(r["us"] for r in pts)
        ax.set_title(f"{m}: share of end-to-end {total:.1f} us (blue sparsert, grey dense)")
    axes[-1, 0].set_xlabel("% of end-to-end time")
    return fig


def batch_map(data: dict) -> Figure:
    from matplotlib.colors import TwoSlopeNorm

    rows = data["rows"]
    problems = list(dict.fromkeys(r["problem"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    sparsities = sorted({r["sparsity"] for r in rows})
    fig, axes = plt.subplots(1, len(problems), squeeze=False, layout="constrained",
                             figsize=(0.7 * len(sparsities) * len(problems) + 1.5,
                                      0.5 * len(batches) + 1.8))
    top = max(abs(math.log2(r["speedup"])) for r in rows) or 1.0
    norm = TwoSlopeNorm(vmin=-top, vcenter=0.0, vmax=top)
    for ax, problem in zip(axes[0], problems):
        grid = [[math.nan] * len(sparsities) for _ in batches]
        for r in rows:
            if r["problem"] == problem:
                i, j = batches.index(r["batch"]), sparsities.index(r["sparsity"])
                grid[i][j] = math.log2(r["speedup"])
                text = f"{r['speedup']:.2f}" + ("" if r["speedup"] >= 1
                                                else f"\n{_label(r['against'])}")
                ax.text(j, i, text, ha="center", va="center", fontsize=6.5,
                        color="w" if abs(grid[i][j]) > 0.6 * top else "k")
        image = ax.imshow(grid, cmap="RdBu", norm=norm, aspect="auto", origin="lower")
        ax.set_xticks(range(len(sparsities)), [f"{s:g}" for s in sparsities])
        ax.set_yticks(range(len(batches)), [str(b) for b in batches])
        ax.set_xlabel("sparsity")
        ax.set_title(problem)
        ax.grid(False)
    axes[0, 0].set_ylabel("batch")
    bar = fig.colorbar(image, ax=axes[0, -1], shrink=0.9)
    bar.set_label("log2 speedup over the fastest baseline")
    fig.suptitle(f"sparsert vs the fastest of {', '.join(_label(n) for n in data['baselines'])}"
                 "\nblue: sparsity pays; red: the named baseline wins")
    return fig


FIGURES = {"speedup": speedup, "layers": layers, "roofline": roofline, "compare": compare,
           "tune": tune, "model": model, "map": batch_map}


def figure(kind: str, data: dict) -> Figure:
    with plt.rc_context(STYLE):
        fig = FIGURES[kind](data)
        fig.set_dpi(100)
    return fig


def save(fig: Figure, stem) -> list[str]:
    """PNG and SVG next to each other; no dates or versions in them, so they regenerate the same."""
    out = []
    with plt.rc_context(STYLE):
        for ext, meta in (("png", {"Software": None}),
                          ("svg", {"Date": None, "Creator": None})):
            path = f"{stem}.{ext}"
            fig.savefig(path, dpi=150, metadata=meta)
            out.append(path)
    return out


def svg_text(fig: Figure) -> str:
    """The figure as an <svg> element for inlining in HTML (no XML prolog or DOCTYPE)."""
    import io

    buf = io.StringIO()
    with plt.rc_context(STYLE):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def close(fig: Figure) -> None:
    plt.close(fig)
