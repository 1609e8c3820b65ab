"""The Snapshots gRPC service of a real ``blockfs-snapshotter`` process, over its socket."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from snapshotter._gen.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from tests.helpers.containerd import short_tempdir
from tests.helpers.snapshotter_daemon import SnapshotterDaemon, snapshots_stub, start_snapshotter

REF = "containerd.io/snapshot.ref"


@pytest.fixture(scope="module")
def daemon() -> Iterator[SnapshotterDaemon]:
    work = short_tempdir("bfs-grpc-")
    try:
        with start_snapshotter(work / "root", work / "s.sock") as d:
            yield d
    finally:
        shutil.rmtree(work, ignore_errors=True)


class Client:
    """The generated stub, with the namespace sent as containerd sends it."""

    def __init__(self, channel: grpc.Channel, namespace: str | None) -> None:
        self.stub = snapshots_stub(channel)
        self.namespace = namespace

    def __getattr__(self, rpc: str) -> Any:
        call = getattr(self.stub, rpc)
        metadata = [] if self.namespace is None else [("containerd-namespace", self.namespace)]

        def invoke(request: Any) -> Any:
            return call(request, metadata=metadata, timeout=30)

        return invoke


@pytest.fixture
def channel(daemon: SnapshotterDaemon) -> Iterator[grpc.Channel]:
    with daemon.channel() as ch:
        yield ch


@pytest.fixture
def client(channel: grpc.Channel) -> Client:
    return Client(channel, f"ns-{uuid.uuid4().hex[:8]}")


def code_of(call: Any, request: Any) -> grpc.StatusCode:
    """The status code ``call(request)`` fails with (a stream fails when read)."""
    with pytest.raises(grpc.RpcError) as info:
        result = call(request)
        if hasattr(result, "__next__"):
            list(result)
    code: grpc.StatusCode = info.value.code()
    return code


def mounts(response: Any) -> list[tuple[str, str, list[str]]]:
    return [(m.type, m.source, list(m.options)) for m in response.mounts]


def prepare_and_commit(client: Client, name: str, parent: str = "") -> str:
    """Commit ``name`` on ``parent``; the fs directory it lives in."""
    prepared = client.Prepare(pb.PrepareSnapshotRequest(key=f"extract {name}", parent=parent))
    client.Commit(pb.CommitSnapshotRequest(key=f"extract {name}", name=name))
    return str(prepared.mounts[0].source) if not parent else _upper(prepared)


def _upper(response: Any) -> str:
    options: list[str] = list(response.mounts[0].options)
    return next(o.removeprefix("upperdir=") for o in options if o.startswith("upperdir="))


@pytest.mark.root
def test_socket_is_a_socket_only_root_can_use(daemon: SnapshotterDaemon) -> None:
    st = os.stat(daemon.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0


def test_prepare_commit_view_and_mounts_over_grpc(client: Client) -> None:
    first = client.Prepare(pb.PrepareSnapshotRequest(key="extract l1"))
    [(kind, l1_fs, options)] = mounts(first)
    assert (kind, options) == ("bind", ["rw", "rbind"])
    Path(l1_fs, "hello").write_text("hi")
    client.Commit(pb.CommitSnapshotRequest(key="extract l1", name="l1", labels={REF: "sha:1"}))
    l2_fs = prepare_and_commit(client, "l2", "l1")

    container = client.Prepare(pb.PrepareSnapshotRequest(key="c", parent="l2"))
    [(kind, source, options)] = mounts(container)
    upper = _upper(container)
    work = Path(upper).parent / "work"
    assert (kind, source) == ("overlay", "overlay")
    assert options[-3:] == [f"workdir={work}", f"upperdir={upper}", f"lowerdir={l2_fs}:{l1_fs}"]
    assert mounts(client.Mounts(pb.MountsRequest(key="c"))) == mounts(container)

    view = client.View(pb.ViewSnapshotRequest(key="v", parent="l1"))
    assert mounts(view) == [("bind", l1_fs, ["ro", "rbind"])]
    info = client.Stat(pb.StatSnapshotRequest(key="l1")).info
    assert (info.name, info.kind, dict(info.labels)) == ("l1", pb.COMMITTED, {REF: "sha:1"})
    child = client.Stat(pb.StatSnapshotRequest(key="c")).info
    assert (child.parent, child.kind) == ("l2", pb.ACTIVE)
    assert child.created_at.ToDatetime() >= info.created_at.ToDatetime()


def test_store_errors_travel_as_grpc_status_codes(client: Client) -> None:
    prepare_and_commit(client, "base")
    client.Prepare(pb.PrepareSnapshotRequest(key="active"))
    c = grpc.StatusCode
    assert code_of(client.Stat, pb.StatSnapshotRequest(key="missing")) == c.NOT_FOUND
    assert code_of(client.Remove, pb.RemoveSnapshotRequest(key="missing")) == c.NOT_FOUND
    assert code_of(client.Prepare, pb.PrepareSnapshotRequest(key="active")) == c.ALREADY_EXISTS
    assert (
        code_of(client.Prepare, pb.PrepareSnapshotRequest(key="x", parent="missing")) == c.NOT_FOUND
    )
    assert (
        code_of(client.Prepare, pb.PrepareSnapshotRequest(key="x", parent="active"))
        == c.INVALID_ARGUMENT
    )
    assert code_of(client.Mounts, pb.MountsRequest(key="base")) == c.FAILED_PRECONDITION
    client.View(pb.ViewSnapshotRequest(key="view", parent="base"))
    assert (
        code_of(client.Commit, pb.CommitSnapshotRequest(key="view", name="n"))
        == c.FAILED_PRECONDITION
    )
    assert (
        code_of(client.Commit, pb.CommitSnapshotRequest(key="active", name="base"))
        == c.ALREADY_EXISTS
    )
    assert code_of(client.Remove, pb.RemoveSnapshotRequest(key="base")) == c.FAILED_PRECONDITION
    bad_update = pb.UpdateSnapshotRequest(
        info=pb.Info(name="base"), update_mask=field_mask_pb2.FieldMask(paths=["parent"])
    )
    assert code_of(client.Update, bad_update) == c.INVALID_ARGUMENT
    assert code_of(client.List, pb.ListSnapshotsRequest(filters=["name=="])) == c.INVALID_ARGUMENT


def test_list_streams_every_matching_snapshot_in_batches(client: Client) -> None:
    for i in range(230):
        client.Prepare(pb.PrepareSnapshotRequest(key=f"k{i:03}", labels={REF: f"r{i % 2}"}))
    batches = list(client.List(pb.ListSnapshotsRequest()))
    assert [len(b.info) for b in batches] == [100, 100, 30]
    assert [i.name for b in batches for i in b.info] == [f"k{i:03}" for i in range(230)]
    wanted = pb.ListSnapshotsRequest(filters=[f'labels."{REF}"==r1,name~=^k00', "name==k200"])
    found = [i.name for b in client.List(wanted) for i in b.info]
    assert found == ["k001", "k003", "k005", "k007", "k009", "k200"]


def test_remote_snapshot_handshake_list_finds_the_committed_target(client: Client) -> None:
    # What containerd asks after a Prepare answered ALREADY_EXISTS (reference, section 4).
    prepare_and_commit(client, "ns/1/sha256:aa")
    client.Prepare(pb.PrepareSnapshotRequest(key="t", parent="ns/1/sha256:aa"))
    client.Commit(pb.CommitSnapshotRequest(key="t", name="ns/2/sha256:bb", labels={REF: "bb"}))
    request = pb.ListSnapshotsRequest(
        filters=[f'labels."{REF}"==bb,parent=="ns/1/sha256:aa"'], snapshotter="blockfs"
    )
    [info] = [i for b in client.List(request) for i in b.info]
    assert (info.name, info.kind, info.parent) == ("ns/2/sha256:bb", pb.COMMITTED, "ns/1/sha256:aa")


def test_namespace_metadata_isolates_snapshots(channel: grpc.Channel) -> None:
    tag = uuid.uuid4().hex[:8]
    a, b = Client(channel, f"a-{tag}"), Client(channel, f"b-{tag}")
    a.Prepare(pb.PrepareSnapshotRequest(key=f"same-{tag}", labels={"who": "a"}))
    b.Prepare(pb.PrepareSnapshotRequest(key=f"same-{tag}", labels={"who": "b"}))
    assert a.Stat(pb.StatSnapshotRequest(key=f"same-{tag}")).info.labels["who"] == "a"
    assert b.Stat(pb.StatSnapshotRequest(key=f"same-{tag}")).info.labels["who"] == "b"
    assert [len(m.info) for m in b.List(pb.ListSnapshotsRequest())] == [1]
    a.Remove(pb.RemoveSnapshotRequest(key=f"same-{tag}"))
    assert b.Stat(pb.StatSnapshotRequest(key=f"same-{tag}")).info.labels["who"] == "b"
    # Without the metadata (containerd 1.6 sends none) every namespace is visible.
    everyone = Client(channel, None)
    listed = [i.name for m in everyone.List(pb.ListSnapshotsRequest()) for i in m.info]
    assert f"same-{tag}" in listed


def test_update_with_field_mask_changes_only_the_named_labels(client: Client) -> None:
    prepare_and_commit(client, "l")
    client.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="l", labels={"a": "1", "b": "2"})))
    updated = client.Update(
        pb.UpdateSnapshotRequest(
            info=pb.Info(name="l", labels={"a": "10", "c": "3"}),
            update_mask=field_mask_pb2.FieldMask(paths=["labels.a", "labels.b"]),
        )
    ).info
    assert dict(updated.labels) == {"a": "10"}
    assert updated.updated_at.ToDatetime() > updated.created_at.ToDatetime()
    assert client.Stat(pb.StatSnapshotRequest(key="l")).info == updated


def test_usage_of_active_snapshot_and_cleanup_of_orphans(
    client: Client, daemon: SnapshotterDaemon
) -> None:
    [(_, fs, _)] = mounts(client.Prepare(pb.PrepareSnapshotRequest(key="u")))
    Path(fs, "data").write_bytes(b"x" * 20000)
    usage = client.Usage(pb.UsageRequest(key="u"))
    assert usage.inodes == 2 and usage.size >= 20000
    orphan = daemon.root / "snapshots" / "new-leftover"
    (orphan / "fs").mkdir(parents=True)
    client.Cleanup(pb.CleanupRequest())
    assert not orphan.exists() and Path(fs).is_dir()


def test_concurrent_calls_each_get_a_consistent_answer(client: Client) -> None:
    prepare_and_commit(client, "base")

    def work(i: int) -> str:
        child = client.Prepare(pb.PrepareSnapshotRequest(key=f"k{i}", parent="base"))
        client.Commit(pb.CommitSnapshotRequest(key=f"k{i}", name=f"n{i}"))
        return _upper(child)

    with ThreadPoolExecutor(8) as pool:
        uppers = list(pool.map(work, range(40)))
    assert len(set(uppers)) == 40  # every snapshot got a directory of its own
    listed = [
        i for m in client.List(pb.ListSnapshotsRequest(filters=["parent==base"])) for i in m.info
    ]
    assert sorted(i.name for i in listed) == sorted(f"n{i}" for i in range(40))
    assert {i.kind for i in listed} == {pb.COMMITTED}


# -- the daemon process ------------------------------------------------------------------


def test_sigterm_stops_the_daemon_cleanly_with_json_logs() -> None:
    work = short_tempdir("bfs-term-")
    try:
        with start_snapshotter(work / "root", work / "s.sock") as d:
            with d.channel() as ch:
                Client(ch, "x").Prepare(pb.PrepareSnapshotRequest(key="k"))
            server = wait_for_server_pid(d)  # started with the daemon
            assert d.stop(signal.SIGTERM) == 0
            assert not d.socket.exists()
            assert not Path(f"/proc/{server}").exists()
            records = d.log_records()  # every line must parse as JSON
            assert all({"time", "level", "logger", "msg"} <= set(r) for r in records)
            # The NBD server started with the daemon stops with it, since no layer is attached.
            assert [r["msg"] for r in records][-3:] == [
                "stopping", "stopped the NBD server: no layer is attached", "stopped",
            ]  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_sigusr1_makes_the_daemon_and_its_nbd_server_write_every_thread_stack() -> None:
    work = short_tempdir("bfs-usr1-")
    try:
        with start_snapshotter(work / "root", work / "s.sock") as d:
            server = wait_for_server_pid(d)
            nbdkit_log = work / "root" / "run" / "nbdkit.log"
            deadline = time.monotonic() + 30
            for pid, log in ((d.process.pid, d.log), (server, nbdkit_log.read_text)):
                os.kill(pid, signal.SIGUSR1)
                # faulthandler's dump: a header per thread, then its frames, newest first.
                while not ("Thread 0x" in log() and 'File "' in log()):
                    assert time.monotonic() < deadline, f"no stacks from pid {pid}:\n{log()}"
                    time.sleep(0.05)
            assert "snapshotter/daemon.py" in d.log()
            assert "blockfs/" in nbdkit_log.read_text()
            # Both go on serving.
            with d.channel() as ch:
                Client(ch, "x").Prepare(pb.PrepareSnapshotRequest(key="k"))
            assert Path(f"/proc/{server}").exists() and d.process.poll() is None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_restarted_daemon_serves_the_snapshots_of_a_killed_one() -> None:
    work = short_tempdir("bfs-kill-")
    try:
        with start_snapshotter(work / "root", work / "s.sock") as d:
            with d.channel() as ch:
                prepare_and_commit(Client(ch, "x"), "kept")
            d.stop(signal.SIGKILL)
        assert work.joinpath("s.sock").exists()  # left behind by the killed daemon
        with start_snapshotter(work / "root", work / "s.sock") as d, d.channel() as ch:
            info = Client(ch, "x").Stat(pb.StatSnapshotRequest(key="kept")).info
            assert info.kind == pb.COMMITTED
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_second_daemon_refuses_a_socket_that_is_in_use(daemon: SnapshotterDaemon) -> None:
    work = short_tempdir("bfs-dup-")
    try:
        with (
            pytest.raises(pytest.fail.Exception, match="another process is listening"),
            start_snapshotter(work / "root", daemon.socket, log_path=work / "log"),
        ):
            pass
        with daemon.channel() as ch:  # the first one is still serving
            Client(ch, "x").List(pb.ListSnapshotsRequest())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_daemon_tells_systemd_when_it_is_ready_and_when_it_stops() -> None:
    work = short_tempdir("bfs-notify-")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        notify.bind(str(work / "notify"))
        notify.settimeout(30)
        with start_snapshotter(
            work / "root", work / "s.sock", env={"NOTIFY_SOCKET": str(work / "notify")}
        ) as d:
            assert notify.recv(100) == b"READY=1"
            d.stop(signal.SIGTERM)
            assert notify.recv(100) == b"STOPPING=1"
    finally:
        notify.close()
        shutil.rmtree(work, ignore_errors=True)


def wait_for_server_pid(d: SnapshotterDaemon, timeout: float = 30.0) -> int:
    """The pid of the NBD server that daemon ``d`` starts, once it has said so."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in d.log_records():
            if record["msg"] == "started the NBD server":
                return int(record["pid"])
        time.sleep(0.05)
    raise AssertionError(f"the daemon did not start an NBD server within {timeout} s")
