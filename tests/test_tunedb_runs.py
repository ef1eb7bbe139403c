"""Tuning runs in the tuning database: every row of one `tune` invocation carries one run id, and
`export` takes each (pattern, shape, GPU, precision, family) group's winner from the newest run
that measured it, so the families compared for one case are never mixed from several runs (lent
machines differ by 3-8%)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from cli_helpers import run_main
from fake_measure import FakeMeasure
from sparsert_cli.jobs import family_version
from sparsert_cli.tune import TunedDB
from sparsert_cli.tunedb import COLUMNS, TuneDB, export_entries, tuned_key

IMMEDIATE = family_version("immediate")
STREAMED = family_version("streamed")
SHAPE = "b1c4h1w8m4k1s1p0"
OLD, NEW = "2024-01-01T00:00:00+00:00", "2024-02-01T00:00:00+00:00"


def _row(family, plan: str, us: float | None, candidate: int, run_id, timestamp: str,
         **kw) -> dict:
    return {"pattern_hash": "p0", "shape": SHAPE, "precision": "fp32", "family": family[0],
            "family_version": family[1], "plan_name": plan,
            "plan_json": json.dumps({"plan": plan}), "candidate": candidate, "problem": "x",
            "sparsity": 0.9, "gpu_name": "G", "driver": "1", "median_us": us,
            "verified": us is not None, "run_id": run_id, "timestamp": timestamp, **kw}


def _key(family) -> str:
    return tuned_key("p0", SHAPE, "G", "fp32", *family)


def _two_runs(db: TuneDB) -> None:
    """An older run whose streamed plan b-old was fastest of all (1.0), and a newer run (another
    machine) that measured other streamed plans, all slower than its immediate plans."""
    for row in (_row(IMMEDIATE, "a0", 5.0, 0, "run1", OLD),
                _row(IMMEDIATE, "a1", 4.0, 1, "run1", OLD),
                _row(STREAMED, "b-old", 1.0, 2, "run1", OLD),
                _row(IMMEDIATE, "a0", 2.0, 0, "run2", NEW),
                _row(IMMEDIATE, "a1", 2.5, 1, "run2", NEW),
                _row(STREAMED, "b1", 3.0, 2, "run2", NEW),
                _row(STREAMED, "b2", None, 3, "run2", NEW, error="verify: mismatch")):
        db.insert(row)


def test_export_takes_both_families_from_the_newest_run(tmp_path):
    with TuneDB(tmp_path / "t.sqlite") as db:
        _two_runs(db)
        entries = export_entries(db)
    imm, st = entries[_key(IMMEDIATE)], entries[_key(STREAMED)]
    assert imm["params"] == {"plan": "a0"} and imm["us"] == 2.0 and imm["default_us"] == 2.0
    assert imm["candidates"] == 2 and imm["verified"] == 2 and imm["tuned_at"] == NEW
    # not run1's faster b-old: the streamed entry is run2's, measured next to run2's immediate
    assert st["params"] == {"plan": "b1"} and st["us"] == 3.0 and st["tuned_at"] == NEW
    assert st["candidates"] == 2 and st["verified"] == 1 and st["default_us"] is None
    # the lookup the bench makes compares one run's times: immediate wins
    tuned = TunedDB(tmp_path / "tuned.json")
    tuned.entries.update(entries)
    assert min(tuned.entries.values(), key=lambda e: e["us"]) is imm


def test_export_cli_and_show_count_runs(tmp_path, capsys):
    path, out = tmp_path / "t.sqlite", tmp_path / "tuned.json"
    with TuneDB(path) as db:
        _two_runs(db)
    code, text, _ = run_main(["tunedb", "export", str(path), "-o", str(out)], capsys)
    assert code == 0 and "2 tuned plans" in text
    entries = TunedDB(out).entries
    assert entries[_key(IMMEDIATE)]["us"] == 2.0 and entries[_key(STREAMED)]["us"] == 3.0
    code, text, _ = run_main(["tunedb", "show", str(path), "--json"], capsys)
    doc = json.loads(text)
    assert code == 0 and doc["runs"] == 2 and sum(g["rows"] for g in doc["groups"]) == 7
    code, text, _ = run_main(["tunedb", "show", str(path)], capsys)
    assert code == 0 and "2 tuning run(s)" in text.replace("\n", "")


def test_a_family_the_newest_run_did_not_measure_keeps_its_run(tmp_path):
    with TuneDB(tmp_path / "t.sqlite") as db:
        for row in (_row(IMMEDIATE, "a0", 5.0, 0, "run1", OLD),
                    _row(STREAMED, "b0", 4.0, 1, "run1", OLD),
                    _row(IMMEDIATE, "a0", 6.0, 0, "run2", NEW),
                    _row(IMMEDIATE, "a1", 5.5, 1, "run2", NEW),
                    # a run whose only streamed job failed did not time the family either
                    _row(STREAMED, "b0", None, 2, "run3", "2024-03-01T00:00:00+00:00",
                         error="timeout")):
            db.insert(row)
        entries = export_entries(db)
    assert entries[_key(IMMEDIATE)]["us"] == 5.5 and entries[_key(IMMEDIATE)]["default_us"] == 6.0
    assert entries[_key(STREAMED)]["us"] == 4.0 and entries[_key(STREAMED)]["tuned_at"] == OLD


def _old_database(path, with_features: bool = True) -> None:
    """A database file as sparsert wrote it before run_id (and, optionally, features_json)."""
    drop = {"run_id"} | (set() if with_features else {"features_json"})
    cols = [(name, kind) for name, kind in COLUMNS if name not in drop]
    conn = sqlite3.connect(path)
    conn.execute(f"CREATE TABLE measurements (id INTEGER PRIMARY KEY, "
                 f"{', '.join(f'{n} {k}' for n, k in cols)})")
    for i, (plan, us) in enumerate((("a0", 5.0), ("a1", 4.0))):
        row = _row(IMMEDIATE, plan, us, i, None, OLD, uid=f"old{i}", host="h")
        names = [n for n, _ in cols if n in row]
        conn.execute(f"INSERT INTO measurements ({', '.join(names)}) VALUES "
                     f"({', '.join('?' for _ in names)})", [row[n] for n in names])
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()


def test_an_older_database_gains_run_id_and_exports(tmp_path, capsys):
    for with_features in (True, False):
        path = tmp_path / f"old-{with_features}.sqlite"
        _old_database(path, with_features)
        with TuneDB(path, create=False) as db:
            have = {r[1] for r in db.conn.execute("PRAGMA table_info(measurements)")}
            assert {"run_id", "features_json"} <= have
            assert [r["run_id"] for r in db.rows()] == [None, None] and db.runs() == 1
            entries = export_entries(db)
            assert entries[_key(IMMEDIATE)]["us"] == 4.0
            assert entries[_key(IMMEDIATE)]["default_us"] == 5.0
            # a newer run of the same group replaces the legacy rows as a whole
            db.insert(_row(IMMEDIATE, "a0", 4.5, 0, "run2", NEW))
            entry = export_entries(db)[_key(IMMEDIATE)]
            assert (entry["us"], entry["default_us"], entry["candidates"]) == (4.5, 4.5, 1)
            assert db.runs() == 2
        code, text, _ = run_main(["tunedb", "export", str(path), "-o",
                                  str(tmp_path / "tuned.json")], capsys)
        assert code == 0 and "1 tuned plans" in text


def test_merge_keeps_run_ids(tmp_path):
    a, b, old, out = (tmp_path / n for n in ("a.sqlite", "b.sqlite", "old.sqlite", "out.sqlite"))
    with TuneDB(a) as db:
        db.insert(_row(IMMEDIATE, "a0", 5.0, 0, "run1", OLD))
    with TuneDB(b) as db:
        db.insert(_row(IMMEDIATE, "a0", 2.0, 0, "run2", NEW))
        db.insert(_row(STREAMED, "b0", 3.0, 1, "run2", NEW))
    _old_database(old)
    with TuneDB(out) as db:
        assert db.merge(a) == 1 and db.merge(b) == 2 and db.merge(old) == 2
        assert [(r["plan_name"], r["run_id"]) for r in db.rows()] == [
            ("a0", "run1"), ("a0", "run2"), ("b0", "run2"), ("a0", None), ("a1", None)]
        assert db.runs() == 3
        entries = export_entries(db)
    assert entries[_key(IMMEDIATE)]["us"] == 2.0 and entries[_key(STREAMED)]["us"] == 3.0
    # the sources were only read: the old file keeps its schema, bytes and journal mode
    before = old.read_bytes()
    with TuneDB(out) as db:
        assert db.merge(old) == 0
    assert old.read_bytes() == before
    conn = sqlite3.connect(old)
    assert "run_id" not in {r[1] for r in conn.execute("PRAGMA table_info(measurements)")}
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal"
    conn.close()


def test_merge_names_the_file_that_is_not_a_tuning_database(tmp_path):
    from sparsert_cli.errors import UserError

    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x INTEGER)")
    conn.commit()
    conn.close()
    text = tmp_path / "notes.sqlite"
    text.write_text("not sqlite at all, " * 100)
    with TuneDB(tmp_path / "out.sqlite") as db:
        for path, why in ((other, "no measurements table"), (text, "not a usable"),
                          (tmp_path / "none.sqlite", "no such tuning database")):
            with pytest.raises(UserError, match=why) as info:
                db.merge(path)
            assert str(path) in info.value.message
        assert db.count() == 0


def test_every_row_of_one_tune_invocation_carries_one_run_id(tmp_path, isolated_cache):
    """Two GPU workers (spawned processes, fake timer) write one run's rows: one id; the next
    invocation (re-measuring) writes another."""
    from sparsert_cli.executors import tune_config

    from test_scale import small_config

    db_path = tmp_path / "t.sqlite"
    ids, measured = [], []
    for remeasure in (False, True):
        run = tune_config(small_config(), limit=2, tuned_path=tmp_path / "tuned.json",
                          db_path=db_path, measure=FakeMeasure(), gpu_ids=[0, 1],
                          arch="sm_90", jobs=1, remeasure=remeasure)["run"]
        ids.append(run["run_id"])
        assert len(run["gpus"]) == 2
        measured.append(sum(g["jobs"] for g in run["gpus"]))
    with TuneDB(db_path) as db:
        rows = db.rows()
        assert db.runs() == 2
        best = db.best()
    assert len(ids[0]) == 12 and ids[0] != ids[1]
    assert sorted({r["run_id"] for r in rows}) == sorted(ids)
    first = [r for r in rows if r["run_id"] == ids[0]]
    assert len(first) == measured[0] == len(rows) - measured[1] and len(first) >= 4
    # what export writes for the two runs' database is the newer run's (even within one second)
    assert best and {b["row"]["run_id"] for b in best.values()} == {ids[1]}


def test_a_resumed_tune_continues_each_cases_run(tmp_path, isolated_cache):
    """A tune whose jobs are partly stored (interrupted, or --limit raised) continues, case by
    case and family by family, the run of the newest stored row: export then compares every
    candidate of the case from one run and agrees with what `tune` wrote. Here run A tunes two
    cases, run B re-measures one of them, run C raises the limit over both: C's new rows of
    the first case join A, of the second B. A database from before run ids (NULL) is continued
    as its legacy run. --remeasure starts a new run everywhere."""
    from sparsert_cli.commands.bench import select
    from sparsert_cli.config import load_config
    from sparsert_cli.executors import tune_config
    from sparsert_cli.tune import TunedDB

    from test_scale import REPO

    def config_of(*ids):
        return select(load_config(REPO / "configs" / "ci.yaml"), list(ids), ["0.8"], None)

    db_path, tuned = tmp_path / "t.sqlite", tmp_path / "tuned.json"
    problems = ["ci_gemm_odd", "ci_gemm_vec"]
    config = config_of(*problems)
    kw = dict(tuned_path=tuned, db_path=db_path, measure=FakeMeasure(), gpu_ids=[0],
              arch="sm_90", jobs=1)
    a = tune_config(config, limit=2, **kw)["run"]
    b = tune_config(config_of(problems[1]), limit=2, remeasure=True, **kw)["run"]

    def group(r):
        return (r["problem"], r["family"])

    with TuneDB(db_path) as db:
        before = {r["uid"] for r in db.rows()}
        owner = {group(r): r["run_id"] for r in db.rows()}     # rows are in insert order
    assert {owner[g] for g in owner if g[0] == problems[1]} == {b["run_id"]}
    assert {owner[g] for g in owner if g[0] == problems[0]} == {a["run_id"]}
    c = tune_config(config, limit=4, **kw)["run"]
    assert c["skipped"] > 0 and len({a["run_id"], b["run_id"], c["run_id"]}) == 3
    with TuneDB(db_path) as db:
        rows = db.rows()
        exported = export_entries(db)
    added = [r for r in rows if r["uid"] not in before]
    assert added and any(group(r) in owner for r in added)
    for r in added:           # a stored (case, family) continues its run; a new one is C's
        assert r["run_id"] == owner.get(group(r), c["run_id"]), (group(r), r["candidate"])
    written = TunedDB(tuned).entries       # what `tune` chose from the same rows
    assert set(written) & set(exported)
    for key in set(written) & set(exported):
        assert exported[key]["us"] == written[key]["us"], key
    # a database written before run ids: its rows and the resumed ones stay one legacy run
    with TuneDB(db_path) as db:
        db.conn.execute("UPDATE measurements SET run_id = NULL")
        db.conn.commit()
    tune_config(config, limit=4, **kw)
    with TuneDB(db_path) as db:
        assert {r["run_id"] for r in db.rows()} == {None} and db.runs() == 1
    fresh = tune_config(config, limit=4, remeasure=True, **kw)["run"]
    with TuneDB(db_path) as db:
        assert db.runs() == 2
        assert {b["row"]["run_id"] for b in db.best().values()} == {fresh["run_id"]}



def test_a_resumed_group_continues_the_run_export_takes_it_from(tmp_path):
    """group_runs names, per (case, family), the run export would take (newest_run): a newer
    run whose only row of a family failed does not capture that family's resumed rows."""
    with TuneDB(tmp_path / "t.sqlite") as db:
        db.insert(_row(STREAMED, "b0", 3.0, 2, "run1", OLD))
        db.insert(_row(STREAMED, "b1", None, 3, "run2", NEW, error="verify: mismatch"))
        db.insert(_row(IMMEDIATE, "a0", 2.0, 0, "run2", NEW))
        runs = db.group_runs("G", "1")
        best = db.best()
    group = ("p0", SHAPE, "fp32", *STREAMED)
    assert runs[group] == "run1" and runs[("p0", SHAPE, "fp32", *IMMEDIATE)] == "run2"
    assert best[("p0", SHAPE, "G", "fp32", *STREAMED)]["row"]["run_id"] == runs[group]
