"""blockfs.cli._plugins: entry points found as importlib.metadata finds them, cheaper."""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockfs.cli import _plugins
from blockfs.cli._image import IMAGE_COMMANDS


def _dist(directory: Path, name: str, entry_points: str | None) -> None:
    info = directory / name
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.split('-')[0]}\n")
    if entry_points is not None:
        (info / "entry_points.txt").write_text(entry_points)


def test_the_installed_commands_are_importlib_metadatas() -> None:
    ours = _plugins.entry_points(IMAGE_COMMANDS)
    theirs = [(e.name, e.value) for e in importlib.metadata.entry_points(group=IMAGE_COMMANDS)]
    assert ours == theirs
    assert ("pull", "snapshotter.pullcmd:add_pull_command") in ours


def test_the_first_distribution_of_a_name_on_the_path_wins(tmp_path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    group = "[blockfs.image_commands]\n"
    _dist(first, "My_Tool-1.0.dist-info", f"# a comment\n{group}one = a.b:c\n\n[other]\nx = y:z\n")
    _dist(second, "my.tool-2.0.dist-info", f"{group}two = d:e\n")
    _dist(second, "other-1.0.egg-info", f"; note\n{group} three = f.g:h.i [extra]\n")
    _dist(second, "bare-1.0.dist-info", None)
    (second / "not-metadata.txt").write_text("")
    path = [str(first), str(tmp_path / "missing"), str(second)]
    found = _plugins.entry_points(IMAGE_COMMANDS, path)
    assert found == [("one", "a.b:c"), ("three", "f.g:h.i [extra]")]
    # The shadowed distribution is there (importlib.metadata lists it too), only unused.
    shadowed = [d.entry_points for d in importlib.metadata.distributions(path=[str(second)])]
    assert any(ep.name == "two" for eps in shadowed for ep in eps)


def test_a_named_entry_point_is_the_first_and_ends_the_search(tmp_path, monkeypatch) -> None:
    first, second, third = tmp_path / "first", tmp_path / "second", tmp_path / "third"
    group = "[blockfs.image_commands]\n"
    _dist(first, "a-1.0.dist-info", f"{group}one = a:b\n")
    _dist(second, "b-1.0.dist-info", f"{group}two = c:d\nthree = e:f\n")
    _dist(second, "c-1.0.dist-info", f"{group}two = g:h\n")
    _dist(third, "d-1.0.dist-info", f"{group}two = i:j\n")
    listed: list[str] = []
    distributions = _plugins._distributions

    def listing(directory: str) -> Iterator[tuple[str, str]]:
        listed.append(directory)
        return distributions(directory)

    monkeypatch.setattr(_plugins, "_distributions", listing)
    path = [str(first), str(second), str(third)]
    assert _plugins.entry_points(IMAGE_COMMANDS, path, name="two") == [("two", "c:d")]
    assert listed == [str(first), str(second)]  # the third is never read
    assert _plugins.entry_points(IMAGE_COMMANDS, path, name="four") == []
    # Without a name, every distribution's (the first of each name).
    assert _plugins.entry_points(IMAGE_COMMANDS, path) == [
        ("one", "a:b"), ("two", "c:d"), ("three", "e:f"), ("two", "g:h"), ("two", "i:j"),
    ]  # fmt: skip


def test_load_follows_the_attributes_and_ignores_extras(tmp_path, monkeypatch) -> None:
    (tmp_path / "plugmod.py").write_text("class A:\n    class B:\n        value = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _plugins.load("plugmod:A.B [extra]").value == 42
    assert _plugins.load("plugmod").__name__ == "plugmod"
    with pytest.raises(AttributeError):
        _plugins.load("plugmod:A.C")
    sys.modules.pop("plugmod", None)
