"""Options and helpers that several ``blockfs`` command groups share."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

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
