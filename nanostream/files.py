"""Files: line, JSON Lines and CSV sources and sinks.

Sources (``read_lines``, ``read_jsonl``, ``read_csv``) take one path, a glob pattern
(files read in sorted order) or a list of them; sinks (``write_lines``,
``write_jsonl``, ``write_csv``) write one file. A name ending in ``.gz`` is read and
written gzip-compressed. ``read_lines(path, follow=True)`` keeps reading a growing
file, like ``tail -f``, until the run is stopped.

>>> import os, tempfile
>>> import nanostream as ns
>>> tmp = tempfile.TemporaryDirectory()
>>> path = os.path.join(tmp.name, "rows.csv.gz")
>>> _ = ([{"id": 1, "name": "ada"}, {"id": 2, "name": "bob"}] | ns.write_csv(path)).run()
>>> list(ns.read_csv(path))
[{'id': '1', 'name': 'ada'}, {'id': '2', 'name': 'bob'}]
>>> tmp.cleanup()
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import itertools
import json
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from operator import methodcaller
from typing import Any

from . import _io
from ._io import PathArg
from ._runtime import TICK
from ._stage import SINK, SOURCE, Stage

__all__ = ["read_csv", "read_jsonl", "read_lines", "write_csv", "write_jsonl", "write_lines"]

FLUSH_EVERY = 1000     # a file sink flushes (and marks its items handled) this often...
IDLE_FLUSH = 1.0       # ...and after this many seconds without input

_chomp = methodcaller("rstrip", "\n")
# what reading a damaged .gz file raises: not gzip at all, cut short, corrupt
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


# -- sources -----------------------------------------------------------------------------

def _source(fn: Callable[..., Any], name: str, path: Any, kwargs: dict[str, Any],
            defaults: dict[str, Any], options: dict[str, Any]) -> Stage:
    """A source stage; only non-default keyword arguments are kept, for a short repr."""
    shown = {k: v for k, v in kwargs.items() if v != defaults.get(k)}
    return Stage(fn, SOURCE, _io.stage_options(name, options), args=(path,), kwargs=shown,
                 internal={"context": True}, bound=True)


def _check_follow(fn: str, paths: tuple[str, ...], follow: Any, poll_interval: Any) -> None:
    _io.check_flag(fn, "follow", follow)
    _io.check_number(fn, "poll_interval", poll_interval)
    if follow:
        if len(paths) != 1 or (_io.has_magic(paths[0]) and not os.path.exists(paths[0])):
            raise ValueError(f"{fn}: follow=True follows one growing file; got "
                             f"{paths[0] if len(paths) == 1 else list(paths)!r}")
        if _io.is_gzip(paths[0]):
            raise ValueError(f"{fn}: follow=True cannot follow a gzip file ({paths[0]!r})")


def read_lines(path: PathArg | Sequence[PathArg], *, follow: bool = False,
               encoding: str = "utf-8", errors: str = "strict", poll_interval: float = 0.1,
               **options: Any) -> Stage:
    """A source of the lines of a text file, without their line endings.

    ``path`` is a file, a glob pattern such as ``"logs/*.log.gz"`` (the matching files
    are read one after the other in sorted order) or a list of either. Names ending in
    ``.gz`` are decompressed. With ``follow=True`` (one plain file) the source keeps
    waiting for lines appended to the file, like ``tail -f``, checking every
    ``poll_interval`` seconds, until the run is stopped; a truncated file is read again
    from the start, a replaced one (log rotation) from the new file's start. Stage
    options: ``name``, ``queue_size``, ``on_error``.

    >>> import os, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp.name, "a.txt")
    >>> with open(path, "w") as f:
    ...     _ = f.write("one\\ntwo\\n")
    >>> list(read_lines(path))
    ['one', 'two']
    >>> tmp.cleanup()
    """
    paths = _io.check_path("read_lines", path, many=True)
    _check_follow("read_lines", paths, follow, poll_interval)
    _io.check_encoding("read_lines", encoding)
    return _source(_read_lines, "read_lines", path,
                   dict(follow=follow, encoding=encoding, errors=errors,
                        poll_interval=poll_interval),
                   dict(follow=False, encoding="utf-8", errors="strict", poll_interval=0.1),
                   options)


def _read_lines(path: Any, *, ctx: Any = None, follow: bool = False, encoding: str = "utf-8",
                errors: str = "strict", poll_interval: float = 0.1) -> Iterator[str]:
    paths = _io.check_path("read_lines", path, many=True)
    if follow:
        for line, _ in _follow(paths[0], ctx, encoding, errors, poll_interval):
            yield line
        return
    for file in _io.expand(paths):
        with _io.open_read(file, encoding, errors) as f:
            try:
                yield from map(_chomp, f)
            except UnicodeDecodeError as exc:
                raise _decode_error(file, encoding, exc) from exc
            except _GZIP_ERRORS as exc:
                raise _gzip_error(file, exc) from exc


def _decode_error(file: str, encoding: str, exc: UnicodeDecodeError) -> ValueError:
    return ValueError(f"{file}: cannot decode the text as {encoding} ({exc.reason}); pass "
                      "the right encoding=, or errors='replace' to read it anyway")


def _gzip_error(file: str, exc: Exception) -> ValueError:
    """A clear error for a ``.gz`` file that is not gzip data, or is cut short."""
    if isinstance(exc, gzip.BadGzipFile):
        return ValueError(f"{file}: not a gzip file ({exc}); a name ending in .gz is read as "
                          "gzip: rename the file if it holds plain text")
    return ValueError(f"{file}: the gzip data is cut short or corrupt ({exc}); the lines "
                      "before the damage were read. Re-create or re-copy the file")


def _follow(path: str, ctx: Any, encoding: str, errors: str, poll: float
            ) -> Iterator[tuple[str, int]]:
    """``(line, line number)`` of a growing file until ``ctx.stopping``.

    Reads bytes and splits on ``b"\\n"`` (so the encoding must be ASCII-compatible),
    keeps a partly written last line until its newline arrives, starts over when the
    file shrinks (truncation) and, when the path is replaced (rotation), reads what is
    left of the old file before going on with the new one.
    """
    ctx = ctx or _io.DetachedContext("read_lines")

    def decoded(raw: bytes, n: int) -> str:
        try:
            text = raw.decode(encoding, errors)
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}, line {n}: cannot decode the line as {encoding} "
                             f"({exc.reason})") from exc
        return text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")

    f = open(path, "rb")  # noqa: SIM115 (reopened on rotation)
    try:
        ino = os.fstat(f.fileno()).st_ino
        partial = b""
        n = 0
        rotated = False
        while True:
            chunk = f.readline()
            if chunk:
                if not chunk.endswith(b"\n"):
                    partial += chunk          # the writer is in the middle of a line
                    continue
                if partial:
                    chunk, partial = partial + chunk, b""
                n += 1
                yield decoded(chunk, n), n
                continue
            if ctx.stopping:
                return
            try:
                now = os.stat(path)
            except FileNotFoundError:   # rotated away; the new file is not there yet
                now = None
            if now is not None and now.st_ino != ino:
                if not rotated:         # once more to the end of the old file, then switch
                    rotated = True
                    continue
                if partial:             # its last line, never finished
                    n += 1
                    yield decoded(partial, n), n
                f.close()
                f = open(path, "rb")  # noqa: SIM115
                ino, partial, n, rotated = os.fstat(f.fileno()).st_ino, b"", 0, False
                continue
            if os.fstat(f.fileno()).st_size < f.tell():
                f.seek(0)
                partial, n = b"", 0
                continue
            ctx.sleep(poll)             # gives up at once when the run aborts
    finally:
        f.close()


def read_jsonl(path: PathArg | Sequence[PathArg], *, follow: bool = False,
               encoding: str = "utf-8", poll_interval: float = 0.1, **options: Any) -> Stage:
    """A source of the JSON values of a JSON Lines file, one per line.

    Paths, globs, gzip and ``follow=True`` work as in :func:`read_lines`; blank lines
    are skipped. A line that is not valid JSON is a per-item error: with the default
    ``on_error="raise"`` the run fails with a ``StageError`` naming the file and the
    line number; with ``on_error="skip"`` the line is skipped (and counted as an
    error in the report).

    >>> import os, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp.name, "a.jsonl")
    >>> with open(path, "w") as f:
    ...     _ = f.write('{"a": 1}\\n[2, 3]\\n')
    >>> list(read_jsonl(path))
    [{'a': 1}, [2, 3]]
    >>> tmp.cleanup()
    """
    paths = _io.check_path("read_jsonl", path, many=True)
    _check_follow("read_jsonl", paths, follow, poll_interval)
    _io.check_encoding("read_jsonl", encoding)
    return _source(_read_jsonl, "read_jsonl", path,
                   dict(follow=follow, encoding=encoding, poll_interval=poll_interval),
                   dict(follow=False, encoding="utf-8", poll_interval=0.1), options)


def _read_jsonl(path: Any, *, ctx: Any = None, follow: bool = False, encoding: str = "utf-8",
                poll_interval: float = 0.1) -> Iterator[Any]:
    paths = _io.check_path("read_jsonl", path, many=True)
    loads = json.loads
    if follow:
        for line, n in _follow(paths[0], ctx, encoding, "strict", poll_interval):
            if line.strip():
                try:
                    value = loads(line)
                except ValueError as exc:
                    ctx.item_error(exc, line, detail=f"{paths[0]}, line {n}")
                    continue
                yield value
        return
    for file in _io.expand(paths):
        with _io.open_read(file, encoding) as f:
            n = 0
            try:
                for line in f:
                    n += 1
                    try:
                        value = loads(line)
                    except ValueError as exc:
                        if not line.strip():
                            continue
                        ctx.item_error(exc, line.rstrip("\n"), detail=f"{file}, line {n}")
                        continue
                    yield value
            except UnicodeDecodeError as exc:
                raise _decode_error(file, encoding, exc) from exc
            except _GZIP_ERRORS as exc:
                raise _gzip_error(file, exc) from exc


def read_csv(path: PathArg | Sequence[PathArg], *, delimiter: str = ",",
             fieldnames: Sequence[str] | None = None, encoding: str = "utf-8",
             **options: Any) -> Stage:
    """A source of the rows of a CSV file as dicts of strings, keyed by the header.

    The first row of each file is its header, unless ``fieldnames`` are given (then
    every row is data). Paths, globs and gzip work as in :func:`read_lines`; each file
    of a glob has its own header. A row with more or fewer fields than the header, or
    one the ``csv`` module cannot parse, is a per-item error naming the file and the
    line: the run fails (``on_error="raise"``) or the row is skipped
    (``on_error="skip"``). Empty lines are skipped.

    >>> import os, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp.name, "a.csv")
    >>> with open(path, "w") as f:
    ...     _ = f.write("id,name\\n1,ada\\n")
    >>> list(read_csv(path))
    [{'id': '1', 'name': 'ada'}]
    >>> tmp.cleanup()
    """
    _io.check_path("read_csv", path, many=True)
    _check_delimiter("read_csv", delimiter)
    if fieldnames is not None:
        fieldnames = _check_fieldnames("read_csv", fieldnames)
    _io.check_encoding("read_csv", encoding)
    return _source(_read_csv, "read_csv", path,
                   dict(delimiter=delimiter, fieldnames=fieldnames, encoding=encoding),
                   dict(delimiter=",", fieldnames=None, encoding="utf-8"), options)


def _check_delimiter(fn: str, delimiter: Any) -> None:
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        raise ValueError(f"{fn}: delimiter must be a single character, got {delimiter!r}")


def _check_fieldnames(fn: str, names: Any) -> list[str]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"{fn}: fieldnames must be a list of str, got {names!r}")
    names = list(names)
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{fn}: fieldnames must be a non-empty list of str, got {names!r}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{fn}: fieldnames has duplicates: {', '.join(map(repr, dup))}")
    return names


def _read_csv(path: Any, *, ctx: Any = None, delimiter: str = ",",
              fieldnames: list[str] | None = None, encoding: str = "utf-8") -> Iterator[dict]:
    paths = _io.check_path("read_csv", path, many=True)
    for file in _io.expand(paths):
        with _io.open_read(file, encoding, newline="") as f:
            reader = csv.reader(f, delimiter=delimiter)
            try:
                header = fieldnames
                if header is None:
                    header = next((row for row in reader if row), None)  # skip blank lines
                    if header is None:      # an empty file
                        continue
                    dup = sorted({h for h in header if header.count(h) > 1})
                    if dup:
                        raise ValueError(f"{file}: the header repeats the column(s) "
                                         f"{', '.join(map(repr, dup))}")
                width = len(header)
                while True:
                    try:
                        row = next(reader)
                    except StopIteration:
                        break
                    except csv.Error as exc:
                        ctx.item_error(exc, None, detail=f"{file}, line {reader.line_num}")
                        continue
                    if len(row) == width:
                        yield dict(zip(header, row, strict=True))
                    elif row:
                        ctx.item_error(ValueError(
                            f"the row has {len(row)} fields, the header has {width}"),
                            row, detail=f"{file}, line {reader.line_num}")
            except UnicodeDecodeError as exc:
                raise _decode_error(file, encoding, exc) from exc
            except _GZIP_ERRORS as exc:
                raise _gzip_error(file, exc) from exc


# -- sinks -------------------------------------------------------------------------------

def _nothing() -> None:
    pass


def _direct(items: Iterable[Any], ctx: Any) -> Iterable[Any]:
    """In a run the runtime hands a writer ``(item, done)`` pairs; called directly
    (``write_lines(path)(items)``, no ``ctx``) it gets the items themselves."""
    if ctx is not None:
        return items
    return zip(items, itertools.repeat(_nothing))


def _sink(fn: Callable[..., Any], name: str, path: str, kwargs: dict[str, Any],
          defaults: dict[str, Any], options: dict[str, Any]) -> Stage:
    """A stream sink stage; only non-default keyword arguments are kept, for a short repr."""
    shown = {"path": path, **{k: v for k, v in kwargs.items() if v != defaults.get(k)}}
    return Stage(fn, SINK, {**_io.stage_options(name, options), "stream": True},
                 kwargs=shown, internal={"with_done": True, "tick": IDLE_FLUSH, "context": True})


@contextlib.contextmanager
def _writing(fn: str, path: str) -> Iterator[None]:
    """Name the file in an OSError of a write, a flush or the close (a full disk, a
    lost network drive): the OS's own message does not say which file."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, f"{fn}: cannot write {path!r}: {exc.strerror}") from exc


def _open_for_writing(fn: str, path: str, append: bool, encoding: str,
                      newline: str | None = None) -> Any:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        what = "is not a directory" if os.path.exists(folder) else "does not exist"
        raise FileNotFoundError(f"{fn}: cannot write {path!r}: {folder!r} {what}")
    return _io.open_write(path, append, encoding, newline)


class _Flusher:
    """Flushes a file every FLUSH_EVERY items and when idle, then marks the items
    written since the last flush as handled (completion tracking)."""

    __slots__ = ("dones", "file")

    def __init__(self, file: Any) -> None:
        self.file = file
        self.dones: list[Callable[[], None]] = []

    def flush(self) -> None:
        self.file.flush()
        dones, self.dones = self.dones, []
        for done in dones:
            done()


def write_lines(path: PathArg, *, append: bool = False, encoding: str = "utf-8",
                **options: Any) -> Stage:
    """A sink writing each item as one line of text (``str(item)`` and a newline).

    The file is created (or truncated; ``append=True`` appends) when the run starts,
    gzip-compressed when its name ends in ``.gz``. Items count as handled (completion
    tracking) once flushed to the file: every 1000 items, after a second without
    input, and at the end. Stage options: ``name``, ``queue_size``, ``on_error``.

    >>> import os, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp.name, "out.txt")
    >>> _ = (range(3) | write_lines(path)).run()
    >>> list(read_lines(path))
    ['0', '1', '2']
    >>> tmp.cleanup()
    """
    (file,) = _io.check_path("write_lines", path, many=False)
    _io.check_flag("write_lines", "append", append)
    _io.check_encoding("write_lines", encoding)
    return _sink(_write_lines, "write_lines", file, dict(append=append, encoding=encoding),
                 dict(append=False, encoding="utf-8"), options)


def _write_lines(items: Iterable[Any], *, path: str, append: bool = False,
                 encoding: str = "utf-8", ctx: Any = None) -> None:
    items = _direct(items, ctx)
    with _writing("write_lines", path), _open_for_writing("write_lines", path, append, encoding) as f:
        out = _Flusher(f)
        write, dones = f.write, out.dones
        for pair in items:
            if pair is TICK:
                if out.dones:
                    out.flush()
                    dones = out.dones
                continue
            x, done = pair
            write(f"{x}\n")
            dones.append(done)
            if len(dones) >= FLUSH_EVERY:
                out.flush()
                dones = out.dones
        out.flush()


def write_jsonl(path: PathArg, *, append: bool = False, encoding: str = "utf-8",
                default: Callable[[Any], Any] | None = None, **options: Any) -> Stage:
    """A sink writing each item as one line of JSON (JSON Lines).

    Non-ASCII text is written as is. ``default`` is passed to ``json.dumps`` for
    values JSON does not know (``default=str`` writes datetimes as text). An item that
    cannot be encoded is a per-item error (``on_error``). Files, gzip and completion
    tracking work as in :func:`write_lines`.

    >>> import os, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp.name, "out.jsonl")
    >>> _ = ([{"a": 1}, [2, "é"]] | write_jsonl(path)).run()
    >>> list(read_lines(path))
    ['{"a": 1}', '[2, "é"]']
    >>> tmp.cleanup()
    """
    (file,) = _io.check_path("write_jsonl", path, many=False)
    _io.check_flag("write_jsonl", "append", append)
    _io.check_encoding("write_jsonl", encoding)
    if default is not None and not callable(default):
        raise TypeError(f"write_jsonl: default must be a callable or None, got {default!r}")
    return _sink(_write_jsonl, "write_jsonl", file,
                 dict(append=append, encoding=encoding, default=default),
                 dict(append=False, encoding="utf-8", default=None), options)


def _write_jsonl(items: Iterable[Any], *, path: str, append: bool = False,
                 encoding: str = "utf-8", default: Callable[[Any], Any] | None = None,
                 ctx: Any = None) -> None:
    items = _direct(items, ctx)
    ctx = ctx or _io.DetachedContext("write_jsonl")
    encode = json.JSONEncoder(ensure_ascii=False, default=default).encode
    with _writing("write_jsonl", path), _open_for_writing("write_jsonl", path, append, encoding) as f:
        out = _Flusher(f)
        write, dones = f.write, out.dones
        for pair in items:
            if pair is TICK:
                if out.dones:
                    out.flush()
                    dones = out.dones
                continue
            x, done = pair
            try:
                text = encode(x)
            except (TypeError, ValueError) as exc:
                ctx.item_error(exc, x)
            else:
                write(text + "\n")
            dones.append(done)
            if len(dones) >= FLUSH_EVERY:
                out.flush()
                dones = out.dones
        out.flush()


def write_csv(path: PathArg, *, fieldnames: Sequence[str] | None = None,
              delimiter: str = ",", append: bool = False, encoding: str = "utf-8",
              **options: Any) -> Stage:
    """A sink writing dict rows to a CSV file, with a header row.

    The header is ``fieldnames`` or else the first row's keys; every row must have
    exactly those keys (in any order). A row with other keys, or an item that is not a
    dict, is a per-item error (``on_error``) naming the row. With ``append=True`` and
    a non-empty file, rows go after the existing ones under the file's own header
    (which must match ``fieldnames`` if given). ``None`` is written as an empty field.
    Files, gzip and completion tracking work as in :func:`write_lines`.

    >>> import os, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp.name, "out.csv")
    >>> _ = ([{"id": 1, "name": "ada"}] | write_csv(path)).run()
    >>> list(read_lines(path))
    ['id,name', '1,ada']
    >>> tmp.cleanup()
    """
    (file,) = _io.check_path("write_csv", path, many=False)
    if fieldnames is not None:
        fieldnames = _check_fieldnames("write_csv", fieldnames)
    _check_delimiter("write_csv", delimiter)
    _io.check_flag("write_csv", "append", append)
    _io.check_encoding("write_csv", encoding)
    return _sink(_write_csv, "write_csv", file,
                 dict(fieldnames=fieldnames, delimiter=delimiter, append=append,
                      encoding=encoding),
                 dict(fieldnames=None, delimiter=",", append=False, encoding="utf-8"), options)


def _existing_header(path: str, encoding: str, delimiter: str) -> list[str] | None:
    """The header of a non-empty CSV file we are about to append to."""
    try:
        if os.path.getsize(path) == 0:
            return None
        with _io.open_read(path, encoding, newline="") as f:
            return next(csv.reader(f, delimiter=delimiter), None)
    except FileNotFoundError:
        return None


def _write_csv(items: Iterable[Any], *, path: str, fieldnames: list[str] | None = None,
               delimiter: str = ",", append: bool = False, encoding: str = "utf-8",
               ctx: Any = None) -> None:
    items = _direct(items, ctx)
    ctx = ctx or _io.DetachedContext("write_csv")
    header = fieldnames
    write_header = True
    if append:
        existing = _existing_header(path, encoding, delimiter)
        if existing is not None:
            if header is not None and header != existing:
                raise ValueError(f"write_csv: {path!r} has the header {existing}, not the "
                                 f"fieldnames {header}")
            header, write_header = existing, False
    with _writing("write_csv", path), _open_for_writing("write_csv", path, append, encoding, newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writerow = writer.writerow
        if header is not None and write_header:
            writerow(header)
        keys = set(header) if header is not None else None
        out = _Flusher(f)
        dones = out.dones
        for pair in items:
            if pair is TICK:
                if out.dones:
                    out.flush()
                    dones = out.dones
                continue
            row, done = pair
            dones.append(done)
            if not isinstance(row, dict):
                ctx.item_error(TypeError(
                    f"write_csv writes dict rows, got {type(row).__name__}"), row)
            else:
                if header is None:
                    header = list(row)
                    keys = set(header)
                    writerow(header)
                if row.keys() == keys:
                    writerow([row[k] for k in header])
                else:
                    ctx.item_error(ValueError(
                        f"the row's keys {list(row)} differ from the CSV header {header}"),
                        row)
            if len(dones) >= FLUSH_EVERY:
                out.flush()
                dones = out.dones
        out.flush()
