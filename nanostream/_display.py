"""Showing pipelines and runs: progress bars and notebook displays."""

from __future__ import annotations

import html
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._graph import Pipeline
    from ._runtime import Run


def _source_length(run: Run) -> int | None:
    total = 0
    for r in run.runners:
        if r.stage.kind != "source":
            continue
        data = r.stage.args[0] if r.stage.name == "from_iterable" and r.stage.args else None
        try:
            total += len(data)  # type: ignore[arg-type]
        except TypeError:
            return None
    return total or None


def start_progress(run: Run) -> None:
    """A progress bar (tqdm, notebook-aware) counting the items the sources emit."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is an optional extra
        import logging
        logging.getLogger("nanostream").warning(
            "progress=True needs tqdm: pip install 'nanostream[progress]'")
        return
    bar = tqdm(total=_source_length(run), unit="item", desc="nanostream")

    def update() -> None:
        shown = 0
        while True:
            finished = run._done.wait(0.2)
            emitted = sum(r.items_out for r in run.runners if r.stage.kind == "source")
            bar.update(emitted - shown)
            shown = emitted
            if finished:
                bar.close()
                return

    threading.Thread(target=update, name="nanostream:progress", daemon=True).start()


def pipeline_html(p: Pipeline) -> str:
    from ._graph import describe
    return f"<pre>Pipeline({html.escape(describe(p))})</pre>"


def run_html(run: Run) -> str:
    return f"<pre>{html.escape(repr(run))}\n{html.escape(str(run.stats()))}</pre>"


