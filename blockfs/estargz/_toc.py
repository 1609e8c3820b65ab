"""Parse, validate and normalise a TOC (``stargz.index.json``) into a :class:`TOC`.

The TOC comes from the blob, so everything in it is treated as hostile until checked:
each field's type and range, each name, the chunk layout and the links between entries.
Anything wrong is refused with an :class:`EntryError` or :class:`TOCError` that names the
layer, the entry and (where known) the offset; nothing else escapes.
"""

from __future__ import annotations

import binascii
import contextlib
import datetime
import gc
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final, NoReturn, cast

import attrs

from blockfs.estargz._errors import EntryError, TOCError, TOCTooLargeError
from blockfs.estargz._model import TOC, Chunk, Entry, EntryType

__all__ = ["DEFAULT_LIMITS", "Limits", "clean_name", "make_toc", "parse_toc"]

_MiB: Final = 1 << 20


@attrs.frozen
class Limits:
    """Upper bounds that keep a hostile TOC from exhausting memory or time.

    The defaults are far above what real images use and low enough that one TOC, or one
    chunk being decompressed, stays within a few hundred megabytes.
    """

    #: Largest TOC JSON accepted, compressed or not.
    max_toc_bytes: int = 256 * _MiB
    #: Most TOC entries (chunk entries included).
    max_entries: int = 4_000_000
    #: Largest regular file.
    max_file_size: int = 1 << 40
    #: Largest piece of a file, i.e. the most bytes one chunk read decompresses and holds.
    max_chunk_size: int = 64 * _MiB
    #: Largest ``innerOffset``: uncompressed bytes skipped before a piece in its member.
    max_inner_offset: int = 256 * _MiB
    #: Longest full path, in UTF-8 bytes.
    max_name_bytes: int = 4096
    #: Longest path component, in UTF-8 bytes (the Linux NAME_MAX).
    max_base_name_bytes: int = 255
    #: Longest symlink target, in UTF-8 bytes (what the kernel can store and follow).
    max_link_bytes: int = 4095
    #: Most bytes of xattr names and values on one entry (the Linux XATTR_LIST_MAX).
    max_xattr_bytes: int = 65536


DEFAULT_LIMITS: Final = Limits()

# The eight TOC entry types; "chunk" is folded into its file and never reaches an Entry.
_TYPES: Final = frozenset({"dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"})
# Linux keeps device numbers in 32 bits (12-bit major, 20-bit minor), and so does EROFS.
_MAX_DEV_MAJOR: Final = (1 << 12) - 1
_MAX_DEV_MINOR: Final = (1 << 20) - 1
_MAX_ID: Final = (1 << 32) - 1
# Mode may carry S_IF* type bits from some producers; anything beyond 32 bits is nonsense.
_MAX_MODE: Final = (1 << 32) - 1
# Linux XATTR_NAME_MAX.
_MAX_XATTR_NAME: Final = 255
# Hardlink chains longer than this are refused rather than followed.
_MAX_LINK_HOPS: Final = 64

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}", re.ASCII)
# RFC 3339 as Go's time package writes and reads it: "T" separator, optional fraction,
# "Z" or a numeric offset.
_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.\d+)?(?:(Z)|([+-])(\d\d):(\d\d))",
    re.ASCII,
)
_EPOCH_ORDINAL: Final = datetime.date(1970, 1, 1).toordinal()
_NO_XATTRS: Final[Mapping[str, bytes]] = MappingProxyType({})

_IMPLICIT_DIR_MODE: Final = 0o755
# Hostile values are quoted in messages only up to this many characters.
_SHOW_MAX: Final = 200


def _show(value: object) -> str:
    """``repr(value)``, shortened: errors must stay small whatever the TOC holds."""
    if isinstance(value, (list, dict)) and len(value) > 8:
        return f"<{type(value).__name__} of {len(value)} items>"
    text = repr(value)
    return text if len(text) <= _SHOW_MAX else text[:_SHOW_MAX] + "..."


def clean_name(name: str) -> str | None:
    """``name`` as a clean relative path ("" for the root), or None if it is not allowed.

    A leading ``/`` or ``./``, repeated and trailing slashes and ``.`` components are
    dropped, as the reference reader does; ``..`` components and NUL bytes are refused
    because a layer's names must never point outside it.
    """
    if "\0" in name:
        return None
    parts = name.split("/")
    if "" in parts or "." in parts:
        parts = [p for p in parts if p and p != "."]
        return None if ".." in parts else "/".join(parts)
    return None if ".." in parts else name


# --------------------------------------------------------------------------------------
# The tree


def make_toc(entries: Sequence[Entry], *, version: int = 1, layer: str | None = None) -> TOC:
    """Build the directory tree of normalised ``entries`` (in blob order) into a :class:`TOC`.

    Adds the root and implicit parent directories (mode 0755), resolves hardlinks to the
    entry they name and counts links. A later entry with the name of an earlier one
    replaces it, as in the reference reader (a directory keeps its children); the
    replaced entry leaves ``entries`` too. Refuses names that are not clean, a name
    listed both as a directory and as a non-directory, entries under a non-directory and
    hardlinks that are dangling, circular or name a directory.
    """
    for e in entries:
        if clean_name(e.name) != e.name:
            raise EntryError("name is not a clean relative path", layer=layer, entry=e.name)
        if e.type == "hardlink" and (not e.link_name or clean_name(e.link_name) != e.link_name):
            raise EntryError(
                f"hardlink target {e.link_name!r} is not a clean relative path",
                layer=layer,
                entry=e.name,
            )
    return _build_tree(tuple(entries), version=version, layer=layer)


def _entry_offset(e: Entry) -> int | None:
    return e.chunks[0].offset if e.chunks else None


def _build_tree(entries: tuple[Entry, ...], *, version: int, layer: str | None) -> TOC:
    """The tree part of :func:`make_toc`, for entries whose names are known to be clean."""
    nodes: dict[str, Entry] = {"": Entry("", "dir", _IMPLICIT_DIR_MODE, xattrs=_NO_XATTRS)}
    children: dict[str, list[str]] = {"": []}
    # Directories that exist only as parents so far; their own entry may still come.
    implicit: set[str] = {""}
    # Name of each data-holding entry -> names referring to it; for a directory its "."
    # and its name in the parent, plus one ".." per child directory.
    link_counts: dict[str, int] = {"": 2}
    hardlinks: dict[str, Entry] = {}
    # Positions in ``entries`` of the entry holding each name, and of those replaced.
    position: dict[str, int] = {}
    replaced: set[int] = set()

    def fail(message: str, e: Entry) -> NoReturn:
        raise EntryError(message, layer=layer, entry=e.name, offset=_entry_offset(e))

    for index, e in enumerate(entries):
        name = e.name
        is_dir = e.type == "dir"
        old = nodes.get(name)
        if old is not None:
            if (old.type == "dir") != is_dir:
                if name in implicit:
                    fail("a directory that has entries under it is listed as a non-directory", e)
                fail("a name is listed both as a directory and as a non-directory", e)
            # A directory needed as a parent before its own entry came, or a duplicate:
            # the later entry takes the name, in the earlier one's place among its
            # siblings (a directory keeps its children).
            implicit.discard(name)
            if name in position:
                replaced.add(position[name])
            position[name] = index
            nodes[name] = e
            if e.type == "hardlink":
                link_counts.pop(name, None)
                hardlinks[name] = e
            else:
                hardlinks.pop(name, None)
                if not is_dir:
                    link_counts[name] = 1
            continue
        position[name] = index
        parent, _, base = name.rpartition("/")
        pnode = nodes.get(parent)
        if pnode is None:
            _add_parents(e, parent, nodes, children, implicit, link_counts, layer)
        elif pnode.type != "dir":
            fail(f"parent {_show(parent)} is not a directory", e)
        nodes[name] = e
        children[parent].append(base)
        if is_dir:
            children[name] = []
            link_counts[name] = 2
            link_counts[parent] += 1
        elif e.type == "hardlink":
            hardlinks[name] = e
        else:
            link_counts[name] = 1

    for e in hardlinks.values():
        target = nodes.get(e.link_name)
        hops = 0
        while target is not None and target.type == "hardlink":
            hops += 1
            if hops > _MAX_LINK_HOPS or target is e:
                fail("hardlink chain is circular or too long", e)
            target = nodes.get(target.link_name)
        if target is None:
            fail(f"hardlink to missing entry {_show(e.link_name)}", e)
        if target.type == "dir":
            fail(f"hardlink to directory {_show(e.link_name)}", e)
        nodes[e.name] = target
        link_counts[target.name] += 1

    return TOC(
        version=version,
        entries=tuple(e for i, e in enumerate(entries) if i not in replaced)
        if replaced
        else entries,
        nodes=nodes,
        children={k: tuple(v) for k, v in children.items()},
        link_counts=link_counts,
    )


def _add_parents(
    e: Entry,
    path: str,
    nodes: dict[str, Entry],
    children: dict[str, list[str]],
    implicit: set[str],
    link_counts: dict[str, int],
    layer: str | None,
) -> None:
    """Create the implicit directory ``path`` (the parent of ``e``) and its missing ancestors."""
    missing: list[str] = []
    p = path
    while (node := nodes.get(p)) is None:
        missing.append(p)
        p = p.rpartition("/")[0]
    if node.type != "dir":
        raise EntryError(
            f"ancestor {_show(p)} is not a directory",
            layer=layer,
            entry=e.name,
            offset=_entry_offset(e),
        )
    for d in reversed(missing):
        parent, _, base = d.rpartition("/")
        nodes[d] = Entry(d, "dir", _IMPLICIT_DIR_MODE, xattrs=_NO_XATTRS)
        children[d] = []
        children[parent].append(base)
        implicit.add(d)
        link_counts[d] = 2
        link_counts[parent] += 1


# --------------------------------------------------------------------------------------
# Parsing


def parse_toc(
    data: bytes,
    *,
    layer: str | None = None,
    payload_end: int,
    limits: Limits = DEFAULT_LIMITS,
    require_chunk_digests: bool = True,
) -> TOC:
    """Parse the uncompressed TOC JSON ``data`` into a validated, normalised :class:`TOC`.

    ``payload_end`` is where the blob's data members end (:meth:`Footer.payload_end`);
    every chunk must start before it. ``require_chunk_digests=False`` accepts legacy
    stargz TOCs without ``chunkDigest``: such pieces get the file's ``digest`` when the
    file has one piece, and an empty digest otherwise.
    """
    if len(data) > limits.max_toc_bytes:
        raise TOCTooLargeError(
            f"TOC of {len(data)} bytes exceeds the limit of {limits.max_toc_bytes}", layer=layer
        )
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise TOCError(f"TOC is not valid JSON: {_show(str(exc))}", layer=layer) from None
    if type(doc) is not dict:
        raise TOCError("TOC is not a JSON object", layer=layer)
    version = doc.get("version")
    if type(version) is not int or version != 1:
        raise TOCError(f"unsupported TOC version {_show(version)}", layer=layer)
    raw_entries = doc.get("entries", [])
    del doc
    if type(raw_entries) is not list:
        raise TOCError("TOC entries are not a list", layer=layer)
    if len(raw_entries) > limits.max_entries:
        raise TOCTooLargeError(
            f"TOC has {len(raw_entries)} entries, more than the limit of {limits.max_entries}",
            layer=layer,
        )
    parser = _EntryParser(layer, payload_end, limits, require_chunk_digests)
    with _collector_paused():
        return _build_tree(parser.run(raw_entries), version=version, layer=layer)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Hold off the cyclic garbage collector while a large TOC is turned into entries.

    The parse allocates several objects per entry and none of them form cycles, yet the
    collector keeps walking the growing heap; that costs a quarter of the parse time of a
    large TOC. Collection resumes afterwards (unless someone else had turned it off).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# Entry's fields in order: the parser builds each Entry positionally, which is markedly
# faster than by keyword for millions of entries. Checked here so a change to Entry
# cannot silently shift the fields.
_ENTRY_FIELDS: Final = (
    "name", "type", "mode", "uid", "gid", "user_name", "group_name", "size", "modtime",
    "link_name", "dev_major", "dev_minor", "xattrs", "digest", "chunks",
)  # fmt: skip
if tuple(f.name for f in attrs.fields(Entry)) != _ENTRY_FIELDS:
    raise ImportError("blockfs.estargz._toc is out of step with the fields of Entry")


class _EntryParser:
    """Turns the raw entry dicts into Entry values in one pass, then attaches the chunks.

    The common case (well-formed fields, plain "...Z" times) runs inline with no calls
    per field; anything unusual drops to a checking method that either accepts the value
    or raises. Raw dicts are dropped from the list as they are consumed so that the
    decoded JSON and the entries are not both held in full at the peak.
    """

    def __init__(
        self, layer: str | None, payload_end: int, limits: Limits, require_chunk_digests: bool
    ) -> None:
        self.layer = layer
        self.payload_end = payload_end
        self.limits = limits
        self.require_chunk_digests = require_chunk_digests
        self.user_names: dict[int, str] = {}
        self.group_names: dict[int, str] = {}
        self.times: dict[str, int] = {}
        self.days: dict[str, int] = {}

    def fail(self, message: str, name: object, offset: int | None = None) -> NoReturn:
        entry = name[:_SHOW_MAX] if isinstance(name, str) else _show(name)
        raise EntryError(message, layer=self.layer, entry=entry, offset=offset)

    def run(self, raw_entries: list[Any]) -> tuple[Entry, ...]:
        limits = self.limits
        payload_end = self.payload_end
        max_file = limits.max_file_size
        max_chunk = limits.max_chunk_size
        max_inner = limits.max_inner_offset
        max_base = limits.max_base_name_bytes
        fail = self.fail
        check_int = self.check_int
        user_names = self.user_names
        group_names = self.group_names
        times = self.times
        digest_ok = _DIGEST.fullmatch
        # Per non-chunk entry, its Entry; for a file with data, a list of Entry's arguments
        # until its chunks (whose ends depend on later entries) are known.
        out: list[Any] = []
        # Per piece: (offset, inner_offset, chunk_offset, size, digest, index in out).
        pieces: list[tuple[int, int, int, int, str, int]] = []
        # The file whose pieces are being collected (index < 0: none).
        open_index = -1
        open_name = ""
        open_size = 0
        open_next = 0  # the file offset the next piece must start at
        open_digest = ""
        prev_offset = 0
        prev_inner_end = 0

        for i, raw in enumerate(raw_entries):
            raw_entries[i] = None
            if type(raw) is not dict:
                fail(f"entry {i} is not a JSON object", f"#{i}")
            get = raw.get
            typ = get("type")
            if typ == "chunk":
                if open_index < 0:
                    fail("chunk entry without a preceding non-empty regular file", get("name"))
                name = open_name
                chunk_offset = get("chunkOffset", 0)
                if type(chunk_offset) is not int or chunk_offset != open_next:
                    fail(
                        f"chunk at file offset {_show(chunk_offset)} does not follow the "
                        f"previous piece, which ends at {open_next}",
                        name,
                    )
                size = get("chunkSize", 0)
                if type(size) is not int or not 0 <= size <= max_chunk:
                    check_int(size, "chunkSize", name, max_chunk)
                if size == 0:
                    size = open_size - chunk_offset
            else:
                if open_index >= 0 and open_next != open_size:
                    fail(f"pieces cover {open_next} of the file's {open_size} bytes", open_name)
                open_index = -1
                if type(typ) is not str or typ not in _TYPES:
                    fail(f"unknown entry type {_show(typ)}", get("name", f"#{i}"))
                typ = cast("EntryType", typ)

                raw_name = get("name")
                if type(raw_name) is not str:
                    fail(f"name {_show(raw_name)} is not a string", raw_name)
                # Most names are short, ASCII and already clean but for a trailing "/".
                name = raw_name[:-1] if raw_name.endswith("/") else raw_name
                if not (
                    name
                    and len(name) <= max_base
                    and name.isascii()
                    and name[0] != "/"
                    and name[0] != "."
                    and name[-1] != "/"
                    and "//" not in name
                    and "/." not in name
                    and "\0" not in name
                ):
                    name = self.path(raw_name, raw_name)
                mode = get("mode", 0)
                if type(mode) is not int or not 0 <= mode <= _MAX_MODE:
                    check_int(mode, "mode", name, _MAX_MODE)
                uid = get("uid", 0)
                if type(uid) is not int or not 0 <= uid <= _MAX_ID:
                    check_int(uid, "uid", name, _MAX_ID)
                gid = get("gid", 0)
                if type(gid) is not int or not 0 <= gid <= _MAX_ID:
                    check_int(gid, "gid", name, _MAX_ID)
                user = get("userName", "")
                if user:
                    user_names[uid] = self.check_text(user, "userName", name)
                else:
                    user = user_names.get(uid, "")
                group = get("groupName", "")
                if group:
                    group_names[gid] = self.check_text(group, "groupName", name)
                else:
                    group = group_names.get(gid, "")
                size = get("size", 0)
                if type(size) is not int or not 0 <= size <= max_file:
                    check_int(size, "size", name, max_file)
                modtime = get("modtime")
                if modtime is not None and modtime != "":
                    seconds = times.get(modtime) if type(modtime) is str else None
                    modtime = seconds if seconds is not None else self.modtime(modtime, name)
                else:
                    modtime = None
                link = get("linkName") or ""
                if link or typ == "symlink" or typ == "hardlink":
                    link = self.link(link, typ, name)
                major = minor = 0
                if typ == "char" or typ == "block":
                    major = get("devMajor", 0)
                    if type(major) is not int or not 0 <= major <= _MAX_DEV_MAJOR:
                        check_int(major, "devMajor", name, _MAX_DEV_MAJOR)
                    minor = get("devMinor", 0)
                    if type(minor) is not int or not 0 <= minor <= _MAX_DEV_MINOR:
                        check_int(minor, "devMinor", name, _MAX_DEV_MINOR)
                xattrs = get("xattrs")
                xattrs = self.xattrs(xattrs, name) if xattrs else _NO_XATTRS
                digest = get("digest") or ""
                if digest and (type(digest) is not str or not digest_ok(digest)):
                    fail(f"malformed digest {_show(digest)}", name)
                if typ != "reg":
                    size = 0
                if size == 0:
                    out.append(
                        Entry(name, typ, mode & 0o7777, uid, gid, user, group, 0, modtime,
                              link, major, minor, xattrs, digest)
                    )  # fmt: skip
                    continue
                # A non-empty regular file: its first piece follows.
                out.append(
                    [name, typ, mode & 0o7777, uid, gid, user, group, size, modtime,
                     link, major, minor, xattrs, digest]
                )  # fmt: skip
                open_index = len(out) - 1
                open_name = name
                open_size = size
                open_next = 0
                open_digest = digest
                chunk_offset = get("chunkOffset", 0)
                if chunk_offset != 0:
                    fail("the first piece of a file must start at file offset 0", name)
                size = get("chunkSize", 0)
                if type(size) is not int or not 0 <= size <= max_file:
                    check_int(size, "chunkSize", name, max_file)
                if size == 0:
                    size = open_size

            # A piece of the open file: the reg entry itself or a chunk.
            if size <= 0 or chunk_offset + size > open_size:
                fail(
                    f"piece [{chunk_offset}, {chunk_offset + size}) does not fit in the "
                    f"file's {open_size} bytes",
                    name,
                )
            if size > max_chunk:
                fail(f"piece of {size} bytes exceeds the limit of {max_chunk}", name)
            offset = get("offset")
            if type(offset) is not int or not 0 < offset < payload_end:
                fail(
                    f"data offset {_show(offset)} is not inside the payload [1, {payload_end})",
                    name,
                    offset if type(offset) is int else None,
                )
            inner = get("innerOffset", 0)
            if type(inner) is not int or not 0 <= inner <= max_inner:
                check_int(inner, "innerOffset", name, max_inner, offset)
            # Pieces come in blob order: offsets never go back, and pieces that share a
            # member follow each other in it without overlapping.
            if offset < prev_offset or (offset == prev_offset and inner < prev_inner_end):
                fail("piece overlaps or precedes the previous piece in the blob", name, offset)
            prev_offset = offset
            prev_inner_end = inner + size
            digest = get("chunkDigest")
            if not digest:
                if digest is not None and digest != "":
                    fail(f"malformed chunkDigest {_show(digest)}", name, offset)
                if self.require_chunk_digests:
                    fail("piece has no chunkDigest", name, offset)
                # Legacy stargz: a file in one piece is still covered by its digest.
                digest = open_digest if chunk_offset == 0 and size == open_size else ""
            elif digest == open_digest:
                digest = open_digest  # one string object for both
            elif type(digest) is not str or not digest_ok(digest):
                fail(f"malformed chunkDigest {_show(digest)}", name, offset)
            pieces.append((offset, inner, chunk_offset, size, digest, open_index))
            open_next = chunk_offset + size

        if open_index >= 0 and open_next != open_size:
            fail(f"pieces cover {open_next} of the file's {open_size} bytes", open_name)

        # Where each piece's compressed run ends: the next member start after it (section 5
        # of the reference), capped at the end of the payload.
        ends = [0] * len(pieces)
        last = payload_end
        for k in range(len(pieces) - 1, -1, -1):
            ends[k] = last
            if pieces[k][1] == 0:
                last = pieces[k][0]

        chunks: list[Chunk] = []
        current = -1
        for k, (offset, inner, chunk_offset, size, digest, index) in enumerate(pieces):
            if index != current:
                if chunks:
                    self.finish(out, current, chunks)
                chunks = []
                current = index
            chunks.append(Chunk(offset, ends[k], inner, chunk_offset, size, digest))
        if chunks:
            self.finish(out, current, chunks)
        return tuple(out)

    @staticmethod
    def finish(out: list[Any], index: int, chunks: list[Chunk]) -> None:
        """Turn the arguments held at ``out[index]`` into the file's Entry, with its chunks."""
        args: list[Any] = out[index]
        args.append(tuple(chunks))
        out[index] = Entry(*args)

    # The slow paths: each returns an accepted value or raises.

    def check_int(
        self, value: object, key: str, name: str, maximum: int, offset: int | None = None
    ) -> NoReturn:
        self.fail(f"{key} {_show(value)} is not an integer in [0, {maximum}]", name, offset)

    def check_text(self, value: object, key: str, name: str) -> str:
        if type(value) is not str:
            self.fail(f"{key} {_show(value)} is not a string", name)
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                self.fail(f"{key} is not valid Unicode", name)
        return value

    def link(self, value: object, typ: str, name: str) -> str:
        """The linkName of a symlink (kept as is) or hardlink (cleaned like a name)."""
        link = self.check_text(value, "linkName", name)
        if typ == "hardlink":
            if not link:
                self.fail("hardlink has no target", name)
            return self.path(link, name)
        if typ != "symlink":
            return ""
        if not link or "\0" in link:
            self.fail("symlink has no target, or a target with a NUL byte", name)
        if len(link.encode()) > self.limits.max_link_bytes:
            self.fail(f"symlink target longer than {self.limits.max_link_bytes} bytes", name)
        return link

    def path(self, raw: str, entry: str) -> str:
        """A name or hardlink target, cleaned and checked against the limits."""
        name = clean_name(raw)
        if name is None:
            self.fail(f"path {_show(raw)} has a '..' component or a NUL byte", entry)
        if name.isascii():
            size = len(name)
        else:
            try:
                size = len(name.encode())
            except UnicodeEncodeError:
                self.fail(f"path {_show(raw)} is not valid Unicode", entry)
        if size > self.limits.max_base_name_bytes:
            if size > self.limits.max_name_bytes:
                self.fail(f"path longer than {self.limits.max_name_bytes} bytes", entry)
            for part in name.split("/"):
                if len(part.encode()) > self.limits.max_base_name_bytes:
                    self.fail(
                        f"path component longer than {self.limits.max_base_name_bytes} bytes",
                        entry,
                    )
        return name

    def modtime(self, value: object, name: str) -> int:
        """Seconds since the epoch of an RFC 3339 time (fractions of a second dropped)."""
        m = _RFC3339.fullmatch(value) if type(value) is str else None
        if m is None:
            self.fail(f"modtime {_show(value)} is not an RFC 3339 time", name)
        text = m.string
        days = self.days.get(text[:10])
        if days is None:
            try:
                days = datetime.date(int(m[1]), int(m[2]), int(m[3])).toordinal() - _EPOCH_ORDINAL
            except ValueError:
                self.fail(f"modtime {_show(value)} is not a valid date", name)
            self.days[text[:10]] = days
        hour, minute, second = int(m[4]), int(m[5]), int(m[6])
        if hour > 23 or minute > 59 or second > 59:
            self.fail(f"modtime {_show(value)} is not a valid time of day", name)
        seconds = days * 86400 + hour * 3600 + minute * 60 + second
        if m[7] is None:
            zone_hours, zone_minutes = int(m[9]), int(m[10])
            if zone_hours > 23 or zone_minutes > 59:
                self.fail(f"modtime {_show(value)} has an invalid zone offset", name)
            zone = zone_hours * 3600 + zone_minutes * 60
            seconds += -zone if m[8] == "+" else zone
        self.times[text] = seconds
        return seconds

    def xattrs(self, value: object, name: str) -> Mapping[str, bytes]:
        """Extended attributes: names to base64-decoded values, within the size limit."""
        if type(value) is not dict:
            self.fail("xattrs is not a JSON object", name)
        out: dict[str, bytes] = {}
        total = 0
        for key, encoded in value.items():
            if type(encoded) is not str:
                self.fail(f"xattr {_show(key)} value is not a base64 string", name)
            try:
                key_size = len(key.encode())
                data = binascii.a2b_base64(encoded, strict_mode=True)
            except ValueError:  # binascii.Error, UnicodeEncodeError, a non-ASCII value
                self.fail(f"xattr {_show(key)} is not valid (base64 value, Unicode name)", name)
            if not 0 < key_size <= _MAX_XATTR_NAME or "\0" in key:
                self.fail(f"invalid xattr name {_show(key)}", name)
            total += key_size + len(data)
            if total > self.limits.max_xattr_bytes:
                self.fail(f"xattrs exceed {self.limits.max_xattr_bytes} bytes", name)
            out[key] = data
        return out
