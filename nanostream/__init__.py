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
from . import compat as _compat
from . import files as _files
from . import operators as _operators
from . import sql as _sql
from .compat import *  # noqa: F403
from .files import *  # noqa: F403
from .operators import *  # noqa: F403
from .sql import *  # noqa: F403

__version__ = "0.1.0"

_CORE = [
    "ChannelStats",
    "Pipeline",
    "PipelineError",
    "Report",
    "Run",
    "Stage",
    "StageError",
    "StageStats",
    "from_iterable",
    "merge",
    "running",
    "sink",
    "source",
    "stop_all",
    "transform",
]

__all__ = sorted({*_CORE, *_operators.__all__, *_files.__all__, *_sql.__all__, *_compat.__all__})
