"""Tiny registry and runner shared by every benchmark workload.

A workload lives in its own module ``benchmarks/w<N>_<name>.py`` and calls
:func:`register` with a :class:`Workload` at import time. ``python -m benchmarks``
imports every such module (see :func:`discover`), runs the selected workloads and
prints one table. Adding W6, W7, ... means adding one module; nothing here changes.

Rules every contender follows:

* It is a plain function ``run(params) -> Measurement | float`` executed in the
  suite's own process (W4 starts its own subprocesses and reports what they
  measured). It times itself with :class:`Stopwatch`, so the figure excludes
  interpreter start and library import (the harness imports ``requires`` before
  any timed run) but includes building, starting and stopping the pipeline.
* It checks that the work was really done (``assert count == expected``); a failed
  check, an exception or a timeout becomes ``error: <exception>`` in the table and
  the contender is not repeated.
* Peer libraries are imported inside the function, never at module top level, so a
  missing peer shows up as "not installed" instead of breaking the suite.
"""

from __future__ import annotations

import _thread
import datetime as _dt
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import re
import signal
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

SUBJECT = "subject"  # the library under test: judged against the target
LIMIT = "limit"  # the baseline every ratio is computed against
PEER = "peer"  # another library (or the stdlib) doing the same job
REFERENCE = "reference"  # extra rows for orientation (e.g. the inlined loop)


# --------------------------------------------------------------------------- data


@dataclass
class Measurement:
    """One timed run. ``value`` is the figure the table shows (items/s, s, MB, ms)."""

    value: float
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Contender:
    name: str
    run: Callable[[dict[str, Any]], Measurement | float]
    kind: str = PEER
    requires: tuple[str, ...] = ()  # modules that must import, else "not installed"
    note: str = ""  # shown after the name, e.g. "n=100k" or "fork"


@dataclass
class Target:
    text: str  # e.g. ">= 0.40x loop"
    check: Callable[[float, float | None], bool]  # (median value, ratio) -> passed?


@dataclass
class Workload:
    id: str  # "W1"
    title: str
    unit: str  # items/s | s | MB | ms
    params: Callable[[bool], dict[str, Any]]  # quick -> parameters
    contenders: list[Contender]
    target: Target | None = None
    # ratio(value, baseline_value) -> float; None: no ratio column for this workload
    ratio: Callable[[float, float], float] | None = None
    ratio_style: str = "x"  # "x" -> 0.41x ; "%" -> 91%
    setup: Callable[[dict[str, Any]], str | None] | None = None  # may return a note
    fmt: Callable[[Measurement], str] | None = None  # custom figure formatting


@dataclass
class Outcome:
    contender: Contender
    status: str = "ok"  # ok | not installed | error
    error: str = ""
    runs: list[Measurement] = field(default_factory=list)

    @property
    def median(self) -> Measurement | None:
        if not self.runs:
            return None
        extra_keys = {k for m in self.runs for k in m.extra}
        return Measurement(
            statistics.median(m.value for m in self.runs),
            {
                k: statistics.median(m.extra[k] for m in self.runs if k in m.extra)
                for k in sorted(extra_keys)
            },
        )


# ----------------------------------------------------------------------- registry

_REGISTRY: dict[str, Workload] = {}
_IMPORT_ERRORS: dict[str, str] = {}


def register(workload: Workload) -> Workload:
    _REGISTRY[workload.id.upper()] = workload
    return workload


def _id_key(wid: str) -> tuple[int, str]:
    m = re.match(r"[A-Za-z]*(\d+)", wid)
    return (int(m.group(1)) if m else 10**6, wid)


def discover() -> dict[str, Workload]:
    """Import every ``benchmarks/w<N>_*.py`` module; return the registry, sorted."""
    import pkgutil

    import benchmarks

    for info in pkgutil.iter_modules(benchmarks.__path__):
        m = re.fullmatch(r"w(\d+)_\w+", info.name)
        if not m:
            continue
        try:
            importlib.import_module(f"benchmarks.{info.name}")
        except Exception as exc:  # a broken module must not sink the others
            _IMPORT_ERRORS[f"W{m.group(1)}"] = (
                f"cannot import benchmarks.{info.name}: {_describe(exc)}"
            )
    return dict(sorted(_REGISTRY.items(), key=lambda kv: _id_key(kv[0])))


# ------------------------------------------------------------------------ helpers


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds`` (perf_counter)."""

    seconds: float = float("nan")

    def __enter__(self) -> Stopwatch:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default), p in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def si(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def default_fmt(unit: str, m: Measurement) -> str:
    if unit == "items/s":
        return f"{si(m.value)} items/s"
    if unit == "s":
        return f"{m.value:.3f} s"
    if unit == "MB":
        return f"{m.value:+.1f} MB"
    if unit == "ms":
        return f"{m.value:.3f} ms"
    return f"{m.value:.4g} {unit}"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class RunTimeout(Exception):
    pass


class _Watchdog:
    """Interrupts the main thread (as Ctrl-C would) if a run takes too long.

    Contenders run in the main thread, as a user's script would; on timeout the
    pipeline under test sees a KeyboardInterrupt, which the harness turns into
    ``error: RunTimeout``.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.fired = False
        self._timer: threading.Timer | None = None

    def _fire(self) -> None:
        self.fired = True
        try:
            # a real SIGINT aimed at the main thread also wakes blocking waits
            # (_thread.interrupt_main only sets a flag and would not)
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
        except (AttributeError, OSError):
            _thread.interrupt_main()

    def __enter__(self) -> _Watchdog:
        if self.seconds:
            self._timer = threading.Timer(self.seconds, self._fire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(terse=True),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg_1m": load,
        "others_busy_cores": others_busy_cores(),
    }


def _version(module: str) -> str | None:
    dist = module.split(".")[0]
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------- runner


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def run_workload(
    wl: Workload, *, quick: bool, repeat: int, timeout: float | None, quiet: bool
) -> dict[str, Any]:
    params = wl.params(quick)
    others_before = others_busy_cores()
    note = None
    if wl.setup is not None:
        note = wl.setup(params)
        if note:
            _log(f"[{wl.id}] {note}", quiet)

    outcomes = [Outcome(c) for c in wl.contenders]
    for o in outcomes:
        for mod in o.contender.requires:
            try:
                importlib.import_module(mod)
            except Exception as exc:
                if o.contender.kind == SUBJECT:
                    o.status, o.error = "error", _describe(exc)
                else:
                    o.status = "not installed"
                    o.error = _describe(exc)
                break

    # Round-robin over contenders so slow drifts of a noisy machine hit all alike.
    for rep in range(repeat):
        for o in outcomes:
            if o.status != "ok":
                continue
            gc.collect()
            dog = _Watchdog(timeout)
            try:
                with dog:
                    res = o.contender.run(params)
                m = res if isinstance(res, Measurement) else Measurement(float(res))
                o.runs.append(m)
                fig = (wl.fmt or (lambda mm: default_fmt(wl.unit, mm)))(m)
                _log(f"[{wl.id}] {rep + 1}/{repeat} {o.contender.name}: {fig}", quiet)
            except KeyboardInterrupt:
                if not dog.fired:
                    raise
                o.status, o.error = "error", f"RunTimeout: no result after {timeout:g} s"
                _log(f"[{wl.id}] {o.contender.name}: {o.error}", quiet)
            except Exception as exc:
                o.status, o.error = "error", _describe(exc)
                _log(f"[{wl.id}] {o.contender.name}: error\n{traceback.format_exc()}", quiet)
    return {
        "workload": wl,
        "params": params,
        "note": note,
        "outcomes": outcomes,
        "others": (others_before, others_busy_cores()),
    }


def others_busy_cores(window: float = 0.5) -> float | None:
    """CPU cores kept busy by *other* processes, sampled while the suite sits idle.

    Busy time from /proc/stat (user, nice, system, irq, softirq, steal) over a short
    idle window, minus this process's own CPU time. None where /proc/stat is missing.
    """

    def busy() -> float:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return (sum(vals[0:3]) + sum(vals[5:8])) / os.sysconf("SC_CLK_TCK")

    def own() -> float:
        t = os.times()
        return t.user + t.system

    try:
        b0, o0, t0 = busy(), own(), time.perf_counter()
        time.sleep(window)
        b1, o1, t1 = busy(), own(), time.perf_counter()
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, ((b1 - b0) - (o1 - o0)) / (t1 - t0))


BUSY_CORES = 0.3  # other processes using more than this: figures are unreliable


def _ratio(wl: Workload, value: float, base: float | None) -> float | None:
    if wl.ratio is None or base is None:
        return None
    try:
        return wl.ratio(value, base)
    except ZeroDivisionError:
        return None


def summarize(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Median, ratio to the limit and verdict for every contender of one workload."""
    wl: Workload = res["workload"]
    outcomes: list[Outcome] = res["outcomes"]
    base = next((o.median.value for o in outcomes if o.contender.kind == LIMIT and o.median), None)
    rows = []
    for o in outcomes:
        med = o.median if o.status == "ok" else None
        r = _ratio(wl, med.value, base) if med else None
        passed = None
        if o.contender.kind == SUBJECT and wl.target:
            passed = bool(med is not None and wl.target.check(med.value, r))
        rows.append({"outcome": o, "median": med, "ratio": r, "passed": passed})
    return rows


def _note(note: str, params: dict[str, Any]) -> str:
    try:
        return note.format(**params)
    except (KeyError, IndexError, ValueError):
        return note


def _fmt_ratio(wl: Workload, r: float | None) -> str:
    if r is None:
        return ""
    if wl.ratio_style == "%":
        return f"{r * 100:.0f}%"
    return f"{r:.2f}x" if abs(r) >= 0.1 else f"{r:.3f}x"


def _spread(o: Outcome, unit: str) -> str:
    """Half the min-max range of the runs, relative to the median (absolute for MB)."""
    if len(o.runs) < 2:
        return ""
    vals = [m.value for m in o.runs]
    if unit == "MB":  # deltas near zero: a relative spread would mean nothing
        return f"±{(max(vals) - min(vals)) / 2:.1f} MB"
    med = statistics.median(vals)
    if med == 0:
        return ""
    return f"±{(max(vals) - min(vals)) / 2 / abs(med) * 100:.0f}%"


def render(
    results: list[dict[str, Any]],
    info: dict[str, Any],
    header_extra: str,
    module_errors: dict[str, str],
) -> str:
    rows: list[list[str]] = []
    for res in results:
        wl: Workload = res["workload"]
        for i, s in enumerate(summarize(res)):
            o: Outcome = s["outcome"]
            c = o.contender
            label = {LIMIT: "limit: ", REFERENCE: "ref: "}.get(c.kind, "") + c.name
            if c.note:
                label += f" [{_note(c.note, res['params'])}]"
            ratio_s = spread = ""
            target = wl.target.text if (c.kind == SUBJECT and wl.target) else ""
            result = {True: "PASS", False: "FAIL", None: ""}[s["passed"]]
            if s["median"] is not None:
                fig = (wl.fmt or (lambda mm: default_fmt(wl.unit, mm)))(s["median"])
                ratio_s = _fmt_ratio(wl, s["ratio"])
                spread = _spread(o, wl.unit)
            elif o.status == "not installed":
                fig = "not installed"
            else:
                err = o.error if len(o.error) <= 100 else o.error[:97] + "..."
                fig = f"error: {err}"
            rows.append(
                [
                    f"{wl.id} {_note(wl.title, res['params'])}" if i == 0 else "",
                    label,
                    fig,
                    spread,
                    ratio_s,
                    target,
                    result,
                ]
            )
        if res.get("note"):
            rows.append([f"({res['note']})"])  # a one-cell row: free text
        others = [x for x in res.get("others", ()) if x is not None]
        if others and max(others) > BUSY_CORES:
            before_after = " / ".join(f"{x:.1f}" for x in others)
            rows.append([f"(busy machine: others used {before_after} cores just before / after)"])
    for wid, err in sorted(module_errors.items(), key=lambda kv: _id_key(kv[0])):
        rows.append([wid, "(module)", f"error: {err}", "", "", "", ""])

    head = ["workload", "contender", "median", "spread", "vs baseline", "target", "result"]
    # error texts are long: let them overflow instead of widening the median column
    widths = [
        max(
            len(r[i])
            for r in [head, *rows]
            if len(r) > 1 and not (i == 2 and r[i].startswith("error: "))
        )
        for i in range(len(head))
    ]

    def fmt_row(r: list[str]) -> str:
        if len(r) == 1:  # free text under the contender column
            return " " * (widths[0] + 2) + r[0]
        if r[2].startswith("error: "):
            # the error text takes the rest of the line
            return (
                "  ".join(r[j].ljust(widths[j]) for j in range(2))
                + "  "
                + "  ".join(x for x in [r[2], r[5], r[6]] if x)
            ).rstrip()
        return "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip()

    lines = [
        f"nanostream benchmarks | {info['cpu']} | {info['cores']} cores "
        f"({info['usable_cores']} usable) | {info['python']} | {info['platform']} | "
        f"{info['date']} | load {info['loadavg_1m']:.2f}"
        + (
            f", others busy {info['others_busy_cores']:.1f} cores: FIGURES UNRELIABLE"
            if (info.get("others_busy_cores") or 0) > BUSY_CORES
            else ""
        )
        + f" | {header_extra}",
        fmt_row(head),
        "  ".join("-" * w for w in widths),
    ]
    for r in rows:
        if len(r) > 1 and r[0] and len(lines) > 3:
            lines.append("")
        lines.append(fmt_row(r))
    return "\n".join(lines)


def to_json(
    results: list[dict[str, Any]],
    info: dict[str, Any],
    options: dict[str, Any],
    module_errors: dict[str, str],
) -> dict[str, Any]:
    out: dict[str, Any] = {"machine": info, "options": options, "workloads": []}
    for res in results:
        wl: Workload = res["workload"]
        entry: dict[str, Any] = {
            "id": wl.id,
            "title": _note(wl.title, res["params"]),
            "unit": wl.unit,
            "target": wl.target.text if wl.target else None,
            "params": {k: v for k, v in res["params"].items() if _jsonable(v)},
            "note": res["note"],
            "others_busy_cores_before_after": res.get("others"),
            "contenders": [],
        }
        for s in summarize(res):
            o: Outcome = s["outcome"]
            med = s["median"]
            entry["contenders"].append(
                {
                    "name": o.contender.name,
                    "kind": o.contender.kind,
                    "note": _note(o.contender.note, res["params"]),
                    "status": o.status,
                    "error": o.error or None,
                    "versions": {m: _version(m) for m in o.contender.requires},
                    "runs": [{"value": m.value, **m.extra} for m in o.runs],
                    "median": ({"value": med.value, **med.extra} if med else None),
                    "ratio": s["ratio"],
                    "passed": s["passed"],
                }
            )
        out["workloads"].append(entry)
    out["module_errors"] = module_errors
    return out


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="nanostream benchmark suite: nanostream vs the hand-written limit "
        "and the installed peers, one table of medians.",
    )
    ap.add_argument("--only", help="comma-separated workload ids, e.g. W1,W3")
    ap.add_argument(
        "--repeat", type=int, default=None, help="runs per contender (default 5; 3 with --quick)"
    )
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run for CI")
    ap.add_argument("--json", metavar="PATH", help="also write raw results to PATH")
    ap.add_argument(
        "--timeout", type=float, default=300.0, help="seconds allowed per run (default 300)"
    )
    ap.add_argument("--list", action="store_true", help="list the workloads and exit")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ap.add_argument(
        "--strict",
        action="store_true",
        help="exit with status 1 if nanostream errors or misses a target",
    )
    args = ap.parse_args(argv)

    registry = discover()
    if args.list:
        for wid, wl in registry.items():
            try:
                full = wl.params(False)
            except Exception:
                full = {}
            names = ", ".join(
                c.name + (f" [{_note(c.note, full)}]" if c.note else "") for c in wl.contenders
            )
            title = _note(wl.title, full)
            print(f"{wid}  {title}  (target: {wl.target.text if wl.target else '-'})")
            print(f"      contenders: {names}")
        for wid, err in _IMPORT_ERRORS.items():
            print(f"{wid}  error: {err}")
        return 0

    repeat = args.repeat if args.repeat is not None else (3 if args.quick else 5)
    if repeat < 1:
        ap.error("--repeat must be >= 1")
    if args.only:
        wanted = [w.strip().upper() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in registry and w not in _IMPORT_ERRORS]
        if unknown:
            ap.error(f"unknown workload(s): {', '.join(unknown)}; known: {', '.join(registry)}")
    else:
        wanted = list(registry) + list(_IMPORT_ERRORS)
    selected = [registry[w] for w in registry if w in wanted]
    module_errors = {w: e for w, e in _IMPORT_ERRORS.items() if w in wanted}

    info = machine_info()
    results = [
        run_workload(wl, quick=args.quick, repeat=repeat, timeout=args.timeout, quiet=args.quiet)
        for wl in selected
    ]
    mode = "quick sizes" if args.quick else "full sizes"
    print(render(results, info, f"median of {repeat} runs, {mode}", module_errors))

    versions = {}
    for wl in selected:
        for c in wl.contenders:
            for mod in c.requires:
                v = _version(mod)
                if v:
                    versions[mod.split(".")[0]] = v
    if versions:
        print("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))

    if args.json:
        path = args.json
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        options = {"quick": args.quick, "repeat": repeat, "only": args.only}
        with open(path, "w") as f:
            json.dump(to_json(results, info, options, module_errors), f, indent=2, default=str)
        print(f"raw results: {path}")

    failed = bool(module_errors) or any(
        s["passed"] is False for res in results for s in summarize(res)
    )
    code = 1 if (args.strict and failed) else 0
    sys.stdout.flush()
    sys.stderr.flush()
    # A pipeline under test that hung or leaked non-daemon threads must not keep the
    # suite (and CI) from exiting.
    leftovers = [
        t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon
    ]
    if leftovers:
        names = ", ".join(t.name for t in leftovers[:10])
        print(
            f"warning: {len(leftovers)} non-daemon thread(s) still alive at exit: {names}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(code)
    return code
