"""Test helpers: a busybox rootfs, a ``grpc.Spec`` for it, and the OCI runtime of this host.

The guest runs crun on a pure cgroup v2 hierarchy. A host with the hybrid layout
(cgroup v1 controllers, an empty v2 under ``/sys/fs/cgroup/unified``) makes crun
refuse to run, so there each runtime call runs in a private mount namespace with
the v2 hierarchy mounted on ``/sys/fs/cgroup``: the same kernel hierarchy, seen by
the tests under ``/sys/fs/cgroup/unified``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from shimv2.pb.kata import oci_pb2

BUSYBOX = "/bin/busybox"
APPLETS = (
    "sh", "echo", "cat", "sleep", "ls", "uname", "true", "false", "id", "ps", "yes", "head",
    "stty", "wc", "tr",
)  # fmt: skip
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def build_rootfs(path: Path) -> Path:
    """A minimal rootfs at ``path``: static busybox and its applets as symlinks."""
    (path / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, path / "bin" / "busybox")
    for applet in APPLETS:
        (path / "bin" / applet).symlink_to("busybox")
    for d in ("proc", "dev", "sys", "tmp", "etc", "root"):
        (path / d).mkdir(exist_ok=True)
    (path / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (path / "etc" / "group").write_text("root:x:0:\n")
    return path


def default_mounts() -> list[oci_pb2.Mount]:
    """The mounts of the runtime-spec default config (``crun spec``)."""
    m = oci_pb2.Mount
    return [
        m(destination="/proc", type="proc", source="proc"),
        m(destination="/dev", type="tmpfs", source="tmpfs",
          options=["nosuid", "strictatime", "mode=755", "size=65536k"]),
        m(destination="/dev/pts", type="devpts", source="devpts",
          options=["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]),
        m(destination="/dev/shm", type="tmpfs", source="shm",
          options=["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
        m(destination="/dev/mqueue", type="mqueue", source="mqueue",
          options=["nosuid", "noexec", "nodev"]),
        m(destination="/sys", type="sysfs", source="sysfs",
          options=["nosuid", "noexec", "nodev", "ro"]),
        m(destination="/sys/fs/cgroup", type="cgroup", source="cgroup",
          options=["nosuid", "noexec", "nodev", "relatime", "ro"]),
    ]  # fmt: skip


def make_process(args: list[str], *, terminal: bool = False) -> oci_pb2.Process:
    return oci_pb2.Process(
        Terminal=terminal,
        Args=args,
        Env=[PATH_ENV, "TERM=xterm"],
        Cwd="/",
        User=oci_pb2.User(UID=0, GID=0),
    )


def make_spec(rootfs: str, args: list[str], *, terminal: bool = False) -> oci_pb2.Spec:
    """A spec like the host sends: own pid/ipc/uts/mount/network namespaces, default mounts."""
    spec = oci_pb2.Spec(
        Version="1.0.2",
        Process=make_process(args, terminal=terminal),
        Root=oci_pb2.Root(Path=rootfs, Readonly=False),
        Hostname="kata-py-test",
        Mounts=default_mounts(),
    )
    spec.Linux.Namespaces.extend(
        oci_pb2.LinuxNamespace(Type=t) for t in ("pid", "ipc", "uts", "mount", "network")
    )
    return spec


@dataclass(frozen=True)
class HostRuntime:
    """How to run the OCI runtime on this host, and where its cgroups appear to us."""

    binary: str
    command_prefix: tuple[str, ...]
    cgroup_root: str

    def argv(self, *args: str) -> list[str]:
        return [*self.command_prefix, self.binary, *args]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=30)


def is_cgroup2(path: str) -> bool:
    return os.path.exists(os.path.join(path, "cgroup.controllers"))


def host_runtime(binary: str = "crun") -> HostRuntime:
    if is_cgroup2("/sys/fs/cgroup") or binary == "runc":
        return HostRuntime(binary, (), "/sys/fs/cgroup")
    unified = "/sys/fs/cgroup/unified"
    if not is_cgroup2(unified):
        raise RuntimeError("no cgroup v2 hierarchy on this host")
    prefix = (
        "unshare", "--mount", "--propagation", "private", "sh", "-c",
        'mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec "$0" "$@"',
    )  # fmt: skip
    return HostRuntime(binary, prefix, unified)
