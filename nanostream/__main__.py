"""``python -m nanostream``: a demo pipeline that needs no external service.

It reads a small built-in text, counts words with a generator transform, runs a
slow "enrichment" step with eight worker threads, fans out to two sinks and
prints the run report.
"""

from __future__ import annotations

import time
from collections import Counter

import nanostream as ns

TEXT = """\
Streaming tools give a clear way to build data pipelines.
Write each step, connect the steps into a graph, and let the system run it.
Most data is big enough, not big: it deserves that clarity without a cluster.
"""


def main() -> None:
    @ns.source
    def lines():
        yield from TEXT.splitlines()

    @ns.transform
    def words(line):
        for word in line.lower().split():
            yield word.strip(".,:")

    @ns.transform(workers=8)
    def enrich(word):
        time.sleep(0.01)  # stands in for a network call; 8 run at once
        return word, len(word)

    counts: Counter[str] = Counter()
    longest: list[tuple[str, int]] = []

    @ns.sink
    def count(pair):
        counts[pair[0]] += 1

    @ns.sink
    def keep_long(pair):
        if pair[1] >= 8:
            longest.append(pair)

    pipeline = lines | words | ns.filter(bool) | enrich | (count, keep_long)
    print(f"pipeline: {pipeline!r}\n")
    report = pipeline.run()
    print("most common words:", ", ".join(f"{w} ({n})" for w, n in counts.most_common(5)))
    print("long words:", ", ".join(sorted({w for w, _ in longest})))
    print()
    print(report)


if __name__ == "__main__":
    main()
