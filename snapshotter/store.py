"""The snapshot store: snapshot records in SQLite and their directories on disk.

Semantics follow containerd's overlayfs snapshotter, which is what containerd expects of
any snapshotter (its snapshots package documents the model): active snapshots are
prepared on committed parents, committed under a new name, viewed read-only, and
removed children first. Every change is one SQLite transaction (WAL journal), so a crash
leaves either the old or the new state; a directory whose record never committed, or
whose record is gone, is an orphan that :meth:`SnapshotStore.cleanup` removes.

Layout under ``root``: ``store.db`` and ``snapshots/<id>/{fs,work}``, where ``<id>`` is
the record's integer id, never reused.

Remote snapshots: a committed snapshot may be served by a lazily mounted layer instead of
a directory of its own (:meth:`SnapshotStore.commit_remote`). Its record names the layer,
whose mountpoint is the lower dir of the snapshots above it; it has no ``snapshots/<id>``
directory and uses no space of its own. The layers themselves belong to
:mod:`snapshotter.layers`; the store only says which snapshots use which layer.

Namespaces: containerd names every backend snapshot ``<namespace>/<seq>/<name>`` and sends
the caller's namespace as gRPC metadata, except in its garbage collector, which lists and
removes across all namespaces. So each operation takes ``namespace``: a string confines
it to that namespace, ``None`` lets it see every namespace.
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
import sqlite3
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType

import attrs

from blockfs.errors import BlockfsError
from blockfs.host import mounts
from blockfs.host.overlay import MountPlan
from snapshotter.filters import FilterSet, Operator

log = logging.getLogger(__name__)

STORE_DB = "store.db"
SNAPSHOTS_DIR = "snapshots"
SCHEMA_VERSION = 3
# containerd's own limit on one label (key plus value), checked again here so that a
# client that talks to the snapshotter directly gets the same answer.
MAX_LABEL_BYTES = 4096

_SCHEMA = (
    """
    CREATE TABLE snapshots (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,  -- names snapshots/<id>, never reused
        namespace  TEXT    NOT NULL,
        name       TEXT    NOT NULL,
        kind       INTEGER NOT NULL,                   -- Kind
        parent_id  INTEGER REFERENCES snapshots (id),  -- a parent outlives its children
        created_us INTEGER NOT NULL,                   -- microseconds since the epoch, UTC
        updated_us INTEGER NOT NULL,
        size       INTEGER NOT NULL DEFAULT 0,         -- usage recorded at commit
        inodes     INTEGER NOT NULL DEFAULT 0,
        UNIQUE (namespace, name)
    )
    """,
    "CREATE INDEX snapshots_by_name ON snapshots (name)",
    "CREATE INDEX snapshots_by_parent ON snapshots (parent_id)",
    """
    CREATE TABLE labels (
        snapshot_id INTEGER NOT NULL REFERENCES snapshots (id) ON DELETE CASCADE,
        key         TEXT    NOT NULL,
        value       TEXT    NOT NULL,
        PRIMARY KEY (snapshot_id, key)
    ) WITHOUT ROWID
    """,
)

# Each version's statements turn the schema of the version before into its own.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: _SCHEMA,
    2: (
        # The lazily mounted layer that serves a remote snapshot; NULL for ordinary ones.
        "ALTER TABLE snapshots ADD COLUMN layer TEXT",
        "CREATE INDEX snapshots_by_layer ON snapshots (layer)",
    ),
    3: (
        # containerd lists by a label's value (the remote snapshot handshake): a lookup,
        # not a scan of every label of the node.
        "CREATE INDEX labels_by_value ON labels (key, value)",
    ),
}

_SELECT = """
SELECT s.id, s.namespace, s.name, s.kind, s.parent_id, p.name, s.created_us, s.updated_us,
       s.size, s.inodes, s.layer
FROM snapshots AS s LEFT JOIN snapshots AS p ON p.id = s.parent_id
"""


def _narrowing(filters: FilterSet | None) -> tuple[str, list[object]] | None:
    """An SQL condition on ``snapshots AS s`` that every snapshot ``filters`` may match
    meets, from one ``name==`` or ``labels.KEY==`` selector of each filter, so that a
    list reads those snapshots only; None when a filter has neither (every snapshot is
    read). The filters are still matched whole afterwards."""
    if filters is None or not filters.filters:
        return None
    terms: list[str] = []
    args: list[object] = []
    for one in filters.filters:
        for selector in one.selectors:
            if selector.operator is not Operator.EQUAL:
                continue
            path = selector.fieldpath
            if path == ("name",):
                terms.append("s.name = ?")
                args.append(selector.value)
                break
            if len(path) > 1 and path[0] == "labels":
                terms.append("s.id IN (SELECT snapshot_id FROM labels WHERE key = ? AND value = ?)")
                args.extend((".".join(path[1:]), selector.value))
                break
        else:
            return None
    return f"({' OR '.join(terms)})", args


# Where a layer is mounted, given its name (see snapshotter.layers).
LayerMountpoint = Callable[[str], Path]


class Kind(enum.IntEnum):
    """A snapshot's kind; the values are those of containerd's ``Kind`` enum."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def word(self) -> str:
        """The word containerd's filters use: ``view``, ``active`` or ``committed``."""
        return self.name.lower()


# -- errors ------------------------------------------------------------------------------


class SnapshotStoreError(BlockfsError):
    """Base class of the errors the store answers requests with; ``key`` names the snapshot."""

    def __init__(self, message: str, *, key: str = "") -> None:
        super().__init__(message)
        self.key = key


class SnapshotNotFound(SnapshotStoreError):
    """No snapshot by that key or name (in that namespace)."""


class SnapshotExists(SnapshotStoreError):
    """The key or name is already taken."""


class SnapshotStateError(SnapshotStoreError):
    """The snapshot is not in a state that allows the operation (e.g. commit of a view)."""


class InvalidSnapshotRequest(SnapshotStoreError, ValueError):
    """The request itself is wrong: bad kind, label, field path, or uncommitted parent."""


# -- values ------------------------------------------------------------------------------


def _frozen_labels(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(value))


@attrs.frozen
class SnapshotInfo:
    """What containerd's ``Info`` says about a snapshot, plus the namespace it lives in."""

    name: str
    kind: Kind
    parent: str
    labels: Mapping[str, str] = attrs.field(converter=_frozen_labels)
    created: datetime
    updated: datetime
    namespace: str

    def field(self, path: Sequence[str]) -> str | None:
        """The value of a filter field path (``kind``, ``name``, ``parent``, ``labels.K``)."""
        if not path:
            return None
        head = path[0]
        if head == "kind":
            return None if self.kind is Kind.UNKNOWN else self.kind.word
        if head == "name":
            return self.name
        if head == "parent":
            return self.parent
        if head == "labels" and len(path) > 1:
            return self.labels.get(".".join(path[1:]))
        return None


@attrs.frozen
class Usage:
    """Disk space a snapshot's own layer takes: bytes allocated and inodes."""

    size: int = 0
    inodes: int = 0


@attrs.frozen
class _Record:
    id: int
    namespace: str
    name: str
    kind: Kind
    parent_id: int | None
    parent: str
    created_us: int
    updated_us: int
    size: int
    inodes: int
    layer: str | None = None

    @classmethod
    def from_row(cls, row: tuple[object, ...]) -> _Record:
        sid, ns, name, kind, parent_id, parent, created, updated, size, inodes, layer = row
        return cls(
            id=int(str(sid)),
            namespace=str(ns),
            name=str(name),
            kind=Kind(int(str(kind))),
            parent_id=None if parent_id is None else int(str(parent_id)),
            parent="" if parent is None else str(parent),
            created_us=int(str(created)),
            updated_us=int(str(updated)),
            size=int(str(size)),
            inodes=int(str(inodes)),
            layer=None if layer is None else str(layer),
        )

    def info(self, labels: Mapping[str, str]) -> SnapshotInfo:
        return SnapshotInfo(
            name=self.name,
            kind=self.kind,
            parent=self.parent,
            labels=labels,
            created=_from_us(self.created_us),
            updated=_from_us(self.updated_us),
            namespace=self.namespace,
        )


def _now_us() -> int:
    return int(datetime.now(UTC).timestamp() * 1_000_000)


def _from_us(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, UTC)


def _where(namespace: str | None) -> str:
    return "" if namespace is None else " AND s.namespace = ?"


def _args(namespace: str | None, *values: object) -> tuple[object, ...]:
    return values if namespace is None else (*values, namespace)


def _check_name(what: str, name: str) -> None:
    if not name:
        raise InvalidSnapshotRequest(f"the snapshot {what} must not be empty")


def _check_labels(labels: Mapping[str, str]) -> None:
    for key, value in labels.items():
        if not key:
            raise InvalidSnapshotRequest("a label key must not be empty")
        if len(key.encode()) + len(value.encode()) > MAX_LABEL_BYTES:
            raise InvalidSnapshotRequest(
                f"label {key!r} is longer than {MAX_LABEL_BYTES} bytes (key plus value)"
            )


# -- disk usage --------------------------------------------------------------------------


def disk_usage(path: str | os.PathLike[str]) -> Usage:
    """Blocks and inodes allocated under ``path``, each hardlinked inode counted once."""
    seen: set[tuple[int, int]] = set()
    size = 0
    pending = [os.fspath(path)]
    while pending:
        current = pending.pop()
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            continue  # removed while we walk: an active snapshot is in use
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            size += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            try:
                with os.scandir(current) as entries:
                    pending.extend(e.path for e in entries)
            except (FileNotFoundError, NotADirectoryError):
                continue
    return Usage(size=size, inodes=len(seen))


def mounts_under(path: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below ``path`` (which rmtree must not walk into)."""
    prefix = os.path.realpath(path)
    return [
        m.mountpoint
        for m in mounts.read_mountinfo()
        if m.mountpoint == prefix or m.mountpoint.startswith(prefix + "/")
    ]


# -- the store ---------------------------------------------------------------------------


class SnapshotStore:
    """Snapshot records and directories under ``root``; safe to share between threads.

    ``layer_mountpoint`` says where a remote snapshot's layer is mounted; without it the
    store refuses remote snapshots.
    """

    def __init__(
        self, root: str | os.PathLike[str], *, layer_mountpoint: LayerMountpoint | None = None
    ) -> None:
        self.root = Path(root).absolute()
        self._layer_mountpoint = layer_mountpoint
        self.snapshots_dir = self.root / SNAPSHOTS_DIR
        self.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        # Upper dirs hold containers' files: only root may look inside.
        self.snapshots_dir.mkdir(exist_ok=True, mode=0o700)
        # One connection, used under one lock: SQLite serialises writers anyway, and the
        # lock also covers the directory moves that belong to a transaction.
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            self.root / STORE_DB, isolation_level=None, check_same_thread=False
        )
        os.chmod(self.root / STORE_DB, 0o600)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.execute("PRAGMA busy_timeout = 5000")
        self._migrate()

    def close(self) -> None:
        """Close the database; the store must not be used afterwards."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> SnapshotStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _migrate(self) -> None:
        with self._transaction() as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise SnapshotStoreError(
                    f"{self.root / STORE_DB} has schema version {version}; this blockfs "
                    f"knows versions up to {SCHEMA_VERSION} only"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    db.execute(statement)
            if version != SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- paths ---------------------------------------------------------------------------

    def snapshot_dir(self, snapshot_id: int) -> Path:
        """``snapshots/<id>``: the directory holding a snapshot's ``fs`` and ``work``."""
        return self.snapshots_dir / str(snapshot_id)

    def _lower_dir(self, record: _Record) -> Path:
        # The file system a committed snapshot contributes to the snapshots above it.
        if record.layer is None:
            return self.snapshot_dir(record.id) / "fs"
        if self._layer_mountpoint is None:
            raise SnapshotStateError(
                f"snapshot {record.name!r} is served by layer {record.layer!r}, but this "
                "store was opened without remote layers",
                key=record.name,
            )
        return self._layer_mountpoint(record.layer)

    # -- lookups -------------------------------------------------------------------------

    def _find(self, db: sqlite3.Connection, namespace: str | None, name: str) -> _Record | None:
        rows = db.execute(_SELECT + " WHERE s.name = ?" + _where(namespace), _args(namespace, name))
        found = [_Record.from_row(r) for r in rows.fetchall()]
        if len(found) > 1:
            raise SnapshotStateError(
                f"snapshot {name!r} exists in namespaces "
                f"{sorted(r.namespace for r in found)}; name one with containerd-namespace"
            )
        return found[0] if found else None

    def _get(self, db: sqlite3.Connection, namespace: str | None, name: str) -> _Record:
        record = self._find(db, namespace, name)
        if record is None:
            where = "" if namespace is None else f" in namespace {namespace!r}"
            raise SnapshotNotFound(f"snapshot {name!r} does not exist{where}", key=name)
        return record

    def _labels(self, db: sqlite3.Connection, snapshot_id: int) -> dict[str, str]:
        rows = db.execute("SELECT key, value FROM labels WHERE snapshot_id = ?", (snapshot_id,))
        return {str(k): str(v) for k, v in rows.fetchall()}

    def _set_labels(
        self, db: sqlite3.Connection, snapshot_id: int, labels: Mapping[str, str]
    ) -> None:
        db.execute("DELETE FROM labels WHERE snapshot_id = ?", (snapshot_id,))
        db.executemany(
            "INSERT INTO labels (snapshot_id, key, value) VALUES (?, ?, ?)",
            [(snapshot_id, k, v) for k, v in sorted(labels.items()) if v != ""],
        )

    def _committed_parent(
        self, db: sqlite3.Connection, namespace: str | None, parent: str
    ) -> _Record | None:
        """The record of ``parent`` (None for ``""``), which must exist and be committed."""
        if not parent:
            return None
        record = self._find(db, namespace, parent)
        if record is None:
            raise SnapshotNotFound(f"parent snapshot {parent!r} does not exist", key=parent)
        if record.kind is not Kind.COMMITTED:
            raise InvalidSnapshotRequest(
                f"parent {parent!r} is {record.kind.word}, not committed", key=parent
            )
        return record

    def _chain(self, db: sqlite3.Connection, record: _Record) -> list[_Record]:
        """``record`` and its ancestors, nearest first."""
        chain = [record]
        while chain[-1].parent_id is not None:
            row = db.execute(_SELECT + " WHERE s.id = ?", (chain[-1].parent_id,)).fetchone()
            chain.append(_Record.from_row(row))
        return chain

    def _plan(self, db: sqlite3.Connection, record: _Record) -> MountPlan:
        home = self.snapshot_dir(record.id)
        return MountPlan(
            writable=record.kind is Kind.ACTIVE,
            fs=home / "fs",
            work=home / "work",
            lowers=[self._lower_dir(r) for r in self._chain(db, record)[1:]],
        )

    # -- operations ----------------------------------------------------------------------

    def create(
        self,
        namespace: str | None,
        kind: Kind,
        key: str,
        parent: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> MountPlan:
        """Prepare (ACTIVE) or view (VIEW) ``key`` on committed ``parent``; its mount plan."""
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise InvalidSnapshotRequest(f"cannot create a snapshot of kind {kind.word}")
        _check_name("key", key)
        labels = dict(labels or {})
        _check_labels(labels)
        home_namespace = namespace or ""
        with self._lock:
            staging = Path(tempfile.mkdtemp(prefix="new-", dir=self.snapshots_dir))
            final: Path | None = None
            try:
                (staging / "fs").mkdir()
                os.chmod(staging / "fs", 0o755)
                if kind is Kind.ACTIVE:
                    (staging / "work").mkdir()
                    os.chmod(staging / "work", 0o711)
                with self._transaction() as db:
                    if self._find(db, home_namespace, key) is not None:
                        raise SnapshotExists(f"snapshot {key!r} already exists", key=key)
                    parent_record = self._committed_parent(db, namespace, parent)
                    now = _now_us()
                    cursor = db.execute(
                        "INSERT INTO snapshots (namespace, name, kind, parent_id, created_us,"
                        " updated_us) VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            home_namespace,
                            key,
                            int(kind),
                            None if parent_record is None else parent_record.id,
                            now,
                            now,
                        ),
                    )
                    snapshot_id = int(cursor.lastrowid or 0)
                    self._set_labels(db, snapshot_id, labels)
                    record = self._get(db, home_namespace, key)
                    plan = self._plan(db, record)
                    if plan.lowers and plan.writable:
                        # An image unpacked for a user namespace owns its root dir; the
                        # upper dir must agree or the container sees its / change owner.
                        owner = os.stat(plan.lowers[0])
                        os.chown(staging / "fs", owner.st_uid, owner.st_gid)
                    final = self.snapshot_dir(snapshot_id)
                    os.rename(staging, final)
            except BaseException:
                shutil.rmtree(final if final is not None else staging, ignore_errors=True)
                raise
        log.debug("created snapshot", extra={"namespace": namespace, "key": key})
        return plan

    def commit_remote(
        self,
        namespace: str | None,
        name: str,
        parent: str,
        labels: Mapping[str, str],
        layer: str,
    ) -> SnapshotInfo:
        """Record committed snapshot ``name`` on ``parent``, served by the mounted ``layer``.

        This is how a lazily pulled layer enters the store: no active snapshot precedes
        it and no directory holds it. Usage of such a snapshot is zero.
        """
        _check_name("name", name)
        if self._layer_mountpoint is None:
            raise InvalidSnapshotRequest("this store was opened without remote layers")
        labels = dict(labels)
        _check_labels(labels)
        home_namespace = namespace or ""
        with self._transaction() as db:
            if self._find(db, home_namespace, name) is not None:
                raise SnapshotExists(f"snapshot {name!r} already exists", key=name)
            parent_record = self._committed_parent(db, namespace, parent)
            now = _now_us()
            cursor = db.execute(
                "INSERT INTO snapshots (namespace, name, kind, parent_id, created_us,"
                " updated_us, layer) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    home_namespace,
                    name,
                    int(Kind.COMMITTED),
                    None if parent_record is None else parent_record.id,
                    now,
                    now,
                    layer,
                ),
            )
            self._set_labels(db, int(cursor.lastrowid or 0), labels)
            record = self._get(db, home_namespace, name)
            return record.info(self._labels(db, record.id))

    def chain_layers(self, namespace: str | None, key: str) -> list[str]:
        """The layers serving ``key`` and its ancestors, nearest first; ``""``: none."""
        if not key:
            return []
        with self._transaction() as db:
            record = self._find(db, namespace, key)
            if record is None:
                return []
            return [r.layer for r in self._chain(db, record) if r.layer is not None]

    def layer_in_use(self, layer: str) -> bool:
        """Whether any snapshot is served by ``layer``."""
        with self._transaction() as db:
            row = db.execute("SELECT 1 FROM snapshots WHERE layer = ? LIMIT 1", (layer,))
            return row.fetchone() is not None

    def layers_in_use(self) -> set[str]:
        """Every layer that serves at least one snapshot."""
        with self._transaction() as db:
            rows = db.execute("SELECT DISTINCT layer FROM snapshots WHERE layer IS NOT NULL")
            return {str(layer) for (layer,) in rows.fetchall()}

    def mount_plan(self, namespace: str | None, key: str) -> MountPlan:
        """What the mounts of active or view snapshot ``key`` are made of."""
        with self._transaction() as db:
            record = self._get(db, namespace, key)
            if record.kind not in (Kind.ACTIVE, Kind.VIEW):
                raise SnapshotStateError(
                    f"snapshot {key!r} is {record.kind.word}; only active and view "
                    "snapshots can be mounted",
                    key=key,
                )
            return self._plan(db, record)

    def commit(
        self,
        namespace: str | None,
        key: str,
        name: str,
        labels: Mapping[str, str] | None = None,
    ) -> SnapshotInfo:
        """Turn active ``key`` into committed ``name``; ``labels`` replace its labels."""
        _check_name("name", name)
        labels = dict(labels or {})
        _check_labels(labels)
        with self._transaction() as db:
            before = self._find(db, namespace, key)
        # Walking a big upper dir takes time: do it outside the lock, and walk again below
        # in the unlikely case that the key now names another snapshot.
        usage = Usage()
        if before is not None and before.kind is Kind.ACTIVE:
            usage = disk_usage(self.snapshot_dir(before.id) / "fs")
        with self._transaction() as db:
            record = self._find(db, namespace, key)
            home_namespace = record.namespace if record is not None else (namespace or "")
            # containerd's order of checks: the name first, then the key, then its kind.
            if self._find(db, home_namespace, name) is not None:
                raise SnapshotExists(f"snapshot {name!r} already exists", key=name)
            if record is None:
                raise SnapshotNotFound(f"active snapshot {key!r} does not exist", key=key)
            if record.kind is not Kind.ACTIVE:
                raise SnapshotStateError(
                    f"snapshot {key!r} is {record.kind.word}, not active", key=key
                )
            if before is None or record.id != before.id:
                usage = disk_usage(self.snapshot_dir(record.id) / "fs")
            now = _now_us()
            db.execute(
                "UPDATE snapshots SET name = ?, kind = ?, created_us = ?, updated_us = ?,"
                " size = ?, inodes = ? WHERE id = ?",
                (name, int(Kind.COMMITTED), now, now, usage.size, usage.inodes, record.id),
            )
            self._set_labels(db, record.id, labels)
            committed = self._get(db, record.namespace, name)
            return committed.info(self._labels(db, committed.id))

    def remove(self, namespace: str | None, key: str) -> str | None:
        """Delete snapshot ``key`` and its directory; it must have no children.

        Returns the layer that served it when it was a remote snapshot, else None.
        """
        with self._lock:
            with self._transaction() as db:
                record = self._get(db, namespace, key)
                (children,) = db.execute(
                    "SELECT COUNT(*) FROM snapshots WHERE parent_id = ?", (record.id,)
                ).fetchone()
                if children:
                    raise SnapshotStateError(
                        f"snapshot {key!r} has {children} children; remove them first", key=key
                    )
                db.execute("DELETE FROM snapshots WHERE id = ?", (record.id,))
            if record.layer is None:
                self._discard(self.snapshot_dir(record.id))
        return record.layer

    def stat(self, namespace: str | None, key: str) -> SnapshotInfo:
        """The Info of snapshot ``key``."""
        with self._transaction() as db:
            record = self._get(db, namespace, key)
            return record.info(self._labels(db, record.id))

    def update(
        self,
        namespace: str | None,
        name: str,
        labels: Mapping[str, str],
        fieldpaths: Sequence[str] = (),
    ) -> SnapshotInfo:
        """Change the labels of ``name`` as the field paths say; no paths: replace them all.

        ``labels`` replaces every label, ``labels.KEY`` sets or (when ``labels`` lacks it)
        deletes one. Every other field is immutable.
        """
        with self._transaction() as db:
            record = self._get(db, namespace, name)
            current = self._labels(db, record.id)
            if not fieldpaths:
                current = dict(labels)
            for path in fieldpaths:
                if path == "labels":
                    current = dict(labels)
                elif path.startswith("labels."):
                    label = path.removeprefix("labels.")
                    if labels.get(label, ""):
                        current[label] = labels[label]
                    else:
                        current.pop(label, None)
                else:
                    raise InvalidSnapshotRequest(
                        f"cannot update field {path!r} of snapshot {name!r}: only labels "
                        "are mutable",
                        key=name,
                    )
            _check_labels(current)
            self._set_labels(db, record.id, current)
            db.execute(
                "UPDATE snapshots SET updated_us = ? WHERE id = ?",
                (max(_now_us(), record.updated_us + 1), record.id),
            )
            updated = self._get(db, record.namespace, name)
            return updated.info(self._labels(db, record.id))

    def list_snapshots(
        self, namespace: str | None, filters: FilterSet | None = None
    ) -> list[SnapshotInfo]:
        """Every snapshot (of ``namespace``) that matches ``filters``, oldest first."""
        conditions: list[str] = []
        args: list[object] = []
        if namespace is not None:
            conditions.append("s.namespace = ?")
            args.append(namespace)
        narrowed = _narrowing(filters)
        if narrowed is not None:
            conditions.append(narrowed[0])
            args.extend(narrowed[1])
        where = "".join(f" {'AND' if n else 'WHERE'} {c}" for n, c in enumerate(conditions))
        with self._transaction() as db:
            rows = db.execute(_SELECT + where + " ORDER BY s.id", args).fetchall()
            labels: dict[int, dict[str, str]] = {}
            query = "SELECT snapshot_id, key, value FROM labels"
            if where:
                query += f" WHERE snapshot_id IN (SELECT s.id FROM snapshots AS s{where})"
            for sid, key, value in db.execute(query, args):
                labels.setdefault(int(sid), {})[str(key)] = str(value)
        infos = [
            record.info(labels.get(record.id, {})) for record in (_Record.from_row(r) for r in rows)
        ]
        if filters is None:
            return infos
        return [info for info in infos if filters.matches(info.field)]

    def usage(self, namespace: str | None, key: str) -> Usage:
        """Space used by ``key``'s own layer: measured now when active, else as committed."""
        with self._transaction() as db:
            record = self._get(db, namespace, key)
        if record.kind is Kind.ACTIVE:
            return disk_usage(self.snapshot_dir(record.id) / "fs")
        return Usage(size=record.size, inodes=record.inodes)

    def cleanup(self) -> list[str]:
        """Remove directories under ``snapshots/`` that no snapshot owns; their names."""
        removed: list[str] = []
        with self._lock:
            with self._transaction() as db:
                live = {str(sid) for (sid,) in db.execute("SELECT id FROM snapshots")}
            for entry in sorted(os.listdir(self.snapshots_dir)):
                if entry not in live and self._discard(self.snapshots_dir / entry):
                    removed.append(entry)
        return removed

    def _discard(self, path: Path) -> bool:
        # rmtree would delete through a mount into whatever file system is mounted there.
        mounted = mounts_under(path)
        if mounted:
            log.warning(
                "snapshot directory still has mounts; leaving it for a later cleanup",
                extra={"path": str(path), "mounts": mounted},
            )
            return False
        doomed = path
        if not path.name.startswith("rm-"):
            doomed = path.with_name(f"rm-{path.name}")
            try:
                os.rename(path, doomed)
            except FileNotFoundError:
                return False
        shutil.rmtree(doomed, ignore_errors=True)
        if doomed.exists():
            log.warning("cannot remove snapshot directory", extra={"path": str(doomed)})
            return False
        return True
