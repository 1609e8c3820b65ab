"""The NBD fixed-newstyle handshake client against real nbdkit, and against scripted bytes."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from attach_testkit import LAYER_EXPORT, ODD_EXPORT, ServedExports

from blockfs.host import _handshake


@pytest.fixture
def server_sock(nbd_server: ServedExports) -> Iterator[socket.socket]:
    sock = _handshake.connect_unix(nbd_server.socket)
    yield sock
    sock.close()


def test_handshake_returns_size_and_flags_of_served_export(
    server_sock: socket.socket, nbd_server: ServedExports
) -> None:
    info = _handshake.handshake(server_sock, LAYER_EXPORT)

    assert info.name == LAYER_EXPORT
    assert info.size == nbd_server.images[LAYER_EXPORT].stat().st_size
    assert info.transmission_flags & _handshake.NBD_FLAG_HAS_FLAGS
    assert info.read_only
    assert info.can_multi_conn


def test_raw_read_after_handshake_returns_image_bytes(
    server_sock: socket.socket, nbd_server: ServedExports
) -> None:
    _handshake.handshake(server_sock, LAYER_EXPORT)
    assert server_sock.gettimeout() is None  # blocking, as the kernel needs it

    # NBD_CMD_READ of 4096 bytes at 1024, packed by hand: magic, flags, type 0, cookie,
    # offset, length; then a 16-byte simple reply (magic, error, cookie) and the data.
    server_sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 0xC0FFEE, 1024, 4096))
    reply = _recv_exact(server_sock, 16 + 4096)

    assert struct.unpack(">IIQ", reply[:16]) == (0x67446698, 0, 0xC0FFEE)
    assert reply[16:] == nbd_server.images[LAYER_EXPORT].read_bytes()[1024 : 1024 + 4096]


def test_export_name_with_colon_slash_and_space_is_negotiated(
    server_sock: socket.socket, nbd_server: ServedExports
) -> None:
    info = _handshake.handshake(server_sock, ODD_EXPORT)

    assert info.name == ODD_EXPORT
    assert info.size == nbd_server.images[ODD_EXPORT].stat().st_size


def test_unknown_export_raises_export_not_found(server_sock: socket.socket) -> None:
    with pytest.raises(_handshake.ExportNotFoundError) as caught:
        _handshake.handshake(server_sock, "no-such-layer")

    assert caught.value.export == "no-such-layer"
    assert caught.value.reply == _handshake.NBD_REP_ERR_UNKNOWN
    assert "export not found" in str(caught.value)
    assert "no-such-layer" in str(caught.value)


def test_query_export_reports_the_same_info_as_go(nbd_server: ServedExports) -> None:
    queried = _handshake.query_export(nbd_server.socket, LAYER_EXPORT)
    with _handshake.connect_unix(nbd_server.socket) as sock:
        negotiated = _handshake.handshake(sock, LAYER_EXPORT)
        _handshake.disconnect(sock)

    assert queried == negotiated


def test_query_export_of_unknown_export_raises_export_not_found(nbd_server: ServedExports) -> None:
    with pytest.raises(_handshake.ExportNotFoundError):
        _handshake.query_export(nbd_server.socket, "no-such-layer")


# -- scripted servers: exact bytes on the other end of a socketpair ------------------------


@contextlib.contextmanager
def _scripted(server_bytes: bytes) -> Iterator[socket.socket]:
    """A client socket whose peer sends ``server_bytes``, reads everything, then closes."""
    client, server = socket.socketpair()

    def serve() -> None:
        # The client may hang up with script bytes unread: a reset is expected then.
        with server, contextlib.suppress(ConnectionError):
            server.sendall(server_bytes)
            server.shutdown(socket.SHUT_WR)
            while server.recv(4096):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield client
    finally:
        client.close()
        thread.join(5)


_GREETING = struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 0b11)


def _option_reply(reply_type: int, data: bytes) -> bytes:
    return (
        struct.pack(">QIII", 0x3E889045565A9, _handshake.NBD_OPT_GO, reply_type, len(data)) + data
    )


def test_scripted_server_info_and_block_size_are_parsed() -> None:
    script = (
        _GREETING
        + _option_reply(_handshake.NBD_REP_INFO, struct.pack(">HIII", 3, 512, 4096, 1 << 20))
        + _option_reply(_handshake.NBD_REP_INFO, struct.pack(">H", 2) + b"a description")
        + _option_reply(_handshake.NBD_REP_INFO, struct.pack(">HQH", 0, 8192, 0b11))
        + _option_reply(_handshake.NBD_REP_ACK, b"")
    )
    with _scripted(script) as sock:
        info = _handshake.handshake(sock, "x")

    assert info == _handshake.ExportInfo("x", 8192, 0b11, 512, 4096, 1 << 20)
    assert info.read_only
    assert not info.can_multi_conn


def test_error_reply_carries_the_server_message() -> None:
    script = _GREETING + _option_reply(_handshake.NBD_REP_ERR_TLS_REQD, b"TLS please")
    with _scripted(script) as sock, pytest.raises(_handshake.HandshakeError) as caught:
        _handshake.handshake(sock, "x")

    assert not isinstance(caught.value, _handshake.ExportNotFoundError)
    assert caught.value.reply == _handshake.NBD_REP_ERR_TLS_REQD
    assert "requires TLS" in str(caught.value)
    assert "TLS please" in str(caught.value)


def test_ack_without_export_info_is_refused() -> None:
    with (
        _scripted(_GREETING + _option_reply(_handshake.NBD_REP_ACK, b"")) as sock,
        pytest.raises(_handshake.HandshakeError, match="no export size"),
    ):
        _handshake.handshake(sock, "x")


def test_non_nbd_peer_is_refused() -> None:
    with (
        _scripted(b"HTTP/1.1 400 Bad Request\r\n\r\n") as sock,
        pytest.raises(_handshake.HandshakeError, match="not an NBD server"),
    ):
        _handshake.handshake(sock, "x")


def test_oldstyle_server_is_refused() -> None:
    oldstyle = struct.pack(">QQ", 0x4E42444D41474943, 0x00420281861253) + bytes(8 + 4 + 124)
    with _scripted(oldstyle) as sock, pytest.raises(_handshake.HandshakeError, match="oldstyle"):
        _handshake.handshake(sock, "x")


def test_server_closing_mid_handshake_is_a_handshake_error() -> None:
    with (
        _scripted(_GREETING) as sock,
        pytest.raises(_handshake.HandshakeError, match="closed the connection"),
    ):
        _handshake.handshake(sock, "x")


def test_client_sends_fixed_newstyle_flags_and_go_with_block_size_request() -> None:
    client, server = socket.socketpair()
    with client, server:
        server.sendall(_GREETING)
        server.shutdown(socket.SHUT_WR)
        with pytest.raises(_handshake.HandshakeError):
            _handshake.handshake(client, "ab")
        client.shutdown(socket.SHUT_WR)
        sent = _recv_all(server)

    expected = (
        struct.pack(">I", 0b11)  # fixed newstyle + no zeroes (the server offered both)
        + struct.pack(">QII", 0x49484156454F5054, 7, 4 + 2 + 2 + 2)  # NBD_OPT_GO
        + struct.pack(">I", 2) + b"ab"  # export name
        + struct.pack(">HH", 1, 3)  # one info request: NBD_INFO_BLOCK_SIZE
    )  # fmt: skip
    assert sent == expected


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "connection closed early"
        buf += chunk
    return buf


def _recv_all(sock: socket.socket) -> bytes:
    buf = b""
    while chunk := sock.recv(4096):
        buf += chunk
    return buf
