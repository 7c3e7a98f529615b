"""The lazily built graph: nodes, edges and the ``|`` operator."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ._stage import SINK, SOURCE, Stage, as_source_stage

if TYPE_CHECKING:
    from ._report import Report
    from ._runtime import Run

__all__ = ["Node", "Pipeline", "from_iterable", "merge"]

_ids = itertools.count()


class Node:
    """One use of a stage in a graph."""

    __slots__ = ("id", "stage")

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.id = next(_ids)

    def __repr__(self) -> str:
        return f"<node {self.id} {self.stage!r}>"


class Pipeline:
    """A directed acyclic graph of stages, built with ``|`` and run lazily.

    A pipeline with sources runs with :meth:`run`, :meth:`start`, or by iterating
    it; one without sources is a reusable segment.

    >>> from nanostream import transform
    >>> inc = transform(lambda x: x + 1, name="inc")
    >>> p = [1, 2, 3] | inc | inc
    >>> p
    Pipeline(from_iterable | inc | inc)
    >>> p.collect()
    [3, 4, 5]
    """

    __array_ufunc__ = None

    def __init__(self) -> None:
        self._nodes: list[Node] = []
        self._edges: list[tuple[Node, Node]] = []
        self._by_stage: dict[int, Node] = {}

    # -- construction --------------------------------------------------------

    @classmethod
    def of(cls, stage: Stage) -> Pipeline:
        p = cls()
        p._nodes.append(Node(stage))
        return p

    def _copy(self) -> Pipeline:
        """A structural copy with fresh nodes."""
        p = Pipeline()
        mapping = {}
        for n in self._nodes:
            m = Node(n.stage)
            mapping[n] = m
            p._nodes.append(m)
        p._edges = [(mapping[a], mapping[b]) for a, b in self._edges]
        return p

    def add_edge(self, a: Stage, b: Stage) -> Pipeline:
        """Connect stage ``a`` to stage ``b`` (each stage object is one node here).

        Builds arbitrary DAGs; returns the pipeline so calls can chain.

        >>> from nanostream import source, transform
        >>> src = source(lambda: range(3), name="src")
        >>> p = Pipeline().add_edge(src, transform(lambda x: x * 10, name="x10"))
        >>> sorted(p)
        [0, 10, 20]
        """
        na, nb = self._node_for(a), self._node_for(b)
        _check_edge(na, nb)
        if na is nb or self._reaches(nb, na):
            raise ValueError(f"adding the edge {a.name!r} -> {b.name!r} would make a cycle; "
                             "pipelines must be acyclic (use a stream=True stage to keep state "
                             "instead of feeding items back)")
        if (na, nb) not in self._edges:
            self._edges.append((na, nb))
        return self

    def _node_for(self, stage: Any) -> Node:
        if not isinstance(stage, Stage):
            raise TypeError(f"add_edge takes stages, got {type(stage).__name__} {stage!r}")
        node = self._by_stage.get(id(stage))
        if node is None or node.stage is not stage:
            if stage.kind == SOURCE and not stage.bound:
                stage.check_complete()
            node = Node(stage)
            self._by_stage[id(stage)] = node
            self._nodes.append(node)
        return node

    def _reaches(self, start: Node, goal: Node) -> bool:
        succ = self.successors()
        seen, todo = set(), [start]
        while todo:
            n = todo.pop()
            if n is goal:
                return True
            if n in seen:
                continue
            seen.add(n)
            todo.extend(succ.get(n, ()))
        return False

    # -- structure -----------------------------------------------------------

    @property
    def nodes(self) -> list[Node]:
        return list(self._nodes)

    @property
    def edges(self) -> list[tuple[Node, Node]]:
        return list(self._edges)

    def successors(self) -> dict[Node, list[Node]]:
        succ: dict[Node, list[Node]] = {n: [] for n in self._nodes}
        for a, b in self._edges:
            succ[a].append(b)
        return succ

    def predecessors(self) -> dict[Node, list[Node]]:
        pred: dict[Node, list[Node]] = {n: [] for n in self._nodes}
        for a, b in self._edges:
            pred[b].append(a)
        return pred

    def heads(self) -> list[Node]:
        """Nodes waiting for input from outside (the entry points of a segment)."""
        has_in = {b for _, b in self._edges}
        return [n for n in self._nodes if n not in has_in and n.stage.kind != SOURCE]

    def open_ends(self) -> list[Node]:
        """Nodes whose output goes nowhere yet (not sinks)."""
        has_out = {a for a, _ in self._edges}
        return [n for n in self._nodes if n not in has_out and n.stage.kind != SINK]

    def sources(self) -> list[Node]:
        return [n for n in self._nodes if n.stage.kind == SOURCE]

    # -- composition ---------------------------------------------------------

    def __or__(self, other: Any) -> Pipeline:
        return compose(self, other)

    def __ror__(self, other: Any) -> Pipeline:
        return compose_left(other, self)

    # -- running -------------------------------------------------------------

    def start(self, engine: Any = None) -> Run:
        """Start running in background threads and return the :class:`Run` at once."""
        from ._runtime import Run
        run = Run(self, engine=engine)
        run.start()
        return run

    def run(self, progress: bool = False, timeout: float | None = None,
            engine: Any = None) -> Report:
        """Run until every source is exhausted and every item handled.

        Returns a :class:`Report`. Items leaving open ends are counted and dropped.
        With ``timeout`` (seconds) a run still going then is stopped and
        :class:`TimeoutError` raised (or the :class:`StageError` of a stage that had
        already failed). ``progress=True`` shows a progress bar.
        """
        from ._runtime import Run
        run = Run(self, engine=engine, progress=progress)
        return run.run_to_end(timeout)

    def __iter__(self) -> Iterator[Any]:
        from ._runtime import Run
        run = Run(self, collect=True)
        return run.iterate()

    def collect(self) -> list[Any]:
        """Run and return what leaves the pipeline's one open end, as a list."""
        return list(self)

    # -- display -------------------------------------------------------------

    def __repr__(self) -> str:
        return f"Pipeline({describe(self)})"

    def _repr_html_(self) -> str | None:
        try:
            from ._display import pipeline_html
        except ImportError:
            return None
        return pipeline_html(self)


def describe(p: Pipeline) -> str:
    """``a | b | (c, d | e)`` for trees; an edge list for graphs with fan-in.

    >>> from nanostream import transform
    >>> describe([1] | transform(abs) | (transform(str), transform(repr)))
    'from_iterable | abs | (str, repr)'
    """
    if not p._nodes:
        return ""
    succ, pred = p.successors(), p.predecessors()
    if all(len(v) <= 1 for v in pred.values()):
        def tree(n: Node) -> str:
            nxt = succ[n]
            if not nxt:
                return n.stage.name
            if len(nxt) == 1:
                return f"{n.stage.name} | {tree(nxt[0])}"
            return f"{n.stage.name} | ({', '.join(tree(m) for m in nxt)})"
        roots = [n for n in p._nodes if not pred[n]]
        return " + ".join(tree(r) for r in roots)
    parts = [f"{a.stage.name} -> {b.stage.name}" for a, b in p._edges]
    lone = [n.stage.name for n in p._nodes if not succ[n] and not pred[n]]
    return ", ".join(parts + lone)


def _as_pipeline(x: Any, side: str) -> Pipeline:
    if isinstance(x, Pipeline):
        return x._copy()
    if isinstance(x, Stage):
        if x.kind == SOURCE:
            x.check_complete()
        return Pipeline.of(x)
    if isinstance(x, (tuple, list)) and _all_parts(x):
        return _union([_as_pipeline(e, side) for e in x])
    if side == "right":
        if isinstance(x, (tuple, list)):
            bad = next(e for e in x if not isinstance(e, (Stage, Pipeline)))
            raise TypeError(f"cannot fan out to {type(bad).__name__} {bad!r}: every branch in "
                            "a tuple after | must be a stage or a pipeline")
        if callable(x):
            raise TypeError(f"cannot pipe into the plain callable {x!r}: wrap it first, e.g. "
                            f"transform(fn) or sink(fn)")
        raise TypeError(f"cannot pipe into {type(x).__name__} {x!r}: the right side of | must be "
                        "a stage, a pipeline, or a tuple of them")
    return Pipeline.of(as_source_stage(x))


def _all_parts(xs: Iterable[Any]) -> bool:
    xs = list(xs)
    return bool(xs) and all(isinstance(e, (Stage, Pipeline)) for e in xs)


def _union(parts: list[Pipeline]) -> Pipeline:
    p = Pipeline()
    for part in parts:
        p._nodes.extend(part._nodes)
        p._edges.extend(part._edges)
    return p


def _check_edge(a: Node, b: Node) -> None:
    if a.stage.kind == SINK:
        raise TypeError(f"sink {a.stage.name!r} has no output, so nothing can follow it; "
                        f"use a transform (e.g. ns.tap) to act on items and pass them on")
    if b.stage.kind == SOURCE:
        raise TypeError(f"source {b.stage.name!r} cannot take input, so it cannot follow "
                        f"{a.stage.name!r}; combine sources with ns.merge(a, b) or "
                        f"(a, b) | next_stage")


def _connect(left: Pipeline, right: Pipeline) -> Pipeline:
    ends = left.open_ends()
    heads = right.heads()
    if not ends:
        sinks = [n.stage.name for n in left._nodes if n.stage.kind == SINK]
        what = f"it ends in sink {sinks[0]!r}" if sinks else "it is empty"
        raise TypeError(f"nothing can follow this pipeline: {what}, which has no output")
    if not heads:
        srcs = [n.stage.name for n in right._nodes if n.stage.kind == SOURCE]
        if srcs:
            raise TypeError(f"source {srcs[0]!r} cannot take input, so it cannot follow "
                            f"{ends[0].stage.name!r}; combine sources with ns.merge(a, b) or "
                            f"(a, b) | next_stage")
        raise TypeError("the right side of | has no stage that takes input")
    for n in right._nodes:
        if n.stage.kind != SOURCE:
            n.stage.check_complete()
    p = _union([left, right])
    for a in ends:
        for b in heads:
            _check_edge(a, b)
            p._edges.append((a, b))
    return p


def compose(left: Any, right: Any) -> Pipeline:
    """``left | right`` where ``left`` is a stage or a pipeline."""
    lp = _as_pipeline(left, "left")
    for n in lp._nodes:
        if n.stage.kind != SOURCE:
            n.stage.check_complete()
    rp = _as_pipeline(right, "right")
    return _connect(lp, rp)


def compose_left(left: Any, right: Stage | Pipeline) -> Pipeline:
    """``left | right`` where only ``right`` is ours: ``left`` is data or a fan-in tuple."""
    return _connect(_as_pipeline(left, "left"), _as_pipeline(right, "right"))


def merge(*parts: Stage | Pipeline) -> Pipeline:
    """Fan-in: one pipeline whose open ends are those of all ``parts``.

    ``ns.merge(a, b) | c`` is the same as ``(a, b) | c``; ``c`` ends only after
    every branch has ended.

    >>> from nanostream import from_iterable, transform
    >>> sorted(merge(from_iterable([1, 2]), from_iterable([3])) | transform(str))
    ['1', '2', '3']
    """
    if not parts:
        raise TypeError("merge needs at least one stage or pipeline")
    for x in parts:
        if not isinstance(x, (Stage, Pipeline)):
            raise TypeError(f"merge takes stages and pipelines, got {type(x).__name__} {x!r}; "
                            "wrap data with ns.from_iterable(data)")
    return _union([_as_pipeline(x, "left") for x in parts])


def from_iterable(data: Iterable[Any], *, name: str = "from_iterable") -> Stage:
    """A source that yields the items of any iterable.

    >>> list(from_iterable("ab"))
    ['a', 'b']
    """
    try:
        iter(data)
    except TypeError:
        raise TypeError(f"from_iterable needs an iterable, got {type(data).__name__} "
                        f"{data!r}") from None
    return as_source_stage(data, name=name)
