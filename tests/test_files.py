"""File sources and sinks: lines, JSON Lines, CSV, gzip, globs, follow mode, errors."""

from __future__ import annotations

import gzip
import json
import os
import re
import threading
from pathlib import Path

import pytest

import nanostream as ns

# -- helpers --------------------------------------------------------------------------


def write(path, text, mode="w"):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, mode + ("t" if opener is gzip.open else ""), encoding="utf-8",
                newline="") as f:
        f.write(text)


def read(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        return f.read()


class Collector:
    """A sink that records items and lets the test wait for a count, without sleeping."""

    def __init__(self):
        self.items = []
        self.cond = threading.Condition()

    def __call__(self, x):
        with self.cond:
            self.items.append(x)
            self.cond.notify_all()

    def wait_for(self, n, timeout=10):
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.items) >= n, timeout), self.items
            return list(self.items)


def stage_error(pipeline):
    with pytest.raises(ns.StageError) as info:
        pipeline.run()
    return info.value


# -- read_lines -----------------------------------------------------------------------


def test_read_lines_strips_line_endings(tmp_path):
    p = tmp_path / "a.txt"
    write(p, "one\ntwo\r\n\nlast without newline")
    assert list(ns.read_lines(p)) == ["one", "two", "", "last without newline"]


def test_read_lines_empty_file(tmp_path):
    p = tmp_path / "empty.txt"
    write(p, "")
    assert list(ns.read_lines(p)) == []


def test_read_lines_gzip(tmp_path):
    p = tmp_path / "a.txt.gz"
    write(p, "x\ny\n")
    assert read(p) == "x\ny\n"
    assert p.read_bytes()[:2] == b"\x1f\x8b"
    assert list(ns.read_lines(str(p))) == ["x", "y"]


def test_read_lines_glob_reads_files_in_sorted_order(tmp_path):
    (tmp_path / "logs").mkdir()
    write(tmp_path / "logs" / "b.log.gz", "b1\nb2\n")
    write(tmp_path / "logs" / "a.log.gz", "a1\n")
    write(tmp_path / "logs" / "c.log.gz", "c1\n")
    write(tmp_path / "logs" / "other.txt", "not me\n")
    pattern = str(tmp_path / "logs" / "*.log.gz")
    assert list(ns.read_lines(pattern)) == ["a1", "b1", "b2", "c1"]


def test_read_lines_list_of_paths_in_the_given_order(tmp_path):
    write(tmp_path / "2.txt", "two\n")
    write(tmp_path / "1.txt", "one\n")
    assert list(ns.read_lines([tmp_path / "2.txt", str(tmp_path / "1.txt")])) == ["two", "one"]


def test_read_lines_a_literal_name_with_glob_characters(tmp_path):
    p = tmp_path / "weird[1].txt"
    write(p, "ok\n")
    assert list(ns.read_lines(p)) == ["ok"]


def test_read_lines_feeds_a_pipeline(tmp_path):
    p = tmp_path / "words.txt"
    write(p, "a b\nc\n")
    got = list(ns.read_lines(p) | ns.transform(str.upper))
    assert got == ["A B", "C"]


def test_read_lines_missing_file(tmp_path):
    missing = tmp_path / "nope.txt"
    err = stage_error(ns.read_lines(missing) | ns.sink(print))
    assert err.stage == "read_lines"
    assert isinstance(err.__cause__, FileNotFoundError)
    assert str(missing) in str(err)


def test_read_lines_glob_matching_nothing(tmp_path):
    err = stage_error(ns.read_lines(str(tmp_path / "*.log")) | ns.sink(print))
    assert isinstance(err.__cause__, FileNotFoundError)
    assert "no file matches the pattern" in str(err)
    assert "*.log" in str(err)


def test_read_lines_undecodable_text(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("café\n".encode("latin-1"))
    err = stage_error(ns.read_lines(p) | ns.sink(print))
    assert "latin1.txt" in str(err)
    assert "utf-8" in str(err)
    assert "errors='replace'" in str(err)
    assert list(ns.read_lines(p, encoding="latin-1")) == ["café"]
    assert list(ns.read_lines(p, errors="replace")) == ["caf\ufffd"]


def test_a_renamed_source_names_itself_in_errors(tmp_path):
    err = stage_error(ns.read_lines(tmp_path / "nope", name="logs") | ns.sink(print))
    assert err.stage == "logs"


# -- follow=True ----------------------------------------------------------------------


def test_follow_reads_a_growing_file_and_stops_promptly(tmp_path):
    p = tmp_path / "app.log"
    write(p, "a\nb\n")
    got = Collector()
    run = (ns.read_lines(p, follow=True, poll_interval=0.005) | ns.sink(got)).start()
    try:
        got.wait_for(2)
        write(p, "c\npart", mode="a")           # a line still being written ...
        got.wait_for(3)
        write(p, "ial\r\nd\n", mode="a")        # ... is delivered once complete
        assert got.wait_for(5) == ["a", "b", "c", "partial", "d"]
        write(p, "new\n")                       # truncated in place: read from the start
        assert got.wait_for(6)[-1] == "new"
        write(p, "unfinished", mode="a")
        os.replace(p, tmp_path / "app.log.1")   # rotated: the old file's rest, then the new
        write(p, "rotated\n")
        assert got.wait_for(8)[-2:] == ["unfinished", "rotated"]
    finally:
        run.stop()
    assert run.join(timeout=5)
    assert not run.running
    assert got.items == ["a", "b", "c", "partial", "d", "new", "unfinished", "rotated"]


def test_follow_jsonl(tmp_path):
    p = tmp_path / "events.jsonl"
    write(p, '{"n": 1}\n')
    got = Collector()
    with (ns.read_jsonl(p, follow=True, poll_interval=0.005) | ns.sink(got)).start() as run:
        got.wait_for(1)
        write(p, '\n{"n": 2}\n', mode="a")
        got.wait_for(2)
        run.stop()
    assert got.items == [{"n": 1}, {"n": 2}]


def test_follow_missing_file(tmp_path):
    err = stage_error(ns.read_lines(tmp_path / "later.log", follow=True) | ns.sink(print))
    assert isinstance(err.__cause__, FileNotFoundError)


# -- read_jsonl -----------------------------------------------------------------------


def test_read_jsonl_values_and_blank_lines(tmp_path):
    p = tmp_path / "a.jsonl.gz"
    write(p, '{"a": 1, "s": "é"}\n\n  \n[1, 2]\n3\n"x"\nnull\n')
    assert list(ns.read_jsonl(p)) == [{"a": 1, "s": "é"}, [1, 2], 3, "x", None]


def test_read_jsonl_bad_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    write(p, '{"a": 1}\n{"a": 2\n{"a": 3}\n')
    err = stage_error(ns.read_jsonl(p) | ns.sink(print))
    assert err.stage == "read_jsonl"
    assert err.item == '{"a": 2'
    assert "bad.jsonl, line 2" in str(err)
    assert isinstance(err.__cause__, json.JSONDecodeError)


def test_read_jsonl_skip_bad_lines(tmp_path):
    p = tmp_path / "bad.jsonl"
    write(p, '{"a": 1}\nnot json\n{"a": 3}\n')
    got = Collector()
    report = (ns.read_jsonl(p, on_error="skip") | ns.sink(got)).run()
    assert got.items == [{"a": 1}, {"a": 3}]
    assert report["read_jsonl"].errors == 1


def test_read_jsonl_on_error_callable(tmp_path):
    p = tmp_path / "bad.jsonl"
    write(p, "1\n{\n2\n")
    bad = []
    got = list(ns.read_jsonl(p, on_error=lambda item, exc: bad.append((item, type(exc)))))
    assert got == [1, 2]
    assert bad == [("{", json.JSONDecodeError)]


# -- read_csv -------------------------------------------------------------------------


def test_read_csv_rows_as_dicts_of_strings(tmp_path):
    p = tmp_path / "a.csv"
    write(p, 'id,name,note\n1,ada,"a, b"\n2,bob,"two\nlines"\n\n3,,\n')
    assert list(ns.read_csv(p)) == [
        {"id": "1", "name": "ada", "note": "a, b"},
        {"id": "2", "name": "bob", "note": "two\nlines"},
        {"id": "3", "name": "", "note": ""},
    ]


def test_read_csv_header_only_and_empty_files(tmp_path):
    write(tmp_path / "h.csv", "a,b\n")
    write(tmp_path / "e.csv", "")
    assert list(ns.read_csv(tmp_path / "h.csv")) == []
    assert list(ns.read_csv(tmp_path / "e.csv")) == []


def test_read_csv_fieldnames_and_delimiter(tmp_path):
    p = tmp_path / "a.tsv.gz"
    write(p, "1\tx\n2\ty\n")
    rows = list(ns.read_csv(p, delimiter="\t", fieldnames=["n", "v"]))
    assert rows == [{"n": "1", "v": "x"}, {"n": "2", "v": "y"}]


def test_read_csv_glob_each_file_has_its_header(tmp_path):
    write(tmp_path / "2.csv", "b,a\n4,3\n")
    write(tmp_path / "1.csv", "a,b\n1,2\n")
    assert list(ns.read_csv(str(tmp_path / "*.csv"))) == [{"a": "1", "b": "2"},
                                                          {"b": "4", "a": "3"}]


def test_read_csv_ragged_row_names_file_and_line(tmp_path):
    p = tmp_path / "r.csv"
    write(p, "a,b\n1,2\n3\n4,5\n")
    err = stage_error(ns.read_csv(p) | ns.sink(print))
    assert "r.csv, line 3" in str(err)
    assert "1 fields, the header has 2" in str(err)
    assert err.item == ["3"]
    got = Collector()
    report = (ns.read_csv(p, on_error="skip") | ns.sink(got)).run()
    assert got.items == [{"a": "1", "b": "2"}, {"a": "4", "b": "5"}]
    assert report["read_csv"].errors == 1


def test_read_csv_duplicate_header(tmp_path):
    p = tmp_path / "d.csv"
    write(p, "a,b,a\n1,2,3\n")
    err = stage_error(ns.read_csv(p) | ns.sink(print))
    assert "repeats the column(s) 'a'" in str(err)


# -- write_lines ----------------------------------------------------------------------


def test_write_lines_and_read_back(tmp_path):
    p = tmp_path / "out.txt"
    (["a", 1, None] | ns.write_lines(p)).run()
    assert read(p) == "a\n1\nNone\n"
    (["b"] | ns.write_lines(p, append=True)).run()
    assert list(ns.read_lines(p)) == ["a", "1", "None", "b"]
    (["c"] | ns.write_lines(p)).run()           # not appending: starts over
    assert read(p) == "c\n"


def test_write_lines_gzip_round_trip(tmp_path):
    p = tmp_path / "out.txt.gz"
    (range(5000) | ns.write_lines(p)).run()
    (["more"] | ns.write_lines(p, append=True)).run()
    assert gzip.decompress(p.read_bytes()).decode().splitlines()[-2:] == ["4999", "more"]
    assert list(ns.read_lines(p)) == [str(i) for i in range(5000)] + ["more"]


def test_an_empty_stream_still_creates_the_file(tmp_path):
    p = tmp_path / "empty.txt"
    ([] | ns.write_lines(p)).run()
    assert p.exists()
    assert read(p) == ""


@pytest.mark.parametrize("maker", [ns.write_lines, ns.write_jsonl, ns.write_csv])
def test_unwritable_paths_give_clear_errors(tmp_path, maker):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    cases = [
        (tmp_path / "missing_dir" / "out", "does not exist"),
        (tmp_path / "a_file" / "out", "is not a directory"),
        (tmp_path / "a_dir", "Is a directory"),
    ]
    for path, message in cases:
        err = stage_error([{"a": 1}] | maker(path))
        assert isinstance(err.__cause__, OSError), err
        assert message in str(err)
        assert str(path) in str(err)


def test_unwritable_because_of_permissions(tmp_path):
    if os.geteuid() == 0:
        # root may write anywhere a mode forbids, but nobody may create files in sysfs
        folder = Path("/sys")
        assert folder.is_dir(), "this test needs Linux's /sys"
    else:
        folder = tmp_path / "ro"
        folder.mkdir(mode=0o500)
    err = stage_error(["x"] | ns.write_lines(folder / "out.txt"))
    assert isinstance(err.__cause__, PermissionError)
    assert "out.txt" in str(err)


# -- write_jsonl ----------------------------------------------------------------------


def test_write_jsonl_round_trip(tmp_path):
    p = tmp_path / "out.jsonl.gz"
    values = [{"a": 1, "s": "é"}, [1, 2.5], "x", None, True]
    (values | ns.write_jsonl(p)).run()
    assert "é" in read(p)
    assert list(ns.read_jsonl(p)) == values


def test_write_jsonl_unencodable_item(tmp_path):
    p = tmp_path / "out.jsonl"
    bad = {"when": object()}
    err = stage_error([{"a": 1}, bad] | ns.write_jsonl(p))
    assert err.stage == "write_jsonl"
    assert err.item is bad
    assert isinstance(err.__cause__, TypeError)
    assert "not JSON serializable" in str(err)
    report = ([{"a": 1}, bad, {"a": 2}] | ns.write_jsonl(p, on_error="skip")).run()
    assert list(ns.read_jsonl(p)) == [{"a": 1}, {"a": 2}]
    assert report["write_jsonl"].errors == 1
    ([{"when": bad["when"]}] | ns.write_jsonl(p, default=lambda o: "obj")).run()
    assert list(ns.read_jsonl(p)) == [{"when": "obj"}]


# -- write_csv ------------------------------------------------------------------------


def test_write_csv_header_from_first_row(tmp_path):
    p = tmp_path / "out.csv"
    rows = [{"id": 1, "name": "ada"}, {"name": "bob, jr", "id": 2}, {"id": 3, "name": None}]
    (rows | ns.write_csv(p)).run()
    assert read(p) == 'id,name\r\n1,ada\r\n2,"bob, jr"\r\n3,\r\n'
    assert list(ns.read_csv(p)) == [{"id": "1", "name": "ada"}, {"id": "2", "name": "bob, jr"},
                                    {"id": "3", "name": ""}]


def test_write_csv_row_with_other_keys_is_named(tmp_path):
    p = tmp_path / "out.csv"
    odd = {"id": 2, "nam": "typo"}
    err = stage_error([{"id": 1, "name": "a"}, odd] | ns.write_csv(p))
    assert err.item is odd
    assert "['id', 'nam'] differ from the CSV header ['id', 'name']" in str(err)
    report = ([{"id": 1, "name": "a"}, odd, {"id": 3}, [1, 2], {"name": "c", "id": 4}]
              | ns.write_csv(p, on_error="skip")).run()
    assert report["write_csv"].errors == 3
    assert list(ns.read_csv(p)) == [{"id": "1", "name": "a"}, {"id": "4", "name": "c"}]


def test_write_csv_not_a_dict(tmp_path):
    err = stage_error([(1, 2)] | ns.write_csv(tmp_path / "x.csv"))
    assert "write_csv writes dict rows, got tuple" in str(err)


def test_write_csv_fieldnames_and_append(tmp_path):
    p = tmp_path / "out.csv.gz"
    ([] | ns.write_csv(p, fieldnames=["a", "b"])).run()
    assert read(p) == "a,b\r\n"
    ([{"b": 2, "a": 1}] | ns.write_csv(p, append=True)).run()
    ([{"a": 3, "b": 4}] | ns.write_csv(p, append=True, fieldnames=["a", "b"])).run()
    assert list(ns.read_csv(p)) == [{"a": "1", "b": "2"}, {"a": "3", "b": "4"}]
    err = stage_error([{"x": 1}] | ns.write_csv(p, append=True, fieldnames=["x"]))
    assert "has the header ['a', 'b'], not the fieldnames ['x']" in str(err)
    # appending to a file that does not exist yet writes the header
    q = tmp_path / "new.csv"
    ([{"a": 1}] | ns.write_csv(q, append=True)).run()
    assert read(q) == "a\r\n1\r\n"


# -- completion tracking, names, reprs, arguments ------------------------------------


def test_file_sinks_mark_items_handled_once_written(tmp_path):
    p = tmp_path / "out.jsonl"
    done = []

    @ns.source(track=True)
    def numbers():
        for i in range(2500):
            # each item's completion checks that it is really in the file by then
            yield i, (lambda i=i: done.append(i))

    (numbers() | ns.write_jsonl(p)).run()
    assert sorted(done) == list(range(2500))
    assert list(ns.read_jsonl(p)) == list(range(2500))


def test_with_options_name_is_used_in_errors(tmp_path):
    sink = ns.write_csv(tmp_path / "x.csv").with_options(name="save", on_error="raise")
    err = stage_error([{"a": 1}, {"b": 2}] | sink)
    assert err.stage == "save"
    assert err.item == {"b": 2}


def test_reprs_name_the_files(tmp_path):
    assert repr(ns.read_lines("logs/*.gz")) == "<source 'read_lines'('logs/*.gz')>"
    assert repr(ns.read_csv("a.csv", delimiter=";")) == \
        "<source 'read_csv'('a.csv', delimiter=';')>"
    assert repr(ns.write_jsonl("out.jsonl", append=True)) == \
        "<sink 'write_jsonl'(path='out.jsonl', append=True) stream=True>"


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda: ns.read_lines(42), TypeError, "path must be a path (str or os.PathLike)"),
    (lambda: ns.read_lines(b"a.txt"), TypeError, "got bytes"),
    (lambda: ns.read_lines(""), ValueError, "non-empty"),
    (lambda: ns.read_lines([]), ValueError, "the list of paths is empty"),
    (lambda: ns.write_lines(["a", "b"]), TypeError, "path must be a path"),
    (lambda: ns.read_lines("*.log", follow=True), ValueError, "follow=True follows one"),
    (lambda: ns.read_lines("a.log.gz", follow=True), ValueError, "cannot follow a gzip"),
    (lambda: ns.read_lines("a.log", follow=1), TypeError, "follow must be True or False"),
    (lambda: ns.read_lines("a.log", poll_interval=0), ValueError, "poll_interval must be > 0"),
    (lambda: ns.read_lines("a", encoding="klingon"), ValueError, "unknown encoding"),
    (lambda: ns.read_csv("a", delimiter=";;"), ValueError, "single character"),
    (lambda: ns.read_csv("a", fieldnames="ab"), TypeError, "fieldnames must be a list"),
    (lambda: ns.write_csv("a", fieldnames=["a", "a"]), ValueError, "duplicates: 'a'"),
    (lambda: ns.write_csv("a", fieldnames=[]), ValueError, "non-empty list"),
    (lambda: ns.write_jsonl("a", default=1), TypeError, "default must be a callable"),
    (lambda: ns.write_lines("a", append="yes"), TypeError, "append must be True or False"),
    (lambda: ns.write_lines("a", workers=2), ValueError, "option 'workers' does not apply"),
    (lambda: ns.read_lines("a", workers=2), ValueError, "option 'workers' does not apply"),
    (lambda: ns.write_lines("a", on_eror="skip"), TypeError, "did you mean 'on_error'?"),
    (lambda: ns.read_lines("a", queue_size=0), ValueError, "queue_size must be >= 1"),
    (lambda: ns.write_lines("a", on_error="ignore"), ValueError, "on_error must be"),
])
def test_bad_arguments(call, error, message):
    with pytest.raises(error, match=None) as info:
        call()
    assert message in str(info.value)


def test_exported_names():
    for name in ["read_lines", "read_jsonl", "read_csv", "write_lines", "write_jsonl",
                 "write_csv"]:
        assert name in ns.__all__
        assert getattr(ns, name) is getattr(ns.files, name)


def test_the_guide_examples_run(tmp_path, monkeypatch, capsys):
    """docs/files-and-databases.md: every ```python block runs, in order, in one namespace
    (the rules of tests/test_docs.py, which does not list this page among its runnable
    ones yet); a block after ``<!-- not run: ... -->`` is skipped."""
    page = Path(__file__).resolve().parent.parent / "docs" / "files-and-databases.md"
    text = page.read_text()
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        before = text[: m.start()].rstrip().splitlines()
        if before and before[-1].startswith("<!-- not run"):
            continue
        line = text.count("\n", 0, m.start()) + 1
        exec(compile(m.group(1), f"{page.name}:{line}", "exec"), namespace)  # noqa: S102
        ran += 1
    assert ran >= 8
    out = capsys.readouterr().out
    assert "['started', 'request served']" in out
    assert "{'item-0': 166833, 'item-1': 166167, 'item-2': 166500}" in out


@pytest.mark.parametrize("name", ["out.txt", "out.jsonl", "out.csv", "out.jsonl.gz"])
def test_a_writer_called_directly_writes_its_items(tmp_path, name):
    """``write_lines(path)(items)`` outside a pipeline writes the items themselves (it
    used to expect the runtime's (item, done) pairs and failed to unpack them)."""
    path = str(tmp_path / name)
    rows = [{"id": 1, "name": "ada"}, {"id": 2, "name": "bob"}]
    if name.endswith(".txt"):
        ns.write_lines(path)(iter(["a", 1]))
        assert list(ns.read_lines(path)) == ["a", "1"]
    elif name.endswith(".csv"):
        ns.write_csv(path)(rows)
        assert list(ns.read_csv(path)) == [{"id": "1", "name": "ada"}, {"id": "2", "name": "bob"}]
    else:
        ns.write_jsonl(path)(rows)
        assert list(ns.read_jsonl(path)) == rows


def test_a_writer_called_directly_names_a_bad_item(tmp_path):
    path = tmp_path / "out.jsonl"
    with pytest.raises(ns.StageError, match="write_jsonl.*not JSON serializable") as err:
        ns.write_jsonl(str(path))([{"a": 1}, {1, 2}])
    assert err.value.item == {1, 2}
    assert path.read_text() == '{"a": 1}\n'
