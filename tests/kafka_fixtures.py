"""pytest fixtures for tests against a real Kafka-protocol broker.

Import them into a test module or the conftest (``from tests.kafka_fixtures import *``).
The broker is Tansu, started once per test session by
:func:`tests.kafka_support.start_broker`, or the Kafka that ``NANOSTREAM_KAFKA_BOOTSTRAP``
points at. ``kafka_tls_broker`` is a second broker that only speaks TLS.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from tests.kafka_support import (
    BOOTSTRAP_ENV,
    SSL_BOOTSTRAP_ENV,
    Broker,
    create_topic,
    start_broker,
    unique_topic,
)

__all__ = ["kafka_broker", "kafka_tls_broker", "kafka_topic", "make_topic"]


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[Broker]:
    """The session's broker (``.bootstrap`` is its ``"host:port"``)."""
    with start_broker() as broker:
        yield broker


@pytest.fixture(scope="session")
def kafka_tls_broker() -> Iterator[Broker]:
    """A broker that only speaks TLS; clients trust ``.ca_file`` (see
    ``Broker.kafka_python_config()`` and ``Broker.confluent_config()``)."""
    if os.environ.get(BOOTSTRAP_ENV) and not os.environ.get(SSL_BOOTSTRAP_ENV):
        pytest.skip(f"{BOOTSTRAP_ENV} names an external broker and {SSL_BOOTSTRAP_ENV} is unset")
    with start_broker(tls=True) as broker:
        yield broker


def _prefix(request: pytest.FixtureRequest) -> str:
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in request.node.name)
    return name[:150].strip("-") or "test"


@pytest.fixture
def make_topic(kafka_broker: Broker, request: pytest.FixtureRequest) -> Callable[..., str]:
    """Makes fresh topics named after the test: ``make_topic()`` (3 partitions) or
    ``make_topic(1)``."""
    prefix = _prefix(request)

    def make(partitions: int = 3) -> str:
        return create_topic(kafka_broker, unique_topic(prefix), partitions)

    return make


@pytest.fixture
def kafka_topic(make_topic: Callable[..., str]) -> str:
    """A fresh topic with 3 partitions, named ``f"{test name}-{random hex}"``."""
    return make_topic()
