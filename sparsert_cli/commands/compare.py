"""`sparsert compare BASE.json NEW.json`: per-case time ratios; non-zero exit on regression."""

from __future__ import annotations

import sys

import click

from ..console import console, print_json, table
from .. import results
from ..errors import UserError


def load_results(path: str) -> dict:
    """A bench results file (results.load_results refuses any other kind)."""
    return results.load_results(path, kinds=("bench",))


def _key(case: dict) -> str:
    return f"{case['problem']} {case.get('shape', '')} @{case['sparsity']:g}"


def _time(case: dict):
    verify = case.get("verify_gpu")
    if not isinstance(verify, dict) or not verify.get("ok"):
        return None
    return case.get("sparsert", {}).get("median_us")


# Between two lent H100s the same cubin (byte-identical SASS) of a ~2.5 us layer measured up to
# 0.26 us apart (docs/perf-notes.md, run 3 vs the baseline): a slowdown counts as a regression
# only when it is beyond both the relative limit and this absolute slack.
SLACK_US = 0.3


def compare(base: dict, new: dict, max_regression: float,
            slack_us: float = SLACK_US) -> tuple[list[dict], list[str]]:
    """Rows for every case of `base`, and the list of problems (regressed, missing, failing).
    A case regresses when new > base * (1 + max_regression) and new > base + slack_us."""
    new_cases = {_key(c): c for c in new["cases"]}
    rows, problems = [], []
    for case in base["cases"]:
        key = _key(case)
        old_us = _time(case)
        other = new_cases.get(key)
        row = {"case": key, "base_us": old_us, "new_us": None, "ratio": None, "status": "ok"}
        if other is None:
            row["status"] = "MISSING"
        else:
            row["new_us"] = _time(other)
            if row["new_us"] is None:
                row["status"] = "FAILED"
            elif old_us:
                row["ratio"] = row["new_us"] / old_us
                if (row["ratio"] > 1.0 + max_regression
                        and row["new_us"] > old_us + slack_us):
                    row["status"] = "REGRESSED"
                elif row["ratio"] < 1.0 - max_regression:
                    row["status"] = "faster"
        if row["status"] in ("MISSING", "FAILED", "REGRESSED"):
            problems.append(f"{key}: {row['status'].lower()}")
        rows.append(row)
    base_keys = {_key(c) for c in base["cases"]}
    for key, case in new_cases.items():     # cases the baseline does not have: shown, not failed
        if key not in base_keys:
            rows.append({"case": key, "base_us": None, "new_us": _time(case), "ratio": None,
                         "status": "new"})
    return rows, problems


@click.command("compare")
@click.argument("base_path", metavar="BASE.json")
@click.argument("new_path", metavar="NEW.json")
@click.option("--max-regression", type=click.FloatRange(0.0, 10.0), default=0.05,
              show_default=True, help="Allowed slowdown per case (0.05 = 5%).")
@click.option("--slack-us", type=click.FloatRange(0.0, 1000.0), default=SLACK_US,
              show_default=True, help="Slowdowns up to this many microseconds never count.")
@click.option("--json", "as_json", is_flag=True, help="Print rows as JSON.")
def command(base_path, new_path, max_regression, slack_us, as_json):
    """Compare two results files case by case; exit 1 on any regression, missing or failing case."""
    base, new = load_results(base_path), load_results(new_path)
    try:
        rows, problems = compare(base, new, max_regression, slack_us)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{base_path} / {new_path}: a case lacks the fields of a sparsert results "
                        f"file ({type(exc).__name__}: {exc})") from None
    if as_json:
        print_json({"rows": rows, "problems": problems})
    else:
        fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else "-"  # noqa: E731
        style = {"ok": "", "faster": "green", "new": "cyan", "REGRESSED": "red", "MISSING": "red",
                 "FAILED": "red"}
        out = table(f"{new_path} vs {base_path} (median us per launch; ratio = new / base)",
                    ["Case", "base us", "new us", "ratio", "Status"],
                    [[r["case"], fmt(r["base_us"]), fmt(r["new_us"]),
                      f"{r['ratio']:.3f}" if r["ratio"] else "-",
                      f"[{style[r['status']]}]{r['status']}[/]" if style[r["status"]]
                      else r["status"]] for r in rows])
        console.print(out)
        gm = [r["ratio"] for r in rows if r["ratio"]]
        if gm:
            import math
            console.print(f"geomean ratio new/base: {math.exp(sum(map(math.log, gm)) / len(gm)):.3f}"
                          f" over {len(gm)} cases")
    if problems:
        console.print(f"[red]{len(problems)} problem(s)[/] beyond {max_regression:.0%} and "
                      f"{slack_us:g} us: "
                      + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
        sys.exit(1)
