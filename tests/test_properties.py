"""Property tests: random pipelines give what the equivalent plain Python gives.

Random shapes (chains, fan-out, fan-out then fan-in, fan-in of two sources,
reusable segments used twice) of random map / flat-map / ``ns.filter`` stages,
with ``workers`` 1 or 4, ordered or not, small or default queues, fused or not,
over random lists. Outputs are compared exactly where the contract promises an
order (a chain of order-keeping stages, collected in order) and as multisets
elsewhere. Then the same with one stage raising on one item (a ``StageError``
naming that stage and item, chained to the original exception) and with
``on_error="skip"`` (exactly the failing items are missing).

``NANOSTREAM_HYPOTHESIS_EXAMPLES=500 pytest tests/test_properties.py`` runs a
longer, nightly-style search.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nanostream as ns
import nanostream._runtime as runtime
from nanostream import sink, source, transform

_SCALE = int(os.environ.get("NANOSTREAM_HYPOTHESIS_EXAMPLES", "0") or 0)


def examples(default: int):
    return settings(max_examples=_SCALE or default, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- the stage vocabulary -------------------------------------------------------------

MAPS = [lambda x: x + 1, lambda x: 2 * x, lambda x: -x, lambda x: x // 2,
        lambda x: (x * x) % 97]
FLATS = [lambda x: [x, x], lambda x: list(range(x % 3)), lambda x: [x, x + 100],
         lambda x: []]
FILTERS = [lambda x: x % 2 == 0, lambda x: x > 0, lambda x: x % 3 != 1]
TABLE = {"map": MAPS, "flatmap": FLATS, "filter": FILTERS}


class Boom(Exception):
    pass


@dataclass(frozen=True)
class Op:
    kind: str          # "map", "flatmap" or "filter"
    fn: int            # index into TABLE[kind]
    workers: int
    ordered: bool
    queue_size: int | None

    @property
    def keeps_order(self) -> bool:
        return self.workers == 1 or self.ordered

    def plain(self, xs: list[int], skip=None) -> list[int]:
        f = TABLE[self.kind][self.fn]
        out: list[int] = []
        for x in xs:
            if skip is not None and skip(x):
                continue
            if self.kind == "map":
                out.append(f(x))
            elif self.kind == "flatmap":
                out.extend(f(x))
            elif f(x):
                out.append(x)
        return out

    def stage(self, name: str, fails=None, on_error: str = "raise"):
        f = TABLE[self.kind][self.fn]

        def check(x):
            if self.workers > 1 and x % 3 == 0:
                time.sleep(0.0002)  # work that lets later items overtake this one
            if fails is not None and fails(x):
                raise Boom(x)

        options = {"name": name, "workers": self.workers, "ordered": self.ordered}
        if self.queue_size is not None:
            options["queue_size"] = self.queue_size
        if fails is not None:
            options["on_error"] = on_error
        if self.kind == "map":
            def fn(x):
                check(x)
                return f(x)
            return transform(fn, **options)
        if self.kind == "flatmap":
            def gen(x):
                ys = f(x)
                if not ys:
                    check(x)
                for i, y in enumerate(ys):
                    yield y
                    if i == 0:
                        check(x)  # fails after one output: nothing of x may leak
            return transform(gen, **options)

        def pred(x):
            check(x)
            return f(x)
        return ns.filter(pred, **options)


ops = st.builds(
    Op,
    kind=st.sampled_from(["map", "flatmap", "filter"]),
    fn=st.integers(0, 9),
    workers=st.sampled_from([1, 4]),
    ordered=st.booleans(),
    queue_size=st.one_of(st.none(), st.integers(1, 8)),
).map(lambda op: Op(op.kind, op.fn % len(TABLE[op.kind]), op.workers, op.ordered,
                    op.queue_size))


def segment(min_size: int = 1, max_size: int = 3):
    return st.lists(ops, min_size=min_size, max_size=max_size)


@dataclass
class Spec:
    shape: str                      # chain, reuse, fanout, diamond, fanin
    prefix: list[Op]
    a: list[Op] = field(default_factory=list)
    b: list[Op] = field(default_factory=list)
    suffix: list[Op] = field(default_factory=list)
    generator_source: bool = False
    collect: str = "iterate"        # or "sink"
    sink_workers: int = 1
    fuse: bool = True

    def named(self) -> list[tuple[str, Op]]:
        """Every op with its stage name (a reused segment's ops appear once)."""
        out = []
        for part in ("prefix", "a", "b", "suffix"):
            for i, op in enumerate(getattr(self, part)):
                out.append((f"{part}{i}", op))
        return out


ints = st.integers(-50, 50)
data_lists = st.one_of(st.lists(ints, max_size=40), st.lists(ints, min_size=100, max_size=300))


@st.composite
def specs(draw) -> Spec:
    shape = draw(st.sampled_from(["chain", "reuse", "fanout", "diamond", "fanin"]))
    spec = Spec(shape=shape, prefix=draw(segment(1 if shape in ("chain", "reuse") else 0, 4)))
    if shape in ("fanout", "diamond", "fanin"):
        spec.a = draw(segment(1, 2))
        spec.b = draw(segment(1, 2))
    if shape in ("diamond", "fanin"):
        spec.suffix = draw(segment(1, 2))
    if shape == "fanin":
        spec.prefix = []
    spec.generator_source = draw(st.booleans())
    spec.collect = "sink" if shape == "fanout" else draw(st.sampled_from(["iterate", "sink"]))
    spec.sink_workers = draw(st.sampled_from([1, 1, 4]))
    spec.fuse = draw(st.booleans())
    return spec


# -- the plain-Python model -----------------------------------------------------------

class Model:
    """Evaluates a spec in plain Python; records every stage's inputs by name."""

    def __init__(self, spec: Spec, skip_stage: str | None = None, skip=None) -> None:
        self.spec = spec
        self.inputs: dict[str, list[int]] = {}
        self.skip_stage = skip_stage
        self.skip = skip

    def seg(self, part: str, xs: list[int]) -> list[int]:
        for i, op in enumerate(getattr(self.spec, part)):
            name = f"{part}{i}"
            self.inputs.setdefault(name, []).extend(xs)
            xs = op.plain(xs, self.skip if name == self.skip_stage else None)
        return xs

    def outputs(self, xs: list[int], ys: list[int]) -> dict[str, list[int]]:
        s = self.spec
        if s.shape == "chain":
            return {"out": self.seg("prefix", xs)}
        if s.shape == "reuse":
            return {"out": self.seg("prefix", self.seg("prefix", xs))}
        if s.shape == "fanout":
            mid = self.seg("prefix", xs)
            return {"out_a": self.seg("a", mid), "out_b": self.seg("b", mid)}
        if s.shape == "diamond":
            mid = self.seg("prefix", xs)
            return {"out": self.seg("suffix", self.seg("a", mid) + self.seg("b", mid))}
        return {"out": self.seg("suffix", self.seg("a", xs) + self.seg("b", ys))}

    def exact(self) -> dict[str, bool]:
        """Which outputs come in a promised order."""
        s = self.spec

        def keeps(*parts: str) -> bool:
            return all(op.keeps_order for p in parts for op in getattr(s, p))

        in_order = s.collect == "iterate" or s.sink_workers == 1
        if s.shape in ("chain", "reuse"):
            return {"out": in_order and keeps("prefix")}
        if s.shape == "fanout":
            return {"out_a": in_order and keeps("prefix", "a"),
                    "out_b": in_order and keeps("prefix", "b")}
        return {"out": False}  # fan-in interleaves


# -- building and running the real pipeline --------------------------------------------

def build(spec: Spec, xs: list[int], ys: list[int], fail_stage=None, fails=None,
          on_error="raise"):
    """The pipeline for ``spec`` and the per-output collectors."""

    def seg(part: str):
        stages = [op.stage(f"{part}{i}", fails if f"{part}{i}" == fail_stage else None,
                           on_error)
                  for i, op in enumerate(getattr(spec, part))]
        if not stages:
            return None
        p = stages[0]
        for st_ in stages[1:]:
            p = p | st_
        return p

    def src(data, name):
        if spec.generator_source:
            @source(name=name)
            def gen():
                yield from data
            return gen()
        return ns.from_iterable(list(data), name=name)

    outs: dict[str, list[int]] = {}

    def collector(key):
        outs[key] = []
        return sink(outs[key].append, name=key, workers=spec.sink_workers)

    s = spec.shape
    if s == "fanin":
        merged = (src(xs, "src") | seg("a"), src(ys, "src2") | seg("b")) | seg("suffix")
        return merged, outs
    head = src(xs, "src")
    prefix = seg("prefix")
    if s == "chain":
        return head | prefix, outs
    if s == "reuse":
        return head | prefix | prefix, outs
    mid = head | prefix if prefix is not None else head
    if s == "fanout":
        return mid | (seg("a") | collector("out_a"), seg("b") | collector("out_b")), outs
    return mid | (seg("a"), seg("b")) | seg("suffix"), outs


def execute(spec: Spec, pipeline, outs) -> dict[str, list[int]]:
    runtime.Run.fuse = spec.fuse
    try:
        if spec.shape == "fanout":
            pipeline.run(timeout=60)
            return outs
        if spec.collect == "iterate":
            return {"out": list(pipeline)}
        got: list[int] = []
        (pipeline | sink(got.append, name="out", workers=spec.sink_workers)).run(timeout=60)
        return {"out": got}
    finally:
        runtime.Run.fuse = True


def no_leftovers() -> None:
    """Every run over and every nanostream thread gone (checked per example)."""
    deadline = time.monotonic() + 10
    for t in threading.enumerate():
        if t.name.startswith("nanostream:"):
            t.join(max(0.0, deadline - time.monotonic()))
    left = [t.name for t in threading.enumerate()
            if t.name.startswith("nanostream:") and t.is_alive()]
    assert left == [], f"threads left behind: {left}"
    assert ns.running() == []


def compare(model: Model, got: dict[str, list[int]], want: dict[str, list[int]]) -> None:
    exact = model.exact()
    assert set(got) == set(want)
    for key, values in want.items():
        if exact[key]:
            assert got[key] == values, key
        else:
            assert Counter(got[key]) == Counter(values), key


# -- the properties -------------------------------------------------------------------------

@examples(150)
@given(spec=specs(), xs=data_lists, ys=st.lists(ints, max_size=30))
def test_random_pipelines_match_plain_python(spec, xs, ys):
    model = Model(spec)
    want = model.outputs(xs, ys)
    pipeline, outs = build(spec, xs, ys)
    got = execute(spec, pipeline, outs)
    compare(model, got, want)
    no_leftovers()


@examples(150)
@given(spec=specs(), xs=data_lists, ys=st.lists(ints, max_size=30), data=st.data())
def test_a_stage_failing_on_an_item_raises_a_stage_error_naming_both(spec, xs, ys, data):
    named = spec.named()
    name, _ = data.draw(st.sampled_from(named), label="failing stage")
    model = Model(spec)
    model.outputs(xs, ys)
    seen = model.inputs.get(name, [])
    bad = data.draw(st.sampled_from(seen), label="failing item") if seen else None
    pipeline, outs = build(spec, xs, ys, fail_stage=name, fails=lambda x: x == bad)
    if bad is None:  # nothing reaches the stage: the run just succeeds
        execute(spec, pipeline, outs)
        no_leftovers()
        return
    with pytest.raises(ns.StageError) as info:
        execute(spec, pipeline, outs)
    err = info.value
    assert err.stage == name
    assert err.has_item
    assert err.item == bad
    assert isinstance(err.__cause__, Boom)
    assert err.__cause__.args == (bad,)
    assert isinstance(err, ns.PipelineError)
    no_leftovers()


@examples(150)
@given(spec=specs(), xs=data_lists, ys=st.lists(ints, max_size=30), data=st.data(),
       modulus=st.integers(2, 5), rest=st.integers(0, 4))
def test_on_error_skip_removes_exactly_the_failing_items(spec, xs, ys, data, modulus, rest):
    name, _ = data.draw(st.sampled_from(spec.named()), label="failing stage")

    def fails(x):
        return x % modulus == rest % modulus

    model = Model(spec, skip_stage=name, skip=fails)
    want = model.outputs(xs, ys)
    pipeline, outs = build(spec, xs, ys, fail_stage=name, fails=fails, on_error="skip")
    got = execute(spec, pipeline, outs)
    compare(model, got, want)
    no_leftovers()


@examples(80)
@given(xs=data_lists, chain=st.lists(ops.filter(lambda op: op.keeps_order), min_size=1,
                                     max_size=5),
       fuse=st.booleans())
def test_a_chain_of_order_keeping_stages_keeps_order(xs, chain, fuse):
    model = Model(Spec(shape="chain", prefix=chain))
    want = model.outputs(xs, [])["out"]
    p = ns.from_iterable(xs)
    for i, op in enumerate(chain):
        p = p | op.stage(f"prefix{i}")
    runtime.Run.fuse = fuse
    try:
        assert list(p) == want
    finally:
        runtime.Run.fuse = True
    no_leftovers()
