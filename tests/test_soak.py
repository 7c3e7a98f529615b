"""The CI version of the soak run (benchmarks/soak.py, same code): Kafka -> transform ->
sqlite at full rate for 30 s in a fresh process, sampling its memory, threads and
queue fill. Memory must stay flat (slope under 1 MB/min over the steady part; a slope
over it is confirmed over 60 s more before the test fails), the thread count must not
grow, and the throughput must hold. The 10-minute runs and their figures are in
docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.kafka


@pytest.mark.timeout(240)
def test_soak_30s_memory_flat_threads_constant_throughput_steady(kafka_broker, tmp_path):
    out = tmp_path / "soak.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--seconds", "30", "--confirm", "60",
         "--interval", "0.5", "--bootstrap", kafka_broker.bootstrap, "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    report = json.loads(out.read_text()) if out.exists() else None
    assert report is not None, proc.stdout + proc.stderr
    summary = report["summary"]
    assert summary["checks"] == {"memory flat": True, "no thread growth": True,
                                 "throughput steady": True}, proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary["slope_mb_per_min"] < 1.0
    assert summary["messages"] > 10_000, "the pipeline moved data at full rate"
    samples = report["samples"]
    assert len(samples) >= 55   # every 0.5 s for 30 s (or 90 s with the confirmation)
    written = [s["written"] for s in samples]
    assert written == sorted(written)
    assert {"parse", "sql"} <= set(samples[-1]["fill"])
