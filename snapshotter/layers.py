"""The snapshotter's lazily mounted layers: one NBD server, one EROFS mount per layer.

Layout under the daemon's root::

    layers/<name>/           layer.json, index.erofs, extents.bin: NBD export <name>
    layers/<name>/mnt        the layer's EROFS mount, a lower dir of overlay mounts
    layers/<name>/attach     how the export is attached (attachment.json, nbdfuse state)
    run/                     the NBD server's socket, pid file, log and stats socket
    cache/chunks/            verified chunks, shared by every layer

``<name>`` is the layer's blob digest as ``sha256-<hex>``, so a layer shared by several
images (or namespaces) is indexed, attached and mounted once; the snapshot store says
which snapshots use it, and the last one's removal releases it.

The NBD server, every nbdfuse process (with the relay it reaches the server through) and
every mount outlive the daemon. A restarted daemon adopts them
(:meth:`LayerManager.start`): the server by its pid file, each mount by its attachment
record. Nothing at start touches a registry: layers that are indexed but not mounted
(after a reboot) are attached again when a snapshot needs them.

Callers serialise work on one layer with :meth:`LayerManager.holding`, and hold it from
acquiring a layer until the snapshot that uses it is recorded, so that a concurrent
release or cleanup never sees a layer in between. Attaching, mounting and unmounting take
a second lock of the layer's, inside the first (:meth:`LayerManager._mounting`): a layer
mounts in the background without the first lock, so that a Prepare that only needs the
layer's index never waits for a mount; its release waits for the mount to finish.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import attrs

from blockfs.errors import BlockfsError
from blockfs.estargz import BlobReader, CountingSource
from blockfs.host.attach import (
    AUTO,
    AttachChoice,
    AttachError,
    Attachment,
    AttachMode,
    attach_and_mount,
    backend_alive,
    choose_mode,
    is_mounted,
    parse_choice,
    read_attachment,
    reconnect,
    unmount_and_detach,
)
from blockfs.host.nbdserver import NBDServer, NBDServerError, socket_path
from blockfs.image import (
    LAYER_JSON,
    BlobSources,
    ControlError,
    FoundFile,
    LayerRecord,
    LoaderNeeds,
    ServerConfig,
    SourceSpec,
    fetch_ahead,
    find_arguments,
    find_commands,
    find_loaded,
    forget_export,
    index_layer,
    open_export,
    preload_export,
    query_stats,
)
from blockfs.oci import Manifest, ProcessConfig, Reference
from snapshotter.pull import resolve_image
from snapshotter.remote import (
    TOC_DIGEST_LABEL,
    RemoteLayer,
    layer_name,
    prefetch_end,
    sibling_source,
)
from snapshotter.store import mounts_under

log = logging.getLogger(__name__)

LAYERS_DIR = "layers"
RUN_DIR = "run"
CACHE_DIR = "cache/chunks"
MOUNT_DIR = "mnt"
ATTACH_DIR = "attach"
CONTROL_SOCKET = "control.sock"
# How many layers' TOCs may be fetched ahead and held in memory at once.
MAX_AHEAD = 16
AHEAD_WORKERS = 4
# How many images' manifests a manager remembers having fetched ahead the start of.
MAX_STARTED_IMAGES = 64
# The most files of an image's start fetched ahead: its commands and the files its
# command line names, and the loaders and libraries they need, transitively (a program
# loads a few dozen at most).
MAX_START_FILES = 64
# How often the daemon checks that the NBD server still runs (LayerManager.revive_server):
# a look at its pid file and /proc, cheap enough to take a restart's first second off.
SERVER_CHECK_INTERVAL = 0.25


class LayerUnavailable(BlockfsError):
    """A layer cannot be served lazily; the message says why, ``layer`` which one."""

    def __init__(self, message: str, *, layer: str) -> None:
        super().__init__(message)
        self.layer = layer

    def context(self) -> list[str]:
        return [f"layer {self.layer}"]


@attrs.frozen
class _Resolved:
    """A layer's footer and TOC, read and checked, with what reading them cost."""

    reader: BlobReader
    bytes_fetched: int
    source: SourceSpec


class LayerManager:
    """Indexes, attaches, mounts and releases the layers under ``root/layers``."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        attach: AttachChoice | str = AUTO,
        cache_size: int = 10 << 30,
        prefetch: bool = False,
        background_fetch: bool = False,
        connections: int | None = None,
    ) -> None:
        self.root = Path(root).absolute()
        self.layers_dir = self.root / LAYERS_DIR
        self.run_dir = self.root / RUN_DIR
        # The daemon's configuration still holds the word ("auto", "nbd", "nbdfuse").
        self.attach = parse_choice(attach) if isinstance(attach, str) else attach
        self.connections = connections
        self.server = NBDServer(
            self.run_dir,
            ServerConfig(
                root=self.layers_dir,
                cache_dir=self.root / CACHE_DIR,
                cache_max=cache_size,
                control=socket_path(self.run_dir, CONTROL_SOCKET),
                prefetch=prefetch,
                background_fetch=background_fetch,
            ),
        )
        # Registry clients by configuration, shared with the daemon's pulls.
        self.sources = BlobSources()
        self._lock = threading.Lock()
        self._server_lock = threading.Lock()
        # Per layer: the lock of holding(), and the lock of _mounting() (re-entrant: a
        # failed attach tears down what it began).
        self._layer_locks: dict[str, tuple[threading.Lock, threading.RLock]] = {}
        self._mode: AttachMode | None = None
        self._ahead: dict[str, Future[_Resolved]] = {}
        self._started_images: OrderedDict[str, None] = OrderedDict()
        self._ahead_pool = ThreadPoolExecutor(AHEAD_WORKERS, thread_name_prefix="toc-ahead")
        # Attaching ahead takes a layer's lock, so it has threads of its own: a Prepare
        # that holds the lock may wait for a TOC read of the other pool, never for these.
        self._attach_pool = ThreadPoolExecutor(AHEAD_WORKERS, thread_name_prefix="attach-ahead")
        # Indexing is Python under one GIL: layers indexed side by side would all be done
        # about when the last is, so they are indexed one at a time, in the order their
        # TOCs come (a pull's first Prepare waits for its own layer only). Like attaching,
        # it takes the layer's lock, so it too has a thread of its own.
        self._index_pool = ThreadPoolExecutor(1, thread_name_prefix="index-ahead")
        self.server_restarts = 0  # by revive_server, since this manager started
        self._warm_up: threading.Thread | None = None

    # -- paths ---------------------------------------------------------------------------

    def layer_dir(self, name: str) -> Path:
        """``layers/<name>``: the layer's index, mountpoint and attachment state."""
        return self.layers_dir / name

    def mountpoint(self, name: str) -> Path:
        """Where layer ``name`` is mounted: the lower dir it contributes."""
        return self.layer_dir(name) / MOUNT_DIR

    def _attach_dir(self, name: str) -> Path:
        return self.layer_dir(name) / ATTACH_DIR

    @property
    def control_socket(self) -> Path:
        """The NBD server's stats socket."""
        assert self.server.config.control is not None
        return self.server.config.control

    # -- locking -------------------------------------------------------------------------

    @contextlib.contextmanager
    def holding(self, name: str) -> Iterator[None]:
        """Exclusive use of layer ``name`` for the block: attach, release, reconcile."""
        with self._locks_of(name)[0]:
            yield

    @contextlib.contextmanager
    def _mounting(self, name: str) -> Iterator[None]:
        """Exclusive use of layer ``name``'s attachment and mount for the block."""
        with self._locks_of(name)[1]:
            yield

    def _locks_of(self, name: str) -> tuple[threading.Lock, threading.RLock]:
        with self._lock:
            locks = self._layer_locks.get(name)
            if locks is None:
                locks = self._layer_locks[name] = (threading.Lock(), threading.RLock())
            return locks

    # -- start and stop ------------------------------------------------------------------

    def start(self, in_use: Callable[[str], bool]) -> None:
        """Adopt what a previous daemon left and reconcile it with the store.

        ``in_use(name)`` says whether a snapshot still uses layer ``name``. Layers nobody
        uses are unmounted, detached and deleted; used ones that are still mounted are
        kept as they are. Call it before serving requests.
        """
        pid = self.server.pid()
        if pid is not None:
            log.info("adopted the running NBD server", extra={"pid": pid})
        for name in self._names():
            with self.holding(name):
                self._reconcile(name, in_use(name), server_running=pid is not None)
        # The server runs from now on, so that no pull waits for nbdkit and its Python to
        # start (about 0.3 s, more with a cold page cache).
        self._start_server_soon()

    def _start_server_soon(self) -> None:
        """Start the NBD server in the background unless it runs (or is starting)."""
        with self._lock:
            if self._warm_up is not None and self._warm_up.is_alive():
                return
            if self.server.pid() is not None:
                return

            def start() -> None:
                try:
                    self._ensure_server()
                except NBDServerError as e:
                    log.warning("cannot start the NBD server ahead", extra={"error": str(e)})

            self._warm_up = threading.Thread(target=start, name="nbd-server-start", daemon=True)
            self._warm_up.start()

    def close(self) -> None:
        """Stop background work; stop the NBD server too if no layer is attached (the
        next daemon starts it again)."""
        if self._warm_up is not None:
            self._warm_up.join()
        self._ahead_pool.shutdown(wait=False, cancel_futures=True)
        # An index or attach under way finishes (the next start reconciles a layer
        # nobody uses).
        self._index_pool.shutdown(wait=True, cancel_futures=True)
        self._attach_pool.shutdown(wait=True, cancel_futures=True)
        self.sources.close()
        attached = self.attached()
        if not attached and self.server.is_running():
            self.server.stop()
            log.info("stopped the NBD server: no layer is attached")
        elif attached:
            log.info(
                "leaving the NBD server running for the attached layers",
                extra={"layers": len(attached)},
            )

    def _names(self) -> list[str]:
        if not self.layers_dir.is_dir():
            return []
        return sorted(os.listdir(self.layers_dir))

    def _reconcile(self, name: str, used: bool, *, server_running: bool) -> None:
        if name.startswith("."):
            # An index that was being written when a daemon died.
            self._remove_dir(name)
            return
        att = self._attachment(name)
        if not used:
            if self._teardown(name):
                log.info("removed a layer no snapshot uses", extra={"layer": name})
            return
        if att is None:
            return  # attached again when a snapshot needs it
        if not self._healthy(att):
            log.warning(
                "layer attachment is stale; it is attached again when needed",
                extra={"layer": name, "mountpoint": att.mountpoint},
            )
            self._undo(att)
            return
        if not server_running:
            # The layer's connections died with the old server: give it new ones.
            self._ensure_server()
            if not self._reconnect(name, att):
                return
        log.info("adopted layer mount", extra={"layer": name, "mountpoint": att.mountpoint})

    def _reconnect(self, name: str, att: Attachment) -> bool:
        """Connect ``att`` to the (restarted) server again; whether it worked.

        The kernel NBD driver takes new connections for the mounted device, and nbdfuse's
        relay reconnects by itself: reads that waited on the dead server resume. An
        nbdfuse layer without a working relay (attached by an earlier version, or its
        relay died) is attached again instead (:meth:`_attach_again`).
        """
        with self._mounting(name):
            try:
                reconnect(att, str(self.server.socket))
            except AttachError as e:
                if att.mode is AttachMode.NBDFUSE:
                    return self._attach_again(name, att, str(e))
                log.error("cannot reconnect layer", extra={"layer": name, "error": str(e)})
                return False
        log.info("reconnected layer", extra={"layer": name, "device": att.device})
        return True

    def _attach_again(self, name: str, att: Attachment, reason: str) -> bool:
        """Attach an nbdfuse layer that cannot reconnect afresh; whether it worked.

        The old mounts are detached lazily and its nbdfuse stopped, and the layer is
        attached again on the same mountpoint, so new containers get a working layer at
        once. A container that was running on it keeps the old, broken view until it is
        restarted: its reads of data not yet in the page cache fail.
        """
        try:
            unmount_and_detach(att, lazy=True)
            self._attach(name)
        except (AttachError, LayerUnavailable) as e:
            log.error("cannot attach layer again", extra={"layer": name, "error": str(e)})
            return False
        log.warning(
            "attached layer again after the NBD server restarted: containers that were "
            "running on it fail reads of uncached data until restarted",
            extra={"layer": name, "reason": reason},
        )
        return True

    def revive_server(self) -> bool:
        """Restart the NBD server if it died while layers are attached; whether it did.

        Layers attached through the kernel get fresh connections on the same device, and
        nbdfuse layers' relays reconnect by themselves: their waiting reads resume. The
        daemon calls this every :data:`SERVER_CHECK_INTERVAL` seconds. A server that is
        not running while no layer is attached is left alone: the next attach starts it.
        """
        if self.server.is_running():
            return False
        names = self.attached()
        if not names:
            return False
        log.error(
            "the NBD server exited while layers are attached; restarting it",
            extra={"layers": len(names), "server_log": self.server.log_tail(5)},
        )
        self._ensure_server()
        self.server_restarts += 1
        for name in names:
            with self.holding(name):
                att = self._attachment(name)
                if att is not None and is_mounted(att.mountpoint):
                    self._reconnect(name, att)
        return True

    def reconcile(self, in_use: Callable[[str], bool]) -> list[str]:
        """Release every layer that ``in_use`` says no snapshot uses; their names."""
        removed = []
        for name in self._names():
            with self.holding(name):
                if name.startswith(".") or in_use(name):
                    continue
                if self._teardown(name):
                    removed.append(name)
        return removed

    # -- acquire and release -------------------------------------------------------------

    def acquire(self, layer: RemoteLayer, *, wait: bool = True) -> Path:
        """Index, attach and mount ``layer`` unless it is already; its mountpoint.

        Hold :meth:`holding` for the layer. Raises LayerUnavailable when the layer is not
        eStargz, its TOC does not match the TOC digest, the registry fails, or attaching
        fails; nothing is left mounted then. With ``wait=False`` only the index is made
        now (the footer and TOC read and checked); the layer is attached and mounted in
        the background (:meth:`mount_soon`), and whoever needs the mount waits for it in
        :meth:`ensure_mounted`.
        """
        name = layer_name(layer.digest)
        try:
            att = self._attachment(name)
            if att is not None and self._healthy(att):
                self._check_toc(name, layer.toc_digest)
                return Path(att.mountpoint)
            self._index(name, layer)
            if not wait:
                self.mount_soon(name)
                return self.mountpoint(name)
            try:
                return self.ensure_mounted(name)
            except LayerUnavailable:
                self._teardown(name)
                raise
        except OSError as e:
            # A full disk, say: the layer is unpacked the ordinary way instead.
            raise LayerUnavailable(f"cannot set the layer up: {e}", layer=name) from e

    def ensure_mounted(self, name: str) -> Path:
        """Mount layer ``name`` if it is indexed but not mounted (a mount in the background
        is waited for; after a reboot it is mounted again)."""
        with self._mounting(name):
            att = self._attachment(name)
            if att is not None and self._healthy(att):
                return Path(att.mountpoint)
            if not (self.layer_dir(name) / LAYER_JSON).is_file():
                raise LayerUnavailable(
                    f"the layer's index is gone from {self.layers_dir}; remove the image and "
                    "pull it again",
                    layer=name,
                )
            return self._attach(name)

    def mount_soon(self, name: str) -> None:
        """Attach and mount indexed layer ``name`` in the background unless it is.

        A failure is logged and left for :meth:`ensure_mounted`, which tries again and
        says why when a snapshot's mounts are asked for.
        """
        with contextlib.suppress(RuntimeError):  # shut down meanwhile
            self._attach_pool.submit(self._mount_in_background, name)

    def _mount_in_background(self, name: str) -> None:
        with self._mounting(name):
            if not (self.layer_dir(name) / LAYER_JSON).exists():
                return  # released meanwhile
            if self.server.is_running():
                # Its prefetch starts now, not once the kernel's first read arrives.
                try:
                    open_export(str(self.control_socket), name)
                except ControlError as e:
                    log.info("cannot open the export ahead", extra={"layer": name, "error": str(e)})
            try:
                self.ensure_mounted(name)
            except (LayerUnavailable, OSError) as e:
                log.warning(
                    "cannot mount a layer in the background; its next user tries again",
                    extra={"layer": name, "error": str(e)},
                )

    def release(self, name: str) -> bool:
        """Unmount, detach and delete layer ``name`` (hold :meth:`holding`); done or not.

        A layer that cannot be unmounted yet is left for a later :meth:`reconcile`.
        """
        return self._teardown(name)

    def attached(self) -> list[str]:
        """Names of the layers attached and mounted now."""
        names = []
        for name in self._names():
            att = self._attachment(name)
            if att is not None and is_mounted(att.mountpoint):
                names.append(name)
        return names

    def stats(self) -> dict[str, Any]:
        """The NBD server's statistics per layer and of its cache; empty when it is not running."""
        if not self.server.is_running():
            return {}
        return query_stats(str(self.control_socket))

    # -- resolving ahead -----------------------------------------------------------------

    def resolve_ahead(self, layer: RemoteLayer) -> None:
        """Prepare the image's later layers in the background, all at once.

        containerd prepares an image's layers one after another, each on its parent. So
        that a pull costs about one layer's setup rather than the sum, each later layer's
        footer and TOC are read, and it is indexed, attached and mounted, while the
        earlier Prepares run. Its own Prepare then only checks the TOC digest against
        the image's annotation (a layer whose TOC differs is not used; one no snapshot
        ever uses is released by the next reconcile).

        When the labels name the image's manifest (CRI's do: a pull by Kubernetes, which
        does not go through the daemon's pull), the first Prepare of the image also has
        what a container of it starts with fetched ahead (:meth:`fetch_start_ahead`), as
        a daemon pull does, once the image's config is in; the layer's own TOC is then
        read by the same background work, so that the fetch has it.
        """
        sources = {digest: sibling_source(layer, digest) for digest in layer.image_layers}
        start = self._first_prepare_of_image(layer)
        if start:
            sources = {layer.digest: layer.source, **sources}
        # The labels give the size of this layer's TOC tail only.
        self.read_ahead(sources, {layer.digest: layer.toc_tail} if layer.toc_tail else None)
        if start:
            self.fetch_start_ahead(
                [*reversed(layer.image_layers), layer.digest],
                functools.partial(self._image_process, layer),
            )

    def _first_prepare_of_image(self, layer: RemoteLayer) -> bool:
        """Whether ``layer``'s labels name its image's manifest, which no Prepare of this
        manager named before (remembered for the last :data:`MAX_STARTED_IMAGES`), with
        the prefetch setting on."""
        if layer.manifest is None or not self.server.config.prefetch:
            return False
        with self._lock:
            if layer.manifest in self._started_images:
                return False
            self._started_images[layer.manifest] = None
            while len(self._started_images) > MAX_STARTED_IMAGES:
                self._started_images.popitem(last=False)
        return True

    def _image_process(self, layer: RemoteLayer) -> ProcessConfig | None:
        """The process of the image whose manifest ``layer`` names, fetched from the
        layer's registry; None if the manifest does not list the layer and the later
        layers the labels gave (not the image the labels describe).

        Once the manifest is in, the prioritised files of those layers are preloaded
        where the manifest says they end (no label gives a layer's size, which that
        needs), unless a layer is open already; the config is fetched meanwhile."""
        spec = layer.source
        registry = self.sources.client(
            plain_http=bool(spec.get("plain_http")),
            hosts_dir=spec.get("hosts_dir"),
            docker_config=spec.get("docker_config"),
        )
        assert layer.manifest is not None
        ours = [layer.digest, *layer.image_layers]
        listed = False

        def on_manifest(manifest: Manifest) -> None:
            nonlocal listed
            digests = [d.digest for d in manifest.layers]
            at = next((i for i in range(len(digests)) if digests[i : i + len(ours)] == ours), None)
            if at is None:
                return
            listed = True
            preloads = {
                layer_name(d.digest): ({**sibling_source(layer, d.digest), "size": d.size}, end)
                for d in manifest.layers[at:]
                if d.annotations.get(TOC_DIGEST_LABEL)
                and (end := prefetch_end(d.annotations, d.size)) is not None
            }
            if preloads:
                self._preload(preloads)

        ref = Reference.parse(spec["ref"]).with_digest(layer.manifest)
        image = resolve_image(registry, ref, on_manifest=on_manifest)
        if not listed:
            log.warning(
                "the image's manifest does not list the layers of its Prepare's labels; "
                "nothing fetched ahead",
                extra={"manifest": layer.manifest, "layer": layer.digest},
            )
            return None
        return image.config.process

    def read_ahead(
        self,
        sources: Mapping[str, SourceSpec],
        tails: Mapping[str, int] | None = None,
        prefetch_ends: Mapping[str, int] | None = None,
    ) -> None:
        """Read the footer and TOC of each layer blob (digest -> source) in the
        background, then index, attach and mount it, unless that is under way or done.
        ``tails`` gives, by digest, how many bytes at a blob's end hold them, where known;
        ``prefetch_ends`` where its prioritised files end: with the prefetch setting,
        the NBD server starts reading them at once, while the TOC comes.

        A pull calls this as soon as it has the manifest, so that the reads overlap its
        other requests; containerd's Prepares then find the layers read or indexed.
        """
        self._start_server_soon()
        preloads: dict[str, tuple[SourceSpec, int]] = {}
        with self._lock:
            for digest, spec in sources.items():
                name = layer_name(digest)
                if name in self._ahead or (self.layer_dir(name) / LAYER_JSON).exists():
                    continue
                while len(self._ahead) >= MAX_AHEAD:
                    oldest = next(iter(self._ahead))
                    self._ahead.pop(oldest).cancel()
                tail = (tails or {}).get(digest)
                future = self._ahead_pool.submit(self._read_toc, name, spec, None, tail)
                future.add_done_callback(functools.partial(self._then_attach, name))
                self._ahead[name] = future
                end = (prefetch_ends or {}).get(digest)
                if end and self.server.config.prefetch:
                    preloads[name] = (spec, end)
        if preloads:
            threading.Thread(
                target=self._preload, args=(preloads,), name="preload", daemon=True
            ).start()

    def _preload(self, preloads: Mapping[str, tuple[SourceSpec, int]]) -> None:
        """Have the NBD server read each layer's prioritised region (name -> (source,
        end)) before the layer is indexed (``blockfs.image._preload``)."""
        try:
            self._ensure_server()
            for name, (spec, end) in preloads.items():
                if preload_export(str(self.control_socket), name, spec, end):
                    log.debug("preloading the prioritised files", extra={"layer": name, "end": end})
        except (ControlError, NBDServerError) as e:
            # The layer's prefetch fetches them once it is indexed, as without a preload.
            log.info("cannot preload the prioritised files", extra={"error": str(e)})

    def fetch_start_ahead(
        self,
        digests: Sequence[str],
        process: ProcessConfig | Callable[[], ProcessConfig | None],
    ) -> None:
        """Fetch, in the background, what a container of an image reads first: the
        executable it starts with (its Entrypoint and Cmd, looked up as ``execvp`` would
        in its layers; for a shell's ``-c SCRIPT``, the script's command too), the files
        its command line names, the dynamic loader it names and the libraries the loader
        opens for it, in whichever layers they are.

        ``digests`` are the image's layers, top first, whose footers and TOCs
        :meth:`read_ahead` is reading; ``process`` is the image's, or gives it once it is
        known (called in the background: it may wait for the config or fetch it; None or
        a registry error: nothing is fetched). The TOCs are taken now, while they are
        being read: a layer indexed meanwhile lets go of its own. Only the layers above
        the first whose TOC is not being read count (one indexed before, shared with
        another image): a file found in them is the one a container sees, whatever lies
        beneath. The files are found in those TOCs (no layer needs
        to be mounted), a layer that holds one is indexed if it is not yet, and the NBD
        server fetches each file as a container's first read of it would (one request
        for the file, its directory's files around it in the background) while the pull
        goes on. It answers with what the loader opens for the file, once its headers
        are in, and those files are fetched in turn. Without this, a container's first
        page faults wait for each of them in a chain, after runc has started. Nothing
        happens without the prefetch setting, or when a TOC was not read ahead.
        """
        if not self.server.config.prefetch:
            return
        futures: list[Future[_Resolved]] = []
        with self._lock:
            for digest in digests:
                future = self._ahead.get(layer_name(digest))
                if future is None:
                    break
                futures.append(future)
        if not futures:
            return
        names = [layer_name(d) for d in digests[: len(futures)]]
        # A thread of its own: it waits for the TOCs, and may fetch the image's config.
        threading.Thread(
            target=self._fetch_start,
            args=(names, futures, process),
            name="start-ahead",
            daemon=True,
        ).start()

    def _fetch_start(
        self,
        names: Sequence[str],
        futures: Sequence[Future[_Resolved]],
        process: ProcessConfig | Callable[[], ProcessConfig | None],
    ) -> None:
        if callable(process):
            try:
                fetched = process()
            except BlockfsError as e:
                log.info("cannot fetch the image's config to fetch ahead", extra={"error": str(e)})
                return
            if fetched is None:
                return
            process = fetched
        try:
            resolved = [f.result() for f in futures]
        except Exception:
            return  # the layer's own Prepare reads its TOC again and says why it fails
        tocs = [r.reader.toc for r in resolved]
        commands = find_commands(tocs, process)
        if not commands:
            log.debug("no command to fetch ahead", extra={"argv": list(process.argv)})
            return
        start = [(f, "command") for f in commands]
        start += [(f, "argument") for f in find_arguments(tocs, process) if f not in commands]
        seen = {(f.layer, f.entry.name) for f, _ in start}
        with ThreadPoolExecutor(AHEAD_WORKERS, thread_name_prefix="start-ahead-file") as pool:

            def submit(found: FoundFile, why: str) -> Future[LoaderNeeds | None]:
                layer = found.layer
                return pool.submit(
                    self._fetch_file_ahead, names[layer], resolved[layer], found, why
                )

            running = {submit(f, why) for f, why in start}
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    needs = future.result()
                    for found in [] if needs is None else find_loaded(tocs, needs):
                        key = (found.layer, found.entry.name)
                        if key not in seen and len(seen) < MAX_START_FILES:
                            seen.add(key)
                            running.add(submit(found, "loader"))

    def _fetch_file_ahead(
        self, name: str, resolved: _Resolved, found: FoundFile, why: str
    ) -> LoaderNeeds | None:
        """Have the NBD server fetch ``found`` of layer ``name`` ahead (indexing the layer
        first if need be); what the loader opens for it, None if nothing or unknown."""
        span = found.span
        if span is None:
            return None
        with self.holding(name):
            if not (self.layer_dir(name) / LAYER_JSON).exists():
                try:
                    self._write_index(name, resolved)
                except (LayerUnavailable, OSError):
                    self._teardown(name)
                    return None  # its own Prepare tries again and says why
        log.info(
            "fetching ahead",
            extra={"layer": name, "file": found.entry.name, "bytes": span[1] - span[0], "why": why},
        )
        try:
            self._ensure_server()
            # The command line's files as their first reads would have them; the
            # loader's alone, as the library fetch has them (their directory is not the
            # workload's).
            return fetch_ahead(str(self.control_socket), name, span[0], around=why != "loader")
        except (ControlError, NBDServerError) as e:
            log.info(
                "cannot fetch ahead",
                extra={"layer": name, "file": found.entry.name, "error": str(e)},
            )
            return None

    def _then_attach(self, name: str, toc: Future[_Resolved]) -> None:
        if toc.cancelled() or toc.exception() is not None:
            return  # its own Prepare reads the TOC again and says why it fails
        with contextlib.suppress(RuntimeError):  # shut down meanwhile
            self._index_pool.submit(self._index_ahead, name, toc)

    def _index_ahead(self, name: str, toc: Future[_Resolved]) -> None:
        """Index layer ``name`` from its TOC read ahead unless it is, then have it
        mounted in the background."""
        with self.holding(name):
            if not (self.layer_dir(name) / LAYER_JSON).exists():
                try:
                    self._write_index(name, toc.result())
                except (LayerUnavailable, OSError) as e:
                    # Its own Prepare tries again and falls back with the reason.
                    log.info("cannot index a layer ahead", extra={"layer": name, "error": str(e)})
                    self._teardown(name)
                    return
                log.info("layer indexed ahead", extra={"layer": name})
            # Indexed: its Prepare reads the index, and a large layer's parsed TOC is
            # hundreds of megabytes (a fetch ahead of the image's start holds its own).
            with self._lock:
                if self._ahead.get(name) is toc:
                    del self._ahead[name]
        # Not holding the layer: its Prepare, which only needs the index, goes on meanwhile.
        self.mount_soon(name)

    def _read_toc(
        self, name: str, spec: SourceSpec, toc_digest: str | None, tail: int | None = None
    ) -> _Resolved:
        source = CountingSource(self.sources.open(spec))
        try:
            reader = BlobReader.open(source, toc_digest=toc_digest, tail_size=tail)
        except BlockfsError as e:
            raise LayerUnavailable(
                f"cannot read the layer's footer and TOC: {e}", layer=name
            ) from e
        return _Resolved(reader, source.bytes_read, {**spec, "size": source.size})

    def _resolve(self, name: str, layer: RemoteLayer) -> _Resolved:
        with self._lock:
            ahead = self._ahead.pop(name, None)
        if ahead is not None:
            with contextlib.suppress(Exception):
                resolved = ahead.result()
                if resolved.reader.toc_digest == layer.toc_digest:
                    log.debug("using the footer and TOC resolved ahead", extra={"layer": name})
                    return resolved
        return self._read_toc(name, layer.source, layer.toc_digest, layer.toc_tail)

    # -- internals -----------------------------------------------------------------------

    def _index(self, name: str, layer: RemoteLayer) -> None:
        layer_dir = self.layer_dir(name)
        if (layer_dir / LAYER_JSON).exists():
            try:
                self._check_toc(name, layer.toc_digest)
                return
            except LayerUnavailable:
                # An index of other content under this blob digest cannot be right:
                # make it again, unless it is in use.
                if not self._teardown(name):
                    raise
        self._write_index(name, self._resolve(name, layer))

    def _write_index(self, name: str, resolved: _Resolved) -> None:
        self.layers_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            index_layer(
                resolved.reader,
                self.layer_dir(name),
                name=name,
                source=resolved.source,
                bytes_fetched=resolved.bytes_fetched,
            )
        except BlockfsError as e:
            raise LayerUnavailable(f"cannot index the layer: {e}", layer=name) from e
        log.info(
            "indexed layer",
            extra={
                "layer": name,
                "toc_digest": resolved.reader.toc_digest,
                "bytes_fetched": resolved.bytes_fetched,
                "blob_size": resolved.source.get("size"),
            },
        )

    def _check_toc(self, name: str, toc_digest: str) -> None:
        try:
            record = LayerRecord.load(self.layer_dir(name))
        except BlockfsError as e:
            raise LayerUnavailable(str(e), layer=name) from e
        if record.toc_digest != toc_digest:
            raise LayerUnavailable(
                f"the layer is indexed with TOC {record.toc_digest}, but the image says "
                f"{toc_digest}",
                layer=name,
            )

    def _attach(self, name: str) -> Path:
        stale = self._attachment(name)
        if stale is not None:
            self._undo(stale)
        try:
            mode = self._attach_mode()
            self._ensure_server()
        except (AttachError, NBDServerError) as e:
            raise LayerUnavailable(str(e), layer=name) from e
        mountpoint = self.mountpoint(name)
        mountpoint.mkdir(exist_ok=True)
        try:
            att = attach_and_mount(
                str(self.server.socket),
                name,
                str(mountpoint),
                state_dir=str(self._attach_dir(name)),
                mode=mode,
                connections=self.connections,
            )
        except AttachError as e:
            raise LayerUnavailable(f"cannot attach and mount the layer: {e}", layer=name) from e
        log.info(
            "mounted layer",
            extra={
                "layer": name,
                "mountpoint": att.mountpoint,
                "attach": att.mode.value,
                "mount_method": att.mount_method,
            },
        )
        return Path(att.mountpoint)

    def _attach_mode(self) -> AttachMode:
        with self._lock:
            if self._mode is None:
                self._mode = choose_mode(self.attach)
                log.info("layers are attached with %s", self._mode.value)
            return self._mode

    def _ensure_server(self) -> None:
        # A lock of its own: starting nbdkit takes a while, and nothing else needs to wait.
        with self._server_lock:
            if self.server.pid() is None:
                (self.root / CACHE_DIR).mkdir(parents=True, exist_ok=True, mode=0o700)
                pid = self.server.start()
                log.info("started the NBD server", extra={"pid": pid})

    def _attachment(self, name: str) -> Attachment | None:
        try:
            return read_attachment(str(self._attach_dir(name)))
        except AttachError as e:
            log.warning("unreadable attachment record", extra={"layer": name, "error": str(e)})
            return None

    @staticmethod
    def _healthy(att: Attachment) -> bool:
        """Mounted, and (nbdfuse) nbdfuse and its relay run and its file still answers."""
        if not is_mounted(att.mountpoint):
            return False
        if att.mode is AttachMode.NBDFUSE:
            if not backend_alive(att):
                return False
            try:
                os.stat(att.device)
            except OSError:
                return False
        return True

    def _undo(self, att: Attachment) -> bool:
        try:
            unmount_and_detach(att)
        except AttachError as e:
            log.warning(
                "cannot unmount and detach layer; leaving it for a later cleanup",
                extra={"layer": att.export, "error": str(e)},
            )
            return False
        return True

    def _teardown(self, name: str) -> bool:
        """Unmount, detach and delete layer ``name``; whether it is gone."""
        with self._mounting(name):
            att = self._attachment(name)
            if att is not None and not self._undo(att):
                return False
            if not self._remove_dir(name):
                return False
        if self.server.is_running():
            # The server keeps an opened export in memory until told it is gone.
            try:
                forget_export(str(self.control_socket), name)
            except ControlError as exc:
                log.warning("NBD server did not forget a released layer",
                            extra={"layer": name, "error": str(exc)})  # fmt: skip
        return True

    def _remove_dir(self, name: str) -> bool:
        path = self.layer_dir(name)
        mounted = mounts_under(path)
        if mounted:
            # rmtree would reach into whatever is mounted there.
            log.warning(
                "layer directory still has mounts; leaving it for a later cleanup",
                extra={"layer": name, "mounts": mounted},
            )
            return False
        shutil.rmtree(path, ignore_errors=True)
        return not path.exists()
