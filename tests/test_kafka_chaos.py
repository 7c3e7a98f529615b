"""The short CI version of the Kafka chaos run (tests/kafka_chaos.py, same code path).

Per client: two pipeline processes in one consumer group while a producer writes
3000 messages/s; five events in random order and at random moments: SIGKILL of a
member (restarted at once), a stage raising mid-stream in a member (its run fails,
it starts again), a third member joining and leaving. Then every produced message
must have been handled at least once, and no event may have caused more duplicates
than the in-flight bound. The long runs (``python -m tests.kafka_chaos all --events
100``) and their figures are in docs/reliability.md.
"""

from __future__ import annotations

import pytest

from tests.kafka_chaos import CLIENTS, Settings, in_flight_bound, pipeline_capacity, run_chaos

pytestmark = pytest.mark.kafka


@pytest.mark.parametrize("client", CLIENTS)
def test_kills_failures_and_rebalances_lose_nothing(kafka_broker, client):
    settings = Settings(mode="mixed", client=client, events=5, workers=2, rate=3000, gap=0.5)
    result = run_chaos(kafka_broker.bootstrap, settings)
    assert result.kinds == {"kill": 2, "fail": 2, "rebalance": 1}
    assert result.failures_seen == 2, "each injected failure failed one run"
    assert result.thread_growth == 0, "a failed run left threads behind"
    assert result.produced >= 3000 * 5, "the producer wrote all along"
    assert result.lost == 0, f"lost messages, e.g. {result.missing_sample}"
    assert result.handled == result.produced + result.duplicates
    assert len(result.per_event) == 1 + 5
    assert result.worst_event <= result.bound, result.per_event
    assert result.duplicates <= (1 + 5) * result.bound


def test_the_bound_follows_the_pipeline_sizes():
    from nanostream import _runtime, kafka

    small = Settings(queue_size=1, max_in_flight=1)
    big = Settings(queue_size=50_000, max_in_flight=80_000)
    chunk, batch, window = kafka.CHUNK, _runtime.BATCH, kafka.ACK_EVERY
    # the queues hold a whole chunk / batch when small, their size when big; the sink
    # waits for acknowledgements every max_in_flight messages, at most every ACK_EVERY
    assert pipeline_capacity(small) == chunk + chunk + batch + batch + batch + 1
    assert pipeline_capacity(big) == chunk + 50_000 + batch + 50_000 + batch + window
    # (a) the measured window plus (b) for the member that went and each one revoked
    assert in_flight_bound(small, 700, members=3) == 700 + 5 * pipeline_capacity(small)
