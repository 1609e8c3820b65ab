"""The ``blockfs`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from blockfs.cli import _image, _layer
from blockfs.cli._common import registry_args
from blockfs.errors import BlockfsError

__all__ = ["build_parser", "main", "registry_args"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockfs",
        description="Lazy-pulling eStargz container image layers served as EROFS block devices.",
    )
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
    _layer.register(groups)
    _image.register(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``blockfs``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except BlockfsError as exc:
        print(f"blockfs: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return status


if __name__ == "__main__":
    sys.exit(main())
