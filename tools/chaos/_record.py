"""Writing a run's figures into ``docs/reliability.md``, one section per part.

Each part of ``tools.chaos`` owns a section of the file, between ``<!-- chaos:KEY -->``
and ``<!-- /chaos:KEY -->``: recording a part replaces its own section and leaves the
others as they are (a section not there yet is added at the end).
"""

from __future__ import annotations

import datetime
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from tools.bench._report import Machine

TOOLS = (("nbdkit", ["nbdkit", "--version"]),)


def machine() -> str:
    """The machine's lines of a run's header."""
    return Machine.describe(TOOLS).markdown()


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def command_line(argv: Sequence[str] | None) -> str:
    """The command as a reader would type it."""
    return shlex.join(["python", "-m", "tools.chaos", *(sys.argv[1:] if argv is None else argv)])


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- chaos:{key} -->", f"<!-- /chaos:{key} -->"


def replace_section(document: str, key: str, text: str) -> str:
    """``document`` with section ``key`` replaced by ``text`` (or ``text`` appended)."""
    start, end = _markers(key)
    block = f"{start}\n{text.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(document):
        return pattern.sub(lambda _: block, document, count=1)
    return document.rstrip("\n") + ("\n\n" if document.strip() else "") + block + "\n"


def record(path: Path, key: str, text: str) -> None:
    """Write ``text`` as section ``key`` of the Markdown file ``path``."""
    old = path.read_text() if path.exists() else ""
    path.write_text(replace_section(old, key, text))
