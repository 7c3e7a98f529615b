"""Jupyter displays: the graph picture, run statistics, live views, progress bars."""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import sys
import threading
import time
import types

import pytest

import nanostream as ns
from nanostream import _display
from nanostream._channel import ChannelStats
from nanostream._report import Report, StageStats

# CI installs Graphviz (.ci/run), so there the SVG path is always tested
HAVE_DOT = shutil.which("dot") is not None or bool(os.environ.get("CI"))


def fan_graph():
    """Two sources merged (fan-in), then a fan-out to a sink and a segment."""
    a = ns.from_iterable(range(10), name="clicks")
    b = ns.from_iterable(range(5), name="views")
    enrich = ns.transform(abs, name="enrich", workers=8)
    return ns.merge(a, b) | enrich | (ns.sink(print, name="show"),
                                       ns.transform(str, name="fmt") | ns.sink(repr, name="save"))


def wait_for(predicate, timeout=10.0):
    """Wait until ``predicate()`` is true (a condition, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached within the timeout"
        tick.wait(0.002)


@pytest.fixture
def no_dot(monkeypatch):
    monkeypatch.setattr(_display, "_dot_program", lambda: None)


# -- DOT ------------------------------------------------------------------------------

def test_dot_has_every_stage_edge_and_kind_shape():
    dot = _display.to_dot(fan_graph())
    nodes = dict(re.findall(r'(n\d+) \[label="([^"]*)"', dot))
    assert sorted(nodes.values()) == sorted(
        ["clicks", "views", "enrich\\nworkers=8", "show", "fmt", "save"])
    edges = re.findall(r"(n\d+) -> (n\d+);", dot)
    by_name = {v.split("\\n")[0]: k for k, v in nodes.items()}
    named = {(nodes[a].split("\\n")[0], nodes[b].split("\\n")[0]) for a, b in edges}
    assert named == {("clicks", "enrich"), ("views", "enrich"), ("enrich", "show"),
                     ("enrich", "fmt"), ("fmt", "save")}
    shape = {name: re.search(rf"{by_name[name]} \[.*shape=(\w+)", dot).group(1)
             for name in by_name}
    assert shape["clicks"] == shape["views"] == "cds"
    assert shape["enrich"] == shape["fmt"] == "box"
    assert shape["show"] == shape["save"] == "cylinder"
    assert "out0" not in dot  # every branch ends in a sink


def test_dot_marks_segment_inputs_and_open_ends_and_quotes_names():
    seg = ns.transform(str.strip, name='say "hi"\\') | ns.transform(len, executor="process")
    dot = _display.to_dot(seg)
    assert r'label="say \"hi\"\\"' in dot
    assert 'label="len\\nprocess"' in dot
    assert "in0 -> n0" in dot
    assert "n1 -> out0 [style=dashed]" in dot
    assert _display.to_dot(ns.transform(abs)).count("->") == 2  # in -> abs -> out


def test_dot_notes_how_stages_run():
    async def fetch(x):
        return x

    p = (ns.from_iterable([1], name="src")
         | ns.transform(fetch, workers=4, ordered=False)
         | ns.sink(print, stream=True))
    dot = _display.to_dot(p)
    assert 'label="fetch\\nworkers=4\\nasync\\nunordered"' in dot
    assert 'label="print\\nstream"' in dot


def test_to_dot_refuses_what_is_not_a_pipeline():
    with pytest.raises(TypeError, match="expected a Pipeline or a Stage, got int"):
        _display.to_dot(3)


# -- pictures -------------------------------------------------------------------------

@pytest.mark.skipif(not HAVE_DOT, reason="needs Graphviz's dot program")
def test_svg_through_graphviz():
    p = fan_graph()
    svg = _display.pipeline_svg(p)
    assert svg.startswith("<svg")
    for name in ("clicks", "views", "enrich", "workers=8", "show", "fmt", "save"):
        assert f">{name}</text>" in svg
    html = p._repr_html_()
    assert "<svg" in html
    assert "nanostream-pipeline" in html


def test_without_graphviz_the_html_picture_still_shows_fan_out_and_fan_in(no_dot):
    html = fan_graph()._repr_html_()
    assert "<svg" not in html
    for name in ("clicks", "views", "enrich", "show", "fmt", "save"):
        assert f"<b>{name}</b>" in html
    assert "◀ joins clicks, views" in html       # fan-in
    assert "→ show, fmt" in html                 # fan-out
    assert "workers=8" in html
    # columns in order: sources, enrich, (show, fmt), save
    order = [html.index(f"<b>{n}</b>") for n in ("clicks", "enrich", "fmt", "save")]
    assert order == sorted(order)


def test_fallback_html_escapes_names(no_dot):
    html = (ns.from_iterable([1], name="<src>") | ns.sink(print)).__repr__()
    assert html == "Pipeline(<src> | print)"
    assert "&lt;src&gt;" in _display.pipeline_html(
        ns.from_iterable([1], name="<src>") | ns.sink(print))


def test_a_failing_dot_falls_back_with_a_warning(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(_display, "_dot_program", lambda: shutil.which("false"))
    with caplog.at_level(logging.WARNING, logger="nanostream"):
        html = _display.pipeline_html(fan_graph())
    assert "<svg" not in html
    assert "<b>enrich</b>" in html
    assert "Graphviz 'dot' failed" in caplog.text


def test_a_slow_dot_times_out(monkeypatch, caplog, tmp_path):
    slow = tmp_path / "dot"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(0o755)
    monkeypatch.setattr(_display, "_dot_program", lambda: str(slow))
    with caplog.at_level(logging.WARNING, logger="nanostream"):
        assert _display.pipeline_svg(fan_graph(), timeout=0.2) is None
    assert "took more than 0.2 s" in caplog.text


def test_text_tree_shows_branches_and_joins():
    assert _display.pipeline_text(fan_graph()) == "\n".join([
        "clicks (source)",
        "└─ enrich (workers=8)  ◀ joins clicks, views",
        "   ├─ show (sink)",
        "   └─ fmt",
        "      └─ save (sink)",
        "views (source)",
        "└─ enrich  ↑ (joins above)",
    ])
    assert _display.pipeline_text(ns.transform(abs) | ns.transform(str)) == "abs\n└─ str  → out"


def test_displays_accept_a_single_stage(no_dot):
    src = ns.from_iterable([1, 2], name="src")
    assert _display.pipeline_text(src) == "src (source)  → out"
    assert "<b>src</b>" in _display.pipeline_html(ns.Pipeline.of(src))


# -- run statistics -------------------------------------------------------------------

def sample_report(running=False):
    return Report([
        StageStats("lines", "source", items_out=1000),
        StageStats("parse", "transform", 1, 1000, 990, errors=10, busy=0.2,
                   queue=ChannelStats(3, 1024, 0, 0)),
        StageStats("fetch", "transform", 8, 990, 990, busy=7.6,
                   queue=ChannelStats(1000, 1024, 1, 0)),
        StageStats("save", "sink", 1, 990, busy=0.1, queue=ChannelStats(0, 1024, 0, 1)),
    ], elapsed=1.0, running=running)


def test_report_html_has_counts_queue_bars_and_the_bottleneck():
    html = _display.report_html(sample_report(running=True))
    for cell in ("lines", "parse", "fetch", "save", "1,000", "990"):
        assert cell in html
    assert "1000/1024" in html
    assert "3/1024" in html
    assert "width:98%" in html                       # fetch's input queue is nearly full
    assert "<b>fetch ⚠ bottleneck</b>" in html
    assert "bottleneck: <b>fetch: busy 95% of 8 workers&#x27; time, input queue 98% full</b>" \
        in html
    assert "color:#c9302c;font-weight:bold\">10<" in html   # errors stand out
    assert "running for 1.00 s" in html


def test_bottleneck_text():
    assert _display.bottleneck_text(sample_report()) == \
        "fetch: busy 95% of 8 workers' time, input queue 98% full"
    assert _display.bottleneck_text(Report([StageStats("s", "source", items_out=3)])) is None


def test_run_snapshot_of_a_finished_run():
    seen = []
    run = (ns.from_iterable(range(100), name="numbers") | ns.transform(abs)
           | ns.sink(seen.append, name="keep")).start()
    assert run.join(timeout=30)
    html = run._repr_html_()
    assert "Run finished" in html
    assert "numbers | abs | keep" in html
    assert "⚠ bottleneck" in html
    assert html.count("<tr") == 4


def test_run_snapshot_while_running_shows_queue_fill():
    gate = threading.Event()
    run = (ns.from_iterable((x for x in range(50)), name="numbers")
           | ns.sink(lambda x: gate.wait(), name="slow", queue_size=10)).start()
    try:
        wait_for(lambda: run.stats()["slow"].queue.waiting_producers > 0)
        html = _display.run_html(run)
        assert "Run running" in html
        assert "/10</span>" in html
    finally:
        gate.set()
        run.stop()
        run.join()


def test_run_snapshot_of_a_failed_run_shows_the_error():
    def boom(x):
        raise ValueError("no good")

    run = (ns.from_iterable([1]) | ns.sink(boom)).start()
    with pytest.raises(ns.StageError):
        run.join(timeout=30)
    html = run._repr_html_()
    assert "Run failed" in html
    assert "StageError: stage &#x27;boom&#x27; failed on item 1: ValueError: no good" in html


# -- live view ------------------------------------------------------------------------

class FakeWidget:
    def __init__(self, *children, **kw):
        self.children = children
        self.value = ""
        self.disabled = False
        self.description = kw.get("description", "")
        self.clicks = []

    def on_click(self, fn):
        self.clicks.append(fn)

    def click(self):
        for fn in self.clicks:
            fn(self)


@pytest.fixture
def fake_kernel(monkeypatch):
    """Pretend to be inside Jupyter with ipywidgets (a stand-in module)."""
    shown = []
    fake = types.ModuleType("ipywidgets")
    fake.HTML = FakeWidget
    fake.Button = FakeWidget
    fake.VBox = lambda children: FakeWidget(*children)
    monkeypatch.setitem(sys.modules, "ipywidgets", fake)
    monkeypatch.setattr(_display, "_in_kernel", lambda: True)
    monkeypatch.setattr(_display, "_show", shown.append)
    return shown


def test_a_running_run_shows_a_live_view_until_it_ends(fake_kernel):
    gate = threading.Event()
    run = (ns.from_iterable(range(20), name="numbers")
           | ns.sink(lambda x: gate.wait(), name="slow")).start()
    try:
        assert run._repr_html_() is None           # the live view replaces the snapshot
        (box,) = fake_kernel
        html, button = box.children
        assert "Run running" in html.value
        assert button.description == "Stop"
    finally:
        gate.set()
    assert run.join(timeout=30)
    for t in threading.enumerate():  # the thread refreshing the view ends with the run
        if t.name == "nanostream:live-view":
            t.join(10)
    assert "Run finished" in html.value
    assert button.disabled


def test_the_stop_button_stops_the_run(fake_kernel):
    run = (ns.from_iterable(itertools.count(), name="forever") | ns.sink(lambda x: None)).start()
    view = _display.display_run(run)
    box = fake_kernel[0]
    html, button = box.children
    button.click()
    assert button.disabled
    assert run.join(timeout=30)
    view.thread.join(10)
    assert "Run finished" in html.value
    assert button.description == "Ended"
    for t in threading.enumerate():
        if t.name == "nanostream:stop-button":
            t.join(10)


def test_a_finished_run_in_a_kernel_is_a_snapshot(fake_kernel):
    run = (ns.from_iterable([1, 2]) | ns.sink(lambda x: None)).start()
    assert run.join(timeout=30)
    assert "Run finished" in run._repr_html_()
    assert fake_kernel == []
    assert _display.display_run(run) is None
    (shown,) = fake_kernel
    assert "Run finished" in shown.data


def test_outside_a_kernel_no_live_view():
    assert not _display._in_kernel()


def test_without_ipywidgets_a_running_run_is_a_snapshot(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)   # not installed
    monkeypatch.setattr(_display, "_in_kernel", lambda: True)
    gate = threading.Event()
    run = (ns.from_iterable([1, 2]) | ns.sink(lambda x: gate.wait())).start()
    try:
        assert "Run running" in run._repr_html_()
    finally:
        gate.set()
        run.join(timeout=30)


# -- progress -------------------------------------------------------------------------

class FakeBar:
    instances: list[FakeBar] = []

    def __init__(self, total=None, **kw):
        self.total = total
        self.n = 0
        self.closed = False
        self.postfix = ""
        FakeBar.instances.append(self)

    def update(self, k):
        self.n += k

    def set_postfix_str(self, s, refresh=True):
        self.postfix = s

    def close(self):
        self.closed = True


def test_progress_counts_source_items_with_a_known_total():
    run = ns.Run(ns.from_iterable(range(1000)) | ns.transform(abs) | ns.sink(lambda x: None))
    run.start()
    progress = _display.start_progress(run, tqdm_class=FakeBar)
    assert run.join(timeout=30)
    assert progress.join(10)
    bar = progress.bar
    assert (bar.total, bar.n, bar.closed) == (1000, 1000, True)


def test_progress_total_sums_sources_and_is_unknown_for_generators():
    def gen():
        yield from range(7)

    two = ns.merge(ns.from_iterable([1, 2]), ns.from_iterable(range(5))) | ns.sink(print)
    assert _display._source_length(ns.Run(two)) == 7
    assert _display._source_length(ns.Run(ns.from_iterable(iter([1, 2])) | ns.sink(print))) == 2
    assert _display._source_length(ns.Run(ns.source(gen) | ns.sink(print))) is None
    run = ns.Run(ns.source(gen) | ns.sink(lambda x: None))
    run.start()
    progress = _display.start_progress(run, tqdm_class=FakeBar)
    assert run.join(timeout=30)
    assert progress.join(10)
    assert (progress.bar.total, progress.bar.n) == (None, 7)


def test_run_with_progress_draws_a_tqdm_bar(capsys):
    report = (ns.from_iterable(range(100)) | ns.transform(abs)
              | ns.sink(lambda x: None)).run(progress=True)
    assert report["abs"].items_in == 100
    for t in threading.enumerate():
        if t.name == "nanostream:progress":
            t.join(10)
    err = capsys.readouterr().err
    assert "nanostream" in err
    assert "100/100" in err


def test_progress_without_tqdm_warns_and_the_run_still_works(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with caplog.at_level(logging.WARNING, logger="nanostream"):
        report = (ns.from_iterable(range(3)) | ns.sink(lambda x: None)).run(progress=True)
    assert report["<lambda>"].items_in == 3
    assert "pip install 'nanostream[progress]'" in caplog.text


def test_notebook_progress_bar_inside_jupyter(monkeypatch):
    monkeypatch.setattr(_display, "_in_kernel", lambda: True)
    monkeypatch.setattr(_display, "_have_ipywidgets", lambda: True)
    from tqdm.notebook import tqdm as notebook_tqdm
    assert _display._tqdm_class() is notebook_tqdm
    monkeypatch.setattr(_display, "_in_kernel", lambda: False)
    from tqdm import tqdm
    assert _display._tqdm_class() is tqdm
