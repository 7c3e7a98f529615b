"""Worker pools for stages with ``workers > 1``, ``executor="process"`` or ``async def``.

Every pool has the same small interface: ``submit(chunk) -> Future`` (a
``concurrent.futures.Future`` or anything with ``add_done_callback`` and
``result``) and ``shutdown(abort)``. The future's result is
``(results, failures, seconds)``: one result per input item (the value for a map,
a list for a generator, a bool for a filter, ``None`` for a sink), the
``(index, exception)`` pairs of items that failed after their retries, and the
time spent. An engine (such as Dask) plugs in by providing its own pool.
"""

from __future__ import annotations

import functools
import inspect
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

__all__ = ["AsyncPool", "ProcessPool", "RemoteTraceback", "TaskSpec", "ThreadPool", "run_chunk"]

Chunk = list[Any]
Outcome = tuple[list[Any], list[tuple[int, BaseException]], float]


class TaskSpec:
    """What a pool runs for one chunk: the function, its flavor and retry policy."""

    __slots__ = ("backoff", "call", "flavor", "retries", "stop_on_error")

    def __init__(self, call: Callable[..., Any], flavor: str, retries: int, backoff: float,
                 stop_on_error: bool) -> None:
        self.call = call
        self.flavor = flavor
        self.retries = retries
        self.backoff = backoff
        self.stop_on_error = stop_on_error

    def __reduce__(self) -> tuple[Any, ...]:
        return (TaskSpec, (self.call, self.flavor, self.retries, self.backoff,
                           self.stop_on_error))


def run_chunk(spec: TaskSpec, chunk: Chunk,
              sleep: Callable[[float], Any] = time.sleep) -> Outcome:
    """Apply ``spec`` to every item of ``chunk`` with retries; never raises for an item."""
    call, flavor, retries = spec.call, spec.flavor, spec.retries
    results: list[Any] = []
    failures: list[tuple[int, BaseException]] = []
    t0 = time.perf_counter()
    for i, x in enumerate(chunk):
        attempt = 0
        while True:
            try:
                if flavor == "map":
                    r = call(x)
                elif flavor == "flatmap":
                    r = list(call(x))
                elif flavor == "filter":
                    r = bool(call(x))
                else:
                    call(x)
                    r = None
                break
            except Exception as exc:
                if attempt < retries:
                    sleep(spec.backoff * (2 ** attempt))
                    attempt += 1
                    continue
                failures.append((i, exc))
                r = None
                break
        results.append(r)
        if failures and spec.stop_on_error:
            break
    return results, failures, time.perf_counter() - t0


# -- threads -------------------------------------------------------------------

class ThreadPool:
    """``n`` daemon threads running chunks (daemon, so a call that never returns
    cannot keep the interpreter alive)."""

    def __init__(self, spec: TaskSpec, n: int, name: str,
                 sleep: Callable[[float], Any] = time.sleep) -> None:
        import queue
        self._spec = spec
        self._sleep = sleep
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"nanostream:{name}:{i}",
                                          daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            fut, chunk = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(run_chunk(self._spec, chunk, self._sleep))
            except BaseException as exc:
                fut.set_exception(exc)

    def submit(self, chunk: Chunk) -> Future[Outcome]:
        fut: Future[Outcome] = Future()
        self._q.put((fut, chunk))
        return fut

    def shutdown(self, abort: bool) -> None:
        if abort:  # drop the chunks no worker has started
            import queue
            while True:
                try:
                    job = self._q.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job[0].cancel()
        for _ in self._threads:
            self._q.put(None)

    def join(self) -> None:
        """Wait for the workers to end (after :meth:`shutdown`)."""
        for t in self._threads:
            t.join()

    def alive(self) -> list[threading.Thread]:
        return [t for t in self._threads if t.is_alive()]


# -- processes -----------------------------------------------------------------

class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker process (its ``__cause__``)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f"\n\"\"\"\n{self.tb}\"\"\""


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    if os.getcwd() not in paths:
        paths.insert(0, os.getcwd())
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["NANOSTREAM_WORKER"] = "1"  # the worker imports only what it needs
    return env


class ProcessPool:
    """``n`` worker processes (``python -m nanostream._worker``), each served by a
    thread that sends it cloudpickled chunks. The function is shipped once per
    process; lambdas, closures and functions of ``__main__`` work, and nothing is
    ever forked from this (threaded) process."""

    def __init__(self, spec: TaskSpec, n: int, name: str) -> None:
        import queue

        import cloudpickle
        try:
            self._spec_bytes = cloudpickle.dumps(spec)
        except Exception as exc:
            raise TypeError(f"stage {name!r} cannot run with executor='process': its function "
                            f"cannot be pickled ({type(exc).__name__}: {exc}); use a function "
                            "that does not capture locks, open files or sockets") from exc
        self._name = name
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._procs: list[Any] = [None] * n
        self._closing = False
        self._env = _child_env()
        self._threads = [threading.Thread(target=self._serve, args=(i,), daemon=True,
                                          name=f"nanostream:{name}:proc{i}") for i in range(n)]
        for t in self._threads:
            t.start()

    def _spawn(self, i: int) -> Any:
        import subprocess

        from ._worker import write_frame
        proc = subprocess.Popen([sys.executable, "-m", "nanostream._worker"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self._env)
        self._procs[i] = proc
        if self._closing:  # an abort came while this worker was starting: end it too
            proc.kill()
        try:
            assert proc.stdin is not None
            write_frame(proc.stdin, self._spec_bytes)
        except BaseException:
            proc.kill()
            proc.wait()
            _close_pipes(proc)
            raise
        return proc

    def _serve(self, i: int) -> None:
        from ._worker import read_frame, write_frame
        proc = None
        try:
            while True:
                job = self._q.get()
                if job is None:
                    return
                fut, payload = job
                if self._closing:  # aborted: start no new worker for what is queued
                    fut.cancel()
                    continue
                if not fut.set_running_or_notify_cancel():
                    continue
                try:
                    if proc is None or proc.poll() is not None:
                        if proc is not None:
                            _close_pipes(proc)  # the worker died (or was killed) while idle
                        proc = self._spawn(i)
                    write_frame(proc.stdin, payload)
                    data = read_frame(proc.stdout)
                    if data is None:
                        code = proc.wait()
                        _close_pipes(proc)
                        proc = None
                        raise RuntimeError(f"the worker process of stage {self._name!r} died "
                                           f"(exit code {code}) while handling its chunk")
                    results, failures, secs = pickle.loads(data)
                    rebuilt = []
                    for idx, exc, tb in failures:
                        if tb:
                            exc.__cause__ = RemoteTraceback(tb)
                        rebuilt.append((idx, exc))
                    fut.set_result((results, rebuilt, secs))
                except BaseException as exc:
                    if self._closing:
                        fut.cancel() or fut.set_exception(exc)
                    else:
                        fut.set_exception(exc)
        finally:
            if proc is not None:
                try:
                    proc.stdin.close()
                    proc.wait(5)
                except Exception:
                    proc.kill()
                    proc.wait()
                _close_pipes(proc)

    def submit(self, chunk: Chunk) -> Future[Outcome]:
        import cloudpickle
        payload = cloudpickle.dumps(chunk)  # the runner turns a failure here into a StageError
        fut: Future[Outcome] = Future()
        self._q.put((fut, payload))
        return fut

    def shutdown(self, abort: bool) -> None:
        if abort:
            self._closing = True
            for proc in self._procs:
                if proc is not None and proc.poll() is None:
                    proc.kill()
        for _ in self._threads:
            self._q.put(None)
        if abort:
            for t in self._threads:
                t.join(5)

    def join(self) -> None:
        """Wait for the workers to end (after :meth:`shutdown`): each serving thread
        ends once its process has exited (or was killed) and been reaped, so no worker
        process outlives the run."""
        for t in self._threads:
            t.join()

    def alive(self) -> list[Any]:
        return [p for p in self._procs if p is not None and p.poll() is None]


def _close_pipes(proc: Any) -> None:
    for pipe in (proc.stdin, proc.stdout):
        try:
            pipe.close()
        except OSError:  # a broken pipe on the final flush: the file is closed anyway
            pass


# -- async ---------------------------------------------------------------------

async def _run_chunk_async(spec: TaskSpec, chunk: Chunk) -> Outcome:
    import asyncio
    call, flavor = spec.call, spec.flavor
    results: list[Any] = []
    failures: list[tuple[int, BaseException]] = []
    t0 = time.perf_counter()
    for i, x in enumerate(chunk):
        attempt = 0
        r: Any
        while True:
            try:
                if flavor == "flatmap":
                    out = call(x)
                    if inspect.isasyncgen(out):
                        r = [y async for y in out]
                    else:
                        r = list(await out if inspect.isawaitable(out) else out)
                else:
                    value = call(x)
                    if inspect.isawaitable(value):
                        value = await value
                    if flavor == "filter":
                        r = bool(value)
                    elif flavor == "sink":
                        r = None
                    else:
                        r = value
                break
            except Exception as exc:
                if attempt < spec.retries:
                    await asyncio.sleep(spec.backoff * (2 ** attempt))
                    attempt += 1
                    continue
                failures.append((i, exc))
                r = None
                break
        results.append(r)
        if failures and spec.stop_on_error:
            break
    return results, failures, time.perf_counter() - t0


class AsyncPool:
    """An event loop in a thread of its own; each chunk runs as one task."""

    def __init__(self, spec: TaskSpec, n: int, name: str) -> None:
        import asyncio
        self._spec = spec
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop_lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._main, name=f"nanostream:{name}:loop",
                                        daemon=True)
        self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        import asyncio
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        try:
            self._loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def submit(self, chunk: Chunk) -> Future[Outcome]:
        import asyncio
        coro = _run_chunk_async(self._spec, chunk)
        try:
            return asyncio.run_coroutine_threadsafe(coro, self._loop)
        except BaseException:
            coro.close()  # the loop is closed: never awaited, but no warning either
            raise

    def shutdown(self, abort: bool) -> None:
        """Stop the loop, once; does not wait (it is called while a run aborts).

        A second stop would land while the loop cancels its tasks and break that.
        """
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        if not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._loop.stop)
            except RuntimeError:
                pass

    def join(self) -> None:
        """Wait for the loop's thread to end (after :meth:`shutdown`)."""
        self._thread.join()


def bind(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Callable[..., Any]:
    return functools.partial(fn, **kwargs) if kwargs else fn
