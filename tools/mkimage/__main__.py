"""``python -m tools.mkimage OUT``: build a base image as an OCI layout (see the package)."""

from __future__ import annotations

import argparse
import sys

from blockfs.errors import BlockfsError
from tools.mkimage import DEFAULT_CACHE, build_base_image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.mkimage",
        description="Build a base image offline from Debian packages, as an OCI image layout.",
    )
    parser.add_argument("out", metavar="OUT", help="the OCI layout directory to write")
    parser.add_argument("--tag", default="latest")
    parser.add_argument("--python", action="store_true", help="add a Python 3.11 layer")
    parser.add_argument(
        "--random-mb", type=int, default=0, metavar="N",
        help="add a layer holding N MiB of random data that nothing reads",
    )  # fmt: skip
    parser.add_argument(
        "--cache", default=str(DEFAULT_CACHE), metavar="DIR",
        help=f"where .deb files are kept (default {DEFAULT_CACHE})",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
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
