"""``blockfs layer …``: build, inspect, read, verify, serve and mount one eStargz layer."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from blockfs.cli._common import DEFAULT_ROOT, build_args, print_json, registry_args, state_args

if TYPE_CHECKING:
    from blockfs.estargz import BlobReader, Entry
    from blockfs.host.attach import AttachChoice


def register(groups: Any) -> None:
    layer = groups.add_parser("layer", help="work with one eStargz layer blob")
    cmds = layer.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = cmds.add_parser("build", help="convert a tar (plain, gzip or zstd) to eStargz")
    p.add_argument("input", metavar="IN.tar")
    p.add_argument("output", metavar="OUT")
    build_args(p)
    p.add_argument(
        "--prioritize", action="append", default=[], metavar="PATH",
        help="a file the workload reads first (repeatable, in access order)",
    )  # fmt: skip
    p.set_defaults(func=cmd_build)

    p = cmds.add_parser("inspect", help="show a blob's footer and table of contents")
    _blob_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = cmds.add_parser("cat", help="write one file's verified bytes to stdout")
    _blob_args(p)
    p.add_argument("path", metavar="PATH")
    p.set_defaults(func=cmd_cat)

    p = cmds.add_parser("verify", help="check the TOC digest and every chunk digest")
    p.add_argument("--toc-digest", required=True, metavar="D")
    registry_args(p)
    p.add_argument("blob", metavar="BLOB")
    p.set_defaults(func=cmd_verify)

    p = cmds.add_parser("serve", help="serve a blob as an NBD export in the foreground")
    _blob_args(p)
    p.add_argument("--socket", required=True, metavar="PATH", help="unix socket to listen on")
    p.add_argument("--export", default=None, metavar="NAME", help="export name (default: blob)")
    state_args(p)
    p.set_defaults(func=cmd_serve)

    p = cmds.add_parser("mount", help="mount a blob read-only at DIR, lazily")
    _blob_args(p)
    p.add_argument("mountpoint", metavar="DIR")
    p.add_argument("--prefetch", action="store_true", help="prefetch prioritized files")
    attach_argument(p, "how to attach the export to the kernel (default: auto)")
    state_args(p)
    p.set_defaults(func=cmd_mount)

    p = cmds.add_parser("stats", help="what a mounted layer has fetched")
    p.add_argument("mountpoint", metavar="DIR")
    p.add_argument("--json", action="store_true")
    p.add_argument("--root", default=DEFAULT_ROOT, metavar="DIR", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_stats)

    p = cmds.add_parser("umount", help="unmount a layer and stop what its mount started")
    p.add_argument("mountpoint", metavar="DIR")
    p.add_argument("--root", default=DEFAULT_ROOT, metavar="DIR", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_umount)


def _blob_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--toc-digest", metavar="D",
        help="expected TOC digest (the layer's containerd.io/snapshot/stargz/toc.digest)",
    )  # fmt: skip
    registry_args(p)
    p.add_argument(
        "blob", metavar="BLOB", help="an eStargz file, or a registry blob HOST/REPO@sha256:…"
    )


@contextlib.contextmanager
def _open(args: argparse.Namespace) -> Iterator[BlobReader]:
    """The BLOB argument (a file or a registry blob), opened and its TOC checked."""
    # Imported here, as in every command: the `blockfs` command starts faster.
    from blockfs.estargz import BlobReader
    from blockfs.image import BlobSources, open_blob

    with BlobSources() as sources:
        source, _ = open_blob(
            args.blob, sources, plain_http=args.plain_http, hosts_dir=args.hosts_dir
        )
        yield BlobReader.open(source, toc_digest=args.toc_digest)


# blockfs.host.attach's CHOICE_WORDS, written out so that building the parser does not
# load the attach code (tests/cli checks that they agree).
ATTACH_WORDS = ("auto", "nbd", "nbdfuse")


def attach_argument(p: argparse.ArgumentParser, help: str) -> None:
    """``--attach auto|nbd|nbdfuse``, parsed into an AttachChoice (the default too:
    argparse passes a default that is a string through ``type``)."""
    choices = "{" + ",".join(ATTACH_WORDS) + "}"
    p.add_argument("--attach", type=_attach_choice, default="auto", metavar=choices, help=help)


def _attach_choice(value: str) -> AttachChoice:
    from blockfs.host.attach import AttachError, parse_choice

    try:
        return parse_choice(value)
    except AttachError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_build(args: argparse.Namespace) -> int:
    from blockfs.estargz import BuildOptions, build_file

    options = BuildOptions(
        compression="zstd" if args.zstd else "gzip",
        chunk_size=args.chunk_size,
        min_chunk_size=args.min_chunk_size,
        prioritized=tuple(args.prioritize),
    )
    result = build_file(args.input, args.output, options)
    print_json(result.to_json())
    return 0


def _rfc3339(seconds: int | None) -> str:
    from datetime import UTC, datetime

    if seconds is None:
        return ""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def entry_json(e: Entry) -> dict[str, Any]:
    """One TOC entry as ``layer inspect --json`` prints it."""
    import base64

    return {
        "name": e.name,
        "type": e.type,
        "size": e.size,
        "mode": e.mode,
        "uid": e.uid,
        "gid": e.gid,
        "linkName": e.link_name,
        "digest": e.digest,
        "xattrs": {k: base64.b64encode(v).decode() for k, v in e.xattrs.items()},
        "modtime": _rfc3339(e.modtime),
        "chunks": len(e.chunks),
        **(
            {"devMajor": e.dev_major, "devMinor": e.dev_minor}
            if e.type in ("char", "block")
            else {}
        ),
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    with _open(args) as reader:
        return _inspect(args, reader)


def _inspect(args: argparse.Namespace, reader: BlobReader) -> int:
    if args.json:
        print_json(
            {
                "footer": reader.footer.kind,
                "compression": reader.compression,
                "tocDigest": reader.toc_digest,
                "tocOffset": reader.footer.toc_offset,
                "blobSize": reader.source.size,
                **_landmark_json(reader),
                "entries": [entry_json(e) for e in reader.toc.entries],
            }
        )
        return 0
    entries = reader.toc.entries
    files = [e for e in entries if e.type == "reg"]
    print(f"blob:        {args.blob} ({reader.source.size} bytes)")
    print(
        f"footer:      {reader.footer.kind} ({reader.compression}), TOC at {reader.footer.toc_offset}"
    )
    print(f"TOC digest:  {reader.toc_digest}" + ("" if args.toc_digest else " (not verified)"))
    print(
        f"entries:     {len(entries)} ({len(files)} files, "
        f"{sum(len(e.chunks) for e in files)} chunks, {sum(e.size for e in files)} bytes)"
    )
    prefetch = reader.prefetch_range()
    print(f"prefetch:    {f'{prefetch[1]} bytes' if prefetch else 'none'}")
    marks = _landmark_json(reader)
    print(f"landmark:    {marks['landmark'] or 'none'}")
    print(f"prioritized: {len(marks['prioritized'])} file(s)")
    for name in marks["prioritized"]:
        print(f"  {name}")
    print("TOC, in blob order:")
    for e in entries:
        link = f" -> {e.link_name}" if e.link_name else ""
        print(f"  {e.type:8} {e.mode:04o} {e.uid}:{e.gid} {e.size:>10} {e.name}{link}")
    return 0


def _landmark_json(reader: BlobReader) -> dict[str, Any]:
    """The blob's landmark (``.prefetch.landmark``, ``.no.prefetch.landmark`` or None) and
    the regular files before a prefetch landmark, in blob order: what prefetch fetches."""
    from blockfs.estargz import LANDMARKS, PREFETCH_LANDMARK

    before: list[str] = []
    for e in reader.toc.entries:
        if e.name in LANDMARKS:
            return {
                "landmark": e.name,
                "prioritized": before if e.name == PREFETCH_LANDMARK else [],
            }
        if e.type == "reg":
            before.append(e.name)
    return {"landmark": None, "prioritized": []}


def cmd_cat(args: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    with _open(args) as reader:
        for piece in reader.iter_file(args.path):
            out.write(piece)
    out.flush()
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    with _open(args) as reader:
        report = reader.verify()
    print(
        f"OK: TOC digest {reader.toc_digest}, {report.files_verified} files, "
        f"{report.chunks_verified} chunks verified"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from blockfs.mount.layer import serve_layer

    return serve_layer(
        args.blob,
        socket=args.socket,
        toc_digest=args.toc_digest,
        root=args.root,
        export=args.export,
        plain_http=args.plain_http,
        hosts_dir=args.hosts_dir,
    )


def cmd_mount(args: argparse.Namespace) -> int:
    from blockfs.mount.layer import mount_layer

    mounted = mount_layer(
        args.blob,
        args.mountpoint,
        toc_digest=args.toc_digest,
        root=args.root,
        attach=args.attach,
        prefetch=args.prefetch,
        plain_http=args.plain_http,
        hosts_dir=args.hosts_dir,
    )
    print(f"mounted {args.blob} at {args.mountpoint} (attach: {mounted.attach_summary})")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from blockfs.mount.layer import layer_stats

    stats = layer_stats(args.mountpoint, root=args.root)
    if args.json:
        print_json(stats)
    else:
        for key, value in stats.items():
            print(f"{key:24} {value}")
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from blockfs.mount.layer import umount_layer

    umount_layer(args.mountpoint, root=args.root)
    return 0
