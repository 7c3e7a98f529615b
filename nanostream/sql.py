"""Databases: ``sql_sink`` writes dict rows in batched transactions, ``sql_source``
streams the rows of a query as dicts.

``url`` is a sqlite file path (stdlib ``sqlite3``, nothing to install; a plain
``sqlite:///path`` URL means the same) or any SQLAlchemy URL such as
``postgresql+psycopg://user:password@host/db`` (``pip install 'nanostream[sql]'``;
SQLAlchemy is imported only when such a URL is used). Passwords in URLs never show
in a stage's repr, a report or an error message.

>>> import os, tempfile
>>> import nanostream as ns
>>> tmp = tempfile.TemporaryDirectory()
>>> db = os.path.join(tmp.name, "app.db")
>>> rows = [{"id": 1, "name": "ada"}, {"id": 2, "name": "bob"}]
>>> _ = (rows | ns.sql_sink(db, "users", create=True, key="id")).run()
>>> list(ns.sql_source(db, "SELECT name FROM users WHERE id = :id", {"id": 2}))
[{'name': 'bob'}]
>>> tmp.cleanup()
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import groupby, islice
from operator import itemgetter
from typing import Any

from . import _io
from ._runtime import TICK
from ._stage import SINK, SOURCE, Stage, repr_short

# sqlite3, SQLAlchemy and the modules only a running connector needs are imported
# inside the functions that use them: ``import nanostream`` stays fast.

__all__ = ["sql_sink", "sql_source"]

TICK_EVERY = 0.1   # seconds of idle input after which a sink with a partial batch looks
                   # at its clock (flush_interval itself is measured on that clock)

_IDENT = r"[^\W\d]\w*"    # a plain identifier: what create=True accepts as a column name
_SECRET_KEYS = {"password", "passwd", "pwd", "sslpassword", "secret", "token", "api_key",
                "apikey", "access_token"}


# -- database locations ------------------------------------------------------------------

class _Url:
    """Where the database is. ``str()``/``repr()`` show it with any password masked.

    ``sqlite`` is the file path when the stdlib driver is used, else ``None`` and
    ``raw`` is a SQLAlchemy URL (kept only to connect; never shown).
    """

    __slots__ = ("raw", "secrets", "shown", "sqlite")

    def __init__(self, fn: str, url: Any) -> None:
        self.secrets: tuple[str, ...] = ()
        if hasattr(url, "render_as_string") and hasattr(url, "drivername"):  # a SQLAlchemy URL
            url = url.render_as_string(hide_password=False)
        if isinstance(url, os.PathLike):
            url = os.fspath(url)
        if isinstance(url, bytes) or not isinstance(url, str):
            raise TypeError(f"{fn}: url must be a sqlite file path or a SQLAlchemy URL "
                            f"string, got {type(url).__name__}")
        if not url:
            raise ValueError(f"{fn}: url is empty; give a sqlite file path or a SQLAlchemy "
                             "URL such as 'postgresql+psycopg://user@host/db'")
        self.raw = url
        scheme, sep, rest = url.partition("://")
        if not sep:                                   # a plain file path
            self.sqlite: str | None = url
            self.shown = url
        elif scheme.lower() == "sqlite" and "?" not in rest and (rest == "" or rest[0] == "/"):
            self.sqlite = rest[1:] or ":memory:"
            self.shown = url
        else:
            self.sqlite = None
            self._parse_sqlalchemy(fn, url)

    def _parse_sqlalchemy(self, fn: str, url: str) -> None:
        rough = _mask(url)
        try:
            from sqlalchemy.engine import make_url
        except ImportError:
            raise ImportError(f"{fn}: the URL {rough!r} needs SQLAlchemy; install it with "
                              "pip install 'nanostream[sql]' (or give a sqlite file path)"
                              ) from None
        try:
            u = make_url(url)
        except Exception as exc:
            raise ValueError(f"{fn}: cannot parse the database URL {rough!r}: "
                             f"{type(exc).__name__}") from None
        secrets: list[str] = [u.password] if u.password else []
        query: dict[str, Any] = {}
        for k, v in u.query.items():
            if k.lower() in _SECRET_KEYS:
                secrets.extend([v] if isinstance(v, str) else v)
                query[k] = "***"
            else:
                query[k] = v
        self.secrets = tuple(s for s in secrets if s)
        self.shown = u.set(query=query).render_as_string(hide_password=True)
        try:
            u.get_dialect()
        except Exception as exc:
            raise ValueError(f"{fn}: SQLAlchemy does not know the database in {self.shown!r}:"
                             f" {self.scrub(str(exc))}. Check the URL's scheme (such as "
                             "'postgresql+psycopg://') and that its driver is installed"
                             ) from None

    def scrub(self, text: str) -> str:
        """``text`` with every secret of the URL masked."""
        for s in self.secrets:
            text = text.replace(s, "***")
        return text

    def leaks(self, exc: BaseException) -> bool:
        """Whether a secret appears anywhere in an exception chain's messages."""
        seen = set()
        e: BaseException | None = exc
        while e is not None and id(e) not in seen:
            seen.add(id(e))
            text = f"{e} {e.args!r}"
            if any(s in text for s in self.secrets):
                return True
            e = e.__cause__ or e.__context__
        return False

    def __str__(self) -> str:
        return self.shown

    def __repr__(self) -> str:
        return repr(self.shown)


def _mask(url: str) -> str:
    """A password-masked URL without parsing it properly (for the error of a bad URL)."""
    url = re.sub(r"^([^:/?#]+://[^/?#@]*?:)[^/?#]*@", r"\1***@", url)
    keys = "|".join(sorted(_SECRET_KEYS))
    return re.sub(rf"([?&](?:{keys})=)[^&#]*", r"\1***", url, flags=re.IGNORECASE)


def _connect_error(fn: str, url: _Url, exc: BaseException) -> ConnectionError:
    """A clear error for a database that cannot be reached, chained to the driver's
    error unless that one shows a secret of the URL."""
    lines = [ln.strip() for ln in url.scrub(str(getattr(exc, "orig", None) or exc)).splitlines()]
    reason = "; ".join(ln for ln in lines if ln and not ln.startswith("(Background"))
    err = ConnectionError(f"{fn}: cannot connect to {url.shown}: {reason}")
    err.__cause__ = None if url.leaks(exc) else exc
    err.__suppress_context__ = True
    return err


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _check_name(fn: str, what: str, value: Any) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{fn}: {what} must be a str, got {type(value).__name__} {value!r}")
    if not value or "\x00" in value:
        raise ValueError(f"{fn}: {what} must be a non-empty name, got {value!r}")


# -- back ends: stdlib sqlite3 and SQLAlchemy ----------------------------------------------

class _SqliteDB:
    """Transactions and inserts on a sqlite file through the stdlib driver."""

    def __init__(self, fn: str, url: _Url, must_exist: bool, readonly: bool = False) -> None:
        path = url.sqlite
        assert path is not None
        self.where = path
        memory = path == ":memory:" or path.startswith("file:")
        if not memory:
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{fn}: cannot open the sqlite database {path!r}: "
                                        f"the directory {folder!r} does not exist")
            if os.path.isdir(path):
                raise IsADirectoryError(f"{fn}: {path!r} is a directory, not a sqlite "
                                        "database file")
            if must_exist and not os.path.exists(path):
                raise FileNotFoundError(f"{fn}: no sqlite database at {path!r}" + (
                    "" if readonly else "; pass create=True to create it and the table "
                    "from the first row"))
        import sqlite3

        try:
            if readonly and not memory:
                uri = "file:" + _uri_path(os.path.abspath(path)) + "?mode=ro"
                self.conn = sqlite3.connect(uri, uri=True, isolation_level=None)
            else:
                self.conn = sqlite3.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise ConnectionError(f"{fn}: cannot open the sqlite database {path!r}: {exc}"
                                  ) from exc
        try:
            self.conn.execute("PRAGMA schema_version")   # reads the file's header
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            raise ValueError(f"{fn}: {path!r} is not a sqlite database ({exc}); give the path "
                             "of a sqlite file" + ("" if readonly else ", or a path that does "
                                                   "not exist yet with create=True")) from exc

    # schema ----------------------------------------------------------------

    @staticmethod
    def _qualified(table: str, schema: str | None) -> str:
        return (_quote(schema) + "." if schema else "") + _quote(table)

    def columns(self, table: str, schema: str | None) -> list[str] | None:
        prefix = _quote(schema) + "." if schema else ""
        rows = self.conn.execute(f"PRAGMA {prefix}table_info({_quote(table)})").fetchall()
        return [r[1] for r in rows] if rows else None

    def unique_sets(self, table: str, schema: str | None) -> list[frozenset[str]]:
        prefix = _quote(schema) + "." if schema else ""
        info = self.conn.execute(f"PRAGMA {prefix}table_info({_quote(table)})").fetchall()
        found = []
        pk = [r[1] for r in sorted(info, key=lambda r: r[5]) if r[5]]
        if pk:
            found.append(frozenset(pk))
        for idx in self.conn.execute(f"PRAGMA {prefix}index_list({_quote(table)})"):
            name, unique, partial = idx[1], idx[2], idx[4] if len(idx) > 4 else 0
            if unique and not partial:
                cols = [r[2] for r in self.conn.execute(
                    f"PRAGMA {prefix}index_info({_quote(name)})")]
                if all(c is not None for c in cols):
                    found.append(frozenset(cols))
        return found

    def create(self, table: str, schema: str | None, types: list[tuple[str, type | None]],
               key: tuple[str, ...] | None) -> None:
        import decimal

        names = {bool: "INTEGER", int: "INTEGER", float: "REAL", str: "TEXT", bytes: "BLOB",
                 decimal.Decimal: "NUMERIC"}
        cols = [f"{_quote(c)} {names.get(t, '') if t else ''}".rstrip() for c, t in types]
        if key:
            cols.append(f"PRIMARY KEY ({', '.join(map(_quote, key))})")
        self.conn.execute(f"CREATE TABLE IF NOT EXISTS {self._qualified(table, schema)} "
                          f"({', '.join(cols)})")

    # statements ------------------------------------------------------------

    def prepare(self, table: str, schema: str | None, cols: tuple[str, ...],
                key: tuple[str, ...] | None) -> tuple[Any, Callable[[list[Any]], Any]]:
        sql = (f"INSERT INTO {self._qualified(table, schema)} "
               f"({', '.join(map(_quote, cols))}) VALUES ({', '.join('?' * len(cols))})")
        if key:
            others = [c for c in cols if c not in key]
            sql += f" ON CONFLICT ({', '.join(map(_quote, key))}) DO " + (
                "UPDATE SET " + ", ".join(f"{_quote(c)} = excluded.{_quote(c)}" for c in others)
                if others else "NOTHING")
        if len(cols) == 1:
            name = cols[0]

            def params(rows: list[Any]) -> Any:
                return [(r[name],) for r in rows]
        else:
            get = itemgetter(*cols)

            def params(rows: list[Any]) -> Any:
                return map(get, rows)
        return sql, params

    # transactions ----------------------------------------------------------

    def begin(self) -> None:
        self.conn.execute("BEGIN")

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def savepoint(self) -> None:
        self.conn.execute("SAVEPOINT nanostream_row")

    def release(self) -> None:
        self.conn.execute("RELEASE nanostream_row")

    def rollback_savepoint(self) -> None:
        self.conn.execute("ROLLBACK TO nanostream_row")
        self.conn.execute("RELEASE nanostream_row")

    def execute_many(self, stmt: Any, params: Any) -> None:
        self.conn.executemany(stmt, params)

    @staticmethod
    def row_error(exc: BaseException) -> BaseException | None:
        """The error to report when ``exc`` is a problem with the row's data (a
        constraint, a value the driver cannot store), else ``None`` (the database or
        the connection failed: not something to skip)."""
        import sqlite3

        if isinstance(exc, (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError,
                            sqlite3.ProgrammingError, OverflowError, TypeError, ValueError,
                            KeyError)):
            return exc
        return None

    # reading ---------------------------------------------------------------

    def query(self, sql: Any, params: Any, fetch_size: int) -> Iterator[Any]:
        cur = self.conn.execute(sql, params if params is not None else ())
        if cur.description is None:
            raise ValueError("the query returned no result set; sql_source runs queries "
                             "that return rows (SELECT ...)")
        try:
            keys = _result_keys([d[0] for d in cur.description])
            fetch = cur.fetchmany
            while True:
                rows = fetch(fetch_size)
                if not rows:
                    return
                for r in rows:
                    yield dict(zip(keys, r, strict=True))
        finally:
            cur.close()

    def close(self) -> None:
        try:
            self.rollback()
        finally:
            self.conn.close()


def _uri_path(path: str) -> str:
    from urllib.parse import quote
    return quote(path)


def _result_keys(keys: list[str]) -> list[str]:
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"the query returns several columns named {', '.join(map(repr, dup))};"
                         " rename them with AS so each row can be a dict")
    return keys


class _AlchemyDB:
    """The same operations through SQLAlchemy Core, for every other database."""

    def __init__(self, fn: str, url: _Url) -> None:
        import sqlalchemy as sa
        from sqlalchemy.pool import NullPool

        self.sa = sa
        self.where = url.shown
        kwargs: dict[str, Any] = {"poolclass": NullPool}
        u = sa.engine.make_url(url.raw)
        self.dialect = u.get_backend_name()
        if self.dialect == "postgresql" and "connect_timeout" not in u.query:
            kwargs["connect_args"] = {"connect_timeout": 10}
        try:
            self.engine = sa.create_engine(u, **kwargs)
            self.conn = self.engine.connect()
        except Exception as exc:
            if hasattr(self, "engine"):
                self.engine.dispose()
            err: ConnectionError | None = _connect_error(fn, url, exc)
        else:
            err = None
        if err is not None:
            raise err
        self.tx: Any = None
        self.sp: Any = None
        self.table: Any = None

    def _reflect(self, table: str, schema: str | None) -> Any:
        sa = self.sa
        try:
            t = sa.Table(table, sa.MetaData(), schema=schema, autoload_with=self.conn)
        except sa.exc.NoSuchTableError:
            t = None
        finally:
            if self.conn.in_transaction():
                self.conn.rollback()
        return t

    def columns(self, table: str, schema: str | None) -> list[str] | None:
        self.table = self._reflect(table, schema)
        return None if self.table is None else [c.name for c in self.table.columns]

    def unique_sets(self, table: str, schema: str | None) -> list[frozenset[str]]:
        insp = self.sa.inspect(self.conn)
        try:
            found = []
            pk = insp.get_pk_constraint(table, schema=schema).get("constrained_columns") or []
            if pk:
                found.append(frozenset(pk))
            for uc in insp.get_unique_constraints(table, schema=schema):
                found.append(frozenset(uc["column_names"]))
            for ix in insp.get_indexes(table, schema=schema):
                cols = ix.get("column_names") or []
                if ix.get("unique") and cols and all(c is not None for c in cols):
                    found.append(frozenset(c for c in cols if c is not None))
            return found
        finally:
            if self.conn.in_transaction():
                self.conn.rollback()

    def create(self, table: str, schema: str | None, types: list[tuple[str, type | None]],
               key: tuple[str, ...] | None) -> None:
        import datetime
        import decimal

        sa = self.sa
        known: dict[type | None, Any] = {bool: sa.Boolean, int: sa.BigInteger, float: sa.Float, str: sa.Text,
                 bytes: sa.LargeBinary, decimal.Decimal: sa.Numeric,
                 datetime.datetime: sa.DateTime, datetime.date: sa.Date,
                 datetime.time: sa.Time, dict: sa.JSON, list: sa.JSON}
        columns = [sa.Column(c, known.get(t, sa.Text)(), primary_key=bool(key and c in key),
                             autoincrement=False) for c, t in types]
        t = sa.Table(table, sa.MetaData(), *columns, schema=schema)
        with self.conn.begin():
            t.create(self.conn, checkfirst=True)

    def prepare(self, table: str, schema: str | None, cols: tuple[str, ...],
                key: tuple[str, ...] | None) -> tuple[Any, Callable[[list[Any]], Any]]:
        t = self.table
        if not key:
            stmt: Any = self.sa.insert(t)
        else:
            if self.dialect == "postgresql":
                from sqlalchemy.dialects.postgresql import insert as upsert
            else:
                from sqlalchemy.dialects.sqlite import insert as upsert  # type: ignore[assignment]
            stmt = upsert(t)
            others = [c for c in cols if c not in key]
            if others:
                stmt = stmt.on_conflict_do_update(
                    index_elements=list(key), set_={c: stmt.excluded[c] for c in others})
            else:
                stmt = stmt.on_conflict_do_nothing(index_elements=list(key))
        return stmt, _as_dicts

    def begin(self) -> None:
        self.tx = self.conn.begin()

    def commit(self) -> None:
        tx, self.tx = self.tx, None
        tx.commit()

    def rollback(self) -> None:
        tx, self.tx, self.sp = self.tx, None, None
        if tx is not None and tx.is_active:
            tx.rollback()

    def savepoint(self) -> None:
        self.sp = self.conn.begin_nested()

    def release(self) -> None:
        self.sp.commit()

    def rollback_savepoint(self) -> None:
        self.sp.rollback()

    def execute_many(self, stmt: Any, params: Any) -> None:
        self.conn.execute(stmt, params)

    def row_error(self, exc: BaseException) -> BaseException | None:
        sa_exc = self.sa.exc
        if isinstance(exc, sa_exc.DBAPIError):
            orig = exc.orig
            code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
            if code:  # SQLSTATE classes 22 (data exception) and 23 (integrity constraint)
                return orig if str(code)[:2] in ("22", "23") else None
            if isinstance(exc, (sa_exc.IntegrityError, sa_exc.DataError,
                                sa_exc.ProgrammingError)):
                return orig  # e.g. a value the driver cannot adapt
            return None
        if isinstance(exc, (sa_exc.StatementError, TypeError, ValueError, OverflowError,
                            KeyError)):
            return getattr(exc, "orig", None) or exc
        return None

    def query(self, sql: Any, params: Any, fetch_size: int) -> Iterator[Any]:
        stmt = self.sa.text(sql) if isinstance(sql, str) else sql
        result = self.conn.execute(stmt, params or {}, execution_options={
            "stream_results": True, "yield_per": fetch_size})   # a server-side cursor
        if not result.returns_rows:
            raise ValueError("the query returned no result set; sql_source runs queries "
                             "that return rows (SELECT ...)")
        try:
            keys = _result_keys(list(result.keys()))
            for part in result.partitions(fetch_size):
                for r in part:
                    yield dict(zip(keys, r, strict=True))
        finally:
            result.close()

    def close(self) -> None:
        try:
            self.rollback()
            self.conn.close()
        finally:
            self.engine.dispose()


def _as_dicts(rows: list[Any]) -> list[Any]:
    if all(type(r) is dict for r in rows):
        return rows
    for r in rows:
        if not isinstance(r, Mapping):
            raise TypeError(f"sql_sink writes dict rows, got {type(r).__name__}")
    return [dict(r) for r in rows]


def _open(fn: str, url: _Url, *, must_exist: bool, readonly: bool = False) -> Any:
    if url.sqlite is not None:
        return _SqliteDB(fn, url, must_exist, readonly)
    return _AlchemyDB(fn, url)


# -- the sink ----------------------------------------------------------------------------

def sql_sink(url: Any, table: str, batch_size: int = 500, *,
             key: str | Sequence[str] | None = None, create: bool = False,
             schema: str | None = None, flush_interval: float | None = 1.0,
             clock: Callable[[], float] | None = None, **options: Any) -> Stage:
    """A sink inserting dict rows into ``table``, ``batch_size`` rows per transaction.

    Each row's keys are column names (checked against the table's real columns;
    never pasted into SQL unchecked) and its values are bound as parameters. Rows
    need not all have the same keys; columns a row lacks get their default.

    * ``key="id"`` (or a list of columns) makes it an upsert: a row whose key exists
      updates that row's other columns (``INSERT ... ON CONFLICT (id) DO UPDATE``;
      sqlite and PostgreSQL). The key must be the primary key or a unique constraint.
    * ``create=True`` creates a missing table from the first row: its keys become the
      columns (they must be plain identifiers), typed from the values, with ``key``
      as primary key.
    * A partial batch is committed once ``flush_interval`` seconds have passed since
      its first row (``None``: only when full), measured on ``clock`` (default
      ``time.monotonic``) and checked whenever rows arrive and whenever the input has
      been idle for 0.1 s; and at the end of the stream. ``run.stop(drain=False)`` and a
      failed run discard it uncommitted.
    * Completion tracking: a row counts as handled only once its batch has committed.
    * A bad row (a constraint it breaks, a key that is not a column, a value the
      database refuses, an item that is not a dict) rolls its whole batch back and,
      with ``on_error="raise"``, fails the run with a ``StageError`` naming the row.
      With ``on_error="skip"`` (or a callable) the batch is retried one row at a time
      (each in a savepoint): good rows are committed, bad ones skipped and counted.
      A database that fails (connection lost, locked, table dropped) always fails the
      run.

    Stage options: ``name``, ``queue_size``, ``on_error``.

    >>> import os, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> db = os.path.join(tmp.name, "t.db")
    >>> _ = ([{"k": "a", "n": 1}, {"k": "a", "n": 2}] | sql_sink(db, "t", key="k", create=True)).run()
    >>> list(sql_source(db, "SELECT * FROM t"))
    [{'k': 'a', 'n': 2}]
    >>> tmp.cleanup()
    """
    where = _Url("sql_sink", url)
    _check_name("sql_sink", "table", table)
    if schema is not None:
        _check_name("sql_sink", "schema", schema)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"sql_sink: batch_size must be an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"sql_sink: batch_size must be >= 1, got {batch_size}")
    keys = _check_key(key)
    _io.check_flag("sql_sink", "create", create)
    _io.check_number("sql_sink", "flush_interval", flush_interval, allow_none=True)
    if clock is not None and not callable(clock):
        raise TypeError(f"sql_sink: clock must be a callable returning seconds, got {clock!r}")
    if keys and where.sqlite is None:
        backend = where.shown.split(":", 1)[0].split("+", 1)[0].lower()
        if backend not in ("postgresql", "sqlite"):
            raise ValueError(f"sql_sink: key= (upsert) works on sqlite and PostgreSQL; not on "
                             f"{backend!r}")
    kwargs: dict[str, Any] = {"url": where, "table": table}
    given = dict(batch_size=batch_size, key=keys, create=create, schema=schema,
                 flush_interval=flush_interval, clock=clock)
    defaults = dict(batch_size=500, key=None, create=False, schema=None, flush_interval=1.0,
                    clock=None)
    kwargs.update({k: v for k, v in given.items() if v != defaults[k]})
    tick = None if flush_interval is None else min(flush_interval, TICK_EVERY)
    return Stage(_sql_sink, SINK, {**_io.stage_options("sql_sink", options), "stream": True},
                 kwargs=kwargs, internal={"lists": True, "tick": tick, "context": True})


def _check_key(key: Any) -> tuple[str, ...] | None:
    if key is None:
        return None
    keys = (key,) if isinstance(key, str) else key
    if not isinstance(keys, (list, tuple)) or not keys:
        raise TypeError(f"sql_sink: key must be a column name or a list of them, got {key!r}")
    for k in keys:
        _check_name("sql_sink", "each key column", k)
    if len(set(keys)) != len(keys):
        raise ValueError(f"sql_sink: key repeats a column: {list(keys)!r}")
    return tuple(keys)


class _Writer:
    """Writes batches of rows in transactions; the rules are in :func:`sql_sink`."""

    def __init__(self, ctx: Any, url: _Url, table: str, key: tuple[str, ...] | None,
                 create: bool, schema: str | None) -> None:
        self.ctx = ctx
        self.url = url
        self.table = table
        self.schema = schema
        self.key = key
        self.create = create
        self.db = _open("sql_sink", url, must_exist=not create)
        try:
            self.columns = self._columns()
        except BaseException:
            self.db.close()
            raise
        self.prepared: dict[tuple[Any, ...], tuple[Any, Callable[[list[Any]], Any]]] = {}

    @property
    def label(self) -> str:
        return f"{self.schema}.{self.table}" if self.schema else self.table

    def _columns(self) -> set[str] | None:
        cols = self.db.columns(self.table, self.schema)
        if cols is None:
            if self.create:
                return None
            raise LookupError(f"sql_sink: there is no table {self.label!r} in {self.url.shown}; "
                              "create it first, or pass create=True to create it from the "
                              "first row")
        if self.key:
            missing = [k for k in self.key if k not in cols]
            if missing:
                raise ValueError(f"sql_sink: key column(s) {', '.join(map(repr, missing))} "
                                 f"not in table {self.label!r} (its columns: {', '.join(cols)})")
            if frozenset(self.key) not in self.db.unique_sets(self.table, self.schema):
                raise ValueError(f"sql_sink: key={list(self.key)!r} is neither the primary key "
                                 f"nor a unique constraint of table {self.label!r}; an upsert "
                                 "needs one on exactly those columns")
        self.order = cols
        return set(cols)

    def _create(self, rows: list[Any]) -> None:
        first = rows[0]
        if not isinstance(first, Mapping) or not first:
            raise TypeError(f"sql_sink: cannot create table {self.label!r} from the first row "
                            f"{repr_short(first, 80)}: create=True needs a non-empty dict")
        names = list(first)
        for n in names:
            if not isinstance(n, str) or not re.fullmatch(_IDENT, n):
                raise ValueError(f"sql_sink: cannot create a column from the key {n!r} of the "
                                 f"first row: with create=True the keys must be plain "
                                 f"identifiers (letters, digits, _); create the table yourself "
                                 "for other names")
        if self.key:
            missing = [k for k in self.key if k not in names]
            if missing:
                raise ValueError(f"sql_sink: cannot create table {self.label!r}: the first row "
                                 f"lacks the key column(s) {', '.join(map(repr, missing))}")
        types: list[tuple[str, type | None]] = []
        for n in names:
            t = next((type(r[n]) for r in rows if isinstance(r, Mapping)
                      and r.get(n) is not None), None)
            types.append((n, t))
        self.db.create(self.table, self.schema, types, self.key)
        self.columns = self._columns()

    def _prepare(self, row: Any) -> tuple[Any, Callable[[list[Any]], Any]]:
        """The statement for rows with this row's keys; TypeError/ValueError if bad."""
        if not isinstance(row, Mapping):
            raise TypeError(f"sql_sink writes dict rows, got {type(row).__name__}")
        cols = tuple(row)
        got = self.prepared.get(cols)
        if got is not None:
            return got
        assert self.columns is not None
        if not cols:
            raise ValueError("the row is empty: no column to insert")
        for c in cols:
            if not isinstance(c, str):
                raise TypeError(f"row keys must be column names (str), got {c!r}")
            if c not in self.columns:
                import difflib
                close = difflib.get_close_matches(c, self.order, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"the row's key {c!r} is not a column of table {self.label!r}"
                                 f"{hint} (its columns: {', '.join(self.order)})")
        if self.key:
            missing = [k for k in self.key if k not in row]
            if missing:
                raise ValueError(f"the row lacks the key column(s) "
                                 f"{', '.join(map(repr, missing))} needed for the upsert")
        got = self.prepared[cols] = self.db.prepare(self.table, self.schema, cols, self.key)
        return got

    def write(self, rows: list[Any]) -> None:
        """Commit one batch of rows (all of them, or, under a skipping ``on_error``,
        the good ones); raises if the batch cannot be committed."""
        if self.columns is None:
            self._create(rows)
        first = rows[0]
        if type(first) is dict:
            got = self.prepared.get(tuple(first))
            # the fast path: one statement for the whole batch when every row has as
            # many keys as the first (a row with other keys then fails on a missing one,
            # a row that is not a mapping fails on the lookup: both go the careful way)
            if got is not None and len(set(map(len, rows))) == 1:
                try:
                    self._transaction([(got, rows)])
                except _RowTrouble:
                    self._careful(rows)
            else:
                self._careful(rows)
        else:
            self._careful(rows)

    def _transaction(self, runs: list[tuple[tuple[Any, Any], list[Any]]]) -> None:
        db = self.db
        db.begin()
        try:
            for (stmt, params), rows in runs:
                db.execute_many(stmt, params(rows))
            db.commit()
        except BaseException as exc:
            db.rollback()
            if isinstance(exc, Exception) and db.row_error(exc) is not None:
                raise _RowTrouble from exc
            raise

    def _careful(self, rows: list[Any]) -> None:
        """Bad rows found one by one; good ones committed in one transaction."""
        good = []
        for row in rows:
            try:
                got = self._prepare(row)
            except (TypeError, ValueError) as exc:
                self.ctx.item_error(exc, row)
                continue
            good.append((got, row))
        if not good:
            return
        runs = []   # consecutive rows with the same keys: one executemany each, in order
        for _, same in groupby(good, key=lambda pair: id(pair[0])):
            same_rows = list(same)
            runs.append((same_rows[0][0], [r for _, r in same_rows]))
        try:
            self._transaction(runs)
        except _RowTrouble:
            self._one_by_one(good)

    def _one_by_one(self, good: list[tuple[tuple[Any, Any], Any]]) -> None:
        db = self.db
        db.begin()
        try:
            for (stmt, params), row in good:
                db.savepoint()
                try:
                    db.execute_many(stmt, params([row]))
                except Exception as exc:
                    db.rollback_savepoint()
                    reported = db.row_error(exc)
                    if reported is None:
                        raise
                    self.ctx.item_error(reported, row)   # raises under on_error="raise"
                    continue
                db.release()
            db.commit()
        except BaseException:
            db.rollback()
            raise

    def close(self) -> None:
        self.db.close()


class _RowTrouble(Exception):
    """A batch failed on some row's data: find the row(s) one at a time."""


def _sql_sink(items: Iterable[Any], *, url: _Url, table: str, batch_size: int = 500,
              key: tuple[str, ...] | None = None, create: bool = False,
              schema: str | None = None, flush_interval: float | None = 1.0,
              clock: Callable[[], float] | None = None, ctx: Any = None,
              lists: bool = False, done: Callable[[int], None] | None = None) -> None:
    """Write ``items`` in batches. In a run (``lists``) the runtime hands over lists
    of rows (and ``TICK`` when the input idles) and ``done(n)`` reports the oldest
    ``n`` rows handled; called directly, ``items`` are the rows themselves."""
    ctx = ctx or _io.DetachedContext("sql_sink")
    if not lists:
        items = _in_lists(items, batch_size)
    report = done or _nothing_done
    now = clock or time.monotonic
    writer = _Writer(ctx, url, table, key, create, schema)
    try:
        # rows arrive in lists: no per-row work here. The clock is read as a list
        # arrives (the first row's time starts a batch's flush_interval) and on every
        # idle TICK
        pending: list[Any] = []
        started = 0.0
        timed = flush_interval is not None
        interval = flush_interval or 0.0
        for rows in items:
            if rows is TICK:
                if pending and now() - started >= interval:
                    writer.write(pending)
                    report(len(pending))
                    pending = []
                continue
            if not rows:
                continue
            if pending:
                pending += rows
            else:
                pending = rows   # the runtime's lists are the stage's to keep
                if timed:
                    started = now()
            n = len(pending)
            if n >= batch_size:
                i = 0
                while n - i >= batch_size:
                    writer.write(pending[i:i + batch_size])
                    report(batch_size)   # a row is handled once its batch committed
                    i += batch_size
                pending = pending[i:]
                if pending and timed:
                    started = now()
            elif timed and now() - started >= interval:
                writer.write(pending)
                report(n)
                pending = []
        if pending:
            writer.write(pending)
            report(len(pending))
    finally:
        writer.close()


def _in_lists(rows: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(rows)
    while True:
        chunk = list(islice(it, size))
        if not chunk:
            return
        yield chunk


def _nothing_done(n: int) -> None:
    return None


# -- the source --------------------------------------------------------------------------

def sql_source(url: Any, query: Any, params: Mapping[str, Any] | Sequence[Any] | None = None,
               *, fetch_size: int = 1000, **options: Any) -> Stage:
    """A source streaming the rows of ``query`` as dicts (column name -> value).

    Rows are fetched ``fetch_size`` at a time (a server-side cursor on PostgreSQL), so
    a large result is never held in memory. Pass values as ``params`` and refer to
    them as ``:name`` in the query, never by formatting them into it. A sqlite file
    is opened read-only and must exist. Stage options: ``name``, ``queue_size``,
    ``on_error``.

    >>> import os, sqlite3, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> db = os.path.join(tmp.name, "t.db")
    >>> with sqlite3.connect(db) as conn:
    ...     _ = conn.execute("CREATE TABLE t (x INTEGER)")
    ...     _ = conn.executemany("INSERT INTO t VALUES (?)", [(1,), (2,), (3,)])
    >>> conn.close()
    >>> list(sql_source(db, "SELECT x FROM t WHERE x >= :low", {"low": 2}))
    [{'x': 2}, {'x': 3}]
    >>> tmp.cleanup()
    """
    where = _Url("sql_source", url)
    if isinstance(query, str):
        if not query.strip():
            raise ValueError("sql_source: query is empty")
    elif where.sqlite is not None or not hasattr(query, "compile"):
        raise TypeError(f"sql_source: query must be a SQL string"
                        f"{'' if where.sqlite is not None else ' or a SQLAlchemy statement'}, "
                        f"got {type(query).__name__}")
    if params is not None:
        ok = isinstance(params, Mapping) or (where.sqlite is not None and isinstance(
            params, (list, tuple)))
        if not ok:
            raise TypeError("sql_source: params must be a dict of :name values"
                            + (" (or a tuple for ? placeholders)" if where.sqlite else "")
                            + f", got {type(params).__name__}")
    if isinstance(fetch_size, bool) or not isinstance(fetch_size, int):
        raise TypeError(f"sql_source: fetch_size must be an int, got {type(fetch_size).__name__}")
    if fetch_size < 1:
        raise ValueError(f"sql_source: fetch_size must be >= 1, got {fetch_size}")
    kwargs: dict[str, Any] = {}
    if params is not None:
        kwargs["params"] = params
    if fetch_size != 1000:
        kwargs["fetch_size"] = fetch_size
    return Stage(_sql_source, SOURCE, _io.stage_options("sql_source", options),
                 args=(where, query), kwargs=kwargs, bound=True)


def _sql_source(url: _Url, query: Any, params: Any = None, fetch_size: int = 1000
                ) -> Iterator[dict[str, Any]]:
    db = _open("sql_source", url, must_exist=True, readonly=True)
    try:
        yield from db.query(query, params, fetch_size)
    finally:
        db.close()
