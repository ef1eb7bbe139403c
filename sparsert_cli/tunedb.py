"""The tuning database: every measurement of every candidate, in SQLite, for many writers.

One row per (job, GPU) measurement: what was compiled (pattern hash, layer shape, precision,
kernel family and version, plan name and parameters, cubin hash, the plan's cost features for
`calibrate`), where it ran (GPU name, SM
count, driver, clocks, host), what came out (median/p20/p80 over n samples, verified, error),
when, and which tuning run wrote it (`run_id`: one id per `sparsert tune` invocation, shared by
all its GPU workers; NULL in the rows of databases older than the column). WAL mode and a busy
timeout let one process per GPU, on one host, write into one file at once; each row commits on
its own, so a crash loses at most the measurement in flight. A row's
`uid` is made once, so copying rows between files (`merge`) never duplicates one.

`configs/tuned.json` stays the committed, reviewable artefact: `export` writes the best verified
row per (pattern, shape, GPU, precision, family@version) into it in TunedDB's format. Each such
winner (and its default_us and counts) comes from the newest run that measured the group with a
verified time (newest: the greatest latest-row timestamp; all rows without a run id form one
legacy run), never from a mix of runs: the families compared for one case then come from one run
(one machine), as `tune` records them, and a family the newest run did not measure keeps the
entry of the run that did.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sqlite3
import uuid
from pathlib import Path
from typing import Iterable

from .errors import UserError

COLUMNS = (  # name, SQL type; the order rows are written and read in
    ("uid", "TEXT NOT NULL UNIQUE"), ("pattern_hash", "TEXT NOT NULL"),
    ("shape", "TEXT NOT NULL"), ("precision", "TEXT NOT NULL"), ("family", "TEXT NOT NULL"),
    ("family_version", "TEXT NOT NULL"), ("plan_name", "TEXT NOT NULL"),
    ("plan_json", "TEXT NOT NULL"), ("candidate", "INTEGER"), ("problem", "TEXT"),
    ("sparsity", "REAL"), ("cubin_sha256", "TEXT"), ("gpu_name", "TEXT NOT NULL"),
    ("sm_count", "INTEGER"), ("driver", "TEXT NOT NULL"), ("clocks_json", "TEXT"),
    ("median_us", "REAL"), ("p20_us", "REAL"), ("p80_us", "REAL"), ("n", "INTEGER"),
    ("verified", "INTEGER NOT NULL"), ("error", "TEXT"), ("cpu_verified", "INTEGER"),
    ("host", "TEXT"),
    ("timestamp", "TEXT NOT NULL"), ("features_json", "TEXT"), ("run_id", "TEXT"))
# Columns added after the first release: an older database gets them (NULL in its old rows).
ADDED = {"features_json": "TEXT", "run_id": "TEXT"}
NAMES = tuple(name for name, _ in COLUMNS)
# What makes two rows the same job on the same kind of GPU (resume skips such jobs; run_id is
# deliberately not part of it: a job measured by an earlier run is not measured again).
JOB_COLUMNS = ("pattern_hash", "shape", "precision", "family", "family_version", "plan_json",
               "gpu_name", "driver")
SCHEMA_VERSION = 1
ENV_VAR = "SPARSERT_TUNEDB"


def default_db_path() -> Path:
    """$SPARSERT_TUNEDB, else $XDG_DATA_HOME/sparsert/tunedb.sqlite, else ~/.local/share/...:
    data, not cache (measurements cost GPU time to redo), and kept out of the kernel cache
    directory, which holds only its own entries."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "share")
    return Path(base) / "sparsert" / "tunedb.sqlite"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    """The id every row of one tuning run (one `sparsert tune` invocation) carries."""
    return uuid.uuid4().hex[:12]


def plan_json(params: dict) -> str:
    """Canonical text of plan parameters (the identity of a plan within a job key)."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def tuned_key(pattern_hash: str, shape: str, gpu_name: str, precision: str, family: str,
              family_version: str) -> str:
    """The configs/tuned.json key of an exported winner (TunedDB's key format)."""
    from .tune import entry_key

    return entry_key(pattern_hash, shape, gpu_name, precision, family, family_version)


class TuneDB:
    """A connection to one database file (created on first use). Use as a context manager."""

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise UserError(f"{self.path}: no such tuning database")
        if self.path.is_dir():
            raise UserError(f"{self.path}: is a directory, not a tuning database")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
        try:
            self.conn.execute("PRAGMA busy_timeout = 60000")
            tables = {r[0] for r in self.conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "measurements" not in tables and (tables or not create):
                # someone else's SQLite file: never add a table to it or switch its journal
                raise UserError(f"{self.path}: not a sparsert tuning database (no measurements "
                                f"table)")
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = NORMAL")
            self._create()
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            raise UserError(f"{self.path}: not a usable tuning database ({exc})") from None
        except UserError:
            self.conn.close()
            raise

    def _create(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        _check_version(self.path, version)
        cols = ", ".join(f"{name} {kind}" for name, kind in COLUMNS)
        self.conn.execute(f"CREATE TABLE IF NOT EXISTS measurements "
                          f"(id INTEGER PRIMARY KEY, {cols})")
        have = {row[1] for row in self.conn.execute("PRAGMA table_info(measurements)")}
        if set(NAMES) - set(ADDED) <= have:
            for name in sorted(set(ADDED) - have):
                self.conn.execute(f"ALTER TABLE measurements ADD COLUMN {name} {ADDED[name]}")
                have.add(name)
        _check_columns(self.path, set(NAMES) - have)
        self.conn.execute(f"CREATE INDEX IF NOT EXISTS measurements_job ON measurements "
                          f"({', '.join(JOB_COLUMNS)})")
        if version == 0:
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def __enter__(self) -> "TuneDB":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    # ---- writing ---------------------------------------------------------------------------
    def insert(self, row: dict) -> str:
        """Store one measurement (missing uid/host/timestamp are filled in); returns its uid."""
        row = {"uid": uuid.uuid4().hex, "host": socket.gethostname(), "timestamp": now(),
               **row}
        if isinstance(row.get("clocks_json"), dict):
            row["clocks_json"] = json.dumps(row["clocks_json"], sort_keys=True)
        row["verified"] = int(bool(row.get("verified")))
        self._insert_many([tuple(row.get(name) for name in NAMES)])
        return row["uid"]

    def _insert_many(self, values: list[tuple]) -> int:
        marks = ", ".join("?" for _ in NAMES)
        with self.conn:    # one transaction; BEGIN IMMEDIATE waits for other writers
            self.conn.execute("BEGIN IMMEDIATE")
            before = self.conn.total_changes
            self.conn.executemany(f"INSERT OR IGNORE INTO measurements ({', '.join(NAMES)}) "
                                  f"VALUES ({marks})", values)
            return self.conn.total_changes - before

    def merge(self, other: str | Path) -> int:
        """Copy every row of another database file that this one lacks (by uid); returns how
        many were new. The other file is only read (opened read-only: an older one keeps its
        schema and journal mode; columns it lacks arrive as NULL)."""
        rows = read_rows(other)
        return self._insert_many(rows) if rows else 0

    # ---- reading ---------------------------------------------------------------------------
    def rows(self, where: str = "", args: Iterable = ()) -> list[dict]:
        cur = self.conn.execute(f"SELECT {', '.join(NAMES)} FROM measurements {where} "
                                f"ORDER BY id", tuple(args))
        return [dict(zip(NAMES, values)) for values in cur]

    def count(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM measurements").fetchone()[0]

    def runs(self) -> int:
        """How many tuning runs wrote rows (rows without a run id, from older databases, count
        as one)."""
        return self.conn.execute("SELECT COUNT(DISTINCT run_id) + (COUNT(*) > COUNT(run_id)) "
                                 "FROM measurements").fetchone()[0]

    def measured(self, gpu_name: str, driver: str) -> set[tuple]:
        """Job identities (JOB_COLUMNS less GPU and driver) already stored for this GPU."""
        cols = JOB_COLUMNS[:-2]
        cur = self.conn.execute(f"SELECT DISTINCT {', '.join(cols)} FROM measurements "
                                f"WHERE gpu_name = ? AND driver = ?", (gpu_name, driver))
        return {tuple(values) for values in cur}

    def group_runs(self, gpu_name: str, driver: str) -> dict[tuple, str | None]:
        """Per stored group (pattern, shape, precision, family, version) on this GPU, the run
        export takes it from (newest_run; None: rows from before run ids): the run a resumed
        tune continues for that case and family, so the group's export still compares its
        whole candidate list from one run."""
        groups: dict[tuple, list[dict]] = {}
        for row in self.rows("WHERE gpu_name = ? AND driver = ?", (gpu_name, driver)):
            groups.setdefault(tuple(row[c] for c in JOB_COLUMNS[:5]), []).append(row)
        return {key: newest_run(rows)[0]["run_id"] for key, rows in groups.items()}

    def best(self) -> dict[tuple, dict]:
        """The fastest verified row per (pattern, shape, GPU, precision, family, version), with
        the group's counts and the default candidate's time (candidate 0), all from one run:
        the newest run with a verified time in the group (see newest_run)."""
        groups: dict[tuple, list[dict]] = {}
        for row in self.rows():
            key = (row["pattern_hash"], row["shape"], row["gpu_name"], row["precision"],
                   row["family"], row["family_version"])
            groups.setdefault(key, []).append(row)
        out = {}
        for key, rows in groups.items():
            rows = latest(newest_run(rows))
            good = [r for r in rows if _timed(r)]
            if not good:
                continue
            best = min(good, key=lambda r: (r["median_us"], r["candidate"] or 0))
            default = [r for r in good if r["candidate"] == 0]
            first = min(default, key=lambda r: r["median_us"]) if default else None
            out[key] = {"row": best, "default_us": first["median_us"] if first else None,
                        "default_row": first,
                        "candidates": len({r["plan_json"] for r in rows}),
                        "verified": len({r["plan_json"] for r in good})}
        return out


def _check_version(path: Path, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise UserError(f"{path}: tuning database version {version} is newer than this "
                        f"sparsert reads ({SCHEMA_VERSION})")


def _check_columns(path: Path, missing: set[str]) -> None:
    if missing:
        raise UserError(f"{path}: not a sparsert tuning database (columns "
                        f"{', '.join(sorted(missing)[:3])} missing)")


def read_rows(path: str | Path) -> list[tuple]:
    """Every measurement of a tuning database file, as tuples in NAMES order, without writing
    to it (read-only connection, no schema upgrade): what `merge` copies."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such tuning database")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
    except sqlite3.Error as exc:
        raise UserError(f"{path}: not a usable tuning database ({exc})") from None
    try:
        _check_version(path, conn.execute("PRAGMA user_version").fetchone()[0])
        have = {row[1] for row in conn.execute("PRAGMA table_info(measurements)")}
        if not have:
            raise UserError(f"{path}: not a sparsert tuning database (no measurements table)")
        _check_columns(path, set(NAMES) - set(ADDED) - have)
        select = ", ".join(name if name in have else "NULL" for name in NAMES)
        return conn.execute(f"SELECT {select} FROM measurements ORDER BY id").fetchall()
    except sqlite3.DatabaseError as exc:
        raise UserError(f"{path}: not a usable tuning database ({exc})") from None
    finally:
        conn.close()


def _timed(row: dict) -> bool:
    return bool(row["verified"]) and row["median_us"] is not None


def newest_run(rows: list[dict]) -> list[dict]:
    """The rows of the newest run among `rows` that holds a verified time (all rows when none
    does): newest is the run whose latest row timestamp is greatest (timestamps are whole
    seconds: a tie goes to the run whose last row comes later in `rows`, i.e. was stored later
    in this file); rows without a run id (older databases) form one legacy run."""
    runs: dict[str | None, list[dict]] = {}
    last: dict[str | None, int] = {}
    for index, row in enumerate(rows):
        runs.setdefault(row.get("run_id"), []).append(row)
        last[row.get("run_id")] = index
    if len(runs) <= 1:
        return rows
    timed = [run for run, members in runs.items() if any(_timed(r) for r in members)] \
        or list(runs)
    pick = max(timed, key=lambda run: (max(r["timestamp"] for r in runs[run]), last[run]))
    return runs[pick]


def latest(rows: list[dict]) -> list[dict]:
    """The newest measurement of each job on each GPU (a re-measured job counts once, with its
    latest time: the minimum over repeats would favour lucky samples)."""
    newest: dict[tuple, dict] = {}
    for row in rows:
        key = tuple(row[c] for c in JOB_COLUMNS)
        if key not in newest or row["timestamp"] >= newest[key]["timestamp"]:
            newest[key] = row
    return list(newest.values())


def export_entries(db: TuneDB, families: set[tuple[str, str]] | None = None) -> dict[str, dict]:
    """configs/tuned.json entries (TunedDB format) of the best verified row per group, of the
    given (family, version)s only when given (older versions' winners do not fit new code)."""
    entries = {}
    for (pattern, shape, gpu, precision, family, version), best in db.best().items():
        if families is not None and (family, version) not in families:
            continue
        row = best["row"]
        entries[tuned_key(pattern, shape, gpu, precision, family, version)] = {
            "params": json.loads(row["plan_json"]), "us": row["median_us"],
            "default_us": best["default_us"],
            **({"default_params": json.loads(best["default_row"]["plan_json"]),
                "default_family": best["default_row"]["family"]} if best.get("default_row")
               else {}),
            "candidates": best["candidates"],
            "verified": best["verified"], "problem": row["problem"],
            "sparsity": row["sparsity"], "tuned_at": row["timestamp"]}
    return entries


def export(db: TuneDB, tuned_path: str | Path,
           families: set[tuple[str, str]] | None = None) -> int:
    """Write the best entries into a tuned-plan JSON file (other entries kept); returns how
    many entries were written."""
    from .tune import TunedDB

    tuned = TunedDB(tuned_path)
    entries = export_entries(db, families)
    tuned.entries.update(entries)
    tuned.save()
    return len(entries)
