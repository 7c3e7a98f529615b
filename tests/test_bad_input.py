"""The bad-input catalogue: one test per kind of bad input a user can give nanostream.

Each test gives the bad input and checks three things: the exception's type, that its
message says what went wrong and what to do, and, where data is involved, that
nothing is lost or half-written (no partial SQL batch, no Kafka offset committed past
the bad message, no output file cut mid-record). docs/reliability.md lists the same
cases as a table (input -> what the user sees), in the same order and with the same
numbers: the test names start with their case number.

Real parts throughout: the Tansu broker of the test session, PostgreSQL on
127.0.0.1:5432 (tests marked ``postgres``), sqlite files, real worker processes.
"""

from __future__ import annotations

import gzip
import json
import os
import threading
import time
from pathlib import Path

import pytest

import nanostream as ns
from nanostream.kafka import kafka_sink, kafka_source
from tests.kafka_support import unique_topic
from tests.test_kafka import CLIENTS, committed, produce, read_all
from tests.test_sql import DB, PostgresDB, SqliteDB

DEADLINE = 60.0


@ns.source
def numbers(n):
    yield from range(n)


@ns.transform
def scale(x, factor):
    return x * factor


def failure(pipeline) -> ns.StageError:
    """The StageError that running ``pipeline`` raises."""
    with pytest.raises(ns.StageError) as info:
        pipeline.run(timeout=DEADLINE)
    return info.value


# == definitions and graphs ==============================================================

def test_01_a_stage_of_something_not_callable():
    with pytest.raises(TypeError, match="needs a function or other callable"):
        ns.transform(42)


def test_02_a_source_used_mid_pipeline():
    with pytest.raises(TypeError, match="source 'numbers' cannot take input"):
        numbers(3) | ns.transform(abs) | numbers(2)


def test_03_a_stage_after_a_sink():
    with pytest.raises(TypeError, match="it ends in sink 'show'"):
        numbers(3) | ns.sink(print, name="show") | ns.transform(abs)


def test_04_a_cycle():
    a, b = ns.transform(abs, name="a"), ns.transform(abs, name="b")
    p = ns.Pipeline().add_edge(numbers(2), a).add_edge(a, b)
    with pytest.raises(ValueError, match="the edge 'b' -> 'a' would make a cycle; pipelines must be acyclic"):
        p.add_edge(b, a)


def test_05_a_pipeline_without_a_source():
    segment = ns.transform(abs) | ns.sink(print)
    with pytest.raises(ValueError, match="has no source.*start it with a source, e.g. ns.from_iterable"):
        segment.run()


def test_06_a_stage_without_input_in_a_graph():
    p = (ns.Pipeline().add_edge(numbers(2), ns.sink(print))
         .add_edge(ns.transform(abs, name="orphan"), ns.sink(print)))
    with pytest.raises(ValueError, match="stage 'orphan' has no input"):
        p.run()


def test_07_piping_into_something_that_is_not_a_stage():
    with pytest.raises(TypeError, match="the right side of | must be a stage, a pipeline"):
        numbers(3) | 3
    with pytest.raises(TypeError, match=r"cannot pipe into the plain callable .*: wrap it first, e.g. transform\(fn\)"):
        numbers(3) | abs


def test_08_a_positional_partial_call_of_a_curried_stage():
    with pytest.raises(TypeError, match=r"missing a required argument: 'factor'.*with keyword "
                                        r"arguments only to configure the stage, e.g. "
                                        r"scale\(factor=...\)"):
        scale(3)


# == options ===============================================================================

def test_09_counts_out_of_range_or_of_the_wrong_type():
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        ns.transform(abs, workers=0)
    with pytest.raises(TypeError, match="workers must be an int, got str '2'"):
        ns.transform(abs, workers="2")
    with pytest.raises(ValueError, match="queue_size must be >= 1, got 0"):
        ns.transform(abs, queue_size=0)


def test_10_a_misspelt_option():
    with pytest.raises(TypeError, match="unknown option 'worker'.*did you mean 'workers'"):
        ns.transform(abs, worker=2)


def test_11_an_option_value_not_in_its_set():
    with pytest.raises(ValueError, match="on_error must be 'raise', 'skip' or a callable"):
        ns.transform(abs, on_error="ignore")
    with pytest.raises(ValueError, match="executor must be 'thread' or 'process', got 'gpu'"):
        ns.transform(abs, executor="gpu")


def test_12_an_option_that_does_not_apply():
    with pytest.raises(ValueError, match="stream=True, which runs in one worker.*drop workers"):
        ns.sink(lambda items: None, stream=True, workers=2)
    with pytest.raises(ValueError, match="does not apply to source.*parallelise the stages"):
        ns.source(lambda: iter(()), workers=2)


def test_13_a_bad_timeout():
    with pytest.raises(ValueError, match=r"run: timeout must be >= 0 seconds \(or None"):
        numbers(3).run(timeout=-1)
    with pytest.raises(TypeError, match="run: timeout must be a number of seconds or None"):
        numbers(3).run(timeout="10")
    with numbers(3).start() as run:
        with pytest.raises(ValueError, match="join: timeout must be >= 0"):
            run.join(timeout=-5)
        assert run.join(DEADLINE)


# == items at run time ===================================================================

def _double(x):
    return 2 * x


def test_14_an_unpicklable_item_for_a_process_stage():
    lock = threading.Lock()
    err = failure([1, lock, 3] | ns.transform(_double, executor="process"))
    assert err.item is lock
    assert "items for executor='process' must be picklable" in str(err)
    got = []   # skipped, the others all arrive
    report = ([1, lock, 3] | ns.transform(_double, executor="process", on_error="skip")
              | ns.sink(got.append)).run(timeout=DEADLINE)
    assert sorted(got) == [2, 6]
    assert report["_double"].errors == 1


def _a_lock(x):
    return threading.Lock()


def test_15_an_unpicklable_result_of_a_process_stage():
    err = failure([7] | ns.transform(_a_lock, executor="process"))
    assert err.item == 7
    assert "return picklable values from executor='process' stages" in str(err)


def test_16_an_unpicklable_function_for_a_process_stage():
    lock = threading.Lock()
    consumed = []

    @ns.source
    def watched():
        for i in range(3):
            consumed.append(i)
            yield i

    with pytest.raises(TypeError, match="its function cannot be pickled.*does not capture "
                                        "locks"):
        (watched() | ns.transform(lambda x: (lock, x)[1], executor="process")).run()
    assert consumed == []   # refused at start: no item was taken in and lost


def test_17_a_function_that_raises_on_one_item():
    def parse(s):
        return int(s)

    err = failure(["1", "x", "3"] | ns.transform(parse) | ns.sink(print))
    assert (err.stage, err.item) == ("parse", "x")
    assert "stage 'parse' failed on item 'x': ValueError: invalid literal" in str(err)
    assert isinstance(err.__cause__, ValueError)
    got = list(["1", "x", "3"] | ns.transform(parse, on_error="skip"))
    assert got == [1, 3]


# == Kafka ===================================================================================

kafka = pytest.mark.kafka


@kafka
@pytest.mark.parametrize("client", CLIENTS)
def test_18_an_undecodable_kafka_message(kafka_broker, make_topic, client):
    bootstrap = kafka_broker.bootstrap
    topic = make_topic(1)
    produce(bootstrap, topic, [{"i": 0}, {"i": 1}, b"{not json", {"i": 3}], partitions=1)
    group = unique_topic("bad")
    seen: list = []
    err = failure(kafka_source(topic, bootstrap_servers=bootstrap, group_id=group,
                               partitions=[0], client=client, auto_offset_reset="earliest",
                               stop_at_end=True, commit_interval=0.05)
                  | ns.sink(seen.append))
    assert f"topic '{topic}' partition 0 offset 2; give the value_deserializer" in str(err)
    assert "or on_error='skip' to skip such messages" in str(err)
    # the offset committed never passes the bad message (nor any message not handled),
    # so the pipeline run again, here skipping bad messages, loses nothing
    done = committed(bootstrap, group, topic, 1)[0] or 0
    assert done <= 2
    assert seen[:done] == [{"i": i} for i in range(done)]
    again: list = []
    (kafka_source(topic, bootstrap_servers=bootstrap, group_id=group, partitions=[0],
                  client=client, auto_offset_reset="earliest", stop_at_end=True,
                  on_error="skip") | ns.sink(again.append)).run(timeout=DEADLINE)
    assert again == [{"i": i} for i in (0, 1, 3) if i >= done]
    assert committed(bootstrap, group, topic, 1) == {0: 4}


@kafka
@pytest.mark.parametrize("client", CLIENTS)
def test_19_a_deserializer_that_would_unpickle_broker_data(client):
    with pytest.raises(ValueError, match="unpickling data from a broker runs whatever code.*"
                                         "pass the function yourself"):
        kafka_source("t", value_deserializer="pickle", client=client)


@kafka
@pytest.mark.parametrize("client", CLIENTS)
def test_20_an_oversized_kafka_message(kafka_broker, make_topic, client):
    bootstrap = kafka_broker.bootstrap
    topic = make_topic(1)
    big = b"x" * (2 << 20)   # over both clients' default 1 MB limit
    err = failure([b"a", b"b", big, b"c"]
                  | kafka_sink(topic, bootstrap_servers=bootstrap, client=client,
                               value_serializer="bytes"))
    assert err.item == big
    assert "send smaller items, or raise max_request_size (kafka-python) or " \
           "message.max.bytes (confluent)" in str(err)
    assert [r.value for r in read_all(bootstrap, topic)] == [b"a", b"b"]


@kafka
@pytest.mark.parametrize("client", CLIENTS)
def test_21_an_unknown_topic_to_read(kafka_broker, client):
    missing = unique_topic("missing")
    err = failure(kafka_source(missing, bootstrap_servers=kafka_broker.bootstrap,
                               client=client, connect_timeout=1, stop_at_end=True))
    assert isinstance(err.__cause__, LookupError)
    assert f"topic '{missing}' does not exist" in str(err)
    assert "check the name, or create the topic first" in str(err)


@kafka
@pytest.mark.parametrize("client", CLIENTS)
def test_22_an_unknown_topic_to_write_is_auto_created(kafka_broker, client):
    """A broker with auto-creation (Tansu, Kafka's default) creates the topic; every
    item arrives. (Tansu cannot turn auto-creation off, so a broker without it is not
    tested here.)"""
    topic = unique_topic("auto")
    ([{"i": i} for i in range(5)]
     | kafka_sink(topic, bootstrap_servers=kafka_broker.bootstrap, client=client)).run(
        timeout=DEADLINE)
    got = [json.loads(r.value)["i"] for r in read_all(kafka_broker.bootstrap, topic)]
    assert sorted(got) == list(range(5))


@kafka
@pytest.mark.parametrize("client", CLIENTS)
def test_23_an_invalid_topic_name(client):
    with pytest.raises(ValueError, match=r"'orders 2024' is not a valid Kafka topic name "
                                         r"\(1 to 249 letters, digits"):
        kafka_sink("orders 2024", client=client)
    with pytest.raises(ValueError, match="is not a valid Kafka topic name"):
        kafka_source(["ok", "no/slash"], client=client)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@kafka
@pytest.mark.parametrize("client", CLIENTS)
def test_24_an_unreachable_broker_at_start(client):
    address = f"127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    err = failure([1] | kafka_sink("t", bootstrap_servers=address, client=client,
                                   connect_timeout=1))
    assert time.monotonic() - t0 < 10
    assert isinstance(err.__cause__, ConnectionError)
    assert f"cannot reach the Kafka broker at {address} within 1 s" in str(err)
    assert "Is it running, and is bootstrap_servers right?" in str(err)


@kafka
def test_25_a_misspelt_kafka_client_option(kafka_broker):
    with pytest.raises(TypeError, match="unexpected keyword argument 'linger_mss'; did you "
                                        "mean 'linger_ms'"):
        kafka_sink("t", linger_mss=5)
    # librdkafka's names are checked when the client starts, before any item is taken
    err = failure(kafka_source("t", bootstrap_servers=kafka_broker.bootstrap,
                               client="confluent", fetch_wait_max_mss=5))
    assert 'confluent-kafka refused the configuration: No such configuration property: ' \
           '"fetch.wait.max.mss"' in str(err)


@kafka
def test_26_a_kafka_client_option_value_not_in_its_set(kafka_broker):
    with pytest.raises(ValueError, match="acks must be one of 0, 1, -1, 'all', got 'most'"):
        kafka_sink("t", acks="most")
    with pytest.raises(ValueError, match="auto_offset_reset must be one of 'earliest', "
                                         "'latest', 'none', got 'first'"):
        kafka_source("t", auto_offset_reset="first")
    err = failure([1] | kafka_sink("t", bootstrap_servers=kafka_broker.bootstrap,
                                   client="confluent", acks="most"))
    assert 'refused the configuration: Invalid value for configuration property ' \
           '"request.required.acks"' in str(err)


@kafka
@pytest.mark.parametrize("client", CLIENTS)
def test_27_auto_commit_asked_for(client):
    with pytest.raises(ValueError, match="would commit offsets before the messages are "
                                         "handled; nanostream commits offsets itself"):
        kafka_source("t", group_id="g", enable_auto_commit=True, client=client)


@kafka
@pytest.mark.parametrize("client", CLIENTS)
def test_28_a_kafka_item_that_cannot_be_serialized(kafka_broker, make_topic, client):
    topic = make_topic(1)
    err = failure([{"x": 1}, {"x": {1, 2}}, {"x": 3}]
                  | kafka_sink(topic, bootstrap_servers=kafka_broker.bootstrap,
                               client=client))
    assert err.item == {"x": {1, 2}}
    assert "could not serialize it for Kafka" in str(err)
    assert [json.loads(r.value) for r in read_all(kafka_broker.bootstrap, topic)] == [{"x": 1}]


@kafka
@pytest.mark.parametrize("client", CLIENTS)
def test_51_bootstrap_servers_of_the_wrong_type(client):
    for bad in (9092, "", ["127.0.0.1:9092", 9093]):
        with pytest.raises(TypeError, match="bootstrap_servers must be 'host:port' .*or a list "
                                            "of them"):
            kafka_source("t", bootstrap_servers=bad, client=client)
        with pytest.raises(TypeError, match="bootstrap_servers must be"):
            kafka_sink("t", bootstrap_servers=bad, client=client)


@kafka
@pytest.mark.parametrize("client", CLIENTS)
def test_52_a_kafka_header_value_that_is_not_text_or_bytes(kafka_broker, make_topic, client):
    with pytest.raises(TypeError, match=r"header values must be str, bytes or None, got int 5 "
                                        r"for 'n'; convert it, e.g. str\(value\)"):
        kafka_sink("t", headers={"n": 5}, client=client)
    topic = make_topic(1)
    err = failure([{"n": "1"}, {"n": 2}]
                  | kafka_sink(topic, bootstrap_servers=kafka_broker.bootstrap, client=client,
                               headers=lambda o: {"n": o["n"]}))
    assert err.item == {"n": 2}
    assert "header values must be str, bytes or None, got int 2" in str(err)
    # not five zero bytes: the bad item is not sent at all
    assert [r.headers for r in read_all(kafka_broker.bootstrap, topic)] == [[("n", b"1")]]


# == SQL =======================================================================================

@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request, tmp_path):
    impl = SqliteDB(tmp_path) if request.param == "sqlite" else PostgresDB()
    d = DB(impl)
    yield d
    impl.close(d.tables)


def _rows(n, start=0):
    return [{"id": i, "name": f"n{i}", "score": i / 2} for i in range(start, start + n)]


def test_29_a_sql_row_with_an_extra_column(db):
    t = db.table()
    data = _rows(5)
    data[3] = {"id": 3, "name": "n3", "nmae": "typo"}
    err = failure(data | ns.sql_sink(db.url, t, batch_size=2))
    assert err.item == data[3]
    assert f"the row's key 'nmae' is not a column of table '{t}'; did you mean 'name'?" \
           in str(err)
    assert [r[0] for r in db.rows(t)] == [0, 1]     # the first batch; none of the second


def test_30_a_sql_row_missing_a_required_column(db):
    t = db.table()
    err = failure([{"id": 1, "name": "a"}, {"id": 2, "score": 1.0}] | ns.sql_sink(db.url, t))
    assert err.item == {"id": 2, "score": 1.0}
    assert "null" in str(err).lower()
    assert db.count(t) == 0                          # the batch rolled back whole


def test_31_a_sql_value_of_the_wrong_type(db):
    t = db.table()
    bad = {"id": 2, "name": "x", "score": {"not": "a number"}}
    err = failure([{"id": 1, "name": "a"}, bad] | ns.sql_sink(db.url, t))
    assert err.item == bad
    assert db.count(t) == 0


def test_32_a_sql_constraint_violation(db):
    t = db.table()
    data = _rows(6)
    data[4] = {"id": 1, "name": "duplicate"}
    err = failure(data | ns.sql_sink(db.url, t, batch_size=3))
    assert err.item == {"id": 1, "name": "duplicate"}
    assert "unique" in str(err).lower()
    assert [r[0] for r in db.rows(t)] == [0, 1, 2]   # no row of the failed batch
    t2 = db.table()   # on_error="skip": the other rows of that batch are committed
    report = (data | ns.sql_sink(db.url, t2, batch_size=3, on_error="skip")).run()
    good = [r[0] for r in db.rows(t2)]
    assert good == [0, 1, 2, 3, 5]
    assert report["sql_sink"].errors == 1


def test_33_an_item_that_is_not_a_dict_row(db):
    t = db.table()
    err = failure([{"id": 1, "name": "a"}, (2, "b")] | ns.sql_sink(db.url, t))
    assert "sql_sink writes dict rows, got tuple" in str(err)
    assert db.count(t) == 0


def test_34_a_table_that_does_not_exist(db):
    db.table()   # the database exists, the table does not
    t = db.name()
    err = failure(_rows(1) | ns.sql_sink(db.url, t))
    assert isinstance(err.__cause__, LookupError)
    assert f"there is no table '{t}'" in str(err)
    assert "create it first, or pass create=True" in str(err)


@pytest.mark.postgres
def test_35_an_unreachable_database():
    url = "postgresql+psycopg://alice:pw-Hidden-9@127.0.0.1:1/test"
    err = failure([{"a": 1}] | ns.sql_sink(url, "t"))
    assert isinstance(err.__cause__, ConnectionError)
    assert "cannot connect to postgresql+psycopg://alice:***@127.0.0.1:1/test" in str(err)
    assert "pw-Hidden-9" not in str(err)


def test_36_a_bad_database_url():
    with pytest.raises(ValueError, match="SQLAlchemy does not know the database.*Check the "
                                         "URL's scheme"):
        ns.sql_sink("nosuchdb://h/d", "t")
    with pytest.raises(ValueError, match=r"cannot parse the database URL "
                                         r"'postgresql://u:\*\*\*@h:port/d'"):
        ns.sql_sink("postgresql://u:secret@h:port/d", "t")


def test_37_a_missing_sqlite_file(tmp_path):
    path = tmp_path / "nope.db"
    err = failure(_rows(1) | ns.sql_sink(path, "t"))
    assert f"no sqlite database at {str(path)!r}; pass create=True" in str(err)
    assert not path.exists()


def test_38_a_sql_query_that_fails(db):
    t = db.table()
    err = failure(ns.sql_source(db.url, f"SELECT id, name AS id FROM {t}"))
    assert "several columns named 'id'; rename them with AS" in str(err)
    err = failure(ns.sql_source(db.url, f"SELEC * FROM {t}"))
    assert err.stage == "sql_source"
    assert "syntax" in str(err).lower()


# == files ===================================================================================

@pytest.mark.parametrize("maker", [ns.write_lines, ns.write_jsonl, ns.write_csv])
def test_39_an_output_file_in_a_missing_folder(tmp_path, maker):
    path = tmp_path / "missing" / "out"
    err = failure([{"a": 1}] | maker(path))
    assert isinstance(err.__cause__, FileNotFoundError)
    assert f"cannot write {str(path)!r}: {str(path.parent)!r} does not exist" in str(err)


def test_40_an_output_file_where_writing_is_not_allowed(tmp_path):
    if os.geteuid() == 0:   # root may write anywhere a mode forbids, but not into sysfs
        folder = Path("/sys")
    else:
        folder = tmp_path / "ro"
        folder.mkdir(mode=0o500)
    err = failure(["x"] | ns.write_lines(folder / "out.txt"))
    assert isinstance(err.__cause__, PermissionError)
    assert str(folder / "out.txt") in str(err)


def test_41_a_full_disk():
    if not os.path.exists("/dev/full"):
        pytest.fail("this test needs Linux's /dev/full")
    err = failure(["x"] * 10 | ns.write_lines("/dev/full"))
    assert isinstance(err.__cause__, OSError)
    assert "write_lines: cannot write '/dev/full': No space left on device" in str(err)


def test_42_a_missing_input_file(tmp_path):
    missing = tmp_path / "nope.txt"
    err = failure(ns.read_lines(missing) | ns.sink(print))
    assert isinstance(err.__cause__, FileNotFoundError)
    assert str(missing) in str(err)
    err = failure(ns.read_lines(str(tmp_path / "*.log")) | ns.sink(print))
    assert "no file matches the pattern" in str(err)


def test_43_a_gz_file_that_is_not_gzip(tmp_path):
    p = tmp_path / "plain.txt.gz"
    p.write_text("just text\n")
    err = failure(ns.read_lines(p) | ns.sink(print))
    assert f"{p}: not a gzip file" in str(err)
    assert "rename the file if it holds plain text" in str(err)


def test_44_a_gzip_file_cut_short(tmp_path):
    p = tmp_path / "cut.jsonl.gz"
    with gzip.open(p, "wt") as f:
        for i in range(20000):
            f.write(json.dumps({"i": i}) + "\n")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    seen = []
    err = failure(ns.read_jsonl(p) | ns.sink(seen.append))
    assert f"{p}: the gzip data is cut short or corrupt" in str(err)
    assert "Re-create or re-copy the file" in str(err)
    assert seen == [{"i": i} for i in range(len(seen))]   # every line before the damage
    assert seen


def test_45_a_malformed_json_line(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text('{"a": 1}\n{"a": 2,\n{"a": 3}\n')
    err = failure(ns.read_jsonl(p) | ns.sink(print))
    assert f"{p}, line 2" in str(err)
    assert err.item == '{"a": 2,'
    assert list(ns.read_jsonl(p, on_error="skip")) == [{"a": 1}, {"a": 3}]


def test_46_a_csv_row_with_too_many_fields(tmp_path):
    p = tmp_path / "in.csv"
    p.write_text("id,name\n1,a\n2,b,extra\n3,c\n")
    err = failure(ns.read_csv(p) | ns.sink(print))
    assert f"{p}, line 3" in str(err)
    assert "the row has 3 fields, the header has 2" in str(err)
    assert [r["id"] for r in ns.read_csv(p, on_error="skip")] == ["1", "3"]


def test_47_text_in_another_encoding(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("café\n".encode("latin-1"))
    err = failure(ns.read_lines(p) | ns.sink(print))
    assert "cannot decode the text as utf-8" in str(err)
    assert "pass the right encoding=, or errors='replace'" in str(err)


@pytest.mark.parametrize("name", ["out.jsonl", "out.jsonl.gz"])
def test_48_an_item_that_cannot_be_written_as_json(tmp_path, name):
    p = tmp_path / name
    items = [{"i": i, "text": "x" * 50} for i in range(3000)]
    bad = {"when": object()}
    err = failure([*items, bad, {"i": -1}] | ns.write_jsonl(p))
    assert err.item is bad
    assert "not JSON serializable" in str(err)
    # the file holds whole records, every item before the bad one, and is a valid
    # (closed) gzip file when compressed: nothing is cut mid-record
    raw = gzip.decompress(p.read_bytes()) if name.endswith(".gz") else p.read_bytes()
    assert raw.endswith(b"\n")
    assert [json.loads(line) for line in raw.splitlines()] == items


def test_49_a_csv_row_with_other_keys(tmp_path):
    p = tmp_path / "out.csv"
    odd = {"id": 2, "nam": "typo"}
    err = failure([{"id": 1, "name": "a"}, odd, {"id": 3, "name": "c"}] | ns.write_csv(p))
    assert err.item is odd
    assert "['id', 'nam'] differ from the CSV header ['id', 'name']" in str(err)
    assert p.read_text() == "id,name\n1,a\n"      # whole rows only


def test_50_a_sqlite_table_file_that_is_not_a_database(tmp_path):
    p = tmp_path / "notes.db"
    p.write_text("these are notes, not a database\n" * 100)
    err = failure(_rows(1) | ns.sql_sink(p, "t"))
    assert f"{str(p)!r} is not a sqlite database (file is not a database); give the path " \
           "of a sqlite file, or a path that does not exist yet with create=True" in str(err)
    err = failure(ns.sql_source(p, "SELECT 1"))
    assert f"{str(p)!r} is not a sqlite database" in str(err)
    assert p.read_text() == "these are notes, not a database\n" * 100   # left as it was
