"""Models results files (`kind: models`): entries keyed by model x precision x sparsity x batch
x variant (the sparse model's non-default options: `variant`), merged run by run, each entry keeping its own card and metadata; the dense baselines they were
measured against (`dense_baselines`, reused across sparsities); and the README table.

A long matrix is measured in parts (`sparsert model ... --out FILE --merge`, scripts/models-run):
each part replaces the entries it measured again and adds the new ones.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import UserError
from .results import load_results, stamp

KEY = ("model", "dtype", "sparsity", "batch")


# Options of `sparsert model` that measure another sparse model (option, its default, the name
# of the variant an entry measured without the default is): such an entry is kept beside the
# default one by --merge, not over it. (The dense baseline's compile mode is not one: an entry
# re-measured against another baseline replaces the old.)
VARIANTS = (("fuse_depthwise", True, "no-fuse-depthwise"),
            ("dependent_launch", True, "no-dependent-launch"),
            ("tune", False, "tuned"))


def variant(row: dict) -> str:
    """The entry's variant ("" for the default options; else e.g. "no-fuse-depthwise")."""
    options = row.get("options") or {}
    return "+".join(name for option, default, name in VARIANTS
                    if option in options and options[option] != default)


def entry_key(row: dict) -> tuple:
    """(model, dtype, sparsity, batch, variant) of an entry (sparsity None: the model's own
    zeros; variant "": the default options)."""
    sparsity = row.get("sparsity")
    return (row.get("model"), row.get("dtype"),
            None if sparsity is None else round(float(sparsity), 6), row.get("batch"),
            variant(row))


def load_models(path: Path) -> dict | None:
    """A models results file, checked (kind, schema, every entry keyed), or None if absent."""
    path = Path(path)
    if not path.exists():
        return None
    doc = load_results(path, kinds=("models",))
    for i, row in enumerate(doc["models"]):
        missing = [k for k in KEY if k not in row]
        if missing or not isinstance(row.get("model"), str):
            raise UserError(f"{path}: entry {i} lacks {', '.join(missing) or 'a model name'} "
                            f"(not a models results entry)")
        if not isinstance(row.get("options", {}), dict):
            raise UserError(f"{path}: entry {i} has options that are not an object "
                            f"({type(row['options']).__name__})")
        try:
            entry_key(row)
        except (TypeError, ValueError):
            raise UserError(f"{path}: entry {i} has a non-numeric sparsity "
                            f"{row.get('sparsity')!r}") from None
    baselines = doc.get("dense_baselines", [])
    if not isinstance(baselines, list) or not all(isinstance(b, dict) for b in baselines):
        raise UserError(f"{path}: 'dense_baselines' must be a list of objects")
    return doc


def merge(old: dict | None, new: dict) -> dict:
    """`new`'s entries over `old`'s (same key: replaced in place; else appended), dense
    baselines likewise (same model, dtype, input shape, compile mode and GPU), and `new`'s
    top-level fields (the last run's) over `old`'s."""
    if old is None:
        return new
    rows = {entry_key(r): r for r in old["models"]}
    for row in new["models"]:
        rows[entry_key(row)] = row

    def base_key(b):
        return json.dumps([b.get("model"), b.get("dtype"), b.get("input_shape"),
                           b.get("compile_mode"), (b.get("gpu") or {}).get("name")])

    bases = {base_key(b): b for b in old.get("dense_baselines", [])}
    bases.update({base_key(b): b for b in new.get("dense_baselines", [])})
    doc = {**old, **new, "models": list(rows.values())}
    if bases:
        doc["dense_baselines"] = list(bases.values())
    return stamp(doc, "models")


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file renamed into place: a run killed while
    writing leaves the previous file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dumps(doc: dict) -> str:
    return json.dumps(doc, indent=1, default=float) + "\n"


def _us(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown(doc: dict) -> str:
    """The README table of a models results file: one line per entry, sorted."""
    lines = ["| model | precision | sparsity | batch | sparsert µs | dense eager µs | "
             "dense graph µs | torch.compile µs | best dense | speedup | max rel err | "
             "layers replaced | GPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def order(row):
        model, dtype, sparsity, batch, kind = entry_key(row)
        return (model, dtype, batch or 0, -1.0 if sparsity is None else sparsity, kind)

    for row in sorted(doc["models"], key=order):
        dense = row.get("dense") or {}
        compile_us = dense.get("compile_us")
        mode = dense.get("compile_mode")
        modes = row.get("compile_modes_us") or {}
        if mode == "best" and len(modes) > 1:      # both modes measured: the winner, the other
            short = {"max-autotune-no-cudagraphs": "max-autotune"}
            won = min(modes, key=modes.get)
            mode = f"{short.get(won, won)}; " + ", ".join(
                f"{short.get(m, m)} {us:.1f}" for m, us in modes.items() if m != won)
        compiled = _us(compile_us) + (f" ({mode})" if compile_us and mode else "")
        speedup = row.get("speedup")
        err = row.get("max_rel_err")
        sparsity = row.get("sparsity")
        kind = variant(row)
        lines.append("| " + " | ".join([
            str(row["model"]) + (f" ({kind})" if kind else ""), str(row["dtype"]),
            "own" if sparsity is None else f"{sparsity:g}", str(row.get("batch")),
            _us(row.get("sparsert_us")) + (" (compile)" if row.get("sparsert_config") == "compile"
                                           else ""), _us(dense.get("eager_us")), _us(dense.get("graph_us")),
            compiled, str(row.get("best_dense", "-")),
            "-" if speedup is None else f"**{speedup:.2f}×**",
            "-" if err is None else f"{err:.1e}" + ("" if row.get("verified") else " (fails)"),
            f"{row.get('replaced', 0)}/{row.get('layers_total', 0)}",
            str((row.get("gpu") or {}).get("name", "-"))]) + " |")
    return "\n".join(lines) + "\n"
