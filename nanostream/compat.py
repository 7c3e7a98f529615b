"""The original class API (the nanostream alpha), running on the current runtime.

Subclass :class:`NanoStreamSender` and override ``start()`` to produce messages
with ``self.queue_message(x)``; subclass :class:`NanoStreamListener` and override
``process_item(message)`` to handle them; connect instances with
:meth:`NanoStreamGraph.add_edge` and call :meth:`NanoStreamGraph.start`.

>>> class Numbers(NanoStreamSender):
...     def start(self):
...         for i in range(3):
...             self.queue_message(i)
>>> class Double(NanoStreamProcessor):
...     def process_item(self, message):
...         return 2 * message
>>> class Keep(NanoStreamListener):
...     def __init__(self):
...         self.seen = []
...         super().__init__()
...     def process_item(self, message):
...         self.seen.append(message)
>>> graph, keep, double = NanoStreamGraph(), Keep(), Double(workers=2)
>>> graph.add_edge(Numbers(), double)
>>> graph.add_edge(double, keep)
>>> run = graph.start()          # returns at once; the graph runs in threads
>>> graph.join(timeout=10)       # the sender returned, so the graph ends
True
>>> keep.seen
[0, 2, 4]

Each sender's ``start()`` runs in its source thread and ``queue_message`` puts
straight into the bounded queue of the stages after it, so a sender that loops
forever is held back (back-pressure) and ends when the graph is stopped. A
listener runs with ``workers=N`` parallel calls; what ``process_item`` returns,
unless ``None``, goes on to the stages after it, in input order.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._channel import Aborted
from ._graph import Pipeline
from ._stage import SINK, SOURCE, TRANSFORM, Stage

if TYPE_CHECKING:
    from ._runtime import Run, SourceContext

__all__ = ["NanoStreamGraph", "NanoStreamListener", "NanoStreamProcessor", "NanoStreamSender"]

log = logging.getLogger("nanostream")

_current = threading.local()   # .put: where queue_message sends, in this thread


class _SenderStopped(BaseException):
    """Raised by ``queue_message`` once the graph stops, to end a sender's loop.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that an ``except
    Exception`` inside the user's loop does not swallow it.
    """


def _put(message: Any) -> None:
    put: Callable[[Any], None] | None = getattr(_current, "put", None)
    if put is None:
        raise RuntimeError(
            "queue_message() only works while the graph runs: connect the sender with "
            "graph.add_edge(sender, listener) and call graph.start(); to test a listener "
            "alone, call its process_item(message) directly")
    put(message)


class NanoStreamSender:
    """Sends messages into the graph (a "spout"): override :meth:`start`.

    ``start()`` usually loops forever calling ``self.queue_message(message)``; each
    call blocks while the next stage's queue is full, and ends the loop (by raising
    an exception that is not an ``Exception``) once the graph is stopped. When
    ``start()`` returns, the sender is done and, after every other sender is done
    too, the graph ends.

    Options: ``name`` (default: the class name) and ``queue_size``.
    """

    def __init__(self, *args: Any, **options: Any) -> None:
        if args:
            raise TypeError(f"{type(self).__name__}() takes keyword options only "
                            f"(such as name=..., queue_size=...), got {args!r}")
        self._nanostream_options = dict(options)
        super().__init__()

    def start(self) -> None:
        """Produce messages with ``self.queue_message(message)``; override this."""
        raise NotImplementedError(
            f"{type(self).__name__} must override start() to send messages with "
            "self.queue_message(message)")

    def queue_message(self, message: Any) -> None:
        """Send ``message`` to every stage connected after this one.

        Waits while their queues are full (back-pressure). Inside ``process_item``
        of a processor, the message goes out together with the item's result.
        """
        _put(message)

    def _nanostream_stage(self, kind: str) -> Stage:
        options = dict(getattr(self, "_nanostream_options", {}))
        options.setdefault("name", type(self).__name__)
        if kind == SOURCE:
            if type(self).start is NanoStreamSender.start:
                raise TypeError(f"{type(self).__name__} is a NanoStreamSender but does not "
                                "override start(); define start() to send messages with "
                                "self.queue_message(message)")
            return Stage(_sender_source(self), SOURCE, options, internal={"context": True},
                         bound=True)
        raise TypeError(f"{type(self).__name__} is a NanoStreamSender, which only sends: it "
                        "cannot be the target of add_edge (use a NanoStreamProcessor to both "
                        "receive and send)")

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


class NanoStreamListener:
    """Handles messages: override :meth:`process_item`.

    ``workers=N`` runs ``N`` calls in parallel threads (in-order output is kept);
    other keyword options are stage options (``name``, ``queue_size``, ``ordered``,
    ``on_error``, ``retries``, ``executor``). A value other than ``None`` returned
    by ``process_item`` goes on to the stages connected after this one.
    """

    def __init__(self, *args: Any, workers: int = 1, **options: Any) -> None:
        if args:
            raise TypeError(f"{type(self).__name__}() takes keyword options only "
                            f"(such as workers=3), got {args!r}")
        options["workers"] = workers
        # validate now, so a bad option fails where the listener is made
        Stage(_noop, SINK, {"name": type(self).__name__, **options})
        super().__init__()  # first: in a processor this runs NanoStreamSender.__init__
        self._nanostream_options = options

    def process_item(self, message: Any) -> Any:
        """Handle one message; a returned value other than ``None`` is passed on."""
        raise NotImplementedError(
            f"{type(self).__name__} must override process_item(self, message)")

    def _nanostream_stage(self, kind: str) -> Stage:
        if type(self).process_item is NanoStreamListener.process_item:
            raise TypeError(f"{type(self).__name__} is a NanoStreamListener but does not "
                            "override process_item(self, message)")
        options = dict(getattr(self, "_nanostream_options", {}))
        options.setdefault("name", type(self).__name__)
        return Stage(_listener_call(self, kind), kind, options)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


class NanoStreamProcessor(NanoStreamListener, NanoStreamSender):
    """Both: handles messages with :meth:`process_item` and may also send extra
    ones with ``self.queue_message(message)`` while handling an item."""

    def __init__(self, *args: Any, workers: int = 1, **options: Any) -> None:
        NanoStreamListener.__init__(self, *args, workers=workers, **options)

    def _nanostream_stage(self, kind: str) -> Stage:
        return NanoStreamListener._nanostream_stage(self, kind)


def _noop(message: Any) -> None:
    return None


def _sender_source(sender: NanoStreamSender) -> Callable[..., Any]:
    """The source function: runs ``sender.start()`` in the source thread, with
    ``queue_message`` putting straight into the channels after the source."""

    def run_sender(ctx: SourceContext | None = None) -> tuple[()]:
        assert ctx is not None    # the runtime passes it (internal={"context": True})
        runner = ctx._runner      # the core's source runner: its emit() does the puts
        emit = runner.emit

        told = False  # the sender was told to stop (a sender may swallow that)

        def put(message: Any) -> None:
            # A message handed over is inside the pipeline, like an item a source
            # generator yielded: it goes out even when a stop(drain=True) landed just
            # before (dropping it here lost it: the sender had counted it as sent);
            # the sender is stopped after it. An abort (drain=False) refuses it.
            nonlocal told
            if told:
                raise _SenderStopped
            try:
                emit([message])
            except Aborted:
                told = True
                raise _SenderStopped from None
            runner.items_out += 1
            if runner.outs_dead() or ctx.stopping:
                told = True
                raise _SenderStopped

        previous = getattr(_current, "put", None)
        _current.put = put
        try:
            sender.start()
        except _SenderStopped:
            pass
        finally:
            _current.put = previous
        return ()

    run_sender.__name__ = type(sender).__name__
    return run_sender


def _listener_call(listener: NanoStreamListener, kind: str) -> Callable[[Any], Any]:
    """For a transform, a generator function yielding what ``process_item`` sends
    with ``queue_message``, then its return value unless it is ``None``; for a sink
    (nothing connected after the listener), a plain call."""

    if kind == SINK:
        def consume(message: Any) -> None:
            previous = getattr(_current, "put", None)
            _current.put = _noop
            try:
                listener.process_item(message)
            finally:
                _current.put = previous

        consume.__name__ = type(listener).__name__
        return consume

    def handle(message: Any) -> Any:
        sent: list[Any] = []
        previous = getattr(_current, "put", None)
        _current.put = sent.append
        try:
            result = listener.process_item(message)
        finally:
            _current.put = previous
        yield from sent
        if result is not None:
            yield result

    handle.__name__ = type(listener).__name__
    return handle


class NanoStreamGraph:
    """The pipeline of the class API: ``add_edge(a, b)`` connects two instances.

    :meth:`start` returns at once with the :class:`~nanostream.Run`; :meth:`stop`
    ends it. As in the original, a started graph keeps the Python process alive
    until it is stopped or every sender has returned.

    ``queue_size`` is the capacity of each stage's input queue (default 1024; a
    ``queue_size`` given to a listener wins).
    """

    def __init__(self, *, queue_size: int | None = None) -> None:
        self.queue_size = queue_size
        self._edges: list[tuple[Any, Any]] = []
        self._nodes: list[Any] = []
        self._run: Run | None = None
        self._keeper: threading.Thread | None = None

    def add_node(self, node: Any) -> None:
        """Add a sender, listener or processor (``add_edge`` adds them too)."""
        if not isinstance(node, (NanoStreamSender, NanoStreamListener)):
            raise TypeError(f"a NanoStreamGraph holds NanoStreamSender, NanoStreamListener "
                            f"and NanoStreamProcessor instances, got {type(node).__name__} "
                            f"{node!r}")
        if not any(n is node for n in self._nodes):
            self._nodes.append(node)

    def add_edge(self, source: Any, target: Any) -> None:
        """Send what ``source`` emits to ``target``."""
        for node in (source, target):
            if not isinstance(node, (NanoStreamSender, NanoStreamListener)):
                raise TypeError(f"add_edge connects NanoStreamSender, NanoStreamListener and "
                                f"NanoStreamProcessor instances, got {type(node).__name__} "
                                f"{node!r}")
        if not isinstance(target, NanoStreamListener):
            raise TypeError(f"{target!r} cannot receive messages: the target of add_edge must "
                            "be a NanoStreamListener or NanoStreamProcessor (with a "
                            "process_item method)")
        if source is target:
            raise ValueError(f"cannot connect {source!r} to itself: graphs must be acyclic")
        if any(a is source and b is target for a, b in self._edges):
            return
        self._edges.append((source, target))
        try:
            self._build()  # fail here on cycles, not at start()
        except Exception:
            self._edges.pop()
            raise
        self.add_node(source)
        self.add_node(target)

    @property
    def pipeline(self) -> Pipeline:
        """The graph as a :class:`~nanostream.Pipeline` (what :meth:`start` runs)."""
        return self._build()

    def _build(self) -> Pipeline:
        has_out = {id(a) for a, _ in self._edges}
        stages: dict[int, Stage] = {}
        for node in [x for edge in self._edges for x in edge]:
            if id(node) in stages:
                continue
            if isinstance(node, NanoStreamListener):
                kind = TRANSFORM if id(node) in has_out else SINK
            else:
                kind = SOURCE
            stage = node._nanostream_stage(kind)
            if (self.queue_size is not None and kind != SOURCE
                    and "queue_size" not in getattr(node, "_nanostream_options", {})):
                stage = stage.with_options(queue_size=self.queue_size)
            stages[id(node)] = stage
        p = Pipeline()
        for a, b in self._edges:
            p.add_edge(stages[id(a)], stages[id(b)])
        return p

    def start(self) -> Run:
        """Start every sender and listener in background threads; returns the Run at once."""
        if self._run is not None and self._run.running:
            raise RuntimeError("this graph is already running; call stop() before starting "
                               "it again")
        if not self._nodes:
            raise ValueError("the graph is empty: connect a sender to a listener with "
                             "graph.add_edge(sender, listener) first")
        connected = {id(x) for edge in self._edges for x in edge}
        lonely = [n for n in self._nodes if id(n) not in connected]
        if lonely:
            raise ValueError(f"{lonely[0]!r} is not connected to anything: use "
                             "graph.add_edge(sender, listener) to connect it, or leave it out")
        p = self._build()
        run = p.start()
        self._run = run
        self._keeper = threading.Thread(target=_keep_alive, args=(run,), daemon=False,
                                        name="nanostream:graph")
        self._keeper.start()
        return run

    @property
    def run(self) -> Run | None:
        """The current (or last) run, once started."""
        return self._run

    @property
    def running(self) -> bool:
        return self._run is not None and self._run.running

    def stop(self, drain: bool = False, timeout: float | None = None) -> None:
        """Stop the graph and wait until its threads have ended.

        By default the messages still queued are dropped, since a sender usually
        never ends and listeners may be slow; ``drain=True`` stops the senders and
        finishes every message already inside first.
        """
        if self._run is None:
            raise RuntimeError("this graph was never started; call graph.start() first")
        self._run.stop(drain=drain, timeout=timeout)
        if self._keeper is not None:
            self._keeper.join()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the graph to end (every sender returned and every message handled).

        True when it ended, False on timeout; raises the error that stopped it.
        """
        if self._run is None:
            raise RuntimeError("this graph was never started; call graph.start() first")
        try:
            return self._run.join(timeout)
        finally:
            if self._keeper is not None and not self._run.running:
                self._keeper.join()

    def _repr_html_(self) -> str | None:
        return self.pipeline._repr_html_()

    def __repr__(self) -> str:
        from ._graph import describe
        state = "running" if self.running else "not running"
        return f"<NanoStreamGraph {state}: {describe(self._build())}>"


def _keep_alive(run: Run) -> None:
    """Hold the process open while the graph runs (the original's threads did), and
    report an error nobody joins for."""
    try:
        run.join()
    except Exception as exc:
        log.error("the NanoStreamGraph stopped with an error: %s", exc, exc_info=exc)
