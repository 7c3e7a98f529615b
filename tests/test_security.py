"""Security: broker data is never unpickled or evaluated by default; item data never
becomes SQL text; credentials never show; TLS to Kafka for real.

* Broker data: a pickle payload that would run code when loaded, and a string that
  would run code if evaluated, go through every built-in deserializer of both clients
  (values and keys); nothing runs. The connectors' code has no call that could
  unpickle or evaluate data.
* SQL: item *values* reach the database only as bound parameters (every statement's
  text is recorded and checked), and a dict key that is SQL is refused before any
  statement is built, on sqlite and PostgreSQL.
* Credentials: SASL passwords (``sasl_plain_password``, ``sasl.password``) and
  database URL passwords never appear in a repr, a report, ``Run.stats()``, the log
  (every logger at DEBUG, the Kafka clients' included), a warning or an error
  message, in working runs and in failing ones.
* TLS: kafka_source -> kafka_sink through a TLS listener with both clients, and a
  client that does not trust the broker's CA, or speaks plaintext to it, fails with a
  clear error. The listener is the test proxy of tests/kafka_support.py in front of
  Tansu (Tansu 0.6.0 cannot serve TLS itself: see that module's docstring).
"""

from __future__ import annotations

import ast
import gc
import json
import logging
import os
import pickle
import sqlite3
import traceback
import warnings
from pathlib import Path

import pytest

import nanostream as ns
from nanostream.kafka import kafka_sink, kafka_source
from tests.kafka_support import create_topic, unique_topic
from tests.test_kafka import CLIENTS, produce, read_all
from tests.test_sql import DB, PG_URL, PostgresDB, SqliteDB

DEADLINE = 60.0
PACKAGE = Path(ns.__file__).resolve().parent
SECRET = "S3cr3t-Pa55-Zq9"


class _RunsCode:
    """Unpickling this makes a directory: proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# == broker data is never unpickled or evaluated =========================================

@pytest.mark.kafka
@pytest.mark.parametrize("client", CLIENTS)
def test_broker_data_is_never_unpickled_or_evaluated(kafka_broker, make_topic, tmp_path,
                                                     client):
    bootstrap = kafka_broker.bootstrap
    by_pickle, by_eval = tmp_path / "unpickled", tmp_path / "evaluated"
    payload = pickle.dumps(_RunsCode(str(by_pickle)))
    expression = f"__import__('os').mkdir({str(by_eval)!r})"
    # the payloads are live: loading or evaluating them does run code
    pickle.loads(pickle.dumps(_RunsCode(str(tmp_path / "live"))))
    eval(f"__import__('os').mkdir({str(tmp_path / 'live2')!r})")
    assert (tmp_path / "live").is_dir()
    assert (tmp_path / "live2").is_dir()

    topic = make_topic(1)
    values = [payload, expression.encode(), json.dumps(expression).encode()]
    produce(bootstrap, topic, values, partitions=1, key=lambda i: payload)
    for deserializer in ("json", "str", "bytes"):
        for key_deserializer in ("bytes", "str", "json"):
            got = list(kafka_source(topic, bootstrap_servers=bootstrap, client=client,
                                    auto_offset_reset="earliest", stop_at_end=True,
                                    with_metadata=True, on_error="skip",
                                    value_deserializer=deserializer,
                                    key_deserializer=key_deserializer))
            for record in got:   # what comes out is data, never an object built by code
                assert isinstance(record.value, (bytes, str, int, float, list, dict))
    assert not by_pickle.exists()
    assert not by_eval.exists()
    for what in ("value_deserializer", "key_deserializer"):
        for name in ("pickle", "cloudpickle", "dill", "marshal"):
            with pytest.raises(ValueError, match="unpickling data from a broker runs "
                                                 "whatever code its producer chose"):
                kafka_source("t", client=client, **{what: name})


def _calls(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name):
                names.add(f.id)
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                names.add(f"{f.value.id}.{f.attr}")
    return names


def test_connectors_have_no_call_that_unpickles_or_evaluates():
    """Kafka, files, SQL: no code path loads data with pickle, marshal, eval or exec.
    (Only the process executor unpickles: its own functions and items, sent between
    its own processes.)"""
    forbidden = {"eval", "exec", "compile", "pickle.loads", "pickle.load", "cloudpickle.loads",
                 "marshal.loads", "marshal.load", "dill.loads", "yaml.load", "shelve.open",
                 "__import__"}
    for module in ("kafka.py", "files.py", "sql.py", "_io.py"):
        tree = ast.parse((PACKAGE / module).read_text())
        assert not _calls(tree) & forbidden, (module, _calls(tree) & forbidden)
        imported = {alias.name for node in ast.walk(tree)
                    if isinstance(node, (ast.Import, ast.ImportFrom))
                    for alias in node.names}
        assert not imported & {"pickle", "cloudpickle", "marshal", "dill", "shelve"}, module


# == SQL: data never becomes SQL text ======================================================

@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request, tmp_path):
    impl = SqliteDB(tmp_path) if request.param == "sqlite" else PostgresDB()
    d = DB(impl)
    yield d
    impl.close(d.tables)


@pytest.fixture
def statements(monkeypatch):
    """Every SQL text nanostream sends, on both back ends: the stdlib sqlite3
    connection's execute/executemany and SQLAlchemy's cursor executions."""
    seen: list[str] = []

    class Recording(sqlite3.Connection):
        def execute(self, sql, *args):
            seen.append(sql)
            return super().execute(sql, *args)

        def executemany(self, sql, *args):
            seen.append(sql)
            return super().executemany(sql, *args)

    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect",
                        lambda *a, **kw: connect(*a, factory=Recording, **kw))
    import sqlalchemy as sa

    def record(conn, cursor, statement, parameters, context, executemany):
        seen.append(statement)

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", record)


def test_sql_item_values_are_parameters_never_sql_text(db, statements):
    t = db.table()
    evil = f"x'); DROP TABLE {t}; --"
    rows = [{"id": 1, "name": evil, "score": 0.5},
            {"id": 2, "name": "Robert'); DROP TABLE students;--"}]
    (rows | ns.sql_sink(db.url, t)).run()
    (rows[:1] | ns.sql_sink(db.url, t, key="id")).run()          # the upsert statement too
    assert [r[1] for r in db.rows(t)] == [evil, "Robert'); DROP TABLE students;--"]
    got = list(ns.sql_source(db.url, f"SELECT name FROM {t} WHERE name = :n", {"n": evil}))
    assert got == [{"name": evil}]
    inserts = [s for s in statements if "INSERT" in s.upper()]
    assert inserts, statements
    for text in statements:
        assert "DROP TABLE" not in text, text


def test_sql_a_key_that_is_sql_is_refused_before_any_statement(db, statements):
    t = db.table()
    evil = {"id); DROP TABLE x; --": 1, "name": "x"}
    with pytest.raises(ns.StageError) as info:
        ([{"id": 1, "name": "fine"}, evil] | ns.sql_sink(db.url, t)).run()
    assert "the row's key 'id); DROP TABLE x; --' is not a column of table" in str(info.value)
    assert db.count(t) == 0                   # the batch rolled back; the table is there
    with pytest.raises(ns.StageError, match="cannot create a column from the key"):
        ([evil] | ns.sql_sink(db.url, db.name(), create=True)).run()
    for text in statements:
        assert "DROP TABLE" not in text, text


def test_sql_identifiers_are_quoted(tmp_path):
    """Names that are legal columns but SQL words or odd characters work as names."""
    path = str(tmp_path / "q.db")
    with sqlite3.connect(path) as conn:
        conn.execute('CREATE TABLE "order" ("select" TEXT, "a b" INTEGER, "x""y" TEXT)')
    conn.close()
    ([{"select": "s", "a b": 1, 'x"y': "q"}] | ns.sql_sink(path, "order")).run()
    assert list(ns.sql_source(path, 'SELECT * FROM "order"')) == [
        {"select": "s", "a b": 1, 'x"y': "q"}]


# == credentials never show =================================================================

def _texts_of_error(err: BaseException) -> list[str]:
    return [str(err), repr(err), "".join(traceback.format_exception(err))]


def _assert_hidden(texts: list[str], secret: str = SECRET) -> None:
    for text in texts:
        assert secret not in text, text[max(0, text.find(secret) - 300):][:600]


def _sasl_options(client: str) -> dict:
    if client == "kafka-python":
        return {"sasl_mechanism": "PLAIN", "sasl_plain_username": "alice",
                "sasl_plain_password": SECRET}
    return {"sasl.mechanism": "PLAIN", "sasl.username": "alice", "sasl.password": SECRET}


@pytest.mark.kafka
@pytest.mark.parametrize("client", CLIENTS)
def test_kafka_passwords_never_show_in_a_working_run(kafka_broker, make_topic, caplog, client):
    """SASL options set (unused on a PLAINTEXT connection): a full run, logged at DEBUG."""
    bootstrap = kafka_broker.bootstrap
    src_topic, out_topic = make_topic(1), make_topic(1)
    produce(bootstrap, src_topic, [{"i": i} for i in range(5)], partitions=1)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = kafka_source(src_topic, bootstrap_servers=bootstrap, client=client,
                              group_id=unique_topic("g"), partitions=[0],
                              auto_offset_reset="earliest", stop_at_end=True,
                              **_sasl_options(client))
        pipeline = source | ns.transform(dict) | kafka_sink(
            out_topic, bootstrap_servers=bootstrap, client=client, **_sasl_options(client))
        run = pipeline.start()
        assert run.join(DEADLINE)
        report = run.stats()
    assert len(read_all(bootstrap, out_topic)) == 5
    assert caplog.records   # the clients' DEBUG logs were captured
    _assert_hidden([repr(source), str(source), repr(source.args), repr(pipeline),
                    pipeline._repr_html_() or "", str(report), repr(report), repr(run),
                    run._repr_html_() or "", caplog.text,
                    *(str(w.message) for w in caught)])


@pytest.mark.kafka
@pytest.mark.parametrize("client", CLIENTS)
def test_kafka_passwords_never_show_when_authentication_fails(kafka_broker, caplog, client):
    """SASL_PLAINTEXT to a broker without SASL: the handshake fails; the error, the
    log at DEBUG and the warnings name the broker, never the password."""
    caplog.set_level(logging.DEBUG)
    texts = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for stage in (
            kafka_source("t", bootstrap_servers=kafka_broker.bootstrap, client=client,
                         security_protocol="SASL_PLAINTEXT", connect_timeout=2,
                         **_sasl_options(client)),
            kafka_sink("t", bootstrap_servers=kafka_broker.bootstrap, client=client,
                       security_protocol="SASL_PLAINTEXT", connect_timeout=2,
                       **_sasl_options(client)),
        ):
            pipeline = stage if stage.kind == "source" else [1] | stage
            run = pipeline.start()
            with pytest.raises(ns.StageError) as info:
                run.join(DEADLINE)
            err = info.value
            assert "accepts connections but the client could not talk Kafka" in str(err)
            assert "security_protocol and the SSL/SASL options" in str(err)
            texts += [*_texts_of_error(err), str(run.stats()), repr(run), repr(pipeline)]
        nowhere = f"127.0.0.1:{_free_port()}"    # and a broker that is not there at all
        with pytest.raises(ns.StageError, match="cannot reach the Kafka broker") as info:
            ([1] | kafka_sink("t", bootstrap_servers=nowhere, client=client, connect_timeout=1,
                              security_protocol="SASL_PLAINTEXT",
                              **_sasl_options(client))).run(timeout=DEADLINE)
        texts += _texts_of_error(info.value)
        gc.collect()   # kafka-python's leaked sockets warn here, into the record
    _assert_hidden([*texts, caplog.text, *(str(w.message) for w in caught)])


@pytest.mark.parametrize("name", ["sasl_plain_password", "ssl_password", "sasl.password",
                                  "ssl.key.password", "ssl.keystore.password",
                                  "sasl.oauthbearer.client.secret", "ssl.key.pem",
                                  "sasl.jaas.config"])
def test_kafka_secret_options_are_masked_in_reprs(name):
    client = "kafka-python" if "_" in name else "confluent"
    stages = [kafka_source("t", client=client, **{name: SECRET}),
              kafka_sink("t", client=client, **{name: SECRET})]
    for stage in stages:
        assert f"{name}=***" in repr(stage.args) + repr(stage.kwargs)
    _assert_hidden([repr(s) for s in stages] + [repr(s.args) + repr(s.kwargs) for s in stages]
                   + [repr(stages[0] | ns.sink(print))])


@pytest.mark.postgres
def test_database_passwords_never_show(caplog):
    from sqlalchemy.engine import make_url

    good = make_url(PG_URL).set(password=SECRET).render_as_string(hide_password=False)
    down = f"postgresql+psycopg://alice:{SECRET}@127.0.0.1:1/test?sslpassword={SECRET}"
    pg = DB(PostgresDB())
    t = pg.table()
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sink = ns.sql_sink(good, t)
            pipeline = [{"id": 1, "name": "a"}] | sink
            report = pipeline.run()
            texts += [repr(sink), str(sink), repr(pipeline), pipeline._repr_html_() or "",
                      str(report)]
            for bad in ([{"id": 1, "name": "dup"}] | ns.sql_sink(good, t),       # a bad row
                        [{"id": 2}] | ns.sql_sink(down, t),                     # unreachable
                        ns.sql_source(down, "SELECT 1")):
                run = bad.start()
                with pytest.raises(ns.StageError) as info:
                    run.join(DEADLINE)
                texts += [*_texts_of_error(info.value), str(run.stats()), repr(run),
                          run._repr_html_() or ""]
            assert any("cannot connect to postgresql+psycopg://alice:***@127.0.0.1:1/test"
                       in x for x in texts)
        texts += [caplog.text, *(str(w.message) for w in caught)]
    finally:
        pg.impl.close(pg.tables)
    _assert_hidden(texts)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# == TLS to Kafka =============================================================================

def _tls_options(client: str, broker) -> dict:
    if client == "kafka-python":
        return {"security_protocol": "SSL", "ssl_cafile": broker.ca_file}
    return {"security.protocol": "SSL", "ssl.ca.location": broker.ca_file}


@pytest.mark.kafka
@pytest.mark.parametrize("client", CLIENTS)
def test_tls_kafka_to_kafka(kafka_tls_broker, client):
    broker = kafka_tls_broker
    src = create_topic(broker, unique_topic("tls-in"), 1)
    out = create_topic(broker, unique_topic("tls-out"), 1)
    opts = _tls_options(client, broker)
    ([{"i": i} for i in range(20)]
     | kafka_sink(src, bootstrap_servers=broker.bootstrap, client=client, **opts)).run(
        timeout=DEADLINE)
    group = unique_topic("tls")
    report = (kafka_source(src, bootstrap_servers=broker.bootstrap, client=client,
                           group_id=group, partitions=[0], auto_offset_reset="earliest",
                           stop_at_end=True, **opts)
              | ns.transform(lambda v: {**v, "sq": v["i"] ** 2})
              | kafka_sink(out, bootstrap_servers=broker.bootstrap, client=client,
                           **opts)).run(timeout=DEADLINE)
    assert report["kafka_sink"].items_in == 20
    got = list(kafka_source(out, bootstrap_servers=broker.bootstrap, client=client,
                            auto_offset_reset="earliest", stop_at_end=True, **opts))
    assert sorted((v["i"], v["sq"]) for v in got) == [(i, i * i) for i in range(20)]


@pytest.mark.kafka
@pytest.mark.parametrize("client", CLIENTS)
def test_tls_a_client_that_does_not_trust_the_broker_fails_clearly(kafka_tls_broker, client):
    broker = kafka_tls_broker
    untrusted = ({"security_protocol": "SSL"} if client == "kafka-python"
                 else {"security.protocol": "SSL"})      # the system CAs only
    try:
        for options in (untrusted, {}):                   # ... and plaintext to a TLS port
            with pytest.raises(ns.StageError) as info:
                list(kafka_source("t", bootstrap_servers=broker.bootstrap, client=client,
                                  connect_timeout=2, stop_at_end=True, **options))
            err = info.value
            assert isinstance(err.__cause__, ConnectionError)
            assert f"the broker at {broker.bootstrap} accepts connections but the client " \
                   "could not talk Kafka with it within 2 s" in str(err)
            assert "a TLS port needs security_protocol='SSL' and the CA in ssl_cafile" in \
                   str(err)
    finally:
        # kafka-python 3.0 leaks the socket of a connection whose TLS handshake failed (a
        # ResourceWarning when collected, an error under filterwarnings=error): collect
        # them here, with that warning ignored
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
