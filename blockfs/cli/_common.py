"""Options and helpers that several ``blockfs`` command groups share."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from blockfs.defaults import CHUNK_SIZE

if TYPE_CHECKING:
    from blockfs.image import BlobSources
    from blockfs.oci import Platform
    from blockfs.registry import RegistryClient

DEFAULT_ROOT = "/var/lib/blockfs"


def registry_args(p: argparse.ArgumentParser) -> None:
    """``--plain-http`` and ``--hosts-dir``: how to reach registries."""
    p.add_argument(
        "--plain-http", action="store_true",
        help="speak HTTP, not HTTPS, to registries that have no hosts.toml",
    )  # fmt: skip
    p.add_argument(
        "--hosts-dir", metavar="DIR", default=None,
        help="containerd-style registry host configuration (DIR/HOST/hosts.toml): "
        "mirrors, TLS, headers",
    )  # fmt: skip


def registry_client(sources: BlobSources, args: argparse.Namespace) -> RegistryClient:
    """The registry client for the registry options of ``args`` (:func:`registry_args`)
    and the docker config, shared through ``sources``."""
    from blockfs.image import docker_config_path

    return sources.client(
        plain_http=args.plain_http, hosts_dir=args.hosts_dir, docker_config=docker_config_path()
    )


def state_args(p: argparse.ArgumentParser) -> None:
    """``--root``: where mounts keep their state."""
    p.add_argument(
        "--root", default=DEFAULT_ROOT, metavar="DIR",
        help=f"state directory: layer indexes, chunk cache, run files (default {DEFAULT_ROOT})",
    )  # fmt: skip


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout."""
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


# ---------------------------------------------------------------------------------------
# Values several commands take, checked when the command line is parsed.


def digest_arg(text: str) -> str:
    """argparse type of ``--toc-digest``: a digest such as ``sha256:<64 hex digits>``."""
    from blockfs.oci import InvalidDigest, validate_digest

    try:
        return validate_digest(text)
    except InvalidDigest:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a digest: give the layer's containerd.io/snapshot/stargz/"
            "toc.digest annotation, sha256:<64 lowercase hex digits>"
        ) from None


def platform_arg(text: str) -> Platform:
    """argparse type of ``--platform``: ``os/arch[/variant]``."""
    from blockfs.oci import Platform

    try:
        return Platform.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _count(text: str, *, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        kind = "a positive" if least > 0 else "a non-negative"
        raise argparse.ArgumentTypeError(f"{text!r}: give {kind} number of bytes, e.g. 4194304")
    return value


def positive_size_arg(text: str) -> int:
    """argparse type of ``--chunk-size``: a number of bytes > 0."""
    return _count(text, least=1)


def size_arg(text: str) -> int:
    """argparse type of ``--min-chunk-size``: a number of bytes >= 0."""
    return _count(text, least=0)


def build_args(p: argparse.ArgumentParser) -> None:
    """The options of the commands that write eStargz blobs: compression and chunking."""
    p.add_argument("--zstd", action="store_true", help="compress with zstd instead of gzip")
    p.add_argument(
        "--chunk-size", type=positive_size_arg, default=CHUNK_SIZE, metavar="N",
        help=f"bytes of a file per chunk, the least a lazy read fetches (default {CHUNK_SIZE})",
    )  # fmt: skip
    p.add_argument(
        "--min-chunk-size", type=size_arg, default=0, metavar="N",
        help="put small files together in one compressed member up to N bytes (default 0)",
    )  # fmt: skip


# The argparse type of options that several commands declare, by destination: every
# command refuses a bad value the same way, when the command line is parsed.
SHARED_TYPES = {"toc_digest": digest_arg}


def check_shared_options(parser: argparse.ArgumentParser) -> None:
    """Check option values alike in ``parser`` and every subcommand's parser.

    The options of :data:`SHARED_TYPES` get their type where they were declared without
    one (or as plain ``int``). Any other type that raises ValueError keeps its message:
    argparse would print only ``invalid parse value``.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                check_shared_options(sub)
        elif action.dest in SHARED_TYPES and action.type in (None, int):
            action.type = SHARED_TYPES[action.dest]
        elif callable(action.type) and action.type not in (int, float, str):
            action.type = _keeping_message(action.type)


def _keeping_message(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def checked(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return checked


# ---------------------------------------------------------------------------------------
# Errors and warnings on stderr.


def log_to_stderr() -> None:
    """Warnings of the library on stderr as ``blockfs: warning: …`` lines (unless
    something has configured logging already). Called by the command that needs it:
    logging's modules are a tenth of a command's cold start, and a command that only
    talks to a daemon logs nothing."""
    import logging

    class Formatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return f"blockfs: {record.levelname.lower()}: {record.getMessage()}"

    top = logging.getLogger()
    if top.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Formatter())
    top.addHandler(handler)
    top.setLevel(logging.WARNING)


def describe_os_error(exc: OSError, *, root: str | None = None) -> str:
    """One line saying which path an OSError is about, what is wrong and what to do.

    ``root`` is the command's state directory, if it has one: a permission error there
    means blockfs was run without root's rights.
    """
    if exc.filename is None:
        return str(exc)  # raised on purpose, with its own message
    # A rename's destination is the path the user named; its source is a temporary file.
    raw = exc.filename2 if exc.filename2 is not None else exc.filename
    path = os.fsdecode(raw) if isinstance(raw, str | bytes) else str(raw)
    if isinstance(exc, FileNotFoundError):
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            # Writing into a directory that is not there (maybe through a temporary file).
            return f"{parent}: no such directory; create it first or check the path"
        return f"{path}: no such file or directory; check the path"
    if isinstance(exc, IsADirectoryError):
        return f"{path} is a directory; give the path of a file"
    if isinstance(exc, NotADirectoryError):
        return f"{path}: a part of the path is not a directory; check the path"
    if isinstance(exc, FileExistsError):
        return f"{path} already exists; remove it or choose another path"
    if isinstance(exc, PermissionError):
        if root is not None and _within(path, root):
            return (
                f"{path}: permission denied; the state directory {root} needs root: run "
                "blockfs as root, or give --root a directory of your own"
            )
        if not os.path.lexists(path):
            # Creating a file (maybe a temporary one) in a directory we may not write.
            parent = os.path.dirname(os.path.abspath(path))
            return (
                f"{parent}: permission denied, no file can be made there; choose another "
                "directory, or run blockfs as a user who may write there"
            )
        return f"{path}: permission denied; run blockfs as a user who may access it"
    reason = exc.strerror or str(exc)
    return f"{path}: {reason}"


def _within(path: str, directory: str) -> bool:
    path, directory = os.path.abspath(path), os.path.abspath(directory)
    return path == directory or path.startswith(directory.rstrip("/") + "/")
