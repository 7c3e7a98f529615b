"""Shared fixtures: every test must leave no run and no nanostream thread behind."""

from __future__ import annotations

import threading
import time

import pytest

import nanostream as ns

pytest_plugins = ["tests.kafka_fixtures"]  # kafka_broker, kafka_topic, make_topic, kafka_tls_broker


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
