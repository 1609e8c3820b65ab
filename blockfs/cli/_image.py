"""``blockfs image …``: convert whole images to eStargz, and mount them lazily."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from blockfs.cli import _optimize
from blockfs.cli._common import (
    build_args,
    platform_arg,
    print_json,
    registry_args,
    registry_client,
    state_args,
)
from blockfs.cli._layer import attach_argument

if TYPE_CHECKING:
    from blockfs.registry import RegistryClient

# The entry point group through which other packages add commands to ``blockfs image``.
IMAGE_COMMANDS = "blockfs.image_commands"


# The commands of the group that blockfs itself defines.
BUILT_IN = frozenset({"convert", "optimize", "mount", "stats", "umount"})


def register(groups: Any, *, plugins: bool | str = True) -> None:
    """Add the ``image`` group; with ``plugins``, also the commands of other packages
    (:data:`IMAGE_COMMANDS`), whose lookup reads every installed distribution's entry
    points, or with ``plugins`` the name of one, the distributions up to the one that
    adds it (all of them if none does, for the usage error to list them)."""
    image = groups.add_parser("image", help="convert, push and mount whole images")
    cmds = image.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = cmds.add_parser(
        "convert",
        help="convert an image's layers to eStargz",
        description="SRC and DST are each oci:DIR[:TAG] (an OCI image layout) or a registry "
        "reference. From a multi-platform index, only this host's platform is converted.",
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    build_args(p)
    p.add_argument(
        "--prioritize", action="append", default=[], metavar="PATH",
        help="a file the workload reads first (repeatable, in access order)",
    )  # fmt: skip
    _platform_arg(p)
    registry_args(p)
    p.set_defaults(func=cmd_convert)

    _optimize.register(cmds)

    p = cmds.add_parser("mount", help="mount an image at DIR, its eStargz layers lazily")
    p.add_argument("ref", metavar="REF", help="a registry reference, or oci:DIR[:TAG]")
    p.add_argument("mountpoint", metavar="DIR")
    p.add_argument(
        "--rw", action="store_true",
        help="writable: changes go to an upper directory that umount deletes",
    )  # fmt: skip
    p.add_argument("--prefetch", action="store_true", help="prefetch prioritized files")
    p.add_argument(
        "--no-lazy", action="store_true",
        help="download and extract every layer instead (what a full pull does)",
    )  # fmt: skip
    attach_argument(p, "how to attach each layer's export to the kernel (default: auto)")
    _platform_arg(p)
    registry_args(p)
    state_args(p)
    p.set_defaults(func=cmd_mount)

    p = cmds.add_parser("stats", help="what a mounted image has fetched, per layer")
    p.add_argument("mountpoint", metavar="DIR")
    p.add_argument("--json", action="store_true")
    state_args(p)
    p.set_defaults(func=cmd_stats)

    p = cmds.add_parser("umount", help="unmount an image and stop what its mount started")
    p.add_argument("mountpoint", metavar="DIR")
    state_args(p)
    p.set_defaults(func=cmd_umount)

    # Commands that other installed packages add to this group; blockfs-snapshotter adds
    # `pull` (containerd is its business, not blockfs's).
    if plugins:
        from blockfs.cli import _plugins

        named = _plugins.entry_points(IMAGE_COMMANDS, name=plugins) if plugins is not True else []
        for _name, value in named or _plugins.entry_points(IMAGE_COMMANDS):
            _plugins.load(value)(cmds)


def _platform_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--platform", metavar="OS/ARCH[/VARIANT]", default=None, type=platform_arg,
        help="the platform to take from a multi-platform index (default: this host's)",
    )  # fmt: skip


def cmd_convert(args: argparse.Namespace) -> int:
    # Imported here, as in every command: `blockfs image pull` and `--help` start faster.
    from blockfs.cli._progress import TextProgress
    from blockfs.convert import ConvertOptions, convert_image, open_location
    from blockfs.image import BlobSources

    options = ConvertOptions(
        compression="zstd" if args.zstd else "gzip",
        chunk_size=args.chunk_size,
        min_chunk_size=args.min_chunk_size,
        prioritized=tuple(args.prioritize),
        platform=args.platform,
    )
    with BlobSources() as sources:

        def client() -> RegistryClient:
            return registry_client(sources, args)

        src = open_location(args.src, client)
        dst = open_location(args.dst, client, create=True)
        result = convert_image(src, dst, options, TextProgress())
    for i, layer in enumerate(result.layers):
        note = f" ({layer.note})" if layer.note and layer.action == "kept" else ""
        print(
            f"layer {i + 1}: {layer.action:9} {layer.source.digest} -> {layer.result.digest} "
            f"[{layer.transfer}]{note}"
        )
    print(f"{args.dst}: manifest {result.manifest.digest}")
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    from blockfs.mount.image import mount_image

    mounted = mount_image(
        args.ref,
        args.mountpoint,
        root=args.root,
        writable=args.rw,
        plain_http=args.plain_http,
        hosts_dir=args.hosts_dir,
        attach=args.attach,
        prefetch=args.prefetch,
        lazy=not args.no_lazy,
        platform=args.platform,
    )
    lazy = len(mounted.lazy_layers)
    extracted = len(mounted.layers) - lazy
    mode = "read-write" if mounted.writable else "read-only"
    platform = f", platform {mounted.platform}" if mounted.platform else ""
    print(
        f"mounted {args.ref} at {args.mountpoint} ({mode}{platform}): "
        f"{lazy} layer(s) lazy, {extracted} extracted"
    )
    for layer in mounted.layers:
        if layer.attachment is not None:
            how = f"lazy ({layer.attachment.mode.value}, {layer.attachment.mount_method})"
        else:
            how = f"extracted ({layer.reason})"
        print(f"  {layer.digest} {how}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from blockfs.mount.image import image_stats

    stats = image_stats(args.mountpoint, root=args.root)
    if args.json:
        print_json(stats)
        return 0
    size, fetched = stats["image_size"], stats["bytes_fetched"]
    share = 100 * fetched / size if size else 0.0
    print(f"image:          {stats['reference']} ({stats['manifest']})")
    print(f"fetched:        {fetched} of {size} bytes ({share:.1f}%)")
    for layer in stats["layers"]:
        print(
            f"  {layer['kind']:9} {layer['digest']} {layer['bytes_fetched']:>12} / {layer['size']}"
        )
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from blockfs.mount.image import umount_image

    umount_image(args.mountpoint, root=args.root)
    return 0
