"""Kafka chaos: kills, failures and rebalances while a producer keeps writing.

    python -m tests.kafka_chaos kill --events 100                 # kafka-python
    python -m tests.kafka_chaos all --events 30 --client both     # every mode, both clients
    python -m tests.kafka_chaos kill --events 30 --workers 4

A producer thread writes numbered messages ``{"i": 0}, {"i": 1}, ...`` to a topic at
``--rate`` messages per second for the whole run. ``--workers`` pipeline processes
(:mod:`tests.kafka_chaos_proc`: ``kafka_source(group) | transform | kafka_sink``)
share them in one consumer group and write ``{"i": i, "w": worker}`` to an output
topic. Meanwhile, ``--events`` times, at a random moment:

* ``kill``: a random member gets SIGKILL and is started again at once;
* ``fail``: a random member's transform raises on its next message (SIGUSR1), so its
  run fails with a StageError mid-stream; the process starts the pipeline again;
* ``rebalance``: a new member joins the group, gets its partitions, stays a random
  while and leaves (SIGTERM: drain, final commit, close);
* ``mixed``: the three kinds in turn, in random order (the CI test's short run);
* ``all``: the three modes one after the other, each with a fresh group.

After each event the driver waits until the pipeline has caught up (every message
produced up to just after the event has reached the output topic), then waits a
random time (0 to ``--gap`` s) before the next one. At the end the producer stops and
the members stop cleanly; the verifier, which reads the output topic all along,
checks that every produced message was handled at least once (``lost`` must be 0),
counts duplicates, and checks each event's duplicates against the in-flight bound.

The bound, per event (see :func:`in_flight_bound`): a member that dies, fails or has
its partitions revoked re-delivers at most what it had taken from Kafka but not yet
committed. That is (a) what it handled since its last completed commit, at most what
the pipeline can handle in two commit intervals (commits happen every
``commit_interval`` once a chunk has been passed on; a kill can land just before one
completes), taken as the highest output rate measured in any such window of the run;
plus (b) what was inside the pipeline, emitted but not yet handled, when that commit
was made: the source's chunk being passed on, the transform's queue and the batch it
works on, the sink's queue, the batch it took and its unacknowledged messages. One
event costs at most one member's (a)+(b) and one (b) for each member whose
partitions are revoked and assigned again; with ``m`` members at most,
``bound = (a) + (2 m - 1) * (b)``. A duplicate is attributed to the last event before
its second (third, ...) handling, by the output record's timestamp; duplicates from
the first join of the members count as a "start" event.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.kafka_support import _PRCTL  # prctl, resolved before any fork

ROOT = Path(__file__).resolve().parent.parent
MODES = ("kill", "fail", "rebalance", "mixed")
CLIENTS = ("kafka-python", "confluent")
PARTITIONS = 4
OUT_PARTITIONS = 3


@dataclass(frozen=True)
class Settings:
    """One chaos run's knobs (the pipeline sizes feed the duplicate bound)."""

    mode: str = "kill"
    client: str = "kafka-python"
    events: int = 10
    workers: int = 2                 # members of the group between events
    rate: int = 3000                 # messages per second written by the producer
    gap: float = 2.0                 # most seconds between caught-up and the next event
    commit_interval: float = 0.2
    queue_size: int = 256            # the transform's and the sink's input queues
    max_in_flight: int = 1000        # the sink's unacknowledged messages
    seed: int | None = None
    recover_timeout: float = 60.0    # most seconds to catch up after an event
    partitions: int = PARTITIONS


@dataclass
class Event:
    kind: str
    at: float                        # time.time() when it happened
    member: str
    duplicates: int = 0


@dataclass
class Result:
    mode: str
    client: str
    events: int
    produced: int
    handled: int                     # output messages, duplicates included
    lost: int
    duplicates: int
    worst_event: int                 # most duplicates attributed to one event
    bound: int                       # the in-flight bound per event
    pipeline_capacity: int           # (b) of the bound
    window_peak: int                 # (a) of the bound
    seconds: float
    failures_seen: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    thread_growth: int = 0           # most threads a member gained over its failed runs
    connection_drops: int = 0        # times a member's connector lost the broker a while
    per_event: list[int] = field(default_factory=list)
    missing_sample: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.worst_event <= self.bound and not self.thread_growth

    def line(self) -> str:
        return (f"{self.mode:<9} {self.client:<12} events {self.events:>4}  produced "
                f"{self.produced:>9,}  lost {self.lost}  duplicates {self.duplicates:>7,}  "
                f"worst/event {self.worst_event:>6,} (bound {self.bound:,})  "
                f"{self.seconds:6.1f} s  {'ok' if self.ok else 'FAILED'}")


def pipeline_capacity(settings: Settings) -> int:
    """(b): messages that can be inside one member's pipeline, emitted by the source
    but not yet handled, from the runtime's and the connector's sizes."""
    from nanostream import _runtime, kafka

    chunk, batch, q = kafka.CHUNK, _runtime.BATCH, settings.queue_size
    sink_window = min(kafka.ACK_EVERY, settings.max_in_flight)
    # a list longer than a queue's room enters it whole once the queue is empty
    return (chunk                    # the chunk the source is passing on
            + max(q, chunk)          # the transform's queue (chunks enter whole)
            + batch                  # the batch the transform works on
            + max(q, batch)          # the sink's queue (the transform's batches)
            + batch                  # the batch the sink took from its queue
            + sink_window)           # sent, not yet acknowledged


def in_flight_bound(settings: Settings, window_peak: int, members: int) -> int:
    """The most duplicates one event may cause (see the module's docstring)."""
    return window_peak + (2 * members - 1) * pipeline_capacity(settings)


# -- the producer and the verifier ----------------------------------------------------------

class Producer:
    """Writes ``{"i": i}`` to partition ``i % partitions`` at ``rate`` per second."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, rate: int) -> None:
        import confluent_kafka

        self.producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap,
                                                  "linger.ms": 5, "acks": "all"})
        self.topic, self.partitions, self.rate = topic, partitions, rate
        self.sent = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-producer", daemon=True)

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.errors.append(str(err))

    def _run(self) -> None:
        produce, poll = self.producer.produce, self.producer.poll
        topic, parts = self.topic, self.partitions
        start = time.monotonic()
        while not self._stop.is_set():
            due = int((time.monotonic() - start) * self.rate)
            for i in range(self.sent, due):
                while True:
                    try:
                        produce(topic, b'{"i":%d}' % i, partition=i % parts,
                                on_delivery=self._delivered)
                        break
                    except BufferError:
                        poll(0.05)
            self.sent = max(self.sent, due)
            poll(0)
            self._stop.wait(0.01)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> int:
        """Stop writing; returns how many messages were written (all acknowledged)."""
        self._stop.set()
        self._thread.join()
        left = self.producer.flush(30)
        if left or self.errors:
            raise RuntimeError(f"the chaos producer could not deliver {left} messages: "
                               f"{self.errors[:3]}")
        return self.sent


class Verifier:
    """Reads the output topic from the start, all along: how often each id was handled,
    and when (the record's timestamp) each handling after the first happened."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        import confluent_kafka

        self.ck = confluent_kafka
        self.consumer = confluent_kafka.Consumer({
            "bootstrap.servers": bootstrap, "group.id": f"verifier-{uuid.uuid4().hex}",
            "enable.auto.commit": False, "enable.partition.eof": False})
        self.consumer.assign([confluent_kafka.TopicPartition(topic, p,
                                                             confluent_kafka.OFFSET_BEGINNING)
                              for p in range(partitions)])
        self.topic, self.partitions, self.bootstrap = topic, partitions, bootstrap
        self.next_offset: dict[int, int] = {}   # partition -> offset after the last read
        self.counts = bytearray()        # id -> times handled (saturating at 255)
        self.extra = 0                   # handlings beyond 255 of one id
        self.again: list[float] = []     # timestamps (s) of every handling after the first
        self.bins: Counter[int] = Counter()   # outputs per 50 ms, by timestamp
        self.prefix = 0                  # every id below this was handled
        self.total = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-verifier", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            consume = self.consumer.consume
            loads = json.loads
            while not self._stop.is_set():
                for m in consume(num_messages=10_000, timeout=0.1):
                    if m.error() is not None:
                        continue
                    i = loads(m.value())["i"]
                    ts = m.timestamp()[1] / 1000.0
                    self.bins[int(ts * 20)] += 1
                    self.total += 1
                    counts = self.counts
                    if i >= len(counts):
                        counts.extend(bytes(i + 1 - len(counts) + 100_000))
                    c = counts[i]
                    if c:
                        self.again.append(ts)
                    if c < 255:
                        counts[i] = c + 1
                    else:
                        self.extra += 1
                    # last: caught_up() then means every message read is counted
                    self.next_offset[m.partition()] = m.offset() + 1
                prefix, counts = self.prefix, self.counts
                while prefix < len(counts) and counts[prefix]:
                    prefix += 1
                self.prefix = prefix
        except BaseException as exc:  # reported by wait_for()
            self.error = exc

    def caught_up(self) -> bool:
        """Everything in the output topic up to its current end has been read."""
        ck = self.ck
        probe = ck.Consumer({"bootstrap.servers": self.bootstrap,
                             "group.id": f"verifier-{uuid.uuid4().hex}"})
        try:
            for p in range(self.partitions):
                _, high = probe.get_watermark_offsets(ck.TopicPartition(self.topic, p),
                                                      timeout=5)
                if self.next_offset.get(p, 0) < high:
                    return False
            return True
        finally:
            probe.close()

    def wait_for(self, n: int, timeout: float) -> bool:
        """Wait until ids 0..n-1 have all been handled; False after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while self.prefix < n:
            if self.error is not None:
                raise RuntimeError("the chaos verifier failed") from self.error
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def window_peak(self, seconds: float) -> int:
        """The most outputs with timestamps within any ``seconds`` of the run."""
        width = max(1, round(seconds * 20))
        if not self.bins:
            return 0
        lo, hi = min(self.bins), max(self.bins)
        series = [self.bins.get(b, 0) for b in range(lo, hi + 1)]
        best = run = sum(series[:width])
        for k in range(width, len(series)):
            run += series[k] - series[k - width]
            best = max(best, run)
        return best

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.consumer.close()


# -- the members ----------------------------------------------------------------------------

class Member:
    """One pipeline process and what it printed."""

    def __init__(self, name: str, config: dict[str, Any]) -> None:
        self.name = name
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH"))
                                            if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.kafka_chaos_proc", json.dumps(dict(config,
                                                                           worker=name))],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=_die_with_driver if _PRCTL is not None else None)
        self.lines: list[str] = []
        self.stderr = ""
        self.assigned = threading.Event()     # holds a non-empty assignment now
        self.failures = 0
        self.connection_drops = 0         # the connector lost the broker for a while
        self.threads_after_failure: list[int] = []
        self._cond = threading.Condition()
        self._readers = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for t in self._readers:
            t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            self._lines(self.proc.stdout)

    def _lines(self, stream: Any) -> None:
        for line in stream:
            line = line.strip()
            with self._cond:
                self.lines.append(line)
                word, _, rest = line.partition(" ")
                if word == "assigned" and rest not in ("", "[]"):
                    self.assigned.set()
                elif word in ("revoked", "lost"):
                    self.assigned.clear()
                elif word == "broker" and rest.startswith("lost"):
                    self.connection_drops += 1
                elif word == "failed":
                    self.failures += 1
                    self.threads_after_failure.append(int(rest.split()[1]))
                self._cond.notify_all()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr:
            self.stderr = self.proc.stderr.read()

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate() or self.proc.poll() is not None,
                                       timeout) and predicate()

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def finish(self, timeout: float = 30.0) -> int:
        """Stop cleanly (SIGTERM) and return the exit code; SIGKILL after ``timeout``."""
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"member {self.name} did not stop within {timeout:g} s "
                               "of SIGTERM") from None
        finally:
            for t in self._readers:
                t.join(5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for t in self._readers:
            t.join(5)


def _die_with_driver() -> None:  # pragma: no cover - runs in the child before exec
    # PR_SET_PDEATHSIG: a member gets SIGKILL when the driver's thread that started it
    # dies, so an interrupted run leaves no member behind
    _PRCTL(1, signal.SIGKILL)


# -- one run --------------------------------------------------------------------------------

def run_chaos(bootstrap: str, settings: Settings,
              say: Callable[[str], None] = lambda s: None) -> Result:
    """One chaos run against the broker at ``bootstrap``; see the module docstring."""
    from tests.kafka_support import create_topic, unique_topic

    if settings.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {settings.mode!r}")
    rng = random.Random(settings.seed)
    t0 = time.monotonic()
    source = create_topic(bootstrap, unique_topic(f"chaos-{settings.mode}-in"),
                          settings.partitions)
    out = create_topic(bootstrap, unique_topic(f"chaos-{settings.mode}-out"), OUT_PARTITIONS)
    config = dict(bootstrap=bootstrap, source=source, out=out, client=settings.client,
                  group=unique_topic("chaos-group"), commit_interval=settings.commit_interval,
                  queue_size=settings.queue_size, max_in_flight=settings.max_in_flight,
                  group_options=_group_options(settings.client))
    serial = iter(range(1, 1 << 30))

    def member() -> Member:
        return Member(f"m{next(serial)}", config)

    producer = Producer(bootstrap, source, settings.partitions, settings.rate)
    verifier = Verifier(bootstrap, out, OUT_PARTITIONS)
    members: list[Member] = []
    gone: list[Member] = []
    events: list[Event] = [Event("start", time.time(), "-")]
    kinds_seen: Counter[str] = Counter()
    failures_seen = 0
    try:
        producer.start()
        members = [member() for _ in range(settings.workers)]
        _recover(verifier, producer, settings, members, "the first join")
        kinds = ("kill", "fail", "rebalance") if settings.mode == "mixed" else (settings.mode,)
        plan = [kinds[k % len(kinds)] for k in range(settings.events)]
        rng.shuffle(plan)   # mixed: every kind as often as the others, in random order
        for k, kind in enumerate(plan):
            time.sleep(rng.uniform(0, settings.gap))
            if kind == "kill":
                victim = rng.choice(members)
                events.append(Event(kind, time.time(), victim.name))
                victim.kill()
                if victim.proc.returncode != -signal.SIGKILL:
                    raise RuntimeError(f"member {victim.name} had exited before the kill "
                                       f"(code {victim.proc.returncode}): {victim.stderr}")
                members.remove(victim)
                gone.append(victim)
                members.append(member())
            elif kind == "fail":
                victim = rng.choice(members)
                before = victim.failures
                # the failure needs a message: wait until the member holds partitions
                if not victim.wait(victim.assigned.is_set, settings.recover_timeout):
                    raise RuntimeError(_stuck(f"member {victim.name} got no partitions",
                                              members))
                events.append(Event(kind, time.time(), victim.name))
                victim.signal(signal.SIGUSR1)
                if not victim.wait(lambda v=victim, b=before: v.failures > b,
                                   settings.recover_timeout):
                    raise RuntimeError(_stuck(f"member {victim.name} did not fail on its "
                                              "next message", members))
                failures_seen += 1
            else:
                joiner = member()
                events.append(Event(kind, time.time(), joiner.name))
                if not joiner.wait(joiner.assigned.is_set, settings.recover_timeout):
                    raise RuntimeError(_stuck(f"member {joiner.name} got no partitions",
                                              [*members, joiner]))
                time.sleep(rng.uniform(0, settings.gap))
                code = joiner.finish()
                gone.append(joiner)
                if code != 0:
                    raise RuntimeError(f"member {joiner.name} exited with {code}: "
                                       f"{joiner.stderr}")
            kinds_seen[kind] += 1
            _recover(verifier, producer, settings, members, f"event {k + 1} ({kind})")
            say(f"  event {k + 1}/{settings.events} {kind:<9} produced {producer.sent:>9,}  "
                f"handled {verifier.total:>9,}  {time.monotonic() - t0:6.1f} s")
        produced = producer.stop()
        complete = verifier.wait_for(produced, settings.recover_timeout)
        for m in members:
            code = m.finish()
            if code != 0:
                raise RuntimeError(f"member {m.name} exited with {code}: {m.stderr}")
        gone += members
        members = []
        deadline = time.monotonic() + 30
        while not verifier.caught_up() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        if producer._thread.is_alive():
            producer._stop.set()
        for m in members:
            m.kill()
        verifier.close()
    growth = max((m.threads_after_failure[-1] - m.threads_after_failure[0]
                  for m in gone if m.threads_after_failure), default=0)
    counts = memoryview(verifier.counts)[:produced]
    missing = [] if complete else [i for i, c in enumerate(counts) if not c]
    window = verifier.window_peak(2 * settings.commit_interval)
    most = settings.workers + (1 if settings.mode in ("rebalance", "mixed") else 0)
    again = sorted(verifier.again)
    times = [e.at for e in events]
    for ts in again:
        events[max(0, bisect.bisect_right(times, ts) - 1)].duplicates += 1
    per_event = [e.duplicates for e in events]
    stray = sum(1 for i in range(produced, len(verifier.counts)) if verifier.counts[i])
    if stray:
        raise RuntimeError(f"{stray} output ids were never produced")
    return Result(mode=settings.mode, client=settings.client, events=settings.events,
                  produced=produced, handled=verifier.total, lost=len(missing),
                  duplicates=len(again), worst_event=max(per_event),
                  bound=in_flight_bound(settings, window, most),
                  pipeline_capacity=pipeline_capacity(settings), window_peak=window,
                  seconds=time.monotonic() - t0, failures_seen=failures_seen,
                  per_event=per_event, missing_sample=missing[:20], kinds=dict(kinds_seen),
                  thread_growth=growth,
                  connection_drops=sum(m.connection_drops for m in gone))


def _group_options(client: str) -> dict[str, int]:
    from tests.kafka_support import CONFLUENT_TANSU_FAST_GROUP, TANSU_FAST_GROUP

    return dict(CONFLUENT_TANSU_FAST_GROUP if client == "confluent" else TANSU_FAST_GROUP)


def _recover(verifier: Verifier, producer: Producer, settings: Settings,
             members: list[Member], what: str) -> None:
    """Wait until every message produced up to now, and one more per partition, has
    been handled: each partition's new owner has then passed the point of the event."""
    target = producer.sent + settings.partitions
    if not verifier.wait_for(target, settings.recover_timeout):
        raise RuntimeError(_stuck(f"after {what} the pipeline did not catch up within "
                                  f"{settings.recover_timeout:g} s (handled every id below "
                                  f"{verifier.prefix:,}, waiting for {target:,})", members))


def _stuck(message: str, members: list[Member]) -> str:
    tails = "\n".join(f"  {m.name} (exit {m.proc.poll()}): {m.lines[-5:]} {m.stderr[-2000:]}"
                      for m in members)
    return f"{message}\n{tails}"


# -- the command line -----------------------------------------------------------------------

def _runs(mode: str, client: str) -> Iterator[tuple[str, str]]:
    for c in (CLIENTS if client == "both" else (client,)):
        for m in (("kill", "fail", "rebalance") if mode == "all" else (mode,)):
            yield m, c


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.kafka_chaos",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=(*MODES, "all"))
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--client", choices=(*CLIENTS, "both"), default="kafka-python")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", type=int, default=Settings.rate)
    parser.add_argument("--gap", type=float, default=Settings.gap)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--bootstrap", help="use this broker instead of starting Tansu")
    parser.add_argument("--json", help="append each run's result to this file (JSON lines)")
    args = parser.parse_args(argv)
    from tests.kafka_support import start_broker

    broker = None
    if args.bootstrap:
        bootstrap = args.bootstrap
    else:
        broker = start_broker()
        bootstrap = broker.bootstrap
    results = []
    try:
        for mode, client in _runs(args.mode, args.client):
            settings = Settings(mode=mode, client=client, events=args.events,
                                workers=args.workers, rate=args.rate, gap=args.gap,
                                seed=args.seed)
            print(f"{mode} with {client}: {args.events} events, {args.workers} members, "
                  f"{args.rate:,} msg/s", flush=True)
            result = run_chaos(bootstrap, settings, say=lambda s: print(s, flush=True))
            results.append(result)
            print(result.line(), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({**asdict(result), "workers": args.workers,
                                        "rate": args.rate}) + "\n")
    finally:
        if broker is not None:
            broker.stop()
    print()
    for r in results:
        print(r.line())
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
