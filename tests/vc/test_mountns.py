"""The pod's mount namespace: the shim's tree of the pod's mounts, out of the host's way.

Real namespaces and mounts (root), in a private tmp dir; no VM.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shimv2.errdefs import Internal
from shimv2.vc.mountns import MountNamespace, nsenter_argv
from shimv2.vc.storage import (
    RootfsMount,
    mount_rootfs,
    prepare_shared,
    release_shared,
    remove_container_dir,
    share_bind_mounts,
    unmount_all,
)
from tests.mountinfo import mounts_in_every_namespace
from tests.vc.test_storage import _layers, sh


def mount_points(ns: MountNamespace) -> list[str]:
    with open(ns.path.replace("/ns/mnt", "/mountinfo")) as f:
        return [line.split()[4] for line in f]


@pytest.fixture
def ns() -> Iterator[MountNamespace]:
    ns = MountNamespace.create()
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture
def sandbox(ns: MountNamespace, tmp_path: Path) -> Iterator[Path]:
    top = tmp_path / "sb"
    top.mkdir()
    ns.call(prepare_shared, top)
    try:
        yield top
    finally:
        ns.call(release_shared, top)


@pytest.fixture
def host_path(tmp_path: Path) -> Iterator[Path]:
    """A hostPath with a tmpfs submount, as critest's read-only mount specs make it."""
    path = tmp_path / "hostpath"
    (path / "tmpfs").mkdir(parents=True)
    (path / "file").write_text("top")
    sh("mount", "-t", "tmpfs", "sub", path / "tmpfs")
    (path / "tmpfs" / "inner").write_text("sub")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path / "tmpfs")], capture_output=True, check=False)


def bind(source: Path, *options: str) -> dict[str, object]:
    return {"destination": "/data", "type": "bind", "source": str(source),
            "options": ["rbind", *options]}  # fmt: skip


def test_the_pods_mounts_are_in_its_namespace_only(
    ns: MountNamespace, sandbox: Path, host_path: Path
) -> None:
    record: list[str] = []
    ns.call(share_bind_mounts, sandbox, "c1", [bind(host_path, "ro")], record, host=ns.host)
    point = str(sandbox / "mounts" / "c1" / "mounts" / "0")
    assert record == [point]
    assert point in mount_points(ns)
    assert f"{point}/tmpfs" in mount_points(ns)
    with open("/proc/self/mountinfo") as f:
        assert not any(str(sandbox) in line for line in f)  # the host's table is untouched
    # From the host's namespace, mounts/ and shared/ are plain directories.
    assert not (sandbox / "shared" / "c1" / "mounts" / "0" / "file").exists()
    assert ns.call(lambda: (Path(point) / "tmpfs" / "inner").read_text()) == "sub"


def test_the_host_removes_a_hostpath_with_a_submount_while_the_pod_runs(
    ns: MountNamespace, sandbox: Path, host_path: Path
) -> None:
    """critest's read-only specs: their cleanup failed with EBUSY when the copy was the host's."""
    ns.call(share_bind_mounts, sandbox, "c1", [bind(host_path, "ro")], [], host=ns.host)
    sh("umount", host_path / "tmpfs")
    os.rmdir(host_path / "tmpfs")  # EBUSY while the copy's submount was in the host's table
    sh("rm", "-r", host_path)
    point = str(sandbox / "mounts" / "c1" / "mounts" / "0")
    assert f"{point}/tmpfs" not in mount_points(ns)  # the kernel detached it


def test_in_the_hosts_own_namespace_the_copy_would_keep_it_busy(
    tmp_path: Path, host_path: Path
) -> None:
    """Why the namespace: the same copy made in the caller's namespace gives EBUSY."""
    top = tmp_path / "sb"
    top.mkdir()
    prepare_shared(top)
    try:
        share_bind_mounts(top, "c1", [bind(host_path, "ro")], [])
        sh("umount", host_path / "tmpfs")
        with pytest.raises(OSError) as err:  # noqa: PT011 - the errno is checked below
            os.rmdir(host_path / "tmpfs")
        assert err.value.errno == errno.EBUSY
    finally:
        release_shared(top)


def test_host_mounts_made_after_the_namespace_are_seen(
    ns: MountNamespace, sandbox: Path, host_path: Path, tmp_path: Path
) -> None:
    """Bind sources are opened from the host's namespace, so later host mounts count."""
    later = tmp_path / "later"
    later.mkdir()
    sh("mount", "-t", "tmpfs", "later", later)
    try:
        (later / "new").write_text("made after the pod")
        ns.call(share_bind_mounts, sandbox, "c1", [bind(later)], [], host=ns.host)
        copy = sandbox / "mounts" / "c1" / "mounts" / "0" / "new"
        assert ns.call(copy.read_text) == "made after the pod"
    finally:
        sh("umount", "-l", later)


def test_virtiofsd_s_way_in_sees_the_tree(
    ns: MountNamespace, sandbox: Path, host_path: Path
) -> None:
    ns.call(share_bind_mounts, sandbox, "c1", [bind(host_path)], [], host=ns.host)
    shared = sandbox / "shared" / "c1" / "mounts" / "0" / "tmpfs" / "inner"
    out = subprocess.run([*nsenter_argv(ns.path), "cat", str(shared)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout == "sub"


@pytest.mark.parametrize("kind", ["bundle", "bind", "overlay"])
def test_every_kind_of_rootfs_mounts_in_the_namespace(
    ns: MountNamespace, sandbox: Path, tmp_path: Path, kind: str
) -> None:
    """The bundle's root.path and a bind are opened on the host's side, an overlay in the pod's."""
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "rootfs" / "hello").write_text("from the image")
    layers = _layers(tmp_path)
    mounts = {
        "bundle": [],
        "bind": [RootfsMount("bind", str(bundle / "rootfs"), ("rbind",))],
        "overlay": [layers],
    }[kind]
    if kind == "overlay":
        (tmp_path / "lower" / "hello").write_text("from the image")
    record: list[str] = []
    target = ns.call(mount_rootfs, sandbox, "c1", mounts, bundle, "rootfs", record, host=ns.host)
    assert str(target) in mount_points(ns)
    shared = sandbox / "shared" / "c1" / "rootfs" / "hello"
    assert ns.call(shared.read_text) == "from the image"
    with open("/proc/self/mountinfo") as f:
        assert not any(str(sandbox) in line for line in f)
    assert ns.call(unmount_all, sandbox, record) == []
    assert str(target) not in mount_points(ns)


def test_teardown_in_the_namespace_leaves_nothing(
    ns: MountNamespace, sandbox: Path, host_path: Path
) -> None:
    record: list[str] = []
    ns.call(share_bind_mounts, sandbox, "c1", [bind(host_path)], record, host=ns.host)
    assert ns.call(unmount_all, sandbox, record) == []
    ns.call(remove_container_dir, sandbox, "c1")
    assert not (sandbox / "mounts" / "c1").exists()
    assert [p for p in mount_points(ns) if p.startswith(str(sandbox / "mounts" / "c1"))] == []


def test_closing_the_namespace_drops_whatever_is_still_mounted(
    tmp_path: Path, host_path: Path
) -> None:
    ns = MountNamespace.create()
    top = tmp_path / "sb"
    top.mkdir()
    ns.call(prepare_shared, top)
    ns.call(share_bind_mounts, top, "c1", [bind(host_path)], [], host=ns.host)
    assert mounts_in_every_namespace(str(top))  # seen by the helper the leak checks use
    ns.close()
    assert mounts_in_every_namespace(str(top)) == []
    ns.close()  # twice is fine


def test_a_namespace_joined_from_its_fd_is_the_same_tree_and_outlives_its_maker(
    tmp_path: Path, host_path: Path
) -> None:
    maker = MountNamespace.create()  # a VM cache's, say
    top = tmp_path / "sb"
    top.mkdir()
    maker.call(prepare_shared, top)
    joined = MountNamespace.join(os.open(maker.path, os.O_RDONLY | os.O_CLOEXEC))
    maker.close()  # the joiner's thread holds it now
    joined.call(share_bind_mounts, top, "c1", [bind(host_path)], [], host=joined.host)
    assert str(top / "shared") in mount_points(joined)  # made by the maker
    assert str(top / "mounts" / "c1" / "mounts" / "0") in mount_points(joined)
    joined.close()
    assert mounts_in_every_namespace(str(top)) == []


def test_joining_what_is_no_mount_namespace_is_an_error(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_CLOEXEC)
    with pytest.raises(Internal, match="cannot join"):
        MountNamespace.join(fd)
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)  # taken over: closed either way


def test_misuse_is_an_error_not_a_mount_in_the_wrong_place(ns: MountNamespace) -> None:
    with pytest.raises(Internal, match="thread"), ns.host():
        pass
    with pytest.raises(ZeroDivisionError):
        ns.call(lambda: 1 // 0)
    assert ns.call(threading.get_native_id) != threading.get_native_id()
    ns.close()
    with pytest.raises(Internal, match="closed"):
        ns.call(int)
