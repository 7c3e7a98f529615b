"""W6 - Kafka -> transform -> Kafka, at least once: 200k JSON messages of ~60 bytes on 3
partitions, one workload per client (W6: kafka-python, W6C: confluent-kafka).

    kafka_source(in_topic, group_id=..., with_metadata=True, value_deserializer="bytes")
    | ns.transform(lambda r: (r.key, transform(r.value)))
    | kafka_sink(out_topic, key=itemgetter(0), value_serializer=itemgetter(1))

``transform`` is ``benchmarks.kafka_raw.transform`` (json.loads, add a field,
json.dumps); each message keeps its key. Offsets are committed after the broker
acknowledged the output, so the job is at least once like the baseline.

Baseline ("limit"): ``benchmarks.kafka_raw``'s hand-written loop with the same client
(poll a batch, transform, produce, flush, commit), in the same run. Both contenders use
``kafka_raw``'s client settings and are timed from the first record received to the
end (the loop: its last commit; nanostream: the end of ``run()``, after the final
commit and closing the clients). The loop joins a consumer group (its join is not
timed); nanostream assigns the 3 partitions by hand with a group_id for the offsets,
and reads them to their end (``stop_at_end=True``). Every run checks that the output
topic holds exactly n messages. Reference: consuming alone with the same client.

Targets: nanostream >= 0.9x the loop for each client, and >= 100k msg/s with
confluent-kafka. The suite starts a Tansu broker (tests/kafka_support.py) unless
NANOSTREAM_KAFKA_BOOTSTRAP names one.
"""

from __future__ import annotations

import time
import uuid
from operator import itemgetter
from typing import Any

from benchmarks._harness import (
    LIMIT,
    REFERENCE,
    SUBJECT,
    Contender,
    Target,
    Workload,
    register,
)

PARTITIONS = 3
_STATE: dict[str, Any] = {}


def _bootstrap() -> str:
    return str(_STATE["bootstrap"])


def setup(p: dict[str, Any]) -> str | None:
    """Start (or reuse) the broker and fill the input topic once for the session."""
    from benchmarks import kafka_raw

    if "bootstrap" not in _STATE:
        from tests.kafka_support import start_broker

        broker = start_broker()   # or NANOSTREAM_KAFKA_BOOTSTRAP; stopped at exit
        _STATE["broker"] = broker
        _STATE["bootstrap"] = broker.bootstrap
    key = ("topic", p["n"])
    if key not in _STATE:
        topic = f"w6-in-{uuid.uuid4().hex[:8]}"
        seconds = kafka_raw.fill_topic(_bootstrap(), topic, p["n"], PARTITIONS)
        _STATE[key] = topic
        return f"input: {p['n']:,} messages produced in {seconds:.1f} s"
    return None


def _topics(p: dict[str, Any]) -> tuple[str, str]:
    from benchmarks import kafka_raw

    out = f"w6-out-{uuid.uuid4().hex[:8]}"
    kafka_raw._create_topic(_bootstrap(), out, PARTITIONS)
    return _STATE[("topic", p["n"])], out


def _count(topic: str) -> int:
    """Messages in ``topic``: read every partition up to its high-water mark (from fetch
    responses: Tansu's ListOffsets end offsets are not reliable)."""
    try:
        import confluent_kafka
    except ImportError:
        from benchmarks import kafka_raw

        return kafka_raw.count_messages(_bootstrap(), topic)
    consumer = confluent_kafka.Consumer({
        "bootstrap.servers": _bootstrap(), "group.id": f"w6-count-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False, "enable.partition.eof": True})
    try:
        consumer.assign([confluent_kafka.TopicPartition(topic, p,
                                                        confluent_kafka.OFFSET_BEGINNING)
                         for p in range(PARTITIONS)])
        count, at_end = 0, set()
        deadline = time.monotonic() + 60
        while len(at_end) < PARTITIONS:
            assert time.monotonic() < deadline, f"counting {topic} took over 60 s"
            for m in consumer.consume(10_000, timeout=0.2):
                if m.error() is None:
                    count += 1
                    at_end.discard(m.partition())
                elif m.error().code() == confluent_kafka.KafkaError._PARTITION_EOF:
                    at_end.add(m.partition())
        return count
    finally:
        consumer.close()


def _check(p: dict[str, Any], out: str, seconds: float) -> float:
    got = _count(out)
    assert got == p["n"], f"the output topic holds {got} messages, expected {p['n']}"
    return p["n"] / seconds


# ---------------------------------------------------------------- contenders


def _nanostream(p: dict[str, Any], client: str) -> float:
    import nanostream as ns
    from benchmarks import kafka_raw
    from nanostream.kafka import kafka_sink, kafka_source

    in_topic, out = _topics(p)
    if client == "kafka-python":
        consumer, producer = kafka_raw.KAFKA_PYTHON_CONSUMER, kafka_raw.KAFKA_PYTHON_PRODUCER
    else:
        consumer, producer = kafka_raw.CONFLUENT_CONSUMER, kafka_raw.CONFLUENT_PRODUCER
    transform = kafka_raw.transform
    first: list[float] = []

    def work(record: Any) -> tuple[bytes, bytes]:
        if not first:
            first.append(time.perf_counter())
        return record.key, transform(record.value)

    group = f"w6-ns-{uuid.uuid4().hex[:8]}"
    report = (
        kafka_source(in_topic, bootstrap_servers=_bootstrap(), group_id=group,
                     partitions=list(range(PARTITIONS)), client=client,
                     auto_offset_reset="earliest", stop_at_end=True, with_metadata=True,
                     value_deserializer="bytes", **consumer)
        | ns.transform(work)
        | kafka_sink(out, bootstrap_servers=_bootstrap(), client=client, key=itemgetter(0),
                     key_serializer="bytes", value_serializer=itemgetter(1), **producer)
    ).run(timeout=600)
    seconds = time.perf_counter() - first[0]
    assert report["kafka_sink"].items_in == p["n"], report
    return _check(p, out, seconds)


def _loop(p: dict[str, Any], client: str) -> float:
    from benchmarks import kafka_raw

    in_topic, out = _topics(p)
    loop = kafka_raw.raw_loop_kafka_python if client == "kafka-python" else \
        kafka_raw.raw_loop_confluent
    return _check(p, out, loop(_bootstrap(), in_topic, out, p["n"]))


def _consume(p: dict[str, Any], client: str) -> float:
    from benchmarks import kafka_raw

    consume = kafka_raw.raw_consume_kafka_python if client == "kafka-python" else \
        kafka_raw.raw_consume_confluent
    return p["n"] / consume(_bootstrap(), _STATE[("topic", p["n"])], p["n"])


def params(quick: bool) -> dict[str, Any]:
    return {"n": 20_000 if quick else 200_000}


def _workload(wid: str, client: str, module: str, target: Target) -> Workload:
    return Workload(
        id=wid,
        title="Kafka -> transform -> Kafka, {n:,} msgs, 3 partitions, " + client,
        unit="items/s",
        params=params,
        setup=setup,
        contenders=[
            Contender(f"nanostream kafka_source | transform | kafka_sink ({client})",
                      lambda p: _nanostream(p, client), SUBJECT,
                      requires=("nanostream.kafka", module)),
            Contender(f"loop: poll, transform, produce, flush, commit ({client})",
                      lambda p: _loop(p, client), LIMIT, requires=(module,)),
            Contender(f"ref: consume only ({client})", lambda p: _consume(p, client),
                      REFERENCE, requires=(module,)),
        ],
        target=target,
        ratio=lambda value, base: value / base,
    )


register(_workload("W6", "kafka-python", "kafka",
                   Target(">= 0.90x loop", lambda value, ratio: ratio is not None
                          and ratio >= 0.90)))
register(_workload("W6C", "confluent", "confluent_kafka",
                   Target(">= 0.90x loop and >= 100k msg/s", lambda value, ratio:
                          ratio is not None and ratio >= 0.90 and value >= 100_000)))
