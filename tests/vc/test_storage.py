"""Host storage: the two views, and every step proof against links the guest could plant.

These run as root with real mounts (tmpfs, overlay, binds) in a private tmp dir.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shimv2.errdefs import FailedPrecondition, InvalidArgument
from shimv2.vc import safefs
from shimv2.vc.storage import (
    RootfsMount,
    guest_mount_source,
    guest_rootfs,
    host_rootfs,
    mount_rootfs,
    prepare_shared,
    release_shared,
    remove_container_dir,
    share_bind_mounts,
    unmount_all,
)
from tests.mountinfo import mounted


def sh(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True)


@contextlib.contextmanager
def refused(*codes: int) -> Iterator[None]:
    """The block must fail with an OSError of one of ``codes``."""
    with pytest.raises(OSError) as err:  # noqa: PT011 - the errno is checked below
        yield
    assert err.value.errno in codes, err.value


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Path]:
    """A sandbox directory with its two views; everything is unmounted afterwards."""
    top = tmp_path / "sb"
    top.mkdir()
    prepare_shared(top)
    try:
        yield top
    finally:
        release_shared(top)
        subprocess.run(["umount", "-R", "-l", str(top)], capture_output=True, check=False)
    assert not mounted(top / "mounts")
    assert not mounted(top / "shared")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A scratch tmpfs that the tests mount and make shared like a systemd host's /."""
    path = tmp_path / "host"
    path.mkdir()
    sh("mount", "-t", "tmpfs", "host", path)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-R", "-l", str(path)], capture_output=True, check=False)


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


def _bind(source: Path | str, dest: str, *options: str) -> dict[str, Any]:
    return {"destination": dest, "type": "bind", "source": str(source), "options": list(options)}


def test_shared_is_a_read_only_view_that_follows_later_mounts(
    sandbox: Path, tmp_path: Path
) -> None:
    shared = sandbox / "shared"
    for attempt in (
        lambda: (shared / "x").mkdir(),
        lambda: (shared / "x").symlink_to("/"),
        lambda: (shared / "x").write_text("fill the host's /run"),
    ):
        with refused(errno.EROFS):
            attempt()
    record: list[str] = []
    target = mount_rootfs(sandbox, "c1", [_layers(tmp_path)], tmp_path, "rootfs", record)
    try:
        assert target == host_rootfs(sandbox, "c1") == sandbox / "mounts" / "c1" / "rootfs"
        seen = shared / "c1" / "rootfs"
        assert (seen / "hello").read_text() == "from lower"
        (seen / "new").write_text("from the guest")  # the rootfs itself stays writable
        assert (tmp_path / "upper" / "new").read_text() == "from the guest"
        with refused(errno.EROFS):
            (shared / "c1" / "evil").symlink_to("/etc")  # but not the tree around it
        with refused(errno.EROFS):
            os.rename(shared / "c1", shared / "c1.x")
    finally:
        assert unmount_all(sandbox, record) == []
    assert not mounted(target)
    assert not mounted(shared / "c1" / "rootfs")
    remove_container_dir(sandbox, "c1")
    assert not (sandbox / "mounts" / "c1").exists()
    assert guest_rootfs("c1") == "/run/kata-containers/shared/containers/c1/rootfs"


def test_overlay_flags_and_a_stacked_second_mount(sandbox: Path, tmp_path: Path) -> None:
    layers = _layers(tmp_path)
    ro = RootfsMount("overlay", "overlay", (*layers.options, "ro", "nosuid"))
    record: list[str] = []
    target = mount_rootfs(sandbox, "c1", [ro], tmp_path, "rootfs", record)
    try:
        with refused(errno.EROFS):
            (target / "x").write_text("x")
        mount_rootfs(sandbox, "c1", [RootfsMount("tmpfs", "tmpfs", ("size=1m",))], "", "", record)
        (target / "on-top").write_text("tmpfs")
        assert not (target / "hello").exists()
    finally:
        assert unmount_all(sandbox, record) == []
    assert not mounted(target)


def test_bundle_rootfs_is_bound_and_root_path_stays_in_the_bundle(
    sandbox: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "rootfs" / "bin").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (bundle / "link").symlink_to(tmp_path / "outside")
    for bad in ("../outside", "/etc", str(tmp_path / "outside"), "link", "rootfs/../../outside"):
        with pytest.raises(InvalidArgument, match=r"root\.path"):
            mount_rootfs(sandbox, "c2", [], bundle, bad, [])
    record: list[str] = []
    target = mount_rootfs(sandbox, "c2", [], bundle, str(bundle / "rootfs"), record)
    try:
        assert (target / "bin").is_dir()
        assert (sandbox / "shared" / "c2" / "rootfs" / "bin").is_dir()
    finally:
        assert unmount_all(sandbox, record) == []
    assert not mounted(target)


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
def test_bad_mounts_are_refused(sandbox: Path, mount: RootfsMount, message: str) -> None:
    record: list[str] = []
    with pytest.raises(InvalidArgument, match=message):
        mount_rootfs(sandbox, "c3", [mount], "", "", record)
    assert record == []
    with pytest.raises(InvalidArgument, match="invalid container id"):
        mount_rootfs(sandbox, "../c", [], sandbox, "rootfs", record)


def test_bind_sources_are_shared_and_the_guest_spec_names_them(
    sandbox: Path, tmp_path: Path, tmpfs: Path
) -> None:
    rw, ro = tmp_path / "rw", tmpfs / "ro"
    for d in (rw, ro / "inner", tmpfs / "sub"):
        d.mkdir(parents=True)
    (tmpfs / "sub" / "file").write_text("below")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    sh("mount", "--bind", tmpfs / "sub", ro / "inner")
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
        guest = share_bind_mounts(sandbox, "c4", mounts, record)
        assert {i: b.source for i, b in guest.items()} == {
            i: guest_mount_source("c4", i) for i in (1, 2, 3, 6)
        }
        assert guest[1].source == "/run/kata-containers/shared/containers/c4/mounts/1"
        # Only the plain ro bind with a submount leaves its ro to the host: in the
        # guest, virtio-fs shows one mount, and ro there would cover the submount.
        assert [i for i, b in guest.items() if b.ro_on_host_only] == [2]
        top = sandbox / "mounts" / "c4" / "mounts"
        assert record == [str(top / "1"), str(top / "2"), str(top / "3"), str(top / "6")]
        seen = sandbox / "shared" / "c4" / "mounts"  # what the guest sees
        (seen / "1" / "new").write_text("from the guest")
        assert (rw / "new").read_text() == "from the guest"
        assert (seen / "3").read_text() == "127.0.0.1 localhost\n"
        assert (seen / "2" / "inner" / "file").read_text() == "below"
        # ro: the top mount only, as runc does (the rbind's submount stays writable);
        # rro: every mount of the tree
        for path in (seen / "2" / "x", seen / "3", seen / "6" / "x", seen / "6" / "inner" / "x"):
            with refused(errno.EROFS):
                path.write_text("x")
        (seen / "2" / "inner" / "x").write_text("x")
        assert (tmpfs / "sub" / "x").read_text() == "x"
        with pytest.raises(FailedPrecondition, match="still mounted"):
            remove_container_dir(sandbox, "c4")
        assert (rw / "new").exists()  # nothing deleted through the mount
    finally:
        assert unmount_all(sandbox, record) == []
    assert not mounted(seen / "1")
    assert not mounted(top / "1")
    remove_container_dir(sandbox, "c4")
    assert not (sandbox / "mounts" / "c4").exists()
    assert sorted(os.listdir(rw)) == ["new"]
    assert mounted(ro / "inner")  # the host's own submount is untouched


def test_rro_covers_submounts_whatever_their_names(
    sandbox: Path, tmp_path: Path, tmpfs: Path
) -> None:
    # The old code found submounts by their escaped names in mountinfo and
    # garbled non-ASCII ones, leaving them writable.
    source = tmpfs / "vol"
    inner = source / "ünï côdé\tdir"
    inner.mkdir(parents=True)
    sh("mount", "-t", "tmpfs", "inner", inner)
    record: list[str] = []
    share_bind_mounts(sandbox, "c1", [_bind(source, "/v", "rbind", "rro")], record)
    try:
        seen = sandbox / "shared" / "c1" / "mounts" / "0" / "ünï côdé\tdir"
        assert seen.is_dir()
        with refused(errno.EROFS):
            (seen / "x").write_text("x")
        (inner / "host-writes").write_text("still fine")  # the host's own mount is not ro
    finally:
        assert unmount_all(sandbox, record) == []


@pytest.mark.parametrize("options", [["rbind"], ["rbind", "rprivate"], ["rbind", "rslave"]])
def test_teardown_never_unmounts_the_hosts_own_submounts(
    sandbox: Path, tmpfs: Path, options: list[str]
) -> None:
    # On a systemd host / is shared: a bind that joined its source's peer
    # group would, at teardown, unmount the source's submounts too.
    sh("mount", "--make-rshared", tmpfs)
    (tmpfs / "sub").mkdir()
    sh("mount", "-t", "tmpfs", "sub", tmpfs / "sub")
    record: list[str] = []
    share_bind_mounts(sandbox, "c1", [_bind(tmpfs, "/v", *options)], record)
    seen = sandbox / "shared" / "c1" / "mounts" / "0"
    assert mounted(seen / "sub")
    # rslave: a mount the host makes later shows up in the guest; rprivate: never.
    (tmpfs / "later").mkdir()
    sh("mount", "-t", "tmpfs", "later", tmpfs / "later")
    assert mounted(seen / "later") == ("rslave" in options)
    assert unmount_all(sandbox, record) == []
    assert mounted(tmpfs / "sub")
    assert mounted(tmpfs / "later")
    assert not mounted(seen)


def test_a_read_only_bind_is_never_visible_writable(sandbox: Path, tmp_path: Path) -> None:
    # The old code bound, then remounted read-only in a second step: a guest
    # polling the mount point could write in between.
    source = tmp_path / "src"
    source.mkdir()
    seen = sandbox / "shared" / "c1" / "mounts" / "0"
    wrote: list[str] = []
    done = threading.Event()

    def guest() -> None:
        while not done.is_set():
            try:
                (seen / "w").write_text("x")
                wrote.append("yes")
            except OSError:
                pass

    thread = threading.Thread(target=guest)
    thread.start()
    try:
        for _ in range(40):
            record: list[str] = []
            share_bind_mounts(sandbox, "c1", [_bind(source, "/ro", "bind", "ro")], record)
            assert unmount_all(sandbox, record) == []
            remove_container_dir(sandbox, "c1")
    finally:
        done.set()
        thread.join()
    assert wrote == []
    assert not (source / "w").exists()


# -- links planted where the host works (as root in the guest could, before the fix) --


def test_a_link_planted_at_a_bind_mount_point_is_not_followed(
    sandbox: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    source = tmp_path / "src"
    source.mkdir()
    top = sandbox / "mounts" / "c1" / "mounts"
    top.mkdir(parents=True)
    (top / "0").symlink_to(victim)
    record: list[str] = []
    with pytest.raises(InvalidArgument, match="mount point 0 exists as a symbolic link"):
        share_bind_mounts(sandbox, "c1", [_bind(source, "/x", "rbind")], record)
    assert not mounted(victim)
    (top / "0").unlink()
    os.rmdir(top)
    (sandbox / "mounts" / "c1").rmdir()
    (sandbox / "mounts" / "c1").symlink_to(victim)  # a link higher up
    with refused(errno.ELOOP, errno.ENOTDIR):
        share_bind_mounts(sandbox, "c1", [_bind(source, "/x", "rbind")], record)
    assert not mounted(victim / "mounts" / "0")
    assert os.listdir(victim) == []


def test_a_link_planted_at_the_rootfs_is_not_followed(sandbox: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (sandbox / "mounts" / "c1").mkdir()
    (sandbox / "mounts" / "c1" / "rootfs").symlink_to(victim)
    with pytest.raises(InvalidArgument, match="mount point rootfs exists as a symbolic link"):
        mount_rootfs(sandbox, "c1", [_layers(tmp_path)], "", "", [])
    assert not mounted(victim)


def test_delete_never_follows_a_swapped_container_dir(sandbox: Path, tmp_path: Path) -> None:
    # mv <cid> <cid>.x; ln -s /etc <cid>: the old walk deleted the link's target.
    victim = tmp_path / "victim"
    (victim / "deep").mkdir(parents=True)
    (victim / "precious").write_text("keep")
    (victim / "deep" / "also").write_text("keep")
    (sandbox / "mounts" / "c1").symlink_to(victim)
    remove_container_dir(sandbox, "c1")
    assert not os.path.lexists(sandbox / "mounts" / "c1")
    assert (victim / "precious").read_text() == "keep"
    assert (victim / "deep" / "also").read_text() == "keep"


def test_unmount_never_follows_a_link_to_a_host_mount(
    sandbox: Path, tmp_path: Path, tmpfs: Path
) -> None:
    # <cid>/rootfs -> /: the old realpath check said "mounted" and ran umount -R /.
    (tmpfs / "data").write_text("host")
    (sandbox / "mounts" / "c1").mkdir()
    (sandbox / "mounts" / "c1" / "rootfs").symlink_to(tmpfs)
    point = str(sandbox / "mounts" / "c1" / "rootfs")
    assert unmount_all(sandbox, [point]) == []  # nothing is mounted on the link itself
    assert mounted(tmpfs)
    assert (tmpfs / "data").read_text() == "host"
    remove_container_dir(sandbox, "c1")
    assert (tmpfs / "data").read_text() == "host"
    outside = str(tmpfs)
    assert unmount_all(sandbox, [outside, str(sandbox / "mounts/../../host")]) == [
        str(sandbox / "mounts/../../host"),
        outside,
    ]  # recorded points outside the sandbox are never touched
    assert mounted(tmpfs)


def test_a_live_mount_stops_the_removal_and_loses_nothing(sandbox: Path, tmpfs: Path) -> None:
    (tmpfs / "data").write_text("host")
    point = sandbox / "mounts" / "c1" / "left"
    point.mkdir(parents=True)
    sh("mount", "--bind", tmpfs, point)
    try:
        with pytest.raises(FailedPrecondition, match="c1/left is still mounted"):
            remove_container_dir(sandbox, "c1")
        assert (tmpfs / "data").read_text() == "host"
    finally:
        sh("umount", point)
    remove_container_dir(sandbox, "c1")
    assert not (sandbox / "mounts" / "c1").exists()


@pytest.mark.parametrize(
    ("mount", "message"),
    [
        (_bind("/nonexistent/kata-py", "/x", "rbind"), "does not exist"),
        (_bind("relative/path", "/x", "bind"), "not an absolute path"),
        ({"destination": "/x", "type": "none", "source": "", "options": ["rbind"]}, "absolute"),
    ],
)
def test_bad_bind_sources_are_refused_before_any_mount(
    sandbox: Path, tmp_path: Path, mount: dict[str, Any], message: str
) -> None:
    good = tmp_path / "good"
    good.mkdir()
    record: list[str] = []
    with pytest.raises(InvalidArgument, match=message):
        share_bind_mounts(sandbox, "c5", [_bind(good, "/g"), mount], record)
    assert record == []
    assert not (sandbox / "mounts" / "c5").exists()


def test_safefs_makedirs_refuses_links_and_mount_crossings(tmp_path: Path, tmpfs: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a").symlink_to(tmp_path)
    (root / "m").mkdir()
    sh("mount", "--bind", tmpfs, root / "m")
    try:
        with safefs.opened(safefs.open_root(root)) as fd:
            for rel, codes in (("a/b", (errno.ELOOP, errno.ENOTDIR)), ("m/b", (errno.EXDEV,))):
                with refused(*codes):
                    safefs.makedirs(fd, rel)
            with pytest.raises(InvalidArgument, match="bad path component"):
                safefs.makedirs(fd, "../x")
            assert safefs.is_mountpoint(fd, "m")
            assert not safefs.is_mountpoint(fd, "a")
    finally:
        sh("umount", root / "m")
    assert not (tmp_path / "b").exists()
    assert os.listdir(tmpfs) == []
