"""DaskEngine on a LocalCluster of two worker processes on this machine."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

import nanostream as ns
from nanostream import sink, transform

distributed = pytest.importorskip("distributed")

from distributed.diagnostics.plugin import SchedulerPlugin  # noqa: E402

from nanostream.dask import DaskEngine  # noqa: E402

pytestmark = pytest.mark.dask

HOME = os.getpid()


# -- the cluster ---------------------------------------------------------------

@pytest.fixture(scope="module")
def client():
    import dask

    # A worker that dies fails its task at once instead of killing the other worker too.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=":0")  # never the fixed port 8787
        c = distributed.Client(cluster)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


def scheduler_tasks(client) -> int:
    return client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))


def wait_until(condition, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(autouse=True)
def cluster_left_clean(client):
    """Every test gets both workers, and must leave no task on the cluster."""
    client.wait_for_workers(2, timeout=30)
    yield
    assert wait_until(lambda: scheduler_tasks(client) == 0), \
        f"tasks left on the cluster: {scheduler_tasks(client)}"


@pytest.fixture
def engine(client):
    return DaskEngine(client)


# -- stage functions (module level: the workers import them from this module) ----

def square(x):
    return x * x


def words(x):
    yield from [x] * (x % 3)


def is_odd(x):
    return x % 2 == 1


def where(x):
    return distributed.get_worker().address


def pause_then_square(x):
    time.sleep(0.002 * (20 - x % 20))  # later items of a group finish first
    return x * x


def boom(x):
    if x == 7:
        raise ValueError("seven is right out")
    return x


def slow(x):
    time.sleep(0.05)
    return x


def mark_then_wait(x, gate, marks):
    if x:
        with open(os.path.join(marks, str(x)), "w"):
            pass
        distributed.Event(gate).wait(timeout=30)
    return x


def die_on_three(x, home):
    if x == 3 and os.getpid() != home:
        os._exit(1)
    return x


def wait_for_gate(x, gate):
    if x == 0:
        opened = distributed.Event(gate).wait(timeout=30)
        return "gate timed out" if not opened else x
    return x


def give_lock(x):
    return threading.Lock() if x == 2 else x


def _refuse_to_load():
    raise RuntimeError("this item cannot be rebuilt on a worker")


class LoadsNowhere:
    """Pickles fine, fails to unpickle (as a class missing on the workers would)."""

    def __reduce__(self):
        return (_refuse_to_load, ())


# -- results -------------------------------------------------------------------

def test_results_equal_the_local_run(engine):
    @sink(stream=True)
    def local_batches(items, into):
        into.append(os.getpid())
        for x in items:
            into.append(x)

    def pipeline(out):
        return (range(300)
                | transform(square, workers=3)
                | transform(words, workers=2)
                | ns.filter(is_odd, workers=2)
                | local_batches(into=out))

    local: list = []
    remote: list = []
    pipeline(local).run()
    pipeline(remote).run(engine=engine)
    assert remote == local
    assert remote[0] == HOME  # the stream sink ran in this process
    stats = engine.stats()
    assert {"square", "words", "filter(is_odd)"} <= set(stats)
    assert "local_batches" not in stats
    assert all(s["tasks"] > 0 and s["in_flight"] == 0 for s in stats.values())


def test_start_with_engine_and_join(engine):
    out: list = []
    with (range(50) | transform(square, workers=2) | sink(out.append)).start(engine=engine) as run:
        assert run.join(timeout=30)
    assert out == [x * x for x in range(50)]


def test_work_reaches_both_workers(client, engine):
    addresses: list = []
    (range(40) | transform(slow, workers=4) | transform(where, workers=4)
     | sink(addresses.append)).run(engine=DaskEngine(client, task_seconds=0))
    assert set(addresses) == set(client.scheduler_info()["workers"])


def test_which_stages_run_on_the_cluster(client, engine):
    async def aio(x):
        return x

    @transform(stream=True)
    def whole(items):
        yield from items

    def builtin(x):
        return x
    builtin.__module__ = "nanostream.operators"

    assert engine.accepts(transform(square))
    assert engine.accepts(transform(words))
    assert engine.accepts(ns.filter(is_odd))
    assert not engine.accepts(whole)
    assert not engine.accepts(sink(print))
    assert not engine.accepts(transform(aio))
    assert not engine.accepts(transform(builtin))
    assert not engine.accepts(ns.tap(print))
    assert engine.accepts(ns.flat_map(words))
    named = DaskEngine(client, accepts={"square"})
    assert named.accepts(transform(square))
    assert not named.accepts(transform(boom))
    assert DaskEngine(client, accepts={"builtin"}).accepts(transform(builtin))
    assert not named.accepts(whole.with_options(name="square"))
    picky = DaskEngine(client, accepts=lambda st: st.option("workers") > 1)
    assert picky.accepts(transform(square, workers=2))
    assert not picky.accepts(transform(square))


def test_async_and_unaccepted_stages_run_locally(client):
    async def plus_one(x):
        await asyncio.sleep(0)
        return x + 1

    engine = DaskEngine(client, accepts={"square"})
    out: list = []
    (range(20) | transform(plus_one, workers=4) | transform(square) | transform(boom, workers=2)
     | sink(out.append)).run(engine=engine, timeout=30)
    assert sorted(out) == sorted((x + 1) ** 2 for x in range(20))
    assert set(engine.stats()) == {"square"}


# -- order ---------------------------------------------------------------------

def test_ordered_keeps_input_order(client):
    out: list = []
    (range(120) | transform(pause_then_square, workers=4)
     | sink(out.append)).run(engine=DaskEngine(client, task_seconds=0))
    assert out == [x * x for x in range(120)]


def test_unordered_passes_results_on_as_tasks_finish(client):
    """Item 0 is held on a worker until 10 later items have reached the sink."""
    gate = f"gate-{uuid.uuid4().hex}"
    out: list = []

    def collect(x):
        out.append(x)
        if len(out) == 10:
            distributed.Event(gate, client=client).set()

    (range(40) | transform(wait_for_gate, workers=4, ordered=False)(gate=gate)
     | sink(collect)).run(engine=DaskEngine(client, task_seconds=0), timeout=60)
    assert sorted(out, key=str) == sorted(range(40), key=str)
    assert out.index(0) >= 10


# -- back-pressure ---------------------------------------------------------------

class InFlight(SchedulerPlugin):
    """Counts, on the scheduler, the nanostream tasks submitted and not yet finished."""

    name = "nanostream-in-flight"

    def __init__(self):
        self.live: set = set()
        self.most = 0
        self.seen = 0

    def transition(self, key, start, finish, *args, **kwargs):
        if not str(key).startswith("nanostream:"):
            return
        if finish in ("waiting", "queued", "processing", "no-worker"):
            if key not in self.live:
                self.seen += 1
            self.live.add(key)
            self.most = max(self.most, len(self.live))
        else:
            self.live.discard(key)


def test_fast_source_cannot_flood_the_cluster(client, engine):
    client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.add_plugin(InFlight()))
    try:
        n = 0

        def count(x):
            nonlocal n
            n += 1

        report = (range(10_000) | transform(square, workers=4) | sink(count)).run(engine=engine)
        most, seen = client.run_on_scheduler(lambda dask_scheduler: (
            dask_scheduler.plugins[InFlight.name].most, dask_scheduler.plugins[InFlight.name].seen))
    finally:
        client.run_on_scheduler(
            lambda dask_scheduler: dask_scheduler.remove_plugin(InFlight.name))
    assert n == 10_000, report
    stats = engine.stats()["square"]
    assert stats["tasks"] == seen > 10  # many chunks went out ...
    assert 1 <= most <= 4               # ... never more than workers=4 at once
    assert stats["max_in_flight"] <= 4


# -- errors --------------------------------------------------------------------

def test_remote_exception_is_a_stage_error_with_the_remote_traceback(engine):
    with pytest.raises(ns.StageError) as info:
        (range(20) | transform(boom, workers=2) | sink(lambda x: None)).run(engine=engine)
    err = info.value
    assert err.stage == "boom"
    assert err.item == 7
    assert isinstance(err.__cause__, ValueError)
    remote = err.__cause__.__cause__
    assert "RemoteTraceback" in type(remote).__name__
    assert "seven is right out" in str(remote)
    assert "in boom" in str(remote)


def test_on_error_and_retries_apply_on_the_workers(engine):
    tries: dict = {}

    def flaky(x):  # a closure: shipped by value, its dict lives on the worker
        tries[x] = tries.get(x, 0) + 1
        if tries[x] == 1:
            raise OSError("try again")
        return boom(x)

    out: list = []
    (range(20) | transform(flaky, workers=2, retries=1, backoff=0.0, on_error="skip")
     | sink(out.append)).run(engine=engine)
    assert out == [x for x in range(20) if x != 7]


def test_a_dying_worker_is_a_stage_error(client, engine):
    before = set(client.scheduler_info()["workers"])
    with pytest.raises(ns.StageError) as info:
        (range(8) | transform(die_on_three, workers=2)(home=HOME)
         | sink(lambda x: None)).run(engine=DaskEngine(client, task_seconds=0), timeout=60)
    assert info.value.stage == "die_on_three"
    assert info.value.item == 3
    assert type(info.value.__cause__).__name__ == "KilledWorker"
    # the nanny replaces the worker: wait for it, the other tests need two
    assert wait_until(lambda: (lambda now: len(now) == 2 and now != before)(
        set(client.scheduler_info()["workers"])), 60)


def test_a_task_failing_outside_the_function_is_a_stage_error(engine):
    bad = LoadsNowhere()
    with pytest.raises(ns.StageError) as info:
        ([bad, 1, 2] | transform(square, workers=2) | sink(lambda x: None)).run(engine=engine)
    assert info.value.item is bad
    assert "cannot be rebuilt on a worker" in str(info.value)


def test_unpicklable_function_is_a_type_error_naming_the_stage(engine):
    lock = threading.Lock()

    def guarded(x):
        with lock:
            return x

    with pytest.raises(TypeError, match="stage 'guarded' cannot run on the Dask cluster.*pickled"):
        (range(3) | transform(guarded, workers=2) | sink(print)).run(engine=engine)


def test_unpicklable_item_is_a_stage_error_naming_it(engine):
    lock = threading.Lock()
    with pytest.raises(ns.StageError, match="cannot be pickled") as info:
        ([1, 2, lock, 4] | transform(square, workers=2) | sink(lambda x: None)).run(engine=engine)
    assert info.value.item is lock
    out: list = []
    ([1, 2, lock, 4] | transform(abs, workers=2, on_error="skip")
     | sink(out.append)).run(engine=engine)
    assert out == [1, 2, 4]


def test_unpicklable_result_is_a_stage_error_naming_the_item(engine):
    with pytest.raises(ns.StageError, match="result for this item cannot be pickled") as info:
        (range(5) | transform(give_lock, workers=2) | sink(lambda x: None)).run(engine=engine)
    assert info.value.item == 2


# -- stopping --------------------------------------------------------------------

def test_stopping_mid_stream_cancels_the_tasks(client, tmp_path):
    """Items after the first block on a worker until a gate opens; the gate stays
    closed until the scheduler has dropped every task of the stopped run."""
    gate = f"gate-{uuid.uuid4().hex}"
    engine = DaskEngine(client, task_seconds=0)
    first = threading.Event()
    out: list = []

    def collect(x):
        out.append(x)
        first.set()

    stage = transform(mark_then_wait, workers=4)(gate=gate, marks=str(tmp_path))
    run = (range(10_000) | stage | sink(collect)).start(engine=engine)
    assert first.wait(30)
    assert wait_until(lambda: engine.stats()["mark_then_wait"]["in_flight"] == 4)
    run.stop(drain=False)
    assert not run.running
    assert engine.stats()["mark_then_wait"]["in_flight"] == 0
    # the two calls running on the workers are still blocked, yet the scheduler
    # forgets them and the two queued tasks
    assert wait_until(lambda: scheduler_tasks(client) == 0)
    assert not any(client.processing().values())
    distributed.Event(gate, client=client).set()
    assert out == [0]
    # the cluster is free for the next run, and the queued tasks never started
    assert (range(10) | transform(square, workers=2)).collect() == [x * x for x in range(10)]
    assert len(list(tmp_path.iterdir())) <= 2


def test_big_functions_travel_once_and_are_released(client, engine):
    table = bytes(range(256)) * 256  # 64 KB captured by the closure

    def lookup(x):
        return table[x]

    seen_spec = []

    def spy(x):
        keys = [k for k in client.who_has() if ":spec-" in str(k)]
        seen_spec.append(bool(keys))
        return x

    out: list = []
    (range(100) | transform(lookup, workers=2) | transform(spy)
     | sink(out.append)).run(engine=DaskEngine(client, accepts={"lookup"}))
    assert out == [table[x] for x in range(100)]
    assert any(seen_spec)


# -- packaging -------------------------------------------------------------------

_hidden: dict = {}


def hide_nanostream_dask():
    _hidden["module"] = sys.modules["nanostream.dask"]
    sys.modules["nanostream.dask"] = None  # import nanostream.dask now fails


def restore_nanostream_dask():
    sys.modules["nanostream.dask"] = _hidden.pop("module")


def pretend_version(version):
    import nanostream.dask as mod
    _hidden.setdefault("version", mod._VERSION)
    mod._VERSION = version if version is not None else _hidden.pop("version")


def test_workers_without_nanostream_are_a_clear_error(client):
    client.run(hide_nanostream_dask)
    try:
        with pytest.raises(RuntimeError, match=r"nanostream cannot be imported on 2 Dask "
                                               r"worker\(s\).*install nanostream"):
            (range(3) | transform(square, workers=2)).run(engine=DaskEngine(client))
    finally:
        client.run(restore_nanostream_dask)


def test_another_nanostream_version_on_the_workers_is_a_warning(client):
    client.run(pretend_version, "0.0.1")
    try:
        out: list = []
        with pytest.warns(RuntimeWarning, match="workers run nanostream 0.0.1"):
            (range(3) | transform(square, workers=2)
             | sink(out.append)).run(engine=DaskEngine(client))
        assert out == [0, 1, 4]
    finally:
        client.run(pretend_version, None)


def test_arguments_are_checked(client):
    with pytest.raises(TypeError, match="needs a distributed.Client"):
        DaskEngine("tcp://127.0.0.1:8786")
    with pytest.raises(ValueError, match="task_seconds must be a number >= 0"):
        DaskEngine(client, task_seconds=-1)
    with pytest.raises(TypeError, match="accepts=\\{'square'\\}"):
        DaskEngine(client, accepts="square")


def test_missing_distributed_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ImportError) as info:
        DaskEngine(object())
    assert str(info.value) == "DaskEngine needs dask.distributed: pip install 'nanostream[dask]'"


def test_importing_nanostream_does_not_import_distributed():
    code = ("import sys, nanostream, nanostream.dask; "
            "assert 'distributed' not in sys.modules and 'dask' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
