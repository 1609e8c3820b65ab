"""Guest side of the NBD transport: a unix socket relayed to virtio-serial ports.

The guest has no network. Each virtio-serial port named ``blockfs.nbd.N`` is a qemu
chardev connected to the host's NBD server socket, i.e. one NBD connection. The kernel
NBD driver needs a real socket, and blockfs's attach code connects to a unix socket path,
so this relay listens on a unix socket and pairs each accepted connection with a free
port, copying bytes both ways.

When the host server goes away, qemu marks the port's host side closed (reads return end
of file, poll reports POLLHUP); the relay then closes the paired connection, which is what
the kernel sees as a dead NBD connection. qemu reconnects the chardev to the restarted
server by itself (``reconnect=1``); the server's greeting waits on the host side until
the relay opens the port for the next connection.

A port whose connection ended from the guest side (an NBD disconnect) is kept open and
drained until the host side closes too, so that the next connection on it starts fresh.
Runs in the guest: standard library only.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading

_CHUNK = 256 * 1024
# Bytes buffered per direction before the relay stops reading from that side.
_BUFFER_LIMIT = 4 * 1024 * 1024
_ACCEPT_POLL = 0.5


def find_ports(prefix: str) -> list[tuple[str, str]]:
    """(port name, /dev path) of every virtio-serial port whose name starts with ``prefix``."""
    base = "/sys/class/virtio-ports"
    found = []
    for entry in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        try:
            with open(os.path.join(base, entry, "name"), encoding="utf-8") as f:
                name = f.read().strip()
        except OSError:
            continue
        if name.startswith(prefix):
            found.append((name, f"/dev/{entry}"))
    return sorted(found)


class Relay:
    """Listens on ``path`` and relays each connection to one of ``ports`` (device paths)."""

    def __init__(self, path: str, ports: list[str]) -> None:
        self.path = path
        self._ports = list(ports)
        self._busy: set[str] = set()
        self._lock = threading.Condition()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.sessions_started = 0

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(16)
        listener.settimeout(_ACCEPT_POLL)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept_loop, name="relay-accept", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        if self._listener is not None:
            self._listener.close()

    def busy_ports(self) -> int:
        """How many ports are carrying (or draining) a connection."""
        with self._lock:
            return len(self._busy)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no port carries a connection; False if that took longer than ``timeout``."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._busy, timeout)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            port = self._claim_port()
            if port is None:
                client.close()  # no free port: the client sees the server hang up
                continue
            self.sessions_started += 1
            threading.Thread(
                target=self._session, args=(client, port), name=f"relay {port}", daemon=True
            ).start()

    def _claim_port(self) -> str | None:
        with self._lock:
            for port in self._ports:
                if port not in self._busy:
                    self._busy.add(port)
                    return port
        return None

    def _release_port(self, port: str) -> None:
        with self._lock:
            self._busy.discard(port)
            self._lock.notify_all()

    def _session(self, client: socket.socket, port: str) -> None:
        fd = -1
        try:
            fd = os.open(port, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            client.setblocking(False)
            ended_by_guest = _pump(client, fd)
            client.close()
            if ended_by_guest:
                _drain_until_host_closes(fd)
        except OSError:
            pass  # the port vanished or failed: the connection ends, which the client sees
        finally:
            client.close()
            if fd >= 0:
                os.close(fd)
            self._release_port(port)


def _pump(client: socket.socket, port: int) -> bool:
    """Copy bytes both ways until one side ends; True if the guest side (client) ended first.

    A virtio-serial port reports POLLHUP (and reads return b"") while the host side is
    closed; writes to it would block until the host reconnects, so the port is used
    non-blocking and only written when poll says it is writable.
    """
    to_port = bytearray()
    to_client = bytearray()
    client_done = False
    poller = select.poll()
    while True:
        client_events = 0
        if not client_done and len(to_port) < _BUFFER_LIMIT:
            client_events |= select.POLLIN
        if to_client:
            client_events |= select.POLLOUT
        port_events = 0
        if len(to_client) < _BUFFER_LIMIT:
            port_events |= select.POLLIN
        if to_port:
            port_events |= select.POLLOUT
        if client_done and not to_port:
            return True
        poller.register(client.fileno(), client_events)
        poller.register(port, port_events)
        for fd, events in poller.poll():
            if fd == port:
                if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    data = _read(port)
                    if data == b"":
                        return False  # the host side closed: the server went away
                    if data:
                        to_client += data
                if events & select.POLLOUT and to_port:
                    written = _write(port, to_port)
                    del to_port[:written]
            else:
                if events & select.POLLOUT and to_client:
                    try:
                        sent = client.send(to_client)
                    except BlockingIOError:
                        sent = 0
                    except OSError:
                        return True  # the client is gone
                    del to_client[:sent]
                if events & (select.POLLIN | select.POLLHUP | select.POLLERR) and not client_done:
                    try:
                        data = client.recv(_CHUNK)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if data:
                        to_port += data
                    else:
                        client_done = True


def _read(fd: int) -> bytes | None:
    """Bytes from the port, b"" at end of file, None when nothing has arrived yet."""
    try:
        return os.read(fd, _CHUNK)
    except BlockingIOError:
        return None


def _write(fd: int, data: bytearray) -> int:
    try:
        return os.write(fd, data[:_CHUNK])
    except BlockingIOError:
        return 0


def _drain_until_host_closes(fd: int) -> None:
    """Read and discard until the host side closes (the server ended this connection)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        poller.poll()
        try:
            if not os.read(fd, _CHUNK):
                return
        except BlockingIOError:
            continue
