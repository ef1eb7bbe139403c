"""`sparsert compare BASE.json NEW.json`: per-case, noise-aware time ratios; the regression gate
(the rule is HELP below)."""

from __future__ import annotations

import json
import math
import sys

import click

from .. import results
from ..console import console, err_console, print_json, table
from ..errors import UserError

# Between two lent H100s the same cubin (byte-identical SASS) of a ~2.5 us layer measured up to
# 0.26 us apart (docs/perf-notes.md, run 3 vs the baseline): a change counts only when it is
# beyond both the relative limit and this absolute slack.
SLACK_US = 0.3
MIN_SAMPLES = 3
FAILING = ("slower", "missing", "failed")
HELP = f"""Compare two bench results files case by case; exit 1 on a slower, missing or failed case.

Each case's status comes from its median time and the timing samples stored with it (their
p20-p80 range):

\b
  slower/faster  NEW differs from BASE by more than --max-regression (5%) AND --slack-us
                 (0.3 us), and the sample ranges do not overlap (NEW p20 > BASE p80 for
                 slower, NEW p80 < BASE p20 for faster)
  ambiguous      beyond both thresholds, but the ranges overlap or a side has fewer than
                 {MIN_SAMPLES} samples: reported, never fails the gate (re-time it)
  same           within either threshold
  new            only in NEW (or not verified in BASE)
  missing        only in BASE
  failed         not verified on the GPU in NEW

slower, missing and failed fail the gate. Both files must come from `sparsert bench` on a GPU
with the same GPU name and driver (else --allow-device-mismatch). Bad timings (NaN, zero,
negative, not a number) or a case listed twice are a one-line error, exit 2.
"""
STATUSES = ("slower", "faster", "ambiguous", "same", "new", "missing", "failed")


def _key(case: dict) -> str:
    return f"{case['problem']} {case.get('shape', '')} @{case['sparsity']:g}"


def _positive(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def check_timings(doc: dict, path) -> dict:
    """`doc` if every case has a well-formed key and only positive finite times, each case once;
    else UserError naming the file and the case."""
    if doc.get("mode") != "gpu":
        raise UserError(f"{path}: {doc.get('mode', 'unknown')} results hold no GPU timings; "
                        f"compare needs results of `sparsert bench` on a GPU")
    seen = set()
    for number, case in enumerate(doc["cases"]):
        if not isinstance(case.get("problem"), str) or not isinstance(
                case.get("sparsity"), (int, float)) or isinstance(case.get("sparsity"), bool):
            raise UserError(f"{path}: case {number} lacks a problem name or a numeric sparsity")
        key = _key(case)
        if key in seen:
            raise UserError(f"{path}: case {key} is listed twice")
        seen.add(key)
        timing = case.get("sparsert", {})
        if not isinstance(timing, dict):
            raise UserError(f"{path}: case {key}: 'sparsert' is not an object")
        median, samples = timing.get("median_us"), timing.get("samples_us", [])
        if median is not None and not _positive(median):
            raise UserError(f"{path}: case {key}: median_us {median!r} is not a positive finite "
                            f"number of microseconds")
        if not isinstance(samples, list) or not all(map(_positive, samples)):
            bad = samples if not isinstance(samples, list) else next(
                s for s in samples if not _positive(s))
            raise UserError(f"{path}: case {key}: samples_us holds {bad!r}, not a positive "
                            f"finite number of microseconds")
    return doc


def load_results(path) -> dict:
    """A bench results file with GPU timings (results.load_results refuses any other kind)."""
    return check_timings(results.load_results(path, kinds=("bench",)), path)


def device(doc: dict) -> tuple:
    """(GPU name, driver) a results file was measured with."""
    gpu = doc.get("gpu") if isinstance(doc.get("gpu"), dict) else {}
    return gpu.get("name"), gpu.get("nvml_driver") or gpu.get("driver_version")


def device_mismatch(base: dict, new: dict, base_path, new_path) -> str | None:
    """A sentence saying how the two runs' GPUs or drivers differ, or None when they match."""
    if device(base) == device(new):
        return None
    (bname, bdrv), (nname, ndrv) = device(base), device(new)
    return (f"{base_path} was measured on {bname} (driver {bdrv}), {new_path} on {nname} "
            f"(driver {ndrv})")


def _time(case: dict):
    verify = case.get("verify_gpu")
    if not isinstance(verify, dict) or not verify.get("ok"):
        return None
    return case.get("sparsert", {}).get("median_us")


def _percentile(values: list, q: float) -> float:
    """Linear-interpolation percentile (numpy's default), as the runtime stores p20/p80."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _spread(case: dict) -> tuple[float, float] | None:
    samples = case.get("sparsert", {}).get("samples_us") or []
    if len(samples) < MIN_SAMPLES:
        return None
    return _percentile(samples, 20), _percentile(samples, 80)


def _status(old_us, new_us, old_range, new_range, max_regression, slack_us) -> str:
    if new_us > old_us * (1 + max_regression) and new_us - old_us > slack_us:
        direction, separated = "slower", old_range and new_range and new_range[0] > old_range[1]
    elif new_us < old_us * (1 - max_regression) and old_us - new_us > slack_us:
        direction, separated = "faster", old_range and new_range and new_range[1] < old_range[0]
    else:
        return "same"
    return direction if separated else "ambiguous"


def compare(base: dict, new: dict, max_regression: float,
            slack_us: float = SLACK_US) -> tuple[list[dict], list[str]]:
    """Rows for every case of `base` (then the cases only `new` has), and the list of gate
    failures (slower, missing, failed), by the rule in HELP."""
    new_cases = {_key(c): c for c in new["cases"]}
    rows, problems = [], []
    for case in base["cases"]:
        key, other = _key(case), new_cases.get(_key(case))
        row = {"case": key, "base_us": _time(case), "new_us": None, "ratio": None,
               "base_range": _spread(case), "new_range": None, "status": "missing"}
        if other is not None:
            row.update(new_us=_time(other), new_range=_spread(other))
            if row["new_us"] is None:
                row["status"] = "failed"
            elif row["base_us"] is None:
                row["status"] = "new"             # nothing verified to compare against
            else:
                row["ratio"] = row["new_us"] / row["base_us"]
                row["status"] = _status(row["base_us"], row["new_us"], row["base_range"],
                                        row["new_range"], max_regression, slack_us)
        if row["status"] in FAILING:
            problems.append(f"{key}: {row['status']}")
        rows.append(row)
    base_keys = {_key(c) for c in base["cases"]}
    for key, case in new_cases.items():     # cases the baseline does not have: shown, not failed
        if key not in base_keys:
            rows.append({"case": key, "base_us": None, "new_us": _time(case), "ratio": None,
                         "base_range": None, "new_range": _spread(case), "status": "new"})
    return rows, problems


def geomean(rows: list[dict]) -> float | None:
    ratios = [r["ratio"] for r in rows if r["ratio"]]
    return math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None


def summary(rows: list[dict]) -> str:
    """'1 slower, 2 faster, 0 ambiguous, 37 same; geomean ratio new/base 0.985 over 40 cases'."""
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    parts = [f"{counts[s]} {s}" for s in STATUSES[:4]] + [
        f"{counts[s]} {s}" for s in STATUSES[4:] if counts[s]]
    gm = geomean(rows)
    ratios = sum(1 for r in rows if r["ratio"])
    return ", ".join(parts) + (f"; geomean ratio new/base {gm:.3f} over {ratios} cases"
                               if gm else "")


def _us(value) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"


def _range(span) -> str:
    return f"{span[0]:.2f}-{span[1]:.2f}" if span else "-"


def markdown(rows: list[dict], max_regression: float, slack_us: float) -> str:
    """A pull-request comment: the summary line, the rule, one table row per case."""
    lines = [f"**sparsert compare**: {summary(rows)}", "",
             f"A case is *slower*/*faster* beyond {max_regression:.0%} and {slack_us:g} us with "
             f"separated p20-p80 sample ranges; *ambiguous* when the ranges overlap.", "",
             "| Case | base us | new us | ratio | base p20-p80 | new p20-p80 | status |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        status = f"**{r['status']}**" if r["status"] in FAILING else r["status"]
        lines.append(f"| {r['case'].replace('|', '/')} | {_us(r['base_us'])} | "
                     f"{_us(r['new_us'])} | {_ratio(r)} | {_range(r['base_range'])} | "
                     f"{_range(r['new_range'])} | {status} |")
    return "\n".join(lines)


def _ratio(row) -> str:
    return f"{row['ratio']:.3f}" if row["ratio"] else "-"


def github_benchmark(new: dict) -> list[dict]:
    """NEW's cases in github-action-benchmark's `customSmallerIsBetter` format."""
    name, driver = device(new)
    out = []
    for case in new["cases"]:
        value = _time(case)
        if value is None:
            continue
        entry = {"name": _key(case), "unit": "us", "value": value}
        span = _spread(case)
        if span:
            entry["range"] = f"± {(span[1] - span[0]) / 2:.3f}"
        entry["extra"] = (f"p20-p80 {_range(span)} us over "
                          f"{len(case['sparsert'].get('samples_us') or [])} samples\n"
                          f"{name} (driver {driver})")
        out.append(entry)
    return out


@click.command("compare", help=HELP)
@click.argument("base_path", metavar="BASE.json")
@click.argument("new_path", metavar="NEW.json")
@click.option("--max-regression", type=click.FloatRange(0.0, 10.0), default=0.05,
              show_default=True, help="Relative change a case must exceed (0.05 = 5%).")
@click.option("--slack-us", type=click.FloatRange(0.0, 1000.0), default=SLACK_US,
              show_default=True, help="Absolute change (microseconds) a case must exceed.")
@click.option("--allow-device-mismatch", is_flag=True,
              help="Compare runs from different GPU names or drivers (with a warning).")
@click.option("--json", "as_json", is_flag=True, help="Print rows as JSON.")
@click.option("--markdown", "as_markdown", is_flag=True,
              help="Print a pull-request comment (summary line, then a Markdown table).")
@click.option("--github-json", "as_github", is_flag=True,
              help="Print NEW's times for github-action-benchmark (customSmallerIsBetter).")
def command(base_path, new_path, max_regression, slack_us, allow_device_mismatch, as_json,
            as_markdown, as_github):
    if as_json + as_markdown + as_github > 1:
        raise UserError("compare: give at most one of --json, --markdown, --github-json")
    base, new = load_results(base_path), load_results(new_path)
    mismatch = device_mismatch(base, new, base_path, new_path)
    if mismatch and not allow_device_mismatch:
        raise UserError(f"{mismatch}; timings from different GPUs or drivers are not comparable "
                        f"(--allow-device-mismatch compares them anyway)")
    if mismatch:
        err_console.print(f"[yellow]sparsert: warning:[/] {mismatch}", highlight=False,
                          soft_wrap=True)
    rows, problems = compare(base, new, max_regression, slack_us)
    if as_json:
        print_json({"rows": rows, "problems": problems, "summary": summary(rows)})
    elif as_github:
        sys.stdout.write(json.dumps(github_benchmark(new), indent=2, ensure_ascii=False) + "\n")
    elif as_markdown:
        sys.stdout.write(markdown(rows, max_regression, slack_us) + "\n")
    else:
        style = {"same": "", "faster": "green", "new": "cyan", "ambiguous": "yellow",
                 "slower": "red", "missing": "red", "failed": "red"}
        console.print(table(
            f"{new_path} vs {base_path} (median us per launch; ratio = new / base)",
            ["Case", "base us", "new us", "ratio", "base p20-p80", "new p20-p80", "Status"],
            [[r["case"], _us(r["base_us"]), _us(r["new_us"]), _ratio(r), _range(r["base_range"]),
              _range(r["new_range"]), f"[{style[r['status']]}]{r['status']}[/]"
              if style[r["status"]] else r["status"]] for r in rows]))
        console.print(summary(rows), highlight=False, soft_wrap=True)
    if problems:
        err_console.print(f"[red]{len(problems)} problem(s)[/] beyond {max_regression:.0%} and "
                          f"{slack_us:g} us: " + "; ".join(problems[:5])
                          + (" ..." if len(problems) > 5 else ""), highlight=False,
                          soft_wrap=True)
        sys.exit(1)
