"""The VM test's host side: prepare the guest, boot it for each scenario, judge.

Two scenarios, each a boot of Debian's kernel:

- ``attach``: the guest runs blockfs's attach code (blockfs.host.attach) against the
  host's NBD server, reached over virtio-serial; the host stops and restarts the server
  when the guest asks (tools/vmtest/guest.py);
- ``snapshotter``: the guest runs the host's own userland (shared read-only over
  virtio-9p) and in it containerd, blockfs-snapshotter and a registry; the host only
  prepares the image (tools/vmtest/guest_snapshotter.py).

The guest does the checking; the host turns what it reports into PASS or FAIL. The
process exits 0 only if every scenario passed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import attrs

from tools.debs import DebError
from tools.vmtest import _host, _image, _qemu, _wire
from tools.vmtest._errors import VMTestError
from tools.vmtest._initramfs import HOST_ROOT_TAG, WORK_TAG, GuestImage, prepare_guest

PROJECT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = PROJECT / ".cache" / "vm"
DEFAULT_TIMEOUT = 540.0
# NBD connections the guest can open at once: the attach code's default of 4, plus spares
# for connections still draining after a failed handshake.
NBD_PORTS = 6
_BOOT_TIMEOUT = 300.0
SCENARIOS = ("attach", "snapshotter")


@attrs.frozen
class Options:
    """What ``tools/vm-test``'s command line sets; ``layer`` (the attach scenario's) None
    is the reference vector."""

    accel: str = "auto"
    timeout: float = DEFAULT_TIMEOUT
    cache_dir: Path = DEFAULT_CACHE
    work_dir: Path | None = None
    keep: bool = False
    layer: _host.LayerSpec | None = None
    scenarios: tuple[str, ...] = SCENARIOS


class Log:
    """Timestamped host lines and the guest console, on stdout."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self._lock = threading.Lock()

    def host(self, message: str) -> None:
        with self._lock:
            print(f"[host  {time.monotonic() - self.start:6.1f}] {message}", flush=True)

    def guest_console(self, line: str) -> None:
        with self._lock:
            print(f"  | {line}", flush=True)


class Verdict:
    """What happened, as far as the host can tell."""

    def __init__(self, expected_events: list[str]) -> None:
        self.expected_events = expected_events
        self.events: list[str] = []
        self.result: dict[str, Any] | None = None
        self.problem: str | None = None

    @property
    def passed(self) -> bool:
        return (
            self.problem is None
            and self.result is not None
            and self.result.get("passed") is True
            and self.events == self.expected_events
        )

    def reason(self) -> str:
        if self.problem is not None:
            return self.problem
        if self.result is None:
            return "the guest reported no result"
        if not self.result.get("passed"):
            return f"the guest reported a failure: {self.result.get('reason')}"
        return f"unexpected sequence of guest requests: {self.events}"


def _read_console(stream: Any, log: Log) -> None:
    for raw in iter(stream.readline, b""):
        log.guest_console(raw.decode(errors="replace").rstrip("\r\n"))


def run(options: Options) -> int:
    """Run the VM test's scenarios; 0 if every one passed, 1 otherwise."""
    log = Log()
    work = options.work_dir or Path(tempfile.mkdtemp(prefix="blockfs-vm-"))
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + options.timeout
    failures: list[str] = []
    try:
        guest = prepare_guest(options.cache_dir, work / "guest", PROJECT, log.host)
        accel, why = _qemu.choose_accel(options.accel, guest.kernel.vmlinuz, options.cache_dir)
        log.host(f"accelerator: {why}")
        log.host(f"initramfs: {guest.initrd} ({guest.initrd.stat().st_size} bytes)")
        for name in options.scenarios:
            log.host(f"== scenario {name}: {_SCENARIOS[name].__doc__}")
            scenario = Scenario(options, guest, accel, work / name, log, deadline)
            verdict = scenario.run(_SCENARIOS[name])
            if verdict.passed:
                log.host(f"scenario {name}: PASS")
            else:
                failures.append(f"{name}: {verdict.reason()}")
                log.host(f"scenario {name}: FAIL: {verdict.reason()}")
    except (VMTestError, DebError) as e:
        failures.append(str(e))
    except (Terminated, KeyboardInterrupt) as e:
        failures.append(f"interrupted ({e or 'SIGINT'}); qemu and the NBD server were stopped")
    finally:
        if options.work_dir is None and not options.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif options.keep:
            log.host(f"kept the work directory {work}")
    elapsed = time.monotonic() - log.start
    if not failures:
        log.host(f"{_wire.PASS_LINE} in {elapsed:.0f} s ({', '.join(options.scenarios)})")
        return 0
    log.host(f"{_wire.FAIL_LINE} after {elapsed:.0f} s: {'; '.join(failures)}")
    return 1


# A message from the guest -> the reply to send it.
Handler = Callable[[dict[str, Any]], bytes]


@attrs.define
class Scenario:
    """One boot of the guest: what the host prepares, serves and answers for a scenario."""

    options: Options
    guest: GuestImage
    accel: _qemu.Accel
    work: Path
    log: Log
    deadline: float
    verdict: Verdict = attrs.field(factory=lambda: Verdict([]))

    def run(self, body: Callable[[Scenario], None]) -> Verdict:
        """Run ``body`` (which boots the guest with :meth:`boot`), turning errors into a verdict."""
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            body(self)
        except (VMTestError, DebError) as e:
            self.verdict.problem = str(e)
        except (Terminated, KeyboardInterrupt):
            raise
        except Exception as e:
            traceback.print_exc(file=sys.stdout)
            self.verdict.problem = f"{type(e).__name__}: {e}"
        return self.verdict

    def boot(
        self,
        config: dict[str, Any],
        handlers: dict[str, Handler],
        *,
        nbd_socket: Path | None = None,
        shares: tuple[_qemu.Share, ...] = (),
        append: str = "",
        memory_mib: int = 1024,
    ) -> None:
        """Boot the guest, send it ``config`` when it says hello, answer its requests with
        ``handlers`` until it reports a result, and make sure qemu is gone afterwards."""
        self.verdict.expected_events = ["hello", *handlers, "result"]
        control_path = self.work / "control.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        machine: _qemu.Machine | None = None
        try:
            listener.bind(str(control_path))
            listener.listen(1)
            machine_config = _qemu.MachineConfig(
                kernel=self.guest.kernel.vmlinuz,
                initrd=self.guest.initrd,
                accel=self.accel,
                control_socket=control_path,
                nbd_socket=nbd_socket,
                nbd_ports=NBD_PORTS if nbd_socket is not None else 0,
                shares=shares,
                append=append,
                memory_mib=memory_mib,
            )
            argv = _qemu.command(machine_config)
            self.log.host("booting: " + shlex.join(argv))
            machine = _qemu.Machine(argv)
            console = threading.Thread(
                target=_read_console, args=(machine.proc.stdout, self.log), daemon=True
            )
            console.start()
            boot_deadline = min(self.deadline, time.monotonic() + _BOOT_TIMEOUT)
            conn = _accept(listener, machine, boot_deadline)
            if conn is None:
                self.verdict.problem = "qemu never connected to the control socket"
            else:
                with conn:
                    self._converse(conn, machine, config, handlers, boot_deadline)
            # The guest powers off after reporting; give it a moment before pulling the plug.
            with contextlib.suppress(Exception):
                machine.proc.wait(max(1.0, min(30.0, self.deadline - time.monotonic())))
            machine.stop()
            console.join(5)
        finally:
            if machine is not None:
                machine.stop()
            listener.close()

    def _converse(
        self,
        conn: socket.socket,
        machine: _qemu.Machine,
        config: dict[str, Any],
        handlers: dict[str, Handler],
        boot_deadline: float,
    ) -> None:
        """Answer the guest's requests until it reports its result."""
        verdict = self.verdict
        reader = _wire.LineReader()
        while True:
            if not verdict.events and time.monotonic() > boot_deadline:
                verdict.problem = "the guest did not say hello: it did not boot, or /init failed"
                return
            if time.monotonic() > self.deadline:
                verdict.problem = "timed out waiting for the guest"
                return
            if machine.proc.poll() is not None:
                verdict.problem = f"qemu exited ({machine.proc.returncode}) before a result"
                return
            ready, _, _ = select.select([conn], [], [], 0.5)
            if not ready:
                continue
            data = conn.recv(65536)
            if not data:
                verdict.problem = "the guest closed the control port before a result"
                return
            for line in reader.feed(data):
                message = _wire.decode(line)
                kind = message["kind"]
                verdict.events.append(kind)
                if kind == "hello":
                    self.log.host(f"guest says hello from Linux {message.get('kernel')}")
                    conn.sendall(_wire.encode("config", **config))
                elif kind == "result":
                    verdict.result = message
                    return
                elif kind in handlers:
                    conn.sendall(handlers[kind](message))
                else:
                    verdict.problem = f"unknown request from the guest: {message!r}"
                    return


def attach_scenario(scenario: Scenario) -> None:
    """blockfs's attach code on /dev/nbd0 against the host's NBD server, which restarts"""
    options, log, work = scenario.options, scenario.log, scenario.work
    spec = options.layer or _host.LayerSpec.from_vectors(_host.default_vectors())
    export = _host.index(spec, work / "layers")
    expected = _host.expected_contents(spec.source_tar)
    log.host(
        f"layer: {spec.blob.name} indexed as export {export}; "
        f"{len(expected.files)} files expected from {spec.source_tar.name}"
    )
    server = _host.make_server(work)
    try:
        nbdkit_pid = server.start()
        log.host(f"NBD server started: nbdkit pid {nbdkit_pid}, socket {server.socket}")

        def stop_server(message: dict[str, Any]) -> bytes:
            server.stop()
            log.host("NBD server stopped (the guest's filesystem stays mounted)")
            return _wire.encode("server-stopped")

        def start_server(message: dict[str, Any]) -> bytes:
            pid = server.start()
            log.host(f"NBD server restarted: nbdkit pid {pid} on the same socket")
            return _wire.encode("server-started")

        scenario.boot(
            guest_config(export, expected),
            {"stop-server": stop_server, "start-server": start_server},
            nbd_socket=server.socket,
        )
    finally:
        server.stop()
        if not scenario.verdict.passed:
            log.host(f"the NBD server's log ends with:\n{server.log_tail()}")


def snapshotter_scenario(scenario: Scenario) -> None:
    """containerd and blockfs-snapshotter in the guest, on /dev/nbdN, through crashes"""
    work = scenario.work
    image = _image.prepare_image(work, scenario.log.host)
    config = {
        "registry_dir": str(image.registry_dir),
        "repository": image.repository,
        "layers": image.layers,
        "expected": image.expected.files,
    }
    shares = (
        _qemu.Share(HOST_ROOT_TAG, Path("/"), readonly=True),
        _qemu.Share(WORK_TAG, work, readonly=False),
    )
    for path in (PROJECT, work):
        if any(c.isspace() for c in str(path)):
            raise VMTestError(f"{path}: the kernel command line cannot pass a path with spaces")
    append = f"blockfs.scenario=snapshotter blockfs.project={PROJECT} blockfs.work={work}"
    scenario.boot(config, {}, shares=shares, append=append, memory_mib=2048)


def guest_config(export: str, expected: _host.Expected) -> dict[str, Any]:
    """The guest's instructions: which export, which checksums, what to read when."""
    # Read while the server is down: the two largest files, which span many chunks and
    # are left unread by the first pass.
    by_size = sorted(expected.files, key=lambda p: (-expected.sizes[p], p))
    return {
        "export": export,
        "expected": expected.files,
        "whiteouts": list(expected.whiteouts),
        "read_while_down": by_size[:2],
        "nbd_ports": NBD_PORTS,
    }


def _accept(
    listener: socket.socket, machine: _qemu.Machine, deadline: float
) -> socket.socket | None:
    listener.settimeout(0.5)
    while time.monotonic() < deadline and machine.proc.poll() is None:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.setblocking(True)
        return conn
    return None


_SCENARIOS: dict[str, Callable[[Scenario], None]] = {
    "attach": attach_scenario,
    "snapshotter": snapshotter_scenario,
}


class Terminated(Exception):
    """The harness got SIGTERM."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into an exception, so that qemu and the server are stopped on the way out.
    raise Terminated(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/vm-test",
        description="Boot Debian's kernel under qemu and test blockfs on the kernel NBD path: "
        "its attach code, then containerd with blockfs-snapshotter.",
    )
    parser.add_argument(
        "--accel", choices=["auto", "kvm", "tcg"],
        default=os.environ.get("BLOCKFS_VM_ACCEL", "auto"),
        help="qemu accelerator (default: KVM when /dev/kvm works, else TCG; env BLOCKFS_VM_ACCEL)",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
        help=f"give up after this many seconds (default {DEFAULT_TIMEOUT:.0f})",
    )  # fmt: skip
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(os.environ.get("BLOCKFS_VM_CACHE", DEFAULT_CACHE)),
        metavar="DIR", help="Debian packages, kernel and base initramfs (default .cache/vm)",
    )  # fmt: skip
    parser.add_argument(
        "--work-dir", type=Path, metavar="DIR",
        help="where the run's files go (default: a temporary directory, removed afterwards)",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    parser.add_argument(
        "--scenario", action="append", choices=SCENARIOS, dest="scenarios",
        help="run only this scenario (repeatable; default: all, in the order "
        f"{', '.join(SCENARIOS)})",
    )  # fmt: skip
    parser.add_argument("--blob", type=Path, help="eStargz blob to serve (default: test vector)")
    parser.add_argument("--toc-digest", help="the blob's TOC digest")
    parser.add_argument("--source-tar", type=Path, help="the tar the blob was made from")
    args = parser.parse_args(argv)
    layer = None
    if args.blob is not None:
        if args.source_tar is None:
            parser.error("--blob needs --source-tar (where the expected checksums come from)")
        layer = _host.LayerSpec(args.blob, args.toc_digest, args.source_tar)
    signal.signal(signal.SIGTERM, _terminate)
    options = Options(
        accel=args.accel,
        timeout=args.timeout,
        cache_dir=args.cache_dir,
        work_dir=args.work_dir,
        keep=args.keep,
        layer=layer,
        scenarios=tuple(args.scenarios or SCENARIOS),
    )
    return run(options)


if __name__ == "__main__":
    sys.exit(main())
