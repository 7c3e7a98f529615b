"""Every script in examples/ runs and does what it says."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HELPERS = {"local_kafka.py"}
TESTED = {"file_to_sqlite.py", "kafka_etl.py", "fan_out.py", "cpu_bound.py", "seed_example.py"}

needs_kafka = pytest.mark.kafka


def run_example(name: str, *args: str, timeout: float = 120, warnings: str = "error") -> str:
    proc = subprocess.run([sys.executable, "-W", warnings, str(EXAMPLES / name), *args],
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_every_example_is_tested():
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert scripts - HELPERS == TESTED


def test_file_to_sqlite(tmp_path):
    db = tmp_path / "orders.db"
    out = run_example("file_to_sqlite.py", "--db", str(db))
    assert "Pipeline(read_csv | clean | sql_sink)" in out
    assert "4995 orders loaded" in out
    assert "5 broken rows skipped" in out
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT count(*), count(DISTINCT id) FROM orders").fetchone() == \
            (4995, 4995)
        assert con.execute("SELECT customer FROM orders WHERE id = 0").fetchone()[0] \
            .startswith("Customer ")


def test_file_to_sqlite_reads_a_given_csv(tmp_path):
    csv = tmp_path / "in.csv"
    csv.write_text("id,customer,amount,country\n1, ada ,10.5,fr\n2,bob,oops,de\n")
    out = run_example("file_to_sqlite.py", str(csv), "--db", str(tmp_path / "x.db"))
    assert "1 orders loaded" in out
    assert "1 broken rows skipped" in out


def test_fan_out(tmp_path):
    out = run_example("fan_out.py", "--out", str(tmp_path))
    m = re.search(r"(\d+) events archived, (\d+) rows in the summary", out)
    assert m is not None, out
    assert m.group(1) == m.group(2)
    assert int(m.group(1)) > 1000
    assert (tmp_path / "archive.jsonl.gz").read_bytes()[:2] == b"\x1f\x8b"  # gzip
    assert (tmp_path / "summary.csv").read_text().splitlines()[0] == "time,user,action"


def test_cpu_bound():
    out = run_example("cpu_bound.py", "--numbers", "6", "--size", "3000", "--workers", "2")
    assert re.search(r"6 items: serial [\d.]+ s, 2 worker processes [\d.]+ s", out), out


def test_seed_example():
    out = run_example("seed_example.py", "--seconds", "1.5")
    printed = set(re.findall(r"NanoCounter:\d+", out))  # three printers may interleave
    assert {"NanoCounter:0", "NanoCounter:1", "NanoCounter:2"} <= printed
    m = re.search(r"the counter got to (\d+)", out)
    assert m is not None, out
    assert int(m.group(1)) <= 1024 + 64     # held back by back-pressure


@needs_kafka
@pytest.mark.kafka
def test_kafka_etl_starts_its_own_broker():
    # kafka-python 3 warns (DeprecationWarning) about its own resource loading
    out = run_example("kafka_etl.py", "--count", "300", warnings="error::RuntimeWarning")
    assert "started a local broker at 127.0.0.1:" in out
    assert "300 orders in 'orders-euro'" in out


@needs_kafka
@pytest.mark.kafka
def test_kafka_etl_with_a_given_broker(kafka_broker, make_topic):
    source, target = make_topic(), make_topic()
    out = run_example("kafka_etl.py", "--bootstrap", kafka_broker.bootstrap, "--count", "200",
                      "--source-topic", source, "--target-topic", target,
                      warnings="error::RuntimeWarning")
    assert "started a local broker" not in out
    assert f"200 orders in {target!r}" in out
