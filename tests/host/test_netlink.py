"""Generic netlink encoding for the kernel NBD driver, and the real netlink transport.

This host has no nbd.ko, so NBD_CMD_CONNECT and friends are checked byte for byte here;
the VM test with a real kernel proves the kernel accepts them.
"""

from __future__ import annotations

import sys

import pytest
from attach_testkit import nbd_ko_present

from blockfs.host import _netlink as nl

# The hand-written byte expectations below are in the host's (little-endian) byte order.
pytestmark = pytest.mark.skipif(sys.byteorder != "little", reason="expectations are little-endian")


def test_attribute_payload_is_padded_to_four_bytes() -> None:
    # length 5 (4-byte header + 1), type 2, payload 07, three bytes of padding
    assert nl.nla_u8(2, 7) == bytes.fromhex("0500 0200 07 000000")
    # a string includes its NUL: "ab\0" → length 7, one byte of padding
    assert nl.nla_string(10, "ab") == bytes.fromhex("0700 0a00 616200 00")
    # u64 needs no padding
    assert nl.nla_u64(3, 4096) == bytes.fromhex("0c00 0300 0010000000000000")


def test_attributes_round_trip_through_parse() -> None:
    packed = (
        nl.nla_u8(1, 0xAB)
        + nl.nla_u32(2, 0xDEADBEEF)
        + nl.nla_u64(3, 1 << 40)
        + nl.nla_string(4, "blockfs:layer")
        + nl.nla_nested(5, [nl.nla_u32(1, 7), nl.nla_nested(2, [nl.nla_u8(1, 1)])])
    )

    attrs = nl.parse_attributes(packed)

    assert [a.type for a in attrs] == [1, 2, 3, 4, 5]  # NLA_F_NESTED is masked off
    assert attrs[0].u8() == 0xAB
    assert attrs[1].u32() == 0xDEADBEEF
    assert attrs[2].u64() == 1 << 40
    assert attrs[3].string() == "blockfs:layer"
    inner = attrs[4].nested()
    assert (inner[0].type, inner[0].u32()) == (1, 7)
    assert inner[1].nested()[0].u8() == 1


def test_truncated_attribute_is_refused() -> None:
    with pytest.raises(ValueError, match="malformed netlink attribute"):
        nl.parse_attributes(nl.nla_u64(3, 1)[:10])


def test_connect_message_matches_hand_computed_bytes() -> None:
    request = nl.ConnectRequest(
        size_bytes=303104,
        block_size=4096,
        server_flags=0x103,  # HAS_FLAGS | READ_ONLY | CAN_MULTI_CONN
        timeout=3600,
        dead_conn_timeout=30 * 24 * 3600,
        socket_fds=[5, 6],
        backend="blockfs:layer-a",
    )

    message = nl.encode_genl_message(0x1C, nl.NBD_CMD_CONNECT, 1, request.encode(), seq=1)

    expected = bytes.fromhex(
        # nlmsghdr: length 128, type 0x1c (the family id), flags REQUEST|ACK, seq 1, port 0
        "80000000 1c00 0500 01000000 00000000"
        # genlmsghdr: cmd 1 (CONNECT), version 1, reserved
        "01 01 0000"
        # NBD_ATTR_SIZE_BYTES (2) = 303104 = 0x4a000
        "0c00 0200 00a0040000000000"
        # NBD_ATTR_BLOCK_SIZE_BYTES (3) = 4096
        "0c00 0300 0010000000000000"
        # NBD_ATTR_SERVER_FLAGS (5) = 0x103
        "0c00 0500 0301000000000000"
        # NBD_ATTR_TIMEOUT (4) = 3600 = 0xe10
        "0c00 0400 100e000000000000"
        # NBD_ATTR_DEAD_CONN_TIMEOUT (8) = 2592000 = 0x278d00
        "0c00 0800 008d270000000000"
        # NBD_ATTR_BACKEND_IDENTIFIER (10) = "blockfs:layer-a\0", 16 bytes
        "1400 0a00" + b"blockfs:layer-a\0".hex() +
        # NBD_ATTR_SOCKETS (7 | NLA_F_NESTED), 28 bytes: two NBD_SOCK_ITEM (1 | NESTED),
        # each holding NBD_SOCK_FD (1) as a u32
        "1c00 0780"
        "0c00 0180 0800 0100 05000000"
        "0c00 0180 0800 0100 06000000"
    )
    assert message == expected


def test_connect_with_index_and_client_flags_adds_both() -> None:
    request = nl.ConnectRequest(
        size_bytes=4096,
        block_size=4096,
        server_flags=3,
        timeout=0,
        dead_conn_timeout=0,
        socket_fds=[3],
        backend="b",
        index=7,
        client_flags=nl.NBD_CFLAG_DESTROY_ON_DISCONNECT,
    )

    attrs = {a.type: a for a in nl.parse_attributes(request.encode())}

    assert attrs[nl.NBD_ATTR_INDEX].u32() == 7
    assert attrs[nl.NBD_ATTR_CLIENT_FLAGS].u64() == 1
    sockets = attrs[nl.NBD_ATTR_SOCKETS].nested()
    assert [(s.type, s.nested()[0].type, s.nested()[0].u32()) for s in sockets] == [(1, 1, 3)]


def test_reconfigure_names_device_backend_and_new_sockets() -> None:
    attrs = nl.parse_attributes(nl.encode_reconfigure(3, [9, 10], "blockfs:layer-a"))

    assert [a.type for a in attrs] == [
        nl.NBD_ATTR_INDEX,
        nl.NBD_ATTR_BACKEND_IDENTIFIER,
        nl.NBD_ATTR_SOCKETS,
    ]
    assert attrs[0].u32() == 3
    assert attrs[1].string() == "blockfs:layer-a"
    assert [item.nested()[0].u32() for item in attrs[2].nested()] == [9, 10]


def test_status_reply_device_list_is_parsed() -> None:
    # What the kernel's NBD_CMD_STATUS reply carries (nla_nest_start_noflag: no NESTED bit).
    reply = nl.nla(
        nl.NBD_ATTR_DEVICE_LIST,
        nl.nla(nl.NBD_DEVICE_ITEM, nl.nla_u32(nl.NBD_DEVICE_INDEX, 0) + nl.nla_u8(2, 1))
        + nl.nla(nl.NBD_DEVICE_ITEM, nl.nla_u32(nl.NBD_DEVICE_INDEX, 1) + nl.nla_u8(2, 0)),
    )

    devices = nl.parse_device_list(nl.parse_attributes(reply))

    assert devices == [nl.DeviceStatus(0, True), nl.DeviceStatus(1, False)]


def test_decode_messages_splits_a_datagram() -> None:
    first = nl.encode_genl_message(0x10, 1, 2, nl.nla_u8(1, 1), seq=5, flags=0)
    second = nl.encode_genl_message(0x10, 1, 2, b"", seq=6, flags=0)

    messages = nl.decode_messages(first + second)

    assert [(m.type, m.seq) for m in messages] == [(0x10, 5), (0x10, 6)]
    assert nl.parse_attributes(messages[0].payload[4:])[0].u8() == 1


def test_real_kernel_resolves_the_nlctrl_family() -> None:
    with nl.GenericNetlink() as netlink:
        assert netlink.resolve_family("nlctrl") == nl.GENL_ID_CTRL


@pytest.mark.skipif(nbd_ko_present(), reason="this host has nbd.ko")
def test_without_nbd_ko_the_nbd_family_is_not_found() -> None:
    with pytest.raises(nl.FamilyNotFoundError) as caught:
        nl.NBDNetlink()

    assert caught.value.errno == 2
    assert "'nbd'" in str(caught.value)
