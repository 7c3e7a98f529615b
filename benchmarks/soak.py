"""Soak and load: a Kafka -> transform -> SQL pipeline at full rate for minutes.

    python -m benchmarks.soak                          # 10 minutes, kafka-python, sqlite
    python -m benchmarks.soak --client confluent
    python -m benchmarks.soak --db postgresql+psycopg://postgres@127.0.0.1/test --seconds 180
    python -m benchmarks.soak --seconds 30 --confirm 60   # the CI version (tests/test_soak.py)

A feeder process keeps the input topic (3 partitions) ahead of the pipeline by up to
``--lead`` messages of about 90 bytes of JSON, so the pipeline never waits for input:

    kafka_source(group) | transform(parse: JSON order -> row) | sql_sink(table)

This process runs the pipeline alone (the broker and the feeder are other processes)
and samples itself every ``--interval`` seconds: resident memory (after glibc's
``malloc_trim(0)``, which hands freed arena memory back to the system; without it,
``--no-trim``, RSS also shows how far glibc's arenas happen to have grown, which is
not a leak), its thread count (every OS thread, the Kafka clients' included), the fill
of every stage's input queue and the messages written so far. Over the steady part
(after the first ``--warmup`` seconds, by default a third of the run up to 60 s) it
checks:

* memory flat: the least-squares slope of RSS is under ``--max-slope`` MB per minute
  (fitted to the median of every 5 s of samples: queues and fetch buffers filling and
  draining move RSS by a few MB from one sample to the next, a leak moves them all).
  If a short run's slope is over it, the pipeline runs ``--confirm`` seconds more and
  the slope over the longer steady part decides (a 20 s window is noisy);
* no thread growth: the same number of threads at the end of the steady part as at its
  start, and never more than at its start;
* throughput steady: the rate in the last third of the steady part is at least
  ``--min-steady`` times the rate in its first third.

The Kafka clients' fetch buffers are capped (kafka-python ``fetch_max_bytes`` 2 MB,
confluent-kafka ``queued.max.messages.kbytes`` 4 MB and ``queued.min.messages`` 20,000
per partition) so that the memory figure is precise: with their defaults (50 MB; 64 MB
and 100,000 messages per partition; ``--uncapped``) memory is flat too, but swings by up
to 60 MB as librdkafka's prefetch queues fill and drain, which hides a 1 MB/min slope
in a short run. The caps cost confluent-kafka throughput (about 36k against 65k msg/s
in back-to-back 30 s runs); kafka-python's none.
Exit code 0 if every check passes; ``--json`` writes the samples and the summary.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

PARTITIONS = 3
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

# consumer-group timeouts that any broker accepts and that make a join take ~3 s on
# Tansu instead of ~23 s (tests/kafka_support.py FAST_GROUP)
KAFKA_PYTHON_OPTIONS: dict[str, Any] = {
    "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, "max_poll_interval_ms": 30000,
    "fetch_max_bytes": 2 * 1024 * 1024,
    "max_partition_fetch_bytes": 1024 * 1024,
    "fetch_max_wait_ms": 100,
}
CONFLUENT_OPTIONS: dict[str, Any] = {
    "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000, "max.poll.interval.ms": 30000,
    "queued.max.messages.kbytes": 4 * 1024,
    "queued.min.messages": 20_000,
    "fetch.wait.max.ms": 100,
}

_CAPS = ("fetch_max_bytes", "max_partition_fetch_bytes", "queued.max.messages.kbytes",
         "queued.min.messages")


# -- the feeder (a process of its own) ---------------------------------------------------------

def _feed(bootstrap: str, topic: str, lead: int, handled: Any, produced: Any,
          stop: Any) -> None:
    """Write orders as fast as the pipeline takes them, at most ``lead`` ahead."""
    import confluent_kafka

    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "linger.ms": 20,
                                         "batch.size": 512 * 1024,
                                         "queue.buffering.max.messages": 200_000})
    i = 0
    users = [f"user-{u:04d}" for u in range(1000)]
    produce, poll = producer.produce, producer.poll
    while not stop.is_set():
        room = lead - (i - handled.value)
        if room <= 0:
            poll(0.01)
            continue
        for j in range(i, i + min(room, 10_000)):
            value = (f'{{"id":{j},"user":"{users[j % 1000]}","amount":{j % 997}.{j % 100:02d},'
                     f'"currency":"EUR","ts":{1_700_000_000_000 + j}}}').encode()
            while True:
                try:
                    produce(topic, value, partition=j % PARTITIONS)
                    break
                except BufferError:
                    poll(0.01)
        i += min(room, 10_000)
        produced.value = i
        poll(0)
    producer.flush(30)


# -- sampling ---------------------------------------------------------------------------------

_libc: Any = None


def _trim() -> None:
    """glibc malloc_trim(0): return free heap memory to the system (a no-op elsewhere)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def threads() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


@dataclass
class Sample:
    t: float            # seconds since the pipeline started
    rss_mb: float
    threads: int
    written: int        # rows committed by the sink so far
    fill: dict[str, float]


@dataclass
class Summary:
    client: str
    db: str
    seconds: float
    messages: int
    rate: float                   # rows/s over the steady part
    slope_mb_per_min: float
    rss_start_mb: float
    rss_end_mb: float
    rss_max_mb: float
    threads_start: int
    threads_end: int
    threads_max: int
    steady_ratio: float           # rate in the last third / rate in the first third
    mean_fill: dict[str, float]
    confirmed: bool               # the slope was decided by the --confirm extension
    trim: bool
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(self.checks.values())

    def text(self) -> str:
        fills = ", ".join(f"{k} {v:.0%}" for k, v in self.mean_fill.items())
        lines = [
            f"soak {self.client} -> {self.db}: {self.seconds:.0f} s, "
            f"{self.messages:,} messages, {self.rate:,.0f} msg/s steady",
            f"  memory   {self.rss_start_mb:.1f} -> {self.rss_end_mb:.1f} MB (max "
            f"{self.rss_max_mb:.1f}), slope {self.slope_mb_per_min:+.3f} MB/min"
            f"{' (confirmed over the longer run)' if self.confirmed else ''}"
            f"{'' if self.trim else ' [no malloc_trim]'}",
            f"  threads  {self.threads_start} -> {self.threads_end} (max {self.threads_max})",
            f"  rate     last third / first third of the steady part: {self.steady_ratio:.2f}",
            f"  queues   mean fill: {fills}",
            "  checks   " + ", ".join(f"{k} {'ok' if v else 'FAILED'}"
                                      for k, v in self.checks.items()),
        ]
        return "\n".join(lines)


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def _medians(samples: list[Sample], width: float) -> list[tuple[float, float]]:
    """(minute, median RSS) of each ``width`` seconds of samples."""
    groups: dict[int, list[Sample]] = {}
    for s in samples:
        groups.setdefault(int((s.t - samples[0].t) // width), []).append(s)
    return [(statistics.median(s.t for s in g) / 60, statistics.median(s.rss_mb for s in g))
            for g in groups.values()]


def summarise(samples: list[Sample], warmup: float, *, client: str, db: str,
              max_slope: float, min_steady: float, confirmed: bool, trim: bool) -> Summary:
    steady = [s for s in samples if s.t >= warmup]
    if len(steady) < 4:
        raise RuntimeError(f"only {len(steady)} samples after the warm-up: run longer")
    mb_per_min = slope(_medians(steady, 5.0))
    first, last = steady[0], steady[-1]
    third = max(1, len(steady) // 3)

    def rate(a: Sample, b: Sample) -> float:
        return (b.written - a.written) / (b.t - a.t) if b.t > a.t else 0.0

    head = rate(steady[0], steady[third])
    tail = rate(steady[-1 - third], steady[-1])
    names = list(first.fill)
    mean_fill = {n: statistics.fmean(s.fill.get(n, 0.0) for s in steady) for n in names}
    summary = Summary(
        client=client, db=db, seconds=samples[-1].t, messages=samples[-1].written,
        rate=rate(first, last), slope_mb_per_min=mb_per_min, rss_start_mb=first.rss_mb,
        rss_end_mb=last.rss_mb, rss_max_mb=max(s.rss_mb for s in steady),
        threads_start=first.threads, threads_end=last.threads,
        threads_max=max(s.threads for s in steady),
        steady_ratio=tail / head if head else 0.0, mean_fill=mean_fill,
        confirmed=confirmed, trim=trim)
    summary.checks = {
        "memory flat": mb_per_min < max_slope,
        "no thread growth": summary.threads_end <= summary.threads_start
        and summary.threads_max <= summary.threads_start,
        "throughput steady": summary.steady_ratio >= min_steady and summary.rate > 0,
    }
    return summary


# -- the run ----------------------------------------------------------------------------------

def _parse(raw: dict[str, Any]) -> dict[str, Any]:
    return {"id": raw["id"], "user_name": raw["user"],
            "amount_cents": round(raw["amount"] * 100), "currency": raw["currency"],
            "ts": raw["ts"]}


def soak(bootstrap: str, *, seconds: float, client: str = "kafka-python",
         db: str | None = None, interval: float = 1.0, warmup: float | None = None,
         confirm: float = 0.0, max_slope: float = 1.0, min_steady: float = 0.5,
         lead: int = 300_000, trim: bool = True, capped: bool = True,
         say: Any = print) -> tuple[Summary, list[Sample]]:
    """Run the soak against the broker at ``bootstrap``; see the module docstring."""
    import nanostream as ns
    from nanostream.kafka import kafka_source
    from nanostream.sql import sql_sink
    from tests.kafka_support import create_topic

    topic = create_topic(bootstrap, f"soak-{uuid.uuid4().hex[:10]}", PARTITIONS)
    table = f"soak_{uuid.uuid4().hex[:10]}"
    tmp = None
    if db is None:
        tmp = tempfile.TemporaryDirectory(prefix="nanostream-soak-")
        url = os.path.join(tmp.name, "soak.db")
        shown = "sqlite"
    else:
        url = db
        shown = db.split(":", 1)[0]
    if warmup is None:
        warmup = min(60.0, seconds / 3)
    ctx = mp.get_context("spawn")
    handled, produced, stop = ctx.Value("q", 0, lock=False), ctx.Value("q", 0, lock=False), \
        ctx.Event()
    feeder = ctx.Process(target=_feed, args=(bootstrap, topic, lead, handled, produced, stop),
                         name="soak-feeder", daemon=True)
    feeder.start()
    options = dict(CONFLUENT_OPTIONS if client == "confluent" else KAFKA_PYTHON_OPTIONS)
    if not capped:   # the clients' own prefetch limits
        for name in _CAPS:
            options.pop(name, None)
    pipeline = (kafka_source(topic, bootstrap_servers=bootstrap, group_id=f"soak-{table}",
                             client=client, auto_offset_reset="earliest", **options)
                | ns.transform(_parse, name="parse")
                | sql_sink(url, table, create=True, name="sql"))
    samples: list[Sample] = []
    summary: Summary | None = None
    try:
        run = pipeline.start()
        t0 = time.monotonic()
        total = seconds
        next_sample = t0
        confirmed = False
        while True:
            now = time.monotonic()
            if now - t0 >= total:
                summary = summarise(samples, warmup, client=client, db=shown,
                                    max_slope=max_slope, min_steady=min_steady,
                                    confirmed=confirmed, trim=trim)
                if summary.checks["memory flat"] or confirmed or not confirm:
                    break
                say(f"  slope {summary.slope_mb_per_min:+.2f} MB/min over "
                    f"{seconds - warmup:.0f} s is over {max_slope:g}: confirming over "
                    f"{confirm:g} s more")
                total, confirmed = seconds + confirm, True
            if run.join(timeout=max(0.0, next_sample - time.monotonic())):
                raise RuntimeError("the soak pipeline ended by itself")
            next_sample += interval
            stats = run.stats()
            written = stats["sql"].items_in
            handled.value = stats["parse"].items_in
            if trim:
                _trim()
            fill = {s.name: s.queue.fill for s in stats.stages if s.queue is not None}
            samples.append(Sample(round(time.monotonic() - t0, 3), rss_mb(), threads(),
                                  written, fill))
            if len(samples) % max(1, int(30 / interval)) == 0:
                s = samples[-1]
                say(f"  {s.t:6.0f} s  {s.written:>11,} rows  RSS {s.rss_mb:7.1f} MB  "
                    f"threads {s.threads}  fill " + " ".join(f"{k} {v:.0%}"
                                                             for k, v in s.fill.items()))
        run.stop(drain=False)
        run.join(30)
    finally:
        stop.set()
        feeder.join(30)
        if feeder.is_alive():
            feeder.kill()
        if db is not None:
            _drop(db, table)
        if tmp is not None:
            tmp.cleanup()
    assert summary is not None
    return summary, samples


def _drop(url: str, table: str) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'DROP TABLE IF EXISTS "{table}"'))
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--client", choices=("kafka-python", "confluent"),
                        default="kafka-python")
    parser.add_argument("--db", help="a SQLAlchemy URL (default: a sqlite file in a temp dir)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, help="seconds left out of the fit "
                        "(default: a third of the run, at most 60)")
    parser.add_argument("--confirm", type=float, default=0.0,
                        help="seconds to run on when the slope is over the limit")
    parser.add_argument("--max-slope", type=float, default=1.0, help="MB per minute")
    parser.add_argument("--min-steady", type=float, default=0.5)
    parser.add_argument("--lead", type=int, default=300_000,
                        help="most messages the feeder keeps ahead of the pipeline")
    parser.add_argument("--no-trim", dest="trim", action="store_false",
                        help="read RSS without malloc_trim(0) first")
    parser.add_argument("--uncapped", dest="capped", action="store_false",
                        help="leave the Kafka clients' prefetch buffers at their defaults")
    parser.add_argument("--bootstrap", help="use this broker instead of starting Tansu")
    parser.add_argument("--json", help="write the summary and the samples to this file")
    args = parser.parse_args(argv)
    from tests.kafka_support import start_broker

    broker = None
    if args.bootstrap:
        bootstrap = args.bootstrap
    else:
        broker = start_broker()
        bootstrap = broker.bootstrap
    print(f"soak: {args.client}, {args.seconds:g} s, "
          f"{'sqlite' if args.db is None else args.db}", flush=True)
    try:
        summary, samples = soak(bootstrap, seconds=args.seconds, client=args.client,
                                db=args.db, interval=args.interval, warmup=args.warmup,
                                confirm=args.confirm, max_slope=args.max_slope,
                                min_steady=args.min_steady, lead=args.lead, trim=args.trim,
                                capped=args.capped,
                                say=lambda s: print(s, flush=True))
    finally:
        if broker is not None:
            broker.stop()
    print(summary.text(), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": {**asdict(summary), "ok": summary.ok},
                       "samples": [asdict(s) for s in samples]}, f)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
