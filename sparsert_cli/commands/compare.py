"""`sparsert compare BASE.json NEW.json`: per-case, noise-aware time ratios; the regression gate
(the rule is HELP below)."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import click

from .. import results
from ..console import console, err_console, print_json, table
from ..errors import UserError
from ..paths import check_output

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

slower, missing and failed fail the gate. --retime [CONFIG] re-times the ambiguous cases on
the GPU at hand (NEW's config, unless CONFIG is given) and decides them again on NEW's samples
plus the new ones; without a GPU it says so and goes on. Both files must come from `sparsert
bench` on a GPU with the same GPU name and driver (else --allow-device-mismatch). Bad timings
(NaN, zero, negative, not a number) or a case listed twice are a one-line error, exit 2.
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


# ------------------------------------------------------------- re-timing ambiguous cases


def merge_samples(case: dict, fresh: list[float]) -> dict:
    """`case` with `fresh` samples added to its stored ones, its median / p20 / p80 (and the
    speedups and floor share that follow from the median) recomputed."""
    timing = dict(case["sparsert"])
    samples = list(timing.get("samples_us") or []) + list(fresh)
    timing.update(median_us=_percentile(samples, 50), p20_us=_percentile(samples, 20),
                  p80_us=_percentile(samples, 80), samples_us=samples,
                  retimed_samples=timing.get("retimed_samples", 0) + len(fresh))
    out = {**case, "sparsert": timing}
    mine = timing["median_us"]
    if isinstance(case.get("baselines"), dict):
        out["speedup"] = {n: b["median_us"] / mine for n, b in case["baselines"].items()
                          if isinstance(b, dict) and b.get("ok") and b.get("median_us")}
    if _positive(case.get("floor_us")):
        out["floor_pct"] = 100.0 * case["floor_us"] / mine
    return out


def retime_ambiguous(base: dict, new: dict, rows: list[dict], retime, max_regression: float,
                     slack_us: float = SLACK_US):
    """Re-time NEW's ambiguous cases with `retime(keys) -> {key: samples}` (the GPU, or a fake),
    merge the samples into NEW and decide every case again: (updated NEW, rows, problems).
    A re-timed row carries `retimed` (its number of new samples); a case that is still
    ambiguous stays so (reported, not failing)."""
    keys = [r["case"] for r in rows if r["status"] == "ambiguous"]
    fresh = {k: [s for s in v if _positive(s)] for k, v in (retime(keys) if keys else {}).items()
             if k in keys}
    fresh = {k: v for k, v in fresh.items() if v}
    cases = [merge_samples(c, fresh[_key(c)]) if _key(c) in fresh else c for c in new["cases"]]
    updated = {**new, "cases": cases}
    if fresh:
        updated["retimed"] = sorted(set(new.get("retimed", [])) | set(fresh))
        if "geomean" in new:
            from ..bench import summarize
            updated["geomean"] = summarize(cases)
    rows, problems = compare(base, updated, max_regression, slack_us)
    for row in rows:
        if row["case"] in fresh:
            row["retimed"] = len(fresh[row["case"]])
    return updated, rows, problems


def _in_order(values) -> list:
    return list(dict.fromkeys(values))


def retime_config(new: dict, new_path, config_arg: str | None):
    """The config NEW's cases are re-timed with, at NEW's precision and emitter: CONFIG if given;
    else the one NEW records (its path, else its shipped name), refused (UserError) when it no
    longer hashes as NEW recorded."""
    from ..config import load_config
    from ._common import select

    recorded = new.get("config") if isinstance(new.get("config"), dict) else {}
    if config_arg:
        config = load_config(config_arg)
    else:
        where = [w for w in (recorded.get("path"), recorded.get("name")) if isinstance(w, str)]
        for place in where:
            try:
                config = load_config(place)
                break
            except UserError:
                continue
        else:
            raise UserError(f"{new_path}: its config {' / '.join(where) or '(none recorded)'} "
                            f"cannot be loaded; give it: --retime CONFIG")
    changes = {k: recorded[k] for k in ("dtype", "accumulate", "emit") if k in recorded}
    allowed = {"dtype": ("fp32", "fp16", "bf16"), "accumulate": ("fp32", "fp16"),
               "emit": ("ptx", "cuda")}
    bad = [f"{k} {v!r}" for k, v in changes.items() if v not in allowed[k]]
    if bad:
        raise UserError(f"{new_path}: config records {bad[0]}, which sparsert cannot re-time")
    config = replace(config, **changes)
    if config_arg:
        return config
    candidates = [config]
    try:    # NEW may come from `bench --problems/--sparsity`: its config was that selection
        candidates.append(select(config, _in_order(c["problem"] for c in new["cases"]),
                                 _in_order(str(c["sparsity"]) for c in new["cases"]), None))
    except UserError:
        pass
    digests = {c.digest() for c in candidates} | {
        replace(c, allow_fp16_flush=True).digest() for c in candidates}
    if recorded.get("hash") not in digests:
        raise UserError(f"{config.path}: changed since {new_path} was measured (config hash "
                        f"{recorded.get('hash')} then, {config.digest()} now); give it as "
                        f"--retime CONFIG to re-time with it anyway")
    return config


def retime_groups(config, new: dict, keys: list[str]) -> list:
    """`config` narrowed to the cases `keys` names, one config per sparsity (run_benchmark
    times the product of problems and sparsities); UserError when a case is not in it."""
    from ._common import select

    by_key = {_key(c): c for c in new["cases"]}
    known = {p.id: p for p in config.problems}
    groups: dict[float, list[str]] = {}
    for key in keys:
        case = by_key[key]
        problem = known.get(case["problem"])
        if problem is None or problem.shape_text() != case.get("shape", problem.shape_text()):
            raise UserError(f"{config.path}: has no problem {case['problem']} "
                            f"{case.get('shape', '')} to re-time")
        groups.setdefault(case["sparsity"], []).append(case["problem"])
    return [select(config, ids, [str(s)], None) for s, ids in groups.items()]


def gpu_retimer(gpu, configs: list, new: dict):
    """A retime(keys) callable measuring on `gpu` as `bench` does (tuned plans, the kernel
    cache; no baselines); a case whose plan differs from NEW's is left out, with a warning."""
    def retime(keys):
        from ..bench import run_benchmark
        from ..cache import KernelCache
        from ..paths import tuned_db_path
        from ..tune import TunedDB

        plans = {_key(c): c.get("plan") for c in new["cases"]}
        tuned, cache, out = TunedDB(tuned_db_path(None)), KernelCache(), {}
        arch = new.get("arch") if isinstance(new.get("arch"), str) else gpu.arch
        for config in configs:
            doc = run_benchmark(config, gpu=gpu, gpu_name=gpu.name, arch=arch, tuned=tuned,
                                cache=cache, cold_l2=bool(new.get("cold_l2")), baselines=False)
            for record in doc["cases"]:
                key = _key(record)
                if key in keys and record.get("plan") != plans.get(key):
                    err_console.print(f"[yellow]sparsert: warning:[/] {key}: plan "
                                      f"{record.get('plan')} now, {plans.get(key)} in NEW; "
                                      f"not re-timed", highlight=False, soft_wrap=True)
                elif key in keys and record.get("verify_gpu", {}).get("ok"):
                    out[key] = record["sparsert"]["samples_us"]
        return out
    return retime


def _retime(base, new, new_path, rows, config_arg, allow_device_mismatch, max_regression,
            slack_us):
    """The --retime step of the command: (NEW, rows, problems) after re-timing, or None when
    nothing was re-timed (a line says why)."""
    from ..gpu.runtime import have_gpu

    keys = [r["case"] for r in rows if r["status"] == "ambiguous"]
    if not keys:
        return None
    groups = retime_groups(retime_config(new, new_path, config_arg), new, keys)
    if not have_gpu():
        err_console.print(f"[yellow]sparsert: {len(keys)} ambiguous case(s) not re-timed:[/] "
                          f"no GPU", highlight=False, soft_wrap=True)
        return None
    from ..gpu.runtime import Gpu
    gpu = Gpu()
    try:
        info = gpu.info()
        here = (info["name"], info.get("nvml_driver") or info.get("driver_version"))
        if here != device(new) and not allow_device_mismatch:
            err_console.print(f"[yellow]sparsert: {len(keys)} ambiguous case(s) not "
                              f"re-timed:[/] this GPU is {here[0]} (driver {here[1]}), "
                              f"{new_path} was measured on {device(new)[0]} (driver "
                              f"{device(new)[1]})", highlight=False, soft_wrap=True)
            return None
        updated, rows, problems = retime_ambiguous(base, new, rows,
                                                   gpu_retimer(gpu, groups, new),
                                                   max_regression, slack_us)
    finally:
        gpu.close()
    status = {r["case"]: r for r in rows}
    err_console.print(f"re-timed {sum('retimed' in r for r in rows)} of {len(keys)} ambiguous "
                      f"case(s): " + "; ".join(
                          f"{k} -> {status[k]['status']}" + (
                              f" (+{status[k]['retimed']} samples)" if "retimed" in status[k]
                              else " (not re-timed)") for k in keys),
                      highlight=False, soft_wrap=True)
    return updated, rows, problems


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
        status += " (re-timed)" if r.get("retimed") else ""
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
@click.option("--retime", "retime_arg", is_flag=False, flag_value="", default=None,
              metavar="[CONFIG]", help="Re-time the ambiguous cases on this GPU (with CONFIG, "
              "else NEW's recorded config) and decide them again; put it after NEW.json.")
@click.option("--retime-out", default=None, type=click.Path(dir_okay=False),
              help="With --retime: write NEW with the re-timed samples merged in.")
def command(base_path, new_path, max_regression, slack_us, allow_device_mismatch, as_json,
            as_markdown, as_github, retime_arg, retime_out):
    if as_json + as_markdown + as_github > 1:
        raise UserError("compare: give at most one of --json, --markdown, --github-json")
    if retime_out and retime_arg is None:
        raise UserError("compare: --retime-out needs --retime")
    if retime_out:
        check_output(Path(retime_out), "--retime-out")
    if retime_arg:
        from ..config import load_config
        load_config(retime_arg)     # a bad CONFIG fails now, ambiguous cases or not
    base, new = load_results(base_path), load_results(new_path)
    mismatch = device_mismatch(base, new, base_path, new_path)
    if mismatch and not allow_device_mismatch:
        raise UserError(f"{mismatch}; timings from different GPUs or drivers are not comparable "
                        f"(--allow-device-mismatch compares them anyway)")
    if mismatch:
        err_console.print(f"[yellow]sparsert: warning:[/] {mismatch}", highlight=False,
                          soft_wrap=True)
    rows, problems = compare(base, new, max_regression, slack_us)
    if retime_arg is not None:
        retimed = _retime(base, new, new_path, rows, retime_arg or None, allow_device_mismatch,
                          max_regression, slack_us)
        if retimed:
            new, rows, problems = retimed
    if retime_out:
        Path(retime_out).parent.mkdir(parents=True, exist_ok=True)
        Path(retime_out).write_text(json.dumps(new, indent=1) + "\n")
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
              _range(r["new_range"]), (f"[{style[r['status']]}]{r['status']}[/]"
                                       if style[r["status"]] else r["status"])
              + (" (re-timed)" if r.get("retimed") else "")] for r in rows]))
        console.print(summary(rows), highlight=False, soft_wrap=True)
    if problems:
        err_console.print(f"[red]{len(problems)} problem(s)[/] beyond {max_regression:.0%} and "
                          f"{slack_us:g} us: " + "; ".join(problems[:5])
                          + (" ..." if len(problems) > 5 else ""), highlight=False,
                          soft_wrap=True)
        sys.exit(1)
