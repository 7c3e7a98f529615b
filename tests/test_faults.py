"""Fault injection over random graphs (see ``tests/fault_support.py`` for the invariants).

Random DAGs (chains, fan-out, fan-in, segments), random ``workers``, ``ordered``,
executors (thread, async, process) and ``on_error``, stages that raise at random
items, run slowly, block or fail once and are retried; random ``stop(drain=...)``,
iteration to the end and early ``break``. Every example checks that the run ends
within a bound, that the first error surfaces once as a ``StageError`` naming the
right stage and item, that no thread or process is left behind, and, when the run
was not aborted, that every emitted item was handled or reported.

``NANOSTREAM_FAULT_EXAMPLES=N`` sets the total number of examples (default 400,
split between the tests); ``NANOSTREAM_FAULT_TALLY=tally.json`` writes the counts
(examples, actions, executors, faults planned and fired by kind).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings

from tests.fault_support import Tally, examples_strategy, run_example, write_tally

_TOTAL = int(os.environ.get("NANOSTREAM_FAULT_EXAMPLES", "0") or 0) or 400
_LONG = "NANOSTREAM_FAULT_EXAMPLES" in os.environ
TALLY = Tally()

# a long run is bounded per example (fault_support.BOUND), not by the suite's timeout
pytestmark = pytest.mark.timeout(0 if _LONG else 120)


def _settings(share: float) -> settings:
    return settings(max_examples=max(1, round(_TOTAL * share)), deadline=None,
                    database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@pytest.fixture(scope="module", autouse=True)
def _tally():
    yield
    path = os.environ.get("NANOSTREAM_FAULT_TALLY")
    if path:
        write_tally(TALLY, path)


@_settings(0.7)
@given(examples_strategy(process_share=1))
def test_random_graphs_with_faults(ex):
    run_example(ex, TALLY)


@_settings(0.2)
@given(examples_strategy(process_share=1, force_skip=True))
def test_skip_loses_exactly_the_failing_items(ex):
    run_example(ex, TALLY)


@_settings(0.1)
@given(examples_strategy(process_share=6))
def test_process_executor_faults(ex):
    run_example(ex, TALLY)
