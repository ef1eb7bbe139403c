"""One self-contained, offline HTML file from results files: inline SVG figures, tables, metadata.

Nothing is fetched: no external scripts, styles, fonts or images; a Content-Security-Policy
forbids any (a browser logs a console error if something tries). The one inline script measures
each figure and writes the sizes into the DOM (`data-sizes` on <body>), which the headless-browser
test reads back.
"""

from __future__ import annotations

import html
from pathlib import Path

from . import plots, results
from .errors import UserError
from .plots.data import LABELS, baseline_timing, percentiles, pick_baselines, timed

KINDS = ("bench", "sweep", "tune", "models")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;
max-width:1400px;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:12px}
th,td{border:1px solid #ddd;padding:2px 6px;text-align:right;white-space:nowrap}
th{background:#f3f3f3}td.l,th.l{text-align:left}tr.fail td{color:#b00}
figure{margin:1em 0}figure svg{max-width:100%;height:auto;display:block}
figcaption{color:#555;font-size:12px}.meta th{text-align:left;font-weight:600}
.note{color:#666}
"""
CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "img-src data:")
# Measures every figure once laid out; the headless-browser test reads the result from the DOM.
CHECKER = """
document.body.setAttribute('data-sizes', JSON.stringify(Array.from(
  document.querySelectorAll('figure[data-figure]'), function (f) {
    var r = f.querySelector('svg').getBoundingClientRect();
    return [f.getAttribute('data-figure'), r.width, r.height]; })));
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value, fmt: str = "{:.2f}", none: str = "-") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else none


def _table(head: list[str], rows: list[list[str]], left: int = 1, classes=None) -> str:
    """`rows` are already-escaped cell strings; the first `left` columns align left."""
    th = "".join(f'<th class="l">{_e(h)}</th>' if i < left else f"<th>{_e(h)}</th>"
                 for i, h in enumerate(head))
    body = []
    for j, row in enumerate(rows):
        cls = f' class="{classes[j]}"' if classes and classes[j] else ""
        body.append(f"<tr{cls}>" + "".join(f'<td class="l">{c}</td>' if i < left
                                           else f"<td>{c}</td>" for i, c in enumerate(row))
                    + "</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure(kind: str, data: dict, caption: str) -> str:
    return (f'<figure data-figure="{_e(kind)}">{plots.svg(kind, data)}'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def metadata(path: Path, doc: dict) -> str:
    gpu, cfg = doc.get("gpu") or {}, doc.get("config") or {}
    clocks, floors = gpu.get("clocks") or {}, doc.get("floors") or {}
    timing = doc.get("timing") or {}
    items = [("file", path), ("kind", f"{doc['kind']} (schema {doc.get('schema')})"),
             ("GPU", f"{gpu.get('name', 'none')} ({gpu.get('sm_count', '?')} SMs, "
                     f"{gpu.get('arch', doc.get('arch', '?'))})" if gpu else "none (CPU only)"),
             ("driver", f"{gpu.get('nvml_driver', '?')} (CUDA {gpu.get('driver_version', '?')})"
              if gpu else "-"),
             ("clocks", f"SM {clocks.get('sm_mhz', '?')} / {clocks.get('sm_max_mhz', '?')} MHz, "
                        f"memory {clocks.get('mem_mhz', '?')} MHz, "
                        f"{clocks.get('temperature_c', '?')} C" if clocks else "-"),
             ("floors", f"{floors['fp32_gflops'] / 1e3:.1f} TFLOP/s FP32, "
                        f"{floors['bandwidth_gbs'] / 1e3:.2f} TB/s, launch "
                        f"{floors['launch_us']:.2f} us (measured)" if floors else "-"),
             ("timing", f"{timing.get('method', '-')}, L2 "
                        f"{'cold' if doc.get('cold_l2') else 'warm'}" if timing else "-"),
             ("commit", doc.get("git_commit", "-")),
             ("sparsert", doc.get("sparsert_version", "-")),
             ("timestamp", doc.get("timestamp", "-")),
             ("config", ", ".join(f"{k}={v}" for k, v in cfg.items()) or "-"),
             ("precision", doc.get("precision", "-"))]
    return ('<table class="meta">' + "".join(f"<tr><th>{_e(k)}</th><td class=\"l\">{_e(v)}</td>"
                                            f"</tr>" for k, v in items if v != "-")
            + "</table>")


def cases_table(doc: dict, names: list[str]) -> str:
    head = ["problem", "S", "nnz", "plan", "sparsert us", "p20-p80"] + [
        f"{LABELS[n]} us" for n in names] + [f"x {LABELS[n]}" for n in names] + [
        "% floor", "bound"]
    rows, classes = [], []
    for c in doc["cases"]:
        mine = timed(c)
        med, p20, p80 = percentiles(mine) if mine else (None, None, None)
        row = [_e(c.get("problem")), _e(f"{c.get('sparsity', 0):g}"), _e(c.get("nnz", "-")),
               _e(c.get("plan", "-")), _num(med) if mine else "FAIL / not timed",
               f"{p20:.2f}-{p80:.2f}" if mine else "-"]
        row += [_num((baseline_timing(c, n) or {}).get("median_us")) for n in names]
        row += [_num((c.get("speedup") or {}).get(n), "{:.2f}x") for n in names]
        row += [_num(c.get("floor_pct"), "{:.0f}%"), _e(c.get("bound", "-"))]
        rows.append(row)
        classes.append("" if mine else "fail")
    return _table(head, rows, left=1, classes=classes)


def geomean_table(doc: dict, names: list[str]) -> str:
    rows = []
    for label, key in (("all", "geomean"), ("convolutions", "geomean_convs")):
        for s, summary in (doc.get(key) or {}).items():
            rows.append([_e(label), _e(s), _e(summary.get("cases", "-"))]
                        + [_num(summary.get(n), "{:.2f}x") for n in names]
                        + [_num(summary.get("floor_pct"), "{:.0f}%")])
    if not rows:
        return ""
    return "<h3>Geomean speedups</h3>" + _table(
        ["cases", "S", "count"] + [f"x {LABELS[n]}" for n in names] + ["% floor"], rows, left=1)


def bench_section(path: Path, doc: dict) -> str:
    docs = [(path, doc)]
    names = pick_baselines(docs, None)
    parts = [metadata(path, doc)]
    if not any(timed(c) for c in doc["cases"]):
        parts.append('<p class="note">No case was timed on a GPU (a CPU-only run, or every '
                     'case failed): no figures.</p>')
    else:
        parts.append(_figure("layers", plots.data.rows_for("layers", docs),
                             "Per-layer time of sparsert and each baseline; whiskers p20-p80 of "
                             "the stored samples."))
        if doc.get("floors"):
            parts.append(_figure("roofline", plots.data.rows_for("roofline", docs),
                                 "Roofline from the floors measured in this run; labels: % of "
                                 "each case's floor."))
        if len({float(c["sparsity"]) for c in doc["cases"] if timed(c)}) >= 2:
            data = plots.data.rows_for("speedup", docs)
            even = "; ".join(f"{LABELS[e['baseline']]}: "
                             + (f"{e['sparsity']:.3f}" if e["sparsity"] is not None
                                else e["note"]) for e in data["break_even"])
            parts.append(_figure("speedup", data, f"Speedup vs sparsity. Break-even sparsity "
                                                  f"(geomean crosses 1): {even}."))
    parts.append("<h3>Cases</h3>" + cases_table(doc, names) + geomean_table(doc, names))
    return "".join(parts)


def tune_section(path: Path, doc: dict) -> str:
    data = plots.data.rows_for("tune", [(path, doc)])
    rows = [[_e(f"{c['problem']} @{float(c['sparsity']):g}"), _num(c["default_us"]),
             _num(c["best_us"]), _e(c.get("best_plan", "-")), _e(len(c["candidates"])),
             _num(c["default_us"] / c["best_us"], "{:.2f}x")] for c in doc["cases"]]
    return (metadata(path, doc) + _figure("tune", data, "Every candidate's time, the default "
                                          "plan and the winner.")
            + _table(["case", "default us", "winner us", "winner plan", "candidates",
                      "gain"], rows))


def models_section(path: Path, doc: dict) -> str:
    data = plots.data.rows_for("model", [(path, doc)])
    rows = [[_e(r["model"]), _e(r["layer"]), _e(r["engine"]), _num(r["us"]),
             _num(100 * r["share"], "{:.1f}%")] for r in data["rows"]]
    return (metadata(path, doc) + _figure("model", data, "Each layer's share of the model's "
                                          "end-to-end time.")
            + _table(["model", "layer", "runs on", "us", "share"], rows, left=3))


SECTIONS = {"bench": bench_section, "sweep": bench_section, "tune": tune_section,
            "models": models_section}


def build(paths, title: str = "sparsert report") -> str:
    """The whole HTML page. Raises UserError for a bad input before anything is written."""
    plots.require_matplotlib()
    sections = []
    docs = [(Path(p), results.load_results(p, kinds=KINDS)) for p in paths]   # all, first
    for path, doc in docs:
        try:
            body = SECTIONS[doc["kind"]](path, doc)
        except UserError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise UserError(f"{path}: lacks the fields the report reads "
                            f"({type(exc).__name__}: {exc})") from None
        name = (doc.get("config") or {}).get("name") or path.stem
        sections.append(f'<section data-file="{_e(path)}"><h2>{_e(name)} '
                        f'<small class="note">{_e(path)}</small></h2>{body}</section>')
    head = (f'<meta charset="utf-8"><meta http-equiv="Content-Security-Policy" '
            f'content="{CSP}"><meta name="viewport" content="width=device-width">'
            f"<title>{_e(title)}</title><style>{CSS}</style>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head>{head}</head><body><h1>{_e(title)}</h1>'
            f'<p class="note">Made by <code>sparsert report</code> from '
            f"{_e(', '.join(map(str, paths)))}; times are medians per launch in microseconds."
            f"</p>{''.join(sections)}<script>{CHECKER}</script></body></html>\n")


def write(paths, out, title: str = "sparsert report") -> Path:
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out}: is a directory; -o takes the HTML file to write")
    text = build(paths, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out
