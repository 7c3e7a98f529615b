"""Run a pipeline's per-item transforms as tasks on a Dask ``distributed`` cluster.

```python
from distributed import Client
from nanostream.dask import DaskEngine

client = Client("tcp://scheduler:8786")          # or Client(LocalCluster(...))
(source | transform(heavy, workers=8) | sink).run(engine=DaskEngine(client))
```

Sources, sinks, ``stream=True`` stages, ``async def`` stages and nanostream's own
per-item operators (``ns.tap``, ``ns.filter_map``, ...) stay in this process; every
other per-item transform (a map, a generator transform, the function of
``ns.filter`` or ``ns.flat_map``) runs on the cluster. For such a stage:

- ``workers`` is the most tasks of that stage in flight on the cluster at once. It is
  the back-pressure bound: a fast source blocks instead of flooding the scheduler.
  Use about twice the number of worker threads the stage should keep busy: with
  exactly as many, a worker idles while its result travels back.
- Items are sent in chunks: the runtime grows a stage's chunks until one task
  computes for about ``task_seconds`` (0.2 s by default, at most 1024 items), so the
  per-task overhead of Dask (milliseconds) is paid per chunk, not per item.
- ``ordered=True`` (the default) keeps input order; ``ordered=False`` passes results
  on as tasks finish.
- An exception raised by the function becomes a :class:`nanostream.StageError`
  naming the stage and the item, chained to the original exception, whose own
  ``__cause__`` carries the remote traceback (as for ``executor="process"``).
  ``on_error`` applies as usual; ``retries`` and ``backoff`` run on the worker. A
  task that fails outside the function (a worker that dies, an item that cannot be
  unpickled there) also ends the run with a ``StageError``.
- Stopping the run (``run.stop(drain=False)``, a failure, ``KeyboardInterrupt``)
  cancels the stage's tasks on the cluster. A call already running on a worker
  cannot be interrupted: it finishes there and its result is dropped.

What must be picklable: the stage's function with everything it refers to (checked
with cloudpickle when the run starts: a ``TypeError`` names the stage otherwise),
every item sent to the stage (an item that is not fails like any item the function
raised on, named in the ``StageError``) and every result (likewise). Lambdas,
closures and functions defined in ``__main__`` or a notebook are shipped by value;
functions of an importable module are shipped by reference, so that module, and
nanostream itself, must be installed on the workers (a run checks that the workers
can import ``nanostream.dask`` before it starts).
"""

from __future__ import annotations

import itertools
import logging
import pickle
import threading
import traceback
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Collection
from concurrent.futures import Future
from typing import Any

from . import __version__ as _VERSION
from ._pool import RemoteTraceback, TaskSpec, run_chunk
from ._stage import TRANSFORM, Stage

__all__ = ["DaskEngine"]

log = logging.getLogger("nanostream")

_FLAVORS = ("map", "flatmap", "filter")
_INLINE_SPEC_BYTES = 16 * 1024   # larger functions are scattered to the workers once
_MISSING = "DaskEngine needs dask.distributed: pip install 'nanostream[dask]'"


def _distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(_MISSING) from exc
    return distributed


class DaskEngine:
    """Run the per-item transforms of a pipeline as tasks on a Dask cluster.

    ``client`` is a synchronous :class:`distributed.Client`. ``accepts`` chooses the
    stages sent to the cluster among the eligible ones: a predicate ``stage -> bool``
    or a collection of stage names (default: every eligible stage that is not one of
    nanostream's own operators, see :meth:`accepts`).
    ``task_seconds`` is how long one task should compute: a stage's items are
    grouped into chunks of about that duration (0 sends one item per task).

    ```python
    engine = DaskEngine(client, accepts={"render"})
    report = pipeline.run(engine=engine)      # or pipeline.start(engine=engine)
    engine.stats()                            # tasks per stage, most in flight
    ```
    """

    def __init__(self, client: Any, *,
                 accepts: Callable[[Stage], bool] | Collection[str] | None = None,
                 task_seconds: float = 0.2) -> None:
        distributed = _distributed()
        if not isinstance(client, distributed.Client):
            raise TypeError(f"DaskEngine needs a distributed.Client, got "
                            f"{type(client).__name__} {client!r}; e.g. "
                            "DaskEngine(distributed.Client(address))")
        if client.asynchronous:
            raise TypeError("DaskEngine needs a synchronous Client: the pipeline calls it "
                            "from its own threads; create it with asynchronous=False")
        if isinstance(task_seconds, bool) or not isinstance(task_seconds, (int, float)) \
                or not task_seconds >= 0:
            raise ValueError(f"task_seconds must be a number >= 0, got {task_seconds!r}")
        if accepts is None or callable(accepts):
            self._wanted: Callable[[Stage], bool] | None = accepts
        elif isinstance(accepts, str):
            raise TypeError(f"accepts takes a predicate or a collection of stage names, got "
                            f"the string {accepts!r}; write accepts={{{accepts!r}}}")
        else:
            names = frozenset(accepts)
            self._wanted = lambda stage: stage.name in names
        self.client = client
        self.target_task_seconds = float(task_seconds)
        self._stats: dict[str, dict[str, int]] = {}
        self._stats_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DaskEngine({self.client!r}, task_seconds={self.target_task_seconds:g})"

    # -- the engine protocol of the runtime ---------------------------------------

    def accepts(self, stage: Stage) -> bool:
        """True if ``stage`` runs on the cluster.

        Eligible: per-item transforms (maps, generator transforms, ``ns.filter``,
        ``ns.flat_map``), not ``stream=True``, not ``async def``. Without ``accepts``
        every eligible stage runs there except nanostream's own per-item operators
        (``ns.tap`` has side effects here, ``ns.flatten`` is not worth a trip, ...);
        with ``accepts``, exactly the eligible stages it selects.
        """
        if stage.kind != TRANSFORM or stage.flavor not in _FLAVORS or stage.is_async:
            return False
        if self._wanted is None:
            return not _is_builtin(stage.fn)
        return bool(self._wanted(stage))

    def window(self, workers: int) -> int:
        """Most tasks of one stage in flight at once: the stage's ``workers``."""
        return workers

    def pool(self, spec: TaskSpec, stage: Stage, workers: int) -> _DaskPool:
        """The pool that sends one stage's chunks to the cluster (one per run)."""
        pool = _DaskPool(self, spec, stage.name)
        try:
            self._check_workers()
        except BaseException:
            pool.shutdown(abort=True)
            raise
        return pool

    def _check_workers(self) -> None:
        """The tasks call into nanostream.dask: a worker without it would fail to
        read them and hang the run, so fail now, and say so."""
        import pkgutil
        answers = self.client.run(pkgutil.resolve_name, "nanostream.dask:_VERSION",
                                  on_error="return")
        missing = sorted(w for w, v in answers.items() if isinstance(v, BaseException))
        if missing:
            err = answers[missing[0]]
            raise RuntimeError(
                f"nanostream cannot be imported on {len(missing)} Dask worker(s) "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): "
                f"{type(err).__name__}: {err}; install nanostream {_VERSION} where the "
                "workers run (pip install 'nanostream[dask]')") from err
        other = sorted({v for v in answers.values() if v != _VERSION})
        if other:
            warnings.warn(f"the Dask workers run nanostream {', '.join(other)}, this "
                          f"process {_VERSION}; install the same version everywhere",
                          RuntimeWarning, stacklevel=4)

    # -- observability ------------------------------------------------------------

    def stats(self) -> dict[str, dict[str, int]]:
        """Per stage name, over every run on this engine: ``tasks`` sent, tasks
        ``in_flight`` now, and ``max_in_flight``, the most that one run of the stage
        ever had in flight at once (at most its ``workers``)."""
        with self._stats_lock:
            return {name: dict(s) for name, s in self._stats.items()}

    def _stage_stats(self, name: str) -> dict[str, int]:
        with self._stats_lock:
            return self._stats.setdefault(name, {"tasks": 0, "in_flight": 0,
                                                 "max_in_flight": 0})


def _is_builtin(fn: Any) -> bool:
    import inspect
    module = getattr(inspect.unwrap(fn), "__module__", None) or ""
    return module == "nanostream" or module.startswith("nanostream.")


class _DaskPool:
    """Sends one stage's chunks to the cluster: ``submit(chunk) -> Future`` whose
    result is ``run_chunk``'s ``(results, failures, seconds)``."""

    def __init__(self, engine: DaskEngine, spec: TaskSpec, name: str) -> None:
        import cloudpickle
        try:
            blob = cloudpickle.dumps(spec)
        except Exception as exc:
            raise TypeError(
                f"stage {name!r} cannot run on the Dask cluster: its function cannot be "
                f"pickled ({type(exc).__name__}: {exc}); use a function that does not "
                "capture locks, open files, sockets or clients (open those inside the "
                "function), or keep the stage local with DaskEngine(client, accepts=...)"
            ) from exc
        self._engine = engine
        self._client = engine.client
        self._name = name
        self._token = uuid.uuid4().hex
        self._key = f"nanostream:{name.replace('-', '_')}"
        self._stats = engine._stage_stats(name)
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self._live: dict[Any, tuple[Any, Future[Any]]] = {}   # key -> (dask future, ours)
        self._closed = False
        self._in_flight = 0   # under self._lock
        self._spec_future: Any = None
        if len(blob) > _INLINE_SPEC_BYTES:
            # Big functions (closures over data) travel once per worker, not per task.
            key = f"{self._key}:spec-{self._token}"
            self._spec_future = self._client.scatter({key: blob}, broadcast=True)[key]
            self._spec: Any = self._spec_future
        else:
            self._spec = blob

    def submit(self, chunk: list[Any]) -> Future[Any]:
        import cloudpickle
        try:
            payload = cloudpickle.dumps(chunk)
        except Exception:
            return self._submit_picklable_part(chunk)
        return self._send(payload, len(chunk), None, [])

    def _submit_picklable_part(self, chunk: list[Any]) -> Future[Any]:
        """Some item of ``chunk`` cannot be pickled: it fails, the others are sent."""
        import cloudpickle
        good: list[Any] = []
        where: list[int] = []
        bad: list[tuple[int, BaseException]] = []
        for i, x in enumerate(chunk):
            try:
                cloudpickle.dumps(x)
            except Exception as exc:
                err = TypeError(f"the item cannot be pickled to send it to the Dask cluster "
                                f"({type(exc).__name__}: {exc}); items of stages that run "
                                "on DaskEngine must be picklable")
                err.__cause__ = exc
                bad.append((i, err))
            else:
                good.append(x)
                where.append(i)
        if not good:
            done = _Outcome(len(chunk), [], bad)
            done.set_result(pickle.dumps(([], [], 0.0)))
            return done
        return self._send(cloudpickle.dumps(good), len(chunk), where, bad)

    def _send(self, payload: bytes, n: int, where: list[int] | None,
              bad: list[tuple[int, BaseException]]) -> Future[Any]:
        ours = _Outcome(n, where, bad)
        key = f"{self._key}-{self._token}-{next(self._seq)}"
        with self._lock:
            if self._closed:
                # The runtime may still feed a chunk while a failure is being
                # reported; it must not be mistaken for the run's error.
                ours.cancel()
                return ours
            dfut = self._client.submit(_run_remote, self._token, self._spec, payload,
                                       key=key, pure=False)
            self._live[dfut.key] = (dfut, ours)
            self._count(1, sent=1)
        # The result is fetched on the client's event loop, so that fetches overlap;
        # it is unpickled by whoever reads it (the stage's own thread).
        self._client.loop.add_callback(self._fetch, dfut, ours)
        return ours

    def _count(self, delta: int, sent: int = 0) -> None:
        self._in_flight += delta
        with self._engine._stats_lock:
            s = self._stats
            s["tasks"] += sent
            s["in_flight"] += delta
            s["max_in_flight"] = max(s["max_in_flight"], self._in_flight)

    async def _fetch(self, dfut: Any, ours: _Outcome) -> None:
        """Runs on the client's event loop: wait for the task, fetch its result."""
        data: Any = None
        error: BaseException | None = None
        try:
            data = await self._client.gather(dfut, asynchronous=True)
        except BaseException as exc:   # the remote error, or the task was cancelled
            error = exc
        with self._lock:
            if self._live.pop(dfut.key, None) is not None:
                self._count(-1)
        dfut.release()
        if not ours.set_running_or_notify_cancel():
            return   # shut down meanwhile
        if error is None:
            ours.set_result(data)
            return
        if dfut.cancelled():
            error = RuntimeError(f"the Dask task of stage {self._name!r} was cancelled (was "
                                 "the client closed, or the task cancelled on the cluster?)")
        elif error.__cause__ is None and error.__traceback__ is not None:
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            error.__cause__ = RemoteTraceback(text)
        ours.set_exception(error)

    def shutdown(self, abort: bool) -> None:
        """Release the cluster: cancel the tasks still queued or running (``abort``)
        and forget the shipped function. Safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            live = list(self._live.values())
            self._live.clear()
            self._count(-len(live))
        for _, ours in live:
            ours.cancel()
        try:
            if live:
                self._client.cancel([dfut for dfut, _ in live], reason="nanostream run stopped")
            if self._spec_future is not None:
                self._spec_future.release()
        except Exception:
            if self._client.status not in ("closing", "closed"):
                log.exception("could not cancel the Dask tasks of stage %r", self._name)
        finally:
            for dfut, _ in live:
                dfut.release()


class _Outcome(Future):
    """A chunk's future: holds the pickled answer of the task, unpacked on first read
    into ``run_chunk``'s ``(results, failures, seconds)``."""

    def __init__(self, n: int, where: list[int] | None,
                 bad: list[tuple[int, BaseException]]) -> None:
        super().__init__()
        self._shape = (n, where, bad)
        self._value: Any = None

    def result(self, timeout: float | None = None) -> Any:
        if self._value is None:
            raw = super().result(timeout)
            self._value = _unpack(pickle.loads(raw), *self._shape)
        return self._value


def _unpack(outcome: tuple[list[Any], list[tuple[int, BaseException, str]], float], n: int,
            where: list[int] | None, bad: list[tuple[int, BaseException]]) -> Any:
    results, portable, secs = outcome
    failures: list[tuple[int, BaseException]] = []
    for i, exc, tb in portable:
        if tb:
            exc.__cause__ = RemoteTraceback(tb)
        failures.append((i, exc))
    if where is not None:   # some items never left: put the others back in their places
        full: list[Any] = [None] * n
        for j, r in enumerate(results):
            full[where[j]] = r
        results = full
        failures = sorted([(where[i], e) for i, e in failures] + bad, key=lambda p: p[0])
    return results, failures, secs


# -- on the worker -------------------------------------------------------------

_SPECS: OrderedDict[str, TaskSpec] = OrderedDict()
_SPECS_LOCK = threading.Lock()
_SPECS_KEPT = 32


def _spec_for(token: str, blob: bytes) -> TaskSpec:
    """The unpickled function of a stage, cached per worker process."""
    with _SPECS_LOCK:
        spec = _SPECS.get(token)
        if spec is not None:
            _SPECS.move_to_end(token)
            return spec
    spec = pickle.loads(blob)
    with _SPECS_LOCK:
        _SPECS[token] = spec
        while len(_SPECS) > _SPECS_KEPT:
            _SPECS.popitem(last=False)
    return spec


def _run_remote(token: str, spec_blob: bytes, payload: bytes) -> bytes:
    """The Dask task: ``run_chunk`` on one chunk, answered as pickled bytes with
    each failure's traceback as text (and a failure for each unpicklable result)."""
    import cloudpickle

    from ._worker import _portable
    results, failures, secs = run_chunk(_spec_for(token, spec_blob), pickle.loads(payload))
    portable = [(i, *_portable(e)) for i, e in failures]
    try:
        return cloudpickle.dumps((results, portable, secs))
    except Exception:
        pass
    for i, r in enumerate(results):
        try:
            cloudpickle.dumps(r)
        except Exception as bad:
            results[i] = None
            err = TypeError(f"the result for this item cannot be pickled to send it back "
                            f"from the Dask worker ({type(bad).__name__}: {bad}); return "
                            "picklable values from stages that run on DaskEngine")
            portable.append((i, err, ""))
    portable.sort(key=lambda p: p[0])
    return cloudpickle.dumps((results, portable, secs))
