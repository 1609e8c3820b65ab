"""``blockfs image pull``: pull an image through containerd for lazy use by blockfs-snapshotter.

The ``blockfs`` command finds this through the ``blockfs.image_commands`` entry point.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import socket
from typing import TYPE_CHECKING, Any

from blockfs.cli import log_to_stderr, platform_arg, registry_args, registry_client
from blockfs.errors import BlockfsError
from snapshotter.defaults import CONTAINERD_ADDRESS as DEFAULT_ADDRESS
from snapshotter.defaults import PULL_SOCKET
from snapshotter.defaults import SNAPSHOTTER_NAME as DEFAULT_SNAPSHOTTER

if TYPE_CHECKING:
    import threading

    from snapshotter.pull import PulledLayer


def add_pull_command(cmds: Any) -> None:
    """Add ``pull`` to the ``image`` group's subcommands ``cmds``."""
    p = cmds.add_parser(
        "pull",
        help="pull an image into containerd, its eStargz layers lazily (like ctr-remote rpull)",
        description="Stores the manifest and config in containerd's content store and "
        "prepares each layer's snapshot through containerd with the labels that let "
        "blockfs-snapshotter mount it lazily; layers that are not eStargz are downloaded "
        "and unpacked as by a normal pull. Then `ctr run --snapshotter blockfs REF` starts it. "
        "When blockfs-snapshotter listens on its pull socket, it does the pull (it has the "
        "code loaded and its registry connections open), with its own registry credentials.",
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
    p.add_argument(
        "--pull-socket", metavar="SOCKET", default=None,
        help=f"blockfs-snapshotter's pull socket (default {PULL_SOCKET}; when no daemon "
        "listens there, this command pulls by itself)",
    )  # fmt: skip
    p.add_argument(
        "--local", action="store_true",
        help="pull in this process, with this user's registry credentials, even when the "
        "daemon listens",
    )  # fmt: skip
    # Its clients are closed when it returns; the process may end without a teardown. A
    # pull through the daemon logs nothing here: logging is set up only to pull here.
    p.set_defaults(func=cmd_pull, skip_teardown=True, own_logging=True)


def cmd_pull(args: argparse.Namespace) -> int:
    if not args.local:
        status = _pull_through_daemon(args)
        if status is not None:
            return status
    return _pull_here(args)


def _pull_through_daemon(args: argparse.Namespace) -> int | None:
    """Have the daemon pull (snapshotter.pullserver); None when no daemon listens at the
    default socket, so that the command pulls by itself."""
    path = args.pull_socket or PULL_SOCKET
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with conn:
        try:
            conn.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            if args.pull_socket is None:
                return None
            raise BlockfsError(
                f"no blockfs-snapshotter takes pulls at {path} ({e.strerror}): start it, "
                "or give --local to pull in this process"
            ) from None
        request = {
            "ref": args.ref,
            "containerd": args.address,
            "namespace": args.namespace,
            "snapshotter": args.snapshotter,
            "platform": None if args.platform is None else str(args.platform),
            "plain_http": args.plain_http,
            "hosts_dir": None if args.hosts_dir is None else os.path.abspath(args.hosts_dir),
        }
        conn.sendall(json.dumps(request).encode() + b"\n")
        with conn.makefile("rb") as answers:
            for line in answers:
                answer = json.loads(line)
                if "layer" in answer:
                    layer = answer["layer"]
                    _print_layer(layer["digest"], layer["lazy"], layer["size"])
                elif "pulled" in answer:
                    done = answer["pulled"]
                    _print_pulled(done["name"], done["manifest"], done["lazy"], done["layers"])
                    return 0
                elif "error" in answer:
                    raise BlockfsError(answer["error"])
    raise BlockfsError(
        f"blockfs-snapshotter closed its pull socket {path} before the pull ended; its log says why"
    )


def _print_layer(digest: str, lazy: bool, size: int) -> None:
    print(f"{digest}: {'lazy' if lazy else 'unpacked'} ({size} bytes)", flush=True)


def _print_pulled(name: str, manifest: str, lazy: int, layers: int) -> None:
    print(f"pulled {name} ({manifest}): {lazy} of {layers} layers lazy")


def _pull_here(args: argparse.Namespace) -> int:
    log_to_stderr()
    # gRPC and the registry client load only when the command runs, and gRPC (about a
    # quarter of a second from a cold page cache) loads while the registry answers.
    grpc_loaded = _import_in_background("snapshotter.ctrclient")
    from blockfs.image import BlobSources
    from blockfs.oci import Reference
    from snapshotter.pull import pull_image, resolve_image

    ref = Reference.parse(args.ref)

    def report(layer: PulledLayer) -> None:
        _print_layer(layer.digest, layer.lazy, layer.size)

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
    _print_pulled(result.name, result.manifest.digest, lazy, len(result.layers))
    return 0


def _import_in_background(module: str) -> threading.Thread:
    """Start importing ``module`` in a thread; join it before using the module. A failure
    shows again, where it can be reported, when the module is imported for use."""
    import threading

    def load() -> None:
        with contextlib.suppress(Exception):
            importlib.import_module(module)

    thread = threading.Thread(target=load, name=f"import {module}", daemon=True)
    thread.start()
    return thread
