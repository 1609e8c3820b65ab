"""containerd's filter language as the snapshotter parses and matches it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from snapshotter.filters import (
    FieldLookup,
    Filter,
    FilterSyntaxError,
    Operator,
    Selector,
    parse_filter,
    parse_filters,
)


def lookup(fields: Mapping[str, str]) -> FieldLookup:
    def field(path: Sequence[str]) -> str | None:
        return fields.get(".".join(path))

    return field


def test_containerd_handshake_filter_parses_into_two_selectors() -> None:
    f = parse_filter(
        'labels."containerd.io/snapshot.ref"==sha256:abc,parent=="default/3/sha256:def"'
    )
    assert f == Filter(
        (
            Selector(("labels", "containerd.io/snapshot.ref"), Operator.EQUAL, "sha256:abc"),
            Selector(("parent",), Operator.EQUAL, "default/3/sha256:def"),
        )
    )


def test_unquoted_value_runs_to_the_comma_and_may_hold_dots_and_slashes() -> None:
    f = parse_filter("name==a.b/c:d,kind==view")
    assert [s.value for s in f.selectors] == ["a.b/c:d", "view"]


def test_field_without_operator_tests_presence() -> None:
    f = parse_filter("labels.foo")
    assert f.selectors == (Selector(("labels", "foo")),)
    assert f.matches(lookup({"labels.foo": ""}))
    assert not f.matches(lookup({}))


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (r'name=="a\"b"', 'a"b'),
        (r'name=="tab\there"', "tab\there"),
        (r'name=="\x41\u00e9\101"', "AéA"),
        ("name==/slash quoted/", "slash quoted"),
        (r"name==|pipe\|quoted|", "pipe|quoted"),
        ('name == "spaced"', "spaced"),
    ],
)
def test_quoted_values_and_escapes(text: str, value: str) -> None:
    assert parse_filter(text).selectors[0].value == value


@pytest.mark.parametrize(
    "text",
    ["name==", "name=", "==x", "name==x,", 'name=="open', r'name=="\q"', "name==x y", "a..b"],
)
def test_malformed_filter_raises_filter_syntax_error(text: str) -> None:
    with pytest.raises(FilterSyntaxError) as info:
        parse_filter(text)
    assert info.value.expression == text


def test_selectors_of_one_filter_must_all_match() -> None:
    f = parse_filter("name==a,kind==view")
    assert f.matches(lookup({"name": "a", "kind": "view"}))
    assert not f.matches(lookup({"name": "a", "kind": "active"}))


def test_any_filter_of_a_request_may_match() -> None:
    fs = parse_filters(["name==a", "name==b"])
    assert fs.matches(lookup({"name": "b"}))
    assert not fs.matches(lookup({"name": "c"}))


def test_no_filters_and_the_empty_filter_match_everything() -> None:
    assert parse_filters([]).matches(lookup({}))
    assert parse_filters([""]).matches(lookup({}))


def test_not_equal_treats_a_missing_field_as_empty() -> None:
    assert parse_filter("labels.x!=1").matches(lookup({}))
    assert not parse_filter("labels.x!=1").matches(lookup({"labels.x": "1"}))


def test_regexp_searches_and_a_bad_regexp_matches_nothing() -> None:
    assert parse_filter("name~=b.d").matches(lookup({"name": "abcde"}))
    assert not parse_filter("name~=[").matches(lookup({"name": "["}))
