"""Shared fixtures: every test must leave no run and no nanostream thread behind."""

from __future__ import annotations

import socket
import threading
import time

import pytest

import nanostream as ns
import tests.kafka_support  # noqa: F401

pytest_plugins = ["tests.kafka_fixtures"]  # kafka_broker, kafka_topic, make_topic, kafka_tls_broker


class KafkaPythonSocket(socket.socket):
    """The sockets kafka-python opens, told apart by their class name in warnings.

    kafka-python 3.0.x drops a connection attempt still in flight when a client is
    closed (its event loop stops with the connect coroutine pending): the socket is only
    closed when the garbage collector finds it, with a ``ResourceWarning`` that
    ``filterwarnings = error`` would pin on whichever test runs at that moment (seen
    about once in 15 closes of a group member during a rebalance). nanostream closes its
    clients on every path; this leak is inside the client, so pyproject.toml ignores
    ``unclosed <tests.conftest.KafkaPythonSocket`` and nothing else: a socket any other
    code leaves open still fails the test.
    """

    __slots__ = ()


def _mark_kafka_python_sockets() -> None:
    # (tests.kafka_support, imported above, has imported kafka-python without its
    # import-time DeprecationWarnings)
    from kafka.net.inet import KafkaNetSocket

    def make_socket(self: object, family: int = socket.AF_UNSPEC,
                    sock_type: int = socket.SOCK_STREAM,
                    proto: int = socket.IPPROTO_TCP) -> socket.socket:
        return KafkaPythonSocket(family, sock_type, proto)

    assert callable(KafkaNetSocket.socket), "kafka-python changed: update this shim"
    KafkaNetSocket.socket = make_socket  # type: ignore[method-assign]


_mark_kafka_python_sockets()


def _nanostream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate()
            if t.name.startswith("nanostream:") and t.is_alive()]


@pytest.fixture(autouse=True)
def no_leftovers(request):
    """Fail a test that leaves a live run or a nanostream thread behind."""
    before = set(_nanostream_threads())
    yield
    if request.node.get_closest_marker("leaves_threads"):
        return
    deadline = time.monotonic() + 10
    for t in _nanostream_threads():
        if t not in before:
            t.join(max(0.0, deadline - time.monotonic()))
    left = [t.name for t in _nanostream_threads() if t not in before]
    live = ns.running()
    if live:
        ns.stop_all(drain=False)
    assert not live, f"runs left running: {live}"
    assert not left, f"threads left behind: {left}"
