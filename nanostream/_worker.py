"""The worker process behind ``executor="process"``.

Started as ``python -m nanostream._worker`` (a fresh interpreter: nothing is
forked from a process that runs threads, and the user's main module is never
re-imported). It reads length-prefixed frames on stdin: first the cloudpickled
task spec, then one pickled chunk per frame; it answers each chunk with one frame
holding the cloudpickled outcome. End of stdin ends the worker.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
import traceback
from typing import IO, Any

_HEADER = struct.Struct("!Q")


def write_frame(stream: IO[bytes], data: bytes) -> None:
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def read_frame(stream: IO[bytes]) -> bytes | None:
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        return None
    return data


def _portable(exc: BaseException) -> tuple[Any, str]:
    """An exception that survives the trip back, with its traceback as text."""
    import cloudpickle
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        data = cloudpickle.dumps(exc)
        pickle.loads(data)
        return exc, tb
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}"), tb


def main() -> None:
    import cloudpickle

    from ._pool import run_chunk

    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the user's prints go to stderr, not into the protocol
    frame = read_frame(inp)
    if frame is None:
        return
    spec = pickle.loads(frame)
    while True:
        frame = read_frame(inp)
        if frame is None:
            return
        chunk = pickle.loads(frame)
        results, failures, secs = run_chunk(spec, chunk)
        portable = [(i, *_portable(e)) for i, e in failures]
        try:
            data = cloudpickle.dumps((results, portable, secs))
        except Exception:
            data = cloudpickle.dumps(_unpicklable_result(results, portable, secs))
        write_frame(out, data)


def _unpicklable_result(results: list[Any], failures: list[Any], secs: float) -> Any:
    import cloudpickle
    for i, r in enumerate(results):
        try:
            cloudpickle.dumps(r)
        except Exception as bad:
            err = TypeError(f"the result for this item cannot be pickled to send it back from "
                            f"the worker process ({type(bad).__name__}: {bad}); return picklable "
                            "values from executor='process' stages")
            return results[:i], [*failures, (i, err, "")], secs
    return [], failures, secs


if __name__ == "__main__":
    main()
