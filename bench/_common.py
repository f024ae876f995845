"""What the containerd benchmarks share: a private containerd with the busybox image,
the runtimes to compare, and reading processes from /proc.

The containerd itself is the end-to-end tests' (``tests.e2e.conftest.Containerd``):
own root, state and socket under ``/run/kpy-bench-*``, gone afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.e2e.conftest import IMAGE, Containerd  # noqa: E402

__all__ = [
    "IMAGE",
    "ROOT",
    "Containerd",
    "Proc",
    "cpu_seconds",
    "guest_pss_mib",
    "ksm_mib",
    "private_containerd",
    "processes",
    "pss_mib",
    "remove_task",
    "rss_mib",
    "runtimes",
]


def runtimes(containerd: str) -> dict[str, str]:
    """kata-py and the runc shim of the same release as ``containerd`` where one is beside it.

    Debian's runc shim (1.6) cannot read containerd 2.3+'s BootstrapParams;
    scripts/build-containerd puts each release's own shim next to its binary,
    and containerd accepts a shim's absolute path as the runtime name.
    """
    beside = Path(containerd).resolve().parent / "containerd-shim-runc-v2"
    runc = str(beside) if beside.exists() else "io.containerd.runc.v2"
    return {"kata-py": "io.containerd.kata-py.v2", "runc": runc}


@contextlib.contextmanager
def private_containerd(
    containerd: str, ctr: str, env: Mapping[str, str] | None = None
) -> Iterator[Containerd]:
    """A containerd of its own with the locally built busybox image imported."""
    os.environ["PATH"] = f"/usr/local/bin:{os.environ.get('PATH', '')}"
    base = Path(f"/run/kpy-bench-{uuid.uuid4().hex[:6]}")
    base.mkdir()
    cd = Containerd(containerd, ctr, base, env=dict(env or {}))
    try:
        cd.start()
        cd.import_image(IMAGE)
        yield cd
    finally:
        cd.stop()
        subprocess.run(["umount", "-R", str(base / "root")], check=False, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def remove_task(cd: Containerd, name: str) -> None:
    """Kill a detached container's task and delete it, whatever state it is in."""
    cd.ctr("task", "kill", "-s", "SIGKILL", name, check=False)
    for _ in range(150):
        if cd.ctr("task", "rm", name, check=False).returncode == 0:
            break
        time.sleep(0.2)
    cd.ctr("containers", "rm", name, check=False)


@dataclass(frozen=True, slots=True)
class Proc:
    pid: int
    ppid: int
    argv: tuple[str, ...]


def processes() -> dict[int, Proc]:
    """Every process now, with its parent and command line."""
    out: dict[int, Proc] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The name in stat may hold spaces and parentheses: fields follow the last ")".
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        words = tuple(a.decode(errors="replace") for a in argv if a)
        out[int(entry)] = Proc(int(entry), ppid, words)
    return out


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pss_mib(pid: int) -> float:
    """The process's proportional set size, from smaps_rollup."""
    return _kib(Path(f"/proc/{pid}/smaps_rollup").read_text(), "Pss:") / 1024


def ksm_mib(pid: int) -> float:
    """What the process maps of pages KSM merged (smaps_rollup's ``KSM``)."""
    return _kib(Path(f"/proc/{pid}/smaps_rollup").read_text(), "KSM:") / 1024


def guest_pss_mib(
    pid: int, boot_files: tuple[str, ...] = (), ram_dirs: tuple[str, ...] = ()
) -> dict[str, float]:
    """The Pss of a process's mappings of what the guest sees as memory, MiB.

    ``guest_ram``: memfd guest RAM (QEMU's ``memory-backend-memfd``; virtiofsd maps
    it too, to reach the guest's buffers). ``guest_image``: files mapped shared,
    such as a root image the guest maps with DAX (one copy in the page cache).
    ``guest_boot``: QEMU's mappings of ``boot_files`` (kernel, initrd), kept for reset.
    Files under ``ram_dirs`` are guest RAM too (a template clone's own copy).
    """
    total = {"guest_ram": 0, "guest_image": 0, "guest_boot": 0}
    kind: str | None = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(None, 5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            path = head[5].removesuffix(" (deleted)") if len(head) == 6 else ""
            if path.startswith("/memfd:") or any(path.startswith(d + "/") for d in ram_dirs):
                kind = "guest_ram"
            elif path and path in boot_files:
                kind = "guest_boot"
            elif head[1].endswith("s") and path.startswith("/"):
                kind = "guest_image"
            else:
                kind = None
        elif kind is not None and line.startswith("Pss:"):
            total[kind] += int(line.split()[1])
    return {k: v / 1024 for k, v in total.items()}


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of the process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _kib(text: str, key: str) -> int:
    return sum(int(line.split()[1]) for line in text.splitlines() if line.startswith(key))
