"""Results files: what each one is (`kind`, `schema`), and one loader that refuses the wrong one.

Every JSON file sparsert writes under results/ says what it holds:

    {"kind": "bench" | "tune" | "models" | "sweep" | "scale", "schema": 2, ...}

Files written before kinds existed (schema 1, a `cases` list) are bench results. `plot`, `report`
and `compare` load through `load_results(path, kinds=...)`, so a file of another kind or a newer
schema is one clear line (UserError, exit 2), never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

SCHEMA = 2
KINDS = ("bench", "tune", "models", "sweep", "scale")
# The list each kind keeps its rows in.
ROWS = {"bench": "cases", "tune": "cases", "models": "models", "sweep": "cases", "scale": "runs"}


def stamp(doc: dict, kind: str) -> dict:
    """`doc` with its kind and schema first (what every writer calls before saving)."""
    if kind not in KINDS:
        raise ValueError(f"unknown results kind {kind!r}")
    return {"kind": kind, "schema": SCHEMA, **{k: v for k, v in doc.items()
                                                if k not in ("kind", "schema")}}


def kind_of(doc: object) -> str | None:
    """The kind of a parsed results document, or None when it is not one."""
    if not isinstance(doc, dict):
        return None
    kind = doc.get("kind")
    if kind is None and doc.get("schema") == 1 and isinstance(doc.get("cases"), list):
        return "bench"                              # written before kinds existed
    return kind if kind in KINDS else None


def load_results(path: str | Path, kinds: tuple[str, ...] | None = None) -> dict:
    """Parse and check a results file. `kinds` limits what is accepted (default: any kind)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: no such results file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a results file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read results file ({exc})") from None
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UserError(f"{path}: not a results JSON file ({str(exc)[:120]})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: not a sparsert results file (the top level is not an object)")
    schema = doc.get("schema")
    if isinstance(schema, bool) or not isinstance(schema, int):
        raise UserError(f"{path}: not a sparsert results file (no integer 'schema')")
    if schema > SCHEMA:
        raise UserError(f"{path}: results schema {schema} is newer than this sparsert reads "
                        f"({SCHEMA}); upgrade sparsert")
    kind = kind_of(doc)
    if kind is None:
        raise UserError(f"{path}: not a sparsert results file (kind {doc.get('kind')!r}; "
                        f"known: {', '.join(KINDS)})")
    if kinds is not None and kind not in kinds:
        raise UserError(f"{path}: holds {kind} results; this needs {' or '.join(kinds)} results")
    rows = doc.get(ROWS[kind])
    if not isinstance(rows, list):
        raise UserError(f"{path}: {kind} results without a '{ROWS[kind]}' list")
    if not rows and not (kind == "models" and doc.get("dense_baselines")):
        # (a models file may hold only the dense baselines measured before its first entry)
        raise UserError(f"{path}: {kind} results with no {ROWS[kind]}")
    if not all(isinstance(row, dict) for row in rows):
        raise UserError(f"{path}: {kind} results whose '{ROWS[kind]}' are not all objects")
    doc["kind"] = kind
    return doc
