from __future__ import annotations

from pathlib import Path

import pytest

from shimv2.errdefs import Internal, InvalidArgument
from shimv2.vc.storage import (
    RootfsMount,
    guest_rootfs,
    host_rootfs,
    is_mountpoint,
    mount_rootfs,
    remove_container_dir,
    unmount_all,
)


def _layers(tmp_path: Path) -> RootfsMount:
    for d in ("lower", "upper", "work"):
        (tmp_path / d).mkdir()
    (tmp_path / "lower" / "hello").write_text("from lower")
    opts = (
        f"lowerdir={tmp_path / 'lower'}",
        f"upperdir={tmp_path / 'upper'}",
        f"workdir={tmp_path / 'work'}",
    )
    return RootfsMount("overlay", "overlay", opts)


async def test_overlay_rootfs_mounted_recorded_and_removed(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    record: list[str] = []
    target = await mount_rootfs(shared, "c1", [_layers(tmp_path)], None, record)
    try:
        assert target == host_rootfs(shared, "c1")
        assert record == [str(target)]
        assert is_mountpoint(target)
        assert (target / "hello").read_text() == "from lower"
        (target / "new").write_text("x")
        assert (tmp_path / "upper" / "new").exists()
        with pytest.raises(Internal, match="still mounted"):
            remove_container_dir(shared, "c1")
        assert (tmp_path / "lower" / "hello").exists()  # nothing deleted through the mount
    finally:
        assert await unmount_all(record) == []
    assert not is_mountpoint(target)
    remove_container_dir(shared, "c1")
    assert not (shared / "c1").exists()
    assert guest_rootfs("c1") == "/run/kata-containers/shared/containers/c1/rootfs"


async def test_bundle_rootfs_is_bound_when_no_mounts(tmp_path: Path) -> None:
    bundle_rootfs = tmp_path / "bundle" / "rootfs"
    bundle_rootfs.mkdir(parents=True)
    (bundle_rootfs / "bin").mkdir()
    record: list[str] = []
    target = await mount_rootfs(tmp_path / "shared", "c2", [], bundle_rootfs, record)
    try:
        assert (target / "bin").is_dir()
    finally:
        await unmount_all(record)
    assert not is_mountpoint(target)


@pytest.mark.parametrize(
    ("mount", "message"),
    [
        (RootfsMount("nfs", "server:/x"), "not supported"),
        (
            RootfsMount("overlay", "overlay", ("lowerdir=/a,upperdir=/b",)),
            "bad rootfs mount option",
        ),
    ],
)
async def test_bad_mounts_are_refused(tmp_path: Path, mount: RootfsMount, message: str) -> None:
    record: list[str] = []
    with pytest.raises(InvalidArgument, match=message):
        await mount_rootfs(tmp_path / "shared", "c3", [mount], None, record)
    assert record == []
    with pytest.raises(InvalidArgument, match="invalid container id"):
        await mount_rootfs(tmp_path / "shared", "../c", [], tmp_path, record)
