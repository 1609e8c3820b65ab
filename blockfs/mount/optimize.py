"""``blockfs image optimize``: profile a workload from its block reads, then put what it
read first in each layer.

1. SRC is converted as ``image convert`` does (same compression and chunk sizes) into a
   staging OCI layout in a temporary directory.
2. The staging image is mounted as ``image mount --rw`` does, with the NBD server's read
   trace on (ServerConfig ``trace``): each layer's server appends the file behind each
   extent at the first read of its data. A file that an upper layer replaces or whites
   out is read from the upper layer's device, so each layer's trace names only its own
   files. Metadata (lookups, stat, directory listings) is in the metadata region of each
   block image and records nothing.
3. The workload (the image config's command, or the one given) runs once in a sandbox
   over that mount (:mod:`blockfs.host.sandbox`: its own PID, mount, network, IPC and UTS
   namespaces, no network) until it exits or the period ends; then it is killed, the
   image unmounted, and the traces read into a :class:`blockfs.convert.Profile` keyed by
   the source layers' diff_ids.
4. SRC is rewritten with each layer's profiled files first, in first-read order, then the
   prefetch landmark (:func:`blockfs.convert.rewrite_with_profile`), and stored at DST.

With a profile given (``record_in``) only step 4 runs.
"""

from __future__ import annotations

import errno
import logging
import os
import shlex
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import attrs

from blockfs.convert import (
    ConvertOptions,
    ConvertResult,
    ImageLocation,
    LayoutLocation,
    Profile,
    Progress,
    SilentProgress,
    convert_image,
    profile_from_traces,
    resolve_image,
    rewrite_with_profile,
)
from blockfs.errors import BlockfsError
from blockfs.host.attach import AUTO, AttachChoice
from blockfs.host.sandbox import SandboxResult, SandboxSpec, run_sandboxed
from blockfs.mount.image import ImageMount, ImageMountError, mount_image, umount_image
from blockfs.oci import ImageConfig, ImageLayout

log = logging.getLogger("blockfs.optimize")

DEFAULT_PERIOD = 10.0
_STAGING_TAG = "profile"
_UNMOUNT_ATTEMPTS = 20


class OptimizeError(BlockfsError):
    """An image could not be optimized: a bad workload description, or a profile run that
    could not be set up."""


def _words(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(items)


@attrs.frozen
class Workload:
    """What to run: ``argv``, its whole environment (``K=V``), working directory and user
    (as an image config's ``User``)."""

    argv: tuple[str, ...] = attrs.field(converter=_words)
    env: tuple[str, ...] = attrs.field(converter=_words, default=())
    cwd: str = "/"
    user: str = ""

    def describe(self) -> str:
        return shlex.join(self.argv) if self.argv else "(nothing)"

    def to_json(self) -> dict[str, Any]:
        return {"command": list(self.argv), "workdir": self.cwd, "user": self.user}


@attrs.frozen
class Overrides:
    """What the command line changes of the image config's workload (None: keep it).

    As with ``docker run``: ``entrypoint`` replaces the image's Entrypoint (``""``
    removes it) and then drops the image's Cmd; ``cmd`` replaces the Cmd; ``env`` entries
    (``K=V``) replace or add to the image's Env.
    """

    entrypoint: str | None = None
    cmd: tuple[str, ...] | None = None
    env: tuple[str, ...] = ()
    workdir: str | None = None
    user: str | None = None


def workload_of(config: ImageConfig, overrides: Overrides = Overrides()) -> Workload:
    """The workload an image config describes, with ``overrides`` applied."""
    process = config.process
    entrypoint, cmd = list(process.entrypoint), list(process.cmd)
    if overrides.entrypoint is not None:
        entrypoint = [overrides.entrypoint] if overrides.entrypoint else []
        cmd = []
    if overrides.cmd is not None:
        cmd = list(overrides.cmd)
    env: dict[str, str] = {}
    for item in [*process.env, *overrides.env]:
        key, sep, value = item.partition("=")
        if not key or not sep:
            raise OptimizeError(f"environment entry {item!r} is not KEY=VALUE")
        env.pop(key, None)
        env[key] = value
    workdir = overrides.workdir if overrides.workdir is not None else process.working_dir
    user = overrides.user if overrides.user is not None else process.user
    argv = [*entrypoint, *cmd]
    if not argv:
        raise OptimizeError(
            "the image has no Entrypoint or Cmd: give the workload with --entrypoint or --cmd"
        )
    workdir = str(workdir or "/")
    if not workdir.startswith("/"):
        raise OptimizeError(f"the working directory {workdir!r} must be absolute")
    return Workload(argv, [f"{k}={v}" for k, v in env.items()], workdir, str(user or ""))


@attrs.frozen
class ProfileRun:
    """What one run of the workload gave: the profile, and how the workload ended."""

    profile: Profile
    workload: Workload
    outcome: SandboxResult
    untraced: tuple[str, ...] = ()  # layers mounted whole (not lazily), hence not profiled


@attrs.frozen
class OptimizeResult:
    """The optimized image, and the profile run it came from (None with ``record_in``)."""

    converted: ConvertResult
    profile: Profile
    run: ProfileRun | None


def optimize_image(
    src: ImageLocation,
    dst: ImageLocation,
    options: ConvertOptions = ConvertOptions(),  # noqa: B008
    *,
    overrides: Overrides = Overrides(),
    period: float = DEFAULT_PERIOD,
    record_in: str | os.PathLike[str] | None = None,
    record_out: str | os.PathLike[str] | None = None,
    attach: AttachChoice = AUTO,
    output: IO[Any] | int | None = None,
    progress: Progress | None = None,
) -> OptimizeResult:
    """Optimize ``src`` for its workload and store the result at ``dst``.

    With ``record_in`` the profile is read from that file and nothing runs; otherwise the
    workload is profiled (``period`` seconds at most; its output goes to ``output``) and,
    with ``record_out``, the profile is written there before the rewrite.
    """
    progress = progress or SilentProgress()
    run: ProfileRun | None = None
    if record_in is not None:
        profile = Profile.load(record_in)
        _check_profile_fits(profile, src, options, str(record_in))
    else:
        run = profile_workload(
            src, options, overrides=overrides, period=period, attach=attach,
            output=output, progress=progress,
        )  # fmt: skip
        profile = run.profile
        if record_out is not None:
            profile.save(record_out)
    converted = rewrite_with_profile(src, dst, profile, options, progress)
    return OptimizeResult(converted, profile, run)


def _check_profile_fits(
    profile: Profile, src: ImageLocation, options: ConvertOptions, where: str
) -> None:
    """Refuse a profile that names none of ``src``'s layers; warn of profiled layers that
    ``src`` does not have (a profile applies to the image it was recorded from)."""
    image = resolve_image(src, options.platform)
    diff_ids = set(ImageConfig.from_bytes(src.read_blob(image.manifest.config)).diff_ids)
    profiled = [layer for layer in profile.layers if layer.files]
    missing = [layer for layer in profiled if layer.diff_id not in diff_ids]
    if profiled and len(missing) == len(profiled):
        raise OptimizeError(
            f"the profile {where} names no layer of {src.name} (no diff_id matches): it "
            "applies to the image it was recorded from; record one for this image"
        )
    for layer in missing:
        log.warning(
            "the profile's layer %s (%d files) is not a layer of %s: not used",
            layer.diff_id,
            len(layer.files),
            src.name,
        )


def profile_workload(
    src: ImageLocation,
    options: ConvertOptions = ConvertOptions(),  # noqa: B008
    *,
    overrides: Overrides = Overrides(),
    period: float = DEFAULT_PERIOD,
    attach: AttachChoice = AUTO,
    output: IO[Any] | int | None = None,
    progress: Progress | None = None,
) -> ProfileRun:
    """Run the workload of ``src`` once on a lazily mounted, traced conversion of it and
    return the files it read, per source layer. Nothing is left running or mounted."""
    progress = progress or SilentProgress()
    image = resolve_image(src, options.platform)
    config = ImageConfig.from_bytes(src.read_blob(image.manifest.config))
    workload = workload_of(config, overrides)
    with tempfile.TemporaryDirectory(prefix="blockfs-optimize-", dir=options.tmpdir) as tmp:
        work = Path(tmp)
        staging = LayoutLocation(ImageLayout.create(work / "staging"), _STAGING_TAG)
        convert_image(
            src, staging, attrs.evolve(options, prioritized=(), layer_priorities=None), progress
        )
        (work / "trace").mkdir()
        (work / "rootfs").mkdir()
        mounted = mount_image(
            f"oci:{work / 'staging'}:{_STAGING_TAG}",
            str(work / "rootfs"),
            root=str(work / "state"),
            writable=True,
            attach=attach,
            trace=str(work / "trace"),
        )
        try:
            progress.note(f"running {workload.describe()} for up to {period:g} s")
            outcome = run_sandboxed(
                SandboxSpec(str(work / "rootfs"), workload.argv, workload.env, workload.cwd,
                            workload.user),
                timeout=period,
                result_dir=str(work),
                stdout=output,
                stderr=output,
            )  # fmt: skip
        finally:
            _unmount(mounted, str(work / "state"))
        untraced = tuple(layer.digest for layer in mounted.layers if layer.export is None)
        for digest in untraced:
            log.warning("layer %s was not mounted lazily: its reads are not profiled", digest)
        traces = [
            work / "trace" / layer.export if layer.export is not None else None
            for layer in mounted.layers
        ]
        profile = profile_from_traces(
            config.diff_ids,
            traces,
            **workload.to_json(),
            **_outcome_json(outcome),
        )
    return ProfileRun(profile, workload, outcome, untraced)


def _outcome_json(outcome: SandboxResult) -> dict[str, Any]:
    return {
        "exit_code": outcome.exit_code,
        "signal": outcome.signal,
        "timed_out": outcome.timed_out,
        "seconds": round(outcome.seconds, 3),
    }


def _unmount(mounted: ImageMount, root: str) -> None:
    """Unmount the staging image; a mount still busy for a moment is tried again."""
    for attempt in range(_UNMOUNT_ATTEMPTS):
        try:
            umount_image(mounted.mountpoint, root=root)
            return
        except ImageMountError as e:
            cause = e.__cause__
            busy = isinstance(cause, OSError) and cause.errno == errno.EBUSY
            if not busy or attempt == _UNMOUNT_ATTEMPTS - 1:
                raise
            time.sleep(0.25)


def describe_outcome(outcome: SandboxResult) -> str:
    """``exited with status 3 (1.2 s)`` or ``still running after 2 s: killed``."""
    text = outcome.describe()
    return text if outcome.timed_out else f"{text} ({outcome.seconds:.1f} s)"
