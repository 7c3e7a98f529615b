"""Exceptions raised by nanostream."""

from __future__ import annotations

from typing import Any

__all__ = ["PipelineError", "StageError"]

_NO_ITEM: Any = object()


def _short_repr(obj: Any, limit: int = 200) -> str:
    try:
        text = repr(obj)
    except Exception as exc:  # a broken __repr__ must not hide the real error
        text = f"<unrepresentable {type(obj).__name__}: {exc!r}>"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


class PipelineError(Exception):
    """Base class of the errors a running pipeline raises."""


class StageError(PipelineError):
    """A stage failed while handling an item.

    ``stage`` is the stage's name, ``item`` the item it was handling (or ``None``
    when the failure was not tied to one item, e.g. a source that raised), and the
    original exception is chained as ``__cause__``.

    >>> err = StageError("parse", "x,y", ValueError("bad"))
    >>> str(err)
    "stage 'parse' failed on item 'x,y': ValueError: bad"
    """

    def __init__(self, stage: str, item: Any = _NO_ITEM, exc: BaseException | None = None,
                 detail: str | None = None) -> None:
        self.stage = stage
        self.has_item = item is not _NO_ITEM
        self.item = item if self.has_item else None
        self.original = exc
        where = f" on item {_short_repr(item)}" if self.has_item else ""
        what = f": {type(exc).__name__}: {exc}" if exc is not None else ""
        if detail:
            what += f" ({detail})"
        super().__init__(f"stage {stage!r} failed{where}{what}")
        if exc is not None:
            self.__cause__ = exc

    def __reduce__(self) -> tuple[Any, ...]:
        item = self.item if self.has_item else _NO_ITEM
        return (_rebuild_stage_error, (self.stage, item if self.has_item else None,
                                       self.has_item, self.original, str(self)))


def _rebuild_stage_error(stage: str, item: Any, has_item: bool,
                         exc: BaseException | None, text: str) -> StageError:
    err = StageError(stage, item if has_item else _NO_ITEM, exc)
    err.args = (text,)
    return err
