from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from shimv2.errdefs import Internal, InvalidArgument
from shimv2.vc.storage import (
    RootfsMount,
    guest_mount_source,
    guest_rootfs,
    host_rootfs,
    is_mountpoint,
    mount_rootfs,
    remove_container_dir,
    share_bind_mounts,
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


def _bind(source: Path | str, dest: str, *options: str) -> dict[str, Any]:
    return {"destination": dest, "type": "bind", "source": str(source), "options": list(options)}


async def test_bind_sources_are_shared_and_the_guest_spec_names_them(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    rw, ro, sub = tmp_path / "rw", tmp_path / "ro", tmp_path / "sub"
    for d in (rw, ro, sub):
        d.mkdir()
    (ro / "inner").mkdir()
    (sub / "file").write_text("below")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    await trio.run_process(["mount", "--bind", str(sub), str(ro / "inner")])
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        _bind(rw, "/data", "rbind", "rw"),
        _bind(ro, "/config", "rbind", "ro"),
        _bind(hosts, "/etc/hosts", "rbind", "ro"),
        _bind("/dev/null", "/dev/null", "bind"),  # the guest's own /dev/null
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
        _bind(ro, "/config-all", "rbind", "rro"),
    ]
    record: list[str] = []
    try:
        guest = await share_bind_mounts(shared, "c4", mounts, record)
        assert guest == {i: guest_mount_source("c4", i) for i in (1, 2, 3, 6)}
        assert guest[1] == "/run/kata-containers/shared/containers/c4/mounts/1"
        top = shared / "c4" / "mounts"
        assert record == [str(top / "1"), str(top / "2"), str(top / "3"), str(top / "6")]
        (top / "1" / "new").write_text("from the guest")
        assert (rw / "new").read_text() == "from the guest"
        assert (top / "3").read_text() == "127.0.0.1 localhost\n"
        assert (top / "2" / "inner" / "file").read_text() == "below"
        # ro: the top mount only, as runc does (the rbind's submount stays writable);
        # rro: every mount of the tree
        for path in (top / "2" / "x", top / "3", top / "6" / "x", top / "6" / "inner" / "x"):
            with pytest.raises(OSError, match="Read-only file system") as err:
                path.write_text("x")
            assert err.value.errno == errno.EROFS
        (top / "2" / "inner" / "x").write_text("x")
        assert (sub / "x").read_text() == "x"
        with pytest.raises(Internal, match="still mounted"):
            remove_container_dir(shared, "c4")
    finally:
        assert await unmount_all(record) == []
        await trio.run_process(["umount", str(ro / "inner")])
    remove_container_dir(shared, "c4")
    assert not (shared / "c4").exists()
    assert sorted(os.listdir(rw)) == ["new"]


@pytest.mark.parametrize(
    ("mount", "message"),
    [
        (_bind("/nonexistent/kata-py", "/x", "rbind"), "does not exist"),
        (_bind("relative/path", "/x", "bind"), "not an absolute path"),
        ({"destination": "/x", "type": "none", "source": "", "options": ["rbind"]}, "absolute"),
    ],
)
async def test_bad_bind_sources_are_refused_before_any_mount(
    tmp_path: Path, mount: dict[str, Any], message: str
) -> None:
    good = tmp_path / "good"
    good.mkdir()
    record: list[str] = []
    with pytest.raises(InvalidArgument, match=message):
        await share_bind_mounts(tmp_path / "shared", "c5", [_bind(good, "/g"), mount], record)
    assert record == []
    assert not (tmp_path / "shared").exists()
