"""Per-stage counters and the run report."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._channel import ChannelStats

__all__ = ["Report", "StageStats"]


@dataclass
class StageStats:
    """Counts and timings of one stage (one node of the graph).

    ``busy`` is the time spent inside the stage's own work (summed over workers);
    ``queue`` describes the stage's input queue at the moment of the snapshot.
    """

    name: str
    kind: str
    workers: int = 1
    items_in: int = 0
    items_out: int = 0
    errors: int = 0
    busy: float = 0.0
    queue: ChannelStats | None = None

    def rate(self, elapsed: float) -> float:
        """Items handled per second of wall time."""
        return self.items_in / elapsed if elapsed > 0 else 0.0


@dataclass
class Report:
    """What a run did: every stage with its counts and times.

    ``str(report)`` is a small table:

    >>> r = Report([StageStats("numbers", "source", items_out=3),
    ...             StageStats("show", "sink", items_in=3, busy=0.001)], elapsed=0.01)
    >>> print(r)
    stage    kind    in  out  errors  busy s  items/s
    numbers  source   -    3       0   0.000        -
    show     sink     3    -       0   0.001      300
    elapsed 0.010 s
    """

    stages: list[StageStats] = field(default_factory=list)
    elapsed: float = 0.0
    running: bool = False

    def __getitem__(self, name: str) -> StageStats:
        """The stats of the (first) stage with this name."""
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage named {name!r}; stages: {[s.name for s in self.stages]}")

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.stages)

    def bottleneck(self) -> StageStats | None:
        """The stage that spent the largest share of its workers' time busy."""
        busy = [s for s in self.stages if s.kind != "source" and s.items_in]
        if not busy:
            return None
        return max(busy, key=lambda s: s.busy / max(s.workers, 1))

    def __str__(self) -> str:
        rows = [("stage", "kind", "in", "out", "errors", "busy s", "items/s")]
        for s in self.stages:
            rows.append((
                s.name,
                s.kind,
                "-" if s.kind == "source" else str(s.items_in),
                "-" if s.kind == "sink" else str(s.items_out),
                str(s.errors),
                f"{s.busy:.3f}",
                "-" if s.kind == "source" else f"{s.rate(self.elapsed):,.0f}",
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = []
        for r in rows:
            cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
            cells += [c.rjust(w) for c, w in zip(r[2:], widths[2:], strict=False)]
            lines.append("  ".join(cells).rstrip())
        lines.append(f"{'running for' if self.running else 'elapsed'} {self.elapsed:.3f} s")
        return "\n".join(lines)
