"""The Kafka test fixtures work: a real broker, both clients, groups, commits, TLS.

These tests exercise tests/kafka_support.py and tests/kafka_fixtures.py, not
nanostream; they are what the connector tests stand on. Set
NANOSTREAM_KAFKA_BOOTSTRAP to run them against another broker (e.g. Apache Kafka).
"""

from __future__ import annotations

import socket
import struct
import time

import pytest

from tests.kafka_support import (
    BOOTSTRAP_ENV,
    FAST_GROUP,
    SSL_BOOTSTRAP_ENV,
    Broker,
    BrokerStartError,
    create_topic,
    start_broker,
    unique_topic,
)

# Imported after tests.kafka_support, which imports kafka-python without its
# import-time DeprecationWarning (see there).
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition  # isort: skip
from kafka.errors import TopicAlreadyExistsError  # isort: skip
from kafka.serializer import JsonSerializer  # isort: skip
from kafka.structs import OffsetAndMetadata  # isort: skip

confluent_kafka = pytest.importorskip("confluent_kafka")

PER_PARTITION = 10
DEADLINE = 60.0  # seconds a test waits for messages / group joins before failing


def expected_records(topic: str) -> set[tuple]:
    """(partition, key, value, headers) of the messages produce_* writes."""
    return {
        (i % 3, b"key-%d" % i, b"value-%d" % i, (("seq", b"%d" % i), ("src", b"test")))
        for i in range(3 * PER_PARTITION)
    }


def produce_kafka_python(broker: Broker, topic: str) -> None:
    producer = KafkaProducer(**broker.kafka_python_config(), linger_ms=5)
    try:
        futures = [
            producer.send(
                topic,
                value=b"value-%d" % i,
                key=b"key-%d" % i,
                partition=i % 3,
                headers=[("seq", b"%d" % i), ("src", b"test")],
            )
            for i in range(3 * PER_PARTITION)
        ]
        producer.flush(timeout=30)
        assert all(f.succeeded() for f in futures), [f.exception for f in futures]
    finally:
        producer.close()


def produce_confluent(broker: Broker, topic: str) -> None:
    producer = confluent_kafka.Producer(broker.confluent_config())
    errors = []
    for i in range(3 * PER_PARTITION):
        producer.produce(
            topic,
            value=b"value-%d" % i,
            key=b"key-%d" % i,
            partition=i % 3,
            headers=[("seq", b"%d" % i), ("src", b"test")],
            on_delivery=lambda err, _msg: errors.append(err) if err else None,
        )
    assert producer.flush(30) == 0
    assert errors == []


def consume_kafka_python(consumer: KafkaConsumer, n: int) -> list:
    records: list = []
    deadline = time.monotonic() + DEADLINE
    while len(records) < n and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
    assert len(records) == n, f"got {len(records)} of {n} messages in {DEADLINE:.0f} s"
    return records


def consume_confluent(consumer, n: int) -> list:
    messages: list = []
    deadline = time.monotonic() + DEADLINE
    while len(messages) < n and time.monotonic() < deadline:
        for message in consumer.consume(num_messages=n - len(messages), timeout=0.2):
            assert message.error() is None, message.error()
            messages.append(message)
    assert len(messages) == n, f"got {len(messages)} of {n} messages in {DEADLINE:.0f} s"
    return messages


def as_tuples_kafka_python(records) -> set[tuple]:
    return {(r.partition, r.key, r.value, tuple(r.headers)) for r in records}


def as_tuples_confluent(messages) -> set[tuple]:
    return {(m.partition(), m.key(), m.value(), tuple(m.headers() or ())) for m in messages}


def assert_offsets_contiguous(offsets_by_partition: dict[int, list[int]]) -> None:
    for partition, offsets in offsets_by_partition.items():
        assert sorted(offsets) == list(range(PER_PARTITION)), partition


# --- the fixtures ----------------------------------------------------------------


@pytest.mark.kafka
def test_fixture_topic_has_three_partitions(kafka_broker, kafka_topic):
    assert kafka_topic.startswith("test_fixture_topic_has_three_partitions-")
    with KafkaAdminClient(**kafka_broker.kafka_python_config()) as admin:
        (topic,) = admin.describe_topics([kafka_topic])
    assert topic["error_code"] == 0
    assert sorted(p["partition_index"] for p in topic["partitions"]) == [0, 1, 2]


@pytest.mark.kafka
def test_create_topic_refuses_an_existing_topic(kafka_broker, kafka_topic):
    with pytest.raises(TopicAlreadyExistsError):
        create_topic(kafka_broker, kafka_topic)
    with pytest.raises(ValueError, match="partitions must be >= 1, got 0"):
        create_topic(kafka_broker.bootstrap, unique_topic(), partitions=0)


def test_unique_topic_names_are_fresh_and_validated():
    assert unique_topic("orders") != unique_topic("orders")
    assert unique_topic("orders").startswith("orders-")
    with pytest.raises(ValueError, match=r"prefix must be .* got 'no spaces'"):
        unique_topic("no spaces")


# --- kafka-python ----------------------------------------------------------------


@pytest.mark.kafka
def test_kafka_python_round_trip_with_keys_and_headers(kafka_broker, kafka_topic):
    produce_kafka_python(kafka_broker, kafka_topic)
    consumer = KafkaConsumer(**kafka_broker.kafka_python_config())
    try:
        partitions = [TopicPartition(kafka_topic, p) for p in range(3)]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        records = consume_kafka_python(consumer, 3 * PER_PARTITION)
    finally:
        consumer.close()
    assert as_tuples_kafka_python(records) == expected_records(kafka_topic)
    offsets: dict[int, list[int]] = {}
    for r in records:
        offsets.setdefault(r.partition, []).append(r.offset)
    assert_offsets_contiguous(offsets)


@pytest.mark.kafka
def test_kafka_python_group_commit_and_committed(kafka_broker, kafka_topic):
    group = unique_topic("group")
    producer = KafkaProducer(
        **kafka_broker.kafka_python_config(), value_serializer=JsonSerializer()
    )
    for i in range(3 * PER_PARTITION):
        producer.send(kafka_topic, {"i": i}, partition=i % 3)
    producer.flush(timeout=30)

    def group_consumer() -> KafkaConsumer:
        consumer = KafkaConsumer(
            **kafka_broker.kafka_python_config(),
            **kafka_broker.group_options("kafka-python"),
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            value_deserializer=JsonSerializer(),
        )
        consumer.subscribe([kafka_topic])
        return consumer

    consumer = group_consumer()
    try:
        records = consume_kafka_python(consumer, 3 * PER_PARTITION)
        assert sorted(r.value["i"] for r in records) == list(range(3 * PER_PARTITION))
        # commit explicit positions, as the connector does: one past the last record
        last: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            last[tp] = max(last.get(tp, -1), r.offset)
        consumer.commit({tp: OffsetAndMetadata(o + 1, "", -1) for tp, o in last.items()})
        for p in range(3):
            assert consumer.committed(TopicPartition(kafka_topic, p)) == PER_PARTITION
    finally:
        consumer.close()

    # a restarted member of the group resumes after the committed positions
    producer.send(kafka_topic, {"i": "after restart"}, partition=1)
    producer.flush(timeout=30)
    producer.close()
    consumer = group_consumer()
    try:
        (record,) = consume_kafka_python(consumer, 1)
        assert (record.partition, record.offset, record.value) == (
            1,
            PER_PARTITION,
            {"i": "after restart"},
        )
        consumer.commit()
        assert consumer.committed(TopicPartition(kafka_topic, 1)) == PER_PARTITION + 1
        assert consumer.committed(TopicPartition(kafka_topic, 0)) == PER_PARTITION
    finally:
        consumer.close()
    with KafkaAdminClient(**kafka_broker.kafka_python_config()) as admin:
        offsets = admin.list_group_offsets({group: None})[group]
    assert {tp.partition: meta.offset for tp, meta in offsets.items()} == {
        0: PER_PARTITION,
        1: PER_PARTITION + 1,
        2: PER_PARTITION,
    }


# --- confluent-kafka ---------------------------------------------------------------


@pytest.mark.kafka
def test_confluent_round_trip_with_keys_and_headers(kafka_broker, kafka_topic):
    produce_confluent(kafka_broker, kafka_topic)
    consumer = confluent_kafka.Consumer(
        {**kafka_broker.confluent_config(), "group.id": unique_topic("unused")}
    )
    try:
        consumer.assign(
            [
                confluent_kafka.TopicPartition(kafka_topic, p, confluent_kafka.OFFSET_BEGINNING)
                for p in range(3)
            ]
        )
        messages = consume_confluent(consumer, 3 * PER_PARTITION)
    finally:
        consumer.close()
    assert as_tuples_confluent(messages) == expected_records(kafka_topic)
    offsets: dict[int, list[int]] = {}
    for m in messages:
        offsets.setdefault(m.partition(), []).append(m.offset())
    assert_offsets_contiguous(offsets)


@pytest.mark.kafka
def test_confluent_group_commit_and_committed(kafka_broker, kafka_topic):
    produce_confluent(kafka_broker, kafka_topic)
    group = unique_topic("group")

    def group_consumer():
        consumer = confluent_kafka.Consumer(
            {
                **kafka_broker.confluent_config(),
                **kafka_broker.group_options("confluent"),
                "group.id": group,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        consumer.subscribe([kafka_topic])
        return consumer

    consumer = group_consumer()
    try:
        messages = consume_confluent(consumer, 3 * PER_PARTITION)
        assert as_tuples_confluent(messages) == expected_records(kafka_topic)
        last: dict[int, int] = {}
        for m in messages:
            last[m.partition()] = max(last.get(m.partition(), -1), m.offset())
        consumer.commit(
            offsets=[
                confluent_kafka.TopicPartition(kafka_topic, p, o + 1) for p, o in last.items()
            ],
            asynchronous=False,
        )
        committed = consumer.committed(
            [confluent_kafka.TopicPartition(kafka_topic, p) for p in range(3)], timeout=10
        )
        assert {tp.partition: tp.offset for tp in committed} == dict.fromkeys(
            range(3), PER_PARTITION
        )
    finally:
        consumer.close()

    producer = confluent_kafka.Producer(kafka_broker.confluent_config())
    producer.produce(kafka_topic, value=b"after restart", partition=2)
    assert producer.flush(30) == 0
    consumer = group_consumer()
    try:
        (message,) = consume_confluent(consumer, 1)
        assert (message.partition(), message.offset(), message.value()) == (
            2,
            PER_PARTITION,
            b"after restart",
        )
        consumer.commit(asynchronous=False)
        committed = consumer.committed([confluent_kafka.TopicPartition(kafka_topic, 2)], timeout=10)
        assert committed[0].offset == PER_PARTITION + 1
    finally:
        consumer.close()


@pytest.mark.kafka
def test_clients_read_each_others_messages(kafka_broker, kafka_topic):
    produce_confluent(kafka_broker, kafka_topic)
    consumer = KafkaConsumer(**kafka_broker.kafka_python_config())
    try:
        partitions = [TopicPartition(kafka_topic, p) for p in range(3)]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        records = consume_kafka_python(consumer, 3 * PER_PARTITION)
    finally:
        consumer.close()
    assert as_tuples_kafka_python(records) == expected_records(kafka_topic)


# --- TLS -----------------------------------------------------------------------------


@pytest.mark.kafka
def test_tls_broker_serves_both_clients(kafka_tls_broker):
    broker = kafka_tls_broker
    assert broker.tls
    assert broker.ca_file
    assert broker.kafka_python_config()["security_protocol"] == "SSL"
    topic = create_topic(broker, unique_topic("tls"))
    produce_kafka_python(broker, topic)
    consumer = confluent_kafka.Consumer(
        {**broker.confluent_config(), "group.id": unique_topic("g")}
    )
    try:
        consumer.assign(
            [
                confluent_kafka.TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING)
                for p in range(3)
            ]
        )
        messages = consume_confluent(consumer, 3 * PER_PARTITION)
    finally:
        consumer.close()
    assert as_tuples_confluent(messages) == expected_records(topic)


def api_versions_reply(bootstrap: str) -> bytes:
    """Send a plaintext Kafka ApiVersions v0 request; return the first bytes of the reply."""
    client_id = b"nanostream"
    header = struct.pack(">hhih", 18, 0, 4242, len(client_id)) + client_id
    host, port = bootstrap.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(struct.pack(">i", len(header)) + header)
        try:
            return sock.recv(8)
        except (ConnectionResetError, TimeoutError):
            return b""


@pytest.mark.kafka
def test_tls_broker_refuses_plaintext_clients(kafka_broker, kafka_tls_broker):
    if kafka_tls_broker.external:
        pytest.skip("only checked for the broker started by the fixtures")
    correlation_id = struct.pack(">i", 4242)
    assert api_versions_reply(kafka_broker.bootstrap)[4:8] == correlation_id  # plaintext: answers
    assert api_versions_reply(kafka_tls_broker.bootstrap)[4:8] != correlation_id


# --- start_broker --------------------------------------------------------------------


@pytest.mark.kafka
def test_start_broker_stop_is_idempotent_and_frees_the_port(monkeypatch):
    monkeypatch.delenv(BOOTSTRAP_ENV, raising=False)
    with start_broker() as broker:
        assert not broker.external
        host, port = broker.bootstrap.rsplit(":", 1)
        assert "ready" in broker.log()
    broker.stop()
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=2).close()


def test_external_broker_from_the_environment_is_used_not_started(monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there
    monkeypatch.setenv(BOOTSTRAP_ENV, f"127.0.0.1:{port}")
    with pytest.raises(
        BrokerStartError, match=rf"127\.0\.0\.1:{port} did not answer .* within 1 s"
    ):
        start_broker(timeout=1)
    monkeypatch.delenv(SSL_BOOTSTRAP_ENV, raising=False)
    with pytest.raises(BrokerStartError, match=f"{SSL_BOOTSTRAP_ENV} and"):
        start_broker(tls=True, timeout=1)


def test_group_options_pick_settings_any_broker_accepts_for_external_brokers():
    external = Broker("kafka.example:9092")
    assert external.group_options() == FAST_GROUP
    assert external.group_options("confluent")["session.timeout.ms"] == 6000
    with pytest.raises(ValueError, match="client must be 'kafka-python' or 'confluent', got 'x'"):
        external.group_options("x")
    external.stop()  # nothing to stop
    assert repr(external) == "Broker('kafka.example:9092', external)"


def test_only_the_sockets_kafka_python_leaks_are_exempt_from_resource_warnings():
    """tests/conftest.py tags kafka-python's sockets so that its known leak (a connect
    in flight when a client closes) does not fail an unrelated test; an unclosed socket
    of anyone else's is still an error."""
    import warnings

    from kafka.net.inet import KafkaNetSocket  # isort: skip

    sock = KafkaNetSocket().socket(socket.AF_INET)
    try:
        tagged = repr(sock)
    finally:
        sock.close()
    assert tagged.startswith("<tests.conftest.KafkaPythonSocket ")
    warnings.warn(f"unclosed {tagged}", ResourceWarning, stacklevel=1)   # ignored
    with socket.socket() as plain, pytest.raises(ResourceWarning):
        warnings.warn(f"unclosed {plain!r}", ResourceWarning, stacklevel=1)


def test_the_tls_proxy_stops_without_waiting_out_its_accept_thread(tmp_path):
    """Its accepting thread wakes when stopped (a closed listener alone does not wake
    accept() on Linux: each session's teardown waited 10 s for it)."""
    from tests.kafka_support import _self_signed_cert, _TlsProxy

    cert, key = _self_signed_cert(tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as upstream:
        proxy = _TlsProxy(cert, key, upstream.getsockname()[:2])
        accepting = [t for t in proxy._threads if t.name == "kafka-tls-proxy"]
        assert len(accepting) == 1
        assert accepting[0].is_alive()
        t0 = time.monotonic()
        proxy.stop()
        assert not accepting[0].is_alive()
        assert time.monotonic() - t0 < 5   # (the join gives up after 10 s)
