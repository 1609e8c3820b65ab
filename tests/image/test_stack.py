"""find_file and find_command: a path of a stacked image, found in its layers' TOCs the
way overlayfs finds it in the mounted layers."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from blockfs.estargz import TOC, BlobReader, BuildOptions, FileBlobSource, build_file
from blockfs.image import find_command, find_file
from blockfs.oci import ProcessConfig

# A layer: name -> bytes (a regular file), "dir", ("symlink", target) or ("hardlink", target).
Spec = bytes | str | tuple[str, str]


def toc_of(
    tmp_path: Path, name: str, files: dict[str, Spec], modes: dict[str, int] | None = None
) -> TOC:
    """The TOC of an eStargz layer made (by the writer) from a tar of ``files``; regular
    files are executable unless ``modes`` says otherwise."""
    tar_path = tmp_path / f"{name}.tar"
    with tarfile.open(tar_path, "w") as tar:
        for path, spec in files.items():
            info = tarfile.TarInfo(path)
            data = b""
            if spec == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif isinstance(spec, tuple):
                kind, target = spec
                info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                info.linkname = target
            else:
                assert isinstance(spec, bytes)
                data, info.size = spec, len(spec)
                info.mode = (modes or {}).get(path, 0o755)
            tar.addfile(info, io.BytesIO(data))
    blob = tmp_path / f"{name}.esgz"
    build_file(tar_path, blob, BuildOptions())
    return BlobReader.open(FileBlobSource(blob)).toc


def test_a_file_is_found_in_the_highest_layer_that_has_it(tmp_path: Path) -> None:
    lower = toc_of(tmp_path, "lower", {"usr/bin/tool": b"old", "usr/bin/other": b"o"})
    upper = toc_of(tmp_path, "upper", {"usr/bin/tool": b"new tool"})
    found = find_file([upper, lower], "/usr/bin/tool")
    assert found is not None and found.layer == 0 and found.entry.size == len(b"new tool")
    found = find_file([upper, lower], "/usr/bin/other")
    assert found is not None and found.layer == 1
    assert find_file([upper, lower], "/usr/bin/missing") is None
    assert find_file([upper, lower], "/usr/bin") is None  # a directory is not a file


def test_symlinks_are_followed_in_every_component_across_layers(tmp_path: Path) -> None:
    # A merged-/usr base (bin -> usr/bin), an interpreter reached by a relative link.
    base = toc_of(tmp_path, "base", {"bin": ("symlink", "usr/bin"), "usr/bin/sh": b"#!shell"})
    app = toc_of(
        tmp_path,
        "app",
        {
            "usr/bin/python3.11": b"\x7fELF python",
            "usr/bin/python3": ("symlink", "python3.11"),
            "usr/local/bin/py": ("symlink", "../../bin/python3"),
            "usr/local/bin/abs": ("symlink", "/bin/python3"),
            "usr/local/bin/up": ("symlink", "/bin/../usr/bin/python3"),  # /usr/usr/bin
            "loop/a": ("symlink", "b"),
            "loop/b": ("symlink", "a"),
        },
    )
    stack = [app, base]
    sh = find_file(stack, "/bin/sh")
    assert sh is not None and (sh.layer, sh.entry.name) == (1, "usr/bin/sh")
    for path in ("/usr/bin/python3", "/usr/local/bin/py", "/usr/local/bin/abs", "/bin/python3"):
        found = find_file(stack, path)
        assert found is not None and (found.layer, found.entry.name) == (0, "usr/bin/python3.11")
    # ".." after a link leaves the link's target, as the kernel's path walk does.
    assert find_file(stack, "/usr/local/bin/up") is None
    assert find_file(stack, "/loop/a") is None  # too many links


def test_whiteouts_and_opaque_directories_hide_lower_files(tmp_path: Path) -> None:
    lower = toc_of(
        tmp_path,
        "lower",
        {"etc/gone": b"x", "opt/app/run": b"x", "srv/keep": b"x", "var/f": b"x"},
    )
    upper = toc_of(
        tmp_path,
        "upper",
        {
            "etc/.wh.gone": b"",  # the file is deleted
            "opt/.wh.app": b"",  # the whole directory is deleted
            "srv/.wh..wh..opq": b"",  # the directory is replaced
            "var": ("symlink", "nowhere"),  # a non-directory over a directory
        },
    )
    stack = [upper, lower]
    for path in ("/etc/gone", "/opt/app/run", "/srv/keep", "/var/f"):
        assert find_file(stack, path) is None, path
    assert find_file([lower], "/srv/keep") is not None


def test_a_hard_link_is_found_as_the_entry_holding_its_data(tmp_path: Path) -> None:
    layer = toc_of(
        tmp_path,
        "layer",
        {"usr/bin/gcc-12": b"\x7fELF gcc" * 100, "usr/bin/cc": ("hardlink", "usr/bin/gcc-12")},
    )
    found = find_file([layer], "/usr/bin/cc")
    assert found is not None and found.entry.name == "usr/bin/gcc-12"
    assert found.span is not None and found.span[0] < found.span[1]


@pytest.mark.parametrize(
    ("process", "expected"),
    [
        (ProcessConfig(cmd=("/usr/bin/python3", "-c", "pass")), "usr/bin/python3.11"),
        (ProcessConfig(entrypoint=("python3",), cmd=("app.py",)), "usr/bin/python3.11"),
        (ProcessConfig(cmd=("sh",), env=("PATH=/opt/bin:/bin",)), "opt/bin/sh"),
        (ProcessConfig(cmd=("./run",), working_dir="/app"), "app/run"),
        (ProcessConfig(cmd=("noexec",)), None),  # in PATH, but not executable
        (ProcessConfig(cmd=("missing",)), None),
        (ProcessConfig(), None),
    ],
)
def test_the_command_is_looked_up_as_execvp_does(
    tmp_path: Path, process: ProcessConfig, expected: str | None
) -> None:
    layer = toc_of(
        tmp_path,
        "layer",
        {
            "usr/bin/python3.11": b"\x7fELF",
            "usr/bin/python3": ("symlink", "python3.11"),
            "opt/bin/sh": b"#!sh",
            "bin/sh": b"#!other sh",
            "app/run": b"#!run",
        },
    )
    # A data file on PATH, not executable: execvp passes it over.
    data = toc_of(tmp_path, "data", {"usr/bin/noexec": b"data"}, modes={"usr/bin/noexec": 0o644})
    found = find_command([layer, data], process)
    assert (None if found is None else found.entry.name) == expected
