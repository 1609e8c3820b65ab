"""Parse, validate and normalise a TOC (``stargz.index.json``) into a :class:`TOC`.

The TOC comes from the blob, so everything in it is treated as hostile until checked:
each field's type and range, each name, the chunk layout and the links between entries.
Anything wrong is refused with an :class:`EntryError` or :class:`TOCError` that names the
layer, the entry and (where known) the offset; nothing else escapes.
"""

from __future__ import annotations

import binascii
import codecs
import contextlib
import datetime
import gc
import json
import re
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, NoReturn, cast

import attrs

from blockfs.estargz._errors import EntryError, TOCError, TOCTooLargeError
from blockfs.estargz._model import (
    DEAD,
    DIR,
    HARDLINK,
    IMPLICIT,
    NO_DIGEST,
    NO_MODTIME,
    TOC,
    TYPE_CODES,
    Entry,
    EntryType,
    TOCTable,
    decode_name,
    encode_name,
)

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
    #: Longest JSON text of one TOC entry (or other value), in characters. A real entry
    #: takes well under 200 KiB even with a 4 KiB name and 64 KiB of xattrs; the parser
    #: holds no more than this of an entry before refusing it.
    max_entry_json: int = _MiB


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
_TYPE_CODE: Final = TYPE_CODES
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
    hardlinks that are dangling, circular or name a directory. The TOC hands back the
    very Entry objects it was given.
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
        try:
            encode_name(e.name)
            encode_name(e.link_name)
        except UnicodeEncodeError:
            raise EntryError("name is not valid Unicode", layer=layer, entry=e.name) from None
    table = TOCTable()
    for e in entries:
        table.add_entry(e)
    _build_tree(table, layer)
    return TOC(table, version=version)


def _build_tree(t: TOCTable, layer: str | None, *, max_names: int | None = None) -> None:
    """Give the explicit rows of ``t`` their nodes, with implicit parents; resolve hardlinks.

    The rules of :func:`make_toc`. Rows are visited in blob order, so the first error in
    blob order is the one raised. ``max_names`` bounds the stored names, implicit
    directories' included (a deep path implies a name for each of its ancestors).
    """
    names, name_off, types, flags = t.names, t.name_off, t.types, t.flags
    node_row, node_links, resolved = t.node_row, t.node_links, t.resolved
    find, new_node = t.find, t.new_node
    t.reserve_nodes(t.explicit + t.explicit // 16 + 16)

    def fail(message: str, row: int) -> NoReturn:
        raise EntryError(message, layer=layer, entry=t.name(row), offset=t.first_offset(row))

    def add_parents(row: int, path: bytes) -> int:
        """Create the implicit directory ``path`` (the parent of ``row``) and its missing
        ancestors; its node."""
        missing: list[bytes] = []
        p = path
        while (node := find(p)) < 0:
            missing.append(p)
            p = p[: max(p.rfind(b"/"), 0)]
        if types[node_row[node]] != DIR:
            fail(f"ancestor {_show(decode_name(p))} is not a directory", row)
        for d in reversed(missing):
            parent = node
            node = new_node(t.add_implicit_dir(d), parent, d)
            node_links[node] = 2
            node_links[parent] += 1
        if max_names is not None and len(t.names) > max_names:
            raise TOCTooLargeError(
                f"the names of the TOC's entries and of their implied parent directories "
                f"exceed {max_names} bytes",
                layer=layer,
                entry=t.name(row),
            )
        return node

    # Hardlink nodes -> their row, in order of first appearance as a hardlink.
    hardlinks: dict[int, int] = {}
    # The parent of the previous row, which is most often the next row's too.
    last_parent_key = b"\0"
    last_parent = -1
    for row in range(1, t.explicit + 1):
        key = bytes(names[name_off[row] : name_off[row + 1]])
        typ = types[row]
        is_dir = typ == DIR
        node = find(key)
        if node >= 0:
            old = node_row[node]
            if (types[old] == DIR) != is_dir:
                if flags[old] & IMPLICIT:
                    fail("a directory that has entries under it is listed as a non-directory", row)
                fail("a name is listed both as a directory and as a non-directory", row)
            # A directory needed as a parent before its own entry came, or a duplicate:
            # the later entry takes the name, in the earlier one's place among its
            # siblings (a directory keeps its children).
            if not flags[old] & IMPLICIT:
                flags[old] |= DEAD
                t.dead += 1
            node_row[node] = row
            if typ == HARDLINK:
                hardlinks[node] = row
            else:
                hardlinks.pop(node, None)
                if not is_dir:
                    node_links[node] = 1
            continue
        slash = key.rfind(b"/")
        parent_key = key[:slash] if slash >= 0 else b""
        if parent_key == last_parent_key:
            parent = last_parent
        else:
            parent = find(parent_key)
            if parent < 0:
                parent = add_parents(row, parent_key)
            elif types[node_row[parent]] != DIR:
                fail(f"parent {_show(decode_name(parent_key))} is not a directory", row)
            last_parent_key, last_parent = parent_key, parent
        node = new_node(row, parent, key)
        if is_dir:
            node_links[node] = 2
            node_links[parent] += 1
        elif typ == HARDLINK:
            hardlinks[node] = row
        else:
            node_links[node] = 1

    def data(node: int) -> int:
        # What the tree holds at ``node`` so far: hardlinks resolved one by one.
        return -1 if node < 0 else resolved.get(node, node_row[node])

    for node, row in hardlinks.items():
        target = data(find(t.link_bytes(row)))
        hops = 0
        while target >= 0 and types[target] == HARDLINK:
            hops += 1
            if hops > _MAX_LINK_HOPS or target == row:
                fail("hardlink chain is circular or too long", row)
            target = data(find(t.link_bytes(target)))
        if target < 0:
            fail(f"hardlink to missing entry {_show(t.link(row))}", row)
        if types[target] == DIR:
            fail(f"hardlink to directory {_show(t.link(row))}", row)
        resolved[node] = target
        node_links[find(t.name_bytes(target))] += 1
    # Only needed to append children.
    t.node_last = array("i")


# --------------------------------------------------------------------------------------
# Parsing

# Decompressed TOC bytes are parsed in pieces of this size.
TOC_PIECE: Final = 1 << 20
_WHITESPACE = re.compile(r"[ \t\n\r]*").match
# A value parsed this close to the end of the text at hand is parsed again with more
# text: a number cut by the end of a piece would parse as a shorter number.
_LOOKAHEAD: Final = 8


def parse_toc(
    data: bytes | Iterable[bytes],
    *,
    layer: str | None = None,
    payload_end: int,
    limits: Limits = DEFAULT_LIMITS,
    require_chunk_digests: bool = True,
) -> TOC:
    """Parse the uncompressed TOC JSON ``data`` into a validated, normalised :class:`TOC`.

    ``data`` is the JSON, or an iterable of its successive pieces (as they are
    decompressed): it is parsed one entry at a time, so neither the JSON text nor its
    decoded objects are held whole, and an entry longer than the limit is refused before
    more of it is read. ``payload_end`` is where the blob's data members end
    (:meth:`Footer.payload_end`); every chunk must start before it.
    ``require_chunk_digests=False`` accepts legacy stargz TOCs without ``chunkDigest``:
    such pieces get the file's ``digest`` when the file has one piece, and an empty
    digest otherwise.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) > limits.max_toc_bytes:
            raise TOCTooLargeError(
                f"TOC of {len(data)} bytes exceeds the limit of {limits.max_toc_bytes}",
                layer=layer,
            )
        pieces: Iterable[bytes] = _pieces_of(data)
    else:
        pieces = data
    text = _JSONText(iter(pieces), layer, limits)
    parser = _EntryParser(layer, payload_end, limits, require_chunk_digests)
    with _collector_paused():
        version = _parse_document(text, parser, layer)
        _build_tree(parser.table, layer, max_names=2 * limits.max_toc_bytes)
    return TOC(parser.table, version=version)


def _pieces_of(data: bytes | bytearray | memoryview) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(view), TOC_PIECE):
        yield bytes(view[start : start + TOC_PIECE])


def _parse_document(text: _JSONText, parser: _EntryParser, layer: str | None) -> int:
    """Read the TOC object, feeding its entries to ``parser`` as they come; its version."""
    c = text.skip_whitespace()
    if c != "{":
        text.value()  # a JSON error if it is not JSON at all
        raise TOCError("TOC is not a JSON object", layer=layer)
    text.pos += 1
    version: object = None
    seen_entries = False
    c = text.skip_whitespace()
    if c == "}":
        text.pos += 1
    else:
        while True:
            if c != '"':
                raise text.error("Expecting property name enclosed in double quotes")
            key = text.value()
            if text.skip_whitespace() != ":":
                raise text.error("Expecting ':' delimiter")
            text.pos += 1
            c = text.skip_whitespace()
            if key == "entries":
                if seen_entries:
                    raise TOCError("TOC has more than one list of entries", layer=layer)
                seen_entries = True
                if c != "[":
                    text.value()
                    raise TOCError("TOC entries are not a list", layer=layer)
                text.pos += 1
                parser.run(text.items())
            elif key == "version":
                version = text.value()
                if type(version) is not int or version != 1:
                    raise TOCError(f"unsupported TOC version {_show(version)}", layer=layer)
            else:
                text.value()  # not used
            c = text.skip_whitespace()
            if c == ",":
                text.pos += 1
                c = text.skip_whitespace()
                continue
            if c == "}":
                text.pos += 1
                break
            raise text.error("Expecting ',' delimiter")
    if text.skip_whitespace():
        raise text.error("Extra data")
    if version is None:
        raise TOCError("unsupported TOC version None", layer=layer)
    if not seen_entries:
        parser.run(iter(()))
    return 1


class _JSONText:
    """The TOC's JSON text, decoded from its pieces only as far as the parse has got.

    ``buf[pos:]`` is the text not parsed yet; text before ``pos`` is dropped whenever
    more is read. A value (an entry, say) must fit in ``limits.max_entry_json``
    characters: one that is still unfinished at that length is refused.
    """

    def __init__(self, pieces: Iterator[bytes], layer: str | None, limits: Limits) -> None:
        self.pieces = pieces
        self.layer = layer
        self.max_bytes = limits.max_toc_bytes
        self.max_value = limits.max_entry_json
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        # The C scanner behind json.loads, one value at a time.
        self.scan: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(  # type: ignore[attr-defined]
            json.JSONDecoder()
        )
        self.buf = ""
        self.pos = 0
        # Characters dropped before buf, and bytes read.
        self.dropped = 0
        self.nbytes = 0
        self.eof = False
        self.entry = 0

    def error(self, message: str, pos: int | None = None) -> TOCError:
        at = self.dropped + (self.pos if pos is None else pos)
        return TOCError(f"TOC is not valid JSON: {message} at character {at}", layer=self.layer)

    def more(self) -> bool:
        """Append the next piece of text; False if the TOC has ended."""
        if self.eof:
            return False
        text = ""
        piece: bytes | None = None
        try:
            while not text:
                piece = next(self.pieces, None)
                if piece is None:
                    self.eof = True
                    text = self.decoder.decode(b"", final=True)
                    break
                self.nbytes += len(piece)
                if self.nbytes > self.max_bytes:
                    raise TOCTooLargeError(
                        f"TOC of more than {self.max_bytes} bytes exceeds the limit",
                        layer=self.layer,
                    )
                text = self.decoder.decode(piece)
        except UnicodeDecodeError as exc:
            at = self.nbytes - len(piece) + exc.start if piece is not None else self.nbytes
            raise TOCError(
                f"TOC is not valid JSON: not UTF-8 at byte {at}", layer=self.layer
            ) from None
        if self.pos:
            self.dropped += self.pos
            self.buf = self.buf[self.pos :] + text
            self.pos = 0
        else:
            self.buf += text
        return True

    def skip_whitespace(self) -> str:
        """Skip to the next character that is not whitespace; it, or "" at the end."""
        while True:
            self.pos = _WHITESPACE(self.buf, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""

    def value(self) -> Any:
        """The JSON value at ``pos``, reading more text until it is whole."""
        while True:
            buf, start = self.buf, self.pos
            problem: tuple[str, int] | None = None
            try:
                value, end = self.scan(buf, start)
            except StopIteration as exc:
                problem = ("Expecting value", exc.value)
            except json.JSONDecodeError as exc:
                problem = (exc.msg, exc.pos)
            except RecursionError:
                raise self.error("values nested too deeply") from None
            else:
                if self.eof or len(buf) - end >= _LOOKAHEAD:
                    self.pos = end
                    return value
            # Is the value cut off by the end of the text at hand, or just not valid?
            if problem is not None:
                message, at = problem
                if self.eof or not (
                    at >= len(buf) - _LOOKAHEAD or message.startswith("Unterminated string")
                ):
                    raise self.error(message, at)
            if len(buf) - start > self.max_value:
                what = "an entry" if self.entry else "a value"
                raise TOCTooLargeError(
                    f"TOC has {what} longer than the limit of {self.max_value} characters of "
                    "JSON (Limits.max_entry_json)",
                    layer=self.layer,
                    entry=f"#{self.entry - 1}" if self.entry else None,
                )
            self.more()

    def items(self) -> Iterator[Any]:
        """The values of the array whose "[" was just read, one at a time."""
        c = self.skip_whitespace()
        if c == "]":
            self.pos += 1
            return
        while True:
            self.entry += 1
            yield self.value()
            c = self.skip_whitespace()
            if c == ",":
                self.pos += 1
                self.skip_whitespace()
            elif c == "]":
                self.pos += 1
                self.entry = 0
                return
            else:
                raise self.error("Expecting ',' delimiter")


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Hold off the cyclic garbage collector while a large TOC is turned into entries.

    The parse allocates a dict per entry and drops it; the collector would otherwise walk
    the heap again and again while it grows. Collection resumes afterwards (unless
    someone else had turned it off).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _EntryParser:
    """Turns the raw entry dicts, as they are parsed, into rows of a TOCTable.

    The common case (well-formed fields, plain "...Z" times) runs inline with no calls
    per field; anything unusual drops to a checking method that either accepts the value
    or raises. Nothing of an entry's dict is kept but its values, in the table's columns.
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
        self.table = TOCTable(
            wide_chunks=max(limits.max_chunk_size, limits.max_inner_offset) >= 1 << 32,
            # Offsets into the names and links (no more than the TOC's bytes) and chunk
            # numbers (no more than its entries).
            wide_offsets=max(limits.max_toc_bytes, limits.max_entries) >= 1 << 32,
        )

    def fail(self, message: str, name: object, offset: int | None = None) -> NoReturn:
        entry = name[:_SHOW_MAX] if isinstance(name, str) else _show(name)
        raise EntryError(message, layer=self.layer, entry=entry, offset=offset)

    def run(self, raw_entries: Iterator[Any]) -> None:
        limits = self.limits
        payload_end = self.payload_end
        max_entries = limits.max_entries
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
        t = self.table
        owner = t.owner
        add_digest = t.add_digest
        row_xattrs, row_devs = t.xattrs, t.devs
        names, links = t.names, t.links
        name_off_append, link_off_append = t.name_off.append, t.link_off.append
        types_append, flags_append = t.types.append, t.flags.append
        modes_append, uids_append, gids_append = t.modes.append, t.uids.append, t.gids.append
        users_append, groups_append = t.users.append, t.groups.append
        sizes_append, mtimes_append = t.sizes.append, t.mtimes.append
        digest_of_append, chunk_lo_append = t.digest_of.append, t.chunk_lo.append
        c_offset, c_inner = t.c_offset, t.c_inner
        c_offset_append, c_inner_append = c_offset.append, c_inner.append
        c_file_offset_append, c_size_append = t.c_file_offset.append, t.c_size.append
        c_digest_append = t.c_digest.append
        row = t.rows - 1
        # The file whose pieces are being collected (open_row < 0: none).
        open_row = -1
        open_name = ""
        open_size = 0
        open_next = 0  # the file offset the next piece must start at
        open_digest = ""
        open_digest_index = NO_DIGEST
        prev_offset = 0
        prev_inner_end = 0

        for i, raw in enumerate(raw_entries):
            if i >= max_entries:
                raise TOCTooLargeError(
                    f"TOC has more than the limit of {max_entries} entries", layer=self.layer
                )
            if type(raw) is not dict:
                fail(f"entry {i} is not a JSON object", f"#{i}")
            get = raw.get
            typ = get("type")
            if typ == "chunk":
                if open_row < 0:
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
                if open_row >= 0 and open_next != open_size:
                    fail(f"pieces cover {open_next} of the file's {open_size} bytes", open_name)
                open_row = -1
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
                    modtime = NO_MODTIME
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
                xattrs = self.xattrs(xattrs, name) if xattrs else None
                digest = get("digest") or ""
                if digest and (type(digest) is not str or not digest_ok(digest)):
                    fail(f"malformed digest {_show(digest)}", name)
                if typ != "reg":
                    size = 0

                row += 1
                names += name.encode()
                name_off_append(len(names))
                types_append(_TYPE_CODE[typ])
                flags_append(0)
                modes_append(mode & 0o7777)
                uids_append(uid)
                gids_append(gid)
                users_append(owner(user) if user else 0)
                groups_append(owner(group) if group else 0)
                sizes_append(size)
                mtimes_append(modtime)
                if link:
                    links += link.encode()
                link_off_append(len(links))
                digest_index = add_digest(digest) if digest else NO_DIGEST
                digest_of_append(digest_index)
                chunk_lo_append(len(c_offset))
                if xattrs:
                    row_xattrs[row] = xattrs
                if major or minor:
                    row_devs[row] = (major, minor)
                if size == 0:
                    continue
                # A non-empty regular file: its first piece follows.
                open_row = row
                open_name = name
                open_size = size
                open_next = 0
                open_digest = digest
                open_digest_index = digest_index
                chunk_offset = get("chunkOffset", 0)
                if type(chunk_offset) is not int or chunk_offset != 0:
                    # (0.0 and False equal 0 too, but are not the integer JSON demands.)
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
                digest_index = (
                    open_digest_index if chunk_offset == 0 and size == open_size else NO_DIGEST
                )
            elif digest == open_digest:
                digest_index = open_digest_index  # one stored digest for both
            elif type(digest) is not str or not digest_ok(digest):
                fail(f"malformed chunkDigest {_show(digest)}", name, offset)
            else:
                digest_index = add_digest(digest)
            c_offset_append(offset)
            c_inner_append(inner)
            c_file_offset_append(chunk_offset)
            c_size_append(size)
            c_digest_append(digest_index)
            open_next = chunk_offset + size

        if open_row >= 0 and open_next != open_size:
            fail(f"pieces cover {open_next} of the file's {open_size} bytes", open_name)
        t.explicit = row

        # Where each piece's compressed run ends: the next member start after it (section 5
        # of the reference), capped at the end of the payload.
        count = len(c_offset)
        ends = array("Q", bytes(8 * count))
        last = payload_end
        for k in range(count - 1, -1, -1):
            ends[k] = last
            if c_inner[k] == 0:
                last = c_offset[k]
        t.c_end = ends

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
