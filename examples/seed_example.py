"""The example from the original nanostream README, on today's runtime.

A counter sends numbers forever; three workers print them, each taking a second
per message, so the counter is held back by the full queue (back-pressure)
instead of filling memory. The classes below are the README's, changed only for
Python 3 (``print(message)``); the lines after them run the graph for a few seconds
and stop it, where the original ran until interrupted.

    python examples/seed_example.py [--seconds 5]
"""

import argparse
import time

from nanostream import NanoStreamGraph, NanoStreamListener, NanoStreamSender


class NanoCounter(NanoStreamSender):

    def __init__(self):
        self.counter = 0
        super(NanoCounter, self).__init__()  # noqa: UP008 - verbatim from the seed

    def start(self):
        while 1:
            output = 'NanoCounter:' + str(self.counter)
            self.counter += 1
            self.queue_message(output)


class NanoMultiPrint(NanoStreamListener):
    def process_item(self, message):
        print(message)
        time.sleep(1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="how long to run before stopping (default 5)")
    args = parser.parse_args(argv)

    nano_counter = NanoCounter()
    nano_multi_print = NanoMultiPrint(workers=3)
    pipeline = NanoStreamGraph()
    pipeline.add_edge(nano_counter, nano_multi_print)
    pipeline.start()                      # returns at once: the graph runs in threads

    time.sleep(args.seconds)
    pipeline.stop()                       # ends the counter's endless loop
    print(f"stopped after {args.seconds:g} s; the counter got to {nano_counter.counter}, "
          "held back by the full queue in front of the slow printers:")
    print(pipeline.run.stats())

if __name__ == "__main__":
    main()
