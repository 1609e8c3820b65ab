"""The snapshot store on a real SQLite file and real directories."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter import store as store_module
from snapshotter.filters import FilterSyntaxError, parse_filters
from snapshotter.store import (
    InvalidSnapshotRequest,
    Kind,
    SnapshotExists,
    SnapshotNotFound,
    SnapshotStateError,
    SnapshotStore,
    disk_usage,
)

REF = "containerd.io/snapshot.ref"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SnapshotStore]:
    with SnapshotStore(tmp_path / "root") as s:
        yield s


def commit_layer(
    store: SnapshotStore,
    name: str,
    parent: str = "",
    files: dict[str, bytes] | None = None,
    namespace: str | None = "default",
    labels: dict[str, str] | None = None,
) -> Path:
    """Prepare ``name``'s extract snapshot, write ``files`` into it, commit it; its fs dir."""
    plan = store.create(namespace, Kind.ACTIVE, f"extract {name}", parent)
    for path, data in (files or {}).items():
        (plan.fs / path).write_bytes(data)
    store.commit(namespace, f"extract {name}", name, labels)
    return plan.fs


# -- prepare, view, mounts -----------------------------------------------------------------


def test_prepare_without_parent_gives_empty_writable_fs_and_work_dir(store: SnapshotStore) -> None:
    plan = store.create("default", Kind.ACTIVE, "a")
    assert plan.writable and plan.lowers == ()
    assert plan.fs == store.snapshots_dir / plan.fs.parent.name / "fs"
    assert list(plan.fs.iterdir()) == [] and plan.work.is_dir()
    assert store.stat("default", "a").kind is Kind.ACTIVE


def test_view_has_no_work_dir_and_is_read_only(store: SnapshotStore) -> None:
    plan = store.create("default", Kind.VIEW, "v")
    assert not plan.writable
    assert plan.fs.is_dir() and not plan.work.exists()


def test_lowers_list_nearest_parent_first(store: SnapshotStore) -> None:
    bottom = commit_layer(store, "l1")
    middle = commit_layer(store, "l2", "l1")
    top = commit_layer(store, "l3", "l2")
    active = store.create("default", Kind.ACTIVE, "container", "l3")
    assert active.lowers == (top, middle, bottom)
    assert store.mount_plan("default", "container") == active
    view = store.create("default", Kind.VIEW, "view", "l1")
    assert view.lowers == (bottom,)


def test_commit_keeps_the_files_written_into_the_active_snapshot(store: SnapshotStore) -> None:
    fs = commit_layer(store, "l1", files={"hello": b"world"})
    child = store.create("default", Kind.ACTIVE, "c", "l1")
    assert (child.lowers[0] / "hello").read_bytes() == b"world"
    assert child.lowers[0] == fs


def test_prepare_of_a_taken_key_raises_snapshot_exists(store: SnapshotStore) -> None:
    store.create("default", Kind.ACTIVE, "a")
    with pytest.raises(SnapshotExists):
        store.create("default", Kind.VIEW, "a")


def test_prepare_on_missing_parent_raises_not_found_naming_the_parent(
    store: SnapshotStore,
) -> None:
    with pytest.raises(SnapshotNotFound, match="parent") as info:
        store.create("default", Kind.ACTIVE, "a", "nope")
    assert info.value.key == "nope"
    assert store.list_snapshots(None) == []


def test_prepare_on_active_parent_is_an_invalid_argument(store: SnapshotStore) -> None:
    store.create("default", Kind.ACTIVE, "p")
    with pytest.raises(InvalidSnapshotRequest, match="not committed"):
        store.create("default", Kind.ACTIVE, "c", "p")


def test_create_of_committed_kind_is_refused(store: SnapshotStore) -> None:
    with pytest.raises(InvalidSnapshotRequest):
        store.create("default", Kind.COMMITTED, "x")


def test_mounts_of_a_committed_snapshot_fail_precondition(store: SnapshotStore) -> None:
    commit_layer(store, "l1")
    with pytest.raises(SnapshotStateError):
        store.mount_plan("default", "l1")


def test_mounts_of_a_missing_snapshot_raise_not_found(store: SnapshotStore) -> None:
    with pytest.raises(SnapshotNotFound):
        store.mount_plan("default", "nope")


# -- commit --------------------------------------------------------------------------------


def test_commit_replaces_key_by_name_and_labels_by_the_commit_labels(store: SnapshotStore) -> None:
    store.create("default", Kind.ACTIVE, "k", labels={"a": "1"})
    info = store.commit("default", "k", "n", {"b": "2"})
    assert (info.name, info.kind, dict(info.labels)) == ("n", Kind.COMMITTED, {"b": "2"})
    with pytest.raises(SnapshotNotFound):
        store.stat("default", "k")


def test_commit_to_a_taken_name_raises_exists_and_keeps_the_active(store: SnapshotStore) -> None:
    commit_layer(store, "n")
    store.create("default", Kind.ACTIVE, "k")
    with pytest.raises(SnapshotExists):
        store.commit("default", "k", "n")
    assert store.stat("default", "k").kind is Kind.ACTIVE


def test_commit_of_a_view_fails_precondition(store: SnapshotStore) -> None:
    store.create("default", Kind.VIEW, "v")
    with pytest.raises(SnapshotStateError, match="not active"):
        store.commit("default", "v", "n")


def test_commit_of_a_missing_key_raises_not_found(store: SnapshotStore) -> None:
    with pytest.raises(SnapshotNotFound):
        store.commit("default", "k", "n")


def test_commit_records_usage_of_the_layer(store: SnapshotStore) -> None:
    commit_layer(store, "l1", files={"a": b"x" * 10000, "b": b""})
    usage = store.usage("default", "l1")
    assert usage.inodes == 3  # fs itself, a and b
    assert usage.size >= 10000


def test_usage_of_an_active_snapshot_is_measured_now(store: SnapshotStore) -> None:
    plan = store.create("default", Kind.ACTIVE, "a")
    assert store.usage("default", "a").inodes == 1
    (plan.fs / "f").write_bytes(b"y" * 5000)
    assert store.usage("default", "a").inodes == 2
    assert store.usage("default", "a").size >= 5000


def test_disk_usage_counts_a_hardlinked_inode_once(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"z" * 8192)
    os.link(tmp_path / "f", tmp_path / "g")
    usage = disk_usage(tmp_path)
    assert usage.inodes == 2
    blocks = os.lstat(tmp_path).st_blocks + os.lstat(tmp_path / "f").st_blocks
    assert usage.size == blocks * 512


# -- remove and cleanup --------------------------------------------------------------------


def test_remove_deletes_record_and_directory(store: SnapshotStore) -> None:
    plan = store.create("default", Kind.ACTIVE, "a")
    (plan.fs / "data").write_bytes(b"1")
    store.remove("default", "a")
    assert not plan.fs.parent.exists()
    assert os.listdir(store.snapshots_dir) == []
    with pytest.raises(SnapshotNotFound):
        store.stat("default", "a")


def test_remove_of_a_parent_with_children_fails_precondition(store: SnapshotStore) -> None:
    fs = commit_layer(store, "l1")
    store.create("default", Kind.VIEW, "v", "l1")
    with pytest.raises(SnapshotStateError, match="children"):
        store.remove("default", "l1")
    assert fs.is_dir()
    store.remove("default", "v")
    store.remove("default", "l1")
    assert store.list_snapshots(None) == []


def test_remove_of_a_missing_snapshot_raises_not_found(store: SnapshotStore) -> None:
    with pytest.raises(SnapshotNotFound):
        store.remove("default", "nope")


def test_cleanup_removes_only_directories_no_snapshot_owns(store: SnapshotStore) -> None:
    plan = store.create("default", Kind.ACTIVE, "a")
    (store.snapshots_dir / "999" / "fs").mkdir(parents=True)
    (store.snapshots_dir / "new-abc").mkdir()
    (store.snapshots_dir / "rm-7").mkdir()
    assert sorted(store.cleanup()) == ["999", "new-abc", "rm-7"]
    assert os.listdir(store.snapshots_dir) == [plan.fs.parent.name]


@pytest.mark.root
def test_cleanup_never_deletes_through_a_mount(store: SnapshotStore, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to bind mount")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep").write_bytes(b"do not delete")
    orphan_fs = store.snapshots_dir / "42" / "fs"
    orphan_fs.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(precious), str(orphan_fs)], check=True)
    try:
        assert store.cleanup() == []
        assert (precious / "keep").read_bytes() == b"do not delete"
    finally:
        subprocess.run(["umount", str(orphan_fs)], check=True)
    assert store.cleanup() == ["42"]


# -- update --------------------------------------------------------------------------------


def test_update_with_label_paths_sets_and_deletes_single_labels(store: SnapshotStore) -> None:
    commit_layer(store, "l1", labels={"keep": "1", "drop": "2", "change": "3"})
    before = store.stat("default", "l1")
    info = store.update(
        "default",
        "l1",
        {"change": "33", "new": "4", "ignored": "5"},
        ["labels.change", "labels.new", "labels.drop"],
    )
    assert dict(info.labels) == {"keep": "1", "change": "33", "new": "4"}
    assert info.updated > before.updated and info.created == before.created
    assert store.stat("default", "l1") == info


def test_update_without_paths_replaces_all_labels(store: SnapshotStore) -> None:
    commit_layer(store, "l1", labels={"a": "1"})
    assert dict(store.update("default", "l1", {"b": "2"}).labels) == {"b": "2"}
    assert dict(store.update("default", "l1", {"c": "3"}, ["labels"]).labels) == {"c": "3"}


@pytest.mark.parametrize("path", ["name", "parent", "kind", "created_at"])
def test_update_of_an_immutable_field_is_an_invalid_argument(
    store: SnapshotStore, path: str
) -> None:
    commit_layer(store, "l1", labels={"a": "1"})
    with pytest.raises(InvalidSnapshotRequest, match="only labels"):
        store.update("default", "l1", {"a": "2"}, ["labels.a", path])
    assert dict(store.stat("default", "l1").labels) == {"a": "1"}  # rolled back


def test_update_of_a_missing_snapshot_raises_not_found(store: SnapshotStore) -> None:
    with pytest.raises(SnapshotNotFound):
        store.update("default", "nope", {})


def test_oversized_label_is_an_invalid_argument(store: SnapshotStore) -> None:
    with pytest.raises(InvalidSnapshotRequest, match="4096"):
        store.create("default", Kind.ACTIVE, "a", labels={"k": "v" * 4096})


# -- list and filters ----------------------------------------------------------------------


def test_list_with_the_remote_snapshot_handshake_filter(store: SnapshotStore) -> None:
    commit_layer(store, "ns/1/sha256:aa", labels={REF: "sha256:aa"})
    commit_layer(store, "ns/2/sha256:bb", "ns/1/sha256:aa", labels={REF: "sha256:bb"})
    commit_layer(store, "ns/3/sha256:bb-elsewhere", labels={REF: "sha256:bb"})
    found = store.list_snapshots(
        "default", parse_filters([f'labels."{REF}"==sha256:bb,parent=="ns/1/sha256:aa"'])
    )
    assert [i.name for i in found] == ["ns/2/sha256:bb"]


def test_list_filters_are_ored_and_selectors_anded(store: SnapshotStore) -> None:
    commit_layer(store, "c1", labels={"x": "1"})
    commit_layer(store, "c2", labels={"x": "2"})
    store.create("default", Kind.ACTIVE, "a1", "c1")
    store.create("default", Kind.VIEW, "v1", "c2")

    def names(*filters: str) -> list[str]:
        return [i.name for i in store.list_snapshots("default", parse_filters(filters))]

    assert names() == ["c1", "c2", "a1", "v1"]
    assert names("kind==committed") == ["c1", "c2"]
    assert names("kind==active", "kind==view") == ["a1", "v1"]
    assert names("name==c2", "parent==c1") == ["c2", "a1"]
    assert names("kind==committed,labels.x==2") == ["c2"]
    assert names("labels.x") == ["c1", "c2"]
    assert names("labels.x!=1") == ["c2", "a1", "v1"]
    assert names("name~=^[av]") == ["a1", "v1"]


def test_a_list_filtered_by_a_label_value_or_a_name_reads_only_those_snapshots(
    store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # containerd lists with the handshake filter after every remote Prepare: on a node
    # with thousands of snapshots, reading them all made each layer of a pull slower.
    for i in range(40):
        commit_layer(store, f"ns/{i}/sha256:{i:02x}", labels={REF: f"sha256:{i:02x}", "n": "x"})
    read: list[object] = []
    from_row = store_module._Record.from_row

    def counted(row: tuple[object, ...]) -> object:
        read.append(row)
        return from_row(row)

    monkeypatch.setattr(store_module._Record, "from_row", counted)

    def names(*filters: str) -> list[str]:
        read.clear()
        return [i.name for i in store.list_snapshots("default", parse_filters(filters))]

    assert names(f'labels."{REF}"==sha256:07,kind==committed') == ["ns/7/sha256:07"]
    assert len(read) == 1
    assert names("name==ns/3/sha256:03", f'labels."{REF}"==sha256:09') == [
        "ns/3/sha256:03", "ns/9/sha256:09",
    ]  # fmt: skip
    assert len(read) == 2
    assert names(f'labels."{REF}"==sha256:99') == []
    assert len(read) == 0
    # A filter that names neither reads them all, and still gets them right.
    assert names(f'labels."{REF}"==sha256:05', "labels.n==x,kind==active") == ["ns/5/sha256:05"]
    assert len(read) == 40


def test_list_with_a_malformed_filter_raises_filter_syntax_error(store: SnapshotStore) -> None:
    with pytest.raises(FilterSyntaxError):
        store.list_snapshots("default", parse_filters(["name=="]))


# -- namespaces ----------------------------------------------------------------------------


def test_namespaces_isolate_keys_and_parents(store: SnapshotStore) -> None:
    commit_layer(store, "base", namespace="a")
    store.create("b", Kind.ACTIVE, "base")  # the same key in another namespace
    with pytest.raises(InvalidSnapshotRequest):
        store.create("b", Kind.ACTIVE, "child", "base")  # b's "base" is active; a's is hidden
    with pytest.raises(SnapshotNotFound):
        store.create("c", Kind.ACTIVE, "child", "base")
    assert [i.name for i in store.list_snapshots("a")] == ["base"]
    assert store.stat("b", "base").kind is Kind.ACTIVE
    with pytest.raises(SnapshotNotFound):
        store.remove("c", "base")


def test_calls_without_namespace_see_every_namespace(store: SnapshotStore) -> None:
    # containerd's garbage collector lists and removes without a namespace.
    commit_layer(store, "a/1/x", namespace="a")
    commit_layer(store, "b/2/y", namespace="b")
    assert [(i.namespace, i.name) for i in store.list_snapshots(None)] == [
        ("a", "a/1/x"),
        ("b", "b/2/y"),
    ]
    store.remove(None, "a/1/x")
    assert [i.name for i in store.list_snapshots(None)] == ["b/2/y"]


def test_a_name_in_two_namespaces_is_ambiguous_without_namespace(store: SnapshotStore) -> None:
    store.create("a", Kind.ACTIVE, "same")
    store.create("b", Kind.ACTIVE, "same")
    with pytest.raises(SnapshotStateError, match="namespaces"):
        store.stat(None, "same")


# -- transactions and persistence ----------------------------------------------------------


def test_failure_inside_create_rolls_back_record_and_directory(store: SnapshotStore) -> None:
    parent_fs = commit_layer(store, "p")
    os.rmdir(parent_fs)  # the parent's file system vanished behind the store's back
    with pytest.raises(FileNotFoundError):
        store.create("default", Kind.ACTIVE, "c", "p")
    assert [i.name for i in store.list_snapshots(None)] == ["p"]
    assert os.listdir(store.snapshots_dir) == [parent_fs.parent.name]


def test_snapshots_survive_reopening_the_store(tmp_path: Path) -> None:
    with SnapshotStore(tmp_path / "root") as first:
        commit_layer(first, "l1", labels={"a": "1"})
        plan = first.create("default", Kind.ACTIVE, "c", "l1")
    with SnapshotStore(tmp_path / "root") as second:
        assert dict(second.stat("default", "l1").labels) == {"a": "1"}
        assert second.mount_plan("default", "c") == plan


def test_store_database_uses_wal_and_a_schema_version(store: SnapshotStore) -> None:
    db = sqlite3.connect(store.root / "store.db")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == 3
    finally:
        db.close()
