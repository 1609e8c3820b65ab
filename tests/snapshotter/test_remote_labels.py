"""Which layer a Prepare's labels name, and the store's records of remote snapshots."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from blockfs.errors import BlockfsError
from blockfs.oci import Descriptor, Manifest, Reference
from blockfs.oci import media_types as mt
from snapshotter.filters import parse_filters
from snapshotter.metrics import LayerCollector, metric_value
from snapshotter.pull import chain_ids, layer_labels
from snapshotter.remote import (
    BLOCKFS_IMAGE_REF_LABEL,
    BLOCKFS_LAYER_DIGEST_LABEL,
    BLOCKFS_LAYER_SIZE_LABEL,
    BLOCKFS_PLAIN_HTTP_LABEL,
    CRI_IMAGE_LAYERS_LABEL,
    CRI_IMAGE_REF_LABEL,
    CRI_LAYER_DIGEST_LABEL,
    CRI_MANIFEST_DIGEST_LABEL,
    PREFETCH_END_LABEL,
    TARGET_LABEL,
    TOC_DIGEST_LABEL,
    TOC_TAIL_LABEL,
    NoRemoteSource,
    RegistrySettings,
    layer_name,
    prefetch_end,
    remote_layer,
    sibling_source,
)
from snapshotter.store import (
    InvalidSnapshotRequest,
    Kind,
    SnapshotExists,
    SnapshotStore,
    SnapshotStoreError,
)

LAYER = "sha256:" + "1" * 64
LATER = "sha256:" + "2" * 64
TOC = "sha256:" + "3" * 64
CHAIN = "sha256:" + "4" * 64


def cri_labels(**extra: str) -> dict[str, str]:
    return {
        TARGET_LABEL: CHAIN,
        TOC_DIGEST_LABEL: TOC,
        CRI_IMAGE_REF_LABEL: "registry.example:5000/app/web:1",
        CRI_LAYER_DIGEST_LABEL: LAYER,
        CRI_IMAGE_LAYERS_LABEL: f"{LAYER},{LATER}",
        **extra,
    }


def test_cri_labels_name_the_layer_blob_in_the_image_repository(tmp_path: Path) -> None:
    layer = remote_layer(cri_labels(), RegistrySettings(hosts_dir=tmp_path))
    assert (layer.digest, layer.toc_digest, layer.labeller) == (LAYER, TOC, "cri")
    assert layer.source == {
        "type": "registry",
        "ref": f"registry.example:5000/app/web@{LAYER}",
        "plain_http": False,
        "hosts_dir": str(tmp_path),
        "docker_config": None,
        "size": None,
    }
    # The later layers, without this one, can be resolved ahead from the same repository.
    assert layer.image_layers == (LATER,)
    assert sibling_source(layer, LATER)["ref"] == f"registry.example:5000/app/web@{LATER}"


@pytest.mark.parametrize(
    ("value", "manifest"),
    [(None, None), (CHAIN, CHAIN), ("sha256:short", None), ("latest", None)],
)
def test_cri_labels_may_name_the_image_manifest(value: str | None, manifest: str | None) -> None:
    # Optional: a label that is not a digest leaves the manifest unknown, the layer usable.
    extra = {} if value is None else {CRI_MANIFEST_DIGEST_LABEL: value}
    layer = remote_layer(cri_labels(**extra), RegistrySettings())
    assert (layer.digest, layer.manifest) == (LAYER, manifest)


def test_blockfs_labels_carry_size_and_plain_http() -> None:
    labels = {
        TARGET_LABEL: CHAIN,
        TOC_DIGEST_LABEL: TOC,
        BLOCKFS_IMAGE_REF_LABEL: "127.0.0.1:5000/app:1",
        BLOCKFS_LAYER_DIGEST_LABEL: LAYER,
        BLOCKFS_LAYER_SIZE_LABEL: "1234",
        BLOCKFS_PLAIN_HTTP_LABEL: "true",
    }
    layer = remote_layer(labels, RegistrySettings(hosts_dir=Path("/nonexistent")))
    assert layer.labeller == "blockfs"
    assert layer.source["size"] == 1234 and layer.source["plain_http"] is True
    # A hosts directory that does not exist is no configuration.
    assert layer.source["hosts_dir"] is None


@pytest.mark.parametrize(
    ("value", "tail"), [("4096", 4096), (None, None), ("", None), ("-5", None), ("1e3", None)]
)
def test_the_toc_tail_label_is_taken_when_it_is_a_size(value: str | None, tail: int | None) -> None:
    # containerd hands it over with the TOC digest, from the layer's annotation.
    labels = cri_labels() if value is None else cri_labels(**{TOC_TAIL_LABEL: value})
    assert remote_layer(labels, RegistrySettings()).toc_tail == tail


@pytest.mark.parametrize(
    ("value", "end"),
    [("4096", 4096), (None, None), ("0", None), ("10000", None), ("-5", None), ("x", None)],
)
def test_a_prefetch_end_is_taken_when_it_lies_inside_the_blob(
    value: str | None, end: int | None
) -> None:
    annotations = {} if value is None else {PREFETCH_END_LABEL: value}
    assert prefetch_end(annotations, blob_size=10000) == end


def test_cri_labels_win_over_blockfs_labels() -> None:
    labels = cri_labels(**{BLOCKFS_IMAGE_REF_LABEL: "other/x:1", BLOCKFS_LAYER_DIGEST_LABEL: LATER})
    assert remote_layer(labels, RegistrySettings()).digest == LAYER


def test_a_layer_without_toc_digest_is_never_served_lazily() -> None:
    labels = cri_labels()
    del labels[TOC_DIGEST_LABEL]
    with pytest.raises(NoRemoteSource, match="not an eStargz layer") as raised:
        remote_layer(labels, RegistrySettings())
    assert raised.value.layer_digest == LAYER


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({CRI_LAYER_DIGEST_LABEL: ""}, "name no layer blob"),
        ({CRI_LAYER_DIGEST_LABEL: "sha256:short"}, "cri.layer-digest"),
        ({TOC_DIGEST_LABEL: "md5:abc"}, "invalid remote-snapshot label"),
        ({CRI_IMAGE_REF_LABEL: "UPPER/Case::x"}, "invalid remote-snapshot label"),
    ],
)
def test_unusable_labels_say_why(change: dict[str, str], message: str) -> None:
    with pytest.raises(NoRemoteSource, match=message):
        remote_layer(cri_labels(**change), RegistrySettings())


def test_layer_names_are_export_names() -> None:
    assert layer_name(LAYER) == "sha256-" + "1" * 64


def test_chain_ids_follow_the_oci_image_spec() -> None:
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    # sha256("sha256:aaa… sha256:bbb…"), as containerd computes it.
    second = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    assert chain_ids([a, b]) == [a, second]
    assert chain_ids([]) == []


def test_pull_labels_inherit_snapshot_annotations_and_fit_containerds_limit() -> None:
    layers = [
        Descriptor(mt.OCI_LAYER_GZIP, "sha256:" + f"{i:064x}", 10, {TOC_DIGEST_LABEL: TOC})
        for i in range(100)
    ]
    manifest = Manifest(config=Descriptor(mt.OCI_CONFIG, LAYER, 2), layers=layers)
    labels = layer_labels(Reference.parse("r.example/a:1"), manifest, 0, CHAIN, plain_http=True)
    assert labels[TOC_DIGEST_LABEL] == TOC and labels[TARGET_LABEL] == CHAIN
    assert labels[BLOCKFS_PLAIN_HTTP_LABEL] == "true"
    assert all(len(k.encode()) + len(v.encode()) <= 4096 for k, v in labels.items())
    layer = remote_layer(labels, RegistrySettings())
    assert layer.digest == layers[0].digest and layer.image_layers[0] == layers[1].digest


# -- the store's remote snapshots ----------------------------------------------------------


def remote_store(root: Path) -> SnapshotStore:
    return SnapshotStore(root, layer_mountpoint=lambda name: root / "layers" / name / "mnt")


def test_remote_snapshot_lowers_are_layer_mountpoints(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for name in ("layer-a", "layer-b"):
        (root / "layers" / name / "mnt").mkdir(parents=True)
    with remote_store(root) as store:
        store.commit_remote("ns", "sha256:a", "", {TARGET_LABEL: "sha256:a"}, "layer-a")
        store.commit_remote("ns", "sha256:b", "sha256:a", {}, "layer-b")
        plan = store.create("ns", Kind.ACTIVE, "ns/1/c", "sha256:b")
        assert plan.lowers == (root / "layers/layer-b/mnt", root / "layers/layer-a/mnt")
        assert store.chain_layers(None, "ns/1/c") == ["layer-b", "layer-a"]
        info = store.stat(None, "sha256:a")
        assert info.kind is Kind.COMMITTED and dict(info.labels) == {TARGET_LABEL: "sha256:a"}
        assert store.usage(None, "sha256:b").size == 0
        # Remote snapshots own no directory; only the active one has one.
        assert len(list(store.snapshots_dir.iterdir())) == 1
        with pytest.raises(SnapshotExists):
            store.commit_remote("ns", "sha256:b", "sha256:a", {}, "layer-b")
        assert store.remove("ns", "ns/1/c") is None
        assert store.remove(None, "sha256:b") == "layer-b"
        assert store.layers_in_use() == {"layer-a"}
        assert not store.layer_in_use("layer-b")


def test_remote_snapshots_need_a_layer_mountpoint(tmp_path: Path) -> None:
    with SnapshotStore(tmp_path) as store, pytest.raises(InvalidSnapshotRequest):
        store.commit_remote(None, "sha256:a", "", {}, "layer-a")


def test_a_version_1_store_is_migrated_in_place(tmp_path: Path) -> None:
    with SnapshotStore(tmp_path) as store:
        store.create("ns", Kind.ACTIVE, "a")
        store.commit("ns", "a", "l1")
    db = sqlite3.connect(tmp_path / "store.db")
    db.execute("DROP INDEX labels_by_value")
    db.execute("DROP INDEX snapshots_by_layer")
    db.execute("ALTER TABLE snapshots DROP COLUMN layer")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    with remote_store(tmp_path) as store:
        assert store.stat("ns", "l1").kind is Kind.COMMITTED
        store.commit_remote(None, "sha256:r", "l1", {TARGET_LABEL: "sha256:r"}, "layer-r")
        assert store.chain_layers(None, "sha256:r") == ["layer-r"]
        found = store.list_snapshots(None, parse_filters([f'labels."{TARGET_LABEL}"==sha256:r']))
        assert [i.name for i in found] == ["sha256:r"]
    db = sqlite3.connect(tmp_path / "store.db")
    indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    db.close()
    assert {"snapshots_by_layer", "labels_by_value"} <= indexes


def test_a_newer_store_is_refused(tmp_path: Path) -> None:
    SnapshotStore(tmp_path).close()
    db = sqlite3.connect(tmp_path / "store.db")
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    with pytest.raises(SnapshotStoreError, match="schema version 99"):
        SnapshotStore(tmp_path)


# -- metrics -------------------------------------------------------------------------------


def scrape(stats: Any, attached: list[str], server_restarts: int = 0) -> str:
    """What a scrape returns for a layer manager whose ``stats()`` give ``stats`` (or
    raise it, when it is an exception)."""

    def read_stats() -> Any:
        if isinstance(stats, Exception):
            raise stats
        return stats

    layers: Any = SimpleNamespace(
        stats=read_stats, attached=lambda: attached, server_restarts=server_restarts
    )
    registry = CollectorRegistry()
    registry.register(LayerCollector(layers))
    return generate_latest(registry).decode()


def test_metrics_show_each_layer_and_the_cache() -> None:
    stats = {
        "layers": {"sha256-aa": {"bytes_fetched": 1234, "data_reads": 7, "fetch_seconds": 0.5}},
        "cache": {"memory_hits": 3, "disk_bytes": 4096},
    }
    text = scrape(stats, attached=["sha256-aa", "sha256-bb"], server_restarts=1)
    assert metric_value(text, "blockfs_layers_mounted") == 2
    assert metric_value(text, "blockfs_nbd_server_restarts_total") == 1
    layer = [("layer", "sha256-aa")]
    assert metric_value(text, "blockfs_layer_fetched_bytes_total", layer) == 1234
    assert metric_value(text, "blockfs_layer_on_demand_reads_total", layer) == 7
    assert metric_value(text, "blockfs_layer_fetch_seconds_total", layer) == 0.5
    assert metric_value(text, "blockfs_layer_cache_hits_total", layer) == 0
    assert metric_value(text, "blockfs_cache_memory_hits_total") == 3
    assert metric_value(text, "blockfs_cache_disk_bytes") == 4096
    assert "# TYPE blockfs_layer_fetched_bytes_total counter" in text
    assert "# TYPE blockfs_cache_disk_bytes gauge" in text
    assert "# HELP blockfs_layers_mounted Layers attached and mounted now." in text


def test_metrics_without_the_nbd_servers_stats_still_count_mounts() -> None:
    text = scrape(BlockfsError("no stats socket"), attached=["sha256-aa"])
    assert metric_value(text, "blockfs_layers_mounted") == 1
    assert metric_value(text, "blockfs_cache_misses_total") == 0
    assert "# TYPE blockfs_layer_reads_total counter" in text
    assert metric_value(text, "blockfs_layer_reads_total", [("layer", "sha256-aa")]) is None
