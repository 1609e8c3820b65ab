"""containerd's filter language, as containerd sends it in ``List`` requests.

One filter is a comma-separated list of selectors that must all match
(``labels."containerd.io/snapshot.ref"==sha256:…,parent=="default/3/sha256:…"``). A request
carries several filters, and an object is listed when any of them matches. A selector is
``FIELDPATH``, ``FIELDPATH==VALUE``, ``FIELDPATH!=VALUE`` or ``FIELDPATH~=REGEXP``. Field
names are ``[A-Za-z0-9_-]+`` or quoted, joined by dots; values run up to the next comma
or space unless quoted. ``"``, ``/`` and ``|`` quote, with Go's escapes.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Sequence

import attrs

from blockfs.errors import BlockfsError

# What an object reports for a field path: its value, or None when it has no such field.
FieldLookup = Callable[[Sequence[str]], str | None]

_QUOTES = '"/|'
_OPERATOR_CHARS = "=!~"
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
# Escapes followed by a fixed number of digits: \ooo (octal), \xhh, \uhhhh, \Uhhhhhhhh.
_NUMERIC_ESCAPES = {"x": (16, 2), "u": (16, 4), "U": (16, 8)}


class FilterSyntaxError(BlockfsError, ValueError):
    """A filter expression does not parse; carries the expression and the offset."""

    def __init__(self, expression: str, offset: int, reason: str) -> None:
        super().__init__(f"filter {expression!r} at offset {offset}: {reason}")
        self.expression = expression
        self.offset = offset


class Operator(enum.Enum):
    """How a selector compares a field."""

    PRESENT = ""
    EQUAL = "=="
    NOT_EQUAL = "!="
    MATCHES = "~="


@attrs.frozen
class Selector:
    """One ``FIELDPATH OP VALUE`` term."""

    fieldpath: tuple[str, ...]
    operator: Operator = Operator.PRESENT
    value: str = ""

    def matches(self, lookup: FieldLookup) -> bool:
        """Whether the object behind ``lookup`` satisfies this selector."""
        found = lookup(self.fieldpath)
        if self.operator is Operator.PRESENT:
            return found is not None
        if self.operator is Operator.EQUAL:
            return found == self.value
        if self.operator is Operator.NOT_EQUAL:
            # As in containerd, a missing field compares as the empty string.
            return (found or "") != self.value
        try:
            return re.search(self.value, found or "") is not None
        except re.error:
            return False  # containerd logs and treats a bad expression as no match


@attrs.frozen
class Filter:
    """Selectors that must all match; the empty filter matches everything."""

    selectors: tuple[Selector, ...] = ()

    def matches(self, lookup: FieldLookup) -> bool:
        """Whether every selector matches."""
        return all(s.matches(lookup) for s in self.selectors)


@attrs.frozen
class FilterSet:
    """Filters of which any one must match; the empty set matches everything."""

    filters: tuple[Filter, ...] = ()

    def matches(self, lookup: FieldLookup) -> bool:
        """Whether any filter matches (or there are none)."""
        return not self.filters or any(f.matches(lookup) for f in self.filters)


def parse_filters(expressions: Iterable[str]) -> FilterSet:
    """Parse the filters of one request; an object must match any of them."""
    return FilterSet(tuple(parse_filter(e) for e in expressions))


def parse_filter(expression: str) -> Filter:
    """Parse one comma-separated list of selectors."""
    if expression == "":
        return Filter()
    return _Parser(expression).parse()


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, reason: str, offset: int | None = None) -> FilterSyntaxError:
        return FilterSyntaxError(self.text, self.pos if offset is None else offset, reason)

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def parse(self) -> Filter:
        selectors = [self.selector()]
        while (ch := self.peek()) == ",":
            self.pos += 1
            selectors.append(self.selector())
        if ch:
            raise self.error(f"unexpected {ch!r}")
        return Filter(tuple(selectors))

    def selector(self) -> Selector:
        path = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            path.append(self.field())
        if self.peek() in ("", ","):
            return Selector(tuple(path))
        operator = self.operator()
        return Selector(tuple(path), operator, self.value())

    def field(self) -> str:
        ch = self.peek()
        if ch and ch in _QUOTES:
            return self.quoted()
        start = self.pos
        while self.pos < len(self.text) and (
            self.text[self.pos].isascii()
            and (self.text[self.pos].isalnum() or self.text[self.pos] in "_-")
        ):
            self.pos += 1
        if self.pos == start:
            raise self.error("expected a field name or a quoted string")
        return self.text[start : self.pos]

    def operator(self) -> Operator:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in _OPERATOR_CHARS:
            self.pos += 1
        word = self.text[start : self.pos]
        try:
            operator = Operator(word)
        except ValueError:
            operator = Operator.PRESENT
        if operator is Operator.PRESENT:
            raise self.error('expected an operator ("==", "!=" or "~=")', start)
        return operator

    def value(self) -> str:
        ch = self.peek()
        if not ch:
            raise self.error("expected a value")
        if ch in _QUOTES:
            return self.quoted()
        start = self.pos
        while self.pos < len(self.text) and not (
            self.text[self.pos] == "," or self.text[self.pos].isspace()
        ):
            self.pos += 1
        return self.text[start : self.pos]

    def quoted(self) -> str:
        quote = self.text[self.pos]
        start = self.pos
        self.pos += 1
        out: list[str] = []
        while True:
            if self.pos >= len(self.text) or self.text[self.pos] == "\n":
                raise self.error("quoted string not terminated", start)
            ch = self.text[self.pos]
            self.pos += 1
            if ch == quote:
                return "".join(out)
            out.append(self.escape(quote) if ch == "\\" else ch)

    def escape(self, quote: str) -> str:
        if self.pos >= len(self.text):
            raise self.error("escape at end of input")
        ch = self.text[self.pos]
        self.pos += 1
        if ch in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[ch]
        if ch in ("\\", quote):
            return ch
        if ch in "01234567":
            base, count, digits = 8, 3, ch
        elif ch in _NUMERIC_ESCAPES:
            (base, count), digits = _NUMERIC_ESCAPES[ch], ""
        else:
            raise self.error(f"illegal escape \\{ch}", self.pos - 2)
        while len(digits) < count and self.pos < len(self.text):
            digits += self.text[self.pos]
            self.pos += 1
        try:
            if len(digits) < count:
                raise ValueError(digits)
            return chr(int(digits, base))
        except ValueError:
            raise self.error(f"illegal numeric escape \\{ch}{digits}") from None
