"""Kafka in and out, at least once: :func:`kafka_source` and :func:`kafka_sink`.

``kafka_source`` reads one topic, a list of topics or a pattern, in a consumer group
or from partitions you assign; ``kafka_sink`` produces each item to a topic. With a
``group_id``, offsets are committed only once every message up to them has been fully
handled (reached every sink, was filtered out, or was skipped), so a crash, an
exception or a kill re-delivers what was not finished and never loses a message. A
``kafka_sink`` counts an item as handled only when the broker has acknowledged it,
so Kafka -> Kafka is at least once end to end. The guarantees, in plain words, are
in ``docs/kafka.md``.

Two clients: kafka-python (pure Python, the default) and confluent-kafka
(``client="confluent"``, ``pip install 'nanostream[confluent]'``, several times
faster), with the same behaviour. Extra keyword options go to the client unchanged
(TLS and SASL settings included); for confluent-kafka, kafka-python style names such
as ``session_timeout_ms`` or ``ssl_cafile`` are translated to librdkafka's
(``session.timeout.ms``, ``ssl.ca.location``), and dotted names pass as they are
(``**{"fetch.wait.max.ms": 100}``). The clients are imported only when a stage is
built, never by ``import nanostream.kafka``.

>>> import nanostream as ns
>>> job = (kafka_source("orders", bootstrap_servers="kafka:9092", group_id="etl")
...        | ns.filter(lambda order: order["amount"] > 0)
...        | kafka_sink("orders-clean", bootstrap_servers="kafka:9092",
...                     key=lambda order: order["id"]))
>>> job                     # nothing connects before job.run() or job.start()
Pipeline(kafka_source | filter(<lambda>) | kafka_sink)
"""

from __future__ import annotations

import difflib
import functools
import itertools
import json
import logging
import operator
import re
import socket
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import repeat
from typing import Any, NamedTuple

from . import _io
from ._errors import StageError
from ._stage import DEFAULTS, SINK, SOURCE, Stage, repr_short

__all__ = ["KafkaRecord", "kafka_sink", "kafka_source"]

log = logging.getLogger("nanostream.kafka")

CLIENTS = ("kafka-python", "confluent")
POLL_SECONDS = 0.1      # longest a poll blocks: how soon an idle source notices run.stop()
POLL_EVERY = 0.5        # a back-pressured source asks each poll for what the pipeline
                        # takes in this long, so that it still polls this often
PROBE_EVERY = 1.0       # seconds between connection checks of an idle source
CLOSE_SECONDS = 3.0     # bound on the final commit and close after the run (an abort's
                        # grace period is 5 s)
TICK_EVERY = 0.1        # an idle sink checks for delivery errors this often
ACK_EVERY = 10_000      # a sink waits for the broker's acks after this many messages...
ACK_INTERVAL = 0.1      # ...or this many seconds after the first unacknowledged one (each
                        # wait stops the thread: the source's too when the sink is fused)
POLL_RECORDS = 1000     # most messages one poll returns (option max_poll_records): about a
                        # queue's worth; a poll's messages must leave within max_poll_interval
CHUNK = 256             # messages passed on and tracked together: their offsets are
                        # committed once all of them are handled

_SECRET = re.compile(r"password|secret|token|sasl\.oauthbearer\.config|jaas|key[._]pem",
                     re.I)


# -- records and codecs --------------------------------------------------------------------

class KafkaRecord(NamedTuple):
    """A message with its metadata, as ``kafka_source(..., with_metadata=True)`` yields it.

    ``key`` and ``value`` are deserialized; ``headers`` is a list of ``(str, bytes)``
    pairs; ``timestamp`` is in milliseconds since the epoch (``None`` if the broker
    gave none).

    >>> r = KafkaRecord("orders", 0, 42, b"k1", {"id": 1}, [], 1700000000000)
    >>> r.topic, r.offset, r.value
    ('orders', 42, {'id': 1})
    """

    topic: str
    partition: int
    offset: int
    key: Any
    value: Any
    headers: list[tuple[str, bytes]]
    timestamp: int | None


_record = tuple.__new__   # KafkaRecord from a tuple at C speed (its __new__ is Python)


def _json_loads(data: bytes) -> Any:
    return json.loads(data)


_json_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _json_dumps(x: Any) -> bytes:
    return _json_encode(x).encode()


def _to_text_bytes(x: Any) -> bytes:
    if type(x) is bytes:
        return x
    if type(x) is str:
        return x.encode()
    if isinstance(x, (bytes, bytearray, memoryview)):
        return bytes(x)
    return str(x).encode()


def _to_bytes(x: Any) -> bytes:
    if type(x) is bytes:
        return x
    if isinstance(x, (bytes, bytearray, memoryview)):
        return x if type(x) is bytes else bytes(x)
    raise TypeError(f"the 'bytes' serializer needs bytes, got {type(x).__name__}; use "
                    "'json', 'str' or a function")


_UNPICKLE = ("pickle", "cloudpickle", "dill", "marshal")


def _deserializer(fn: str, what: str, spec: Any) -> Callable[[bytes], Any] | None:
    """The function decoding a message's bytes (``None``: keep the bytes)."""
    if spec == "bytes":
        return None
    if spec == "json":
        return _json_loads
    if spec == "str":
        return bytes.decode
    if isinstance(spec, str) and spec in _UNPICKLE:
        raise ValueError(f"{fn}: {what}={spec!r} is refused: unpickling data from a broker "
                         "runs whatever code its producer chose. If you trust every "
                         "producer, pass the function yourself (e.g. pickle.loads)")
    if callable(spec):
        return spec  # type: ignore[no-any-return,unused-ignore]
    raise ValueError(f"{fn}: {what} must be 'json', 'str', 'bytes' or a function of the "
                     f"message bytes, got {spec!r}")


def _serializer(fn: str, what: str, spec: Any) -> Callable[[Any], bytes]:
    if spec == "json":
        return _json_dumps
    if spec == "str":
        return _to_text_bytes
    if spec == "bytes":
        return _to_bytes
    if isinstance(spec, str) and spec in _UNPICKLE:
        raise ValueError(f"{fn}: {what}={spec!r} is not built in (its consumers would have "
                         "to unpickle broker data); pass a function if you must")
    if callable(spec):
        return spec  # type: ignore[no-any-return,unused-ignore]
    raise ValueError(f"{fn}: {what} must be 'json', 'str', 'bytes' or a function returning "
                     f"bytes, got {spec!r}")


# -- options ---------------------------------------------------------------------------

_kafka_module: Any = None


def _kafka() -> Any:
    """kafka-python, imported on first use (it warns DeprecationWarning while importing
    on Python 3.11+, about its own use of importlib.resources)."""
    global _kafka_module
    if _kafka_module is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import kafka
        _kafka_module = kafka
    return _kafka_module


def _connect_errors(kafka: Any) -> tuple[type[BaseException], ...]:
    """kafka-python's exceptions for a broker it cannot reach (names vary by version)."""
    names = ("KafkaTimeoutError", "KafkaConnectionError", "NoBrokersAvailable")
    return tuple(getattr(kafka.errors, n) for n in names if hasattr(kafka.errors, n))


def _confluent(fn: str) -> Any:
    try:
        import confluent_kafka
    except ImportError:
        raise ImportError(f"{fn}: client='confluent' needs confluent-kafka; install it with "
                          "pip install 'nanostream[confluent]' (or use the default "
                          "client='kafka-python')") from None
    return confluent_kafka


def _split_options(fn: str, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stage options (``name``, ``queue_size``, ``on_error``) and client options."""
    stage = {k: options.pop(k) for k in list(options) if k in _io.STAGE_OPTIONS}
    for key in options:
        if key in DEFAULTS:
            raise ValueError(f"{fn}: option {key!r} does not apply (a Kafka connector runs in "
                             f"one thread; its stage options are "
                             f"{', '.join(_io.STAGE_OPTIONS)}); parallelise the stages after "
                             "the source instead")
    return _io.stage_options(fn, stage), options


def _check_client(fn: str, client: Any) -> None:
    if client not in CLIENTS:
        raise ValueError(f"{fn}: client must be 'kafka-python' or 'confluent', got {client!r}")
    if client == "confluent":
        _confluent(fn)


def _check_kafka_python_options(fn: str, options: dict[str, Any], valid: Iterable[str],
                                ours: dict[str, str]) -> None:
    valid = set(valid)
    for key in options:
        if key in ours:
            raise TypeError(f"{fn}: pass {ours[key]} instead of the client option {key!r}")
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{fn}() got an unexpected keyword argument {key!r}{hint} (not a "
                            "nanostream option, nor a kafka-python client option)")
    _check_choices(fn, options)


# kafka-python options whose values are a fixed set: a wrong value is caught here, at
# composition (kafka-python takes e.g. acks="most" and then never completes a send)
_KAFKA_PYTHON_CHOICES: dict[str, tuple[Any, ...]] = {
    "acks": (0, 1, -1, "all"),
    "auto_offset_reset": ("earliest", "latest", "none"),
    "security_protocol": ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    "compression_type": (None, "gzip", "snappy", "lz4", "zstd"),
    "isolation_level": ("read_uncommitted", "read_committed"),
}

_TOO_LARGE = re.compile(r"MessageSizeTooLarge|MSG_SIZE_TOO_LARGE|RecordListTooLarge")
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


def _check_choices(fn: str, options: dict[str, Any]) -> None:
    for key, allowed in _KAFKA_PYTHON_CHOICES.items():
        if key in options and options[key] not in allowed:
            raise ValueError(f"{fn}: {key} must be one of {', '.join(map(repr, allowed))}, got "
                             f"{options[key]!r}")


def _check_topic(fn: str, name: str) -> None:
    if not _TOPIC_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"{fn}: {name!r} is not a valid Kafka topic name (1 to 249 letters, "
                         "digits, '.', '_' or '-')")


# kafka-python names whose librdkafka name is not just the dotted form
_CONFLUENT_NAMES = {
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
    "ssl_password": "ssl.key.password",
    "ssl_crlfile": "ssl.crl.location",
    "ssl_ciphers": "ssl.cipher.suites",
    "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password",
    "sasl_kerberos_service_name": "sasl.kerberos.service.name",
    "fetch_max_wait_ms": "fetch.wait.max.ms",
    "max_in_flight_requests_per_connection": "max.in.flight.requests.per.connection",
    "delivery_timeout_ms": "message.timeout.ms",
}


def _confluent_config(fn: str, options: dict[str, Any], ours: dict[str, str]) -> dict[str, Any]:
    """librdkafka properties from keyword options (see the module docstring)."""
    config: dict[str, Any] = {}
    for key, value in options.items():
        if key in ours or key.replace(".", "_") in ours:
            raise TypeError(f"{fn}: pass {ours.get(key) or ours[key.replace('.', '_')]} "
                            f"instead of the client option {key!r}")
        if key == "ssl_check_hostname":
            config["ssl.endpoint.identification.algorithm"] = "https" if value else "none"
        elif key in _CONFLUENT_NAMES:
            config[_CONFLUENT_NAMES[key]] = value
        else:
            config[key.replace("_", ".")] = value
    return config


def _show_options(options: dict[str, Any]) -> str:
    return "".join(f", {k}={'***' if _SECRET.search(k) else repr_short(v)}"
                   for k, v in options.items())


def _addresses(bootstrap: Any) -> list[tuple[str, int]]:
    servers = bootstrap.split(",") if isinstance(bootstrap, str) else list(bootstrap)
    out = []
    for s in servers:
        host, sep, port = str(s).strip().rpartition(":")
        if not sep or not port.isdigit():
            return []  # not host:port (e.g. a DNS alias the client resolves): no pre-check
        out.append((host.strip("[]") or "localhost", int(port)))
    return out


def _wait_reachable(fn: str, bootstrap: Any, timeout: float) -> None:
    """Fail clearly when no bootstrap server accepts a TCP connection within ``timeout``.

    Done before kafka-python connects: a refused connection makes it retry for its own
    (long) timeouts and leak sockets.
    """
    addresses = _addresses(bootstrap)
    if not addresses:
        return
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        for address in addresses:
            try:
                socket.create_connection(address, timeout=max(0.1, min(
                    1.0, deadline - time.monotonic()))).close()
                return
            except OSError as exc:
                last = exc
        if time.monotonic() >= deadline:
            raise _unreachable(fn, bootstrap, timeout, last, tcp_ok=False)
        time.sleep(0.05)


def _unreachable(fn: str, bootstrap: Any, timeout: float, exc: Any,
                 tcp_ok: bool | None = None) -> ConnectionError:
    """The error for a client that could not bootstrap. When a bootstrap server accepts
    TCP connections (``tcp_ok``; probed when ``None``), the trouble is what is said
    over them, not where: TLS, SASL or the port of another service."""
    if tcp_ok is None:
        tcp_ok = _accepts_connections(bootstrap)
    if tcp_ok:
        return ConnectionError(
            f"{fn}: the broker at {bootstrap} accepts connections but the client could not "
            f"talk Kafka with it within {timeout:g} s (connect_timeout): {exc}. Check "
            "security_protocol and the SSL/SASL options (a TLS port needs "
            "security_protocol='SSL' and the CA in ssl_cafile), and that the port is the "
            "broker's")
    return ConnectionError(f"{fn}: cannot reach the Kafka broker at {bootstrap} within "
                           f"{timeout:g} s (connect_timeout): {exc}. Is it running, and is "
                           "bootstrap_servers right?")


def _accepts_connections(bootstrap: Any) -> bool:
    for address in _addresses(bootstrap):
        try:
            socket.create_connection(address, timeout=1.0).close()
            return True
        except OSError:
            pass
    return False


def _check_bootstrap(fn: str, bootstrap: Any) -> None:
    servers = [bootstrap] if isinstance(bootstrap, str) else bootstrap
    if not isinstance(servers, (list, tuple)) or not servers or not all(
            isinstance(s, str) and s.strip() for s in servers):
        raise TypeError(f"{fn}: bootstrap_servers must be 'host:port' (several separated by "
                        f"commas) or a list of them, got {bootstrap!r}")


def _check_seconds(fn: str, name: str, value: Any, allow_none: bool = False) -> None:
    _io.check_number(fn, name, value, allow_none=allow_none)


# -- the source --------------------------------------------------------------------------

@dataclass(repr=False)
class _SourceSpec:
    """Everything a run of a kafka_source needs (picklable, secrets masked in its repr)."""

    topics: tuple[str, ...]
    pattern: str | None
    partitions: list[tuple[str, int]] | None
    bootstrap: Any
    group_id: str | None
    vdec: Callable[[bytes], Any] | None
    kdec: Callable[[bytes], Any] | None
    with_metadata: bool
    client: str
    commit_interval: float
    stop_at_end: bool
    connect_timeout: float
    reconnect_timeout: float | None
    options: dict[str, Any]

    def __repr__(self) -> str:
        what = (repr(self.topics[0]) if len(self.topics) == 1 and not self.pattern
                else f"pattern={self.pattern!r}" if self.pattern else repr(list(self.topics)))
        extra = ""
        if self.partitions is not None:
            extra += f", partitions={self.partitions!r}"
        if self.group_id is not None:
            extra += f", group_id={self.group_id!r}"
        if self.client != "kafka-python":
            extra += f", client={self.client!r}"
        return f"KafkaSource({what}{extra}{_show_options(self.options)})"


_SOURCE_OURS = {"group_id": "group_id=", "group.id": "group_id=",
                "bootstrap_servers": "bootstrap_servers=",
                "bootstrap.servers": "bootstrap_servers=",
                "value_deserializer": "value_deserializer=",
                "key_deserializer": "key_deserializer="}


def kafka_source(topics: str | Iterable[str] | re.Pattern[str] | None = None, *,
                 bootstrap_servers: str | list[str] = "localhost:9092",
                 group_id: str | None = None, pattern: str | None = None,
                 partitions: Iterable[int] | Iterable[tuple[str, int]] | None = None,
                 value_deserializer: Any = "json", key_deserializer: Any = "bytes",
                 with_metadata: bool = False, client: str = "kafka-python",
                 commit_interval: float = 5.0, stop_at_end: bool = False,
                 connect_timeout: float = 15.0, reconnect_timeout: float | None = 60.0,
                 **options: Any) -> Stage:
    """A source of Kafka messages: their deserialized values, or :class:`KafkaRecord`
    objects with ``with_metadata=True``.

    * What to read: ``topics`` (one name or a list), or ``pattern`` (a regular
      expression; a compiled ``re.Pattern`` as ``topics`` works too). With a
      ``group_id`` the partitions are shared with the other members of the group;
      ``partitions=[0, 2]`` (one topic) or ``[("orders", 0), ("refunds", 1)]`` assigns
      them by hand instead (with a ``group_id`` still used for offsets).
    * At least once: with a ``group_id``, the offset committed for a partition is the
      one after the highest message such that it and every earlier one were fully
      handled downstream (every sink done, filtered out, or skipped), whatever the
      fan-out, batching or out-of-order ``workers``. Commits happen every
      ``commit_interval`` seconds, when partitions are revoked, and once the run has
      ended (also after a failure). Messages not yet handled are re-delivered after a
      crash or a restart. Without a ``group_id`` nothing is committed and nothing is
      tracked (no cost).
    * Where to start without a committed offset: the client's ``auto_offset_reset``
      (``"latest"`` by default in both clients; pass ``auto_offset_reset="earliest"``).
    * ``stop_at_end=True``: read each assigned partition up to the end it had when the
      source started reading it, then end the stream (tests, backfills).
    * Deserializers: ``"json"`` (default for values), ``"str"`` (UTF-8), ``"bytes"``
      (default for keys) or a function of the bytes. Data from a broker is never
      unpickled by default. A message that cannot be decoded fails the run with a
      ``StageError`` naming its topic, partition and offset, or is skipped (and counts
      as handled) with ``on_error="skip"``.
    * ``connect_timeout``: seconds to reach the broker at start before failing with a
      clear error; ``reconnect_timeout``: seconds the broker may be unreachable
      mid-stream (the client reconnects with backoff meanwhile) before the run fails
      (``None``: wait forever).
    * ``client="kafka-python"`` (default) or ``"confluent"``. Other keyword options
      go to the client (e.g. ``auto_offset_reset``, ``session_timeout_ms``,
      ``security_protocol="SASL_SSL"``, ``sasl_mechanism``, ``ssl_cafile``).
    * Stage options: ``name``, ``queue_size``, ``on_error``.

    The consumer is closed when the run ends, is stopped or fails, so its partitions
    go to the other members of the group at once.

    >>> kafka_source(["orders", "refunds"], name="payments")
    <source 'payments'(KafkaSource(['orders', 'refunds']))>
    """
    fn = "kafka_source"
    stage_options, client_options = _split_options(fn, options)
    _check_client(fn, client)
    _check_bootstrap(fn, bootstrap_servers)
    if isinstance(topics, re.Pattern):
        if pattern is not None:
            raise TypeError(f"{fn}: give a pattern either as topics or as pattern=, not both")
        pattern = topics.pattern
        topics = None
    if isinstance(topics, str):
        names: tuple[str, ...] = (topics,)
    elif topics is None:
        names = ()
    else:
        if isinstance(topics, (bytes, Mapping)) or not isinstance(topics, Iterable):
            raise TypeError(f"{fn}: topics must be a topic name, a list of names or a "
                            f"compiled pattern, got {type(topics).__name__}")
        names = tuple(topics)
    for t in names:
        if not isinstance(t, str) or not t:
            raise TypeError(f"{fn}: topic names must be non-empty strings, got {t!r}")
        _check_topic(fn, t)
    if pattern is not None:
        if names:
            raise TypeError(f"{fn}: give topics or pattern, not both")
        if not isinstance(pattern, str):
            raise TypeError(f"{fn}: pattern must be a regular expression string, got "
                            f"{type(pattern).__name__}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{fn}: pattern {pattern!r} is not a valid regular expression: "
                             f"{exc}") from None
    elif not names:
        raise TypeError(f"{fn}: say what to read: a topic, a list of topics, or pattern=")
    assigned = _check_partitions(fn, names, pattern, partitions)
    if group_id is not None and (not isinstance(group_id, str) or not group_id):
        raise TypeError(f"{fn}: group_id must be a non-empty string, got {group_id!r}")
    if group_id is None and pattern is not None:
        raise ValueError(f"{fn}: a pattern subscription needs a group_id (the group assigns "
                         "the matching topics' partitions)")
    if group_id is None and assigned is None:
        pass  # every partition of the topics, assigned by hand, nothing committed
    vdec = _deserializer(fn, "value_deserializer", value_deserializer)
    kdec = _deserializer(fn, "key_deserializer", key_deserializer)
    _io.check_flag(fn, "with_metadata", with_metadata)
    _io.check_flag(fn, "stop_at_end", stop_at_end)
    _check_seconds(fn, "commit_interval", commit_interval)
    _check_seconds(fn, "connect_timeout", connect_timeout)
    _check_seconds(fn, "reconnect_timeout", reconnect_timeout, allow_none=True)
    if client_options.get("enable_auto_commit") or client_options.get("enable.auto.commit"):
        raise ValueError(f"{fn}: enable_auto_commit=True would commit offsets before the "
                         "messages are handled; nanostream commits offsets itself, after")
    client_options.pop("enable_auto_commit", None)
    client_options.pop("enable.auto.commit", None)
    if client == "kafka-python":
        _check_kafka_python_options(fn, client_options, _kafka().KafkaConsumer.DEFAULT_CONFIG,
                                    _SOURCE_OURS)
    else:
        _confluent_config(fn, client_options, _SOURCE_OURS)
    spec = _SourceSpec(topics=names, pattern=pattern, partitions=assigned,
                       bootstrap=bootstrap_servers, group_id=group_id, vdec=vdec, kdec=kdec,
                       with_metadata=with_metadata, client=client,
                       commit_interval=float(commit_interval), stop_at_end=stop_at_end,
                       connect_timeout=float(connect_timeout),
                       reconnect_timeout=None if reconnect_timeout is None
                       else float(reconnect_timeout),
                       options=client_options)
    return Stage(_kafka_source, SOURCE, {**stage_options, "track": group_id is not None},
                 args=(spec,), internal={"context": True, "chunks": True}, bound=True)


def _check_partitions(fn: str, names: tuple[str, ...], pattern: str | None,
                      partitions: Any) -> list[tuple[str, int]] | None:
    if partitions is None:
        return None
    if pattern is not None:
        raise ValueError(f"{fn}: partitions= assigns partitions of named topics; it does not "
                         "go with a pattern")
    if isinstance(partitions, (str, bytes)) or not isinstance(partitions, Iterable):
        raise TypeError(f"{fn}: partitions must be a list of partition numbers or of "
                        f"(topic, partition) pairs, got {partitions!r}")
    out: list[tuple[str, int]] = []
    for p in partitions:
        if isinstance(p, int) and not isinstance(p, bool):
            if len(names) != 1:
                raise ValueError(f"{fn}: with several topics, give partitions as (topic, "
                                 f"partition) pairs, got {p!r}")
            out.append((names[0], p))
        elif (isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
              and isinstance(p[1], int) and not isinstance(p[1], bool)):
            if p[0] not in names:
                raise ValueError(f"{fn}: partition {p!r} is of a topic not in topics "
                                 f"{list(names)!r}")
            out.append(p)
        else:
            raise TypeError(f"{fn}: partitions must be partition numbers or (topic, "
                            f"partition) pairs, got {p!r}")
        if out[-1][1] < 0:
            raise ValueError(f"{fn}: partition numbers are >= 0, got {p!r}")
    if not out:
        raise ValueError(f"{fn}: partitions is empty")
    if len(set(out)) != len(out):
        raise ValueError(f"{fn}: partitions repeats a partition: {partitions!r}")
    return out


def _kafka_source(spec: _SourceSpec, ctx: Any = None) -> tuple[()]:
    """Runs in the source thread: connect, register the final commit and close, read.

    The messages go downstream a chunk (``CHUNK``) at a time through the runtime's
    ``ctx.emit``: no generator step nor channel put per message. With a group_id a
    chunk carries one completion ticket; once every message of it is handled, the
    chunk's highest offsets are done (see ``_offsets.OffsetTracker``).
    """
    reader = (_KafkaPythonReader if spec.client == "kafka-python" else _ConfluentReader)(
        spec, ctx)
    ctx.on_run_end(reader.finish)
    reader.pump()
    return ()


# -- a chunk of messages at C speed -------------------------------------------------------
#
# The readers build a chunk's items with one ``map`` per field over the client's
# message objects (no Python code per message), and fall back to a careful loop per
# message only for a chunk with something unusual in it (an event, a message that
# does not decode: that loop names it or skips it under on_error).

_is_none = functools.partial(operator.is_, None)
_second = operator.itemgetter(1)


def _decode_all(dec: Callable[[bytes], Any], raw: list[Any]) -> list[Any]:
    """``dec`` over ``raw`` (``None`` stays ``None``); raises as ``dec`` does."""
    if any(map(_is_none, raw)):
        return [None if x is None else dec(x) for x in raw]
    return list(map(dec, raw))


def _records_kafka_python(part: list[Any], topic: str, partition: int,
                          vdec: Callable[[bytes], Any] | None,
                          kdec: Callable[[bytes], Any] | None, meta: bool) -> list[Any] | None:
    """The items of one partition's chunk of kafka-python ConsumerRecords; ``None`` if
    a key or value does not decode."""
    try:
        values = list(map(_VALUE, part))
        if vdec is not None:
            values = _decode_all(vdec, values)
        if not meta:
            return values
        keys = list(map(_KEY, part))
        if kdec is not None:
            keys = _decode_all(kdec, keys)
    except Exception:
        return None
    stamps = list(map(_TIMESTAMP, part))
    if any(map(_is_none, stamps)) or min(stamps) < 0:
        stamps = [ts if ts is not None and ts >= 0 else None for ts in stamps]
    headers = list(map(_HEADERS, part))
    if not all(headers):   # a message without headers gets an empty list of its own
        headers = [h or [] for h in headers]
    n = len(part)
    return list(map(_record, repeat(KafkaRecord, n), zip(
        repeat(topic, n), repeat(partition, n), map(_OFFSET, part), keys, values, headers,
        stamps, strict=False)))


_VALUE = operator.attrgetter("value")
_KEY = operator.attrgetter("key")
_OFFSET = operator.attrgetter("offset")
_TIMESTAMP = operator.attrgetter("timestamp")
_HEADERS = operator.attrgetter("headers")


def _records_confluent(message: Any, part: list[Any], vdec: Callable[[bytes], Any] | None,
                       kdec: Callable[[bytes], Any] | None, meta: bool, no_time: int,
                       only: str | None = None
                       ) -> tuple[list[Any], dict[tuple[str, int], int],
                                  dict[tuple[str, int], int]] | None:
    """The items of a chunk of confluent-kafka Messages with their lowest and highest
    offsets per partition; ``None`` if it holds an event (``error()`` set) or a key
    or value that does not decode. ``message`` is ``confluent_kafka.Message``;
    ``only``: the one topic the consumer reads, if so (not asked per message)."""
    if any(map(message.error, part)):
        return None
    try:
        values = list(map(message.value, part))
        if vdec is not None:
            values = _decode_all(vdec, values)
        keys = None
        if meta:
            keys = list(map(message.key, part))
            if kdec is not None:
                keys = _decode_all(kdec, keys)
    except Exception:
        return None
    topics: Any
    if only is not None:
        topics, topic = repeat(only), only
    else:
        topics = list(map(message.topic, part))
        topic = topics[0]
    partitions = list(map(message.partition, part))
    offsets = list(map(message.offset, part))
    # a partition's messages come in offset order, and a dict keeps the last value given
    if only is not None or topics.count(topic) == len(topics):   # one topic
        seen = set(partitions)
        if len(seen) <= 8:   # a few partitions: find each one's first and last at C speed
            n = len(partitions)
            index, rindex = partitions.index, partitions[::-1].index
            firsts, lasts = {}, {}
            for p in seen:
                firsts[topic, p] = offsets[index(p)]
                lasts[topic, p] = offsets[n - 1 - rindex(p)]
        else:
            lasts = {(topic, p): o for p, o in dict(zip(partitions, offsets,
                                                        strict=False)).items()}
            firsts = {(topic, p): o for p, o in dict(zip(
                reversed(partitions), reversed(offsets), strict=False)).items()}
    else:
        where = list(zip(topics, partitions, strict=False))
        lasts = dict(zip(where, offsets, strict=False))
        firsts = dict(zip(reversed(where), reversed(offsets), strict=False))
    if not meta:
        return values, firsts, lasts
    # timestamp() gives (type, milliseconds); without one (type no_time) the
    # milliseconds are negative: look at the types only then
    times: list[Any] = list(map(_second, map(message.timestamp, part)))
    if min(times) < 0:
        times = [ts if kind != no_time else None for kind, ts in map(message.timestamp, part)]
    headers = list(map(message.headers, part))
    n = len(part)
    if headers.count(None) == n:   # no headers at all: an empty list for each
        headers = list(map(list, repeat((), n)))
    elif None in headers:
        headers = [h if h is not None else [] for h in headers]
    assert keys is not None
    return list(map(_record, repeat(KafkaRecord, n), zip(
        topics, partitions, offsets, keys, values, headers, times, strict=False))), firsts, lasts


class _Pace:
    """How many messages to ask the next poll for: at most ``limit``, and about what
    the pipeline takes in ``POLL_EVERY`` seconds. A source waits while the stages
    after it are full (back-pressure) and polls again only once it has passed its
    last poll's messages on; polls must come often enough for the group (rebalances,
    ``max_poll_interval_ms``) whatever the speed of the pipeline."""

    __slots__ = ("last", "limit", "taken", "want")

    def __init__(self, limit: int) -> None:
        self.limit = self.want = max(1, limit)
        self.last = 0.0
        self.taken = 0

    def polled(self, now: float, got: int) -> None:
        """A poll just returned ``got`` messages; the previous one was at ``self.last``."""
        if self.taken:   # the previous poll's messages have all been passed on
            rate = self.taken / max(now - self.last, 1e-3)
            self.want = max(1, min(self.limit, int(rate * POLL_EVERY)))
        self.last = now
        self.taken = got


def _chunk_done(done: Callable[..., None], ends: list[tuple[str, int, int, int]]) -> None:
    """Every message of a chunk is handled: its highest offsets are done (a no-op for a
    partition revoked since: ``generation`` no longer matches)."""
    for topic, partition, last, generation in ends:
        done(topic, partition, last, generation)


class _Reader:
    """One run of a kafka_source: polls in the source thread, tracks and commits
    offsets, notices a lost broker, closes the consumer after the run."""

    def __init__(self, spec: _SourceSpec, ctx: Any) -> None:
        self.spec = spec
        self.ctx = ctx
        self.name = ctx.name
        self.tracker: Any = None
        if spec.group_id is not None:
            from ._offsets import OffsetTracker
            self.tracker = OffsetTracker()
        self.targets: dict[tuple[str, int], int | None] | None = (
            {} if spec.stop_at_end else None)          # stop_at_end: partition -> end
        # where a partition is safe to resume from: everything before it was handled
        self.first: dict[tuple[str, int], int] = {}    # first offset passed on since assigned
        self.safe: dict[tuple[str, int], int] = {}     # last position committed here
        self.rewind: dict[tuple[str, int], int] = {}   # revoked: resume there if it comes back
        self.assignments = 0          # assignments so far (a group's may be empty)
        self.rebalancing = False      # partitions revoked, the next assignment not yet in
        self.down_since: float | None = None
        self.next_probe = 0.0
        self.closed = False
        self.consumer: Any = None

    # assignment ----------------------------------------------------------------------

    def assigned(self, keys: Iterable[tuple[str, int]]) -> None:
        keys = list(keys)
        self.assignments += 1
        self.rebalancing = False
        log.info("kafka_source %r: assigned %s", self.name, sorted(keys))
        if self.targets is not None:
            for key in keys:
                self.targets.setdefault(key, None)
        rewind, self.rewind = self.rewind, {}
        for key in keys:
            if key in rewind:
                self.seek(key, rewind[key])

    def seek(self, key: tuple[str, int], offset: int) -> None:
        """Resume ``key`` at ``offset`` (a client that keeps its read position when a
        partition is revoked and assigned again would skip what was in flight)."""

    def forget(self, keys: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Partitions leave this member: forget their messages in flight (done() for
        them is ignored from now on). Returns the positions to commit for them; if
        they come back, reading resumes at the first message not handled."""
        self.rebalancing = True   # until the next assignment
        if self.targets is not None:
            for key in keys:
                self.targets.pop(key, None)
        if self.tracker is None:
            return {}
        final = self.tracker.revoke(keys)
        for key in keys:
            first, safe = self.first.pop(key, None), self.safe.pop(key, None)
            position = final.get(key, safe if safe is not None else first)
            if position is not None:
                self.rewind[key] = position
        return final

    def revoked(self, keys: Iterable[tuple[str, int]], commit: bool = True,
                lost: bool = False) -> None:
        """Partitions leave this member (see :meth:`forget`); commit what was done,
        unless ``commit`` is False or they were ``lost`` (another member may own them
        already)."""
        keys = list(keys)
        log.info("kafka_source %r: %s %s", self.name, "lost" if lost else "revoked",
                 sorted(keys))
        final = self.forget(keys)
        if commit and not lost and final and not self.closed:
            try:
                self.commit_positions(final)
            except Exception as exc:
                log.warning("kafka_source %r: commit on revocation of %s failed: %r (their "
                            "messages since the last commit will be re-delivered)",
                            self.name, keys, exc)

    # tracking and commits --------------------------------------------------------------

    def emit(self, items: list[Any], firsts: dict[tuple[str, int], int],
             lasts: dict[tuple[str, int], int]) -> bool:
        """Pass one chunk on (``firsts``/``lasts``: its lowest and highest offset per
        partition; with skipped messages ``items`` may be shorter, even empty). False
        once the pipeline wants no more (stop requested, or every consumer downstream
        done)."""
        tracker = self.tracker
        if tracker is None:
            return bool(self.ctx.emit(items))
        first = self.first
        for key, offset in firsts.items():
            first.setdefault(key, offset)
        track = tracker.track
        ends = [(topic, partition, last, track(topic, partition, last))
                for (topic, partition), last in lasts.items()]
        # the chunk travels under one ticket counting its messages down (the runtime's
        # SourceContext.emit): when the last is handled, its offsets are done
        return bool(self.ctx.emit(items, functools.partial(_chunk_done, tracker.done, ends)))

    def commit(self, final: bool = False) -> None:
        positions = self.tracker.committable()
        if not positions:
            return
        try:
            self.commit_positions(positions)
        except Exception as exc:
            log.warning("kafka_source %r: %scommit failed: %r (messages since the last "
                        "commit will be re-delivered)", self.name, "final " if final else "",
                        exc)
            return
        self.tracker.mark_committed(positions)
        self.safe.update(positions)

    def commit_positions(self, positions: dict[tuple[str, int], int]) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """After the run (every stage thread done): commit what is done, then close."""
        if self.closed:
            return
        try:
            if self.tracker is not None and self.down_since is None:
                self.commit(final=True)
        finally:
            self.closed = True
            try:
                self.close()
            except Exception:
                log.exception("kafka_source %r: closing the consumer failed", self.name)

    def close(self) -> None:
        raise NotImplementedError

    # decoding errors, liveness, stop_at_end ----------------------------------------------

    def bad(self, exc: Exception, raw: Any, topic: str, partition: int, offset: int) -> None:
        """An undecodable message: raises under on_error="raise", else it is skipped."""
        self.ctx.item_error(exc, item=raw,
                            detail=f"topic {topic!r} partition {partition} offset {offset}; "
                            "give the value_deserializer (or key_deserializer) that fits the "
                            "data, or on_error='skip' to skip such messages")

    def idle(self, now: float) -> None:
        """No messages in the last poll: let the stages fused into this thread settle
        (a kafka_sink waits for its acknowledgements), check the connection now and
        then."""
        self.ctx.idle()
        if now < self.next_probe:
            return
        self.next_probe = now + PROBE_EVERY
        if self.connected():
            if self.down_since is not None:
                log.info("kafka_source %r: the broker is back", self.name)
            self.down_since = None
            return
        if self.down_since is None:
            self.down_since = now
            log.warning("kafka_source %r: lost the connection to %s; reconnecting", self.name,
                        self.spec.bootstrap)
            return
        limit = self.spec.reconnect_timeout
        if limit is not None and now - self.down_since > limit:
            raise ConnectionError(f"kafka_source: lost the Kafka broker at "
                                  f"{self.spec.bootstrap}: no connection for {limit:g} s "
                                  "(reconnect_timeout)")

    def connected(self) -> bool:
        raise NotImplementedError

    def at_end(self) -> bool:
        """stop_at_end: every assigned partition read up to its end; or the group gave
        this member no partition at all (more members than partitions)."""
        targets = self.targets
        if not targets:
            # (not between a revocation and the assignment that follows it)
            return self.assignments > 0 and not self.rebalancing
        for key, target in targets.items():
            if target is None:
                target = self.highwater(key)
                if target is None:
                    return False
                targets[key] = target
            pos = self.position(key)
            if pos is None or pos < target:
                return False
        return True

    def highwater(self, key: tuple[str, int]) -> int | None:
        raise NotImplementedError

    def position(self, key: tuple[str, int]) -> int | None:
        raise NotImplementedError

    def pump(self) -> None:
        raise NotImplementedError


# -- kafka-python ---------------------------------------------------------------------------

class _KafkaPythonReader(_Reader):
    def __init__(self, spec: _SourceSpec, ctx: Any) -> None:
        super().__init__(spec, ctx)
        kafka = _kafka()
        self.kafka = kafka
        config = dict(spec.options)
        timeout_ms = int(spec.connect_timeout * 1000)
        config.setdefault("bootstrap_timeout_ms", timeout_ms)
        config.setdefault("max_poll_records", POLL_RECORDS)
        if spec.group_id is not None:
            config["group_id"] = spec.group_id
        config["enable_auto_commit"] = False
        _wait_reachable("kafka_source", spec.bootstrap, spec.connect_timeout)
        try:
            consumer = kafka.KafkaConsumer(bootstrap_servers=spec.bootstrap, **config)
        except _connect_errors(kafka) as exc:
            raise _unreachable("kafka_source", spec.bootstrap, spec.connect_timeout,
                               exc) from None
        self.consumer = consumer
        try:
            if spec.partitions is not None or spec.group_id is None:
                keys = spec.partitions or self._all_partitions()
                consumer.assign([kafka.TopicPartition(t, p) for t, p in keys])
                self.assigned(keys)
            else:
                listener = self._listener()
                if spec.pattern is not None:
                    consumer.subscribe(pattern=spec.pattern, listener=listener)
                else:
                    consumer.subscribe(list(spec.topics), listener=listener)
        except BaseException:
            consumer.close(autocommit=False, timeout_ms=int(CLOSE_SECONDS * 1000))
            raise
        self.has_metrics = bool(consumer.config.get("metrics_enabled", True))

    def _all_partitions(self) -> list[tuple[str, int]]:
        keys: list[tuple[str, int]] = []
        deadline = time.monotonic() + self.spec.connect_timeout
        for t in self.spec.topics:
            while True:
                found = self.consumer.partitions_for_topic(t)
                if found:
                    break
                if time.monotonic() > deadline:
                    raise LookupError(f"kafka_source: topic {t!r} does not exist at "
                                      f"{self.spec.bootstrap} (or has no partitions) after "
                                      f"{self.spec.connect_timeout:g} s: check the name, or "
                                      "create the topic first")
                time.sleep(0.05)
            keys.extend((t, p) for p in sorted(found))
        return keys

    def _listener(self) -> Any:
        kafka = self.kafka
        reader = self
        consumer = self.consumer
        base = getattr(kafka, "AsyncConsumerRebalanceListener", None)
        if base is not None:
            # kafka-python 3 runs listeners on its IO thread, where only the async commit
            # can be awaited (a blocking commit there would deadlock)
            class Listener(base):  # type: ignore[misc, valid-type]
                async def on_partitions_revoked(self, revoked: Any) -> None:
                    keys = [(tp.topic, tp.partition) for tp in revoked]
                    log.info("kafka_source %r: revoked %s", reader.name, sorted(keys))
                    final = reader.forget(keys)
                    if final and not reader.closed:
                        try:
                            await consumer.commit_async(reader.offsets(final))
                        except Exception as exc:
                            log.warning("kafka_source %r: commit on revocation of %s failed: "
                                        "%r (their messages since the last commit will be "
                                        "re-delivered)", reader.name, keys, exc)

                async def on_partitions_assigned(self, assigned: Any) -> None:
                    reader.assigned((tp.topic, tp.partition) for tp in assigned)

                async def on_partitions_lost(self, lost: Any) -> None:
                    reader.revoked(((tp.topic, tp.partition) for tp in lost), lost=True)
        else:  # kafka-python 2: listeners run inside poll(), in the source thread
            class Listener(kafka.ConsumerRebalanceListener):  # type: ignore[no-redef,name-defined]
                def on_partitions_revoked(self, revoked: Any) -> None:
                    reader.revoked((tp.topic, tp.partition) for tp in revoked)

                def on_partitions_assigned(self, assigned: Any) -> None:
                    reader.assigned((tp.topic, tp.partition) for tp in assigned)
        return Listener()

    def seek(self, key: tuple[str, int], offset: int) -> None:
        # kafka-python keeps the read position of a partition assigned again after a
        # rebalance: go back to the first message not handled (a local call)
        self.consumer.seek(self.kafka.TopicPartition(*key), offset)

    def offsets(self, positions: dict[tuple[str, int], int]) -> dict[Any, Any]:
        kafka = self.kafka
        return {kafka.TopicPartition(t, p): kafka.OffsetAndMetadata(off, "", -1)
                for (t, p), off in positions.items()}

    def commit_positions(self, positions: dict[tuple[str, int], int]) -> None:
        self.consumer.commit(self.offsets(positions), timeout_ms=int(CLOSE_SECONDS * 1000))

    def close(self) -> None:
        self.consumer.close(autocommit=False, timeout_ms=int(CLOSE_SECONDS * 1000))

    def connected(self) -> bool:
        """No connection at all, or no answer to a small request (ListOffsets of one
        assigned partition, or a metadata request) within half a second."""
        consumer = self.consumer
        if self.has_metrics:
            try:
                if not consumer.metrics()["consumer-metrics"]["connection-count"]:
                    return False
            except (KeyError, TypeError, AttributeError):
                self.has_metrics = False
        try:
            assignment = consumer.assignment()
            if assignment:
                consumer.end_offsets([next(iter(assignment))], timeout_ms=500)
            elif not self.has_metrics:   # (a fresh bootstrap opens a new connection)
                consumer.bootstrap(timeout_ms=500, refresh=True)
        except _connect_errors(self.kafka):
            return False
        except (AttributeError, TypeError):
            pass  # kafka-python 2 has no bootstrap(): rely on its own timeouts
        return True

    def highwater(self, key: tuple[str, int]) -> int | None:
        hw = self.consumer.highwater(self.kafka.TopicPartition(*key))
        return None if hw is None else int(hw)

    def position(self, key: tuple[str, int]) -> int | None:
        try:
            return int(self.consumer.position(self.kafka.TopicPartition(*key), timeout_ms=1000))
        except Exception:
            return None

    def pump(self) -> None:
        spec, ctx = self.spec, self.ctx
        poll = self.consumer.poll
        vdec = spec.vdec
        kdec = spec.kdec
        meta = spec.with_metadata
        tracked = self.tracker is not None
        interval = spec.commit_interval
        next_commit = time.monotonic() + interval
        stop_at_end = spec.stop_at_end
        errors = self.kafka.errors
        size = CHUNK
        emit = self.emit
        pace = _Pace(int(self.consumer.config["max_poll_records"]))
        while not ctx.stopping:
            try:
                batch = poll(timeout_ms=int(POLL_SECONDS * 1000), max_records=pace.want)
            except errors.KafkaError as exc:
                raise ConnectionError(f"kafka_source: the consumer failed: {exc!r}") from exc
            now = time.monotonic()
            pace.polled(now, sum(map(len, batch.values())) if batch else 0)
            if batch:
                self.down_since = None
            else:
                self.idle(now)
            for tp, recs in batch.items():
                topic, partition = tp.topic, tp.partition
                for first in range(0, len(recs), size):
                    part = recs[first:first + size] if len(recs) > size else recs
                    items: list[Any] | None = _records_kafka_python(part, topic, partition,
                                                                    vdec, kdec, meta)
                    if items is None:   # a message does not decode: the careful loop
                        items = []
                        append = items.append
                        for r in part:
                            value = r.value
                            if vdec is not None and value is not None:
                                try:
                                    value = vdec(value)
                                except Exception as exc:
                                    self.bad(exc, value, topic, partition, r.offset)
                                    continue
                            if meta:
                                key = r.key
                                if kdec is not None and key is not None:
                                    try:
                                        key = kdec(key)
                                    except Exception as exc:
                                        self.bad(exc, key, topic, partition, r.offset)
                                        continue
                                ts = r.timestamp
                                value = _record(KafkaRecord, (
                                    topic, partition, r.offset, key, value, r.headers or [],
                                    ts if ts is not None and ts >= 0 else None))
                            append(value)
                    if not emit(items, {(topic, partition): part[0].offset},
                                {(topic, partition): part[-1].offset}):
                        return
                    if tracked:
                        now = time.monotonic()   # a big poll may take a while to pass on
                        if now >= next_commit and self.down_since is None:
                            self.commit()
                            next_commit = now + interval
            if tracked and now >= next_commit and self.down_since is None:
                self.commit()
                next_commit = now + interval
            if stop_at_end and self.at_end():
                return


# -- confluent-kafka -------------------------------------------------------------------------

class _ConfluentReader(_Reader):
    def __init__(self, spec: _SourceSpec, ctx: Any) -> None:
        super().__init__(spec, ctx)
        ck = _confluent("kafka_source")
        self.ck = ck
        options = dict(spec.options)
        self.batch = int(options.pop("max_poll_records", POLL_RECORDS))
        config = _confluent_config("kafka_source", options, _SOURCE_OURS)
        config["bootstrap.servers"] = (spec.bootstrap if isinstance(spec.bootstrap, str)
                                       else ",".join(spec.bootstrap))
        # confluent-kafka needs a group id even to read assigned partitions; without
        # one nothing is committed, so a throwaway id leaves no trace on the broker
        config["group.id"] = spec.group_id or f"nanostream-{uuid.uuid4().hex}"
        config["enable.auto.commit"] = False
        if spec.stop_at_end:
            # an event at each partition's end: the position of a partition read to its
            # end without a message (empty, or at its committed offset) is otherwise unknown
            config["enable.partition.eof"] = True
        self.eofs: dict[tuple[str, int], int] = {}
        config.setdefault("logger", log)
        user_error_cb = config.pop("error_cb", None)
        self.all_down = False

        def error_cb(err: Any) -> None:
            if err.code() == ck.KafkaError._ALL_BROKERS_DOWN:
                self.all_down = True
            if user_error_cb is not None:
                user_error_cb(err)
        config["error_cb"] = error_cb
        try:
            consumer = ck.Consumer(config)
        except ck.KafkaException as exc:
            raise ValueError(f"kafka_source: confluent-kafka refused the configuration: "
                             f"{exc.args[0].str() if exc.args else exc}") from None
        self.consumer = consumer
        try:
            try:
                consumer.list_topics(timeout=spec.connect_timeout)
            except ck.KafkaException as exc:
                raise _unreachable("kafka_source", spec.bootstrap, spec.connect_timeout,
                                   exc.args[0].str() if exc.args else exc) from None
            if spec.partitions is not None or spec.group_id is None:
                keys = spec.partitions or self._all_partitions()
                consumer.assign([ck.TopicPartition(t, p) for t, p in keys])
                self.assigned(keys)
            else:
                subs = [("^" + spec.pattern if not spec.pattern.startswith("^")
                         else spec.pattern)] if spec.pattern is not None else list(spec.topics)
                consumer.subscribe(subs, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                   on_lost=self._on_lost)
        except BaseException:
            consumer.close()
            raise

    def _all_partitions(self) -> list[tuple[str, int]]:
        keys: list[tuple[str, int]] = []
        deadline = time.monotonic() + self.spec.connect_timeout
        for t in self.spec.topics:
            while True:
                md = self.consumer.list_topics(t, timeout=self.spec.connect_timeout)
                topic = md.topics.get(t)
                if topic is not None and topic.error is None and topic.partitions:
                    break
                if time.monotonic() > deadline:
                    raise LookupError(f"kafka_source: topic {t!r} does not exist at "
                                      f"{self.spec.bootstrap} (or has no partitions) after "
                                      f"{self.spec.connect_timeout:g} s: check the name, or "
                                      "create the topic first")
                time.sleep(0.05)
            keys.extend((t, p) for p in sorted(topic.partitions))
        return keys

    def _on_assign(self, consumer: Any, partitions: Any) -> None:
        self.assigned((tp.topic, tp.partition) for tp in partitions)

    def _on_revoke(self, consumer: Any, partitions: Any) -> None:
        self.revoked((tp.topic, tp.partition) for tp in partitions)

    def _on_lost(self, consumer: Any, partitions: Any) -> None:
        self.revoked(((tp.topic, tp.partition) for tp in partitions), lost=True)

    def commit_positions(self, positions: dict[tuple[str, int], int]) -> None:
        ck = self.ck
        self.consumer.commit(offsets=[ck.TopicPartition(t, p, off)
                                      for (t, p), off in positions.items()],
                             asynchronous=False)

    def close(self) -> None:
        self.consumer.close()

    def connected(self) -> bool:
        if not self.all_down:
            return True
        try:
            self.consumer.list_topics(timeout=0.5)
        except self.ck.KafkaException:
            return False
        self.all_down = False
        return True

    def highwater(self, key: tuple[str, int]) -> int | None:
        _, hi = self.consumer.get_watermark_offsets(self.ck.TopicPartition(*key), cached=True)
        return None if hi is None or hi < 0 else int(hi)

    def position(self, key: tuple[str, int]) -> int | None:
        (tp,) = self.consumer.position([self.ck.TopicPartition(*key)])
        pos = max(tp.offset, self.eofs.get(key, -1))
        return None if pos < 0 else int(pos)

    def pump(self) -> None:
        spec, ctx = self.spec, self.ctx
        ck = self.ck
        consume = self.consumer.consume
        batch_size = self.batch
        vdec = spec.vdec
        kdec = spec.kdec
        meta = spec.with_metadata
        tracked = self.tracker is not None
        interval = spec.commit_interval
        next_commit = time.monotonic() + interval
        stop_at_end = spec.stop_at_end
        size = CHUNK
        emit = self.emit
        no_time = ck.TIMESTAMP_NOT_AVAILABLE
        pace = _Pace(batch_size)
        read = ({t for t, _ in spec.partitions} if spec.partitions is not None
                else set(spec.topics) if spec.pattern is None else set())
        only = next(iter(read)) if len(read) == 1 else None   # the one topic read, if so
        while not ctx.stopping:
            try:
                msgs = consume(num_messages=pace.want, timeout=POLL_SECONDS)
            except ck.KafkaException as exc:
                raise ConnectionError(f"kafka_source: the consumer failed: {exc}") from exc
            now = time.monotonic()
            pace.polled(now, len(msgs))
            if msgs:
                self.down_since = None
            else:
                self.idle(now)
            for first in range(0, len(msgs), size):
                part = msgs[first:first + size] if len(msgs) > size else msgs
                fast = _records_confluent(ck.Message, part, vdec, kdec, meta, no_time, only)
                if fast is not None:
                    if not emit(*fast):
                        return
                    if tracked:
                        now = time.monotonic()
                        if now >= next_commit and self.down_since is None:
                            self.commit()
                            next_commit = now + interval
                    continue
                # an event among the messages, or a message that does not decode
                firsts: dict[tuple[str, int], int] = {}
                lasts: dict[tuple[str, int], int] = {}
                items: list[Any] = []
                append = items.append
                for m in part:
                    if m.error() is not None:   # an event, not a message
                        self._event(m)
                        continue
                    topic, partition, offset = m.topic(), m.partition(), m.offset()
                    where = (topic, partition)
                    if where not in lasts:
                        firsts[where] = offset
                    lasts[where] = offset
                    value = m.value()
                    if vdec is not None and value is not None:
                        try:
                            value = vdec(value)
                        except Exception as exc:
                            self.bad(exc, value, topic, partition, offset)
                            continue
                    if meta:
                        key = m.key()
                        if kdec is not None and key is not None:
                            try:
                                key = kdec(key)
                            except Exception as exc:
                                self.bad(exc, key, topic, partition, offset)
                                continue
                        kind, ts = m.timestamp()
                        value = _record(KafkaRecord, (topic, partition, offset, key, value,
                                                      m.headers() or [],
                                                      ts if kind != no_time else None))
                    append(value)
                if not emit(items, firsts, lasts):
                    return
                if tracked:
                    now = time.monotonic()   # a big poll may take a while to pass on
                    if now >= next_commit and self.down_since is None:
                        self.commit()
                        next_commit = now + interval
            if tracked and now >= next_commit and self.down_since is None:
                self.commit()
                next_commit = now + interval
            if stop_at_end and self.at_end():
                return

    def _event(self, m: Any) -> None:
        """An error event among the messages: the end of a partition (with
        stop_at_end), a fatal error (raised), or a warning (logged)."""
        ck = self.ck
        err = m.error()
        if err.code() == ck.KafkaError._PARTITION_EOF:
            self.eofs[(m.topic(), m.partition())] = m.offset()
        elif err.fatal() or err.code() in (ck.KafkaError.TOPIC_AUTHORIZATION_FAILED,
                                           ck.KafkaError.GROUP_AUTHORIZATION_FAILED,
                                           ck.KafkaError._SSL, ck.KafkaError._AUTHENTICATION):
            raise ConnectionError(f"kafka_source: the consumer failed: {err.str()}")
        else:
            log.warning("kafka_source %r: %s", self.name, err.str())


# -- the sink --------------------------------------------------------------------------------

@dataclass(repr=False)
class _SinkSpec:
    """Everything a run of a kafka_sink needs (secrets masked in its repr)."""

    topic: str | Callable[[Any], str]
    bootstrap: Any
    key: Callable[[Any], Any] | None
    vser: Callable[[Any], bytes]
    kser: Callable[[Any], bytes]
    headers: Any
    fixed_headers: list[tuple[str, bytes | None]] | None
    client: str
    max_in_flight: int
    connect_timeout: float
    delivery_timeout: float
    options: dict[str, Any]

    def __repr__(self) -> str:
        topic = self.topic if isinstance(self.topic, str) else getattr(
            self.topic, "__name__", "<function>")
        extra = f", client={self.client!r}" if self.client != "kafka-python" else ""
        return f"KafkaSink({topic!r}{extra}{_show_options(self.options)})"


_SINK_OURS = {"bootstrap_servers": "bootstrap_servers=", "bootstrap.servers": "bootstrap_servers=",
              "value_serializer": "value_serializer=", "key_serializer": "key_serializer="}


def kafka_sink(topic: str | Callable[[Any], str], *,
               bootstrap_servers: str | list[str] = "localhost:9092",
               key: Callable[[Any], Any] | None = None, value_serializer: Any = "json",
               key_serializer: Any = "str", headers: Any = None,
               client: str = "kafka-python", max_in_flight: int = 10_000,
               connect_timeout: float = 15.0, delivery_timeout: float = 60.0,
               **options: Any) -> Stage:
    """A sink producing each item to ``topic`` (a name, or a function of the item).

    * ``value_serializer``: ``"json"`` (default), ``"str"`` (UTF-8 text of the item),
      ``"bytes"`` (the item must be bytes) or a function returning bytes.
    * ``key``: a function of the item giving the message key (serialized with
      ``key_serializer``, ``"str"`` by default); ``None`` sends no key.
    * ``headers``: a list of ``(name, value)`` pairs or a dict (values str or bytes),
      or a function of the item returning one.
    * At least once: an item counts as handled only once the broker acknowledged it,
      so a ``kafka_source`` upstream commits its offset only then. At most
      ``max_in_flight`` messages await acknowledgement at once.
    * Errors: an item that cannot be serialized fails the run with a ``StageError``
      (or is skipped with ``on_error="skip"``); a message the broker does not take
      within ``delivery_timeout`` seconds (the client retries meanwhile, e.g. while the
      broker is away) always fails the run with a ``StageError`` naming the item.
    * Sent messages are flushed at the end of the stream and when the run is stopped;
      the producer is closed at the end, on stop and on failure.
    * ``client``, ``connect_timeout`` and other keyword options: as for
      :func:`kafka_source` (e.g. ``acks="all"``, ``linger_ms=5``,
      ``compression_type="gzip"``). Stage options: ``name``, ``queue_size``,
      ``on_error``.

    >>> kafka_sink("orders-clean", acks="all")
    <sink 'kafka_sink'(spec=KafkaSink('orders-clean', acks='all')) stream=True>
    """
    fn = "kafka_sink"
    stage_options, client_options = _split_options(fn, options)
    _check_client(fn, client)
    _check_bootstrap(fn, bootstrap_servers)
    if not (callable(topic) or (isinstance(topic, str) and topic)):
        raise TypeError(f"{fn}: topic must be a topic name or a function of the item, got "
                        f"{topic!r}")
    if isinstance(topic, str):
        _check_topic(fn, topic)
    if key is not None and not callable(key):
        raise TypeError(f"{fn}: key must be a function of the item (e.g. key=lambda o: "
                        f"o['id']), got {type(key).__name__}")
    if headers is not None and not (callable(headers) or isinstance(headers, (list, tuple,
                                                                              Mapping))):
        raise TypeError(f"{fn}: headers must be a list of (name, value) pairs, a dict, or a "
                        f"function of the item, got {type(headers).__name__}")
    vser = _serializer(fn, "value_serializer", value_serializer)
    kser = _serializer(fn, "key_serializer", key_serializer)
    if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int):
        raise TypeError(f"{fn}: max_in_flight must be an int, got {max_in_flight!r}")
    if max_in_flight < 1:
        raise ValueError(f"{fn}: max_in_flight must be >= 1, got {max_in_flight}")
    _check_seconds(fn, "connect_timeout", connect_timeout)
    _check_seconds(fn, "delivery_timeout", delivery_timeout)
    if client == "kafka-python":
        _check_kafka_python_options(fn, client_options, _kafka().KafkaProducer.DEFAULT_CONFIG,
                                    _SINK_OURS)
    else:
        _confluent_config(fn, client_options, _SINK_OURS)
    fixed_headers = None if headers is None or callable(headers) else _headers(headers)
    spec = _SinkSpec(topic=topic, bootstrap=bootstrap_servers, key=key, vser=vser, kser=kser,
                     headers=headers, fixed_headers=fixed_headers, client=client,
                     max_in_flight=max_in_flight, connect_timeout=float(connect_timeout),
                     delivery_timeout=float(delivery_timeout), options=client_options)
    # in a run the runtime drives the writer itself (internal "writer": no thread of
    # its own, fused into the stage before it); _kafka_sink serves direct calls
    return Stage(_kafka_sink, SINK, {**stage_options, "stream": True}, kwargs={"spec": spec},
                 internal={"writer": _open_writer, "tick": TICK_EVERY, "context": True})


def _headers(h: Any) -> list[tuple[str, bytes | None]] | None:
    if h is None:
        return None
    pairs = h.items() if isinstance(h, Mapping) else h
    out: list[tuple[str, bytes | None]] = []
    for pair in pairs:
        name, value = pair
        if not isinstance(name, str):
            raise TypeError(f"kafka_sink: header names must be str, got {name!r}")
        if isinstance(value, str):
            out.append((name, value.encode()))
        elif value is None or type(value) is bytes:
            out.append((name, value))
        elif isinstance(value, (bytes, bytearray, memoryview)):
            out.append((name, bytes(value)))
        else:   # bytes(5) would be five zero bytes, not "5"
            raise TypeError(f"kafka_sink: header values must be str, bytes or None, got "
                            f"{type(value).__name__} {repr_short(value)} for {name!r}; "
                            "convert it, e.g. str(value)")
    return out


def _open_writer(done: Callable[[list[Any]], None], *, spec: _SinkSpec, ctx: Any) -> _Writer:
    """The runtime's writer hook for a kafka_sink (``internal={"writer": ...}``): the
    producer of one run, given the runtime's ``done(tokens)``."""
    cls = _KafkaPythonWriter if spec.client == "kafka-python" else _ConfluentWriter
    return cls(spec, ctx, done)


def _no_tokens(tokens: list[Any]) -> None:
    return None


def _kafka_sink(items: Iterable[Any], *, spec: _SinkSpec, ctx: Any = None) -> None:
    """The sink called directly, outside a run: send every item, flush, close."""
    writer = _open_writer(_no_tokens, spec=spec, ctx=ctx or _io.DetachedContext("kafka_sink"))
    try:
        it = iter(items)
        while True:
            chunk = list(itertools.islice(it, CHUNK))
            if not chunk:
                break
            writer.write(chunk, None)
    except BaseException:
        try:
            writer.close(False)
        except Exception:   # already failing: that error is the one to report
            log.warning("kafka_sink %r: closing the producer failed", writer.name,
                        exc_info=True)
        raise
    writer.close(True)


def _encoder(spec: _SinkSpec) -> Callable[[Any], tuple[Any, Any, Any, Any]]:
    """``item -> (topic, value, key, headers)`` of its message, with the sink's
    serializers and callables bound once (both writers' loops call it per item)."""
    fixed_topic: Any = spec.topic
    topic_of = fixed_topic if callable(fixed_topic) else None
    vser, kser, key_of = spec.vser, spec.kser, spec.key
    fixed_headers = spec.fixed_headers
    headers_of = spec.headers if callable(spec.headers) else None

    def encode(item: Any) -> tuple[Any, Any, Any, Any]:
        value = None if item is None else vser(item)
        key = None
        if key_of is not None:
            key = key_of(item)
            if key is not None:
                key = kser(key)
        topic = fixed_topic if topic_of is None else topic_of(item)
        headers = fixed_headers if headers_of is None else _headers(headers_of(item))
        return topic, value, key, headers

    return encode


_SERIALIZE = "could not serialize it for Kafka"


class _Writer:
    """The producer side of one run, driven by the runtime (see ``_runtime._WriterRunner``):
    ``write(items, tokens)`` sends, ``tick()`` runs while no items come, ``close(ok)``
    at the end.

    Items are marked handled in rounds: every ``ACK_EVERY`` messages (at most
    ``max_in_flight``) or ``ACK_INTERVAL`` seconds it flushes the producer (waits
    until the broker has acknowledged every message sent so far) and then passes
    their tokens to ``done``. That is the hand-written loop's flush-then-commit,
    without a Python callback per message (each such callback would also hand the GIL
    back and forth with the client's thread). The first delivery error is raised as a
    StageError naming its item. An item skipped under ``on_error`` (it could not be
    serialized) is handled with the round it came in."""

    def __init__(self, spec: _SinkSpec, ctx: Any, done: Callable[[list[Any]], None]) -> None:
        self.spec = spec
        self.ctx = ctx
        self.name = ctx.name
        self.done = done
        self.failed: tuple[Any, BaseException] | None = None
        self.batch = min(ACK_EVERY, spec.max_in_flight)
        self.encode = _encoder(spec)
        self.n = 0                  # items taken since the last round was settled
        self.tokens: list[Any] = []  # their tokens
        self.since = 0.0            # when the first of them came
        self.closed = False

    def write(self, items: list[Any], tokens: list[Any] | None) -> None:
        n = len(items)
        start = 0
        while start < n:
            if not self.n:
                self.since = time.monotonic()
            end = min(n, start + self.batch - self.n)
            whole = start == 0 and end == n
            part = items if whole else items[start:end]
            self.send(part)
            self.n += len(part)
            if tokens is not None:
                self.tokens.extend(tokens if whole else tokens[start:end])
            if self.n >= self.batch:
                self.settle()
            start = end
        if self.n and time.monotonic() - self.since >= ACK_INTERVAL:
            self.settle()

    def tick(self) -> None:
        self.idle()
        if self.n and time.monotonic() - self.since >= ACK_INTERVAL:
            self.settle()

    def settle(self) -> None:
        """Wait until everything sent is acknowledged, then mark the round handled."""
        self.flush()
        tokens = self.tokens
        self.tokens = []
        self.n = 0
        if tokens:
            self.done(tokens)

    def close(self, ok: bool) -> None:
        """``ok``: settle what is left, then close the producer (closed also when
        settling fails); otherwise give what was sent a moment and drop the rest."""
        if self.closed:
            return
        self.closed = True
        if ok:
            try:
                if self.n:
                    self.settle()
            except BaseException:
                self.shutdown(False)
                raise
        self.shutdown(ok)

    def send(self, items: list[Any]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def shutdown(self, ok: bool) -> None:
        raise NotImplementedError

    def idle(self) -> None:
        """Called on the idle ticks."""

    def failure(self, item: Any, exc: BaseException) -> None:
        """Record a delivery error (any thread); the sink thread raises it."""
        if self.failed is None:
            self.failed = (item, exc)

    def check(self) -> None:
        failed = self.failed
        if failed is not None:
            item, exc = failed
            if _TOO_LARGE.search(f"{type(exc).__name__} {exc}"):
                detail = ("the message is larger than the producer or the broker takes: "
                          "send smaller items, or raise max_request_size (kafka-python) or "
                          "message.max.bytes (confluent) and the broker's and topic's limits")
            else:
                detail = (f"Kafka did not take the message (delivery_timeout "
                          f"{self.spec.delivery_timeout:g} s)")
            raise StageError(self.name, item, exc, detail=detail)

    def unsent(self, exc: BaseException | None, item: Any) -> StageError:
        """A flush that did not end: the broker acknowledged not all messages in time."""
        return StageError(self.name, item, exc or TimeoutError(
            "the broker acknowledged not all messages"), detail=(
            f"not acknowledged within delivery_timeout {self.spec.delivery_timeout:g} s "
            "and then some"))


class _KafkaPythonWriter(_Writer):
    def __init__(self, spec: _SinkSpec, ctx: Any, done: Callable[[list[Any]], None]) -> None:
        super().__init__(spec, ctx, done)
        kafka = _kafka()
        self.kafka = kafka
        config = dict(spec.options)
        config.setdefault("bootstrap_timeout_ms", int(spec.connect_timeout * 1000))
        delivery_ms = int(spec.delivery_timeout * 1000)
        config.setdefault("delivery_timeout_ms", delivery_ms)
        config.setdefault("max_block_ms", delivery_ms)
        if config["delivery_timeout_ms"] < config.get("request_timeout_ms", 30000) + \
                config.get("linger_ms", 0):
            config.setdefault("request_timeout_ms", max(1000, config["delivery_timeout_ms"] // 2))
        _wait_reachable("kafka_sink", spec.bootstrap, spec.connect_timeout)
        try:
            self.producer = kafka.KafkaProducer(bootstrap_servers=spec.bootstrap, **config)
        except _connect_errors(kafka) as exc:
            raise _unreachable("kafka_sink", spec.bootstrap, spec.connect_timeout,
                               exc) from None
        self.futures: list[Any] = []   # what send() returned for each message of the round
        self.items: list[Any] = []     # ... and its item

    def send(self, items: list[Any]) -> None:
        encode = self.encode
        sender = self.producer.send
        futures, sent = self.futures, self.items
        for item in items:
            try:
                topic, value, key, headers = encode(item)
            except Exception as exc:
                self.ctx.item_error(exc, item, detail=_SERIALIZE)
                continue   # skipped: handled with this round
            try:
                futures.append(sender(topic, value, key, headers))
            except Exception as exc:  # e.g. too large, or no metadata within max_block_ms
                self.failure(item, exc)
                self.check()
            sent.append(item)

    def flush(self) -> None:
        futures, items = self.futures, self.items
        try:
            self.producer.flush(timeout=self.spec.delivery_timeout + 5)
        except self.kafka.errors.KafkaTimeoutError as exc:
            late = next((item for fut, item in zip(futures, items, strict=False)
                         if not fut.is_done or fut.exception is not None), None)
            raise self.unsent(exc, late) from None
        for fut, item in zip(futures, items, strict=False):
            if fut.exception is not None:
                self.failure(item, fut.exception)
                self.check()
        self.futures, self.items = [], []

    def shutdown(self, ok: bool) -> None:
        # after a failure or an abort, give what was sent a moment, then let it go
        producer = self.producer
        try:
            producer.close(timeout=self.spec.delivery_timeout if ok else 1.0)
        except self.kafka.errors.KafkaTimeoutError:
            # kafka-python's close() gives up in its flush, leaving its sender thread
            # running: stop that thread as close() does after a timeout, then close
            sender = getattr(producer, "_sender", None)
            if sender is not None:
                sender.force_close()
                sender.join(1.0)
            producer.close(timeout=0)
            if ok:
                raise


class _ConfluentWriter(_Writer):
    """With ``delivery.report.only.error`` librdkafka reports failed messages only;
    the per-message callback (which names the item) then never runs for a success.

    ``produce`` is called with positional arguments (its keyword parsing costs as
    much as the rest) and, for a fixed topic without headers, over a whole batch at
    C speed (``map``): values and keys are serialized with one ``map`` each."""

    def __init__(self, spec: _SinkSpec, ctx: Any, done: Callable[[list[Any]], None]) -> None:
        super().__init__(spec, ctx, done)
        ck = _confluent("kafka_sink")
        self.ck = ck
        config = _confluent_config("kafka_sink", spec.options, _SINK_OURS)
        config["bootstrap.servers"] = (spec.bootstrap if isinstance(spec.bootstrap, str)
                                       else ",".join(spec.bootstrap))
        config.setdefault("message.timeout.ms", int(spec.delivery_timeout * 1000))
        config["delivery.report.only.error"] = True
        config["on_delivery"] = self._undelivered
        config.setdefault("logger", log)
        try:
            producer = ck.Producer(config)
        except ck.KafkaException as exc:
            raise ValueError(f"kafka_sink: confluent-kafka refused the configuration: "
                             f"{exc.args[0].str() if exc.args else exc}") from None
        try:
            producer.list_topics(timeout=spec.connect_timeout)
        except ck.KafkaException as exc:
            raise _unreachable("kafka_sink", spec.bootstrap, spec.connect_timeout,
                               exc.args[0].str() if exc.args else exc) from None
        self.producer = producer
        # the round's messages as (values, items) lists, to name the item of a
        # delivery error (kept per batch: nothing per message)
        self.sent: list[tuple[list[Any], list[Any]]] = []
        self.whole = isinstance(spec.topic, str) and spec.headers is None

    def send(self, items: list[Any]) -> None:
        if not (self.whole and self._send_whole(items)):
            self._send_each(items)

    def _send_whole(self, items: list[Any]) -> bool:
        """The batch in one go; False (nothing sent) if an item needs the careful path
        (a None item, or one that does not serialize: it is then serialized again)."""
        spec = self.spec
        if any(map(_is_none, items)):
            return False
        try:
            values = list(map(spec.vser, items))
            keys = None
            if spec.key is not None:
                keys = list(map(spec.key, items))
                kser = spec.kser
                if not ((kser is _to_bytes or kser is _to_text_bytes)
                        and set(map(type, keys)) == {bytes}):
                    keys = [None if k is None else kser(k) for k in keys]
        except Exception:
            return False
        topic = str(spec.topic)
        produce = self.producer.produce
        start, n = 0, len(items)
        while start < n:
            vs = values[start:] if start else values
            it = iter(vs)
            try:
                if keys is None:
                    deque(map(produce, repeat(topic), it), maxlen=0)
                else:
                    deque(map(produce, repeat(topic), it, keys[start:] if start else keys),
                          maxlen=0)
                break
            except BufferError:   # the client's queue is full: let it drain, then retry
                at = start + len(vs) - it.__length_hint__() - 1  # type: ignore[attr-defined]
                self._retry(items[at], topic, values[at],
                            None if keys is None else keys[at], None)
            except self.ck.KafkaException as exc:   # e.g. too large
                at = start + len(vs) - it.__length_hint__() - 1  # type: ignore[attr-defined]
                self.failure(items[at], exc)
                self.check()
            start = at + 1
        self.sent.append((values, items))
        return True

    def _send_each(self, items: list[Any]) -> None:
        encode = self.encode
        produce = self.producer.produce
        values: list[Any] = []
        sent: list[Any] = []
        self.sent.append((values, sent))
        for item in items:
            try:
                topic, value, key, headers = encode(item)
            except Exception as exc:
                self.ctx.item_error(exc, item, detail=_SERIALIZE)
                continue   # skipped: handled with this round
            try:
                if headers is None:
                    produce(topic, value, key)
                else:
                    produce(topic, value, key, headers=headers)
            except BufferError:   # the client's queue is full: let it drain, then retry
                self._retry(item, topic, value, key, headers)
            except self.ck.KafkaException as exc:   # e.g. too large
                self.failure(item, exc)
                self.check()
            values.append(value)
            sent.append(item)

    def _retry(self, item: Any, topic: str, value: Any, key: Any, headers: Any) -> None:
        while True:
            self.producer.poll(0.05)
            self.check()
            try:
                self.producer.produce(topic, value, key, headers=headers)
                return
            except BufferError:
                continue
            except self.ck.KafkaException as exc:
                self.failure(item, exc)
                self.check()

    def _undelivered(self, err: Any, msg: Any) -> None:
        """The producer's delivery report, called (in poll or flush, in this thread)
        for failed messages only: record the error with its item."""
        if err is None:
            return
        value = msg.value()
        item = next((it for values, items in self.sent
                     for v, it in zip(values, items, strict=False) if v == value), value)
        self.failure(item, self.ck.KafkaException(err))

    def idle(self) -> None:
        self.producer.poll(0)   # serve error reports
        self.check()

    def flush(self) -> None:
        left = self.producer.flush(self.spec.delivery_timeout + 5)
        self.check()
        if left:
            raise self.unsent(None, next((items[0] for _, items in self.sent if items), None))
        self.sent = []

    def shutdown(self, ok: bool) -> None:
        producer = self.producer
        if not ok:
            # after a failure or an abort: a moment for what was sent, then drop the rest
            # (close() would wait for it up to delivery_timeout)
            producer.flush(1.0)
            producer.purge()
            producer.flush(0)
        close = getattr(producer, "close", None)
        if close is not None:
            close()
