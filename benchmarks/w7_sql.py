"""W7 - 1M dict rows into sqlite, batches of 500, one transaction per batch.

    ns.from_iterable(make_rows(n)) | ns.sql_sink(path, "events", batch_size=500)

Every contender reads the same generator of dict rows (``make_rows``: five columns)
and writes a fresh sqlite file with the same table (an INTEGER PRIMARY KEY and four
other columns) and sqlite's default settings (rollback journal, synchronous=FULL).
The table is created before the stopwatch starts; the figure includes making the
rows and every commit.

Baseline ("limit"): the fastest hand-written loop for dict rows - take 500 rows,
``executemany`` them with ``?`` placeholders (values picked with ``itemgetter``),
commit, repeat. Reference: the same loop binding the dicts by name (``:id``).
Target: nanostream >= 0.80x the loop's rows/s. Every run checks the row count and the
last row.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from itertools import islice
from operator import itemgetter
from typing import Any

from benchmarks._harness import (
    LIMIT,
    REFERENCE,
    SUBJECT,
    Contender,
    Stopwatch,
    Target,
    Workload,
    register,
)

TABLE = "events"
COLUMNS = ("id", "user", "kind", "value", "ok")
DDL = (f"CREATE TABLE {TABLE} (id INTEGER PRIMARY KEY, user TEXT NOT NULL, kind TEXT, "
       "value REAL, ok INTEGER)")
KINDS = ("click", "view", "buy", "share")


def row(i: int) -> dict[str, Any]:
    return {"id": i, "user": f"user{i % 1000}", "kind": KINDS[i & 3], "value": i * 0.25,
            "ok": i % 3 == 0}


def make_rows(n: int):
    """The rows every contender writes, made lazily (an iterator, not a list)."""
    return map(row, range(n))


def _fresh_db(p: dict[str, Any]) -> str:
    path = os.path.join(p["dir"], "w7.db")
    for suffix in ("", "-journal", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    conn = sqlite3.connect(path)
    conn.execute(DDL)
    conn.commit()
    conn.close()
    return path


def _rate(p: dict[str, Any], path: str, seconds: float) -> float:
    n = p["n"]
    conn = sqlite3.connect(path)
    try:
        count, last = conn.execute(f"SELECT COUNT(*), MAX(id) FROM {TABLE}").fetchone()
        got = conn.execute(f"SELECT * FROM {TABLE} WHERE id = ?", (n - 1,)).fetchone()
    finally:
        conn.close()
    assert count == n, f"wrote {count} rows, expected {n}"
    want = tuple(int(v) if isinstance(v, bool) else v for v in row(n - 1).values())
    assert got == want, f"last row {got}, expected {want}"
    assert last == n - 1
    return n / seconds


# ---------------------------------------------------------------- contenders


def run_nanostream(p: dict[str, Any]) -> float:
    import nanostream as ns

    path = _fresh_db(p)
    with Stopwatch() as sw:
        (ns.from_iterable(make_rows(p["n"]))
         | ns.sql_sink(path, TABLE, batch_size=p["batch"])).run()
    return _rate(p, path, sw.seconds)


def run_loop(p: dict[str, Any]) -> float:
    path = _fresh_db(p)
    batch = p["batch"]
    sql = f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
    pick = itemgetter(*COLUMNS)
    with Stopwatch() as sw:
        conn = sqlite3.connect(path)
        rows = make_rows(p["n"])
        while True:
            chunk = list(islice(rows, batch))
            if not chunk:
                break
            conn.executemany(sql, map(pick, chunk))
            conn.commit()
        conn.close()
    return _rate(p, path, sw.seconds)


def run_loop_named(p: dict[str, Any]) -> float:
    path = _fresh_db(p)
    batch = p["batch"]
    sql = (f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) "
           f"VALUES ({', '.join(':' + c for c in COLUMNS)})")
    with Stopwatch() as sw:
        conn = sqlite3.connect(path)
        rows = make_rows(p["n"])
        while True:
            chunk = list(islice(rows, batch))
            if not chunk:
                break
            conn.executemany(sql, chunk)
            conn.commit()
        conn.close()
    return _rate(p, path, sw.seconds)


def params(quick: bool) -> dict[str, Any]:
    return {"n": 50_000 if quick else 1_000_000, "batch": 500, "dir": _workdir()}


_DIR: list[str] = []


def _workdir() -> str:
    if not _DIR:
        _DIR.append(tempfile.mkdtemp(prefix="nanostream-w7-"))
        import atexit

        atexit.register(shutil.rmtree, _DIR[0], True)
    return _DIR[0]


register(
    Workload(
        id="W7",
        title="{n:,} dict rows into sqlite, batch_size={batch}",
        unit="items/s",
        params=params,
        contenders=[
            Contender("nanostream sql_sink", run_nanostream, SUBJECT, requires=("nanostream",)),
            Contender("executemany loop, ? placeholders", run_loop, LIMIT),
            Contender("executemany loop, named :placeholders", run_loop_named, REFERENCE),
        ],
        target=Target(">= 0.80x loop", lambda value, ratio: ratio is not None and ratio >= 0.80),
        ratio=lambda value, base: value / base,
    )
)
