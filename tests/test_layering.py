"""The import graph keeps the layers the repository is cut into.

Installed: ``blockfs`` (the library, the host machinery and the command) and
``snapshotter`` (the containerd adapter, which uses blockfs). Not installed: ``tools``
(development scripts) and ``plugins`` (the nbdkit plugin, installed as package data of
``blockfs.host.plugin`` and loaded by nbdkit, never imported). So:

- blockfs imports neither snapshotter, plugins nor tools (``blockfs image pull`` reaches
  snapshotter through an entry point, not an import);
- snapshotter imports neither tools nor plugins;
- plugins imports only blockfs, the standard library and nbdkit;
- inside blockfs: host imports neither mount nor cli, mount does not import cli, and the
  library packages (and the top-level modules) import none of host, mount and cli.

Every form of import counts: ``import x``, ``from x import y`` (also ``from blockfs import
cli``, which imports the package ``blockfs.cli``), relative imports, imports under
``TYPE_CHECKING`` and ``importlib.import_module``/``__import__`` of a string literal.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]

LIBRARY = ("estargz", "erofs", "oci", "registry", "cache", "image", "convert")


@dataclass(frozen=True)
class Rule:
    importers: tuple[str, ...]  # modules (and their submodules) the rule applies to
    forbidden: tuple[str, ...]  # modules (and their submodules) they must not import
    why: str
    exempt: tuple[str, ...] = ()  # importers the rule does not apply to


RULES = (
    Rule(
        ("blockfs",),
        ("snapshotter", "plugins", "tools", "blockfs.host.plugin"),
        "blockfs is the bottom layer; it never imports snapshotter, plugins or tools",
    ),
    Rule(
        ("snapshotter",),
        ("tools", "plugins", "blockfs.host.plugin"),
        "snapshotter is installed; tools and plugins are not importable packages",
    ),
    Rule(
        ("blockfs.host",),
        ("blockfs.mount", "blockfs.cli"),
        "host machinery is below the standalone mounts and the command",
    ),
    Rule(("blockfs.mount",), ("blockfs.cli",), "standalone mounts are below the command"),
    Rule(
        ("blockfs", *(f"blockfs.{name}" for name in LIBRARY)),
        ("blockfs.host", "blockfs.mount", "blockfs.cli"),
        "the library packages are below the host machinery, the mounts and the command",
        exempt=("blockfs.host", "blockfs.mount", "blockfs.cli"),
    ),
)

# What plugins/ may import: the only thing it stands on is blockfs.
PLUGIN_ALLOWED = frozenset({"blockfs", "nbdkit", "__future__", *sys.stdlib_module_names})


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of a relative import ``from {'.' * level}{target} import …``."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)] if level > 1 else package
    return ".".join([*base, target] if target else base)


@dataclass(frozen=True)
class Edge:
    path: Path
    line: int
    imported: str


def imports(path: Path, root: Path) -> Iterator[Edge]:
    """Every module ``path`` imports, with its line."""
    module = module_name(path, root)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Edge(path, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve(module, is_package, node.level, node.module)
            else:
                base = node.module or ""
            yield Edge(path, node.lineno, base)
            # `from pkg import name` imports pkg.name when that is a module.
            for alias in node.names:
                if alias.name != "*":
                    yield Edge(path, node.lineno, f"{base}.{alias.name}" if base else alias.name)
        elif isinstance(node, ast.Call) and (name := _dynamic_import(node)) is not None:
            if name.startswith("."):
                level = len(name) - len(name.lstrip("."))
                name = _resolve(module, is_package, level, name.lstrip(".") or None)
            yield Edge(path, node.lineno, name)


def _dynamic_import(node: ast.Call) -> str | None:
    """The module named by ``importlib.import_module("…")`` or ``__import__("…")``."""
    if not node.args:
        return None
    func = node.func
    if not (
        (isinstance(func, ast.Attribute) and func.attr == "import_module")
        or (isinstance(func, ast.Name) and func.id in ("import_module", "__import__"))
    ):
        return None
    arg = node.args[0]
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None


def sources(root: Path) -> Iterator[Path]:
    for top in ("blockfs", "snapshotter", "plugins", "tools"):
        for path in sorted((root / top).rglob("*.py")):
            if "__pycache__" not in path.parts:
                yield path


def violations(root: Path) -> list[str]:
    """Every import edge that breaks a layering rule, as ``file:line -> module (why)``."""
    found = []
    for path in sources(root):
        module = module_name(path, root)
        where = path.relative_to(root)
        for edge in imports(path, root):
            if module.split(".")[0] == "plugins":
                if edge.imported.split(".")[0] not in PLUGIN_ALLOWED:
                    found.append(
                        f"{where}:{edge.line} -> {edge.imported} "
                        "(plugins imports only blockfs, the standard library and nbdkit)"
                    )
                continue
            for rule in RULES:
                if (
                    _within(module, rule.importers)
                    and not _within(module, rule.exempt)
                    and _within(edge.imported, rule.forbidden)
                ):
                    found.append(f"{where}:{edge.line} -> {edge.imported} ({rule.why})")
    return sorted(set(found), key=lambda v: (v.split(":")[0], int(v.split(":")[1].split()[0]), v))


def test_every_module_is_parsed() -> None:
    names = {module_name(p, PROJECT) for p in sources(PROJECT)}
    for expected in (
        "blockfs.cli",
        "blockfs.host.nbdserver",
        "blockfs.mount.layer",
        "blockfs.image",
        "snapshotter.daemon",
        "plugins.blockfs_nbdkit",
    ):
        assert expected in names
    assert any(e.imported.startswith("blockfs.image") for e in imports(
        PROJECT / "plugins" / "blockfs_nbdkit.py", PROJECT
    ))  # fmt: skip


def test_import_graph_keeps_the_layers() -> None:
    found = violations(PROJECT)
    assert not found, f"{len(found)} imports break the layering:\n" + "\n".join(found)


def _tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_check_finds_every_kind_of_offending_import(tmp_path: Path) -> None:
    """The checker against a small tree where every rule is broken once, in every form."""
    _tree(
        tmp_path,
        {
            "blockfs/__init__.py": "",
            "blockfs/errors.py": "",
            "blockfs/cli/__init__.py": "import blockfs.host\nimport snapshotter.pullcmd\n",
            "blockfs/host/__init__.py": "",
            "blockfs/host/attach.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n"
                "    from blockfs.cli import main\n"
                "from .. import mount\n"
            ),
            "blockfs/mount/__init__.py": "from ..cli import _common\n",
            "blockfs/image/__init__.py": (
                "import importlib\n"
                "importlib.import_module('blockfs.host.nbdserver')\n"
                "__import__('tools.demo')\n"
                "from blockfs.errors import BlockfsError\n"
            ),
            "blockfs/oci/_x.py": "from . import _y\nfrom blockfs import mount as m\n",
            "snapshotter/__init__.py": "import blockfs.mount\nfrom plugins import blockfs_nbdkit\n",
            "snapshotter/pullcmd.py": "from tools.local_containerd import x\n",
            "plugins/__init__.py": "",
            "plugins/blockfs_nbdkit.py": (
                "import os\nimport nbdkit\nfrom blockfs.image import ServedLayers\n"
                "import httpx\nfrom . import helper\n"
            ),
            "tools/__init__.py": "import snapshotter\nimport plugins\n",
        },
    )
    found = violations(tmp_path)
    edges = [v.split(" (")[0] for v in found]
    assert edges == [
        "blockfs/cli/__init__.py:2 -> snapshotter.pullcmd",
        "blockfs/host/attach.py:3 -> blockfs.cli",
        "blockfs/host/attach.py:3 -> blockfs.cli.main",
        "blockfs/host/attach.py:4 -> blockfs.mount",
        "blockfs/image/__init__.py:2 -> blockfs.host.nbdserver",
        "blockfs/image/__init__.py:3 -> tools.demo",
        "blockfs/mount/__init__.py:1 -> blockfs.cli",
        "blockfs/mount/__init__.py:1 -> blockfs.cli._common",
        "blockfs/oci/_x.py:2 -> blockfs.mount",
        "plugins/blockfs_nbdkit.py:4 -> httpx",
        "plugins/blockfs_nbdkit.py:5 -> plugins",
        "plugins/blockfs_nbdkit.py:5 -> plugins.helper",
        "snapshotter/__init__.py:2 -> plugins",
        "snapshotter/__init__.py:2 -> plugins.blockfs_nbdkit",
        "snapshotter/pullcmd.py:1 -> tools.local_containerd",
        "snapshotter/pullcmd.py:1 -> tools.local_containerd.x",
    ], "\n".join(found)
