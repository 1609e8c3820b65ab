"""``python -m tools.mkimage OUT``: build a base image as an OCI layout (see the package)."""

from __future__ import annotations

import argparse
import sys

from blockfs.errors import BlockfsError
from tools.mkimage import APPS, DEFAULT_CACHE, build_app_image, build_base_image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.mkimage",
        description="Build a base image offline from Debian packages, as an OCI image layout.",
    )
    parser.add_argument("out", metavar="OUT", help="the OCI layout directory to write")
    parser.add_argument("--tag", default="latest")
    parser.add_argument("--python", action="store_true", help="add a Python 3.11 layer")
    parser.add_argument(
        "--app", choices=sorted(APPS),
        help="build an app image instead: busybox and libc, a runtime (byte-compiled "
        "Python 3.11, or the gcc-12 toolchain), the random data if asked, an app layer",
    )  # fmt: skip
    parser.add_argument(
        "--gcc", dest="app", action="store_const", const="gcc",
        help="the gcc-12 toolchain image, whose /hello.c `gcc -o /tmp/h /hello.c` compiles "
        "(same as --app gcc)",
    )  # fmt: skip
    parser.add_argument(
        "--random-mb", type=int, default=0, metavar="N",
        help="add a layer holding N MiB of random data that nothing reads",
    )  # fmt: skip
    parser.add_argument(
        "--cache", default=str(DEFAULT_CACHE), metavar="DIR",
        help=f"where .deb files are kept (default {DEFAULT_CACHE})",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.app is not None and args.python:
        parser.error("--python adds a layer to the base image; an app image has its runtime")
    try:
        if args.app is not None:
            descriptor = build_app_image(
                args.out, args.app, tag=args.tag, random_mb=args.random_mb, cache=args.cache,
                report=print,
            )  # fmt: skip
        else:
            descriptor = build_base_image(
                args.out,
                tag=args.tag,
                python=args.python,
                random_mb=args.random_mb,
                cache=args.cache,
                report=print,
            )
    except BlockfsError as e:
        print(f"mkimage: error: {e}", file=sys.stderr)
        return 1
    print(f"oci:{args.out}:{args.tag} manifest {descriptor.digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
