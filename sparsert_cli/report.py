"""Render benchmark results: Rich tables, CSV, markdown (for the README)."""

from __future__ import annotations

import csv
import io

from rich.markup import escape
from rich.table import Table

COLUMNS = [("cublas_fp32", "cuBLAS fp32"), ("cublas_tf32", "TF32"), ("cublas_fp16", "fp16 TC"),
           ("cublas_bf16", "bf16 TC"), ("cusparse", "cuSPARSE"), ("cudnn_fp32", "cuDNN fp32"),
           ("cudnn_fp16", "cuDNN fp16"), ("cudnn_bf16", "cuDNN bf16"),
           ("im2col_cusparse", "im2col+cuSPARSE")]


def _us(value) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"


def _x(value) -> str:
    return f"{value:.2f}x" if isinstance(value, (int, float)) else "-"


def _baseline_us(case: dict, name: str):
    b = case.get("baselines", {}).get(name)
    if not b:
        return None
    return b.get("median_us") if b.get("ok") else "FAIL"


def results_table(doc: dict) -> Table:
    gpu = doc.get("gpu", {}).get("name", "no GPU")
    cols = [name for name, _ in COLUMNS
            if any(name in c.get("baselines", {}) for c in doc["cases"])]
    title = (f"sparsert {doc['config']['name']} on {gpu} - median us per launch "
             f"(CUDA-graph replay, L2 {'cold' if doc.get('cold_l2') else 'warm'}); "
             "dense baselines of convolutions run on the GEMM view (im2col not timed)")
    t = Table(title=title, title_justify="left", header_style="bold", show_footer=False)
    t.add_column("Problem")
    t.add_column("S", justify="right")
    t.add_column("nnz", justify="right")
    t.add_column("family")
    t.add_column("sparsert", justify="right")
    for name, label in COLUMNS:
        if name in cols:
            t.add_column(label, justify="right")
    for name, label in COLUMNS:
        if name in cols:
            t.add_column(f"x{label.split()[0]}" if name != "cublas_fp32" else "x fp32",
                         justify="right")
    t.add_column("% floor", justify="right")
    t.add_column("max err", justify="right")
    for case in doc["cases"]:
        ok = case.get("verify_gpu", {}).get("ok", case.get("verify_cpu", {}).get("ok"))
        mine = case.get("sparsert", {}).get("median_us")
        style = "" if ok else "red"
        row = [case["problem"], f"{case['sparsity']:g}", str(case["nnz"]),
               case.get("family", "immediate"), _us(mine) if ok else "[red]FAIL[/]"]
        row += [_us(_baseline_us(case, n)) if _baseline_us(case, n) != "FAIL" else "[red]FAIL[/]"
                for n in cols]
        row += [_x(case.get("speedup", {}).get(n)) for n in cols]
        err = case.get("verify_gpu", case.get("verify_cpu", {})).get("max_err")
        row += [f"{case['floor_pct']:.0f}%" if "floor_pct" in case else "-",
                f"{err:.1e}" if isinstance(err, (int, float)) else "-"]
        t.add_row(*row, style=style)
    for s, summary in doc.get("geomean", {}).items():
        row = ["[bold]geomean[/]", s, "", "", ""] + ["" for _ in cols]
        row += [f"[bold]{_x(summary.get(n))}[/]" for n in cols]
        row += [f"{summary['floor_pct']:.0f}%" if summary.get("floor_pct") else "", ""]
        t.add_row(*row)
    return t


def compile_table(doc: dict) -> Table:
    t = Table(title=f"sparsert {doc['config']['name']}: compile + CPU verification "
              f"({doc.get('arch')}, {doc['config']['emit']})", title_justify="left",
              header_style="bold")
    for col in ("Problem", "S", "nnz", "family", "plan", "regs", "spill B", "compile s", "cached",
                "CPU check", "max err"):
        t.add_column(col, justify="left" if col in ("Problem", "family", "plan", "CPU check")
                     else "right")
    for case in doc["cases"]:
        comp = case.get("compile", {})
        ver = case.get("verify_cpu", {})
        ok = comp.get("ok") and ver.get("ok")
        t.add_row(case["problem"], f"{case['sparsity']:g}", str(case["nnz"]),
                  case.get("family", "immediate"), case["plan"],
                  str(comp.get("registers", "-")), str(comp.get("spill_bytes", "-")),
                  f"{comp['seconds']:.2f}" if "seconds" in comp else "-",
                  "yes" if comp.get("cached") else "no",
                  "ok" if ok else f"[red]{escape(comp.get('error') or ver.get('message', 'FAIL'))}[/]",
                  f"{ver['max_err']:.1e}" if isinstance(ver.get("max_err"), float) else "-",
                  style="" if ok else "red")
    return t


CSV_FIELDS = ["problem", "sparsity", "op", "shape", "m", "k", "n", "nnz", "family", "plan",
              "tuned", "sparsert_us", "sparsert_p20_us", "sparsert_p80_us"] + [
    f"{n}_us" for n, _ in COLUMNS] + ["cusparse_algorithm"] + [
    f"speedup_{n}" for n, _ in COLUMNS] + ["floor_us", "floor_bound", "floor_pct",
                                           "verified", "max_err", "compile_s", "registers"]


def csv_text(doc: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for c in doc["cases"]:
        mine = c.get("sparsert", {})
        ver = c.get("verify_gpu", c.get("verify_cpu", {}))
        row = {k: c.get(k) for k in ("problem", "sparsity", "op", "shape", "m", "k", "n", "nnz",
                                     "family", "plan", "tuned", "floor_us", "floor_pct")}
        row.update(sparsert_us=mine.get("median_us"), sparsert_p20_us=mine.get("p20_us"),
                   sparsert_p80_us=mine.get("p80_us"), floor_bound=c.get("bound"),
                   verified=ver.get("ok"), max_err=ver.get("max_err"),
                   compile_s=c.get("compile", {}).get("seconds"),
                   registers=c.get("compile", {}).get("registers"),
                   cusparse_algorithm=c.get("baselines", {}).get("cusparse", {})
                   .get("info", {}).get("algorithm"))
        for n, _ in COLUMNS:
            b = c.get("baselines", {}).get(n, {})
            row[f"{n}_us"] = b.get("median_us") if b.get("ok") else None
            row[f"speedup_{n}"] = c.get("speedup", {}).get(n)
        writer.writerow(row)
    return buf.getvalue()


def markdown_table(doc: dict, times=None, speedups=None) -> str:
    """The README table: one row per case, geomeans last. `times` / `speedups` pick baseline
    columns (default: every baseline present)."""
    present = [n for n, _ in COLUMNS if any(n in c.get("baselines", {}) for c in doc["cases"])]
    times = [n for n in (times or present) if n in present]
    speedups = [n for n in (speedups or present) if n in present]
    labels = dict(COLUMNS)
    head = ["problem", "S", "nnz", "sparsert us"] + [f"{labels[n]} us" for n in times] + [
        f"x {labels[n]}" for n in speedups] + ["% floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in doc["cases"]:
        mine = c.get("sparsert", {}).get("median_us")
        cells = [c["problem"], f"{c['sparsity']:g}", str(c["nnz"]), _us(mine)]
        cells += [_us(_baseline_us(c, n)) if _baseline_us(c, n) != "FAIL" else "FAIL"
                  for n in times]
        cells += [_x(c.get("speedup", {}).get(n)) for n in speedups]
        cells.append(f"{c['floor_pct']:.0f}%" if "floor_pct" in c else "-")
        lines.append("| " + " | ".join(cells) + " |")
    for label, key in (("geomean", "geomean"), ("geomean, convs", "geomean_convs")):
        for s, summary in doc.get(key, {}).items():
            cells = [f"**{label}**", s, "", ""] + [""] * len(times)
            cells += [f"**{_x(summary.get(n))}**" for n in speedups]
            cells.append(f"{summary['floor_pct']:.0f}%" if summary.get("floor_pct") else "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
