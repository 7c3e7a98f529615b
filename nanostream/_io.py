"""Plumbing shared by the file and database connectors (``files.py``, ``sql.py``).

Nothing here is public:

* :class:`DetachedContext`: the ``ctx`` of a connector function called outside a run.
* Paths: argument checks, glob expansion, gzip-transparent opening.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import os
import time
from collections.abc import Sequence
from typing import IO, Any, Union

from ._errors import StageError

PathArg = Union[str, "os.PathLike[str]"]

GZIP_LEVEL = 6  # the gzip command's default; Python's 9 is several times slower to write


# -- a context for stages called outside a run ---------------------------------------------

class DetachedContext:
    """What a connector's function uses for ``ctx`` when it is called directly, outside
    a run (the runtime passes its own): per-item errors are raised as StageErrors."""

    stopping = False

    def __init__(self, name: str) -> None:
        self.name = name

    def item_error(self, exc: BaseException, item: Any = None, detail: str | None = None) -> None:
        raise StageError(self.name, item, exc, detail=detail)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


# -- arguments -------------------------------------------------------------------------

def check_path(fn: str, path: Any, *, many: bool) -> tuple[str, ...]:
    """Validate a path argument; a list or tuple of paths is accepted when ``many``."""
    items: Sequence[Any]
    if many and isinstance(path, (list, tuple)):
        if not path:
            raise ValueError(f"{fn}: the list of paths is empty")
        items = path
    else:
        items = [path]
    out = []
    for p in items:
        if isinstance(p, bytes) or not isinstance(p, (str, os.PathLike)):
            what = "a path (str or os.PathLike)" + (", or a list of them" if many else "")
            raise TypeError(f"{fn}: path must be {what}, got {type(p).__name__} {p!r}")
        s = os.fspath(p)
        if not isinstance(s, str) or not s:
            raise ValueError(f"{fn}: path must be a non-empty str path, got {p!r}")
        out.append(s)
    return tuple(out)


def check_encoding(fn: str, encoding: Any) -> None:
    if not isinstance(encoding, str):
        raise TypeError(f"{fn}: encoding must be a str, got {type(encoding).__name__}")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"{fn}: unknown encoding {encoding!r}") from None


def check_number(fn: str, name: str, value: Any, *, allow_none: bool = False,
                 positive: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        none = " or None" if allow_none else ""
        raise TypeError(f"{fn}: {name} must be a number of seconds{none}, got "
                        f"{type(value).__name__} {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{fn}: {name} must be > 0, got {value!r}")


def check_flag(fn: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be True or False, got {value!r}")


# -- paths -----------------------------------------------------------------------------

def has_magic(path: str) -> bool:
    return glob.has_magic(path)


def expand(paths: tuple[str, ...]) -> list[str]:
    """The files to read: each glob pattern in sorted order, other paths as given.

    A path that exists is taken literally even if it contains glob characters. A
    pattern that matches nothing is a ``FileNotFoundError`` (reading nothing by
    mistake is worse than an error); a missing literal path fails when opened.
    """
    files: list[str] = []
    for p in paths:
        if has_magic(p) and not os.path.exists(p):
            found = sorted(f for f in glob.glob(p, recursive=True) if not os.path.isdir(f))
            if not found:
                raise FileNotFoundError(f"no file matches the pattern {p!r}")
            files.extend(found)
        else:
            files.append(p)
    return files


def is_gzip(path: str) -> bool:
    return path.endswith(".gz")


def open_read(path: str, encoding: str, errors: str = "strict", newline: str | None = None
              ) -> IO[str]:
    """Open a text file for reading, decompressing when the name ends in ``.gz``."""
    if is_gzip(path):
        return gzip.open(path, "rt", encoding=encoding, errors=errors, newline=newline)
    return open(path, encoding=encoding, errors=errors, newline=newline)


def open_write(path: str, append: bool, encoding: str, newline: str | None = None) -> IO[str]:
    """Open a text file for writing (or appending), gzip-compressed for ``.gz`` names."""
    mode = "at" if append else "wt"
    if is_gzip(path):
        return gzip.open(path, mode, compresslevel=GZIP_LEVEL,  # type: ignore[return-value]
                         encoding=encoding, newline=newline)
    return open(path, mode, encoding=encoding, newline=newline)


# -- stage options ---------------------------------------------------------------------

STAGE_OPTIONS = ("name", "queue_size", "on_error")


def stage_options(fn: str, options: dict[str, Any]) -> dict[str, Any]:
    """The stage options a connector takes (``name``, ``queue_size``, ``on_error``),
    with the connector's name as the default stage name. Anything else is a clear
    ``TypeError`` (a misspelt option) or ``ValueError`` (an option that does not apply:
    a connector runs in one thread)."""
    import difflib

    from ._stage import DEFAULTS

    for key in options:
        if key in STAGE_OPTIONS:
            continue
        valid = ", ".join(STAGE_OPTIONS)
        if key in DEFAULTS:
            raise ValueError(f"{fn}: option {key!r} does not apply (a connector runs in one "
                             f"thread; its stage options are {valid})")
        close = difflib.get_close_matches(key, STAGE_OPTIONS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TypeError(f"{fn}() got an unexpected keyword argument {key!r}{hint} "
                        f"(stage options: {valid})")
    return {"name": fn, **options}
