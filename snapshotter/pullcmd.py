"""``blockfs image pull``: pull an image through containerd for lazy use by blockfs-snapshotter.

The ``blockfs`` command finds this through the ``blockfs.image_commands`` entry point.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import threading
from typing import TYPE_CHECKING, Any

from blockfs.cli import platform_arg, registry_args, registry_client
from snapshotter.defaults import CONTAINERD_ADDRESS as DEFAULT_ADDRESS
from snapshotter.defaults import SNAPSHOTTER_NAME as DEFAULT_SNAPSHOTTER

if TYPE_CHECKING:
    from snapshotter.pull import PulledLayer


def add_pull_command(cmds: Any) -> None:
    """Add ``pull`` to the ``image`` group's subcommands ``cmds``."""
    p = cmds.add_parser(
        "pull",
        help="pull an image into containerd, its eStargz layers lazily (like ctr-remote rpull)",
        description="Stores the manifest and config in containerd's content store and "
        "prepares each layer's snapshot through containerd with the labels that let "
        "blockfs-snapshotter mount it lazily; layers that are not eStargz are downloaded "
        "and unpacked as by a normal pull. Then `ctr run --snapshotter blockfs REF` starts it.",
    )
    p.add_argument("ref", metavar="REF", help="image reference, e.g. registry:5000/app:1")
    p.add_argument(
        "--address", default=os.environ.get("CONTAINERD_ADDRESS", DEFAULT_ADDRESS),
        metavar="SOCKET", help=f"containerd's socket (default {DEFAULT_ADDRESS})",
    )  # fmt: skip
    p.add_argument(
        "--namespace", "-n", default=os.environ.get("CONTAINERD_NAMESPACE", "default"),
        metavar="NS", help="containerd namespace (default: default)",
    )  # fmt: skip
    p.add_argument(
        "--snapshotter", default=DEFAULT_SNAPSHOTTER, metavar="NAME",
        help="the proxy snapshotter's name in containerd's config (default: blockfs)",
    )  # fmt: skip
    p.add_argument(
        "--platform", metavar="OS/ARCH[/VARIANT]", default=None, type=platform_arg,
        help="the platform to take from a multi-platform index (default: this host's)",
    )  # fmt: skip
    registry_args(p)
    # Its clients are closed when it returns; the process may end without a teardown.
    p.set_defaults(func=cmd_pull, skip_teardown=True)


def cmd_pull(args: argparse.Namespace) -> int:
    # gRPC and the registry client load only when the command runs, and gRPC (about a
    # quarter of a second from a cold page cache) loads while the registry answers.
    grpc_loaded = _import_in_background("snapshotter.ctrclient")
    from blockfs.image import BlobSources
    from blockfs.oci import Reference
    from snapshotter.pull import pull_image, resolve_image

    ref = Reference.parse(args.ref)

    def report(layer: PulledLayer) -> None:
        how = "lazy" if layer.lazy else "unpacked"
        print(f"{layer.digest}: {how} ({layer.size} bytes)", flush=True)

    with BlobSources() as sources:
        registry = registry_client(sources, args)
        image = resolve_image(registry, ref, args.platform)
        grpc_loaded.join()
        from snapshotter.ctrclient import ContainerdClient

        with ContainerdClient(args.address, args.namespace) as ctr:
            result = pull_image(
                ctr,
                registry,
                image,
                snapshotter=args.snapshotter,
                plain_http=args.plain_http,
                report=report,
            )
    lazy = sum(1 for layer in result.layers if layer.lazy)
    print(
        f"pulled {result.name} ({result.manifest.digest}): {lazy} of {len(result.layers)} "
        "layers lazy"
    )
    return 0


def _import_in_background(module: str) -> threading.Thread:
    """Start importing ``module`` in a thread; join it before using the module. A failure
    shows again, where it can be reported, when the module is imported for use."""

    def load() -> None:
        with contextlib.suppress(Exception):
            importlib.import_module(module)

    thread = threading.Thread(target=load, name=f"import {module}", daemon=True)
    thread.start()
    return thread
