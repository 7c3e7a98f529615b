"""``SourceContext.on_run_end``: a callback that runs once the whole run has ended
(every stage thread finished), after success, stop or failure, before ``join()``
returns. Kafka's final offset commit and consumer close rely on it."""

from __future__ import annotations

import logging
import threading
import time

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


def done_source(n, log):
    """A tracked source: each item's on_done logs ("done", x); its run-end hook logs
    ("end",) (what Kafka's final commit does: commit what is done by then)."""

    def gen(ctx=None):
        ctx.on_run_end(lambda: log.append(("end",)))
        for x in range(n):
            yield x, (lambda x=x: log.append(("done", x)))

    return Stage(gen, SOURCE, {"name": "done-source", "track": True},
                 internal={"context": True})


@pytest.mark.parametrize("shape", ["source alone", "through a transform"])
def test_iterating_a_tracked_source_ends_the_run_after_the_loop_took_every_item(shape):
    """The loop counts as a stage of the run: the run-end hook (Kafka's final commit)
    sees every item the loop took as done, even the last ones."""
    log: list = []
    p = done_source(50, log) if shape == "source alone" else (
        done_source(50, log) | transform(lambda x: x))
    assert list(p) == list(range(50))
    assert log[-1] == ("end",)
    assert sorted(log[:-1]) == [("done", x) for x in range(50)]


def test_breaking_out_of_the_loop_ends_the_run_with_what_the_loop_finished():
    log: list = []
    for x in done_source(10**6, log) | transform(lambda x: x):
        if x == 20:
            break
    assert log[-1] == ("end",)
    done = {e[1] for e in log if e[0] == "done"}
    assert set(range(20)) <= done        # every item the loop finished with
    assert 20 not in done                # not the one it broke out on: it is re-delivered


def test_stopping_a_suspended_iteration_does_not_wait_for_the_loop():
    log: list = []
    it = iter(done_source(10**6, log) | transform(lambda x: x))
    assert next(it) == 0
    (run,) = ns.running()
    t0 = time.monotonic()
    ns.stop_all()
    assert run.join(timeout=10)
    assert time.monotonic() - t0 < 4
    assert log[-1] == ("end",)
    it.close()


def test_stopping_from_a_suspended_loop_after_the_sources_ended_does_not_hang():
    """stop(drain=True) from the thread whose loop is suspended: the loop takes nothing
    more, so the drain must not wait for it. It used to hang when the sources had
    already ended and a stage was blocked handing items to the full loop queue (the
    drain's escape only looked at sources still running)."""
    ended = threading.Event()
    log: list = []

    def gen(ctx=None):
        ctx.on_run_end(lambda: log.append(("end",)))
        for x in range(6000):   # more than the loop and its queue hold
            yield x, (lambda x=x: log.append(("done", x)))
        ended.set()

    src = Stage(gen, SOURCE, {"name": "finite", "track": True}, internal={"context": True})
    # the stage's queue takes what the loop's queue cannot, so the source ends while
    # the stage is blocked handing items to the loop
    it = iter(src | transform(lambda x: x, queue_size=10_000))
    assert next(it) == 0
    assert ended.wait(10), "the source did not finish emitting"
    (run,) = ns.running()
    ns.stop_all()   # from the loop's own thread; a hang here fails on the suite's timeout
    assert run.join(timeout=10)
    # the run-end hook ran; no item was acked: the loop never came back for the next
    # one, and what never reached it is not handled
    assert log == [("end",)]
    it.close()
