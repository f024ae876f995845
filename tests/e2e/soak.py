"""Soak cycles through a real containerd: pods come and go beside one that stays.

One cycle: ``pods`` pods start at once (``ctr run -d``), each streams an exec's
output, and all are stopped and deleted; the long-lived pod runs an exec too.
After every cycle what is left must be exactly the long-lived pod: one task, one
shim, its VM's processes, one state directory, its mounts, and shim sockets as
before the cycles. The long-lived shim's fds and RSS must stay flat.

Used by ``tests/e2e/test_soak.py`` (a few cycles) and ``bench/soak.py`` (many).
"""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.conftest import IMAGE, Containerd, shim_pids, shim_sockets
from tests.leaks import vm_processes
from tests.mountinfo import mounts_in_every_namespace

STATE = Path("/run/kata-py")
EXEC_LINES = 200  # lines each exec streams back


@dataclass
class Counts:
    """What one pod's worth of kata-py leaves on the host, counted."""

    tasks: int
    shims: int
    vm_processes: int
    state_dirs: int
    mounts: int
    sockets: int

    @classmethod
    def now(cls, cd: Containerd, state: Path = STATE) -> Counts:
        """``state``: kata-py's state directory; VM processes are counted by it (their
        command lines hold their run directories under it)."""
        tasks = [ln for ln in cd.ctr("task", "ls").stdout.splitlines()[1:] if ln.strip()]
        mounts = mounts_in_every_namespace(f"{state}/")
        sbs = state / "sbs"
        return cls(
            tasks=len(tasks),
            shims=len(shim_pids()),
            vm_processes=len(vm_processes(f"{state}/")),
            state_dirs=len(os.listdir(sbs)) if sbs.exists() else 0,
            mounts=len(mounts),
            sockets=len(shim_sockets()),
        )


@dataclass
class Sample:
    cycle: int
    seconds: float
    counts: Counts
    fds: int
    rss_mib: float


@dataclass
class Soak:
    cd: Containerd
    runtime: str
    pods: int = 2
    samples: list[Sample] = field(default_factory=list)
    long_lived: str = field(default_factory=lambda: f"soak{uuid.uuid4().hex[:6]}")
    state: Path = STATE  # the shims' state directory (their configuration's)

    def start(self) -> Counts:
        """Start the long-lived pod; what the host holds with it alone."""
        self.cd.ctr("run", "-d", "--runtime", self.runtime, IMAGE, self.long_lived, "sleep", "1d")
        return Counts.now(self.cd, self.state)

    def shim_pid(self) -> int:
        pids = [p for p in shim_pids() if self.long_lived in _cmdline(p)]
        assert len(pids) == 1, pids
        return pids[0]

    def cycle(self, n: int) -> Sample:
        t0 = time.monotonic()
        names = [f"s{n}x{i}{uuid.uuid4().hex[:4]}" for i in range(self.pods)]
        with ThreadPoolExecutor(max_workers=self.pods + 1) as pool:
            list(pool.map(self._one_pod, names))
        self._exec(self.long_lived, f"l{n}")
        pid = self.shim_pid()
        sample = Sample(
            n, time.monotonic() - t0, Counts.now(self.cd, self.state), _fds(pid), _rss_mib(pid)
        )
        self.samples.append(sample)
        return sample

    def _one_pod(self, name: str) -> None:
        cd = self.cd
        cd.ctr("run", "-d", "--runtime", self.runtime, IMAGE, name, "sleep", "1d")
        try:
            self._exec(name, "e1")
        finally:
            cd.ctr("task", "kill", "-s", "SIGKILL", name, check=False)
            for _ in range(150):
                if cd.ctr("task", "rm", name, check=False).returncode == 0:
                    break
                time.sleep(0.1)
            cd.ctr("containers", "rm", name)

    def _exec(self, name: str, exec_id: str) -> None:
        script = f"i=0; while [ $i -lt {EXEC_LINES} ]; do echo {exec_id}-$i; i=$((i+1)); done"
        out = self.cd.ctr("task", "exec", "--exec-id", exec_id, name, "sh", "-c", script)
        lines = out.stdout.splitlines()
        # Streams never cross: every line is this exec's, in order, none lost.
        assert lines == [f"{exec_id}-{i}" for i in range(EXEC_LINES)], out.stdout[-300:]

    def stop(self) -> None:
        self.cd.ctr("task", "kill", "-s", "SIGKILL", self.long_lived, check=False)
        for _ in range(150):
            if self.cd.ctr("task", "rm", self.long_lived, check=False).returncode == 0:
                break
            time.sleep(0.1)
        self.cd.ctr("containers", "rm", self.long_lived, check=False)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
