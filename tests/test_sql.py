"""sql_sink and sql_source on sqlite (stdlib driver) and on a real PostgreSQL.

The ``db`` fixture runs each test on both; the PostgreSQL variant is marked
``postgres`` and talks to the server on 127.0.0.1:5432 (trust authentication,
database ``test``; ``NANOSTREAM_PG_URL`` overrides). Every test gets its own table
names and drops them afterwards.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import threading
import traceback
import uuid

import pytest

import nanostream as ns

PG_URL = os.environ.get("NANOSTREAM_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
ROWS_DDL = "id INTEGER PRIMARY KEY, name TEXT NOT NULL, score DOUBLE PRECISION"


class SqliteDB:
    kind = "sqlite"

    def __init__(self, tmp_path):
        self.url = str(tmp_path / "test.db")

    def execute(self, sql, params=None):
        conn = sqlite3.connect(self.url)
        try:
            with conn:
                cur = conn.execute(sql, params or {})
                return cur.fetchall() if cur.description else None
        finally:
            conn.close()

    def close(self, tables):
        pass


class PostgresDB:
    kind = "postgres"

    def __init__(self):
        import sqlalchemy as sa
        from sqlalchemy.pool import NullPool

        self.sa = sa
        self.url = PG_URL
        self.engine = sa.create_engine(PG_URL, poolclass=NullPool)
        try:
            with self.engine.connect():
                pass
        except sa.exc.OperationalError as exc:
            self.engine.dispose()
            pytest.fail(f"PostgreSQL is not reachable at {PG_URL} (start it, or deselect "
                        f"these tests with -m 'not postgres'): {exc.orig}")

    def execute(self, sql, params=None):
        with self.engine.begin() as conn:
            result = conn.execute(self.sa.text(sql), params or {})
            return [tuple(r) for r in result] if result.returns_rows else None

    def close(self, tables):
        for t in tables:
            self.execute(f'DROP TABLE IF EXISTS "{t}"')
        self.engine.dispose()


class DB:
    """A database for one test: ``table(ddl)`` makes a fresh table, ``rows(t)`` reads it."""

    def __init__(self, impl):
        self.impl = impl
        self.kind = impl.kind
        self.url = impl.url
        self.tables = []

    def name(self):
        t = f"t_{uuid.uuid4().hex[:12]}"
        self.tables.append(t)
        return t

    def table(self, ddl=ROWS_DDL):
        t = self.name()
        self.execute(f"CREATE TABLE {t} ({ddl})")
        return t

    def execute(self, sql, params=None):
        return self.impl.execute(sql, params)

    def rows(self, table, order="id"):
        return self.execute(f"SELECT * FROM {table} ORDER BY {order}")

    def count(self, table):
        return self.execute(f"SELECT COUNT(*) FROM {table}")[0][0]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request, tmp_path):
    impl = SqliteDB(tmp_path) if request.param == "sqlite" else PostgresDB()
    d = DB(impl)
    yield d
    impl.close(d.tables)


@pytest.fixture
def pg():
    d = DB(PostgresDB())
    yield d
    d.impl.close(d.tables)


def rows(n, start=0):
    return [{"id": i, "name": f"n{i}", "score": i / 2} for i in range(start, start + n)]


def stage_error(pipeline):
    with pytest.raises(ns.StageError) as info:
        pipeline.run()
    return info.value


class FakeClock:
    """A virtual clock; ``wait_calls(n)`` blocks until the code under test read it n times."""

    def __init__(self):
        self.now = 0.0
        self.calls = 0
        self.cond = threading.Condition()

    def __call__(self):
        with self.cond:
            self.calls += 1
            self.cond.notify_all()
            return self.now

    def wait_calls(self, n, timeout=10):
        with self.cond:
            assert self.cond.wait_for(lambda: self.calls >= n, timeout)

    def advance(self, seconds):
        with self.cond:
            self.now += seconds


# -- inserting ------------------------------------------------------------------------


def test_rows_are_inserted_in_batches(db):
    t = db.table()
    report = (rows(7) | ns.sql_sink(db.url, t, batch_size=3)).run()
    assert db.rows(t) == [(i, f"n{i}", i / 2) for i in range(7)]
    assert report["sql_sink"].items_in == 7
    assert report.errors == 0


def test_rows_may_have_different_keys(db):
    t = db.table()
    mixed = [{"id": 1, "name": "a"}, {"name": "b", "id": 2, "score": 2.5},
             {"score": 3.5, "name": "c", "id": 3}, {"id": 4, "name": "d"}]
    (mixed | ns.sql_sink(db.url, t, batch_size=10)).run()
    assert db.rows(t) == [(1, "a", None), (2, "b", 2.5), (3, "c", 3.5), (4, "d", None)]


def test_order_within_a_batch_is_kept_across_key_sets(db):
    t = db.table()
    # the same key three times with different key sets: the last write wins
    ups = [{"id": 1, "name": "first"}, {"id": 1, "name": "second", "score": 2.0},
           {"id": 1, "name": "third"}]
    (ups | ns.sql_sink(db.url, t, key="id")).run()
    assert db.rows(t) == [(1, "third", 2.0)]


def test_a_plain_sqlite_url_uses_the_stdlib_driver(tmp_path):
    path = tmp_path / "x.db"
    url = f"sqlite:///{path}"
    ([{"a": 1}] | ns.sql_sink(url, "t", create=True)).run()
    assert list(ns.sql_source(url, "SELECT a FROM t")) == [{"a": 1}]
    assert list(ns.sql_source(path, "SELECT a FROM t")) == [{"a": 1}]


def test_import_and_sqlite_use_do_not_import_sqlalchemy(tmp_path):
    code = (
        "import sys, nanostream as ns\n"
        f"db = {str(tmp_path / 'y.db')!r}\n"
        "([{'a': 1}] | ns.sql_sink(db, 't', create=True)).run()\n"
        "assert list(ns.sql_source(db, 'SELECT a FROM t')) == [{'a': 1}]\n"
        "assert 'sqlalchemy' not in sys.modules, 'sqlalchemy imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- bad rows -------------------------------------------------------------------------


def test_a_bad_row_rolls_its_batch_back_whole_and_is_named(db):
    t = db.table()
    data = rows(6)
    data[4] = {"id": 1, "name": "duplicate id"}          # in the second batch (3, 4, 5)
    err = stage_error(data | ns.sql_sink(db.url, t, batch_size=3))
    assert err.stage == "sql_sink"
    assert err.item == {"id": 1, "name": "duplicate id"}
    assert "duplicate id" in str(err)
    assert "unique" in str(err.__cause__).lower()
    assert [r[0] for r in db.rows(t)] == [0, 1, 2]       # nothing of the second batch


def test_a_not_null_violation_is_named(db):
    t = db.table()
    err = stage_error([{"id": 1, "name": "ok"}, {"id": 2, "name": None}]
                      | ns.sql_sink(db.url, t))
    assert err.item == {"id": 2, "name": None}
    assert "null" in str(err).lower()
    assert db.count(t) == 0


def test_a_value_of_the_wrong_type_is_named(db):
    t = db.table()
    bad = {"id": 2, "name": "x", "score": {"not": "a number"}}
    err = stage_error([{"id": 1, "name": "ok"}, bad] | ns.sql_sink(db.url, t))
    assert err.item == bad
    assert db.count(t) == 0


def test_unknown_column_is_rejected_with_the_real_columns(db):
    t = db.table()
    bad = {"id": 1, "nmae": "typo"}
    err = stage_error([bad] | ns.sql_sink(db.url, t))
    assert err.item == bad
    assert (f"the row's key 'nmae' is not a column of table '{t}'; did you mean 'name'? "
            "(its columns: id, name, score)") in str(err)
    assert isinstance(err.__cause__, ValueError)


def test_a_key_that_looks_like_sql_is_never_run(db):
    t = db.table()
    evil = {"id); DROP TABLE " + t + "; --": 1, "name": "x"}
    err = stage_error([{"id": 1, "name": "fine"}, evil] | ns.sql_sink(db.url, t))
    assert err.item == evil
    assert "is not a column of table" in str(err)
    assert "DROP TABLE" in str(err)
    assert db.count(t) == 0                              # the table is still there
    evil_table = f"{t}; DROP TABLE {t}; --"
    err = stage_error([{"id": 1, "name": "x"}] | ns.sql_sink(db.url, evil_table))
    assert isinstance(err.__cause__, LookupError)
    assert db.count(t) == 0


def test_items_that_are_not_dict_rows(db):
    t = db.table()
    for item, message in [((1, "a"), "sql_sink writes dict rows, got tuple"),
                          ("text", "sql_sink writes dict rows, got str"),
                          ([("id", 3), ("name", "x")], "sql_sink writes dict rows, got list"),
                          ({}, "the row is empty"),
                          ({1: "a"}, "row keys must be column names (str), got 1")]:
        err = stage_error([{"id": 1, "name": "a"}, item] | ns.sql_sink(db.url, t))
        assert err.item == item
        assert message in str(err)
    assert db.count(t) == 0


def test_skip_commits_the_good_rows_and_counts_the_bad(db):
    t = db.table()
    data = [{"id": 1, "name": "a"}, {"id": 1, "name": "dup"}, {"id": 2, "name": None},
            {"id": 3, "nope": 1}, "junk", {"id": 4, "name": "d"}, {"id": 5, "name": "e"}]
    report = (data | ns.sql_sink(db.url, t, batch_size=4, on_error="skip")).run()
    assert [r[:2] for r in db.rows(t)] == [(1, "a"), (4, "d"), (5, "e")]
    assert report["sql_sink"].errors == 4


def test_an_error_callback_sees_each_bad_row(db):
    t = db.table()
    bad = []
    data = [{"id": 1, "name": "a"}, {"id": 1, "name": "dup"}, {"id": 2, "name": "b"}]
    (data | ns.sql_sink(db.url, t, on_error=lambda row, exc: bad.append(row))).run()
    assert bad == [{"id": 1, "name": "dup"}]
    assert db.count(t) == 2


def test_an_error_callback_that_raises_rolls_the_batch_back(db):
    t = db.table()

    def refuse(row, exc):
        raise RuntimeError("no bad rows allowed")

    data = [{"id": 1, "name": "a"}, {"id": 1, "name": "dup"}, {"id": 2, "name": "b"}]
    err = stage_error(data | ns.sql_sink(db.url, t, on_error=refuse))
    assert "no bad rows allowed" in str(err)
    assert err.item == {"id": 1, "name": "dup"}
    assert db.count(t) == 0


# -- upsert and create ----------------------------------------------------------------


def test_upsert_on_a_key(db):
    t = db.table()
    (rows(3) | ns.sql_sink(db.url, t)).run()
    changes = [{"id": 1, "name": "one"}, {"id": 5, "name": "five", "score": 5.0}]
    (changes | ns.sql_sink(db.url, t, key="id")).run()
    assert db.rows(t) == [(0, "n0", 0.0), (1, "one", 0.5), (2, "n2", 1.0), (5, "five", 5.0)]


def test_upsert_on_a_composite_key_with_nothing_else_to_update(db):
    t = db.table("a TEXT, b TEXT, PRIMARY KEY (a, b)")
    data = [{"a": "x", "b": "1"}, {"a": "x", "b": "1"}, {"b": "2", "a": "x"}]
    (data | ns.sql_sink(db.url, t, key=["a", "b"])).run()
    assert db.rows(t, order="b") == [("x", "1"), ("x", "2")]


def test_upsert_key_needs_a_unique_constraint(db):
    t = db.table()
    err = stage_error(rows(1) | ns.sql_sink(db.url, t, key="name"))
    assert "key=['name'] is neither the primary key nor a unique constraint" in str(err)
    u = db.table("id INTEGER, email TEXT, CONSTRAINT u_email UNIQUE (email)")
    ([{"id": 1, "email": "a@x"}, {"id": 2, "email": "a@x"}]
     | ns.sql_sink(db.url, u, key="email")).run()
    assert db.rows(u) == [(2, "a@x")]


def test_upsert_key_must_be_a_column_and_in_every_row(db):
    t = db.table()
    err = stage_error(rows(1) | ns.sql_sink(db.url, t, key="uid"))
    assert "key column(s) 'uid' not in table" in str(err)
    err = stage_error([{"name": "no id"}] | ns.sql_sink(db.url, t, key="id"))
    assert err.item == {"name": "no id"}
    assert "lacks the key column(s) 'id'" in str(err)


def test_create_the_table_from_the_first_row(db):
    t = db.name()
    data = [{"id": 1, "name": "a", "score": None, "ok": True, "raw": b"\x00\x01"},
            {"id": 2, "name": "b", "score": 2.5, "ok": False, "raw": b""}]
    (data | ns.sql_sink(db.url, t, create=True, key="id")).run()
    got = list(ns.sql_source(db.url, f"SELECT * FROM {t} ORDER BY id"))
    for g in got:
        g["ok"], g["raw"] = bool(g["ok"]), bytes(g["raw"])
    assert got == data
    # the key became the primary key, so upserts work at once
    ([{"id": 1, "name": "A"}] | ns.sql_sink(db.url, t, create=True, key="id")).run()
    assert db.execute(f"SELECT name FROM {t} ORDER BY id") == [("A",), ("b",)]


def test_create_needs_plain_identifiers(db):
    t = db.name()
    err = stage_error([{"id); DROP TABLE x; --": 1}] | ns.sql_sink(db.url, t, create=True))
    assert "cannot create a column from the key 'id); DROP TABLE x; --'" in str(err)
    err = stage_error([[1, 2]] | ns.sql_sink(db.url, t, create=True))
    assert "create=True needs a non-empty dict" in str(err)


def test_a_missing_table(db):
    db.table()                           # (the sqlite file exists, with another table)
    t = db.name()
    err = stage_error(rows(1) | ns.sql_sink(db.url, t))
    assert isinstance(err.__cause__, LookupError)
    assert f"there is no table '{t}'" in str(err)
    assert "create=True" in str(err)


def test_an_empty_stream_writes_nothing_and_creates_nothing(db):
    t = db.name()
    ([] | ns.sql_sink(db.url, t, create=True)).run()
    u = db.table()
    ([] | ns.sql_sink(db.url, u)).run()
    assert db.count(u) == 0


# -- completion tracking and flushing -------------------------------------------------


def test_a_row_is_handled_only_after_its_batch_commits(db):
    t = db.table()
    done = []

    def committed():
        return {r[0] for r in db.execute(f"SELECT id FROM {t}")}

    @ns.source(track=True)
    def tracked():
        for row in rows(3) + [{"id": 3, "name": "ok"}, {"id": 0, "name": "dup"},
                              {"id": 5, "name": "ok"}]:
            # when on_done runs, the row must be visible to another connection
            yield row, (lambda i=row["id"]: done.append((i, i in committed())))

    err = stage_error(tracked() | ns.sql_sink(db.url, t, batch_size=3, flush_interval=None))
    assert err.item == {"id": 0, "name": "dup"}
    assert sorted(done) == [(0, True), (1, True), (2, True)]   # the second batch: never
    assert committed() == {0, 1, 2}


def test_a_failed_run_commits_no_partial_batch(db):
    t = db.table()
    done = []

    @ns.source(track=True)
    def tracked():
        for row in rows(3):
            yield row, (lambda: done.append(1))
        raise RuntimeError("the source broke")

    err = stage_error(tracked() | ns.sql_sink(db.url, t, flush_interval=None))
    assert "the source broke" in str(err)
    assert db.count(t) == 0
    assert done == []


def test_a_partial_batch_commits_after_flush_interval(db):
    t = db.table()
    clock = FakeClock()
    finish = threading.Event()
    all_done = threading.Event()
    done = []

    @ns.source(track=True)
    def trickle():
        for row in rows(3):
            yield row, (lambda: (done.append(1), len(done) == 3 and all_done.set()))
        finish.wait(30)      # the stream stays open: only the clock can flush the rows

    sink = ns.sql_sink(db.url, t, batch_size=100, flush_interval=5.0, clock=clock)
    run = (trickle() | sink).start()
    try:
        clock.wait_calls(1)              # the first row has reached the sink ...
        assert db.count(t) == 0
        assert done == []
        while not all_done.wait(0.01):
            clock.advance(10.0)          # (re-advanced until every row arrived)
        assert db.count(t) == 3
        assert not finish.is_set()
    finally:
        finish.set()
        run.join(10)


def test_rows_commit_at_the_end_of_the_stream(db):
    t = db.table()
    (rows(3) | ns.sql_sink(db.url, t, batch_size=500, flush_interval=None)).run()
    assert db.count(t) == 3


def test_stop_with_drain_commits_what_is_inside(db):
    t = db.table()
    got = threading.Event()

    @ns.source
    def endless():
        i = 0
        while True:
            yield {"id": i, "name": "x"}
            i += 1
            if i == 10:
                got.set()

    run = (endless() | ns.sql_sink(db.url, t, batch_size=10_000, flush_interval=None)).start()
    assert got.wait(10)
    run.stop(drain=True)
    run.join(10)
    n = db.count(t)
    assert n >= 10
    assert [r[0] for r in db.rows(t)] == list(range(n))


def tracked_rows(data, done):
    """A tracking source of ``data`` (not in-memory: rows reach the sink through its
    channel, in the lists the runtime moves); ``done`` collects the rows handled."""
    @ns.source(track=True)
    def tracked():
        for row in data:
            yield row, (lambda i=row["id"]: done.append(i))
    return tracked()


@pytest.mark.parametrize("feed", ["memory", "tracked"])
def test_many_batches_out_of_each_list_a_bad_row_fails_only_its_own(db, feed):
    t = db.table()
    data = rows(1000)
    data[557] = {"id": 3, "name": "duplicate id"}     # in the batch of rows 500-599
    done = []
    src = ns.from_iterable(data) if feed == "memory" else tracked_rows(data, done)
    err = stage_error(src | ns.sql_sink(db.url, t, batch_size=100, flush_interval=None))
    assert err.item == {"id": 3, "name": "duplicate id"}
    assert [r[0] for r in db.rows(t)] == list(range(500))   # the batches before it, whole
    if feed == "tracked":
        assert done == list(range(500))   # a row is handled once its batch committed


def test_skipped_rows_count_as_handled_with_their_batch(db):
    t = db.table()
    data = rows(10)
    data[2] = {"id": 0, "name": "dup"}
    data[7] = {"id": 7, "nope": 1}
    done = []
    report = (tracked_rows(data, done)
              | ns.sql_sink(db.url, t, batch_size=4, on_error="skip")).run()
    assert [r[0] for r in db.rows(t)] == [0, 1, 3, 4, 5, 6, 8, 9]
    assert report["sql_sink"].errors == 2
    assert sorted(done) == sorted(r["id"] for r in data)   # the skipped two included


def test_stop_without_drain_commits_nothing_of_the_open_batch(db):
    t = db.table()
    got = threading.Event()
    done = []

    @ns.source(track=True)
    def endless():
        i = 0
        while True:
            yield {"id": i, "name": "x"}, (lambda i=i: done.append(i))
            i += 1
            if i == 10:
                got.set()

    run = (endless() | ns.sql_sink(db.url, t, batch_size=10_000, flush_interval=None)).start()
    assert got.wait(10)
    run.stop(drain=False)
    run.join(10)
    assert db.count(t) == 0
    assert done == []


def test_the_sink_called_directly_writes_its_rows(db):
    t = db.table()
    sink = ns.sql_sink(db.url, t, batch_size=2)
    assert sink(rows(5)) is None
    assert [r[0] for r in db.rows(t)] == [0, 1, 2, 3, 4]
    with pytest.raises(ns.StageError, match="sql_sink") as ei:
        sink(rows(3, start=5) + [{"id": 0, "name": "dup"}])
    assert ei.value.item == {"id": 0, "name": "dup"}
    assert [r[0] for r in db.rows(t)] == [0, 1, 2, 3, 4, 5, 6]   # the batch (7, dup) rolled back


# -- names, reprs, secrets ------------------------------------------------------------


def test_with_options_name_is_used_in_errors(db):
    t = db.table()
    err = stage_error([{"bad": 1}] | ns.sql_sink(db.url, t).with_options(name="save"))
    assert err.stage == "save"


def test_repr(tmp_path):
    s = ns.sql_sink("app.db", "events", key="id")
    assert repr(s) == "<sink 'sql_sink'(url='app.db', table='events', key=('id',)) stream=True>"
    assert repr(ns.sql_source("app.db", "SELECT 1")) == \
        "<source 'sql_source'('app.db', 'SELECT 1')>"


SECRET = "Sup3r-Secret-Pw"


@pytest.mark.postgres
def test_an_unreachable_database_gives_a_clear_error_without_the_password(caplog):
    url = f"postgresql+psycopg://alice:{SECRET}@127.0.0.1:1/test?sslpassword={SECRET}x"
    sink = ns.sql_sink(url, "events")
    src = ns.sql_source(url, "SELECT 1")
    texts = [repr(sink), repr(src), str(sink), repr([{"a": 1}] | sink),
             ([{"a": 1}] | sink)._repr_html_() or ""]
    for stage in (sink, src):
        pipeline = [{"a": 1}] | stage if stage is sink else stage
        with caplog.at_level(logging.DEBUG):
            run = pipeline.start()
            with pytest.raises(ns.StageError) as info:
                run.join(30)
        err = info.value
        assert isinstance(err.__cause__, ConnectionError)
        assert "cannot connect to postgresql+psycopg://alice:***@127.0.0.1:1/test" in str(err)
        assert "Connection refused" in str(err) or "connect" in str(err)
        texts += [str(err), repr(err), "".join(traceback.format_exception(err)),
                  str(run.stats()), repr(run)]
    texts.append(caplog.text)
    for text in texts:
        assert SECRET not in text


@pytest.mark.postgres
def test_a_password_never_shows_in_a_working_run(pg, caplog):
    t = pg.table()
    from sqlalchemy.engine import make_url
    url = make_url(PG_URL).set(password=SECRET).render_as_string(hide_password=False)
    with caplog.at_level(logging.DEBUG):
        report = (rows(3) | ns.sql_sink(url, t)).run()
        got = list(ns.sql_source(url, f"SELECT id FROM {t} ORDER BY id"))
        err = stage_error([{"id": 0, "name": "dup"}] | ns.sql_sink(url, t))
    assert got == [{"id": 0}, {"id": 1}, {"id": 2}]
    for text in [str(report), str(err), "".join(traceback.format_exception(err)),
                 caplog.text, repr(ns.sql_sink(url, t))]:
        assert SECRET not in text


def test_schema_option(db):
    t = db.table()
    schema = "main" if db.kind == "sqlite" else "public"
    (rows(2) | ns.sql_sink(db.url, t, schema=schema, key="id")).run()
    assert db.count(t) == 2
    err = stage_error(rows(1) | ns.sql_sink(db.url, t, schema="nosuchschema"))
    assert "nosuchschema" in str(err)


# -- sqlite files ---------------------------------------------------------------------


def test_a_missing_sqlite_file(tmp_path):
    path = tmp_path / "nope.db"
    err = stage_error(rows(1) | ns.sql_sink(path, "t"))
    assert isinstance(err.__cause__, FileNotFoundError)
    assert f"no sqlite database at {str(path)!r}; pass create=True" in str(err)
    err = stage_error(ns.sql_source(path, "SELECT 1"))
    assert f"no sqlite database at {str(path)!r}" in str(err)
    assert not path.exists()                              # not created as a side effect


def test_unopenable_sqlite_paths(tmp_path):
    err = stage_error(rows(1) | ns.sql_sink(tmp_path / "no_dir" / "x.db", "t", create=True))
    assert "the directory" in str(err)
    assert "does not exist" in str(err)
    err = stage_error(rows(1) | ns.sql_sink(tmp_path, "t", create=True))
    assert "is a directory, not a sqlite database file" in str(err)


def test_a_database_failure_fails_the_run_even_with_skip(db):
    t = db.table("id INTEGER PRIMARY KEY, name TEXT")
    if db.kind == "sqlite":  # a trigger that fails at run time, whatever the row
        db.execute(f"CREATE TRIGGER {t}_tr BEFORE INSERT ON {t} BEGIN SELECT nosuchfn(); END")
        missing = "no such function"
    else:
        db.execute(f"CREATE FUNCTION {t}_f() RETURNS trigger AS "
                   f"'BEGIN PERFORM nosuchfn(); RETURN NEW; END' LANGUAGE plpgsql")
        db.execute(f"CREATE TRIGGER {t}_tr BEFORE INSERT ON {t} "
                   f"FOR EACH ROW EXECUTE FUNCTION {t}_f()")
        missing = "does not exist"
    try:
        err = stage_error([{"id": 1, "name": "a"}] | ns.sql_sink(db.url, t, on_error="skip"))
        assert missing in str(err)
        assert db.count(t) == 0
    finally:
        if db.kind == "postgres":
            db.execute(f"DROP TABLE {t}")
            db.execute(f"DROP FUNCTION {t}_f()")


# -- sql_source -----------------------------------------------------------------------


def test_sql_source_streams_rows_as_dicts(db):
    t = db.table()
    (rows(25) | ns.sql_sink(db.url, t)).run()
    got = list(ns.sql_source(db.url, f"SELECT id, name FROM {t} WHERE id >= :low ORDER BY id",
                             {"low": 20}, fetch_size=2))
    assert got == [{"id": i, "name": f"n{i}"} for i in range(20, 25)]
    ids = (ns.sql_source(db.url, f"SELECT id FROM {t}") | ns.transform(lambda r: r["id"])
           ).collect()
    assert sorted(ids) == list(range(25))


def test_sql_source_is_lazy_on_a_huge_result(db):
    db.table()
    if db.kind == "sqlite":
        query = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) "
                 "SELECT i FROM n")                       # endless
    else:   # a set-returning function in the select list streams (in FROM it would not)
        query = "SELECT generate_series(1, 1000000000) AS i"
    got = []
    for row in ns.sql_source(db.url, query, fetch_size=100):
        got.append(row["i"])
        if len(got) == 5:
            break
    assert got == [1, 2, 3, 4, 5]


def test_sql_source_qmark_params_on_sqlite(tmp_path):
    path = str(tmp_path / "q.db")
    ([{"a": 1}, {"a": 2}] | ns.sql_sink(path, "t", create=True)).run()
    assert list(ns.sql_source(path, "SELECT a FROM t WHERE a > ?", (1,))) == [{"a": 2}]


def test_sql_source_errors(db):
    t = db.table()
    err = stage_error(ns.sql_source(db.url, f"SELECT id, name AS id FROM {t}"))
    assert "several columns named 'id'" in str(err)
    assert "AS" in str(err)
    err = stage_error(ns.sql_source(db.url, f"SELEC * FROM {t}"))
    assert err.stage == "sql_source"
    assert "syntax" in str(err).lower()
    if db.kind == "sqlite":
        err = stage_error(ns.sql_source(db.url, "PRAGMA foreign_keys = ON"))
        assert "the query returned no result set" in str(err)
    else:   # PostgreSQL refuses anything but a query in a server-side cursor
        err = stage_error(ns.sql_source(db.url, f"DELETE FROM {t}"))
        assert "DELETE" in str(err)


def test_sql_source_opens_sqlite_read_only(tmp_path):
    path = str(tmp_path / "r.db")
    ([{"a": 1}] | ns.sql_sink(path, "t", create=True)).run()
    err = stage_error(ns.sql_source(path, "DELETE FROM t RETURNING a"))
    assert "readonly" in str(err)
    assert list(ns.sql_source(path, "SELECT * FROM t")) == [{"a": 1}]


# -- arguments ------------------------------------------------------------------------


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda: ns.sql_sink(42, "t"), TypeError, "url must be a sqlite file path or a SQLAlchemy"),
    (lambda: ns.sql_sink("", "t"), ValueError, "url is empty"),
    (lambda: ns.sql_sink("a.db", ""), ValueError, "table must be a non-empty name"),
    (lambda: ns.sql_sink("a.db", None), TypeError, "table must be a str"),
    (lambda: ns.sql_sink("a.db", "t", 0), ValueError, "batch_size must be >= 1, got 0"),
    (lambda: ns.sql_sink("a.db", "t", "10"), TypeError, "batch_size must be an int"),
    (lambda: ns.sql_sink("a.db", "t", key=[]), TypeError, "key must be a column name"),
    (lambda: ns.sql_sink("a.db", "t", key=["a", "a"]), ValueError, "key repeats a column"),
    (lambda: ns.sql_sink("a.db", "t", key=[1]), TypeError, "each key column must be a str"),
    (lambda: ns.sql_sink("a.db", "t", create="yes"), TypeError, "create must be True or False"),
    (lambda: ns.sql_sink("a.db", "t", flush_interval=0), ValueError, "flush_interval must be > 0"),
    (lambda: ns.sql_sink("a.db", "t", clock=1), TypeError, "clock must be a callable"),
    (lambda: ns.sql_sink("a.db", "t", workers=4), ValueError, "option 'workers' does not apply"),
    (lambda: ns.sql_sink("a.db", "t", batchsize=4), TypeError, "unexpected keyword argument"),
    (lambda: ns.sql_sink("a.db", "t", on_error="ignore"), ValueError, "on_error must be"),
    (lambda: ns.sql_sink("nosuchdb+x://h/d", "t"), ValueError, "SQLAlchemy does not know"),
    (lambda: ns.sql_sink("postgresql://u:pw@h:notaport/d", "t"), ValueError,
     "cannot parse the database URL 'postgresql://u:***@h:notaport/d'"),
    (lambda: ns.sql_sink("mysql://u@h/d", "t", key="id"), ValueError,
     "key= (upsert) works on sqlite and PostgreSQL"),
    (lambda: ns.sql_source("a.db", ""), ValueError, "query is empty"),
    (lambda: ns.sql_source("a.db", 1), TypeError, "query must be a SQL string"),
    (lambda: ns.sql_source("a.db", "SELECT 1", 5), TypeError, "params must be a dict"),
    (lambda: ns.sql_source("a.db", "SELECT 1", fetch_size=0), ValueError,
     "fetch_size must be >= 1"),
    (lambda: ns.sql_source("a.db", "SELECT 1", follow=True), TypeError,
     "unexpected keyword argument 'follow'"),
])
def test_bad_arguments(call, error, message):
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value)


def test_exported_names():
    for name in ["sql_sink", "sql_source"]:
        assert name in ns.__all__
        assert getattr(ns, name) is getattr(ns.sql, name)
