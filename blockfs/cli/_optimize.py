"""``blockfs image optimize``: convert an image with what its workload reads first."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from blockfs.cli._common import (
    build_args,
    platform_arg,
    registry_args,
    registry_client,
)
from blockfs.cli._layer import attach_argument

if TYPE_CHECKING:
    from blockfs.registry import RegistryClient


def register(cmds: Any) -> None:
    """Add ``optimize`` to the ``blockfs image`` command group ``cmds``."""
    p = cmds.add_parser(
        "optimize",
        help="convert an image with the files its workload reads first",
        description="Convert SRC as `image convert` does, run its workload once on a lazy "
        "mount of the result (isolated: own PID, mount, network, IPC and UTS namespaces, no "
        "network) and record the files whose data it reads, in first-read order, from the "
        "NBD server's reads; then store at DST each layer of SRC with those files first, "
        "before the prefetch landmark. The workload is the image config's Entrypoint, Cmd, "
        "Env, WorkingDir and User unless overridden; it runs until it exits or --period "
        "ends. SRC and DST are each oci:DIR[:TAG] or a registry reference.",
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    build_args(p)
    p.add_argument(
        "--platform", metavar="OS/ARCH[/VARIANT]", default=None, type=platform_arg,
        help="the platform to take from a multi-platform index (default: this host's)",
    )  # fmt: skip
    registry_args(p)
    p.add_argument(
        "--period", type=_seconds, default=10.0, metavar="SECONDS",
        help="how long the workload may run before it is stopped (default 10); what it "
        "read until then is the profile",
    )  # fmt: skip
    p.add_argument(
        "--entrypoint", default=None, metavar="CMD",
        help="run CMD instead of the image's Entrypoint (and drop its Cmd); '' for none",
    )  # fmt: skip
    p.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE",
        help="set a variable of the workload's environment (repeatable)",
    )  # fmt: skip
    p.add_argument("--workdir", default=None, metavar="DIR", help="the working directory")
    p.add_argument(
        "--user", default=None, metavar="USER[:GROUP]", help="the user (name or uid) to run as"
    )
    record = p.add_mutually_exclusive_group()
    record.add_argument(
        "--record-out", default=None, metavar="FILE",
        help="write the profile (the files read per source layer diff_id, in order) as JSON",
    )  # fmt: skip
    record.add_argument(
        "--record-in", default=None, metavar="FILE",
        help="optimize from this profile instead of running the workload",
    )  # fmt: skip
    p.add_argument(
        "--tmpdir", default=None, metavar="DIR",
        help="where the staging image, its mount and the layers being built go",
    )  # fmt: skip
    attach_argument(p, "how to attach the staging image's layers (default: auto)")
    p.add_argument(
        "--cmd", nargs=argparse.REMAINDER, default=None, metavar="ARG",
        help="run these arguments instead of the image's Cmd (must come last: every "
        "argument after it is the command's)",
    )  # fmt: skip
    p.set_defaults(func=cmd_optimize)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of seconds")
    return value


def cmd_optimize(args: argparse.Namespace) -> int:
    # Imported here, as in every command: `--help` and other commands start faster.
    from blockfs.cli._progress import TextProgress
    from blockfs.convert import ConvertOptions, open_location
    from blockfs.image import BlobSources
    from blockfs.mount.optimize import Overrides, describe_outcome, optimize_image

    options = ConvertOptions(
        compression="zstd" if args.zstd else "gzip",
        chunk_size=args.chunk_size,
        min_chunk_size=args.min_chunk_size,
        platform=args.platform,
        tmpdir=args.tmpdir,
    )
    overrides = Overrides(
        entrypoint=args.entrypoint,
        cmd=tuple(args.cmd) if args.cmd is not None else None,
        env=tuple(args.env),
        workdir=args.workdir,
        user=args.user,
    )
    with BlobSources() as sources:

        def client() -> RegistryClient:
            return registry_client(sources, args)

        src = open_location(args.src, client)
        dst = open_location(args.dst, client, create=True)
        result = optimize_image(
            src, dst, options, overrides=overrides, period=args.period,
            record_in=args.record_in, record_out=args.record_out, attach=args.attach,
            output=sys.stderr, progress=TextProgress(),
        )  # fmt: skip
    if result.run is not None:
        print(f"workload: {result.run.workload.describe()}: {describe_outcome(result.run.outcome)}")
    else:
        print(f"profile: {args.record_in} (nothing run)")
    if args.record_out:
        print(f"profile written to {args.record_out}")
    for i, layer in enumerate(result.converted.layers):
        files = layer.prioritized
        what = f"{len(files)} file(s) first" if files else "nothing read: no prefetch"
        print(f"layer {i + 1}: {layer.source.digest} -> {layer.result.digest} ({what})")
        for name in files:
            print(f"  {name}")
    print(f"{args.dst}: manifest {result.converted.manifest.digest}")
    return 0
