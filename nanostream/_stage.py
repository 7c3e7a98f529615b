"""Stages and the ``@source`` / ``@transform`` / ``@sink`` decorators."""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, overload

if TYPE_CHECKING:
    from ._graph import Pipeline
    from ._report import Report
    from ._runtime import Run

__all__ = ["Stage", "sink", "source", "transform"]

F = TypeVar("F", bound=Callable[..., Any])

SOURCE, TRANSFORM, SINK = "source", "transform", "sink"

DEFAULTS: dict[str, Any] = {
    "name": None,
    "queue_size": 1024,
    "on_error": "raise",
    "workers": 1,
    "ordered": True,
    "retries": 0,
    "backoff": 0.1,
    "executor": "thread",
    "stream": False,
    "track": False,
}
_COMMON = ("name", "queue_size", "on_error")
_PER_ITEM = ("workers", "ordered", "retries", "backoff", "executor")
VALID = {
    SOURCE: _COMMON + ("track",),
    TRANSFORM: _COMMON + _PER_ITEM + ("stream",),
    SINK: _COMMON + _PER_ITEM + ("stream",),
}


def _unwrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    try:
        return inspect.unwrap(fn)
    except ValueError:
        return fn


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _fn_name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__name__", None)
    if name is None and isinstance(fn, functools.partial):
        name = _fn_name(fn.func)
    return name if isinstance(name, str) else type(fn).__name__


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def validate_options(kind: str, options: dict[str, Any], stage_name: str) -> None:
    """Raise a TypeError/ValueError naming what to fix for a bad option."""
    valid = VALID[kind]
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, DEFAULTS, n=1)
            if key in DEFAULTS:
                raise ValueError(
                    f"option {key!r} does not apply to {kind} {stage_name!r}"
                    + (": a source runs in one thread; parallelise the stages after it"
                       if kind == SOURCE and key in _PER_ITEM else "")
                    + f" (valid options for a {kind}: {', '.join(valid)})")
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"unknown option {key!r} for {kind} {stage_name!r}{hint} "
                            f"(valid options: {', '.join(valid)})")
    if "name" in options and options["name"] is not None and not isinstance(options["name"], str):
        raise TypeError(f"name must be a str, got {type(options['name']).__name__}")
    if "queue_size" in options:
        _check_int("queue_size", options["queue_size"], 1)
    if "workers" in options:
        _check_int("workers", options["workers"], 1)
    if "retries" in options:
        _check_int("retries", options["retries"], 0)
    if "backoff" in options:
        b = options["backoff"]
        if not isinstance(b, (int, float)) or isinstance(b, bool) or b < 0:
            raise ValueError(f"backoff must be a number of seconds >= 0, got {b!r}")
    if "on_error" in options:
        oe = options["on_error"]
        if not (oe in ("raise", "skip") or callable(oe)):
            raise ValueError(f"on_error must be 'raise', 'skip' or a callable (item, exc) -> None, "
                             f"got {oe!r}")
    if "executor" in options and options["executor"] not in ("thread", "process"):
        raise ValueError(f"executor must be 'thread' or 'process', got {options['executor']!r}")
    for flag in ("ordered", "stream", "track"):
        if flag in options and not isinstance(options[flag], bool):
            raise TypeError(f"{flag} must be True or False, got {options[flag]!r}")
    if options.get("stream"):
        if options.get("workers", 1) != 1:
            raise ValueError(f"{kind} {stage_name!r} has stream=True, which runs in one worker; "
                             f"got workers={options['workers']}: drop workers or stream")
        if options.get("executor", "thread") != "thread":
            raise ValueError(f"{kind} {stage_name!r} has stream=True, which runs in a thread; "
                             f"executor={options['executor']!r} is not supported with it")


class Stage:
    """One step of a pipeline: a source, a transform or a sink.

    Made by the :func:`source`, :func:`transform` and :func:`sink` decorators.
    Stages are immutable; options change through :meth:`with_options`, and each
    use of a stage in ``|`` becomes a new node of the graph.

    >>> @transform
    ... def double(x):
    ...     return 2 * x
    >>> double(21)
    42
    >>> double
    <transform 'double'>
    """

    __array_ufunc__ = None  # so that ``np.arange(3) | stage`` builds a pipeline

    def __init__(self, fn: Callable[..., Any], kind: str, options: dict[str, Any] | None = None,
                 args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
                 internal: dict[str, Any] | None = None, bound: bool = False) -> None:
        if not callable(fn):
            raise TypeError(f"@{kind} needs a function or other callable, got "
                            f"{type(fn).__name__} {fn!r}")
        options = dict(options or {})
        self.fn = fn
        self.kind = kind
        raw = _unwrap(fn)
        validate_options(kind, options, options.get("name") or _fn_name(raw))
        self.options = options
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.internal = dict(internal or {})
        self.bound = bound
        self.is_async = inspect.iscoroutinefunction(raw) or inspect.isasyncgenfunction(raw)
        if options.get("stream"):
            self.flavor = "stream"
        elif kind == SOURCE:
            self.flavor = "source"
        elif kind == SINK:
            self.flavor = "sink"
        else:
            self.flavor = self.internal.get("flavor") or (
                "flatmap" if inspect.isgeneratorfunction(raw) or inspect.isasyncgenfunction(raw)
                else "map")
        if self.is_async and options.get("executor", "thread") == "process":
            raise ValueError(f"{kind} {self.name!r} is an async function; executor='process' "
                             "does not apply (async functions run on an event loop)")
        if self.is_async and options.get("stream"):
            raise ValueError(f"{kind} {self.name!r}: stream=True needs a plain (not async) function")
        functools.update_wrapper(self, raw, updated=())

    # -- options -------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.options.get("name") or _fn_name(_unwrap(self.fn))

    def option(self, key: str) -> Any:
        """The effective value of an option (its default when not set)."""
        return self.options.get(key, DEFAULTS[key])

    def with_options(self, **options: Any) -> Stage:
        """A copy of this stage with other options.

        >>> transform(abs).with_options(name="magnitude", workers=2)
        <transform 'magnitude' workers=2>
        """
        merged = {**self.options, **options}
        return self._copy(options=merged)

    def _copy(self, **changes: Any) -> Stage:
        state: dict[str, Any] = dict(
            fn=self.fn, kind=self.kind, options=self.options, args=self.args,
            kwargs=self.kwargs, internal=self.internal, bound=self.bound)
        state.update(changes)
        return Stage(**state)

    # -- calling -------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.kind == SOURCE:
            return self._bind_source(args, kwargs)
        sig = _signature(self.fn)
        merged = {**self.kwargs, **kwargs}
        if sig is None:  # a builtin without a signature: no currying
            if args:
                return self.fn(*args, **merged)
            return self._copy(kwargs=merged)
        if args:
            try:
                sig.bind(*args, **merged)
            except TypeError as exc:
                if len(args) >= 1 and _is_missing(exc):
                    raise TypeError(
                        f"{self.kind} {self.name!r} called with positional arguments but "
                        f"missing others ({exc}); call it with every argument to run the "
                        f"function, or with keyword arguments only to configure the stage, "
                        f"e.g. {self.name}({_example_kwargs(sig)})") from None
                raise
            return self.fn(*args, **merged)
        params = list(sig.parameters.values())
        first = params[0].name if params else None
        if first is not None and first in kwargs:
            return self.fn(**merged)
        try:
            sig.bind_partial(_ITEM_SLOT, **merged)
        except TypeError as exc:
            raise TypeError(f"cannot configure {self.kind} {self.name!r}: {exc}") from None
        return self._copy(kwargs=merged)

    def _bind_source(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Stage:
        if self.bound:
            raise TypeError(f"source {self.name!r} already has its arguments; "
                            f"call the decorated function, not the stage it returned")
        sig = _signature(self.fn)
        if sig is not None:
            try:
                sig.bind(*args, **kwargs)
            except TypeError as exc:
                raise TypeError(f"source {self.name!r}: {exc}") from None
        return self._copy(args=args, kwargs=kwargs, bound=True)

    def check_complete(self) -> None:
        """Raise if the stage lacks arguments it needs to run."""
        sig = _signature(self.fn)
        if sig is None:
            return
        try:
            hooks = {"ctx": None} if self.internal.get("context") else {}
            if self.internal.get("explicit_tracking"):
                hooks["release"] = None
            if self.kind == SOURCE:
                sig.bind(*self.args, **hooks, **self.kwargs)
            else:
                sig.bind(_ITEM_SLOT, **hooks, **self.kwargs)
        except TypeError as exc:
            if self.kind == SOURCE:
                raise TypeError(f"source {self.name!r} needs arguments: {exc}; "
                                f"call it, e.g. {self.name}(...), before using it") from None
            raise TypeError(f"{self.kind} {self.name!r} cannot take items yet: {exc}; "
                            f"configure it with keyword arguments, e.g. "
                            f"{self.name}({_example_kwargs(sig)})") from None

    # -- composition ---------------------------------------------------------

    def __or__(self, other: Any) -> Pipeline:
        from ._graph import compose
        return compose(self, other)

    def __ror__(self, other: Any) -> Pipeline:
        from ._graph import compose_left
        return compose_left(other, self)

    def __iter__(self) -> Iterator[Any]:
        from ._graph import Pipeline
        return iter(Pipeline.of(self))

    def run(self, progress: bool = False, timeout: float | None = None,
            engine: Any = None) -> Report:
        """Run a lone source to completion (its items are counted and discarded)."""
        from ._graph import Pipeline
        return Pipeline.of(self).run(progress=progress, timeout=timeout, engine=engine)

    def start(self, engine: Any = None) -> Run:
        from ._graph import Pipeline
        return Pipeline.of(self).start(engine=engine)

    def collect(self) -> list[Any]:
        """All the items of a lone source, as a list."""
        return list(self)

    # -- display -------------------------------------------------------------

    def __repr__(self) -> str:
        extras = [f"{k}={v!r}" for k, v in self.options.items()
                  if k != "name" and v != DEFAULTS.get(k)]
        if self.kind == SOURCE and self.bound:
            shown = [repr_short(a) for a in self.args]
            shown += [f"{k}={repr_short(v)}" for k, v in self.kwargs.items()]
            call = f"({', '.join(shown)})"
        elif self.kwargs:
            call = "(" + ", ".join(f"{k}={repr_short(v)}" for k, v in self.kwargs.items()) + ")"
        else:
            call = ""
        tail = (" " + " ".join(extras)) if extras else ""
        return f"<{self.kind} {self.name!r}{call}{tail}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.fn, self.kind, self.options, self.args, self.kwargs,
                           self.internal, self.bound))


def _rebuild(fn: Any, kind: str, options: Any, args: Any, kwargs: Any, internal: Any,
             bound: bool) -> Stage:
    return Stage(fn, kind, options, args, kwargs, internal, bound)


class _ItemSlot:
    def __repr__(self) -> str:
        return "<item>"


_ITEM_SLOT = _ItemSlot()


def repr_short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_missing(exc: TypeError) -> bool:
    return "missing" in str(exc)


def _example_kwargs(sig: inspect.Signature) -> str:
    params = list(sig.parameters.values())[1:]
    needed = [p.name for p in params
              if p.default is inspect.Parameter.empty
              and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return ", ".join(f"{n}=..." for n in needed) or "..."


def _decorator(kind: str) -> Callable[..., Any]:
    def make(fn: Any = None, /, **options: Any) -> Any:
        if fn is None:
            validate_options(kind, options, "<stage>")
            return lambda f: make(f, **options)
        if isinstance(fn, Stage):
            if fn.kind != kind:
                raise TypeError(f"{fn!r} is a {fn.kind}, not a {kind}")
            return fn.with_options(**options) if options else fn
        if not callable(fn):
            raise TypeError(f"@{kind} needs a function or other callable, got "
                            f"{type(fn).__name__} {fn!r}")
        return Stage(fn, kind, options)

    return make


@overload
def source(fn: F, /, **options: Any) -> Stage: ...
@overload
def source(fn: None = None, /, **options: Any) -> Callable[[F], Stage]: ...
def source(fn: Any = None, /, **options: Any) -> Any:
    """Turn a generator function (or any function returning an iterable) into a source.

    Options: ``name``, ``queue_size``, ``on_error``, and ``track=True`` for a source
    that wants to know when each item has been fully handled: it then yields
    ``(item, on_done)`` pairs and the runtime calls ``on_done()`` once everything
    derived from the item has reached every sink, been filtered out or skipped.

    >>> @source
    ... def numbers(n):
    ...     yield from range(n)
    >>> list(numbers(3))
    [0, 1, 2]
    """
    return _decorator(SOURCE)(fn, **options)


@overload
def transform(fn: F, /, **options: Any) -> Stage: ...
@overload
def transform(fn: None = None, /, **options: Any) -> Callable[[F], Stage]: ...
def transform(fn: Any = None, /, **options: Any) -> Any:
    """Turn a function into a transform stage: one output per input, or zero or
    more when the function is a generator.

    Options: ``name``, ``workers``, ``ordered``, ``queue_size``, ``on_error``,
    ``retries``, ``backoff``, ``executor`` (``"thread"`` or ``"process"``) and
    ``stream`` (the function takes the whole input iterator).

    >>> @transform
    ... def square(x):
    ...     return x * x
    >>> list(range(4) | square)
    [0, 1, 4, 9]
    >>> square(3)
    9
    """
    return _decorator(TRANSFORM)(fn, **options)


@overload
def sink(fn: F, /, **options: Any) -> Stage: ...
@overload
def sink(fn: None = None, /, **options: Any) -> Callable[[F], Stage]: ...
def sink(fn: Any = None, /, **options: Any) -> Any:
    """Turn a function into a sink: called once per item, its return value ignored.

    With ``stream=True`` the function takes the whole input iterator instead.

    >>> seen = []
    >>> report = ([1, 2] | sink(seen.append)).run()
    >>> seen
    [1, 2]
    """
    return _decorator(SINK)(fn, **options)


def as_source_stage(data: Iterable[Any], name: str = "from_iterable") -> Stage:
    return Stage(_iterate, SOURCE, {"name": name}, args=(data,), bound=True)


def _iterate(data: Iterable[Any]) -> Iterable[Any]:
    return data
