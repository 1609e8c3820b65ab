"""parse_toc and make_toc: the normalisation rules of the reference reader, on small TOCs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from blockfs.estargz import (
    TOC,
    Chunk,
    Entry,
    EntryError,
    clean_name,
    make_toc,
    parse_toc,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64
END = 10_000


def toc_of(*entries: dict[str, Any], payload_end: int = END, **kw: Any) -> TOC:
    return parse_toc(
        json.dumps({"version": 1, "entries": list(entries)}).encode(), payload_end=payload_end, **kw
    )


def reg(name: str, size: int, offset: int, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "reg",
        "size": size,
        "offset": offset,
        "chunkDigest": D1,
        **fields,
    }


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("./a//b/", "a/b"),
        ("/a/b", "a/b"),
        ("./", ""),
        ("/", ""),
        ("", ""),
        ("a/./b", "a/b"),
        ("a/../b", None),
        ("../a", None),
        ("a\0b", None),
    ],
)
def test_clean_name(raw: str, clean: str | None) -> None:
    assert clean_name(raw) == clean


def test_names_are_cleaned_and_implicit_parents_created() -> None:
    toc = toc_of({"name": "./usr/lib/", "type": "dir", "mode": 0o700}, reg("/var/log/x", 3, 10))
    assert [e.name for e in toc.entries] == ["usr/lib", "var/log/x"]
    for implicit in ("", "usr", "var", "var/log"):
        e = toc.lookup(implicit)
        assert (e.type, e.mode, e.uid, e.gid, e.modtime) == ("dir", 0o755, 0, 0, None)
    assert toc.lookup("usr/lib").mode == 0o700
    assert toc.children[""] == ("usr", "var")
    assert toc.children["var/log"] == ("x",)


def test_a_later_entry_for_an_implicit_directory_takes_its_place() -> None:
    toc = toc_of(
        reg("a/b/f", 1, 10),
        {"name": "a/", "type": "dir", "mode": 0o711, "uid": 5},
        {"name": "a/c", "type": "dir"},
    )
    a = toc.lookup("a")
    assert (a.mode, a.uid) == (0o711, 5)
    assert toc.children[""] == ("a",)
    assert toc.children["a"] == ("b", "c")
    # "." and the name in the root, plus ".." of b and c.
    assert toc.nlink(a) == 4


def test_root_entry_replaces_the_implicit_root_and_is_not_its_own_child() -> None:
    toc = toc_of({"name": "./", "type": "dir", "mode": 0o700}, {"name": "x", "type": "dir"})
    root = toc.lookup("")
    assert root.mode == 0o700
    assert toc.children[""] == ("x",)
    assert toc.nlink(root) == 3
    assert [p for p, _ in toc.walk()] == ["", "x"]


def test_empty_toc_has_a_root_directory() -> None:
    toc = toc_of()
    assert toc.entries == ()
    assert toc.lookup("").type == "dir"
    assert toc.lookup("").mode == 0o755
    assert toc.children == {"": ()}


def test_chunks_are_folded_into_their_file_with_sizes_filled_in() -> None:
    toc = toc_of(
        reg("f", 10_000, 100, chunkSize=4096, digest=D3),
        {"name": "ignored", "type": "chunk", "offset": 200, "chunkOffset": 4096,
         "chunkSize": 4096, "chunkDigest": D2},
        # Last piece with chunkSize 0: the rest of the file.
        {"name": "f", "type": "chunk", "offset": 300, "chunkOffset": 8192, "chunkDigest": D3},
        {"name": "g", "type": "dir"},
        payload_end=400,
    )  # fmt: skip
    (f,) = [e for e in toc.entries if e.name == "f"]
    assert f.digest == D3
    assert f.chunks == (
        Chunk(offset=100, end=200, inner_offset=0, chunk_offset=0, size=4096, digest=D1),
        Chunk(offset=200, end=300, inner_offset=0, chunk_offset=4096, size=4096, digest=D2),
        Chunk(offset=300, end=400, inner_offset=0, chunk_offset=8192, size=1808, digest=D3),
    )
    assert f.chunk_at(0) == 0 and f.chunk_at(4096) == 1 and f.chunk_at(9999) == 2
    assert [e.name for e in toc.entries] == ["f", "g"]


def test_last_piece_may_state_its_real_size() -> None:
    toc = toc_of(
        reg("f", 8192, 100, chunkSize=4096),
        {"type": "chunk", "offset": 200, "chunkOffset": 4096, "chunkSize": 4096, "chunkDigest": D2},
    )
    assert [c.size for c in toc.lookup("f").chunks] == [4096, 4096]


def test_single_piece_file_gets_its_size_as_chunk_size() -> None:
    toc = toc_of(reg("f", 123, 100))
    (c,) = toc.lookup("f").chunks
    assert (c.chunk_offset, c.size, c.end) == (0, 123, END)


def test_chunk_ends_are_the_next_member_start_capped_at_the_payload_end() -> None:
    toc = toc_of(
        reg("a", 10, 100),
        {"name": "d", "type": "dir"},
        reg("b", 10, 100, innerOffset=600, chunkDigest=D2),
        reg("c", 10, 250),
        payload_end=300,
    )
    a, b, c = (toc.lookup(n).chunks[0] for n in "abc")
    assert (a.offset, a.end, a.inner_offset) == (100, 250, 0)
    assert (b.offset, b.end, b.inner_offset) == (100, 250, 600)
    assert (c.offset, c.end) == (250, 300)


def test_owner_names_carry_forward_by_id() -> None:
    toc = toc_of(
        {"name": "a", "type": "dir", "uid": 7, "gid": 8, "userName": "u", "groupName": "g"},
        {"name": "b", "type": "dir", "uid": 7, "gid": 9},
        {"name": "c", "type": "dir", "uid": 1, "gid": 8},
        {"name": "d", "type": "dir", "uid": 7, "userName": "v"},
        {"name": "e", "type": "dir", "uid": 7},
    )
    names = {e.name: (e.user_name, e.group_name) for e in toc.entries}
    assert names == {
        "a": ("u", "g"),
        "b": ("u", ""),
        "c": ("", "g"),
        "d": ("v", ""),
        "e": ("v", ""),
    }


def test_hardlinks_resolve_recursively_even_to_later_entries() -> None:
    toc = toc_of(
        {"name": "l2", "type": "hardlink", "linkName": "./l1"},
        {"name": "l1", "type": "hardlink", "linkName": "/dir/f"},
        reg("dir/f", 5, 100),
        {"name": "s", "type": "symlink", "linkName": "../elsewhere"},
        {"name": "ls", "type": "hardlink", "linkName": "s"},
    )
    f = toc.lookup("dir/f")
    assert toc.lookup("l1") is f and toc.lookup("l2") is f
    assert toc.nlink(f) == 3
    assert toc.lookup("ls") is toc.lookup("s")
    assert toc.nlink(toc.lookup("s")) == 2
    # Symlink targets stay as written; hardlink targets are cleaned.
    assert toc.lookup("s").link_name == "../elsewhere"
    assert [e.link_name for e in toc.entries if e.type == "hardlink"] == ["l1", "dir/f", "s"]
    assert list(toc.regular_files()) == [f]


def test_type_comes_from_type_and_mode_keeps_only_permission_bits() -> None:
    toc = toc_of({"name": "f", "type": "reg", "mode": 0o100000 | 0o4755})
    assert toc.lookup("f").mode == 0o4755
    assert toc.lookup("f").type == "reg"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2023-11-14T22:13:20Z", 1_700_000_000),
        ("2023-11-14T22:13:20.999Z", 1_700_000_000),
        ("2023-11-15T00:13:20+02:00", 1_700_000_000),
        ("2023-11-14T20:13:20-02:00", 1_700_000_000),
        ("1969-12-31T23:59:59Z", -1),
        ("", None),
    ],
)
def test_modtime_is_rfc3339_seconds(text: str, seconds: int | None) -> None:
    assert toc_of({"name": "f", "type": "dir", "modtime": text}).lookup("f").modtime == seconds


def test_xattrs_are_base64_decoded_and_unknown_keys_ignored() -> None:
    toc = toc_of(
        {"name": "f", "type": "dir", "xattrs": {"user.a": "aGk=", "security.capability": "AQAAAg=="},
         "NumLink": 7, "accesstime": "x", "someOtherProducer": {"deep": [1, 2]}}
    )  # fmt: skip
    assert dict(toc.lookup("f").xattrs) == {"user.a": b"hi", "security.capability": b"\x01\0\0\x02"}


def test_devices_keep_their_numbers() -> None:
    toc = toc_of(
        {"name": "null", "type": "char", "devMajor": 1, "devMinor": 3},
        {"name": "sda", "type": "block", "devMajor": 8},
        {"name": "p", "type": "fifo"},
    )
    assert (toc.lookup("null").dev_major, toc.lookup("null").dev_minor) == (1, 3)
    assert (toc.lookup("sda").dev_major, toc.lookup("sda").dev_minor) == (8, 0)
    assert toc.lookup("p").type == "fifo"


def test_empty_regular_files_have_no_chunks_but_keep_their_digest() -> None:
    empty = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    toc = toc_of({"name": "e", "type": "reg", "digest": empty})
    e = toc.lookup("e")
    assert (e.size, e.chunks, e.digest) == (0, (), empty)
    assert list(toc.regular_files()) == []


def test_legacy_toc_without_chunk_digests_needs_permission() -> None:
    entries = (
        {"name": "f", "type": "reg", "size": 8, "offset": 100, "digest": D1},
        {"name": "g", "type": "reg", "size": 8, "offset": 200, "chunkSize": 4},
        {"name": "g", "type": "chunk", "offset": 300, "chunkOffset": 4},
    )
    with pytest.raises(EntryError, match="chunkDigest"):
        toc_of(*entries)
    toc = toc_of(*entries, require_chunk_digests=False)
    assert toc.lookup("f").chunks[0].digest == D1
    assert [c.digest for c in toc.lookup("g").chunks] == ["", ""]


# make_toc: the tree from Entry values, as other modules build it.


def test_make_toc_builds_the_tree_from_entries() -> None:
    f = Entry(name="a/b/f", type="reg", size=1, chunks=(Chunk(10, 20, 0, 0, 1, D1),))
    link = Entry(name="a/link", type="hardlink", link_name="a/b/f")
    toc = make_toc([f, link])
    assert toc.version == 1
    assert toc.entries == (f, link)
    assert toc.lookup("a/link") is f
    assert toc.nlink(f) == 2
    assert toc.children == {"": ("a",), "a": ("b", "link"), "a/b": ("f",)}
    assert toc.link_counts[""] == 3 and toc.link_counts["a"] == 3 and toc.link_counts["a/b"] == 2
    assert [p for p, _ in toc.walk()] == ["", "a", "a/b", "a/b/f", "a/link"]


@pytest.mark.parametrize(
    "entries",
    [
        [Entry(name="./a", type="dir")],
        [Entry(name="a/../b", type="dir")],
        [Entry(name="a/", type="dir")],
        [Entry(name="a", type="hardlink", link_name="/b")],
        [Entry(name="a", type="dir"), Entry(name="a", type="fifo")],
        [Entry(name="a", type="fifo"), Entry(name="a", type="dir")],
        [Entry(name="a", type="reg"), Entry(name="a/b", type="reg")],
        [Entry(name="a", type="hardlink", link_name="missing")],
    ],
)
def test_make_toc_refuses_bad_entries(entries: list[Entry]) -> None:
    with pytest.raises(EntryError):
        make_toc(entries, layer="L")


def test_a_later_entry_replaces_an_earlier_one_of_the_same_name() -> None:
    # The reference reader's rule: the tree ends up with the later entry, in the earlier
    # one's place among its siblings; a directory keeps its children.
    first = Entry(name="f", type="reg", size=3, mode=0o644)
    d = Entry(name="d", type="dir", mode=0o700)
    child = Entry(name="d/c", type="symlink", link_name="x")
    last = Entry(name="f", type="symlink", link_name="elsewhere")
    d_again = Entry(name="d", type="dir", mode=0o755)
    toc = make_toc([first, d, child, last, d_again])
    assert toc.lookup("f") is last and toc.lookup("d") is d_again
    assert toc.entries == (child, last, d_again)  # the replaced ones are gone
    assert toc.children == {"": ("f", "d"), "d": ("c",)}
    assert toc.link_counts == {"": 3, "f": 1, "d": 2, "d/c": 1}


def test_a_replaced_file_can_become_a_hardlink_and_back() -> None:
    target = Entry(name="t", type="reg", size=1)
    f = Entry(name="f", type="reg", size=2)
    as_link = Entry(name="f", type="hardlink", link_name="t")
    toc = make_toc([target, f, as_link])
    assert toc.lookup("f") is target and toc.nlink(target) == 2
    assert toc.entries == (target, as_link)
    again = Entry(name="f", type="reg", size=4)
    toc = make_toc([target, f, as_link, again])
    assert toc.lookup("f") is again and toc.nlink(target) == 1
    assert toc.entries == (target, again)
