"""Where a path of an image lies, found in its layers' TOCs as overlayfs would find it in
the mounted layers: the files a container will read can be named before any layer is
mounted.

The layers are given top first. A name is taken from the highest layer that has it,
unless a layer above hides it: a whiteout (``.wh.NAME``) of it or of a directory above
it, an opaque marker (``.wh..wh..opq``) in a directory above it, or something other than
a directory where one of its parent directories should be. Symbolic links are followed
in every component, as path resolution does (relative to the directory holding them,
or from the root), up to :data:`MAX_SYMLINKS`.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence

import attrs

from blockfs.estargz import TOC, Entry
from blockfs.image._elf import LoaderNeeds
from blockfs.oci import ProcessConfig

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
# As Linux's path resolution (MAXSYMLINKS).
MAX_SYMLINKS = 40
# runc's PATH when the image sets none.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Shells whose ``-c SCRIPT`` runs a command line: Docker's shell form of CMD and
# ENTRYPOINT (``CMD app --flag``) is ``["/bin/sh", "-c", "app --flag"]``.
SHELLS = frozenset({"sh", "ash", "bash", "dash", "ksh", "mksh", "zsh"})
# An option word that asks a shell to run its next argument (``-c``, ``-ec``, ``-xc``).
_RUN_SCRIPT = re.compile(r"-[a-z]*c[a-z]*")
# A word of a script that names a command as it is, with nothing for the shell to expand.
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_./+@%=:,-]+")
# A variable assignment before a command.
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=\S*")
# The most files a command line's arguments name that are fetched ahead.
MAX_ARGUMENT_FILES = 16
# Words a shell does not look up in PATH: its keywords and common builtins.
_SHELL_WORDS = frozenset(
    {
        *("if", "then", "else", "elif", "fi", "case", "esac", "for", "while", "until"),
        *("do", "done", "in", "function", "select", "time", "!", "{", "}", "[["),
        *("cd", "echo", "printf", "set", "export", "unset", "shift", "trap", "exit"),
        *("return", "eval", ".", ":", "test", "[", "true", "false", "read", "wait"),
        *("umask", "ulimit"),
    }
)


@attrs.frozen
class FoundFile:
    """A regular file of a stacked image: the index of its layer (0 is the top) and its
    TOC entry (for a hard link, the entry that holds the data)."""

    layer: int
    entry: Entry

    @property
    def span(self) -> tuple[int, int] | None:
        """The compressed range ``[start, end)`` of its data in the layer's blob; None for
        an empty file."""
        chunks = self.entry.chunks
        if not chunks:
            return None
        return chunks[0].offset, max(c.end for c in chunks)


def find_file(tocs: Sequence[TOC], path: str) -> FoundFile | None:
    """The regular file that absolute ``path`` names in the image of ``tocs`` (top layer
    first); None when it names nothing, or something other than a regular file."""
    pending = _parts(path)
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        found = _lookup(tocs, "/".join([*resolved, part]))
        if found is None:
            return None
        if found.entry.type == "symlink":
            links += 1
            if links > MAX_SYMLINKS:
                return None
            target = found.entry.link_name
            if target.startswith("/"):
                resolved = []
            pending = _parts(target) + pending
        elif pending:
            if found.entry.type != "dir":
                return None
            resolved.append(part)
        else:
            return found if found.entry.type == "reg" else None
    return None


def find_commands(tocs: Sequence[TOC], process: ProcessConfig) -> list[FoundFile]:
    """The executables a container of the image starts with, unless told otherwise: the
    first word of Entrypoint and Cmd, looked up as ``execvp`` does (a name without a
    slash in each directory of the image's PATH; a relative path from WorkingDir); and
    when that is a shell told to run a script (``sh -c SCRIPT``), the command the script
    starts with, if it is a plain word (past variable assignments and ``exec``)."""
    if not process.argv or not process.argv[0]:
        return []
    found = _find_executable(tocs, process.argv[0], process)
    if found is None:
        return []
    commands = [found]
    script = _script_words(process.argv)
    started = _find_executable(tocs, script[0], process) if script else None
    if started is not None and started != found:
        commands.append(started)
    return commands


def find_arguments(tocs: Sequence[TOC], process: ProcessConfig) -> list[FoundFile]:
    """The regular files of the image that a container's command line names, in order,
    at most :data:`MAX_ARGUMENT_FILES`: the words after the command (for ``sh -c
    SCRIPT``, after the script's command, up to its first word that is not plain) and
    the values of ``--option=VALUE`` words that are paths of files, absolute or from
    WorkingDir (``python /app/main.py``, ``java -jar app.jar``, ``gcc /hello.c``)."""
    argv = process.argv
    script = _script_words(argv)
    words = script[1:] if script else argv[1:]
    files: list[FoundFile] = []
    for word in words:
        value = word.partition("=")[2] if word.startswith("-") else word
        if not value or value.startswith("-") or not _PLAIN_WORD.fullmatch(value):
            continue
        found = find_file(tocs, posixpath.join("/", process.working_dir or "/", value))
        if found is not None and found not in files:
            files.append(found)
            if len(files) == MAX_ARGUMENT_FILES:
                break
    return files


def find_loaded(tocs: Sequence[TOC], needs: LoaderNeeds) -> list[FoundFile]:
    """The files the dynamic loader opens to run a program that ``needs`` says it needs:
    its interpreter, and each library in the first of the directories where the loader
    looks that has it (symbolic links followed, as the loader's ``open`` does)."""
    found = []
    if needs.interpreter is not None:
        interpreter = find_file(tocs, needs.interpreter)
        if interpreter is not None:
            found.append(interpreter)
    for name in needs.needed:
        for directory in needs.dirs:
            library = find_file(tocs, f"/{directory}/{name}")
            if library is not None:
                found.append(library)
                break
    return found


def _find_executable(tocs: Sequence[TOC], command: str, process: ProcessConfig) -> FoundFile | None:
    """``command`` looked up as ``execvp`` does in the image of ``tocs``."""
    if "/" in command:
        return find_file(tocs, posixpath.join("/", process.working_dir or "/", command))
    search = process.env_value("PATH")
    for directory in (DEFAULT_PATH if search is None else search).split(":"):
        found = find_file(tocs, posixpath.join("/", directory or ".", command))
        if found is not None and found.entry.mode & 0o111:
            return found
    return None


def _script_words(argv: Sequence[str]) -> list[str]:
    """For a shell told to run a script (``sh -c SCRIPT``), the words of the script's
    first command (past variable assignments and ``exec``) up to the first word that is
    not plain: operators, quotes and expansions end it. Empty for any other command
    line, and when the command is a shell keyword or builtin."""
    if not (
        len(argv) > 2 and posixpath.basename(argv[0]) in SHELLS and _RUN_SCRIPT.fullmatch(argv[1])
    ):
        return []
    words: list[str] = []
    for word in argv[2].split():
        if not words and (_ASSIGNMENT.fullmatch(word) or word == "exec"):
            continue
        if not _PLAIN_WORD.fullmatch(word) or (not words and word in _SHELL_WORDS):
            break
        words.append(word)
    return words


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def _lookup(tocs: Sequence[TOC], name: str) -> FoundFile | None:
    """The entry at ``name`` (a path whose directories are resolved) in the highest layer
    that has it and that nothing above hides."""
    parts = name.split("/")
    for layer, toc in enumerate(tocs):
        nodes = toc.nodes
        entry = nodes.get(name)
        if entry is not None:
            return FoundFile(layer, entry)
        # Does this layer hide the name in the layers below?
        for depth in range(len(parts)):
            above = "/".join(parts[:depth])
            if posixpath.join(above, WHITEOUT_PREFIX + parts[depth]) in nodes:
                return None
            if depth < len(parts) - 1:
                directory = posixpath.join(above, parts[depth])
                if posixpath.join(directory, OPAQUE_MARKER) in nodes:
                    return None
                holder = nodes.get(directory)
                if holder is not None and holder.type != "dir":
                    return None
    return None
