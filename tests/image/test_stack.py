"""find_file, find_commands and find_loaded: a path of a stacked image, found in its layers' TOCs the
way overlayfs finds it in the mounted layers."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from blockfs.estargz import TOC, BlobReader, BuildOptions, FileBlobSource, build_file
from blockfs.image import find_arguments, find_commands, find_file, find_loaded
from blockfs.image._elf import LoaderNeeds
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
    found = find_commands([layer, data], process)
    assert [f.entry.name for f in found] == ([] if expected is None else [expected])


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # Docker's shell form: CMD app --port 80.
        (("/bin/sh", "-c", "app --port 80"), ["bin/busybox", "usr/local/bin/app"]),
        (
            ("sh", "-ec", "FOO=1 BAR=x exec /usr/local/bin/app"),
            ["bin/busybox", "usr/local/bin/app"],
        ),
        (("/bin/bash", "-c", "gcc -o /tmp/h /hello.c && /tmp/h"), ["bin/bash", "usr/bin/gcc-12"]),
        # Nothing a shell would look up as it is: expansions, quotes, keywords, builtins.
        (("/bin/sh", "-c", "$APP --port 80"), ["bin/busybox"]),
        (("/bin/sh", "-c", "'app' x"), ["bin/busybox"]),
        (("/bin/sh", "-c", "if true; then app; fi"), ["bin/busybox"]),
        (("/bin/sh", "-c", "cd /srv && app"), ["bin/busybox"]),
        (("/bin/sh", "-c", "missing x"), ["bin/busybox"]),
        (("/bin/sh", "-c", ""), ["bin/busybox"]),
        # Not a shell told to run a script.
        (("/bin/sh", "/run.sh"), ["bin/busybox"]),
        (("/usr/local/bin/app", "-c", "gcc"), ["usr/local/bin/app"]),
    ],
)
def test_a_shell_script_command_is_looked_up_too(
    tmp_path: Path, argv: tuple[str, ...], expected: list[str]
) -> None:
    base = toc_of(
        tmp_path,
        "base",
        {
            "bin/busybox": b"\x7fELF busybox",
            "bin/sh": ("symlink", "busybox"),
            "bin/bash": b"\x7fELF bash",
            "bin/true": ("symlink", "busybox"),
            "usr/bin/gcc-12": b"\x7fELF gcc",
            "usr/bin/gcc": ("symlink", "gcc-12"),
        },
    )
    app = toc_of(tmp_path, "app", {"usr/local/bin/app": b"\x7fELF app"})
    found = find_commands([app, base], ProcessConfig(cmd=argv))
    assert [f.entry.name for f in found] == expected


@pytest.mark.parametrize(
    ("process", "expected"),
    [
        (ProcessConfig(cmd=("python3", "/app/main.py", "--port", "80")), ["app/main.py"]),
        # Relative to WorkingDir, an option's value, each file once.
        (
            ProcessConfig(
                cmd=("java", "-jar", "app.jar", "--config=/etc/app.conf", "app.jar"),
                working_dir="/app",
            ),
            ["app/app.jar", "etc/app.conf"],
        ),
        # A shell form: the script command's own words, up to the first that is not plain.
        (
            ProcessConfig(cmd=("/bin/sh", "-c", "gcc -o /tmp/h /hello.c && cat /etc/app.conf")),
            ["hello.c"],
        ),
        (ProcessConfig(cmd=("sh", "-c", "exec app --config=/etc/app.conf")), ["etc/app.conf"]),
        (ProcessConfig(cmd=("/bin/sh", "-c", "exec python3 '/app/main.py'")), []),
        # Directories, missing files and words that are no paths name nothing.
        (ProcessConfig(cmd=("python3", "/app", "/missing", "-c", "import os; print(1)")), []),
        (ProcessConfig(), []),
    ],
)
def test_the_files_a_command_line_names_are_found(
    tmp_path: Path, process: ProcessConfig, expected: list[str]
) -> None:
    layer = toc_of(
        tmp_path,
        "layer",
        {
            "app/main.py": b"print('hello')",
            "app/app.jar": b"PK jar",
            "etc/app.conf": b"port = 80",
            "hello.c": b"int main() { return 0; }",
        },
    )
    found = find_arguments([layer], process)
    assert [f.entry.name for f in found] == expected


def test_what_the_loader_opens_is_found_in_the_layers_beneath(tmp_path: Path) -> None:
    lib = "usr/lib/x86_64-linux-gnu"
    base = toc_of(
        tmp_path,
        "base",
        {
            "lib64": ("symlink", "usr/lib64"),
            "usr/lib64/ld-linux-x86-64.so.2": ("symlink", "../lib/x86_64-linux-gnu/ld.so"),
            f"{lib}/ld.so": b"loader",
            f"{lib}/libc.so.6": b"libc",
            f"{lib}/libz.so.1": ("symlink", "libz.so.1.2.13"),
            f"{lib}/libz.so.1.2.13": b"old libz",
            "usr/lib/libfoo.so.1": b"foo in a later directory",
        },
    )
    app = toc_of(tmp_path, "app", {f"{lib}/libz.so.1.2.13": b"new libz"})
    dirs = (lib, "usr/lib64", "usr/lib")
    needs = LoaderNeeds(
        "/lib64/ld-linux-x86-64.so.2",
        ("libz.so.1", "libfoo.so.1", "libnone.so.1", "libc.so.6"),
        dirs,
    )
    found = find_loaded([app, base], needs)
    assert [(f.layer, f.entry.name) for f in found] == [
        (1, f"{lib}/ld.so"),
        (0, f"{lib}/libz.so.1.2.13"),  # the link below, its target above
        (1, "usr/lib/libfoo.so.1"),
        (1, f"{lib}/libc.so.6"),
    ]
    assert find_loaded([app, base], LoaderNeeds(None, (), dirs)) == []
