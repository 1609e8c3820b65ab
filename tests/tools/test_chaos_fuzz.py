"""The short version of ``python -m tools.chaos fuzz``: 20,000 inputs made from the
reference blobs reach the footer and TOC parsers, and each is accepted or refused with a
``FormatError``, nothing else."""

from __future__ import annotations

from random import Random

from tools.chaos import _fuzz


def test_twenty_thousand_inputs_raise_nothing_but_format_errors() -> None:
    result = _fuzz.fuzz(20_000, seed=13, workers=2)
    assert result.inputs == 20_000
    unexpected = [
        f"{t.target}:{u['index']} ({u['input']}): {u['error']}"
        for t in result.targets.values()
        for u in t.unexpected
    ]
    assert unexpected == [], "replay with --seed 13 --replay TARGET:INDEX\n" + "\n".join(
        unexpected[:5]
    )
    for t in result.targets.values():
        # Every target got its share, and its inputs went both ways: a mutator that broke
        # every input (or none) would test nothing.
        assert t.inputs == _fuzz.plan(20_000)[t.target]
        assert t.accepted > 0 and t.refused_total > 0, t
        assert t.accepted + t.refused_total == t.inputs
    assert {"FooterError", "DecompressionError", "TOCDigestMismatch", "EntryError"} <= {
        name for t in result.targets.values() for name in t.refused
    }
    assert 0 < result.peak_rss_kib < _fuzz.ADDRESS_SPACE // 1024


def test_an_input_is_the_same_from_its_seed_target_and_index() -> None:
    materials = _fuzz.load_material()
    for target in _fuzz.TARGETS:
        a = _fuzz.make_input(5, target, 77, materials)
        b = _fuzz.make_input(5, target, 77, materials)
        assert a.describe == b.describe
        assert _fuzz.run_one(a) == _fuzz.run_one(b)
    assert _fuzz.replay(5, "footer", 77).startswith("footer:77 (seed 5), footer of ")


def test_an_error_other_than_format_error_is_reported_as_unexpected() -> None:
    def broken() -> None:
        raise KeyError("entries")

    outcome, detail = _fuzz.run_one(_fuzz.Input(broken, "a parser that slips"))
    assert outcome == "unexpected"
    assert detail is not None and "KeyError: 'entries'" in detail


def test_mutated_bytes_differ_and_stay_deterministic() -> None:
    data = b'{"version": 1, "entries": []}'
    outs = {_fuzz.mutate_bytes(Random(i), data) for i in range(50)}
    assert data not in outs or len(outs) > 40
    assert _fuzz.mutate_bytes(Random(1), data) == _fuzz.mutate_bytes(Random(1), data)


def test_the_memory_blob_reads_like_a_file() -> None:
    blob = _fuzz.MemoryBlob(10, b"abc")
    assert blob.size == 13
    assert blob.read_range(8, 4) == b"\0\0ab"
    assert blob.read_range(11, 2) == b"bc"
