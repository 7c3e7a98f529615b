"""The README's promises: its quickstart runs, its commands are the ones CI runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_quickstart_runs():
    code = _blocks("python")[0]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:3] == ["{'id': 0, 'square': 0}", "{'id': 2, 'square': 4}",
                         "{'id': 4, 'square': 16}"]
    assert lines[3].startswith("[{'id': 0")


def test_exactly_two_setup_commands_and_ci_runs_the_test_command():
    commands = [b.strip() for b in _blocks("bash")]
    assert len(commands) == 2, commands
    demo, tests = commands
    assert demo.endswith("-m nanostream")
    assert tests.endswith("-m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci, "'.ci/run' must run the README's test command verbatim"


def test_demo_module_runs():
    out = subprocess.run([sys.executable, "-m", "nanostream"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "most common words: a (3)" in out.stdout
    assert "enrich" in out.stdout
