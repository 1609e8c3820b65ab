"""A generic-netlink client for the kernel NBD driver (family "nbd"), on raw sockets.

nbd-client cannot set the dead-connection timeout that lets a device survive a server
restart, so blockfs configures /dev/nbdN itself: NBD_CMD_CONNECT, NBD_CMD_RECONFIGURE,
NBD_CMD_DISCONNECT and NBD_CMD_STATUS. Numbers come from Linux's
include/uapi/linux/netlink.h, genetlink.h and nbd-netlink.h.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable, Sequence

import attrs

from blockfs.errors import BlockfsError

NETLINK_GENERIC = 16

# struct nlmsghdr flags and the control message types.
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLMSG_NOOP = 0x1
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3

# The generic netlink controller, which maps family names to ids.
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
CTRL_VERSION = 2

# nlattr type flags; the rest of the 16-bit type field is the attribute number.
NLA_F_NESTED = 1 << 15
NLA_F_NET_BYTEORDER = 1 << 14
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF

# include/uapi/linux/nbd-netlink.h
NBD_GENL_FAMILY_NAME = "nbd"
NBD_GENL_VERSION = 1

NBD_ATTR_INDEX = 1  # u32
NBD_ATTR_SIZE_BYTES = 2  # u64
NBD_ATTR_BLOCK_SIZE_BYTES = 3  # u64
NBD_ATTR_TIMEOUT = 4  # u64, seconds
NBD_ATTR_SERVER_FLAGS = 5  # u64, the NBD transmission flags
NBD_ATTR_CLIENT_FLAGS = 6  # u64, NBD_CFLAG_*
NBD_ATTR_SOCKETS = 7  # nested: NBD_SOCK_ITEM { NBD_SOCK_FD }
NBD_ATTR_DEAD_CONN_TIMEOUT = 8  # u64, seconds
NBD_ATTR_DEVICE_LIST = 9  # nested: NBD_DEVICE_ITEM { NBD_DEVICE_INDEX, NBD_DEVICE_CONNECTED }
NBD_ATTR_BACKEND_IDENTIFIER = 10  # string

NBD_DEVICE_ITEM = 1
NBD_DEVICE_INDEX = 1  # u32
NBD_DEVICE_CONNECTED = 2  # u8

NBD_SOCK_ITEM = 1
NBD_SOCK_FD = 1  # u32

NBD_CMD_CONNECT = 1
NBD_CMD_DISCONNECT = 2
NBD_CMD_RECONFIGURE = 3
NBD_CMD_LINK_DEAD = 4
NBD_CMD_STATUS = 5

NBD_CFLAG_DESTROY_ON_DISCONNECT = 1 << 0
NBD_CFLAG_DISCONNECT_ON_CLOSE = 1 << 1

# struct nlmsghdr, 16 bytes, host byte order: 0 total length (header included), 4 type,
# 6 flags, 8 sequence number, 12 sender port id.
NLMSGHDR = struct.Struct("=IHHII")
# struct genlmsghdr, 4 bytes: 0 command, 1 family version, 2 reserved.
GENLMSGHDR = struct.Struct("=BBH")
# struct nlattr, 4 bytes: 0 length (header plus payload, without padding), 2 type. The
# payload follows and is padded to a multiple of 4.
NLATTR = struct.Struct("=HH")
# struct nlmsgerr starts with the negative errno (0 for an acknowledgement), followed by
# the header of the request it answers.
NLMSGERR = struct.Struct("=i")

_U8 = struct.Struct("=B")
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")

_RECV_BUFFER = 64 * 1024
# The kernel answers at once; this only guards against waiting forever on a bug.
_REPLY_TIMEOUT = 60.0


class NetlinkError(BlockfsError):
    """The kernel refused a netlink request; ``errno`` is the error it returned."""

    def __init__(self, message: str, *, errno_: int) -> None:
        super().__init__(f"{message}: {os.strerror(errno_)}")
        self.errno = errno_

    def context(self) -> list[str]:
        return [f"errno {self.errno}"]


class FamilyNotFoundError(NetlinkError):
    """No generic netlink family of that name: for "nbd", nbd.ko is not loaded."""


def _align4(n: int) -> int:
    return (n + 3) & ~3


def nla(attr_type: int, payload: bytes) -> bytes:
    """One netlink attribute: header, payload and padding to 4 bytes."""
    length = NLATTR.size + len(payload)
    return NLATTR.pack(length, attr_type) + payload + b"\0" * (_align4(length) - length)


def nla_u8(attr_type: int, value: int) -> bytes:
    return nla(attr_type, _U8.pack(value))


def nla_u32(attr_type: int, value: int) -> bytes:
    return nla(attr_type, _U32.pack(value))


def nla_u64(attr_type: int, value: int) -> bytes:
    return nla(attr_type, _U64.pack(value))


def nla_string(attr_type: int, value: str) -> bytes:
    """A NUL-terminated string attribute, as the kernel's NLA_STRING policy accepts."""
    return nla(attr_type, value.encode() + b"\0")


def nla_nested(attr_type: int, children: Iterable[bytes]) -> bytes:
    """An attribute whose payload is a sequence of attributes."""
    return nla(attr_type | NLA_F_NESTED, b"".join(children))


@attrs.frozen
class Attribute:
    """One parsed netlink attribute; ``type`` has the NLA_F_* flags masked off."""

    type: int
    payload: bytes

    def u8(self) -> int:
        return int(_U8.unpack_from(self.payload)[0])

    def u16(self) -> int:
        return int(_U16.unpack_from(self.payload)[0])

    def u32(self) -> int:
        return int(_U32.unpack_from(self.payload)[0])

    def u64(self) -> int:
        return int(_U64.unpack_from(self.payload)[0])

    def string(self) -> str:
        return self.payload.split(b"\0", 1)[0].decode()

    def nested(self) -> list[Attribute]:
        return parse_attributes(self.payload)


def parse_attributes(data: bytes) -> list[Attribute]:
    """The attributes packed in ``data``, in order."""
    out: list[Attribute] = []
    offset = 0
    while offset + NLATTR.size <= len(data):
        length, attr_type = NLATTR.unpack_from(data, offset)
        if length < NLATTR.size or offset + length > len(data):
            raise ValueError(f"malformed netlink attribute at offset {offset}")
        out.append(
            Attribute(attr_type & NLA_TYPE_MASK, data[offset + NLATTR.size : offset + length])
        )
        offset += _align4(length)
    return out


def find_attribute(attributes: Sequence[Attribute], attr_type: int) -> Attribute | None:
    """The first attribute of ``attr_type``, if any."""
    return next((a for a in attributes if a.type == attr_type), None)


def encode_genl_message(
    family: int,
    command: int,
    version: int,
    attributes: bytes,
    *,
    seq: int,
    flags: int = NLM_F_REQUEST | NLM_F_ACK,
) -> bytes:
    """A generic netlink request: nlmsghdr, genlmsghdr and the packed attributes."""
    length = NLMSGHDR.size + GENLMSGHDR.size + len(attributes)
    return (
        NLMSGHDR.pack(length, family, flags, seq, 0)
        + GENLMSGHDR.pack(command, version, 0)
        + attributes
    )


@attrs.frozen
class Message:
    """One netlink message received from the kernel."""

    type: int
    flags: int
    seq: int
    payload: bytes


def decode_messages(data: bytes) -> list[Message]:
    """The netlink messages in one datagram."""
    out: list[Message] = []
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, msg_type, flags, seq, _ = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            raise ValueError(f"malformed netlink message at offset {offset}")
        out.append(Message(msg_type, flags, seq, data[offset + NLMSGHDR.size : offset + length]))
        offset += _align4(length)
    return out


class GenericNetlink:
    """A NETLINK_GENERIC socket that sends requests and collects their replies."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        try:
            self._sock.settimeout(_REPLY_TIMEOUT)
            self._sock.bind((0, 0))
        except BaseException:
            self._sock.close()
            raise
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> GenericNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def resolve_family(self, name: str) -> int:
        """The numeric id of the generic netlink family ``name``."""
        try:
            replies = self.request(
                GENL_ID_CTRL,
                CTRL_CMD_GETFAMILY,
                CTRL_VERSION,
                nla_string(CTRL_ATTR_FAMILY_NAME, name),
                what=f"resolve generic netlink family {name!r}",
            )
        except NetlinkError as e:
            if e.errno == errno.ENOENT:
                raise FamilyNotFoundError(
                    f"generic netlink family {name!r} not found", errno_=e.errno
                ) from None
            raise
        for attributes in replies:
            family_id = find_attribute(attributes, CTRL_ATTR_FAMILY_ID)
            if family_id is not None:
                return family_id.u16()
        raise NetlinkError(f"no id in the reply for family {name!r}", errno_=errno.EPROTO)

    def request(
        self, family: int, command: int, version: int, attributes: bytes, *, what: str
    ) -> list[list[Attribute]]:
        """Send one request and return the attributes of each reply until the kernel's ACK.

        ``what`` describes the request for error messages.
        """
        self._seq += 1
        seq = self._seq
        self._sock.send(encode_genl_message(family, command, version, attributes, seq=seq))
        replies: list[list[Attribute]] = []
        while True:
            try:
                datagram = self._sock.recv(_RECV_BUFFER)
            except TimeoutError:
                raise NetlinkError(f"cannot {what}", errno_=errno.ETIMEDOUT) from None
            for msg in decode_messages(datagram):
                if msg.seq != seq:
                    continue  # a stale answer to an earlier request
                if msg.type == NLMSG_ERROR:
                    (error,) = NLMSGERR.unpack_from(msg.payload)
                    if error:
                        raise NetlinkError(f"cannot {what}", errno_=-error)
                    return replies
                if msg.type == NLMSG_DONE:
                    return replies
                if msg.type == NLMSG_NOOP:
                    continue
                replies.append(parse_attributes(msg.payload[GENLMSGHDR.size :]))


def _int_tuple(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(values)


@attrs.frozen
class ConnectRequest:
    """The configuration of NBD_CMD_CONNECT for one device.

    ``index`` None lets the kernel pick a free device (or create one) and report it.
    """

    size_bytes: int
    block_size: int
    server_flags: int
    timeout: int
    dead_conn_timeout: int
    socket_fds: tuple[int, ...] = attrs.field(converter=_int_tuple)
    backend: str
    index: int | None = None
    client_flags: int | None = None

    def encode(self) -> bytes:
        """The packed attributes; the kernel does not care about their order."""
        parts = [
            nla_u64(NBD_ATTR_SIZE_BYTES, self.size_bytes),
            nla_u64(NBD_ATTR_BLOCK_SIZE_BYTES, self.block_size),
            nla_u64(NBD_ATTR_SERVER_FLAGS, self.server_flags),
            nla_u64(NBD_ATTR_TIMEOUT, self.timeout),
            nla_u64(NBD_ATTR_DEAD_CONN_TIMEOUT, self.dead_conn_timeout),
        ]
        if self.index is not None:
            parts.append(nla_u32(NBD_ATTR_INDEX, self.index))
        if self.client_flags is not None:
            parts.append(nla_u64(NBD_ATTR_CLIENT_FLAGS, self.client_flags))
        parts.append(nla_string(NBD_ATTR_BACKEND_IDENTIFIER, self.backend))
        parts.append(encode_sockets(self.socket_fds))
        return b"".join(parts)


def encode_sockets(fds: Iterable[int]) -> bytes:
    """NBD_ATTR_SOCKETS: one NBD_SOCK_ITEM holding one NBD_SOCK_FD per socket."""
    return nla_nested(
        NBD_ATTR_SOCKETS, (nla_nested(NBD_SOCK_ITEM, [nla_u32(NBD_SOCK_FD, fd)]) for fd in fds)
    )


def encode_reconfigure(
    index: int, socket_fds: Iterable[int], backend: str, *, dead_conn_timeout: int | None = None
) -> bytes:
    """NBD_CMD_RECONFIGURE attributes: fresh sockets for the dead ones of device ``index``.

    The kernel refuses the request unless ``backend`` matches the identifier given at
    connect time, so a device cannot be reattached to another export by mistake.
    """
    parts = [nla_u32(NBD_ATTR_INDEX, index), nla_string(NBD_ATTR_BACKEND_IDENTIFIER, backend)]
    if dead_conn_timeout is not None:
        parts.append(nla_u64(NBD_ATTR_DEAD_CONN_TIMEOUT, dead_conn_timeout))
    parts.append(encode_sockets(socket_fds))
    return b"".join(parts)


@attrs.frozen
class DeviceStatus:
    """One device in an NBD_CMD_STATUS reply."""

    index: int
    connected: bool


class NBDNetlink:
    """The kernel NBD driver's netlink commands. Raises FamilyNotFoundError without nbd.ko."""

    def __init__(self) -> None:
        self._netlink = GenericNetlink()
        try:
            self._family = self._netlink.resolve_family(NBD_GENL_FAMILY_NAME)
        except BaseException:
            self._netlink.close()
            raise

    def close(self) -> None:
        self._netlink.close()

    def __enter__(self) -> NBDNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, command: int, attributes: bytes, what: str) -> list[list[Attribute]]:
        return self._netlink.request(self._family, command, NBD_GENL_VERSION, attributes, what=what)

    def connect(self, request: ConnectRequest) -> int:
        """Configure a device with handshaken sockets; returns its index (``/dev/nbdN``)."""
        replies = self._request(NBD_CMD_CONNECT, request.encode(), "connect an NBD device")
        for attributes in replies:
            index = find_attribute(attributes, NBD_ATTR_INDEX)
            if index is not None:
                return index.u32()
        if request.index is not None:
            return request.index
        raise NetlinkError("NBD_CMD_CONNECT reply names no device", errno_=errno.EPROTO)

    def reconfigure(
        self,
        index: int,
        socket_fds: Iterable[int],
        backend: str,
        *,
        dead_conn_timeout: int | None = None,
    ) -> None:
        """Hand fresh sockets to device ``index`` in place of its dead ones."""
        attributes = encode_reconfigure(
            index, socket_fds, backend, dead_conn_timeout=dead_conn_timeout
        )
        self._request(NBD_CMD_RECONFIGURE, attributes, f"reconfigure /dev/nbd{index}")

    def disconnect(self, index: int) -> None:
        """Disconnect device ``index``; pending I/O fails and the device becomes free."""
        self._request(
            NBD_CMD_DISCONNECT, nla_u32(NBD_ATTR_INDEX, index), f"disconnect /dev/nbd{index}"
        )

    def status(self, index: int | None = None) -> list[DeviceStatus]:
        """Every device (or just ``index``) and whether it is configured."""
        attributes = b"" if index is None else nla_u32(NBD_ATTR_INDEX, index)
        replies = self._request(NBD_CMD_STATUS, attributes, "query NBD device status")
        return [status for reply in replies for status in parse_device_list(reply)]


def parse_device_list(attributes: Sequence[Attribute]) -> list[DeviceStatus]:
    """The devices in the NBD_ATTR_DEVICE_LIST of an NBD_CMD_STATUS reply."""
    device_list = find_attribute(attributes, NBD_ATTR_DEVICE_LIST)
    if device_list is None:
        return []
    out: list[DeviceStatus] = []
    for item in device_list.nested():
        if item.type != NBD_DEVICE_ITEM:
            continue
        fields = item.nested()
        index = find_attribute(fields, NBD_DEVICE_INDEX)
        connected = find_attribute(fields, NBD_DEVICE_CONNECTED)
        if index is not None:
            out.append(DeviceStatus(index.u32(), connected is not None and connected.u8() != 0))
    return out
