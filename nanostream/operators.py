"""Built-in operators: stages for the everyday steps of a stream."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._stage import TRANSFORM, Stage, _fn_name

__all__ = ["filter"]

_builtin_filter = filter


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
