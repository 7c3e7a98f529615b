"""Completion tracking: knowing when everything derived from a source item is done.

A source that asks for tracking gives each item a :class:`Ticket`. The ticket
travels beside the item (channels of a tracked part of the graph carry
``(item, ticket)`` pairs) and counts the live copies derived from it: fan-out to
``k`` branches adds ``k - 1``, a generator transform yielding ``n`` outputs adds
``n - 1``, and every copy that reaches a sink, is filtered out, or is skipped by an
error policy gives one back. When the count reaches zero the ticket's callback
runs. Items merged into one (a batch, a window) get a *group* ticket whose callback
releases all of its members.

Untracked items carry ``None`` and cost nothing: the helpers skip them. Parts of
the graph that no tracked source reaches never see pairs at all.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable

__all__ = ["Ticket", "group", "release", "release_all", "retain"]

log = logging.getLogger("nanostream")
_lock = threading.Lock()


class Ticket:
    """A reference count with a callback that runs when it drops to zero.

    >>> done = []
    >>> t = Ticket(lambda: done.append("x"))
    >>> retain([t], 1); release([t]); done
    []
    >>> release([t]); done
    ['x']
    """

    __slots__ = ("callback", "count")

    def __init__(self, callback: Callable[[], object] | None, count: int = 1) -> None:
        self.callback = callback
        self.count = count

    def __repr__(self) -> str:
        return f"<Ticket count={self.count}>"


def retain(tickets: Iterable[Ticket | None], n: int = 1) -> None:
    """Add ``n`` references to each ticket (``None`` entries are ignored)."""
    if n <= 0:
        return
    with _lock:
        for t in tickets:
            if t is not None:
                t.count += n


def release(tickets: Iterable[Ticket | None]) -> None:
    """Give back one reference of each ticket, running callbacks that come due.

    Callbacks run outside the lock, in the calling thread; one that raises is
    logged and does not disturb the others.
    """
    due = []
    with _lock:
        for t in tickets:
            if t is not None:
                t.count -= 1
                if t.count == 0:
                    due.append(t)
    _run_due(due)


def release_all(tickets: list[Ticket | None]) -> None:
    """:func:`release` for a long list in which the same tickets come many times (the
    items of one source chunk share a ticket): they are counted first, at C speed,
    so the cost is per distinct ticket rather than per item.

    >>> done = []
    >>> t = Ticket(lambda: done.append("x"), count=3)
    >>> release_all([t, t, None]); done
    []
    >>> release_all([t]); done
    ['x']
    """
    counts = Counter(tickets)
    due = []
    with _lock:
        for t, n in counts.items():
            if t is not None:
                t.count -= n
                if t.count == 0:
                    due.append(t)
    _run_due(due)


def _run_due(due: list[Ticket]) -> None:
    for t in due:
        cb = t.callback
        t.callback = None
        if cb is not None:
            try:
                cb()
            except Exception:  # a source's bookkeeping must not kill a sink thread
                log.exception("completion callback %r failed", cb)


def group(tickets: Iterable[Ticket | None]) -> Ticket | None:
    """One ticket standing for several: done when it is released, it releases them.

    Takes over the caller's references to ``tickets``.
    """
    members = [t for t in tickets if t is not None]
    if not members:
        return None
    if len(members) == 1:
        return members[0]
    return Ticket(lambda: release(members))
