"""The sandbox's host cgroup: path checks, the v1 and v2 layouts, joining before exec.

The layouts run against a directory of fakes (``HostCgroups(root=...)``): this
host is cgroup v1, so the v2 code path is exercised only here, never on a real
unified hierarchy. The real v1 hierarchy is used by the VM and e2e tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio

from shimv2.errdefs import FailedPrecondition, InvalidArgument
from shimv2.vc.api import VirtContainers
from shimv2.vc.cgroups import HostCgroups, expand_slice, sandbox_cgroup, systemd_to_path
from shimv2.vc.config import Config, RuntimeConfig
from shimv2.vc.persist import SandboxState, Store
from shimv2.vc.procs import Child

# -- paths ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("", "/kata-py/sb1"),
        ("/default/c1", "/default/c1"),
        ("/kubepods/besteffort/pod12/abc", "/kubepods/besteffort/pod12/abc"),
        ("//a///b/", "/a/b"),
        (
            "kubepods-besteffort-pod12.slice:cri-containerd:abc",
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice"
            "/cri-containerd-abc.scope",
        ),
        ("-.slice:kata:x", "/kata-x.scope"),
        (":docker:x", "/system.slice/docker-x.scope"),
        ("user.slice::x", "/user.slice/x.scope"),
        ("a.slice:p:b.slice", "/a.slice/b.slice"),
    ],
)
def test_sandbox_cgroup_paths(raw: str, want: str) -> None:
    assert sandbox_cgroup(raw, "sb1") == want


@pytest.mark.parametrize(
    "raw",
    [
        "/",
        "//",
        "/a/../b",
        "/..",
        "/a/./b",
        "/a\0b",
        "/a\nb/c",
        "relative/path",
        "a:b",
        "a.slice:b:c:d",
        "a--b.slice:p:n",
        "-a.slice:p:n",
        "a.slice:p:",
        "notaslice:p:n",
        "a.slice:p/q:n",
        "a.slice:p:..",
        "/" + "x" * 256,
        "/a" * 2100,
    ],
)
def test_sandbox_cgroup_refuses(raw: str) -> None:
    with pytest.raises(InvalidArgument):
        sandbox_cgroup(raw, "sb1")


def test_systemd_mapping_pieces() -> None:
    assert expand_slice("-.slice") == ""
    assert expand_slice("a-b-c.slice") == "/a.slice/a-b.slice/a-b-c.slice"
    assert systemd_to_path("a.slice:p:n") == "/a.slice/p-n.scope"
    with pytest.raises(InvalidArgument):
        expand_slice(".slice")


# -- layouts over fake roots ------------------------------------------------------


def fake_v1(root: Path, controllers: tuple[str, ...] = ("memory", "pids", "cpu", "blkio")) -> Path:
    for name in controllers:
        (root / name).mkdir(parents=True)
        (root / name / "cgroup.procs").write_text("")
    return root


def fake_v2(root: Path, offered: str = "cpuset cpu io memory pids", enabled: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text(offered + "\n")
    (root / "cgroup.subtree_control").write_text(enabled + "\n")
    (root / "cgroup.procs").write_text("")
    return root


def test_v1_layout_one_directory_per_hierarchy(tmp_path: Path) -> None:
    root = fake_v1(tmp_path / "cg")
    (root / "cpuacct").symlink_to("cpu")  # co-mounted: one hierarchy, counted once
    (root / "devices").mkdir()  # not one of ours
    cg = HostCgroups(root)
    assert not cg.unified
    assert [h.name for h in cg.hierarchies()] == ["memory", "pids", "cpu", "blkio"]
    (root / "memory" / "default").mkdir()  # made by someone else: joined, never removed
    (root / "memory" / "default" / "cgroup.procs").write_text("")

    made = cg.create("/default/c1")
    assert made == [
        f"{root}/memory/default/c1",
        f"{root}/pids/default",
        f"{root}/pids/default/c1",
        f"{root}/cpu/default",
        f"{root}/cpu/default/c1",
        f"{root}/blkio/default",
        f"{root}/blkio/default/c1",
    ]
    assert cg.procs_files("/default/c1") == tuple(
        f"{root}/{h}/default/c1/cgroup.procs" for h in ("memory", "pids", "cpu", "blkio")
    )
    assert not (root / "devices" / "default").exists()

    assert cg.remove_now(made) == []
    assert all(not os.path.exists(d) for d in made)
    assert (root / "memory" / "default").is_dir()


def test_v1_with_no_hierarchy_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="no cgroup hierarchy"):
        HostCgroups(tmp_path).create("/kata-py/sb1")


def test_v2_layout_enables_controllers_on_the_way_down(tmp_path: Path) -> None:
    root = fake_v2(tmp_path / "cg", enabled="cpu")
    (tmp_path / "cg" / "memory").mkdir()  # a v1-looking name in a v2 root means nothing
    kube = root / "kubepods"
    kube.mkdir()
    for name, text in (("cgroup.procs", ""), ("cgroup.controllers", "memory pids"),
                       ("cgroup.subtree_control", "memory")):  # fmt: skip
        (kube / name).write_text(text)
    cg = HostCgroups(root)
    assert cg.unified
    assert cg.hierarchies() == [root]

    made = cg.create("/kubepods/pod1/sb1")
    assert made == [f"{root}/kubepods/pod1", f"{root}/kubepods/pod1/sb1"]
    assert (root / "cgroup.subtree_control").read_text() == "+memory +pids +io"
    assert (kube / "cgroup.subtree_control").read_text() == "+pids"
    assert cg.procs_files("/kubepods/pod1/sb1") == (f"{root}/kubepods/pod1/sb1/cgroup.procs",)
    assert cg.remove_now(made) == []
    assert not (kube / "pod1").exists()
    assert kube.is_dir()


def test_kata_parent_is_ours_whoever_made_it(tmp_path: Path) -> None:
    root = fake_v1(tmp_path / "cg", ("memory",))
    cg = HostCgroups(root)
    a = cg.create("/kata-py/a")
    b = cg.create("/kata-py/b")
    assert a == [f"{root}/memory/kata-py", f"{root}/memory/kata-py/a"]
    assert b == [f"{root}/memory/kata-py", f"{root}/memory/kata-py/b"]
    assert cg.remove_now(a) == []  # the parent still holds b: kept, and not a leak
    assert (root / "memory" / "kata-py" / "b").is_dir()
    assert cg.remove_now(b) == []
    assert not (root / "memory" / "kata-py").exists()


async def test_busy_cgroup_is_kept_with_its_parents(tmp_path: Path) -> None:
    root = fake_v1(tmp_path / "cg", ("memory",))
    cg = HostCgroups(root)
    made = cg.create("/x/y")
    busy = root / "memory" / "x" / "y" / "cgroup.procs"
    busy.write_text("42\n")  # a non-empty directory stands for a process still inside
    assert await cg.remove(made, timeout=0.1) == made
    busy.unlink()
    assert await cg.remove(made) == []
    assert not (root / "memory" / "x").exists()


def test_never_removes_outside_the_hierarchies(tmp_path: Path) -> None:
    root = fake_v1(tmp_path / "cg", ("memory",))
    outside = tmp_path / "precious"
    outside.mkdir()
    cg = HostCgroups(root)
    dirs = [str(outside), f"{root}/memory/../../precious", str(root / "memory")]
    assert cg.remove_now(dirs) == []
    assert outside.is_dir()
    assert (root / "memory").is_dir()


def test_a_file_in_the_way_is_refused_and_undone(tmp_path: Path) -> None:
    root = fake_v1(tmp_path / "cg", ("memory", "pids"))
    (root / "pids" / "a").write_text("")  # e.g. a control file named like a component
    with pytest.raises(InvalidArgument, match="not a cgroup"):
        HostCgroups(root).create("/a/b")
    assert not (root / "memory" / "a").exists()


# -- joining before exec ---------------------------------------------------------


async def test_spawn_joins_each_cgroup_then_execs_argv(tmp_path: Path) -> None:
    procs = [tmp_path / "m.procs", tmp_path / "p.procs"]
    for p in procs:
        p.write_text("")
    argv = ["sh", "-c", "sleep 1000; :", "--", "kata-py-x"]  # a "--" in argv is its own
    child = await Child.spawn("t", argv, cgroup=[str(p) for p in procs])
    try:
        want = b"\0".join(a.encode() for a in argv) + b"\0"
        with trio.fail_after(5):
            while Path(f"/proc/{child.pid}/cmdline").read_bytes() != want:  # noqa: ASYNC110 - the exec has no event
                await trio.sleep(0.005)
        assert [p.read_text() for p in procs] == ["0\n", "0\n"]
    finally:
        await child.stop()


async def test_spawn_fails_without_running_argv_when_it_cannot_join(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    child = await Child.spawn(
        "t", ["touch", str(marker)], cgroup=[str(tmp_path / "no" / "cgroup.procs")]
    )
    with trio.fail_after(5):
        assert await child.wait() == 125
    assert not marker.exists()


# -- state and cleanup -----------------------------------------------------------


def test_state_written_before_cgroups_still_loads() -> None:
    old = {"id": "sb1", "state": "running", "qemu_pid": 7, "containers": {}, "version": 1}
    state = SandboxState.from_json(json.dumps(old), "old")
    assert (state.cgroup_path, state.cgroup_dirs) == ("", [])
    again = SandboxState.from_json(state.to_json(), "new")
    assert again == state


async def test_cleanup_from_state_removes_the_recorded_cgroup(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The ``delete`` action's path: no live sandbox, only its state."""
    cg = HostCgroups(fake_v1(tmp_path / "cg", ("memory", "pids")))
    (tmp_path / "cg" / "memory" / "default").mkdir()
    (tmp_path / "cg" / "memory" / "default" / "cgroup.procs").write_text("")
    store = Store(tmp_path / "state")
    store.create("sb1")
    made = cg.create("/default/sb1")
    state = SandboxState(id="sb1", state="running", cgroup_path="/default/sb1", cgroup_dirs=made)
    store.save(state)
    config = Config(runtime=RuntimeConfig(state_dir=str(tmp_path / "state")))
    vc = VirtContainers(nursery, config, store=store, cgroups=cg)
    await vc.cleanup_sandbox("sb1")
    assert all(not os.path.exists(d) for d in made)
    assert (tmp_path / "cg" / "memory" / "default").is_dir()  # not ours
    assert store.list() == []


async def test_invalid_cgroups_path_is_refused_before_anything_exists(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    from shimv2.vc.sandbox import SandboxConfig

    config = Config(runtime=RuntimeConfig(state_dir=str(tmp_path / "state")))
    cg = HostCgroups(fake_v1(tmp_path / "cg", ("memory",)))
    vc = VirtContainers(nursery, config, cgroups=cg)
    with pytest.raises(InvalidArgument, match="bad component"):
        await vc.create_sandbox(SandboxConfig(id="sb1", cgroups_path="/kubepods/../../etc"))
    assert vc.store.list() == []
    assert not (tmp_path / "state" / "sbs" / "sb1").exists()
    assert os.listdir(tmp_path / "cg" / "memory") == ["cgroup.procs"]
