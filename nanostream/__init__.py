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

from ._channel import ChannelStats
from ._errors import PipelineError, StageError
from ._graph import Pipeline, from_iterable, merge
from ._report import Report, StageStats
from ._runtime import Run, running, stop_all
from ._stage import Stage, sink, source, transform
from .operators import filter

__version__ = "0.1.0"

__all__ = [
    "ChannelStats",
    "Pipeline",
    "PipelineError",
    "Report",
    "Run",
    "Stage",
    "StageError",
    "StageStats",
    "filter",
    "from_iterable",
    "merge",
    "running",
    "sink",
    "source",
    "stop_all",
    "transform",
]
