"""The mounts handed to containerd, shaped like its overlayfs snapshotter's."""

from __future__ import annotations

from blockfs.host.overlay import Mount, MountPlan, mounts_for


def test_active_without_parent_is_a_writable_bind_of_its_fs() -> None:
    plan = MountPlan(True, "/r/snapshots/1/fs", "/r/snapshots/1/work")
    assert mounts_for(plan) == (Mount("bind", "/r/snapshots/1/fs", ("rw", "rbind")),)


def test_view_without_parent_is_a_read_only_bind_of_its_fs() -> None:
    plan = MountPlan(False, "/r/snapshots/1/fs", "/r/snapshots/1/work")
    assert mounts_for(plan) == (Mount("bind", "/r/snapshots/1/fs", ("ro", "rbind")),)


def test_view_with_one_parent_is_a_read_only_bind_of_the_parent() -> None:
    plan = MountPlan(False, "/r/snapshots/2/fs", "/r/snapshots/2/work", ["/r/snapshots/1/fs"])
    assert mounts_for(plan) == (Mount("bind", "/r/snapshots/1/fs", ("ro", "rbind")),)


def test_active_with_parents_is_an_overlay_with_upper_work_and_nearest_lower_first() -> None:
    plan = MountPlan(True, "/r/s/3/fs", "/r/s/3/work", ["/r/s/2/fs", "/r/s/1/fs"])
    assert mounts_for(plan, index_off=True) == (
        Mount(
            "overlay",
            "overlay",
            (
                "index=off",
                "workdir=/r/s/3/work",
                "upperdir=/r/s/3/fs",
                "lowerdir=/r/s/2/fs:/r/s/1/fs",
            ),
        ),
    )


def test_view_with_several_parents_is_an_overlay_of_lowers_only() -> None:
    plan = MountPlan(False, "/r/s/3/fs", "/r/s/3/work", ["/r/s/2/fs", "/r/s/1/fs"])
    assert mounts_for(plan) == (Mount("overlay", "overlay", ("lowerdir=/r/s/2/fs:/r/s/1/fs",)),)
