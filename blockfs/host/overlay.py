"""The mounts a snapshot is handed to containerd as, shaped like containerd's overlayfs
snapshotter shapes them (containerd's snapshots/overlay package).

containerd (or its shim) performs these mounts; the snapshotter only describes them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import attrs

# Present when the running kernel's overlayfs knows the "index" option. Like containerd,
# blockfs then mounts with index=off: with the index on, an upper dir cannot be mounted
# again over different lower dirs, and a container's lowers are bind mounts that change.
OVERLAY_INDEX_PARAMETER = Path("/sys/module/overlay/parameters/index")


def _paths(value: Sequence[str | os.PathLike[str]]) -> tuple[Path, ...]:
    return tuple(Path(p) for p in value)


@attrs.frozen
class Mount:
    """One ``containerd.types.Mount``: what mount(2) needs, with fstab-style options."""

    type: str
    source: str
    options: tuple[str, ...]
    target: str = ""


@attrs.frozen
class MountPlan:
    """What a snapshot's mounts are made of.

    ``fs`` is the snapshot's own directory (the overlay upper dir when it is writable),
    ``work`` its overlay work dir, and ``lowers`` the file systems of its parents, nearest
    parent first.
    """

    writable: bool
    fs: Path = attrs.field(converter=Path)
    work: Path = attrs.field(converter=Path)
    lowers: tuple[Path, ...] = attrs.field(default=(), converter=_paths)


def overlay_index_off_supported() -> bool:
    """Whether this kernel's overlayfs accepts ``index=off``."""
    return OVERLAY_INDEX_PARAMETER.exists()


def mounts_for(plan: MountPlan, *, index_off: bool = False) -> tuple[Mount, ...]:
    """The mounts containerd performs to get the snapshot described by ``plan``."""
    mode = "rw" if plan.writable else "ro"
    if not plan.lowers:
        return (Mount("bind", str(plan.fs), (mode, "rbind")),)
    if not plan.writable and len(plan.lowers) == 1:
        # overlayfs refuses a single lower dir without an upper dir; a bind mount of the
        # parent is the same read-only view.
        return (Mount("bind", str(plan.lowers[0]), ("ro", "rbind")),)
    options: list[str] = []
    if index_off:
        options.append("index=off")
    if plan.writable:
        options += [f"workdir={plan.work}", f"upperdir={plan.fs}"]
    options.append("lowerdir=" + ":".join(str(p) for p in plan.lowers))
    return (Mount("overlay", "overlay", tuple(options)),)
