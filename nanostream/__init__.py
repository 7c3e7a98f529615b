"""nanostream: streaming pipelines in plain Python.

Plain functions and generators become stages with :func:`source`,
:func:`transform` and :func:`sink`; stages compose with ``|`` into a lazily built
graph; a threaded executor runs it with bounded queues between the stages.

>>> import nanostream as ns
>>> @ns.transform
... def square(x):
...     return x * x
>>> list(range(5) | square)
[0, 1, 4, 9, 16]
"""

import os as _os
from typing import TYPE_CHECKING as _TYPE_CHECKING

if _TYPE_CHECKING or _os.environ.get("NANOSTREAM_WORKER") != "1":
    from ._channel import ChannelStats
    from ._errors import PipelineError, StageError
    from ._graph import Pipeline, from_iterable, merge
    from ._report import Report, StageStats
    from ._runtime import Run, running, stop_all
    from ._stage import Stage, sink, source, transform
    from .compat import NanoStreamGraph, NanoStreamListener, NanoStreamProcessor, NanoStreamSender
    from .files import read_csv, read_jsonl, read_lines, write_csv, write_jsonl, write_lines
    from .operators import (
        Window,
        batch,
        distinct,
        filter,
        filter_map,
        flat_map,
        flatten,
        rate_limit,
        reduce,
        scan,
        session,
        skip,
        sliding,
        stateful_map,
        take,
        take_while,
        tap,
        tumbling,
    )
    from .sql import sql_sink, sql_source
else:
    # a worker process of executor="process" needs only nanostream._pool: the public
    # API loads on first use (a user's function may still refer to it)
    def __getattr__(name: str) -> object:
        import importlib
        import sys
        if name not in __all__ or _os.environ.get("NANOSTREAM_WORKER") != "1":
            raise AttributeError(f"module 'nanostream' has no attribute {name!r}")
        _os.environ["NANOSTREAM_WORKER"] = "0"
        importlib.reload(sys.modules[__name__])
        return getattr(sys.modules[__name__], name)

__version__ = "0.1.0"

__all__ = [
    # the DSL and the graph
    "source", "transform", "sink", "Stage", "Pipeline", "from_iterable", "merge",
    # running
    "Run", "Report", "StageStats", "ChannelStats", "running", "stop_all",
    # errors
    "PipelineError", "StageError",
    # operators (operators.py) and windows (windows.py)
    "filter", "flat_map", "filter_map", "flatten", "tap", "batch", "scan", "stateful_map",
    "reduce", "take", "take_while", "skip", "distinct", "rate_limit",
    "tumbling", "sliding", "session", "Window",
    # files (files.py) and databases (sql.py)
    "read_lines", "read_jsonl", "read_csv", "write_lines", "write_jsonl", "write_csv",
    "sql_source", "sql_sink",
    # the original alpha's class API (compat.py)
    "NanoStreamSender", "NanoStreamListener", "NanoStreamProcessor", "NanoStreamGraph",
]
