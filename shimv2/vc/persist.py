"""Persisted sandbox state: versioned JSON under ``<root>/sbs/<id>/``, guarded by flock.

Readers take a shared lock, writers an exclusive one, on ``<dir>/lock``, as
Kata's persist/fs does. The state is written atomically (temp file, fsync,
rename), so a crash leaves either the old or the new state. It holds what a
later process needs to reconnect to the sandbox, or to clean it up alone after
the owner died: the VM's pids, sockets and run directory, the shared directory
and what is mounted under it, the network attachments, the containers.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shimv2.errdefs import (
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    NotFound,
    ResourceExhausted,
)
from shimv2.vc import safefs, storage
from shimv2.vc.ids import check_id, sandbox_id

STATE_VERSION = 1
LOCK_TIMEOUT = 30.0


@dataclass
class ContainerState:
    id: str
    bundle: str
    state: str  # created | running | paused | stopped
    rootfs: str = ""  # the host path of the container's rootfs under the shared dir
    mounts: list[str] = field(default_factory=list)  # host mount points we made, in order
    pid: int = 0
    exit_status: int | None = None
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass
class SandboxState:
    id: str
    state: str  # ready | running | paused | stopped
    vm_dir: str = ""
    vm_id: str = ""  # the VM's own id, when not the sandbox's (a cached VM's); its -name
    qemu_pid: int = 0
    virtiofsd_pid: int = 0
    # Their start times (``procs.process_start_time``): with the pid, what tells
    # them from a later process that got the pid. 0 in states written before.
    qemu_start_time: int = 0
    virtiofsd_start_time: int = 0
    agent_socket: str = ""  # virtio-serial's socket, or hybrid vsock's
    vsock_cid: int = 0
    agent_channel: str = ""  # serial | vsock | hybrid-vsock; "" in states written before
    vsock_backend_pid: int = 0  # hybrid-vsock's vhost-device-vsock
    vsock_backend_start_time: int = 0
    shared_dir: str = ""
    netns: str = ""
    taps: list[str] = field(default_factory=list)
    # The sandbox's host cgroup (``/a/b``) and the directories we made for it,
    # parents first: only those are removed. Defaults: states written before.
    cgroup_path: str = ""
    cgroup_dirs: list[str] = field(default_factory=list)
    hypervisor: dict[str, Any] = field(default_factory=dict)
    containers: dict[str, ContainerState] = field(default_factory=dict)
    version: int = STATE_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> SandboxState:
        try:
            raw = json.loads(text)
            if raw.get("version") != STATE_VERSION:
                raise DataLoss(
                    f"{where}: state version {raw.get('version')!r}, this kata-py reads "
                    f"{STATE_VERSION}"
                )
            containers = {k: ContainerState(**v) for k, v in raw.pop("containers").items()}
            return cls(**raw, containers=containers)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise DataLoss(f"{where}: unreadable sandbox state: {exc}") from exc


class Store:
    """Sandbox states under ``<root>/sbs``; no storage directory = no sandboxes."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.sbs = self.root / "sbs"

    def sandbox_dir(self, sid: str) -> Path:
        return self.sbs / sandbox_id(sid)

    def shared_dir(self, sid: str) -> Path:
        return self.sandbox_dir(sid) / "shared"

    def vm_dir(self, sid: str) -> Path:
        # Beside sbs/, not under it: socket paths must stay under 108 bytes.
        return self.root / "vm" / sandbox_id(sid)

    def create(self, sid: str) -> Path:
        path = self.sandbox_dir(sid)
        self.sbs.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            raise FailedPrecondition(f"sandbox {sid} already exists") from None
        (path / "lock").touch(mode=0o600)
        return path

    def list(self) -> list[str]:
        try:
            names = sorted(os.listdir(self.sbs))
        except FileNotFoundError:
            return []
        return [n for n in names if (self.sbs / n / "state.json").exists()]

    def load(self, sid: str) -> SandboxState:
        path = self.sandbox_dir(sid) / "state.json"
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise NotFound(f"sandbox {sid} not found") from None
        return SandboxState.from_json(text, str(path))

    def save(self, state: SandboxState) -> None:
        """Write the state (whole or not at all). A full disk is ResourceExhausted, any
        other failure Internal; the state on disk is then the last one written."""
        path = self.sandbox_dir(state.id) / "state.json"
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "w") as f:
                f.write(state.to_json())
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise (ResourceExhausted if full else Internal)(
                f"sandbox {state.id}: cannot save its state: {exc.strerror}"
            ) from None

    def remove(self, sid: str, vm_id: str = "") -> None:
        """Remove the sandbox's directories, never following a link nor crossing a mount;
        and its VM's, by the VM's own id (``SandboxState.vm_id``) when it has one.

        The shared views are detached first; anything else still mounted
        stops the removal with FailedPrecondition and loses nothing.
        """
        sid = sandbox_id(sid)
        storage.release_shared(self.sandbox_dir(sid))
        removals = [(self.sbs, sid), (self.root / "vm", sid)]
        if vm_id:
            removals.append((self.root / "vm", check_id(vm_id, "VM id")))
        for parent, name in removals:
            with (
                contextlib.suppress(FileNotFoundError),
                safefs.opened(safefs.open_root(parent)) as fd,
            ):
                safefs.remove_tree(fd, name)

    @asynccontextmanager
    async def locked(
        self, sid: str, *, exclusive: bool, timeout: float = LOCK_TIMEOUT
    ) -> AsyncIterator[None]:
        """Hold the sandbox's flock; polled, so it never blocks the trio loop."""
        import trio  # here: ``delete`` reads states without loading trio

        lock = self.sandbox_dir(sid) / "lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"sandbox {sid} not found") from None
        try:
            mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
            acquired = False
            with trio.move_on_after(timeout):
                while not acquired:
                    try:
                        fcntl.flock(fd, mode)
                        acquired = True
                    except BlockingIOError:
                        await trio.sleep(0.01)
            if not acquired:
                raise DeadlineExceeded(f"sandbox {sid}: lock busy for {timeout:g}s")
            yield
        finally:
            os.close(fd)  # closing drops the lock
