"""How long work reports its progress: a protocol the command line implements.

The library only says what it is doing and how far it got; drawing bars (or writing log
lines) is up to the caller.
"""

from __future__ import annotations

from typing import Protocol


class ProgressTask(Protocol):
    """One piece of work of a known (or unknown) size in bytes."""

    def update(self, done: int) -> None:
        """``done`` bytes of the task are done (absolute, may go down if work restarts)."""
        ...

    def finish(self, summary: str = "") -> None:
        """The task is over; ``summary`` says how it ended."""
        ...


class Progress(Protocol):
    """Where conversion reports what it does."""

    def note(self, message: str) -> None:
        """Something worth telling the user (a decision, a fallback)."""
        ...

    def task(self, label: str, total: int | None) -> ProgressTask:
        """Start a task of ``total`` bytes (None if unknown)."""
        ...


class _SilentTask:
    def update(self, done: int) -> None:
        pass

    def finish(self, summary: str = "") -> None:
        pass


class SilentProgress:
    """Reports nothing."""

    def note(self, message: str) -> None:
        pass

    def task(self, label: str, total: int | None) -> ProgressTask:
        return _SilentTask()
