"""The documentation: the MkDocs site builds with --strict, every public name is in
the API reference, and the Python examples on the pages run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import nanostream as ns

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# Pages whose ```python blocks are executed, each page in one fresh namespace, in order.
# A block right after a line `<!-- not run: reason -->` is skipped (e.g. it needs a
# Kafka broker or a cluster).
RUNNABLE = ["index.md", "tutorial.md", "concepts.md", "coming-from.md",
            "how-to/jupyter.md", "how-to/errors.md", "how-to/testing.md",
            "how-to/performance.md", "how-to/class-api.md"]
# Pages other engineers write; they must exist (a stub at least) and be in the nav.
OTHERS = ["operators.md", "files-and-databases.md", "kafka.md", "scaling.md", "reliability.md",
          "benchmarks.md"]

FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: str) -> list[tuple[int, str]]:
    text = (DOCS / page).read_text()
    blocks = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip().splitlines()
        if before and before[-1].startswith("<!-- not run"):
            continue
        blocks.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return blocks


def test_nav_has_every_page():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in [*RUNNABLE, *OTHERS, "api.md"]:
        assert (DOCS / page).is_file(), page
        assert f": {page}\n" in nav, f"{page} is not in the nav of mkdocs.yml"


def test_every_public_name_is_in_the_api_reference():
    api = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"^::: nanostream\.(\w+)$", api, re.M))
    missing = set(ns.__all__) - documented
    assert not missing, f"add these to docs/api.md: {sorted(missing)}"
    assert {"kafka", "dask"} <= documented   # the separate namespaces, documented whole


@pytest.mark.parametrize("page", RUNNABLE)
def test_page_examples_run(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    blocks = python_blocks(page)
    for line, code in blocks:
        try:
            exec(compile(code, f"{page}:{line}", "exec"), namespace)  # noqa: S102
        except Exception as exc:
            raise AssertionError(f"the example at docs/{page}:{line} failed: {exc!r}") from exc
    ns.stop_all()


def test_site_builds_strict(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("nanostream.transform", "nanostream.Pipeline", "nanostream.Run",
                 "NanoStreamGraph"):
        assert name in api
    assert "&gt;&gt;&gt; " in api           # doctests are rendered as code,
    assert "<blockquote>" not in api         # not as nested quotes
