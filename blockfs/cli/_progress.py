"""Progress on stderr: a bar redrawn in place on a terminal, one line per step otherwise."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from blockfs.convert import ProgressTask

_BAR_WIDTH = 24
_REDRAW_SECONDS = 0.1


def _size(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.1f} KiB"


class _Task:
    def __init__(self, out: TextIO, label: str, total: int | None, tty: bool) -> None:
        self._out = out
        self._label = label
        self._total = total
        self._tty = tty
        self._done = 0
        self._started = time.monotonic()
        self._drawn = 0.0
        if tty:
            self._draw()

    def update(self, done: int) -> None:
        self._done = done
        now = time.monotonic()
        if self._tty and now - self._drawn >= _REDRAW_SECONDS:
            self._drawn = now
            self._draw()

    def finish(self, summary: str = "") -> None:
        seconds = time.monotonic() - self._started
        amount = _size(self._total if self._total is not None else self._done)
        tail = f" {summary}" if summary else ""
        line = f"{self._label}: {amount} in {seconds:.1f} s{tail}"
        if self._tty:
            self._out.write("\r\x1b[K" + line + "\n")
        else:
            self._out.write(line + "\n")
        self._out.flush()

    def _draw(self) -> None:
        if self._total:
            filled = min(_BAR_WIDTH, _BAR_WIDTH * self._done // self._total)
            bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
            percent = min(100, 100 * self._done // self._total)
            text = f"{self._label} [{bar}] {percent:3d}% {_size(self._done)}/{_size(self._total)}"
        else:
            text = f"{self._label} {_size(self._done)}"
        self._out.write("\r\x1b[K" + text)
        self._out.flush()


class TextProgress:
    """Implements ``blockfs.convert.Progress`` on a text stream (stderr by default)."""

    def __init__(self, out: TextIO | None = None) -> None:
        self._out = out if out is not None else sys.stderr
        self._tty = self._out.isatty()

    def note(self, message: str) -> None:
        self._out.write(message + "\n")
        self._out.flush()

    def task(self, label: str, total: int | None) -> ProgressTask:
        return _Task(self._out, label, total, self._tty)
