"""The decorator DSL and graph composition (DESIGN §2)."""

from __future__ import annotations

import functools
import pickle

import cloudpickle
import pytest

import nanostream as ns
from nanostream import sink, source, transform


@source
def numbers(n):
    yield from range(n)


@transform
def square(x):
    return x * x


@transform
def words(line):
    yield from line.split()


@transform
def scale(x, factor):
    return x * factor


@source
def ticks():
    yield from (1, 2, 3)


# -- decorators -------------------------------------------------------------------

def test_design_example_runs_and_prints(capsys):
    @sink
    def show(x):
        print(x)

    report = (numbers(5) | square | show).run()
    assert capsys.readouterr().out.split() == ["0", "1", "4", "9", "16"]
    assert report["show"].items_in == 5
    assert list(numbers(5) | square) == [0, 1, 4, 9, 16]


def test_decorators_with_options_and_plain_calls():
    fetch = transform(workers=4, ordered=True, name="fetch", queue_size=10)(lambda x: x + 1)
    assert fetch.name == "fetch"
    assert fetch.option("workers") == 4
    upper = transform(str.upper)
    assert list(["a", "b"] | upper) == ["A", "B"]
    assert transform(square.fn, workers=2).option("workers") == 2
    out = []
    assert (["x"] | sink(out.append)).run()["append"].items_in == 1
    assert out == ["x"]


def test_default_name_is_function_name_and_names_need_not_be_unique():
    assert square.name == "square"
    assert transform(lambda x: x).name == "<lambda>"
    p = [1] | square | square
    assert [n.stage.name for n in p.nodes] == ["from_iterable", "square", "square"]


def test_with_options_returns_a_copy():
    s2 = square.with_options(workers=3, name="sq3")
    assert s2.option("workers") == 3
    assert s2.name == "sq3"
    assert square.option("workers") == 1
    assert square.name == "square"


def test_curried_direct_call_runs_the_function():
    assert square(3) == 9
    assert scale(3, 4) == 12
    assert scale(3, factor=2) == 6
    assert list(words("a b")) == ["a", "b"]


def test_keyword_call_configures_a_stage():
    triple = scale(factor=3)
    assert isinstance(triple, ns.Stage)
    assert list([1, 2] | triple) == [3, 6]
    assert scale.kwargs == {}  # the original is untouched


def test_positional_partial_call_is_a_type_error():
    @transform
    def add3(x, y, z):
        return x + y + z

    with pytest.raises(TypeError, match="keyword arguments only to configure"):
        add3(1)


def test_unconfigured_stage_fails_at_composition():
    with pytest.raises(TypeError, match=r"scale\(factor=\.\.\.\)"):
        [1, 2] | scale


def test_return_value_none_is_passed_on():
    nothing = transform(lambda x: None)
    assert list([1, 2] | nothing) == [None, None]


def test_generator_transform_is_flat_map():
    assert list(["a b", "", "c"] | words) == ["a", "b", "c"]
    wrapped = functools.wraps(words.fn)(lambda line: iter(line.split()))
    # inspect.unwrap decides: the wrapper unwraps to a generator function
    assert transform(wrapped).flavor == "flatmap"


def test_stream_transform_and_sink(tmp_path):
    @transform(stream=True)
    def running_sum(items):
        total = 0
        for x in items:
            total += x
            yield total

    @sink(stream=True)
    def to_file(items, path):
        with open(path, "w") as f:
            for x in items:
                f.write(f"{x}\n")

    path = tmp_path / "out.txt"
    (numbers(4) | running_sum | to_file(path=str(path))).run()
    assert path.read_text().split() == ["0", "1", "3", "6"]


def test_source_with_no_required_arguments_used_bare():
    assert list(ticks) == [1, 2, 3]
    assert list(ticks | square) == [1, 4, 9]


def test_source_alone_iterable_and_collect():
    assert list(numbers(3)) == [0, 1, 2]
    assert numbers(3).collect() == [0, 1, 2]


def test_source_needs_its_arguments():
    with pytest.raises(TypeError, match="source 'numbers' needs arguments"):
        numbers | square
    with pytest.raises(TypeError, match="numbers"):
        numbers(1, 2, 3)


# -- composition ------------------------------------------------------------------

def test_every_use_is_a_new_node():
    inc = transform(lambda x: x + 1, name="inc")
    assert list([0] | inc | inc) == [2]


def test_fan_out_broadcasts():
    a, b = [], []
    p = numbers(3) | (sink(a.append), square | sink(b.append))
    p.run()
    assert a == [0, 1, 2]
    assert b == [0, 1, 4]


def test_fan_in_tuple_and_merge():
    assert sorted((numbers(2), numbers(3)) | square) == [0, 0, 1, 1, 4]
    assert sorted(ns.merge(numbers(2), numbers(3) | square) | square) == [0, 0, 1, 1, 16]
    assert sorted([numbers(2), ticks] | square) == [0, 1, 1, 4, 9]


def test_tuple_or_list_of_data_is_data():
    assert list((1, 2) | square) == [1, 4]
    assert list([3] | square) == [9]
    assert list((square, 3) | transform(repr, name="r"))[1] == "3"


def test_any_iterable_is_a_source():
    import numpy as np

    assert list(np.arange(3) | transform(int)) == [0, 1, 2]
    assert list(iter([1, 2]) | square) == [1, 4]
    assert list(range(3) | square) == [0, 1, 4]
    assert list(ns.from_iterable({"a": 1}) | transform(str.upper)) == ["A"]
    assert sorted({1, 2} | square) == [1, 4]


def test_from_iterable_rejects_non_iterables():
    with pytest.raises(TypeError, match="from_iterable needs an iterable"):
        ns.from_iterable(3)


def test_segments_are_reusable():
    clean = transform(str.strip) | transform(str.upper)
    assert isinstance(clean, ns.Pipeline)
    assert not clean.sources()
    assert list([" a "] | clean) == ["A"]
    assert list(["b "] | clean | transform(lambda s: s * 2)) == ["BB"]
    assert list(ns.from_iterable([" c"]) | clean) == ["C"]


def test_same_stage_in_several_pipelines_runs_independently():
    seen = []
    sk = sink(seen.append)
    p1, p2 = [1] | sk, [2] | sk
    p1.run()
    p2.run()
    p1.run()
    assert seen == [1, 2, 1]


def test_add_edge_builds_a_dag():
    src, a, b, c = numbers(3), square, transform(lambda x: -x, name="neg"), transform(
        lambda x: x, name="join")
    p = ns.Pipeline().add_edge(src, a).add_edge(src, b).add_edge(a, c).add_edge(b, c)
    assert sorted(p) == [-2, -1, 0, 0, 1, 4]


def test_pipeline_repr_and_stage_repr():
    p = numbers(5) | square
    assert repr(p) == "Pipeline(numbers | square)"
    assert repr(square.with_options(workers=4)) == "<transform 'square' workers=4>"
    assert repr(numbers(5)) == "<source 'numbers'(5)>"
    assert repr(scale(factor=2)) == "<transform 'scale'(factor=2)>"
    fan = numbers(2) | (square, words | transform(str))
    assert repr(fan) == "Pipeline(numbers | (square, words | str))"
    fan_in = (numbers(2), ticks) | square
    assert repr(fan_in) == "Pipeline(numbers -> square, ticks -> square)"


def test_stages_and_pipelines_pickle():
    p = numbers(3) | square
    again = cloudpickle.loads(cloudpickle.dumps(p))
    assert list(again) == [0, 1, 4]
    s = pickle.loads(pickle.dumps(ns.filter(bool)))
    assert s.flavor == "filter"


# -- bad definitions: one test per case --------------------------------------------

def test_not_callable():
    with pytest.raises(TypeError, match="needs a function or other callable"):
        transform(42)
    with pytest.raises(TypeError, match="needs a function or other callable"):
        sink("print")
    with pytest.raises(TypeError, match="needs a callable predicate"):
        ns.filter(None)


@pytest.mark.parametrize("option", ["workers", "queue_size"])
def test_counts_below_one(option):
    with pytest.raises(ValueError, match=f"{option} must be >= 1, got 0"):
        transform(abs, **{option: 0})


def test_counts_of_wrong_type():
    with pytest.raises(TypeError, match="workers must be an int"):
        transform(abs, workers=2.5)
    with pytest.raises(ValueError, match="retries must be >= 0"):
        transform(abs, retries=-1)


def test_bad_option_name_suggests_the_right_one():
    with pytest.raises(TypeError, match="unknown option 'worker'.*did you mean 'workers'"):
        transform(abs, worker=2)


def test_option_that_does_not_apply():
    with pytest.raises(ValueError, match="option 'workers' does not apply to source"):
        source(lambda: [], workers=2)
    with pytest.raises(ValueError, match="stream=True, which runs in one worker"):
        transform(lambda xs: xs, stream=True, workers=2)
    with pytest.raises(ValueError, match="on_error must be 'raise', 'skip' or a callable"):
        transform(abs, on_error="ignore")
    with pytest.raises(ValueError, match="executor must be 'thread' or 'process'"):
        transform(abs, executor="gpu")


def test_async_function_with_process_executor():
    async def f(x):
        return x

    with pytest.raises(ValueError, match="async function; executor='process' does not apply"):
        transform(f, executor="process")


def test_source_used_mid_pipeline():
    with pytest.raises(TypeError, match="source 'ticks' cannot take input"):
        numbers(3) | ticks
    with pytest.raises(TypeError, match="cannot take input"):
        ns.Pipeline().add_edge(square, ticks)


def test_stage_after_sink():
    with pytest.raises(TypeError, match="it ends in sink 'show'"):
        numbers(3) | sink(print, name="show") | square
    with pytest.raises(TypeError, match="sink 'show' has no output"):
        ns.Pipeline().add_edge(sink(print, name="show"), square)


def test_cycle():
    a, b = transform(abs, name="a"), transform(abs, name="b")
    p = ns.Pipeline().add_edge(numbers(2), a).add_edge(a, b)
    with pytest.raises(ValueError, match="would make a cycle"):
        p.add_edge(b, a)
    with pytest.raises(ValueError, match="would make a cycle"):
        p.add_edge(a, a)


def test_pipeline_without_source():
    seg = square | transform(abs)
    with pytest.raises(ValueError, match="has no source"):
        seg.run()
    with pytest.raises(ValueError, match="has no source"):
        list(seg)


def test_stage_without_input_in_a_dag():
    p = ns.Pipeline().add_edge(numbers(2), square).add_edge(transform(abs, name="orphan"),
                                                            sink(print))
    with pytest.raises(ValueError, match="stage 'orphan' has no input"):
        p.run()


def test_starting_a_run_twice():
    run = (numbers(2) | sink(lambda x: None)).start()
    run.join(10)
    with pytest.raises(RuntimeError, match="already been started"):
        run.start()


def test_iterating_a_pipeline_with_several_open_ends():
    with pytest.raises(TypeError, match="exactly one open end"):
        list(numbers(2) | (square, words))


def test_piping_into_plain_callable_or_data():
    with pytest.raises(TypeError, match=r"wrap it first, e.g. transform\(fn\)"):
        numbers(2) | print
    with pytest.raises(TypeError, match="the right side of | must be"):
        numbers(2) | 3
    with pytest.raises(TypeError, match="every branch in a tuple"):
        numbers(2) | (square, 3)


def test_merge_rejects_data():
    with pytest.raises(TypeError, match="wrap data with ns.from_iterable"):
        ns.merge(numbers(2), [1, 2])
