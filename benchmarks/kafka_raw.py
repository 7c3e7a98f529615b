"""Hand-written Kafka baselines for benchmark W6 (Kafka -> transform -> Kafka).

W6 moves 200k JSON messages of about 60 bytes from a 3-partition topic through a
trivial transform into another topic, at least once. The baseline per client is the
plain loop a careful user would write with that client alone:

    poll a batch -> transform each value -> produce -> flush -> commit

``raw_loop_kafka_python`` and ``raw_loop_confluent`` run it and return the seconds from
the first record received to the last commit: the consumer-group join before it
(1-3 s on Tansu, see /work/notes/kafka.md) is not part of the throughput, so a
nanostream run must be timed the same way. ``raw_consume_*`` measure consume-only
throughput; ``fill_topic`` loads the input topic with the fastest producer installed.

Importing this module does no work. Run ``python -m benchmarks.kafka_raw`` from the
repository root for a table of medians (it starts a Tansu broker unless
``NANOSTREAM_KAFKA_BOOTSTRAP`` is set, or pass ``--bootstrap host:port``).
"""

from __future__ import annotations

import json
import time
import uuid
import warnings
from typing import Any

__all__ = [
    "CONFLUENT_CONSUMER",
    "CONFLUENT_PRODUCER",
    "KAFKA_PYTHON_CONSUMER",
    "KAFKA_PYTHON_PRODUCER",
    "N_MESSAGES",
    "count_messages",
    "fill_topic",
    "make_value",
    "raw_consume_confluent",
    "raw_consume_kafka_python",
    "raw_loop_confluent",
    "raw_loop_kafka_python",
    "transform",
]

N_MESSAGES = 200_000
PARTITIONS = 3

# Client settings used by every loop here. The nanostream side of W6 must pass the same
# dicts so the ratio compares the runtimes, not client tuning. Measured effects on
# Tansu are in /work/notes/kafka.md: fetch_max_wait_ms is the one that matters for
# kafka-python (Tansu answers a fetch late; 0 makes it never answer); the kafka-python
# producer is CPU-bound whatever its settings; check_crcs=False would speed up
# kafka-python consume-only by about 1.5x but is left on, as a careful user would.
KAFKA_PYTHON_CONSUMER: dict[str, Any] = {
    "max_poll_records": 5000,
    "fetch_max_wait_ms": 100,
    "max_partition_fetch_bytes": 4 * 1024 * 1024,
}
KAFKA_PYTHON_PRODUCER: dict[str, Any] = {
    "linger_ms": 5,
    "batch_size": 128 * 1024,
}
CONFLUENT_CONSUMER: dict[str, Any] = {
    "fetch.wait.max.ms": 100,
}
CONFLUENT_PRODUCER: dict[str, Any] = {
    "linger.ms": 5,
    "queue.buffering.max.messages": 1_000_000,
}
CONFLUENT_BATCH = 10_000  # Consumer.consume(num_messages=...)
_GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, "max_poll_interval_ms": 10000}
_CONFLUENT_GROUP = {
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 1000,
    "max.poll.interval.ms": 10000,
}
_TIMEOUT = 120.0  # seconds without progress before a loop gives up


def _kafka() -> Any:
    with warnings.catch_warnings():
        # kafka-python 3.0 warns DeprecationWarning (importlib.resources) at import time.
        warnings.simplefilter("ignore", DeprecationWarning)
        import kafka
    return kafka


def make_value(i: int) -> bytes:
    """The W6 input value number ``i``: a JSON object of about 60 bytes.

    >>> make_value(42)
    b'{"id":42,"user":"user-0042","amount":42.42,"kind":"click"}'
    >>> len(make_value(123456))
    63
    """
    return b'{"id":%d,"user":"user-%04d","amount":%d.%02d,"kind":"click"}' % (
        i,
        i % 10_000,
        i % 1000,
        i % 100,
    )


def transform(value: bytes) -> bytes:
    """The W6 transform: parse the JSON value, add a field, serialize it again.

    >>> transform(b'{"id": 1}')
    b'{"id": 1, "processed": true}'
    """
    record = json.loads(value)
    record["processed"] = True
    return json.dumps(record).encode()


def _create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    kafka = _kafka()
    admin = kafka.KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        if topic not in admin.list_topics():
            admin.create_topics(
                {topic: {"num_partitions": partitions, "replication_factor": 1}},
                wait_for_metadata=True,
            )
    finally:
        admin.close()


def fill_topic(
    bootstrap: str, topic: str, n: int = N_MESSAGES, partitions: int = PARTITIONS
) -> float:
    """Create ``topic`` (if missing) and produce ``make_value(0..n-1)`` round-robin over
    its partitions, keys ``b"k<i % 1000>"``. Uses confluent-kafka when installed
    (5-8x faster than kafka-python's producer). Returns the seconds taken to produce.
    """
    _create_topic(bootstrap, topic, partitions)
    start = time.perf_counter()
    try:
        import confluent_kafka
    except ImportError:
        kafka = _kafka()
        producer = kafka.KafkaProducer(bootstrap_servers=bootstrap, **KAFKA_PYTHON_PRODUCER)
        try:
            for i in range(n):
                producer.send(
                    topic, make_value(i), key=b"k%d" % (i % 1000), partition=i % partitions
                )
            producer.flush()
        finally:
            producer.close()
        return time.perf_counter() - start
    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap, **CONFLUENT_PRODUCER})
    errors: list[Any] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(err)

    for i in range(n):
        while True:
            try:
                producer.produce(
                    topic,
                    make_value(i),
                    b"k%d" % (i % 1000),
                    partition=i % partitions,
                    on_delivery=on_delivery,
                )
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10_000 == 0:
            producer.poll(0)
    remaining = producer.flush(60)
    if remaining or errors:
        raise RuntimeError(f"fill_topic: {remaining} undelivered, errors: {errors[:3]}")
    return time.perf_counter() - start


def count_messages(bootstrap: str, topic: str, idle: float = 3.0) -> int:
    """Read ``topic`` from the beginning and count its records (stops after ``idle``
    seconds without new ones). Tansu's end offsets are not a count: they report the
    base offset of the last produced batch + 1 (see /work/notes/kafka.md)."""
    kafka = _kafka()
    consumer = kafka.KafkaConsumer(bootstrap_servers=bootstrap, **KAFKA_PYTHON_CONSUMER)
    try:
        partitions = [
            kafka.TopicPartition(topic, p)
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        count = 0
        deadline = time.monotonic() + idle
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=200)
            if batch:
                count += sum(len(records) for records in batch.values())
                deadline = time.monotonic() + idle
        return count
    finally:
        consumer.close()


def _check_progress(last_progress: float, done: int, n: int) -> None:
    if time.perf_counter() - last_progress > _TIMEOUT:
        raise TimeoutError(f"no progress for {_TIMEOUT:.0f} s after {done} of {n} messages")


def raw_loop_kafka_python(
    bootstrap: str,
    in_topic: str,
    out_topic: str,
    n: int = N_MESSAGES,
    *,
    include_join: bool = False,
) -> float:
    """At-least-once Kafka -> transform -> Kafka loop with kafka-python; returns seconds
    from the first record (from creating the clients if ``include_join``) to the commit
    after the ``n``-th record."""
    kafka = _kafka()
    created = time.perf_counter()
    consumer = kafka.KafkaConsumer(
        in_topic,
        bootstrap_servers=bootstrap,
        group_id=f"raw-kp-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **_GROUP,
        **KAFKA_PYTHON_CONSUMER,
    )
    producer = kafka.KafkaProducer(bootstrap_servers=bootstrap, **KAFKA_PYTHON_PRODUCER)
    send = producer.send
    done = 0
    start = created if include_join else None
    last_progress = time.perf_counter()
    try:
        while done < n:
            batch = consumer.poll(timeout_ms=500)
            if not batch:
                _check_progress(last_progress, done, n)
                continue
            if start is None:
                start = time.perf_counter()
            for records in batch.values():
                for record in records:
                    send(out_topic, transform(record.value), key=record.key)
                done += len(records)
            producer.flush()
            consumer.commit()  # the positions just past every record handed out above
            last_progress = time.perf_counter()
        assert start is not None
        return time.perf_counter() - start
    finally:
        producer.close()
        consumer.close()


def raw_loop_confluent(
    bootstrap: str,
    in_topic: str,
    out_topic: str,
    n: int = N_MESSAGES,
    *,
    include_join: bool = False,
) -> float:
    """The same loop with confluent-kafka; returns seconds from the first record (from
    creating the clients if ``include_join``) to the commit after the ``n``-th record."""
    import confluent_kafka

    created = time.perf_counter()
    consumer = confluent_kafka.Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"raw-ck-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            **_CONFLUENT_GROUP,
            **CONFLUENT_CONSUMER,
        }
    )
    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap, **CONFLUENT_PRODUCER})
    produce = producer.produce
    consumer.subscribe([in_topic])
    done = 0
    start = created if include_join else None
    last_progress = time.perf_counter()
    try:
        while done < n:
            messages = consumer.consume(num_messages=CONFLUENT_BATCH, timeout=0.5)
            if not messages:
                _check_progress(last_progress, done, n)
                continue
            if start is None:
                start = time.perf_counter()
            for message in messages:
                if message.error() is not None:
                    raise confluent_kafka.KafkaException(message.error())
                value = transform(message.value())  # type: ignore[arg-type]  # never null here
                while True:
                    try:
                        produce(out_topic, value, message.key())
                        break
                    except BufferError:  # local queue full: let deliveries drain
                        producer.poll(0.1)
            done += len(messages)
            if producer.flush(60):
                raise RuntimeError("raw_loop_confluent: producer flush timed out")
            consumer.commit(asynchronous=False)
            last_progress = time.perf_counter()
        assert start is not None
        return time.perf_counter() - start
    finally:
        consumer.close()


def raw_consume_kafka_python(bootstrap: str, topic: str, n: int = N_MESSAGES) -> float:
    """Consume-only: seconds to read ``n`` records (partitions assigned, no group)."""
    kafka = _kafka()
    consumer = kafka.KafkaConsumer(bootstrap_servers=bootstrap, **KAFKA_PYTHON_CONSUMER)
    try:
        partitions = [
            kafka.TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))
        ]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        done = 0
        start = time.perf_counter()
        last_progress = start
        while done < n:
            batch = consumer.poll(timeout_ms=500)
            if not batch:
                _check_progress(last_progress, done, n)
                continue
            done += sum(len(records) for records in batch.values())
            last_progress = time.perf_counter()
        return time.perf_counter() - start
    finally:
        consumer.close()


def raw_consume_confluent(bootstrap: str, topic: str, n: int = N_MESSAGES) -> float:
    """Consume-only with confluent-kafka: seconds to read ``n`` records (no group join)."""
    import confluent_kafka

    consumer = confluent_kafka.Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"raw-ck-consume-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            **CONFLUENT_CONSUMER,
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        consumer.assign(
            [
                confluent_kafka.TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING)
                for p in sorted(metadata.topics[topic].partitions)
            ]
        )
        done = 0
        start = time.perf_counter()
        last_progress = start
        while done < n:
            messages = consumer.consume(num_messages=CONFLUENT_BATCH, timeout=0.5)
            if not messages:
                _check_progress(last_progress, done, n)
                continue
            for message in messages:
                if message.error() is not None:
                    raise confluent_kafka.KafkaException(message.error())
                message.value()
            done += len(messages)
            last_progress = time.perf_counter()
        return time.perf_counter() - start
    finally:
        consumer.close()


def main(argv: list[str] | None = None) -> None:
    """Print medians of ``--repeat`` runs of every baseline as msg/s."""
    import argparse
    import os
    import statistics

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", default=os.environ.get("NANOSTREAM_KAFKA_BOOTSTRAP"))
    parser.add_argument("-n", type=int, default=N_MESSAGES)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    broker = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        from tests.kafka_support import start_broker

        broker = start_broker()
        bootstrap = broker.bootstrap
    try:
        in_topic = f"w6-in-{uuid.uuid4().hex[:8]}"
        fill_seconds = fill_topic(bootstrap, in_topic, args.n)
        print(f"fill_topic: {args.n / fill_seconds:,.0f} msg/s")
        runs: dict[str, list[float]] = {}
        for _ in range(args.repeat):
            for name, run in [
                (
                    "consume kafka-python",
                    lambda: raw_consume_kafka_python(bootstrap, in_topic, args.n),
                ),
                ("consume confluent", lambda: raw_consume_confluent(bootstrap, in_topic, args.n)),
                (
                    "loop kafka-python",
                    lambda: _loop(raw_loop_kafka_python, bootstrap, in_topic, args.n),
                ),
                ("loop confluent", lambda: _loop(raw_loop_confluent, bootstrap, in_topic, args.n)),
            ]:
                runs.setdefault(name, []).append(args.n / run())
        for name, rates in runs.items():
            shown = ", ".join(f"{r:,.0f}" for r in rates)
            print(f"{name:22} median {statistics.median(rates):>9,.0f} msg/s   ({shown})")
    finally:
        if broker is not None:
            broker.stop()


def _loop(loop: Any, bootstrap: str, in_topic: str, n: int) -> float:
    out_topic = f"w6-out-{uuid.uuid4().hex[:8]}"
    _create_topic(bootstrap, out_topic, PARTITIONS)
    seconds = loop(bootstrap, in_topic, out_topic, n)
    produced = count_messages(bootstrap, out_topic)
    if produced != n:
        raise AssertionError(f"{loop.__name__} produced {produced} of {n} messages")
    return float(seconds)


if __name__ == "__main__":
    main()
