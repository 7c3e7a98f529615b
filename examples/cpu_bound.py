"""A CPU-bound stage on worker processes: ``executor="process"``.

Threads cannot run pure-Python computations in parallel (the GIL), so a stage that
burns CPU runs on worker processes instead: ``@ns.transform(executor="process",
workers=N)``. Items and results are pickled across (functions with cloudpickle,
so lambdas and closures work too); output order is kept.

    python examples/cpu_bound.py [--numbers 40] [--workers 2]
"""

import argparse
import os
import time

import nanostream as ns


def count_primes(limit):
    """Deliberately slow, pure-Python prime counting (a stand-in for real work)."""
    count = 0
    for n in range(2, limit):
        if all(n % d for d in range(2, int(n ** 0.5) + 1)):
            count += 1
    return count


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numbers", type=int, default=40, help="how many items (default 40)")
    parser.add_argument("--size", type=int, default=20_000, help="work per item")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    limits = [args.size + i for i in range(args.numbers)]

    t0 = time.perf_counter()
    serial = [count_primes(n) for n in limits]
    t_serial = time.perf_counter() - t0

    primes = ns.transform(count_primes, executor="process", workers=args.workers)
    t0 = time.perf_counter()
    parallel = list(limits | primes)
    t_parallel = time.perf_counter() - t0

    assert parallel == serial, "same results, same order"
    print(f"{len(limits)} items: serial {t_serial:.2f} s, "
          f"{args.workers} worker processes {t_parallel:.2f} s "
          f"({t_serial / t_parallel:.1f}x)")


if __name__ == "__main__":
    main()
