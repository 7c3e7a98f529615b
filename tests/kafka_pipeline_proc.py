"""A Kafka -> transform -> Kafka pipeline in a process of its own, for tests/test_kafka.py.

    python tests/kafka_pipeline_proc.py '<json config>'

Config keys: ``bootstrap``, ``source`` (topic), ``out`` (topic), ``group``, ``client``,
``worker`` (a name written into each output), ``group_options`` (client options),
``stop_at_end`` (end by itself), ``partitions`` (assign these instead of joining
the group's assignment), ``delay`` (seconds of work per message), ``log``
(a file receiving the connector's log, e.g. its partition assignments).

Each input ``{"i": i}`` becomes ``{"i": i, "by": worker}`` in ``out``. The process
stops cleanly (drain, final commit, close) on SIGTERM; the tests also SIGKILL it.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
import warnings


def main() -> None:
    config = json.loads(sys.argv[1])
    warnings.simplefilter("ignore", DeprecationWarning)  # kafka-python's import
    if config.get("log"):
        handler = logging.FileHandler(config["log"])
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        logger = logging.getLogger("nanostream.kafka")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)

    import nanostream as ns
    from nanostream.kafka import kafka_sink, kafka_source

    worker = config["worker"]
    delay = config.get("delay", 0.0)

    def mark(order: dict) -> dict:
        if delay:
            time.sleep(delay)
        return {"i": order["i"], "by": worker}

    pipeline = (
        kafka_source(config["source"], bootstrap_servers=config["bootstrap"],
                     group_id=config["group"], client=config["client"],
                     auto_offset_reset="earliest", commit_interval=0.2,
                     stop_at_end=config.get("stop_at_end", False),
                     partitions=config.get("partitions"),
                     **config.get("group_options", {}))
        | ns.transform(mark, workers=4, ordered=False)
        | kafka_sink(config["out"], bootstrap_servers=config["bootstrap"],
                     client=config["client"])
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    run = pipeline.start()
    while not run.join(timeout=0.1):
        if stop.is_set():
            run.stop()
    run.join()
    print("finished", flush=True)


if __name__ == "__main__":
    main()
