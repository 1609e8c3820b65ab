"""What a benchmark run reports: the machine, the date, the command, and tables of figures.

A run prints Markdown ready to paste into ``docs/benchmarks.md``; the raw figures can also
be written as JSON, which is what the smoke test reads.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import attrs

T = TypeVar("T")
P = ParamSpec("P")
Figure = int | float | str | bool

MB = 1_000_000
MiB = 1 << 20


def _first_line(command: Sequence[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=False, timeout=10)
    except OSError:
        return "not installed"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0].strip("* ") if text else "unknown"


@attrs.frozen
class Machine:
    """The machine a run was made on, as the tables need to state it."""

    cpu: str
    cores: int
    memory_gib: float
    kernel: str
    python: str
    tools: tuple[tuple[str, str], ...]

    @classmethod
    def describe(cls, tools: Sequence[tuple[str, Sequence[str]]] = ()) -> Machine:
        """This machine; ``tools`` are (name, version command) pairs to report."""
        cpu = "unknown"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kib = 0
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
        return cls(
            cpu=cpu,
            cores=len(os.sched_getaffinity(0)),
            memory_gib=round(mem_kib / (1 << 20), 1),
            kernel=platform.release(),
            python=platform.python_version(),
            tools=tuple((name, _first_line(cmd)) for name, cmd in tools),
        )

    def markdown(self) -> str:
        tools = "; ".join(f"{name}: {version}" for name, version in self.tools)
        lines = [
            f"- Machine: {self.cores} cores ({self.cpu}), {self.memory_gib} GiB RAM, "
            f"Linux {self.kernel}, Python {self.python}",
        ]
        if tools:
            lines.append(f"- Tools: {tools}")
        return "\n".join(lines)


@attrs.define
class Table:
    """One table of a report: a title, column names, rows of formatted cells, notes."""

    title: str
    columns: tuple[str, ...]
    rows: list[tuple[str, ...]] = attrs.Factory(list)
    notes: list[str] = attrs.Factory(list)

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{self.title}: {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(tuple(_cell(c) for c in cells))

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join(" --- " for _ in self.columns) + "|")
        lines.extend("| " + " | ".join(row) + " |" for row in self.rows)
        if self.notes:
            lines.append("")
            lines.extend(self.notes)
        return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


@attrs.define
class Report:
    """Everything one benchmark command measured, in the order it measured it."""

    title: str
    command: str
    machine: Machine
    date: str = attrs.Factory(
        lambda: datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    )
    tables: list[Table] = attrs.Factory(list)
    figures: dict[str, Figure] = attrs.Factory(dict)
    # More lines of the list under the title (what was measured on what), and raw data
    # for the JSON file only (logs of requests, say).
    facts: list[str] = attrs.Factory(list)
    details: dict[str, Any] = attrs.Factory(dict)
    # Other work on the machine skews every figure; the report says how busy it was.
    load_at_start: tuple[float, float, float] = attrs.Factory(os.getloadavg)

    def table(self, title: str, *columns: str) -> Table:
        table = Table(title, columns)
        self.tables.append(table)
        return table

    def markdown(self) -> str:
        head = [
            f"## {self.title}",
            "",
            self.machine.markdown(),
            f"- Date: {self.date}",
            f"- Command: `{self.command}`",
            f"- Load average (1, 5, 15 min) at start: {_loads(self.load_at_start)}; "
            f"at end: {_loads(os.getloadavg())}",
            *(f"- {fact}" for fact in self.facts),
        ]
        return "\n\n".join(["\n".join(head), *(t.markdown() for t in self.tables)]) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "command": self.command,
            "date": self.date,
            "machine": attrs.asdict(self.machine),
            "figures": self.figures,
            **({"details": self.details} if self.details else {}),
        }

    def write_json(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def _loads(loads: tuple[float, float, float]) -> str:
    return ", ".join(f"{x:.2f}" for x in loads)


def command_line(argv: Sequence[str]) -> str:
    """How to run the benchmark again, as a user types it."""
    return shlex.join([".venv/bin/python", "-m", "tools.bench", *argv])


def progress(message: str) -> None:
    """A line on stderr so that a long run shows where it is (stdout is the report)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def timed(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> tuple[float, T]:
    """Wall-clock seconds that ``fn(*args, **kwargs)`` took, and its result."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def best_time(repeat: int, fn: Callable[P, object], /, *args: P.args, **kwargs: P.kwargs) -> float:
    """Fewest wall-clock seconds of ``repeat`` calls of ``fn(*args, **kwargs)``.

    The best run, not the median: on a shared machine the slower runs measure the
    neighbours' work as much as ours.
    """
    return min(timed(fn, *args, **kwargs)[0] for _ in range(max(repeat, 1)))


def rate(nbytes: int, seconds: float) -> float:
    """Throughput in MB/s (10**6 bytes per second)."""
    return nbytes / MB / seconds if seconds > 0 else float("inf")


def verdict(value: float, limit: float, *, at_least: bool = False) -> str:
    """``met`` or ``MISSED``: is ``value`` under ``limit`` (or at least it, with ``at_least``)?"""
    ok = value >= limit if at_least else value < limit
    return "met" if ok else "MISSED"


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB (``VmRSS`` of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS for process {pid}")
