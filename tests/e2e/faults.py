"""Pods under load for the fault tests (``tests/e2e/test_faults.py``).

A ``Pod`` is a ``ctr run -d`` pod with an exec streaming numbered lines back
through ``ctr task exec``; ``Events`` follows ``ctr events`` so that a task's
exit is timed when containerd publishes it; ``leftovers`` lists what is left
of a pod on the host.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from shimv2.shim.bootstrap import socket_path
from tests.e2e.conftest import (
    IMAGE,
    RUNTIME,
    Containerd,
    assert_nothing_left,
    shim_pids,
    shim_sockets,
)
from tests.e2e.test_ctr import pod_cgroups, task_status
from tests.leaks import cgroup_dirs, vm_processes
from tests.mountinfo import mounts_in_every_namespace

STATE = Path("/run/kata-py")
_exec_ids = itertools.count()
NAMES: list[str] = []  # every pod the fault tests made: what must be gone at the end


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def shim_of(name: str) -> int | None:
    """The pid of the shim serving ``name`` (named by ``-id`` on its command line)."""
    found = [p for p in shim_pids() if f"-id {name} " in f"{cmdline(p)} "]
    return found[0] if found else None


def vm_pid(name: str, program: str) -> int:
    """The pid of the pod's ``program`` (qemu-system, virtiofsd, vhost-device-vsock)."""
    found = [p for p in vm_processes(f"/{name}/") if program in p.split(":", 1)[1]]
    if program == "virtiofsd":  # its path is /usr/lib/qemu/virtiofsd: not QEMU's
        found = [p for p in found if "qemu-system" not in p]
    assert len(found) == 1, (program, found)
    return int(found[0].split(":")[0])


class Stream:
    """``ctr task exec`` of a loop printing ``<tag>-<n>``, read line by line.

    A line out of sequence (lost, repeated, or another stream's) is kept in
    ``wrong``: streams must neither cross nor lose lines.
    """

    def __init__(self, cd: Containerd, pod: str) -> None:
        self.tag = f"x{next(_exec_ids)}"
        self.count = 0
        self.wrong: list[str] = []
        self.last = time.monotonic()
        loop = (
            "i=0; while :; do j=0; while [ $j -lt 10 ]; do "
            f"echo {self.tag}-$i; i=$((i+1)); j=$((j+1)); done; sleep 0.1; done"
        )
        self.proc = subprocess.Popen(
            [cd.ctr_binary, "-a", cd.socket, "task", "exec", "--exec-id", self.tag, pod,
             "sh", "-c", loop],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, out: IO[bytes]) -> None:
        for raw in out:
            line = raw.decode(errors="replace").rstrip("\n")
            if line != f"{self.tag}-{self.count}":
                self.wrong.append(line)
            self.count += 1
            self.last = time.monotonic()

    def flowing(self, timeout: float = 30, lines: int = 20) -> bool:
        """Whether ``lines`` more lines arrive within ``timeout`` seconds."""
        want = self.count + lines
        deadline = time.monotonic() + timeout
        while self.count < want and self.proc.poll() is None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return self.count >= want

    def close(self) -> int | None:
        """Stop the client (the loop in the guest goes with its pod); its exit status."""
        if self.proc.poll() is None:
            self.proc.kill()
        rc = self.proc.wait(timeout=30)
        self._reader.join(timeout=10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return rc

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None or self.proc.stderr.closed:
            return ""
        return self.proc.stderr.read().decode(errors="replace")[-500:]


@dataclass
class Pod:
    cd: Containerd
    name: str
    stream: Stream | None = None
    pids: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        NAMES.append(self.name)

    def start(self, *flags: str, cmd: tuple[str, ...] = ("sleep", "1d")) -> None:
        self.cd.ctr("run", "-d", "--runtime", RUNTIME, *flags, IMAGE, self.name, *cmd)
        self.pids = self.processes()

    def processes(self) -> dict[str, int]:
        shim = shim_of(self.name)
        assert shim is not None, f"no shim for {self.name}"
        return {"shim": shim, "qemu": vm_pid(self.name, "qemu-system")}

    def ensure_stream(self) -> Stream:
        """A stream that is running: a new one if there is none or the old one ended."""
        if self.stream is None or self.stream.proc.poll() is not None:
            if self.stream is not None:
                self.stream.close()
            self.stream = Stream(self.cd, self.name)
        assert self.stream.flowing(60), f"{self.name}: no output: {self.stream.stderr()}"
        return self.stream

    def lost_processes(self) -> list[str]:
        """Its shim or QEMU, as they were at the start, gone: [] if both live on."""
        return [
            f"{self.name}: its {kind} {pid} is gone"
            for kind, pid in self.pids.items()
            if self.name not in cmdline(pid)
        ]

    def exec_works(self) -> bool:
        tag = f"f{next(_exec_ids)}"
        out = self.cd.ctr("task", "exec", "--exec-id", tag, self.name, "echo", tag, check=False)
        return out.returncode == 0 and out.stdout == f"{tag}\n"

    def untouched(self) -> list[str]:
        """What is wrong with a pod that should not have noticed a fault: [] if nothing."""
        wrong = self.lost_processes()
        if (status := task_status(self.cd, self.name)) != "RUNNING":
            wrong.append(f"{self.name}: {status}")
        if self.stream is not None:
            if not self.stream.flowing(30):
                wrong.append(f"{self.name}: stream stopped: {self.stream.stderr()}")
            if self.stream.wrong:
                wrong.append(f"{self.name}: stream out of order: {self.stream.wrong[:3]}")
        if not self.exec_works():
            wrong.append(f"{self.name}: a new exec failed")
        return wrong

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


def remove(cd: Containerd, name: str) -> None:
    """Best effort, for ``finally``: the task killed and deleted, the container too."""
    cd.ctr("task", "kill", "-a", "-s", "SIGKILL", name, check=False)
    deadline = time.monotonic() + 30
    while task_status(cd, name) not in ("STOPPED", "MISSING") and time.monotonic() < deadline:
        time.sleep(0.2)
    cd.ctr("task", "rm", "-f", name, check=False)
    cd.ctr("containers", "rm", name, check=False)


@dataclass
class Event:
    at: float  # time.monotonic() when ctr printed it
    topic: str
    body: dict[str, Any]


class Events:
    """``ctr events`` in the background: what containerd publishes, when."""

    LINE = re.compile(r" (/[a-z/-]+) (\{.*\})$")

    def __init__(self, cd: Containerd) -> None:
        self.events: list[Event] = []
        self.proc = subprocess.Popen(
            [cd.ctr_binary, "-a", cd.socket, "events"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()
        time.sleep(0.3)  # subscribed before anything is done to be seen

    def _read(self, out: IO[bytes]) -> None:
        for raw in out:
            match = self.LINE.search(raw.decode(errors="replace").strip())
            if match:
                with contextlib.suppress(ValueError):
                    self.events.append(Event(time.monotonic(), match[1], json.loads(match[2])))

    def exit_of(self, name: str, timeout: float) -> Event | None:
        """The ``/tasks/exit`` of ``name``'s init (its id is the container's), when it comes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events:
                if e.topic == "/tasks/exit" and e.body.get("id") == name:
                    return e
            time.sleep(0.05)
        return None

    def topics(self, name: str) -> list[str]:
        return [e.topic for e in self.events if e.body.get("container_id") == name]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._reader.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.contextmanager
def events(cd: Containerd) -> Iterator[Events]:
    ev = Events(cd)
    try:
        yield ev
    finally:
        ev.close()


def leftovers(cd: Containerd, name: str, state: Path = STATE) -> list[str]:
    """What is left of pod ``name``: processes, state, sockets, mounts and cgroups."""
    left = [*vm_processes(f"/{name}/"), *vm_processes(f"kata-py-{name}")]
    left += [f"shim {p}" for p in shim_pids() if f"-id {name} " in f"{cmdline(p)} "]
    paths = [
        state / "sbs" / name,
        state / "vm" / name,
        state / "monitor" / f"{name}.sock",
        Path(socket_path(cd.socket, "default", name)),
        cd.bundle(name),
    ]
    left += [str(p) for p in paths if os.path.lexists(p)]
    left += [p for p in mounts_in_every_namespace("/") if f"/{name}/" in f"{p}/"]
    left += pod_cgroups(name)
    return left


def wait_gone(cd: Containerd, name: str, state: Path = STATE, timeout: float = 30) -> list[str]:
    """``leftovers`` once they are gone or ``timeout`` passed (the shim exits after delete)."""
    deadline = time.monotonic() + timeout
    while (left := leftovers(cd, name, state)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def assert_none_of_ours_left(
    cd: Containerd, sockets_before: set[str], cgroups_before: set[str]
) -> None:
    """``assert_nothing_left``, blind to what other jobs on this host make meanwhile.

    Another job may run runc pods through its own containerd (critest does): their
    shim sockets and ``/k8s.io`` cgroups are not ours. No kata-py shim, VM or state
    of anyone may be left; nor a socket of any pod made here.
    """
    ours = {os.path.basename(socket_path(cd.socket, "default", n)) for n in NAMES}
    foreign = {c for c in cgroup_dirs() if not c.split(":", 1)[1].startswith("/default/")}
    assert_nothing_left(sockets_before | (shim_sockets() - ours), cgroups_before | foreign)


def fill(directory: Path) -> int:
    """Fill the file system of ``directory`` with one file; the bytes written."""
    written = 0
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 20, 4096, 1):
            block = b"\0" * chunk
            with contextlib.suppress(OSError):  # ENOSPC: go on with smaller writes
                while True:
                    written += os.write(fd, block)
    finally:
        os.close(fd)
    return written
