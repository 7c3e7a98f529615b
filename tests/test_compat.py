"""The original class API (DESIGN §4 "Seed compatibility") on the current runtime."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import nanostream as ns
from nanostream import (
    NanoStreamGraph,
    NanoStreamListener,
    NanoStreamProcessor,
    NanoStreamSender,
    compat,
)

# The example of the original README, with Python 3's print() and without its
# leftover `import pdb; pdb.set_trace()`; nothing else changed.
README_EXAMPLE = '''
class NanoCounter(NanoStreamSender):

    def __init__(self):
        self.counter = 0
        super(NanoCounter, self).__init__()

    def start(self):
        while 1:
            output = 'NanoCounter:' + str(self.counter)
            self.counter += 1
            self.queue_message(output)


class NanoMultiPrint(NanoStreamListener):
    def process_item(self, message):
        print(message)
        time.sleep(1)

nano_counter = NanoCounter()
nano_multi_print = NanoMultiPrint(workers=3)
pipeline = NanoStreamGraph()
pipeline.add_edge(nano_counter, nano_multi_print)
pipeline.start()
'''


def wait_for(predicate, timeout=10.0):
    """Wait until ``predicate()`` is true (a condition, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached within the timeout")
        tick.wait(0.002)


def producer_blocked(run, stage):
    q = run.stats()[stage].queue
    return q is not None and q.waiting_producers > 0


# -- fixtures of the class API --------------------------------------------------------

class Counter(NanoStreamSender):
    """Counts forever, like the README's sender."""

    def __init__(self, **options):
        self.counter = 0
        self.ended = threading.Event()
        super().__init__(**options)

    def start(self):
        try:
            while True:
                self.counter += 1
                self.queue_message(self.counter - 1)
        finally:
            self.ended.set()


class Numbers(NanoStreamSender):
    def __init__(self, n):
        self.n = n
        super().__init__()

    def start(self):
        for i in range(self.n):
            self.queue_message(i)


class Collect(NanoStreamListener):
    def __init__(self, **options):
        self.seen = []
        self.lock = threading.Lock()
        super().__init__(**options)

    def process_item(self, message):
        with self.lock:
            self.seen.append(message)


class Gated(NanoStreamProcessor):
    """Passes items on once its gate opens; counts the calls that are waiting."""

    def __init__(self, **options):
        self.gate = threading.Event()
        super().__init__(**options)

    def process_item(self, message):
        self.gate.wait()
        return message


# -- the README example ---------------------------------------------------------------

def test_readme_example_runs_unchanged():
    printed = []
    enough = threading.Event()

    def fake_print(*args):
        printed.append(" ".join(map(str, args)))
        if len(printed) >= 4:
            enough.set()

    env = {"print": fake_print, "time": time, "NanoStreamSender": NanoStreamSender,
           "NanoStreamListener": NanoStreamListener, "NanoStreamGraph": NanoStreamGraph}
    t0 = time.monotonic()
    exec(README_EXAMPLE, env)  # noqa: S102 - the seed's example, verbatim
    assert time.monotonic() - t0 < 1.0, "start() must return at once"
    pipeline, counter = env["pipeline"], env["nano_counter"]
    assert pipeline.running
    try:
        assert enough.wait(30)
        # the counter runs forever, yet back-pressure holds it at the queue's size
        wait_for(lambda: producer_blocked(pipeline.run, "NanoMultiPrint"))
        # (queue of 1024 + a few handled or in flight: not the millions of a loose loop)
        assert counter.counter <= 1024 + 64
    finally:
        t0 = time.monotonic()
        pipeline.stop()
        stopped_in = time.monotonic() - t0
    assert stopped_in < 2.0
    assert not pipeline.running
    # three workers ran the slow print side by side, in the order of the counter
    assert set(printed[:3]) == {"NanoCounter:0", "NanoCounter:1", "NanoCounter:2"}


def test_started_graph_keeps_the_process_alive_like_the_original(tmp_path):
    script = tmp_path / "seed.py"
    script.write_text(textwrap.dedent('''
        from nanostream import NanoStreamGraph, NanoStreamListener, NanoStreamSender

        class Count(NanoStreamSender):
            def start(self):
                for i in range(500):
                    self.queue_message(i)

        class Show(NanoStreamListener):
            def process_item(self, message):
                print(message)

        graph = NanoStreamGraph()
        graph.add_edge(Count(), Show())
        graph.start()   # the last line: the script "ends" while the graph runs
    '''))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.split() == [str(i) for i in range(500)]


# -- back-pressure, stop, order --------------------------------------------------------

def test_infinite_sender_is_held_back_by_a_full_queue_and_stop_ends_it():
    counter, gated, sink = Counter(), Gated(workers=3), Collect()
    graph = NanoStreamGraph(queue_size=8)
    graph.add_edge(counter, gated)
    graph.add_edge(gated, sink)
    run = graph.start()
    try:
        wait_for(lambda: producer_blocked(run, "Gated"))
        # queue (8) + chunks in flight in the pool (2 per worker) + the one being put
        bound = 8 + 2 * 3 + 2
        assert counter.counter <= bound
        assert run.stats()["Gated"].queue.queued <= 8
        gated.gate.set()
        wait_for(lambda: len(sink.seen) >= 5000)
    finally:
        gated.gate.set()
        t0 = time.monotonic()
        graph.stop()
        assert time.monotonic() - t0 < 2.0
    assert counter.ended.is_set(), "the sender's loop must end when the graph stops"
    assert not run.running
    assert not graph.running
    # workers=3 keeps input order downstream (ordered=True is the default)
    assert sink.seen == list(range(len(sink.seen)))


def test_stop_with_drain_finishes_what_is_inside():
    counter, sink = Counter(), Collect()
    graph = NanoStreamGraph()
    graph.add_edge(counter, sink)
    run = graph.start()
    wait_for(lambda: len(sink.seen) >= 100)
    graph.stop(drain=True)
    assert counter.ended.is_set()
    # every message the sender queued reached the listener
    assert sink.seen == list(range(counter.counter))
    assert run.stats()["Collect"].items_in == counter.counter


def test_a_message_queued_as_the_stop_lands_still_arrives():
    """The race behind the old flakiness of the test above: the stop request landing
    between the sender deciding to send a message and queue_message() taking it.
    Like an item a source generator yielded, a message handed to queue_message()
    is inside the pipeline: drain=True delivers it, then the sender stops."""
    reached = threading.Event()

    class StopsMidway(NanoStreamSender):
        def __init__(self):
            self.sent = 0
            super().__init__()

        def start(self):
            while True:
                if self.sent == 5:
                    reached.set()
                    wait_for(lambda: graph._run is not None
                             and any(r.stop_requested for r in graph._run.runners))
                self.sent += 1
                self.queue_message(self.sent - 1)

    sender, sink = StopsMidway(), Collect()
    graph = NanoStreamGraph()
    graph.add_edge(sender, sink)
    graph.start()
    assert reached.wait(10)
    graph.stop(drain=True)
    assert sink.seen == [0, 1, 2, 3, 4, 5]
    assert sender.sent == 6


def test_a_sender_that_swallows_the_stop_sends_nothing_more():
    class Swallows(NanoStreamSender):
        def __init__(self):
            self.calls = self.refused = 0
            super().__init__()

        def start(self):
            while self.refused < 3:
                self.calls += 1
                try:
                    self.queue_message(self.calls - 1)
                except BaseException:  # what a careless sender does
                    self.refused += 1

    sender, sink = Swallows(), Collect()
    graph = NanoStreamGraph()
    graph.add_edge(sender, sink)
    graph.start()
    wait_for(lambda: len(sink.seen) >= 10)
    graph.stop(drain=True)
    assert sender.refused == 3
    # the message handed over as the stop landed arrived; the two calls after it sent
    # nothing
    assert sink.seen == list(range(sender.calls - 2))


def test_a_sender_catching_exception_still_stops():
    class Stubborn(NanoStreamSender):
        def start(self):
            i = 0
            while True:
                try:
                    self.queue_message(i)
                except Exception:  # the stop signal is not an Exception
                    continue
                i += 1

    sink = Collect()
    graph = NanoStreamGraph()
    graph.add_edge(Stubborn(), sink)
    graph.start()
    wait_for(lambda: len(sink.seen) >= 10)
    graph.stop()
    assert not graph.running


def test_finite_senders_end_the_graph_with_ordered_results():
    double = type("Double", (NanoStreamProcessor,),
                  {"process_item": lambda self, m: 2 * m})(workers=4)
    sink = Collect()
    graph = NanoStreamGraph()
    graph.add_edge(Numbers(1000), double)
    graph.add_edge(double, sink)
    graph.start()
    assert graph.join(timeout=30)
    assert sink.seen == [2 * i for i in range(1000)]
    stats = graph.run.stats()
    assert stats["Numbers"].items_out == stats["Double"].items_in == 1000


def test_none_is_dropped_and_queue_message_inside_process_item_sends_more():
    class Echo(NanoStreamProcessor):
        def process_item(self, message):
            if message % 2:
                return None          # dropped
            self.queue_message(("extra", message))
            return message

    echo, sink = Echo(workers=2), Collect()
    graph = NanoStreamGraph()
    graph.add_edge(Numbers(6), echo)
    graph.add_edge(echo, sink)
    graph.start()
    assert graph.join(timeout=30)
    assert sink.seen == [("extra", 0), 0, ("extra", 2), 2, ("extra", 4), 4]


def test_a_listener_with_successors_passes_on_what_it_returns():
    class Upper(NanoStreamListener):
        def process_item(self, message):
            return str(message).upper()

    upper, sink = Upper(), Collect()
    graph = NanoStreamGraph()
    graph.add_edge(Numbers(3), upper)
    graph.add_edge(upper, sink)
    graph.start()
    assert graph.join(timeout=30)
    assert sink.seen == ["0", "1", "2"]


def test_fan_out_sends_every_message_to_each_listener():
    numbers, a, b = Numbers(50), Collect(), Collect(workers=2)
    graph = NanoStreamGraph()
    graph.add_edge(numbers, a)
    graph.add_edge(numbers, b)
    graph.start()
    assert graph.join(timeout=30)
    assert a.seen == list(range(50))
    assert sorted(b.seen) == list(range(50))


def test_fan_in_waits_for_every_sender():
    sink = Collect()
    graph = NanoStreamGraph()
    graph.add_edge(Numbers(20), sink)
    graph.add_edge(Numbers(30), sink)
    graph.start()
    assert graph.join(timeout=30)
    assert sorted(sink.seen) == sorted([*range(20), *range(30)])


def test_a_graph_can_start_again_after_stop():
    numbers, sink = Numbers(5), Collect()
    graph = NanoStreamGraph()
    graph.add_edge(numbers, sink)
    graph.start()
    assert graph.join(timeout=30)
    graph.start()
    assert graph.join(timeout=30)
    assert sink.seen == [*range(5), *range(5)]


# -- errors ---------------------------------------------------------------------------

def test_a_failing_listener_stops_the_graph_and_join_raises(caplog):
    class Fails(NanoStreamListener):
        def process_item(self, message):
            if message == 3:
                raise ValueError("bad message")

    graph = NanoStreamGraph()
    graph.add_edge(Counter(), Fails())
    with caplog.at_level(logging.ERROR, logger="nanostream"):
        graph.start()
        with pytest.raises(ns.StageError, match=r"stage 'Fails' failed on item 3") as info:
            graph.join(timeout=30)
    assert isinstance(info.value.__cause__, ValueError)
    # nobody might call join(): the error is logged too
    assert any("NanoStreamGraph stopped with an error" in r.message for r in caplog.records)


def test_a_failing_sender_is_a_stage_error():
    class Broken(NanoStreamSender):
        def start(self):
            self.queue_message(1)
            raise OSError("device gone")

    graph = NanoStreamGraph()
    graph.add_edge(Broken(), Collect())
    graph.start()
    with pytest.raises(ns.StageError, match="Broken.*device gone"):
        graph.join(timeout=30)


def test_definition_errors_say_what_to_do():
    class NoStart(NanoStreamSender):
        pass

    class NoProcess(NanoStreamListener):
        pass

    graph = NanoStreamGraph()
    with pytest.raises(TypeError, match="override start"):
        graph.add_edge(NoStart(), Collect())
    with pytest.raises(TypeError, match="override process_item"):
        graph.add_edge(Numbers(1), NoProcess())
    with pytest.raises(TypeError, match="cannot receive messages"):
        graph.add_edge(Numbers(1), Numbers(2))
    with pytest.raises(TypeError, match="NanoStreamSender, NanoStreamListener"):
        graph.add_edge(Numbers(1), print)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        Collect(workers=0)
    with pytest.raises(TypeError, match="unknown option 'worker'.*did you mean 'workers'"):
        Collect(worker=2)
    with pytest.raises(ValueError, match="the graph is empty"):
        graph.start()
    with pytest.raises(RuntimeError, match="never started"):
        graph.stop()


def test_cycles_are_rejected_at_add_edge():
    a, b = Gated(), Gated()
    graph = NanoStreamGraph()
    graph.add_edge(Numbers(1), a)
    graph.add_edge(a, b)
    with pytest.raises(ValueError, match="cycle"):
        graph.add_edge(b, a)
    with pytest.raises(ValueError, match="itself"):
        graph.add_edge(a, a)
    assert len(graph.pipeline.edges) == 2


def test_unconnected_nodes_and_double_start_are_errors():
    graph = NanoStreamGraph()
    graph.add_node(Numbers(1))
    with pytest.raises(ValueError, match="not connected to anything"):
        graph.start()
    counter, sink = Counter(), Collect()
    graph = NanoStreamGraph()
    graph.add_edge(counter, sink)
    graph.start()
    try:
        with pytest.raises(RuntimeError, match="already running"):
            graph.start()
    finally:
        graph.stop()


def test_queue_message_outside_a_running_graph_explains():
    with pytest.raises(RuntimeError, match=r"graph.add_edge\(sender, listener\)"):
        Numbers(3).start()


def test_positional_arguments_are_refused():
    with pytest.raises(TypeError, match="keyword options only"):
        NanoStreamListener(3)


# -- the public surface and display -----------------------------------------------------

def test_exported_at_top_level():
    assert set(compat.__all__) == {"NanoStreamGraph", "NanoStreamListener",
                                   "NanoStreamProcessor", "NanoStreamSender"}
    for name in compat.__all__:
        assert getattr(ns, name) is getattr(compat, name)
        assert name in ns.__all__


def test_graph_shows_its_pipeline():
    double = Gated(workers=3)
    graph = NanoStreamGraph()
    graph.add_edge(Numbers(1), double)
    graph.add_edge(double, Collect())
    assert repr(graph) == "<NanoStreamGraph not running: Numbers | Gated | Collect>"
    assert repr(graph.pipeline) == "Pipeline(Numbers | Gated | Collect)"
    html = graph._repr_html_()
    for part in ("Numbers", "Gated", "Collect", "workers=3"):
        assert part in html
    assert [n.stage.kind for n in graph.pipeline.nodes] == ["source", "transform", "sink"]
