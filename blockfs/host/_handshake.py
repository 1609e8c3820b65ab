"""The client side of the NBD fixed-newstyle handshake, for sockets handed to the kernel.

The kernel's NBD driver only speaks the transmission phase, so userspace negotiates the
export on each connected socket first (NBD_OPT_GO) and then passes the socket on. Only
simple replies are negotiated: the kernel cannot parse structured replies.
"""

from __future__ import annotations

import socket
import struct

import attrs

from blockfs.errors import BlockfsError

# Magic numbers of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md).
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", also the option request magic
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

# Handshake flags (server) and client flags.
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# Transmission flags, sent by the server per export.
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8

# Options.
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_INFO = 6
NBD_OPT_GO = 7

# Option reply types; errors have bit 31 set.
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9

# Information types in NBD_REP_INFO replies.
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# Transmission commands.
NBD_CMD_READ = 0
NBD_CMD_DISC = 2

# Server greeting, 18 bytes: 0 NBDMAGIC, 8 IHAVEOPT, 16 handshake flags.
GREETING = struct.Struct(">QQH")
# Client flags, 4 bytes, sent once after the greeting.
CLIENT_FLAGS = struct.Struct(">I")
# Option request header, 16 bytes: 0 IHAVEOPT, 8 option, 12 data length.
OPTION_HEADER = struct.Struct(">QII")
# Option reply header, 20 bytes: 0 reply magic, 8 option, 12 reply type, 16 data length.
OPTION_REPLY_HEADER = struct.Struct(">QIII")
# NBD_INFO_EXPORT payload, 12 bytes: 0 info type, 2 export size, 10 transmission flags.
INFO_EXPORT = struct.Struct(">HQH")
# NBD_INFO_BLOCK_SIZE payload, 14 bytes: 0 info type, 2 minimum, 6 preferred, 10 maximum.
INFO_BLOCK_SIZE = struct.Struct(">HIII")
# Transmission request, 28 bytes: 0 magic, 4 command flags, 6 type, 8 cookie, 16 offset,
# 24 length.
REQUEST = struct.Struct(">IHHQQI")
# Simple reply, 16 bytes: 0 magic, 4 error (an NBD errno), 8 cookie.
SIMPLE_REPLY = struct.Struct(">IIQ")

# Option replies longer than this are refused rather than read into memory.
_MAX_REPLY_DATA = 64 * 1024
# NBD strings (export names, messages) may not exceed this many bytes.
_MAX_STRING = 4096

_ERROR_NAMES = {
    NBD_REP_ERR_UNSUP: "option not supported by the server",
    NBD_REP_ERR_POLICY: "refused by server policy",
    NBD_REP_ERR_INVALID: "invalid request",
    NBD_REP_ERR_PLATFORM: "not supported on the server's platform",
    NBD_REP_ERR_TLS_REQD: "the server requires TLS",
    NBD_REP_ERR_UNKNOWN: "export not found",
    NBD_REP_ERR_SHUTDOWN: "the server is shutting down",
    NBD_REP_ERR_BLOCK_SIZE_REQD: "the server requires block size negotiation",
    NBD_REP_ERR_TOO_BIG: "request or reply too large",
}


class HandshakeError(BlockfsError):
    """The NBD handshake failed: the server refused the export or broke the protocol.

    ``export`` is the export name asked for, ``reply`` the NBD_REP_ERR_* code when the
    server sent one.
    """

    def __init__(self, message: str, *, export: str, reply: int | None = None) -> None:
        super().__init__(message)
        self.export = export
        self.reply = reply

    def context(self) -> list[str]:
        return [f"export {self.export!r}"]


class ExportNotFoundError(HandshakeError):
    """The server does not serve an export of that name (NBD_REP_ERR_UNKNOWN)."""


@attrs.frozen
class ExportInfo:
    """What the server said about an export during the handshake."""

    name: str
    size: int
    transmission_flags: int
    block_size_min: int = 0
    block_size_preferred: int = 0
    block_size_max: int = 0

    @property
    def read_only(self) -> bool:
        return bool(self.transmission_flags & NBD_FLAG_READ_ONLY)

    @property
    def can_multi_conn(self) -> bool:
        """The server allows several connections to the same export to be used at once."""
        return bool(self.transmission_flags & NBD_FLAG_CAN_MULTI_CONN)


def connect_unix(path: str, *, timeout: float = 30.0) -> socket.socket:
    """A stream socket connected to the NBD server listening on the unix socket ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def handshake(sock: socket.socket, export: str, *, timeout: float = 30.0) -> ExportInfo:
    """Negotiate ``export`` with NBD_OPT_GO; the socket is then in the transmission phase.

    The socket is left blocking with no timeout, as the kernel expects it.
    """
    sock.settimeout(timeout)
    info = _negotiate(sock, export, NBD_OPT_GO)
    sock.settimeout(None)
    return info


def query_export(socket_path: str, export: str, *, timeout: float = 30.0) -> ExportInfo:
    """Ask the server at ``socket_path`` about ``export`` (NBD_OPT_INFO) without using it."""
    with connect_unix(socket_path, timeout=timeout) as sock:
        info = _negotiate(sock, export, NBD_OPT_INFO)
        # Leave politely; a server may log an abrupt close as an error.
        sock.sendall(OPTION_HEADER.pack(IHAVEOPT, NBD_OPT_ABORT, 0))
    return info


def disconnect(sock: socket.socket) -> None:
    """Send NBD_CMD_DISC on a socket in the transmission phase and close it."""
    try:
        sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, NBD_CMD_DISC, 0, 0, 0))
    except OSError:
        pass  # the server is gone already: nothing to say goodbye to
    finally:
        sock.close()


def _negotiate(sock: socket.socket, export: str, option: int) -> ExportInfo:
    try:
        return _negotiate_unchecked(sock, export, option)
    except TimeoutError:
        raise HandshakeError("timed out waiting for the NBD server", export=export) from None
    except OSError as e:
        raise HandshakeError(f"NBD connection failed: {e.strerror or e}", export=export) from e


def _negotiate_unchecked(sock: socket.socket, export: str, option: int) -> ExportInfo:
    name = export.encode()
    if len(name) > _MAX_STRING:
        raise HandshakeError("export name longer than 4096 bytes", export=export)
    greeting = _recv_exact(sock, GREETING.size, export)
    magic, opt_magic, server_flags = GREETING.unpack(greeting)
    if magic != NBDMAGIC:
        raise HandshakeError("not an NBD server (bad greeting magic)", export=export)
    if opt_magic != IHAVEOPT:
        raise HandshakeError(
            "the server speaks oldstyle NBD; newstyle with export names is required",
            export=export,
        )
    if not server_flags & NBD_FLAG_FIXED_NEWSTYLE:
        raise HandshakeError("the server does not speak fixed newstyle NBD", export=export)
    client_flags = NBD_FLAG_C_FIXED_NEWSTYLE
    if server_flags & NBD_FLAG_NO_ZEROES:
        client_flags |= NBD_FLAG_C_NO_ZEROES
    # Option data: 0 name length, 4 name, then the number of info requests and the list.
    data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, NBD_INFO_BLOCK_SIZE)
    sock.sendall(
        CLIENT_FLAGS.pack(client_flags) + OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data
    )
    return _read_info_replies(sock, export, option)


def _read_info_replies(sock: socket.socket, export: str, option: int) -> ExportInfo:
    size: int | None = None
    flags = 0
    block_sizes = (0, 0, 0)
    while True:
        header = _recv_exact(sock, OPTION_REPLY_HEADER.size, export)
        magic, replied_option, reply, length = OPTION_REPLY_HEADER.unpack(header)
        if magic != OPTION_REPLY_MAGIC or replied_option != option:
            raise HandshakeError("malformed option reply from the server", export=export)
        if length > _MAX_REPLY_DATA:
            raise HandshakeError(f"option reply of {length} bytes is too large", export=export)
        payload = _recv_exact(sock, length, export)
        if reply & NBD_REP_FLAG_ERROR:
            raise _reply_error(reply, payload, export)
        if reply == NBD_REP_ACK:
            if size is None:
                raise HandshakeError("the server sent no export size", export=export)
            return ExportInfo(export, size, flags, *block_sizes)
        if reply != NBD_REP_INFO:
            raise HandshakeError(f"unexpected option reply type {reply}", export=export)
        if len(payload) < 2:
            raise HandshakeError("truncated NBD_REP_INFO reply", export=export)
        (info_type,) = struct.unpack_from(">H", payload)
        if info_type == NBD_INFO_EXPORT:
            if len(payload) != INFO_EXPORT.size:
                raise HandshakeError("malformed NBD_INFO_EXPORT reply", export=export)
            _, size, flags = INFO_EXPORT.unpack(payload)
        elif info_type == NBD_INFO_BLOCK_SIZE:
            if len(payload) != INFO_BLOCK_SIZE.size:
                raise HandshakeError("malformed NBD_INFO_BLOCK_SIZE reply", export=export)
            _, *sizes = INFO_BLOCK_SIZE.unpack(payload)
            block_sizes = (sizes[0], sizes[1], sizes[2])
        # Other information types (name, description) are optional and ignored.


def _reply_error(reply: int, payload: bytes, export: str) -> HandshakeError:
    what = _ERROR_NAMES.get(reply, f"error reply {reply & ~NBD_REP_FLAG_ERROR}")
    detail = payload.decode(errors="replace").strip()
    message = f"NBD server refused the export: {what}" + (f": {detail}" if detail else "")
    if reply == NBD_REP_ERR_UNKNOWN:
        return ExportNotFoundError(message, export=export, reply=reply)
    return HandshakeError(message, export=export, reply=reply)


def _recv_exact(sock: socket.socket, n: int, export: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise HandshakeError(
                "the NBD server closed the connection during the handshake", export=export
            )
        buf += chunk
    return bytes(buf)
