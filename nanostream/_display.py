"""Showing pipelines and runs: graph pictures, live run statistics, progress bars.

The core calls three functions of this module: :func:`pipeline_html` for
``Pipeline._repr_html_``, :func:`run_html` for ``Run._repr_html_`` and
:func:`start_progress` for ``run(progress=True)``. Everything optional (Graphviz's
``dot`` program, IPython, ipywidgets, tqdm) is looked up when it is needed, never at
import time, and every display has a plain fallback.
"""

from __future__ import annotations

import functools
import html
import logging
import operator
import shutil
import subprocess
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._stage import SINK, SOURCE, Stage, _iterate

if TYPE_CHECKING:
    from ._graph import Node, Pipeline
    from ._report import Report, StageStats
    from ._runtime import Run

__all__ = [
    "display_run",
    "pipeline_html",
    "pipeline_svg",
    "pipeline_text",
    "run_html",
    "start_progress",
    "to_dot",
]

log = logging.getLogger("nanostream")

DOT_TIMEOUT = 10.0       # seconds the ``dot`` program may take to draw a graph
REFRESH = 0.25           # seconds between two updates of a live display or progress bar

_KIND_STYLE = {
    SOURCE: ('shape=cds, style="filled", fillcolor="#d8f0d8"', "#d8f0d8"),
    "transform": ('shape=box, style="rounded,filled", fillcolor="#dce8f7"', "#dce8f7"),
    SINK: ('shape=cylinder, style="filled", fillcolor="#fbe3c8"', "#fbe3c8"),
}


# -- the graph ----------------------------------------------------------------------

def _as_pipeline(p: Any) -> Pipeline:
    from ._graph import Pipeline
    if isinstance(p, Pipeline):
        return p
    if isinstance(p, Stage):
        return Pipeline.of(p)
    inner = getattr(p, "pipeline", None)  # e.g. a NanoStreamGraph
    if isinstance(inner, Pipeline):
        return inner
    raise TypeError(f"expected a Pipeline or a Stage, got {type(p).__name__} {p!r}")


def _details(stage: Stage) -> list[str]:
    """Short notes on how a stage runs: ``workers=8``, ``process``, ``stream``..."""
    notes = []
    if stage.kind != SOURCE:
        if stage.option("stream"):
            notes.append("stream")
        elif stage.option("workers") > 1:
            notes.append(f"workers={stage.option('workers')}")
        if stage.option("executor") == "process":
            notes.append("process")
        if stage.is_async:
            notes.append("async")
        if not stage.option("ordered") and stage.option("workers") > 1:
            notes.append("unordered")
    if stage.kind == SOURCE and stage.option("track"):
        notes.append("tracked")
    return notes


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(pipeline: Pipeline | Stage) -> str:
    """The graph of a pipeline as Graphviz DOT text.

    Sources, transforms and sinks get different shapes and colours; each label is
    the stage's name and how it runs (``workers=8``, ``process``, ``stream``).
    Items leaving an open end go to a small ``out`` point, and the entry of a
    segment (a pipeline without a source) comes from an ``in`` point.

    >>> from nanostream import sink, transform
    >>> print(to_dot([1, 2] | transform(abs, workers=4) | sink(print)))
    digraph pipeline {
      rankdir=LR;
      node [fontname="Helvetica", fontsize=11, margin="0.15,0.05"];
      edge [color="#555555", arrowsize=0.7];
      n0 [label="from_iterable", shape=cds, style="filled", fillcolor="#d8f0d8"];
      n1 [label="abs\\nworkers=4", shape=box, style="rounded,filled", fillcolor="#dce8f7"];
      n2 [label="print", shape=cylinder, style="filled", fillcolor="#fbe3c8"];
      n0 -> n1;
      n1 -> n2;
    }
    """
    p = _as_pipeline(pipeline)
    ids = {n: f"n{i}" for i, n in enumerate(p.nodes)}
    lines = [
        "digraph pipeline {",
        "  rankdir=LR;",
        '  node [fontname="Helvetica", fontsize=11, margin="0.15,0.05"];',
        '  edge [color="#555555", arrowsize=0.7];',
    ]
    for n in p.nodes:
        label = "\n".join([n.stage.name, *_details(n.stage)])
        lines.append(f"  {ids[n]} [label={_dot_quote(label)}, {_KIND_STYLE[n.stage.kind][0]}];")
    for a, b in p.edges:
        lines.append(f"  {ids[a]} -> {ids[b]};")
    for i, n in enumerate(p.heads()):
        lines.append(f'  in{i} [shape=point, width=0.08, xlabel="in"]; in{i} -> {ids[n]};')
    for i, n in enumerate(p.open_ends()):
        lines.append(f'  out{i} [shape=point, width=0.08, xlabel="out"]; '
                     f"{ids[n]} -> out{i} [style=dashed];")
    lines.append("}")
    return "\n".join(lines)


def _dot_program() -> str | None:
    return shutil.which("dot")


@functools.lru_cache(maxsize=64)
def _render_svg(program: str, dot: str, timeout: float) -> str | None:
    try:
        proc = subprocess.run([program, "-Tsvg"], input=dot, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        log.warning("Graphviz 'dot' took more than %g s to draw the pipeline; showing the "
                    "plain picture instead", timeout)
        return None
    except OSError as exc:
        log.warning("could not run Graphviz 'dot' (%s); showing the plain picture instead", exc)
        return None
    if proc.returncode != 0 or "<svg" not in proc.stdout:
        log.warning("Graphviz 'dot' failed (exit code %s: %s); showing the plain picture "
                    "instead", proc.returncode, proc.stderr.strip()[:200])
        return None
    return proc.stdout[proc.stdout.index("<svg"):]


def pipeline_svg(pipeline: Pipeline | Stage, timeout: float = DOT_TIMEOUT) -> str | None:
    """The graph drawn as SVG by Graphviz, or ``None`` when the ``dot`` program is not
    installed (``apt-get install graphviz``, ``brew install graphviz``, ``conda install
    graphviz``) or fails."""
    program = _dot_program()
    if program is None:
        return None
    return _render_svg(program, to_dot(pipeline), timeout)


def _layers(p: Pipeline) -> dict[Node, int]:
    """Each node's column: the length of the longest path reaching it."""
    pred = p.predecessors()
    layer: dict[Node, int] = {}

    def depth(n: Node) -> int:
        if n not in layer:
            layer[n] = 0  # the graph is acyclic; this only guards the recursion
            layer[n] = max((depth(m) + 1 for m in pred[n]), default=0)
        return layer[n]

    for n in p.nodes:
        depth(n)
    return layer


def _text_label(stage: Stage) -> str:
    notes = ([] if stage.kind == "transform" else [stage.kind]) + _details(stage)
    return stage.name + (f" ({', '.join(notes)})" if notes else "")


def pipeline_text(pipeline: Pipeline | Stage) -> str:
    """The graph as an indented tree of text: fan-out branches, and a stage fed by
    several branches (fan-in) is drawn under its first input and marked at the others.

    >>> from nanostream import from_iterable, merge, sink, transform
    >>> p = merge(from_iterable([1]), from_iterable([2], name="more")) | transform(abs)
    >>> print(pipeline_text(p | (sink(print), sink(repr))))
    from_iterable (source)
    └─ abs  ◀ joins from_iterable, more
       ├─ print (sink)
       └─ repr (sink)
    more (source)
    └─ abs  ↑ (joins above)
    """
    p = _as_pipeline(pipeline)
    succ, pred = p.successors(), p.predecessors()
    roots = [n for n in p.nodes if not pred[n]]
    ends = set(p.open_ends())
    drawn: set[Node] = set()
    out: list[str] = []

    def walk(n: Node, prefix: str, branch: str, child_prefix: str) -> None:
        if n in drawn:
            out.append(f"{prefix}{branch}{n.stage.name}  ↑ (joins above)")
            return
        drawn.add(n)
        line = f"{prefix}{branch}{_text_label(n.stage)}"
        if len(pred[n]) > 1:
            line += "  ◀ joins " + ", ".join(m.stage.name for m in pred[n])
        if n in ends:
            line += "  → out"
        out.append(line)
        kids = succ[n]
        for i, m in enumerate(kids):
            last = i == len(kids) - 1
            walk(m, prefix + child_prefix, "└─ " if last else "├─ ", "   " if last else "│  ")

    for r in roots:
        walk(r, "", "", "")
    return "\n".join(out)


def _fallback_html(p: Pipeline) -> str:
    """A picture without Graphviz: one column per depth, a box per stage, arrows
    naming where each stage sends its items (fan-out) and what feeds it (fan-in)."""
    if not p.nodes:
        return "<pre>Pipeline()</pre>"
    layer = _layers(p)
    succ, pred = p.successors(), p.predecessors()
    ends = set(p.open_ends())
    columns: list[list[Node]] = [[] for _ in range(max(layer.values()) + 1)]
    for n in p.nodes:
        columns[layer[n]].append(n)
    cols_html = []
    for col in columns:
        boxes = []
        for n in col:
            st = n.stage
            notes = _details(st)
            extra = []
            if len(succ[n]) > 1 or any(layer[m] != layer[n] + 1 for m in succ[n]):
                extra.append("→ " + ", ".join(html.escape(m.stage.name) for m in succ[n]))
            if len(pred[n]) > 1:
                extra.append("◀ joins " + ", ".join(html.escape(m.stage.name) for m in pred[n]))
            if n in ends:
                extra.append("→ out")
            boxes.append(
                f'<div style="border:1px solid #888;border-radius:6px;padding:3px 8px;'
                f'margin:4px 0;background:{_KIND_STYLE[st.kind][1]};color:#222">'
                f"<b>{html.escape(st.name)}</b>"
                f'<span style="color:#666;font-size:85%"> {html.escape(st.kind)}'
                f"{(' · ' + html.escape(', '.join(notes))) if notes else ''}</span>"
                + "".join(f'<div style="font-size:85%;color:#444">{e}</div>' for e in extra)
                + "</div>")
        cols_html.append('<div style="display:flex;flex-direction:column;'
                         'justify-content:center">' + "".join(boxes) + "</div>")
    arrow = '<div style="align-self:center;padding:0 6px;color:#555">→</div>'
    return ('<div class="nanostream-pipeline" style="display:flex;align-items:stretch;'
            'font-family:sans-serif;font-size:13px">' + arrow.join(cols_html) + "</div>")


def pipeline_html(p: Pipeline) -> str:
    """What a notebook shows for a pipeline: the Graphviz SVG when ``dot`` is
    installed, else an HTML picture of the graph's columns."""
    svg = pipeline_svg(p)
    if svg is not None:
        return f'<div class="nanostream-pipeline">{svg}</div>'
    return _fallback_html(p)


# -- runs ---------------------------------------------------------------------------

def _state(run: Run) -> str:
    if not getattr(run, "_started", True):
        return "not started"
    if run.running:
        return "running"
    if run.error is not None:
        return "failed"
    return "stopped" if getattr(run, "_aborted", False) else "finished"


def _throughput(s: StageStats, elapsed: float) -> float:
    n = s.items_out if s.kind == SOURCE else s.items_in
    return n / elapsed if elapsed > 0 else 0.0


def _utilisation(s: StageStats, elapsed: float) -> float:
    """Fraction of its workers' wall time the stage spent working."""
    return s.busy / (elapsed * max(s.workers, 1)) if elapsed > 0 else 0.0


def bottleneck_text(report: Report) -> str | None:
    """One sentence naming the bottleneck, e.g. ``"enrich: busy 97% of 8 workers' time"``."""
    b = report.bottleneck()
    if b is None:
        return None
    who = f"{b.workers} workers'" if b.workers > 1 else "its worker's"
    text = f"{b.name}: busy {_utilisation(b, report.elapsed):.0%} of {who} time"
    if b.queue is not None and b.queue.capacity:
        text += f", input queue {b.queue.fill:.0%} full"
    return text


def _queue_cell(s: StageStats) -> str:
    q = s.queue
    if q is None:
        return '<td style="color:#999">–</td>'
    pct = max(0.0, min(q.fill, 1.0)) * 100
    colour = "#d9534f" if pct >= 90 else "#f0ad4e" if pct >= 50 else "#5cb85c"
    return ('<td style="min-width:120px"><div style="display:flex;align-items:center;gap:6px">'
            '<div style="flex:1;height:9px;background:#eee;border-radius:3px;min-width:60px">'
            f'<div style="width:{pct:.0f}%;height:100%;background:{colour};border-radius:3px">'
            f'</div></div><span style="font-size:85%">{q.queued}/{q.capacity}</span>'
            "</div></td>")


def report_html(report: Report, title: str = "") -> str:
    """A :class:`~nanostream.Report` as an HTML table with queue-fill bars and the
    bottleneck highlighted."""
    b = report.bottleneck()
    head = ("<tr>" + "".join(f'<th style="text-align:{a}">{h}</th>' for h, a in (
        ("stage", "left"), ("kind", "left"), ("workers", "right"), ("in", "right"),
        ("out", "right"), ("errors", "right"), ("input queue", "left"),
        ("items/s", "right"), ("busy", "right"))) + "</tr>")
    rows = []
    for s in report.stages:
        mark = s is b
        style = ' style="background:#fff3cd"' if mark else ""
        errors = (f'<span style="color:#c9302c;font-weight:bold">{s.errors}</span>'
                  if s.errors else "0")
        rows.append(
            f"<tr{style}><td style='text-align:left'>{'<b>' if mark else ''}"
            f"{html.escape(s.name)}{' ⚠ bottleneck</b>' if mark else ''}</td>"
            f"<td style='text-align:left'>{s.kind}</td>"
            f"<td>{s.workers if s.kind != SOURCE else ''}</td>"
            f"<td>{'' if s.kind == SOURCE else f'{s.items_in:,}'}</td>"
            f"<td>{'' if s.kind == SINK else f'{s.items_out:,}'}</td>"
            f"<td>{errors}</td>{_queue_cell(s)}"
            f"<td>{_throughput(s, report.elapsed):,.0f}</td>"
            f"<td>{'' if s.kind == SOURCE else f'{_utilisation(s, report.elapsed):.0%}'}</td>"
            "</tr>")
    foot = []
    text = bottleneck_text(report)
    if text:
        foot.append(f"bottleneck: <b>{html.escape(text)}</b>")
    foot.append(f"{'running for' if report.running else 'elapsed'} {report.elapsed:.2f} s")
    return (f'<div class="nanostream-run" style="font-family:sans-serif;font-size:13px">'
            f"{title}<table style='border-collapse:collapse;text-align:right'>{head}"
            + "".join(rows) + "</table>"
            f"<div style='margin-top:4px'>{' · '.join(foot)}</div></div>")


def run_snapshot_html(run: Run) -> str:
    """The run's state, per-stage statistics and bottleneck, as static HTML."""
    from ._graph import describe
    state = _state(run)
    colour = {"running": "#337ab7", "failed": "#c9302c", "finished": "#3c763d"}.get(state, "#666")
    title = (f"<div><b style='color:{colour}'>Run {state}</b> "
             f"<code>{html.escape(describe(run.pipeline))}</code></div>")
    body = report_html(run.stats(), title)
    if run.error is not None:
        body += (f"<pre style='color:#c9302c;white-space:pre-wrap'>"
                 f"{html.escape(type(run.error).__name__)}: {html.escape(str(run.error))}</pre>")
    return body


def _in_kernel() -> bool:
    """True inside a Jupyter kernel (not in a terminal IPython or plain Python)."""
    import sys
    if "IPython" not in sys.modules:
        return False
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def _have_ipywidgets() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def _show(obj: Any) -> None:
    from IPython.display import display
    display(obj)


class LiveView:
    """Keeps an HTML widget showing a run's statistics up to date until the run ends.

    ``html`` and ``button`` are ipywidgets (or anything with the same attributes):
    ``html.value`` receives the snapshot, the button stops the run.
    """

    def __init__(self, run: Run, html_widget: Any, button: Any,
                 refresh: float = REFRESH) -> None:
        self.run = run
        self.html = html_widget
        self.button = button
        self.refresh = refresh
        self.html.value = run_snapshot_html(run)
        if hasattr(button, "on_click"):
            button.on_click(lambda _b: self.stop())
        self.thread = threading.Thread(target=self._update, name="nanostream:live-view",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """The Stop button: drain the run in a thread so the kernel stays responsive."""
        self.button.disabled = True
        self.button.description = "Stopping…"
        threading.Thread(target=self.run.stop, name="nanostream:stop-button",
                         daemon=True).start()

    def _update(self) -> None:
        done = self.run._done
        try:
            while not done.wait(self.refresh):
                self.html.value = run_snapshot_html(self.run)
        finally:
            self.html.value = run_snapshot_html(self.run)
            self.button.disabled = True
            self.button.description = "Ended"


def display_run(run: Run) -> LiveView | None:
    """Show a run in Jupyter: a live view (ipywidgets) while it runs, else a snapshot."""
    if run.running and _have_ipywidgets():
        import ipywidgets
        out = ipywidgets.HTML()
        button = ipywidgets.Button(description="Stop", icon="stop",
                                   tooltip="stop the sources and finish the items inside")
        view = LiveView(run, out, button)
        _show(ipywidgets.VBox([out, button]))
        return view
    from IPython.display import HTML
    _show(HTML(run_snapshot_html(run)))
    return None


def run_html(run: Run) -> str | None:
    """What a notebook shows for a run.

    Inside a Jupyter kernel, with ipywidgets installed, a run that is still going
    is shown as a live view (statistics refreshed until it ends, and a Stop
    button); the HTML snapshot is then left out so the run does not show twice.
    Everywhere else: a snapshot of the per-stage statistics with queue fill and the
    bottleneck.
    """
    if run.running and _in_kernel() and _have_ipywidgets():
        display_run(run)
        return None
    return run_snapshot_html(run)


# -- progress -----------------------------------------------------------------------

def _source_length(run: Run) -> int | None:
    """Total items the sources will yield, when every source knows it (a sized
    iterable behind ``from_iterable`` or ``data | stage``); else ``None``."""
    total = 0
    for r in run.runners:
        st = r.stage
        if st.kind != SOURCE:
            continue
        if st.fn is not _iterate or not st.args:
            return None
        data = st.args[0]
        try:
            total += len(data)
        except TypeError:
            hint = operator.length_hint(data, -1)
            if hint < 0:
                return None
            total += hint
    return total


def _tqdm_class() -> Any:
    """tqdm's notebook bar inside Jupyter (when ipywidgets is there), else the text bar."""
    if _in_kernel() and _have_ipywidgets():
        from tqdm.notebook import tqdm as notebook_tqdm
        return notebook_tqdm
    from tqdm import tqdm
    return tqdm


class Progress:
    """A tqdm bar following how many items a run's sources have emitted."""

    def __init__(self, run: Run, bar: Any, refresh: float = REFRESH) -> None:
        self.run = run
        self.bar = bar
        self.refresh = refresh
        self.thread = threading.Thread(target=self._update, name="nanostream:progress",
                                       daemon=True)
        self.thread.start()

    def _emitted(self) -> int:
        return sum(r.items_out for r in self.run.runners if r.stage.kind == SOURCE)

    def _update(self) -> None:
        shown = 0
        done = self.run._done
        try:
            while True:
                finished = done.wait(self.refresh)
                emitted = self._emitted()
                if emitted > shown:
                    self.bar.update(emitted - shown)
                    shown = emitted
                b = self.run.stats().bottleneck()
                if b is not None:
                    self.bar.set_postfix_str(f"bottleneck: {b.name}", refresh=False)
                if finished:
                    return
        finally:
            self.bar.close()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the bar is closed (it closes when the run ends)."""
        self.thread.join(timeout)
        return not self.thread.is_alive()


def start_progress(run: Run, tqdm_class: Callable[..., Any] | None = None) -> Progress | None:
    """Show a progress bar (tqdm, notebook-aware) counting the items the sources emit.

    Its total is known when every source has a length. Returns the
    :class:`Progress`, or ``None`` (with a warning) when tqdm is not installed.
    """
    if tqdm_class is None:
        try:
            tqdm_class = _tqdm_class()
        except ImportError:
            log.warning("progress=True needs tqdm: pip install 'nanostream[progress]' "
                        "(or 'nanostream[jupyter]' for notebook progress bars)")
            return None
    bar = tqdm_class(total=_source_length(run), unit=" items", desc="nanostream",
                     dynamic_ncols=True)
    return Progress(run, bar)
