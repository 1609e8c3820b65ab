"""The ``blockfs`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from blockfs.cli import _image, _layer
from blockfs.cli._common import (
    check_shared_options,
    describe_os_error,
    log_to_stderr,
    platform_arg,
    registry_args,
    registry_client,
)
from blockfs.errors import BlockfsError

__all__ = [
    "build_parser",
    "log_to_stderr",
    "main",
    "platform_arg",
    "registry_args",
    "registry_client",
]


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with ``argv`` (the command line to parse) what it
    needs: commands that other packages add are looked up only if it may name one."""
    parser = argparse.ArgumentParser(
        prog="blockfs",
        description="Lazy-pulling eStargz container image layers served as EROFS block devices.",
    )
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
    _layer.register(groups)
    _image.register(groups, plugins=True if argv is None else _plugins_named(argv))
    check_shared_options(parser)
    return parser


def _plugins_named(argv: Sequence[str]) -> bool | str:
    """The commands of other packages that the parser of ``argv`` needs: none (False)
    when it names a built-in command or another group, the one it names, or all (True)
    when it names none (``image --help``)."""
    words = [a for a in argv if not a.startswith("-")]
    if words[:1] != ["image"]:
        return False
    if len(words) < 2:
        return True
    return False if words[1] in _image.BUILT_IN else words[1]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``blockfs``; returns the exit status.

    Whatever the input, a failure is one ``blockfs: error: …`` line saying what to do (or
    argparse's usage error), never a traceback: blockfs's own errors carry their message,
    and an OSError (a path missing, a directory, existing, not permitted) is described by
    the path it names. Anything else is a bug and keeps its traceback.

    Run as the program (no ``argv``), a command that asks for it (``skip_teardown`` in
    its defaults) ends the process as soon as it is done: what it opened is closed, and
    the interpreter's teardown of gRPC's and protobuf's modules would add about 0.2 s.

    Library warnings go to stderr (:func:`log_to_stderr`), set up here unless the command
    does it itself when it needs to (``own_logging`` in its defaults).
    """
    as_program = argv is None
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "own_logging", False):
        log_to_stderr()
    status = _run(args)
    if as_program and getattr(args, "skip_teardown", False):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _run(args: argparse.Namespace) -> int:
    try:
        status: int = args.func(args)
    except BlockfsError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:
        return _fail(describe_os_error(exc, root=getattr(args, "root", None)))
    return status


def _fail(message: str) -> int:
    print(f"blockfs: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
