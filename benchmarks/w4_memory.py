"""W4 - memory stays flat whatever the stream's length.

    ns.from_iterable(strings(n)) | transform(shout) | transform(flip) | transform(calm) | sink(count)

Items are 1 KB strings made lazily by a generator, and each of the three transform
stages makes a new 1 KB string, so only buffering inside the pipeline can make
memory grow with n. Each run happens in a fresh subprocess
(``python -m benchmarks.w4_memory --child NAME N``) that reports its own
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the pipeline has finished; the
figure is peak RSS(2M items) - peak RSS(200k items) in MB. Libraries are imported
before the pipeline runs in both children, so imports cancel out.

Baseline ("limit"): the same stages as a chain of plain generators. There is no
ratio column (a ratio of two near-zero deltas means nothing). Target: nanostream
delta <= 30 MB. pypeln and streamz are left out: at 20-150k items/s a 2M-item run
takes minutes, and streamz is synchronous (it has no buffer to measure).

Why the children are started through ``/bin/sh``: Linux keeps ``ru_maxrss`` across
``execve``, and Python's subprocess starts children with vfork+exec, so a child
started directly reports at least the *suite's* peak RSS. A child forked by a small
shell starts from the shell's high-water mark instead. The child also reports
``VmHWM`` from /proc/self/status as a cross-check (JSON output only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from typing import Any

from benchmarks._harness import (
    LIMIT,
    PEER,
    SUBJECT,
    Contender,
    Measurement,
    Target,
    Workload,
    register,
)

ITEM_CHARS = 1024


def strings(n: int):
    base = "a" * (ITEM_CHARS - 24)
    for i in range(n):
        yield f"{base}{i:024d}"


# Each stage returns a new 1 KB string (cheap ops: the workload is about memory).
def shout(s: str) -> str:
    return s.replace("a", "A", 1)


def flip(s: str) -> str:
    return s[1:] + s[0]


def calm(s: str) -> str:
    return s.replace("A", "a", 1)


def make_count():
    box = [0, 0]  # items, characters

    def count(s):
        box[0] += 1
        box[1] += len(s)

    return count, box


# ------------------------------------------------- pipelines (run in the child)


def child_nanostream(n: int) -> list[int]:
    import nanostream as ns
    from nanostream import sink, transform

    count, box = make_count()
    pipeline = (
        ns.from_iterable(strings(n))
        | transform(shout)
        | transform(flip)
        | transform(calm)
        | sink(count)
    )
    pipeline.run()
    return box


def child_generators(n: int) -> list[int]:
    count, box = make_count()
    s1 = (shout(s) for s in strings(n))
    s2 = (flip(s) for s in s1)
    s3 = (calm(s) for s in s2)
    for s in s3:
        count(s)
    return box


def child_toolz(n: int) -> list[int]:
    import toolz
    from toolz import curried

    count, box = make_count()
    toolz.pipe(
        strings(n),
        curried.map(shout),
        curried.map(flip),
        curried.map(calm),
        curried.map(count),
        lambda it: deque(it, maxlen=0),
    )
    return box


def child_bytewax(n: int) -> list[int]:
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.outputs import DynamicSink, StatelessSinkPartition
    from bytewax.testing import TestingSource, run_main

    count, box = make_count()

    class _Part(StatelessSinkPartition):
        def write_batch(self, items):
            for x in items:
                count(x)

    class CountSink(DynamicSink):
        def build(self, step_id, worker_index, worker_count):
            return _Part()

    flow = Dataflow("w4")
    s = op.input("inp", flow, TestingSource(strings(n), batch_size=1000))
    s = op.map("shout", s, shout)
    s = op.map("flip", s, flip)
    s = op.map("calm", s, calm)
    op.output("out", s, CountSink())
    run_main(flow)
    return box


CHILDREN = {
    "nanostream": (child_nanostream, ("nanostream",)),
    "generators": (child_generators, ()),
    "toolz": (child_toolz, ("toolz",)),
    "bytewax": (child_bytewax, ("bytewax", "bytewax.testing", "bytewax.operators")),
}


def child_main(name: str, n: int) -> None:
    import importlib
    import resource
    import time

    fn, mods = CHILDREN[name]
    for m in mods:  # import first, so import memory is the same for every n
        importlib.import_module(m)
    t0 = time.perf_counter()
    items, chars = fn(n)
    seconds = time.perf_counter() - t0
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    hwm_kb = None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm_kb = int(line.split()[1])
    except OSError:
        pass
    print(
        json.dumps(
            {
                "items": items,
                "chars": chars,
                "maxrss_kb": rss_kb,
                "vmhwm_kb": hwm_kb,
                "seconds": seconds,
            }
        )
    )


# ------------------------------------------------------ contenders (the parent)


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(name: str, n: int, timeout: float) -> dict[str, Any]:
    root = _repo_root()
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "benchmarks.w4_memory", "--child", name, str(n)]
    if os.path.exists("/bin/sh"):
        # '; exit $?' stops the shell from exec-ing python in its own process
        cmd = ["/bin/sh", "-c", '"$@"; exit $?', "sh", *cmd]
    proc = subprocess.run(
        cmd,
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise RuntimeError(f"child exited {proc.returncode}: {lines[-1] if lines else ''}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["items"] == n, f"child counted {res['items']} items, expected {n}"
    assert res["chars"] == n * ITEM_CHARS, "child saw wrong item sizes"
    return res


def _contender(name: str):
    def run(p: dict[str, Any]) -> Measurement:
        small = _child(name, p["small"], p["child_timeout"])
        large = _child(name, p["large"], p["child_timeout"])
        small_mb = small["maxrss_kb"] / 1024
        large_mb = large["maxrss_kb"] / 1024
        return Measurement(
            large_mb - small_mb,
            {
                "small_mb": small_mb,
                "large_mb": large_mb,
                "large_seconds": large["seconds"],
                "small_vmhwm_mb": (small["vmhwm_kb"] or 0) / 1024,
                "large_vmhwm_mb": (large["vmhwm_kb"] or 0) / 1024,
            },
        )

    return run


def fmt(m: Measurement) -> str:
    return (
        f"Δ {m.value:+.1f} MB ({m.extra['small_mb']:.0f}->{m.extra['large_mb']:.0f} MB,"
        f" {m.extra['large_seconds']:.1f} s)"
    )


def params(quick: bool) -> dict[str, Any]:
    if quick:
        return {"small": 10_000, "large": 100_000, "child_timeout": 120}
    return {"small": 200_000, "large": 2_000_000, "child_timeout": 600}


register(
    Workload(
        id="W4",
        title="peak RSS, {large:,} vs {small:,} x 1 KB, 3 stages",
        unit="MB",
        params=params,
        fmt=fmt,
        contenders=[
            Contender(
                "nanostream", _contender("nanostream"), SUBJECT, requires=CHILDREN["nanostream"][1]
            ),
            Contender("plain generator chain", _contender("generators"), LIMIT),
            Contender("toolz pipe(map, map, map)", _contender("toolz"), PEER, requires=("toolz",)),
            Contender(
                "bytewax dataflow run_main",
                _contender("bytewax"),
                PEER,
                requires=("bytewax",),
                note="batch_size=1000",
            ),
        ],
        target=Target("Δ <= 30 MB", lambda value, ratio: value <= 30.0),
    )
)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child_main(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("usage: python -m benchmarks.w4_memory --child NAME N")
