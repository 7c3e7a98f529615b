"""Windows: tumbling, sliding and session windows by count, processing time or event time.

Every window operator is a ``stream=True`` transform (one worker, state kept across
items) that emits one :class:`Window` per window: ``Window(key, start, end, value)``
where ``value`` is the list of the window's items, or ``agg(items)`` when an ``agg``
function is given.

* **By count** (``size=``): ``start``/``end`` are item positions (per key), ``end``
  exclusive, so ``end - start`` is the number of items in the window.
* **By processing time** (``seconds=`` without ``timestamp=``): an item's time is
  ``clock()`` when the stage takes it; a window is emitted as soon as the clock
  passes its end (checked on every item, and on idle "ticks" when nothing arrives).
* **By event time** (``seconds=`` with ``timestamp=``): an item's time comes from
  the item. The *watermark* is the largest timestamp seen minus ``lateness``; a
  window is emitted once the watermark reaches its end. An item whose windows have
  all been emitted already is **late**: it is dropped (counted, and logged once at
  end of stream), or handed to ``on_late(item)``, or fails the run with
  ``on_late="raise"``.

At end of stream (including ``Run.stop(drain=True)``) every open window is emitted,
partial ones included.

Completion tracking is exact: an item from a tracking source counts as handled once
every window holding it has been handled downstream, and an item that ends in no
window (late, or its ``key`` / ``timestamp`` skipped by ``on_error``) once it is
dropped. Keyed, sliding and time windows name the items behind each window they
emit (the runtime's ``explicit_tracking`` hook); an unkeyed ``tumbling(size=n)``
emits each window right after taking its last item, which the runtime's default
rule (an output covers the items taken since the previous one) already gets right.

Speed: in a run without tracking, unkeyed count windows take their input as the
lists the runtime moves between threads (``internal={"lists": True}``) and slice
their windows out of them, with no Python work per item.
"""

from __future__ import annotations

import difflib
import functools
import heapq
import inspect
import logging
import math
import operator
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, count, islice, repeat
from typing import Any, NamedTuple

from ._errors import StageError
from ._runtime import TICK
from ._stage import DEFAULTS, TRANSFORM, Stage

__all__ = ["Window", "session", "sliding", "tumbling"]

log = logging.getLogger("nanostream")

_INF = math.inf
_SKIP: Any = object()  # a value the error policy dropped


class Window(NamedTuple):
    """What a window operator emits.

    ``key`` is the window's key (``None`` without ``key=``), ``start``/``end`` its
    bounds (``end`` exclusive: item positions for count windows, times for time
    windows) and ``value`` the list of its items, or ``agg(items)``.

    >>> import nanostream as ns
    >>> list(range(5) | ns.tumbling(size=2))
    [Window(key=None, start=0, end=2, value=[0, 1]), Window(key=None, start=2, end=4, value=[2, 3]), Window(key=None, start=4, end=5, value=[4])]
    """

    key: Any
    start: Any
    end: Any
    value: Any


# Window(*fields) without the Python-level __new__ of a NamedTuple: for the hot loops
_new_window = functools.partial(tuple.__new__, Window)


# -- shared helpers (also used by nanostream.operators) ----------------------------

class _Errors:
    """Applies the stage's ``on_error`` to one item inside a stream stage.

    The runtime cannot apply the policy per item in a ``stream=True`` stage, so the
    operators do it themselves. In a run, ``ctx.item_error`` does it: the stage's
    *effective* name and ``on_error`` (also after ``with_options``), the error counted
    in the report, a :class:`StageError` naming the item under ``"raise"``. When the
    stage function is called directly (no ``ctx``), the name and policy the operator
    was built with apply: ``"raise"`` raises the StageError, ``"skip"`` drops the
    item, a callable gets ``(item, exc)``.
    """

    __slots__ = ("ctx", "name", "policy")

    def __init__(self, name: str, policy: Any, ctx: Any = None) -> None:
        self.name = name if ctx is None else ctx.name
        self.policy = policy
        self.ctx = ctx

    def __call__(self, item: Any, exc: BaseException) -> None:
        if self.ctx is not None:
            self.ctx.item_error(exc, item)
            return
        policy = self.policy
        if policy == "raise":
            raise StageError(self.name, item, exc)
        if policy == "skip":
            log.debug("stage %r skipped item %r: %r", self.name, item, exc)
            return
        try:
            policy(item, exc)
        except Exception as cb_exc:
            raise StageError(self.name, item, cb_exc,
                             detail="the on_error callback raised") from cb_exc


_NO_TOKENS: tuple[Any, ...] = ()


def _release_nothing(tokens: Iterable[Any]) -> None:
    """``release`` for a stage function called directly: there are no tokens."""


def _paired(items: Iterable[Any], ticks: bool = False) -> Iterator[Any]:
    """Plain input as the ``(item, token)`` pairs of explicit tracking (no tokens);
    ``TICK`` markers, when the stage takes them, stay as they are."""
    if not ticks:
        return zip(items, repeat(None))
    return (x if x is TICK else (x, None) for x in items)


def _direct(core: Iterator[tuple[Any, Any]]) -> Iterator[Any]:
    """The outputs of an explicitly tracking stage function, without their tokens."""
    for w, _ in core:
        yield w


def _getter(what: str, op: str, value: Any) -> Callable[[Any], Any] | None:
    """A callable for ``key=`` / ``timestamp=``: a function, or a dict key / index."""
    if value is None or callable(value):
        return value
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return operator.itemgetter(value)
    raise TypeError(f"{op} {what} must be a function of the item, or a dict key / index "
                    f"(str or int) to look up in it, got {type(value).__name__} {value!r}")


def _check_callable(what: str, op: str, value: Any) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{op} {what} must be callable, got {type(value).__name__} {value!r}")


def _check_count(what: str, op: str, value: Any, low: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{op} {what} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{op} {what} must be >= {low}, got {value}")


def _check_seconds(what: str, op: str, value: Any, *, zero_ok: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{op} {what} must be a number of seconds, got "
                        f"{type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{op} {what} must be a finite number of seconds {bound}, got {value!r}")


def _tick_for(seconds: float) -> float:
    """How long (real seconds) a time-based stage waits for input before it looks at
    its clock anyway: a fraction of its shortest duration, within [1 ms, 100 ms]."""
    return min(0.1, max(0.001, seconds / 4))


_STREAM_OPTIONS = ("name", "queue_size", "on_error")


def _stage_options(op: str, options: dict[str, Any], params: Iterable[str],
                   allowed: tuple[str, ...] = _STREAM_OPTIONS) -> dict[str, Any]:
    """Check the stage options given to a stateful operator; return the Stage options."""
    for k in options:
        if k in allowed:
            continue
        if k in DEFAULTS:
            why = ("calls no function of yours, so on_error does not apply" if k == "on_error"
                   else "keeps state across items, so it runs in one worker; "
                        f"option {k!r} does not apply")
            raise ValueError(f"{op} {why} (options it takes: {', '.join(allowed)})")
        close = difflib.get_close_matches(k, [*params, *allowed], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TypeError(f"{op}() got an unexpected keyword argument {k!r}{hint}")
    out = {"name": op, **options, "stream": True}
    return out


def _stage(fn: Callable[..., Any], options: dict[str, Any], kwargs: dict[str, Any],
           tick: float | None = None, explicit: bool = False, lists: bool = False) -> Stage:
    """A stream stage running ``fn(items, ctx=..., **kwargs)``.

    ``fn`` gets the runtime's stage context (``ctx``: the effective name and
    ``on_error``, abortable ``sleep``; its outputs are buffered, so emitting is
    cheap). With ``explicit``, it also does its own completion tracking: it takes
    ``(item, token)`` pairs, yields ``(output, tokens)`` pairs and calls
    ``release(tokens)`` once an item will be in no further output. With ``lists``,
    an untracked run calls it with ``lists=True`` and the input as lists of items
    (so it can slice them instead of taking item by item); tracked, it takes items
    as above.

    The stage's kwargs (shown in its repr) are the arguments the user set; the
    stage name and error policy the function reports with when called directly, and
    arguments left at their defaults, are bound in a ``functools.partial`` instead.
    """
    defaults = {p.name: p.default for p in inspect.signature(fn).parameters.values()}
    hidden = {k: kwargs[k] for k in ("name", "on_error") if k in kwargs}
    shown = {k: v for k, v in kwargs.items()
             if k not in hidden and (k not in defaults or defaults[k] is not v)}
    internal: dict[str, Any] = {"context": True}
    if tick is not None:
        internal["tick"] = tick
    if explicit:
        internal["explicit_tracking"] = True
    if lists:
        internal["lists"] = True
    return Stage(functools.partial(fn, **hidden), TRANSFORM, options, kwargs=shown,
                 internal=internal)


def _policy_kwargs(options: dict[str, Any], op: str) -> dict[str, Any]:
    """The name and on_error a stream function needs to report per-item errors."""
    return {"name": options.get("name") or op, "on_error": options.get("on_error", "raise")}


def _as_time(ts: Any) -> float:
    if isinstance(ts, (int, float)) and not isinstance(ts, bool) and ts == ts:
        return ts
    hint = "; for a datetime, return .timestamp()" if hasattr(ts, "timestamp") else ""
    raise TypeError(f"timestamp must return a number (e.g. seconds since the epoch), got "
                    f"{type(ts).__name__} {ts!r}{hint}")


class _Late:
    """What happens to a late item: ``"drop"`` (counted, logged once at the end),
    ``"raise"``, or a callable given the item."""

    __slots__ = ("count", "lateness", "name", "policy")

    def __init__(self, name: str, policy: Any, lateness: float, ctx: Any = None) -> None:
        self.name = name if ctx is None else ctx.name
        self.policy = policy
        self.lateness = lateness
        self.count = 0

    def __call__(self, item: Any, ts: float, watermark: float) -> None:
        self.count += 1
        policy = self.policy
        if policy == "drop":
            log.debug("stage %r dropped late item %r (timestamp %r, watermark %r)",
                      self.name, item, ts, watermark)
            return
        if policy == "raise":
            raise StageError(self.name, item, ValueError(
                f"late item: timestamp {ts!r} falls in windows already emitted (watermark "
                f"{watermark!r} = newest timestamp - lateness {self.lateness!r}); raise "
                f"lateness, or pass on_late='drop' or a callable"))
        try:
            policy(item)
        except Exception as exc:
            raise StageError(self.name, item, exc,
                             detail="the on_late callback raised") from exc

    def summary(self) -> None:
        if self.count and self.policy == "drop":
            log.warning("stage %r dropped %d late item(s) (older than its windows allow, "
                        "lateness=%r); pass on_late=... to keep them", self.name, self.count,
                        self.lateness)


def _make(agg: Callable[[list[Any]], Any] | None, fail: _Errors,
          key: Any, start: Any, end: Any, items: list[Any]) -> Any:
    if agg is None:
        return Window(key, start, end, items)
    try:
        return Window(key, start, end, agg(items))
    except Exception as exc:
        fail(Window(key, start, end, items), exc)
        return _SKIP


def _key_of(key: Callable[[Any], Any] | None, fail: _Errors, x: Any) -> Any:
    try:
        return key(x)  # type: ignore[misc]
    except Exception as exc:
        fail(x, exc)
        return _SKIP


# -- count windows ------------------------------------------------------------------
#
# Completion tracking. Each window emitted names the tokens of its items; an item's
# token is released once the last window that can hold it has been emitted (or
# skipped), or at once when the item is dropped. Untracked, every token is None and
# no token list is ever built.

def _chunks(items: Iterable[Any], size: int, step: int | None = None,
            key: None = None, agg: Callable[[list[Any]], Any] | None = None,
            name: str = "tumbling", on_error: Any = "raise", ctx: Any = None,
            lists: bool = False) -> Iterator[Window]:
    """Unkeyed tumbling count windows (``step`` is None or ``size``; no ``key``):
    consecutive chunks, each emitted right after its last item is pulled
    (toolz.partition_all holds a chunk back until the next one is full), so the
    runtime's default tracking rule is exact for them. With ``lists`` (an untracked
    run) the input comes as lists, cut into windows by slicing."""
    fail = _Errors(name, on_error, ctx)
    start = 0
    for chunk in _regroup(items, size) if lists else _islices(iter(items), size):
        end = start + len(chunk)
        if agg is None:
            yield _new_window((None, start, end, chunk))
        else:
            try:
                value = agg(chunk)
            except Exception as exc:
                fail(Window(None, start, end, chunk), exc)
            else:
                yield _new_window((None, start, end, value))
        start = end


def _islices(it: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` items of ``it`` (the last may be short)."""
    while True:
        chunk = list(islice(it, size))
        if not chunk:
            return
        yield chunk


def _regroup(lists: Iterable[list[Any]], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` items (the last may be short) cut from an
    iterator of lists, by slicing: no Python work per item. The input lists are
    the caller's to give away (one may become the start of a chunk)."""
    buf: list[Any] = []
    for lst in lists:
        n = len(lst)
        i = 0
        if buf:
            i = size - len(buf)
            buf += lst[:i]
            if len(buf) < size:
                continue
            yield buf
            buf = []
        while n - i >= size:
            yield lst[i:i + size]
            i += size
        if i < n:
            buf = lst[i:] if i else lst
    if buf:
        yield buf


def _count_windows(items: Iterable[Any], size: int, step: int | None = None,
                   key: Callable[[Any], Any] | None = None,
                   agg: Callable[[list[Any]], Any] | None = None,
                   name: str = "window", on_error: Any = "raise", ctx: Any = None,
                   release: Callable[[Iterable[Any]], None] | None = None,
                   lists: bool = False) -> Iterator[Any]:
    """Keyed and/or sliding count windows (explicit tracking). With ``lists`` (an
    untracked run of unkeyed sliding windows) the input comes as lists, windows are
    sliced from them and nothing is tracked."""
    fail = _Errors(name, on_error, ctx)
    step = size if step is None else step
    if lists:
        if key is None:
            return _sliding_lists(items, size, step, agg, fail)
        items = chain.from_iterable(items)
    if release is None:  # called directly, or untracked lists
        return _direct(_count_core(_paired(items), size, step, key, agg, fail,
                                   _release_nothing))
    return _count_core(items, size, step, key, agg, fail, release)


def _sliding_lists(lists: Iterable[list[Any]], size: int, step: int,
                   agg: Callable[[list[Any]], Any] | None, fail: _Errors) -> Iterator[Any]:
    """Unkeyed count windows sliced from lists of items (the rules of _count_core)."""
    buf: list[Any] = []  # the items from the next window's start on (fewer than size)
    start = 0            # the position of buf[0]
    covered = 0          # the end of the last window emitted
    for lst in lists:
        data = buf + lst if buf else lst
        n = len(data)
        off = 0
        while n - off >= size:
            first = start + off
            w = _make(agg, fail, None, first, first + size, data[off:off + size])
            if w is not _SKIP:
                yield w
            covered = first + size
            off += step
        buf = data[off:] if off else data
        start += off
    # end of stream: the next window goes out partial if it has items no emitted
    # window holds
    end = start + len(buf)
    if buf and end > covered:
        w = _make(agg, fail, None, start, end, buf)
        if w is not _SKIP:
            yield w


def _count_core(pairs: Iterable[Any], size: int, step: int,
                key: Callable[[Any], Any] | None, agg: Callable[[list[Any]], Any] | None,
                fail: _Errors, release: Callable[[Iterable[Any]], None]
                ) -> Iterator[tuple[Any, Any]]:
    # per key: [items seen, buffer of the newest items, tokens]. The tokens are those
    # of the items still due in a window: a list for tumbling windows; for sliding
    # ones a deque of (position, token), positions from the next window's start on.
    states: dict[Any, list[Any]] = {}
    tumbling = step == size
    for x, tok in pairs:
        if key is None:
            k = None
        else:
            try:
                k = key(x)
            except Exception as exc:
                fail(x, exc)
                if tok is not None:
                    release((tok,))
                continue
        st = states.get(k)
        if st is None:
            st = states[k] = [0, [] if tumbling else deque(maxlen=size), None]
        buf = st[1]
        buf.append(x)
        pos = st[0]
        st[0] = pos + 1
        if tok is not None:
            if st[2] is None:
                st[2] = [] if tumbling else deque()
            st[2].append(tok if tumbling else (pos, tok))
        first = pos - size + 1
        if first >= 0 and first % step == 0:
            toks = st[2]
            if tumbling:
                st[1] = []
                st[2] = None
                w = _make(agg, fail, k, first, pos + 1, buf)
                if w is not _SKIP:
                    yield w, toks or _NO_TOKENS
                if toks:
                    release(toks)
            else:
                w = _make(agg, fail, k, first, pos + 1, list(buf))
                if w is not _SKIP:
                    yield w, [t for _, t in toks] if toks else _NO_TOKENS
                if toks:  # items before the next window's start are in no further window
                    limit = first + step
                    gone = []
                    while toks and toks[0][0] < limit:
                        gone.append(toks.popleft()[1])
                    if gone:
                        release(gone)
    # End of stream: the first window not yet emitted, if it has items that no
    # emitted window holds, goes out partial.
    for k, (n, buf, toks) in states.items():
        last = n - 1
        done = (last - size + 1) // step + 1 if last >= size - 1 else 0
        start = done * step
        covered = (done - 1) * step + size if done else 0
        named = (toks if tumbling else [t for _, t in toks]) if toks else _NO_TOKENS
        if start <= last and last >= covered:
            w = _make(agg, fail, k, start, n, list(buf)[len(buf) - (n - start):])
            if w is not _SKIP:
                yield w, named
        if named:
            release(named)


# -- time windows (tumbling and sliding) ----------------------------------------------

def _last_index(ts: float, step: float) -> int:
    """The index j of the last window start ``j * step`` at or before ``ts``."""
    j = math.floor(ts / step)
    if (j + 1) * step <= ts:
        j += 1
    elif j * step > ts:
        j -= 1
    return j


def _time_windows(items: Iterable[Any], seconds: float, step: float | None = None,
                  timestamp: Callable[[Any], Any] | None = None, lateness: float = 0,
                  key: Callable[[Any], Any] | None = None,
                  agg: Callable[[list[Any]], Any] | None = None, on_late: Any = "drop",
                  clock: Callable[[], float] | None = None,
                  name: str = "window", on_error: Any = "raise", ctx: Any = None,
                  release: Callable[[Iterable[Any]], None] | None = None) -> Iterator[Any]:
    fail = _Errors(name, on_error, ctx)
    late = _Late(name, on_late, lateness, ctx)
    step = seconds if step is None else step
    if release is None:  # called directly
        return _direct(_time_core(_paired(items, timestamp is None), seconds, step, timestamp,
                                  lateness, key, agg, clock, fail, late, _release_nothing))
    return _time_core(items, seconds, step, timestamp, lateness, key, agg, clock, fail, late,
                      release)


def _time_core(pairs: Iterable[Any], size: float, step: float,
               timestamp: Callable[[Any], Any] | None, lateness: float,
               key: Callable[[Any], Any] | None, agg: Callable[[list[Any]], Any] | None,
               clock: Callable[[], float] | None, fail: _Errors, late: _Late,
               release: Callable[[Iterable[Any]], None]) -> Iterator[tuple[Any, Any]]:
    tumbling = step == size
    now = clock or time.monotonic
    windows: dict[Any, dict[Any, list[Any]]] = {}  # window index -> key -> items
    # tracked only: (window index, key) -> the tokens of its items, and, for sliding
    # windows, -> the tokens of the items whose last window it is
    named: dict[tuple[Any, Any], list[Any]] = {}
    finals: dict[tuple[Any, Any], list[Any]] = {} if not tumbling else named
    heap: list[Any] = []
    watermark = -_INF
    heappush = heapq.heappush

    def close(limit: float) -> Iterator[tuple[Any, Any]]:
        while heap and heap[0] * step + size <= limit:
            j = heapq.heappop(heap)
            start = j * step
            for k, members in windows.pop(j).items():
                w = _make(agg, fail, k, start, start + size, members)
                if not named:
                    if w is not _SKIP:
                        yield w, _NO_TOKENS
                    continue
                toks = named.pop((j, k), _NO_TOKENS)
                if w is not _SKIP:
                    yield w, toks
                done = toks if tumbling else finals.pop((j, k), None)
                if done:
                    release(done)

    def drop(tok: Any) -> None:
        if tok is not None:
            release((tok,))

    try:
        for pair in pairs:
            if timestamp is None:  # processing time: the clock, read as the item arrives
                ts = now()
                if ts > watermark:
                    watermark = ts
                if heap and heap[0] * step + size <= ts:
                    yield from close(ts)
                if pair is TICK:
                    continue
                x, tok = pair
            else:
                x, tok = pair
                try:
                    ts = timestamp(x)
                    if (ts.__class__ is not int and ts.__class__ is not float) or ts != ts:
                        ts = _as_time(ts)
                except Exception as exc:
                    fail(x, exc)
                    drop(tok)
                    continue
            if key is None:
                k = None
            else:
                k = _key_of(key, fail, x)
                if k is _SKIP:
                    drop(tok)
                    continue
            if tumbling:
                j = ts // size
                end = (j + 1) * size
                if end <= ts:  # float rounding put ts one window early
                    j += 1
                    end += size
                if end > watermark:
                    by_key = windows.get(j)
                    if by_key is None:
                        windows[j] = {k: [x]}
                        heappush(heap, j)
                    else:
                        members = by_key.get(k)
                        if members is None:
                            by_key[k] = [x]
                        else:
                            members.append(x)
                    if tok is not None:
                        named.setdefault((j, k), []).append(tok)
                else:
                    late(x, ts, watermark)
                    drop(tok)
            else:
                j = _last_index(ts, step)
                added = False
                while j * step + size > ts:
                    if j * step + size > watermark:
                        by_key = windows.get(j)
                        if by_key is None:
                            by_key = windows[j] = {}
                            heappush(heap, j)
                        members = by_key.get(k)
                        if members is None:
                            by_key[k] = [x]
                        else:
                            members.append(x)
                        if tok is not None:
                            named.setdefault((j, k), []).append(tok)
                            if not added:  # the newest window holding it closes last
                                finals.setdefault((j, k), []).append(tok)
                        added = True
                    j -= 1
                if not added:
                    late(x, ts, watermark)
                    drop(tok)
            if timestamp is not None and ts - lateness > watermark:
                watermark = ts - lateness
                if heap and heap[0] * step + size <= watermark:
                    yield from close(watermark)
        yield from close(_INF)
    finally:
        late.summary()


# -- session windows --------------------------------------------------------------------

class _Session:
    __slots__ = ("alive", "end", "items", "key", "merged", "start", "tokens")

    def __init__(self, key: Any, start: float, end: float, items: list[Any],
                 tokens: list[Any] | None) -> None:
        self.key = key
        self.start = start
        self.end = end
        self.items = items  # (arrival number, item) pairs
        self.tokens = tokens  # None while no item of it is tracked
        self.alive = True
        self.merged = False


def _session_windows(items: Iterable[Any], gap: float,
                     timestamp: Callable[[Any], Any] | None = None, lateness: float = 0,
                     key: Callable[[Any], Any] | None = None,
                     agg: Callable[[list[Any]], Any] | None = None, on_late: Any = "drop",
                     clock: Callable[[], float] | None = None,
                     name: str = "session", on_error: Any = "raise", ctx: Any = None,
                     release: Callable[[Iterable[Any]], None] | None = None
                     ) -> Iterator[Any]:
    fail = _Errors(name, on_error, ctx)
    late = _Late(name, on_late, lateness, ctx)
    if release is None:  # called directly
        return _direct(_session_core(_paired(items, timestamp is None), gap, timestamp,
                                     lateness, key, agg, clock, fail, late, _release_nothing))
    return _session_core(items, gap, timestamp, lateness, key, agg, clock, fail, late, release)


def _session_core(pairs: Iterable[Any], gap: float, timestamp: Callable[[Any], Any] | None,
                  lateness: float, key: Callable[[Any], Any] | None,
                  agg: Callable[[list[Any]], Any] | None, clock: Callable[[], float] | None,
                  fail: _Errors, late: _Late, release: Callable[[Iterable[Any]], None]
                  ) -> Iterator[tuple[Any, Any]]:
    now = clock or time.monotonic
    sessions: dict[Any, list[_Session]] = {}   # per key, open sessions
    heap: list[tuple[float, int, _Session]] = []  # (end, seq, session); stale entries skipped
    seq = count()
    watermark = -_INF

    def close(limit: float) -> Iterator[tuple[Any, Any]]:
        while heap and heap[0][0] <= limit:
            end, _, s = heapq.heappop(heap)
            if not s.alive or s.end != end:
                continue
            s.alive = False
            open_ = sessions[s.key]
            open_.remove(s)
            if not open_:
                del sessions[s.key]
            members = sorted(s.items) if s.merged else s.items
            w = _make(agg, fail, s.key, s.start, s.end, [x for _, x in members])
            toks = s.tokens
            if w is not _SKIP:
                yield w, toks or _NO_TOKENS
            if toks:
                release(toks)

    try:
        for pair in pairs:
            if pair is TICK:
                if timestamp is None:
                    t = now()
                    if t > watermark:
                        watermark = t
                    yield from close(t)
                continue
            x, tok = pair
            if timestamp is None:
                ts = now()
                if ts > watermark:
                    watermark = ts
                yield from close(ts)
            else:
                try:
                    ts = _as_time(timestamp(x))
                except Exception as exc:
                    fail(x, exc)
                    if tok is not None:
                        release((tok,))
                    continue
            k = None if key is None else _key_of(key, fail, x)
            if k is _SKIP:
                if tok is not None:
                    release((tok,))
                continue
            n = next(seq)
            open_ = sessions.get(k)
            joined = [s for s in open_ if ts < s.end and ts + gap > s.start] if open_ else []
            if not joined:
                if ts + gap <= watermark:
                    late(x, ts, watermark)
                    if tok is not None:
                        release((tok,))
                else:
                    s = _Session(k, ts, ts + gap, [(n, x)], None if tok is None else [tok])
                    sessions.setdefault(k, []).append(s)
                    heapq.heappush(heap, (s.end, n, s))
            else:
                s = joined[0]
                if len(joined) > 1:  # the item bridges sessions: merge them into the first
                    for other in joined[1:]:
                        s.start = min(s.start, other.start)
                        s.end = max(s.end, other.end)
                        s.items.extend(other.items)
                        if other.tokens:
                            if s.tokens is None:
                                s.tokens = other.tokens
                            else:
                                s.tokens.extend(other.tokens)
                        other.alive = False
                        open_.remove(other)  # type: ignore[union-attr]
                    s.merged = True
                s.items.append((n, x))
                if tok is not None:
                    if s.tokens is None:
                        s.tokens = [tok]
                    else:
                        s.tokens.append(tok)
                s.start = min(s.start, ts)
                if ts + gap > s.end or len(joined) > 1:
                    s.end = max(s.end, ts + gap)
                    heapq.heappush(heap, (s.end, n, s))
            if timestamp is not None and ts - lateness > watermark:
                watermark = ts - lateness
                yield from close(watermark)
        yield from close(_INF)
    finally:
        late.summary()


# -- the public operators -----------------------------------------------------------------

_WINDOW_PARAMS = ("size", "step", "seconds", "gap", "timestamp", "lateness", "key", "agg",
                  "on_late", "clock")


def _window(op: str, *, size: Any, step: Any, seconds: Any, timestamp: Any, lateness: Any,
            key: Any, agg: Any, on_late: Any, clock: Any, options: dict[str, Any]) -> Stage:
    opts = _stage_options(op, options, _WINDOW_PARAMS)
    key = _getter("key", op, key)
    timestamp = _getter("timestamp", op, timestamp)
    _check_callable("agg", op, agg)
    _check_late(op, on_late)
    if (size is None) == (seconds is None):
        what = "both" if size is not None else "neither"
        raise TypeError(f"{op} needs exactly one of size= (a count of items) or seconds= "
                        f"(a duration), got {what}")
    if size is not None:
        _check_count("size", op, size)
        for param, value in (("timestamp", timestamp), ("clock", clock)):
            if value is not None:
                raise ValueError(f"{op}(size=...) counts items, so {param}= does not apply; "
                                 f"use {op}(seconds=..., {param}=...) for a window by time")
        _check_no_lateness(op, lateness, on_late, "a count window (size=) never has late items")
        if step is not None:
            _check_count("step", op, step)
            if step > size:
                raise ValueError(f"{op} step must be <= size (a step larger than the window "
                                 f"would skip items), got step={step}, size={size}")
        kwargs = {"size": size, "step": step, "key": key, "agg": agg,
                  **_policy_kwargs(opts, op)}
        if key is None and (step is None or step == size):
            return _stage(_chunks, opts, kwargs, lists=True)
        return _stage(_count_windows, opts, kwargs, explicit=True, lists=key is None)
    _check_seconds("seconds", op, seconds)
    if step is not None:
        _check_seconds("step", op, step)
        if step > seconds:
            raise ValueError(f"{op} step must be <= seconds (a step larger than the window "
                             f"would skip items), got step={step!r}, seconds={seconds!r}")
    kwargs = {"seconds": seconds, "step": step, "key": key, "agg": agg,
              **_policy_kwargs(opts, op)}
    return _timed(op, _time_windows, opts, kwargs, timestamp, lateness, on_late, clock,
                  min(seconds, step or seconds))


def _check_late(op: str, on_late: Any) -> None:
    if not (on_late in ("drop", "raise") or callable(on_late)):
        raise ValueError(f"{op} on_late must be 'drop', 'raise' or a callable taking the late "
                         f"item, got {on_late!r}")


def _check_no_lateness(op: str, lateness: Any, on_late: Any, why: str) -> None:
    if lateness != 0:
        raise ValueError(f"{op}: lateness= applies to event-time windows only ({why}); "
                         "pass timestamp=... to window by the items' own time, or drop lateness")
    if on_late != "drop":
        raise ValueError(f"{op}: on_late= applies to event-time windows only ({why}); "
                         "pass timestamp=... to window by the items' own time, or drop on_late")


def _timed(op: str, fn: Callable[..., Any], opts: dict[str, Any], kwargs: dict[str, Any],
           timestamp: Any, lateness: Any, on_late: Any, clock: Any, shortest: float) -> Stage:
    if timestamp is None:
        _check_no_lateness(op, lateness, on_late,
                           "in processing time an item's time is when it arrives")
        _check_callable("clock", op, clock)
        return _stage(fn, opts, {**kwargs, "clock": clock}, tick=_tick_for(shortest),
                      explicit=True)
    if clock is not None:
        raise ValueError(f"{op}: clock= applies to processing-time windows; with timestamp= "
                         "the time comes from the items, so drop clock")
    _check_seconds("lateness", op, lateness, zero_ok=True)
    return _stage(fn, opts, {**kwargs, "timestamp": timestamp, "lateness": lateness,
                             "on_late": on_late}, explicit=True)


def tumbling(size: int | None = None, *, seconds: float | None = None,
             timestamp: Callable[[Any], Any] | str | int | None = None, lateness: float = 0,
             key: Callable[[Any], Any] | str | int | None = None,
             agg: Callable[[list[Any]], Any] | None = None, on_late: Any = "drop",
             clock: Callable[[], float] | None = None, **options: Any) -> Stage:
    """Fixed-size, non-overlapping windows: every ``size`` items, or every ``seconds``.

    ``tumbling(size=n)`` emits a window every ``n`` items (per key with ``key=``);
    ``tumbling(seconds=s)`` windows by processing time (``clock=``, default
    ``time.monotonic``); add ``timestamp=`` (a function, or a dict key) for event
    time, with ``lateness=`` seconds of allowed lateness and ``on_late=``
    (``"drop"``, ``"raise"`` or a callable). Time windows are aligned to multiples
    of ``seconds``. Emits :class:`Window` records; ``agg=`` turns the items into
    the window's value. Stage options: ``name``, ``queue_size``, ``on_error``.

    >>> import nanostream as ns
    >>> [w.value for w in range(7) | ns.tumbling(size=3, agg=sum)]
    [3, 12, 6]
    """
    return _window("tumbling", size=size, step=None, seconds=seconds, timestamp=timestamp,
                   lateness=lateness, key=key, agg=agg, on_late=on_late, clock=clock,
                   options=options)


def sliding(size: int | None = None, step: float | None = None, *,
            seconds: float | None = None,
            timestamp: Callable[[Any], Any] | str | int | None = None, lateness: float = 0,
            key: Callable[[Any], Any] | str | int | None = None,
            agg: Callable[[list[Any]], Any] | None = None, on_late: Any = "drop",
            clock: Callable[[], float] | None = None, **options: Any) -> Stage:
    """Overlapping windows: the last ``size`` items every ``step`` items (default 1),
    or windows ``seconds`` long starting every ``step`` seconds.

    By count, ``sliding(size=n)`` emits each full window of ``n`` consecutive items
    (as ``toolz.sliding_window``); at end of stream a partial window is emitted
    only if it holds items no emitted window holds (so a stream shorter than ``n``
    still gives one window). By time, ``step`` is required and each item lands in
    every window that covers its time. Other arguments as :func:`tumbling`.

    >>> import nanostream as ns
    >>> [w.value for w in range(5) | ns.sliding(size=3)]
    [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
    """
    if seconds is not None and step is None:
        raise TypeError(f"sliding(seconds={seconds!r}) needs step=..., the seconds between "
                        f"window starts, e.g. sliding(seconds={seconds!r}, step={seconds!r} / 4)")
    if size is not None and step is None:
        step = 1
    return _window("sliding", size=size, step=step, seconds=seconds, timestamp=timestamp,
                   lateness=lateness, key=key, agg=agg, on_late=on_late, clock=clock,
                   options=options)


def session(gap: float, *, timestamp: Callable[[Any], Any] | str | int | None = None,
            lateness: float = 0, key: Callable[[Any], Any] | str | int | None = None,
            agg: Callable[[list[Any]], Any] | None = None, on_late: Any = "drop",
            clock: Callable[[], float] | None = None, **options: Any) -> Stage:
    """Windows of activity: a session ends once no item came for ``gap`` seconds.

    A window's ``start`` is its first item's time and ``end`` its last item's time
    plus ``gap``; an item joins a session when it is less than ``gap`` from it (an
    item that bridges two sessions merges them). Processing time by default
    (``clock=``), event time with ``timestamp=``; other arguments as
    :func:`tumbling`. Sessions are measured in time only (there is no count form).

    >>> import nanostream as ns
    >>> [w.value for w in [1, 2, 10, 11, 30] | ns.session(gap=5, timestamp=lambda t: t)]
    [[1, 2], [10, 11], [30]]
    """
    op = "session"
    opts = _stage_options(op, options, ("gap", *_WINDOW_PARAMS[4:]))
    _check_seconds("gap", op, gap)
    key = _getter("key", op, key)
    timestamp = _getter("timestamp", op, timestamp)
    _check_callable("agg", op, agg)
    _check_late(op, on_late)
    kwargs = {"gap": gap, "key": key, "agg": agg, **_policy_kwargs(opts, op)}
    return _timed(op, _session_windows, opts, kwargs, timestamp, lateness, on_late, clock, gap)
