"""``SourceContext.on_run_end``: a callback that runs once the whole run has ended
(every stage thread finished), after success, stop or failure, before ``join()``
returns. Kafka's final offset commit and consumer close rely on it."""

from __future__ import annotations

import logging
import threading

import pytest

import nanostream as ns
from nanostream import sink, transform
from nanostream._stage import SOURCE, Stage


def context_source(items, ended, *, wait=None, track=False):
    """An internal source that registers ``ended.append(...)`` as its run-end hook."""

    def gen(ctx=None):
        ctx.on_run_end(lambda: ended.append(("end", threading.current_thread().name)))
        for x in items:
            if wait is not None:
                while not wait.wait(0.01):
                    if ctx.stopping:
                        return
            if ctx.stopping:
                return
            yield (x, None) if track else x

    return Stage(gen, SOURCE, {"name": "ctx-source", "track": track},
                 internal={"context": True})


@pytest.mark.parametrize("track", [False, True])
def test_runs_once_after_every_stage_finished(track):
    ended: list = []
    seen: list = []

    @sink
    def slow_sink(x):
        seen.append(x)
        ended.append(("item", x))

    (context_source(range(20), ended, track=track) | transform(lambda x: x + 1)
     | ns.batch(7) | ns.flat_map(lambda b: b) | slow_sink).run(timeout=30)
    assert [e for e in ended if e[0] == "end"] == [ended[-1]]  # once, after every item
    assert sorted(seen) == list(range(1, 21))
    assert ended[-1][1].startswith("nanostream:")  # in a stage thread, not the caller's


def test_runs_before_join_returns_after_a_stop():
    ended: list = []
    gate = threading.Event()
    run = (context_source(range(10**6), ended, wait=gate) | sink(lambda x: None)).start()
    gate.set()
    run.stop()
    assert run.join(timeout=10)
    assert [e[0] for e in ended] == ["end"]


def test_runs_after_a_failure_too():
    ended: list = []

    def boom(x):
        if x == 5:
            raise ValueError("boom")

    run = (context_source(range(100), ended) | sink(boom)).start()
    with pytest.raises(ns.StageError, match="boom"):
        run.join(timeout=10)
    assert [e[0] for e in ended] == ["end"]


def test_runs_after_stop_without_drain():
    ended: list = []
    gate = threading.Event()
    run = (context_source(range(10), ended, wait=gate) | sink(lambda x: None)).start()
    run.stop(drain=False)
    assert not run.running
    assert [e[0] for e in ended] == ["end"]


def test_a_failing_callback_is_logged_not_raised(caplog):
    def gen(ctx=None):
        ctx.on_run_end(lambda: 1 / 0)
        yield from range(3)

    src = Stage(gen, SOURCE, {"name": "bad-hook"}, internal={"context": True})
    with caplog.at_level(logging.ERROR, logger="nanostream"):
        assert list(src) == [0, 1, 2]
    assert "run-end callback" in caplog.text
    assert "ZeroDivisionError" in caplog.text
