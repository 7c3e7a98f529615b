"""One member of the Kafka chaos runs (tests/kafka_chaos.py), in a process of its own.

    python -m tests.kafka_chaos_proc '<json config>'

The pipeline is ``kafka_source(group) | transform(mark) | kafka_sink``: each input
``{"i": i}`` becomes ``{"i": i, "w": worker}`` in the output topic, at least once.

Config keys: ``bootstrap``, ``source`` and ``out`` (topics), ``group``, ``client``,
``worker`` (a name written into each output), ``group_options`` (client options),
``commit_interval``, ``queue_size`` (of the transform and the sink), ``max_in_flight``
(of the sink). The sizes are what the chaos driver's duplicate bound is computed from.

Signals: SIGKILL (the driver's kill mode) ends it anywhere; SIGTERM stops it cleanly
(drain, final commit, close: a member leaving the group); SIGUSR1 makes the transform
raise on its next message, so the run fails with a StageError mid-stream; the process
then starts the same pipeline again at once, as a supervisor would (the fail mode).

Lines on stdout, for the driver: ``assigned [...]`` / ``revoked [...]`` (the
connector's log of partition assignments), ``broker ...`` (its log of a lost and
regained connection),
``failed <n> <threads>`` after an injected failure (with the process's thread count
once the failed run has ended), ``finished`` at a clean exit.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import warnings


class _ToStdout(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for word in ("assigned", "revoked", "lost"):
            if f": {word} [" in message:   # not "lost the connection ..."
                print(word, message.split(f": {word} ", 1)[1], flush=True)
                return
        if "the connection" in message or "the broker is back" in message:
            print("broker", message.split(": ", 1)[1], flush=True)


def main() -> None:
    config = json.loads(sys.argv[1])
    warnings.simplefilter("ignore", DeprecationWarning)  # kafka-python's import
    logger = logging.getLogger("nanostream.kafka")
    logger.addHandler(_ToStdout())
    logger.setLevel(logging.INFO)

    import nanostream as ns
    from nanostream import StageError
    from nanostream.kafka import kafka_sink, kafka_source

    worker = config["worker"]
    fail = threading.Event()
    stop = threading.Event()

    def mark(message: dict) -> dict:
        if fail.is_set():
            fail.clear()
            raise RuntimeError("chaos: an injected failure")
        return {"i": message["i"], "w": worker}

    def pipeline() -> ns.Pipeline:
        return (
            kafka_source(config["source"], bootstrap_servers=config["bootstrap"],
                         group_id=config["group"], client=config["client"],
                         auto_offset_reset="earliest",
                         commit_interval=config["commit_interval"],
                         **config.get("group_options", {}))
            | ns.transform(mark, queue_size=config["queue_size"])
            | kafka_sink(config["out"], bootstrap_servers=config["bootstrap"],
                         client=config["client"], queue_size=config["queue_size"],
                         max_in_flight=config["max_in_flight"])
        )

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: fail.set())
    failures = 0
    while not stop.is_set():
        run = pipeline().start()
        try:
            while not run.join(timeout=0.05):
                if stop.is_set():
                    run.stop()
            run.join()
        except StageError as exc:
            if "injected failure" not in str(exc.__cause__):
                raise
            failures += 1
            # the failed run's threads, its consumer's and producer's included, are gone
            print("failed", failures, threading.active_count(), flush=True)
            continue
        break
    print("finished", flush=True)


if __name__ == "__main__":
    main()
