"""The command line's progress output: a bar redrawn in place on a terminal, lines elsewhere."""

from __future__ import annotations

import io
import re

from blockfs.cli._progress import TextProgress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_a_bar_redrawn_in_place_then_one_final_line():
    out = Terminal()
    task = TextProgress(out).task("layer 1/1 store", 4 << 20)
    task.update(1 << 20)
    task.finish("uploaded")
    text = out.getvalue()
    assert text.startswith("\r\x1b[Klayer 1/1 store [")
    assert "  0%" in text
    assert re.search(r"\r\x1b\[Klayer 1/1 store: 4\.0 MiB in [0-9.]+ s uploaded\n$", text)
    assert text.count("\n") == 1


def test_pipe_gets_plain_lines_without_control_characters():
    out = io.StringIO()
    progress = TextProgress(out)
    progress.note("an index; converting linux/amd64 only")
    task = progress.task("layer 1/2 convert", 2048)
    task.update(1024)
    task.update(2048)
    task.finish()
    first, second, end = out.getvalue().split("\n")
    assert first == "an index; converting linux/amd64 only"
    assert re.fullmatch(r"layer 1/2 convert: 2\.0 KiB in [0-9.]+ s", second)
    assert end == ""
