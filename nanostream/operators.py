"""Built-in operators: stages for the everyday steps of a stream.

Per-item operators (:func:`filter`, :func:`flat_map`, :func:`filter_map`,
:func:`flatten`, :func:`tap`) take every transform option, ``workers`` included.
Stateful ones (:func:`batch`, :func:`scan`, :func:`stateful_map`, :func:`reduce`,
:func:`take`, :func:`take_while`, :func:`skip`, :func:`distinct`,
:func:`rate_limit` and the windows of :mod:`nanostream.windows`) are
``stream=True`` stages: one worker each, state kept across items, and the options
``name``, ``queue_size`` and ``on_error`` (which they apply per item themselves,
through the runtime's stage context: the effective name and policy, errors counted
in the report). Keyed operators (``key=``) keep one state per key and emit
``(key, value)`` pairs.

Completion tracking: the windows name the items behind each window (see
:mod:`nanostream.windows`). The other stateful operators rely on the runtime's rule
that an output covers the items taken since the previous output, which is exact for
them: each emits an output right after taking the items it derives from (``batch``,
``scan``, ``stateful_map``, ``take``, ``take_while``, ``skip``, ``distinct``,
``rate_limit``), or once at the end covering everything (``reduce``). An item that
produces nothing (skipped by ``skip`` or ``on_error``, a ``distinct`` duplicate, the
item that ends ``take_while``) is acknowledged together with the next output, or
when the stage ends.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import toolz

from ._runtime import TICK
from ._stage import TRANSFORM, Stage, _fn_name
from .windows import (
    _SKIP,
    Window,
    _check_callable,
    _check_count,
    _check_seconds,
    _Errors,
    _getter,
    _islices,
    _key_of,
    _policy_kwargs,
    _regroup,
    _stage,
    _stage_options,
    _tick_for,
    session,
    sliding,
    tumbling,
)

__all__ = [
    "Window",
    "batch",
    "distinct",
    "filter",
    "filter_map",
    "flat_map",
    "flatten",
    "rate_limit",
    "reduce",
    "scan",
    "session",
    "skip",
    "sliding",
    "stateful_map",
    "take",
    "take_while",
    "tap",
    "tumbling",
]

_builtin_filter = filter


class _NoInitial:
    """The ``initial`` of scan/reduce when none is given (pickles as itself)."""

    def __repr__(self) -> str:
        return "<no initial>"

    def __reduce__(self) -> str:
        return "_NOTHING"

    def __copy__(self) -> _NoInitial:
        return self

    def __deepcopy__(self, memo: Any) -> _NoInitial:
        return self


_NOTHING: Any = _NoInitial()
_NO_USER_CODE = ("name", "queue_size")  # options of operators that call no user function


# -- per-item operators ----------------------------------------------------------------

def filter(predicate: Callable[[Any], Any], **options: Any) -> Stage:
    """Keep the items for which ``predicate(item)`` is true.

    Takes the stage options of a transform (``workers``, ``on_error``, ...).

    >>> import nanostream as ns
    >>> list(range(6) | ns.filter(lambda x: x % 2))
    [1, 3, 5]
    """
    if not callable(predicate):
        raise TypeError(f"filter needs a callable predicate, got {type(predicate).__name__} "
                        f"{predicate!r}")
    options.setdefault("name", f"filter({_fn_name(predicate)})")
    return Stage(predicate, TRANSFORM, options, internal={"flavor": "filter"})


def _per_item(op: str, fn: Any, options: dict[str, Any]) -> None:
    if not callable(fn):
        raise TypeError(f"{op} needs a callable, got {type(fn).__name__} {fn!r}")
    if options.get("stream"):
        raise ValueError(f"{op} is a per-item operator; stream=True does not apply")
    options.setdefault("name", f"{op}({_fn_name(fn)})")


def flat_map(fn: Callable[[Any], Iterable[Any]], **options: Any) -> Stage:
    """Replace each item by the items of the iterable ``fn(item)`` (zero or more).

    Takes the stage options of a transform (``workers``, ``on_error``, ...).

    >>> import nanostream as ns
    >>> list(["a b", "", "c"] | ns.flat_map(str.split))
    ['a', 'b', 'c']
    """
    _per_item("flat_map", fn, options)
    return Stage(fn, TRANSFORM, options, internal={"flavor": "flatmap"})


class _FilterMap:
    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def __call__(self, x: Any) -> tuple[Any, ...]:
        r = self.fn(x)
        return () if r is None else (r,)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_FilterMap, (self.fn,))


def filter_map(fn: Callable[[Any], Any], **options: Any) -> Stage:
    """Map with ``fn`` and drop the ``None`` results (parse-or-skip in one step).

    Takes the stage options of a transform (``workers``, ``on_error``, ...).

    >>> import nanostream as ns
    >>> list(["1", "x", "3"] | ns.filter_map(lambda s: int(s) if s.isdigit() else None))
    [1, 3]
    """
    _per_item("filter_map", fn, options)
    return Stage(_FilterMap(fn), TRANSFORM, options, internal={"flavor": "flatmap"})


def _identity(x: Any) -> Any:
    return x


def flatten(**options: Any) -> Stage:
    """Replace each item, an iterable, by its elements (``flat_map`` of the identity).

    >>> import nanostream as ns
    >>> list([[1, 2], [], [3]] | ns.flatten())
    [1, 2, 3]
    """
    options.setdefault("name", "flatten")
    _per_item("flatten", _identity, options)
    return Stage(_identity, TRANSFORM, options, internal={"flavor": "flatmap"})


class _Tap:
    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def __call__(self, x: Any) -> Any:
        self.fn(x)
        return x

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Tap, (self.fn,))


def tap(fn: Callable[[Any], Any], **options: Any) -> Stage:
    """Call ``fn(item)`` for its side effect (logging, metrics) and pass the item on.

    ``fn``'s return value is ignored; if it raises, ``on_error`` applies to the item.

    >>> import nanostream as ns
    >>> seen = []
    >>> list([1, 2] | ns.tap(seen.append)), seen
    ([1, 2], [1, 2])
    """
    _per_item("tap", fn, options)
    return Stage(_Tap(fn), TRANSFORM, options)


# -- batching ----------------------------------------------------------------------------

def _batch(items: Iterable[Any], size: int, timeout: float | None = None,
           clock: Callable[[], float] | None = None, ctx: Any = None,
           lists: bool = False) -> Iterator[list[Any]]:
    if lists:  # an untracked run without timeout: the input comes as lists
        yield from _regroup(items, size)
        return
    if timeout is None:
        yield from _islices(iter(items), size)
        return
    now = clock or time.monotonic
    buf: list[Any] = []
    first = 0.0
    for x in items:
        if x is TICK:
            if buf and now() - first >= timeout:
                yield buf
                buf = []
            continue
        if not buf:
            first = now()
            buf.append(x)
            if size == 1:
                yield buf
                buf = []
            continue
        buf.append(x)
        if len(buf) >= size or now() - first >= timeout:
            yield buf
            buf = []
    if buf:
        yield buf


def batch(size: int, timeout: float | None = None, *,
          clock: Callable[[], float] | None = None, **options: Any) -> Stage:
    """Group items into lists of ``size``; with ``timeout``, also flush a batch
    ``timeout`` seconds after its first item, whichever comes first.

    A partial batch is flushed at end of stream (and on ``stop(drain=True)``). The
    timeout is read from ``clock`` (default ``time.monotonic``) when an item
    arrives or, when none does, a few times per timeout; an item arriving after
    the timeout joins the batch it closes. Options: ``name``, ``queue_size``.

    >>> import nanostream as ns
    >>> list(range(7) | ns.batch(3))
    [[0, 1, 2], [3, 4, 5], [6]]
    """
    op = "batch"
    opts = _stage_options(op, options, ("size", "timeout", "clock"), _NO_USER_CODE)
    _check_count("size", op, size)
    if timeout is None:
        if clock is not None:
            raise ValueError("batch: clock= only matters with timeout=...; pass a timeout "
                             "or drop clock")
        return _stage(_batch, opts, {"size": size}, lists=True)
    _check_seconds("timeout", op, timeout)
    _check_callable("clock", op, clock)
    return _stage(_batch, opts, {"size": size, "timeout": timeout, "clock": clock},
                  tick=_tick_for(timeout))


# -- state ---------------------------------------------------------------------------------

def _scan(items: Iterable[Any], fn: Callable[[Any, Any], Any], initial: Any = _NOTHING,
          key: Callable[[Any], Any] | None = None,
          name: str = "scan", on_error: Any = "raise", ctx: Any = None) -> Iterator[Any]:
    fail = _Errors(name, on_error, ctx)
    if key is None:
        acc = copy.deepcopy(initial)
        for x in items:
            if acc is _NOTHING:
                acc = x
            else:
                try:
                    acc = fn(acc, x)
                except Exception as exc:
                    fail(x, exc)
                    continue
            yield acc
        return
    state: dict[Any, Any] = {}
    for x in items:
        k = _key_of(key, fail, x)
        if k is _SKIP:
            continue
        acc = state.get(k, _NOTHING)
        if acc is _NOTHING:
            if initial is _NOTHING:
                state[k] = x
                yield (k, x)
                continue
            acc = copy.deepcopy(initial)
        try:
            acc = fn(acc, x)
        except Exception as exc:
            fail(x, exc)
            continue
        state[k] = acc
        yield (k, acc)


def _check_fn(op: str, fn: Any) -> None:
    if not callable(fn):
        raise TypeError(f"{op} needs a callable (accumulator, item) -> accumulator, got "
                        f"{type(fn).__name__} {fn!r}")


def scan(fn: Callable[[Any, Any], Any], initial: Any = _NOTHING, *,
         key: Callable[[Any], Any] | str | int | None = None, **options: Any) -> Stage:
    """Running accumulation: emit ``acc = fn(acc, item)`` after every item.

    Starts from ``initial`` (deep-copied for each run and each key), or from the
    first item, which is then emitted as is (``itertools.accumulate`` without the
    leading ``initial``). With ``key=`` (a function, or a dict key / index) each key
    has its own accumulator and the stage emits ``(key, acc)`` pairs. If ``fn``
    raises, ``on_error`` applies: ``"skip"`` leaves the accumulator unchanged.

    >>> import nanostream as ns
    >>> list([3, 1, 4, 1] | ns.scan(lambda acc, x: acc + x, 0))
    [3, 4, 8, 9]
    """
    op = "scan"
    opts = _stage_options(op, options, ("fn", "initial", "key"))
    _check_fn(op, fn)
    key = _getter("key", op, key)
    return _stage(_scan, opts, {"fn": fn, "initial": initial, "key": key,
                                **_policy_kwargs(opts, op)})


def _stateful_map(items: Iterable[Any], fn: Callable[[Any, Any], Any],
                  key: Callable[[Any], Any] | None = None,
                  name: str = "stateful_map", on_error: Any = "raise",
                  ctx: Any = None) -> Iterator[Any]:
    fail = _Errors(name, on_error, ctx)
    states: dict[Any, Any] = {}
    for x in items:
        k = None if key is None else _key_of(key, fail, x)
        if k is _SKIP:
            continue
        try:
            new, out = fn(states.get(k), x)
        except Exception as exc:
            fail(x, exc)
            continue
        if new is None:
            states.pop(k, None)
        else:
            states[k] = new
        yield out if key is None else (k, out)


def stateful_map(fn: Callable[[Any, Any], tuple[Any, Any]], *,
                 key: Callable[[Any], Any] | str | int | None = None,
                 **options: Any) -> Stage:
    """Map with state: ``state, out = fn(state, item)``, emitting ``out``.

    The state starts as ``None``; returning ``None`` as the new state forgets it
    (per key with ``key=``, which also makes the stage emit ``(key, out)`` pairs).
    The most general stateful operator: dedup windows, change detection, sessions
    of your own.

    >>> import nanostream as ns
    >>> list([5, 7, 6] | ns.stateful_map(lambda prev, x: (x, None if prev is None else x - prev)))
    [None, 2, -1]
    """
    op = "stateful_map"
    opts = _stage_options(op, options, ("fn", "key"))
    if not callable(fn):
        raise TypeError(f"stateful_map needs a callable (state, item) -> (state, output), got "
                        f"{type(fn).__name__} {fn!r}")
    key = _getter("key", op, key)
    return _stage(_stateful_map, opts, {"fn": fn, "key": key, **_policy_kwargs(opts, op)})


def _reduce(items: Iterable[Any], fn: Callable[[Any, Any], Any], initial: Any = _NOTHING,
            key: Callable[[Any], Any] | None = None,
            name: str = "reduce", on_error: Any = "raise", ctx: Any = None) -> Iterator[Any]:
    if key is None:
        acc = copy.deepcopy(initial)
        for acc in _scan(items, fn, initial, None, name, on_error, ctx):  # noqa: B007
            pass
        if acc is not _NOTHING:
            yield acc
        return
    state: dict[Any, Any] = {}
    for k, acc in _scan(items, fn, initial, key, name, on_error, ctx):
        state[k] = acc
    yield from state.items()


def reduce(fn: Callable[[Any, Any], Any], initial: Any = _NOTHING, *,
           key: Callable[[Any], Any] | str | int | None = None, **options: Any) -> Stage:
    """Fold the whole stream and emit the result once, at end of stream.

    As ``functools.reduce``: from ``initial``, or from the first item (an empty
    stream then emits nothing). With ``key=``, emits one ``(key, acc)`` pair per
    key, in order of first appearance. On an endless stream it emits on
    ``stop(drain=True)``; use :func:`scan` or a window for running results.

    >>> import nanostream as ns
    >>> list(["a", "b", "a"] | ns.reduce(lambda n, _: n + 1, 0, key=lambda w: w))
    [('a', 2), ('b', 1)]
    """
    op = "reduce"
    opts = _stage_options(op, options, ("fn", "initial", "key"))
    _check_fn(op, fn)
    key = _getter("key", op, key)
    return _stage(_reduce, opts, {"fn": fn, "initial": initial, "key": key,
                              **_policy_kwargs(opts, op)})


# -- taking and skipping ------------------------------------------------------------------

def _take(items: Iterable[Any], n: int, ctx: Any = None) -> Iterator[Any]:
    # Returning before the input ends tells the runtime this stage wants no more:
    # it discards its input and the sources upstream stop.
    yield from toolz.take(n, items)


def take(n: int, **options: Any) -> Stage:
    """Pass the first ``n`` items on, then end the stream.

    Ends early: once ``n`` items went through, the stage stops taking input and
    the sources feeding it stop cleanly (so ``take`` works on endless sources).

    >>> import nanostream as ns
    >>> list(range(10**9) | ns.take(3))
    [0, 1, 2]
    """
    op = "take"
    opts = _stage_options(op, options, ("n",), _NO_USER_CODE)
    _check_count("n", op, n, low=0)
    return _stage(_take, opts, {"n": n})


def _take_while(items: Iterable[Any], predicate: Callable[[Any], Any],
                name: str = "take_while", on_error: Any = "raise",
                ctx: Any = None) -> Iterator[Any]:
    fail = _Errors(name, on_error, ctx)
    for x in items:
        try:
            ok = predicate(x)
        except Exception as exc:
            fail(x, exc)
            continue
        if not ok:
            return
        yield x


def take_while(predicate: Callable[[Any], Any], **options: Any) -> Stage:
    """Pass items on while ``predicate(item)`` is true; end the stream at the first
    item for which it is false (that item is dropped), stopping the sources as
    :func:`take` does.

    >>> import nanostream as ns
    >>> list([1, 2, 5, 1] | ns.take_while(lambda x: x < 3))
    [1, 2]
    """
    op = "take_while"
    opts = _stage_options(op, options, ("predicate",))
    if not callable(predicate):
        raise TypeError(f"take_while needs a callable predicate, got "
                        f"{type(predicate).__name__} {predicate!r}")
    return _stage(_take_while, opts, {"predicate": predicate, **_policy_kwargs(opts, op)})


def _skip(items: Iterable[Any], n: int, ctx: Any = None) -> Iterator[Any]:
    return toolz.drop(n, items)


def skip(n: int, **options: Any) -> Stage:
    """Drop the first ``n`` items and pass the rest on (``toolz.drop``).

    >>> import nanostream as ns
    >>> list(range(5) | ns.skip(2))
    [2, 3, 4]
    """
    op = "skip"
    opts = _stage_options(op, options, ("n",), _NO_USER_CODE)
    _check_count("n", op, n, low=0)
    return _stage(_skip, opts, {"n": n})


def _distinct(items: Iterable[Any], key: Callable[[Any], Any] | None = None,
              maxsize: int | None = None,
              name: str = "distinct", on_error: Any = "raise",
              ctx: Any = None) -> Iterator[Any]:
    fail = _Errors(name, on_error, ctx)
    seen: dict[Any, None] = {}  # insertion-ordered: the oldest key is evicted first
    for x in items:
        try:
            k = x if key is None else key(x)
            if k in seen:
                if maxsize is not None:  # refresh: evict the least recently seen
                    del seen[k]
                    seen[k] = None
                continue
        except Exception as exc:
            fail(x, exc)
            continue
        seen[k] = None
        if maxsize is not None and len(seen) > maxsize:
            del seen[next(iter(seen))]
        yield x


def distinct(key: Callable[[Any], Any] | str | int | None = None, *,
             maxsize: int | None = None, **options: Any) -> Stage:
    """Drop items seen before (by ``key(item)`` if given), as ``toolz.unique``.

    Remembers every key, so memory grows with the number of distinct keys; with
    ``maxsize`` it remembers only the ``maxsize`` most recently seen keys (an item
    whose key was forgotten passes again). Unhashable items need a ``key``.

    >>> import nanostream as ns
    >>> list(["a", "B", "b", "a"] | ns.distinct(key=str.lower))
    ['a', 'B']
    """
    op = "distinct"
    opts = _stage_options(op, options, ("key", "maxsize"))
    key = _getter("key", op, key)
    if maxsize is not None:
        _check_count("maxsize", op, maxsize)
    return _stage(_distinct, opts, {"key": key, "maxsize": maxsize,
                                    **_policy_kwargs(opts, op)})


# -- pacing ----------------------------------------------------------------------------------

def _rate_limit(items: Iterable[Any], per_second: float, burst: int = 1,
                clock: Callable[[], float] | None = None,
                sleep: Callable[[float], Any] | None = None, ctx: Any = None) -> Iterator[Any]:
    now = clock or time.monotonic
    if sleep is None:
        # in a run, ctx.sleep: passes on what is ready first, and an abort wakes it up
        nap = time.sleep if ctx is None else ctx.sleep
    elif ctx is None:
        nap = sleep
    else:
        def nap(seconds: float) -> None:
            ctx.sleep(0)  # pass on what is ready (and give up if the run aborted)
            sleep(seconds)
    tokens = float(burst)
    last: float | None = None
    for x in items:
        t = now()
        if last is not None:
            tokens = min(float(burst), tokens + (t - last) * per_second)
        last = t
        if tokens < 1:
            nap((1 - tokens) / per_second)
            t = now()
            tokens = max(1.0, min(float(burst), tokens + (t - last) * per_second))
            last = t
        tokens -= 1
        yield x


def rate_limit(per_second: float, *, burst: int = 1, clock: Callable[[], float] | None = None,
               sleep: Callable[[float], Any] | None = None, **options: Any) -> Stage:
    """Pass at most ``per_second`` items per second on, waiting as needed (a token
    bucket holding up to ``burst`` items).

    Waiting applies back-pressure upstream; nothing is dropped. In a run the stage
    waits in a way that a stop without drain (or a failure elsewhere) interrupts at
    once. ``clock`` and ``sleep`` (default ``time.monotonic`` / that abortable wait,
    ``time.sleep`` when the stage is called directly) can be replaced for tests in
    virtual time. Options: ``name``, ``queue_size``.

    >>> import nanostream as ns
    >>> list(range(3) | ns.rate_limit(1000))
    [0, 1, 2]
    """
    op = "rate_limit"
    opts = _stage_options(op, options, ("per_second", "burst", "clock", "sleep"), _NO_USER_CODE)
    if not isinstance(per_second, (int, float)) or isinstance(per_second, bool):
        raise TypeError(f"rate_limit per_second must be a number of items per second, got "
                        f"{type(per_second).__name__} {per_second!r}")
    if not 0 < per_second < float("inf"):
        raise ValueError(f"rate_limit per_second must be a finite number > 0, got {per_second!r}")
    _check_count("burst", op, burst)
    _check_callable("clock", op, clock)
    _check_callable("sleep", op, sleep)
    return _stage(_rate_limit, opts, {"per_second": per_second, "burst": burst,
                                      "clock": clock, "sleep": sleep})
