"""Rewrite an image so that each layer starts with the files a workload reads first.

The profile (:class:`blockfs.convert.Profile`) comes from running the workload
(``blockfs image optimize``, which needs mounts and lives above this package) or from a
file. Rewriting is a conversion with one prioritised list per layer: every layer is
rebuilt, its profiled files first in first-read order, then the prefetch landmark, then
the rest; a layer without profiled files gets the no-prefetch landmark. The writer is
deterministic (fixed gzip headers, the tar's own mtimes and order, compression that does
not depend on thread count), so the same source and profile give the same blobs.
"""

from __future__ import annotations

import attrs

from blockfs.convert._convert import ConvertOptions, ConvertResult, convert_image
from blockfs.convert._locations import ImageLocation
from blockfs.convert._profile import Profile
from blockfs.convert._progress import Progress


def rewrite_with_profile(
    src: ImageLocation,
    dst: ImageLocation,
    profile: Profile,
    options: ConvertOptions | None = None,
    progress: Progress | None = None,
) -> ConvertResult:
    """Convert ``src`` to ``dst`` with each layer's profiled files first (the options'
    own ``prioritized`` list is not used)."""
    options = attrs.evolve(
        options or ConvertOptions(), prioritized=(), layer_priorities=profile.by_diff_id()
    )
    return convert_image(src, dst, options, progress)
