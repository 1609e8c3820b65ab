"""Commands that other installed packages add to ``blockfs``, found through entry points.

``importlib.metadata`` would find them too, but importing it (email, zipfile, csv,
pathlib) and reading every distribution's metadata costs ``blockfs image pull`` about
25 ms of a cold start, a tenth of a pull over a WAN. This reads only what the lookup
needs: the ``entry_points.txt`` of each ``*.dist-info`` and ``*.egg-info`` directory on
``sys.path``, in path order, the first distribution of a name winning, as
``importlib.metadata.entry_points`` does.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Iterable, Iterator
from typing import Any

_METADATA_SUFFIXES = (".dist-info", ".egg-info")


def entry_points(
    group: str, path: Iterable[str] | None = None, *, name: str | None = None
) -> list[tuple[str, str]]:
    """``(name, "module:attr")`` of each entry point in ``group`` of the distributions
    installed on ``path`` (default ``sys.path``). With ``name``, only the entry point of
    that name that comes first, or none: the search stops at the first distribution that
    has it, so that a command line naming one command reads few distributions."""
    found: list[tuple[str, str]] = []
    seen: set[str] = set()
    for directory in sys.path if path is None else path:
        for dist, text in _distributions(directory or "."):
            if dist in seen:
                continue
            seen.add(dist)
            for entry in _parse(text, group):
                if name is None:
                    found.append(entry)
                elif entry[0] == name:
                    return [entry]
    return found


def load(value: str) -> Any:
    """The object an entry point's value (``module:attr.attr [extra]``) names."""
    module, _, attrs = value.partition(":")
    obj = importlib.import_module(module.strip())
    for attr in attrs.split("[", 1)[0].strip().split(".") if attrs.strip() else ():
        obj = getattr(obj, attr)
    return obj


def _distributions(directory: str) -> Iterator[tuple[str, str]]:
    """(normalised name, entry_points.txt text or "") of each distribution in directory."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return  # not a directory (a zip, a finder's hook) or gone
    for name in names:
        if not name.endswith(_METADATA_SUFFIXES):
            continue
        dist = _normalise(name.rsplit(".", 1)[0].split("-", 1)[0])
        try:
            with open(os.path.join(directory, name, "entry_points.txt"), encoding="utf-8") as f:
                text = f.read()
        except OSError:
            text = ""
        yield dist, text


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _parse(text: str, group: str) -> Iterator[tuple[str, str]]:
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif section == group and "=" in line:
            name, _, value = line.partition("=")
            yield name.strip(), value.strip()
