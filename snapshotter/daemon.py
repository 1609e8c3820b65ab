"""``blockfs-snapshotter``: the containerd proxy snapshotter daemon.

It serves containerd's Snapshots API on a unix socket until SIGTERM or SIGINT, then stops
taking calls, lets running ones finish and exits. Mounts handed to containerd belong to
containerd and the kernel, so stopping the daemon never disturbs a running container.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from blockfs.errors import BlockfsError
from blockfs.host.overlay import overlay_index_off_supported
from blockfs.image import docker_config_path
from blockfs.registry import warm_up as warm_up_registry
from snapshotter import ctrclient
from snapshotter._jsonlog import setup_json_logging
from snapshotter.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    SnapshotterConfig,
    add_config_flags,
    flag_overrides,
    load_config,
)
from snapshotter.layers import SERVER_CHECK_INTERVAL, LayerManager
from snapshotter.metrics import MetricsServer
from snapshotter.pullserver import PullServer
from snapshotter.remote import RegistrySettings
from snapshotter.service import SnapshotsService, start_server
from snapshotter.store import SnapshotStore

log = logging.getLogger("snapshotter")

# How long running calls may take to finish after SIGTERM.
STOP_GRACE_SECONDS = 10.0
# The longest wait between attempts to restart an NBD server that will not start.
SERVER_RETRY_MAX = 30.0


def build_parser() -> argparse.ArgumentParser:
    """The command line; every flag but --config overrides the configuration file."""
    p = argparse.ArgumentParser(
        prog="blockfs-snapshotter",
        description="containerd proxy snapshotter that pulls eStargz images lazily",
    )
    p.add_argument(
        "--config",
        help=f"TOML configuration file (default: {DEFAULT_CONFIG_PATH} when it exists)",
    )
    add_config_flags(p)
    return p


def config_from_args(args: argparse.Namespace) -> SnapshotterConfig:
    """The configuration file named by ``args`` with the flags applied on top."""
    return load_config(args.config, flag_overrides(args))


def notify_systemd(state: str) -> None:
    """Tell systemd ``state`` (READY=1, STOPPING=1) when it started us with Type=notify."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):  # abstract socket namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto(state.encode(), address)
        except OSError as e:
            log.warning("cannot notify systemd", extra={"state": state, "error": str(e)})


def watch_nbd_server(
    layers: LayerManager, stop: threading.Event, interval: float = SERVER_CHECK_INTERVAL
) -> None:
    """Until ``stop`` is set, restart the NBD server whenever it dies under attached layers.

    A restart that fails is tried again after a wait that doubles each time, up to
    :data:`SERVER_RETRY_MAX` seconds.
    """
    wait = interval
    while not stop.wait(wait):
        try:
            layers.revive_server()
        except BlockfsError as e:
            wait = min(wait * 2, SERVER_RETRY_MAX)
            log.error(
                "cannot restart the NBD server; trying again",
                extra={"error": str(e), "retry_seconds": wait},
            )
        else:
            wait = interval


def _warm_up() -> None:
    """What the first pull would load from a cold page cache: the system's CA
    certificates, the HTTP client's and gRPC's client code. Then what the daemon has
    made so far (its modules, most of its objects) is kept out of the garbage
    collector's full passes, which would otherwise walk all of it, 20 to 30 ms with
    every thread stopped, in the middle of a pull."""
    warm_up_registry()
    ctrclient.warm_up()
    gc.freeze()
    log.info("loaded the code of a pull")


def run(config: SnapshotterConfig, stop: threading.Event) -> None:
    """Serve until ``stop`` is set; then stop the server and close the store.

    The NBD server and the layer mounts are left running when the daemon stops, for the
    containers that use them; the next daemon adopts them.
    """
    index_off = overlay_index_off_supported()
    layers = LayerManager(
        config.root,
        attach=config.attach,
        cache_size=config.cache_size,
        prefetch=config.prefetch,
        background_fetch=config.background_fetch,
    )
    store = SnapshotStore(config.root, layer_mountpoint=layers.mountpoint)
    metrics: MetricsServer | None = None
    try:
        removed = store.cleanup()
        if removed:
            log.info("removed orphan snapshot directories", extra={"directories": removed})
        layers.start(store.layer_in_use)
        registry = RegistrySettings(hosts_dir=config.hosts_dir, docker_config=docker_config_path())
        service = SnapshotsService(store, index_off=index_off, layers=layers, registry=registry)
        if config.metrics_address:
            metrics = MetricsServer(config.metrics_address, layers)
            log.info("serving metrics", extra={"address": metrics.address})
        server = start_server(service, config.socket)
        watchdog = threading.Thread(
            target=watch_nbd_server, args=(layers, stop), name="nbd-watchdog", daemon=True
        )
        watchdog.start()
        pulls: PullServer | None = None
        try:
            pulls = PullServer(config.pull_socket, registry, layers)
            threading.Thread(target=_warm_up, name="warm-up", daemon=True).start()
            log.info(
                "serving containerd snapshots API",
                extra={
                    "address": str(config.socket),
                    "pull_socket": str(config.pull_socket),
                    "root": str(config.root),
                    "pid": os.getpid(),
                    "overlay_index_off": index_off,
                },
            )
            notify_systemd("READY=1")
            stop.wait()
            notify_systemd("STOPPING=1")
            log.info("stopping")
        finally:
            stop.set()  # also when leaving by an exception: the watchdog must end first
            watchdog.join()
            if pulls is not None:
                pulls.close()
            server.stop(STOP_GRACE_SECONDS).wait()
            config.socket.unlink(missing_ok=True)
    finally:
        if metrics is not None:
            metrics.close()
        layers.close()
        store.close()
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``blockfs-snapshotter``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as e:
        print(f"blockfs-snapshotter: {e}", file=sys.stderr)
        return 2
    setup_json_logging(config.log_level)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received signal", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # kill -USR1 writes every thread's stack to stderr (the log), for a daemon that hangs.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        run(config, stop)
    except BlockfsError as e:
        log.error("cannot serve: %s", e, extra={"error_type": type(e).__name__})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
