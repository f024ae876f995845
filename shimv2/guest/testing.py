"""Fakes for the guest's OS side effects, for unit tests on the host.

``FakeGuestOS`` keeps files, mounts, links and modules in memory and records
what was done, so tests can run CreateSandbox without renaming the host.
``FakeIpCommand`` answers ``ip`` from a list of links, so tests can run
UpdateInterface without a network namespace.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

from shimv2.guest.network import IpCommand
from shimv2.guest.system import GuestOS


class FakeGuestOS(GuestOS):
    def __init__(self, files: dict[str, str] | None = None) -> None:
        # No libc: nothing here touches the machine.
        self.files: dict[str, str] = dict(files or {})
        self.hostname: str | None = None
        self.mounts: dict[str, tuple[str, str, str]] = {}  # target -> (source, fstype, data)
        self.modules: list[tuple[str, str]] = []
        self.links_up: list[str] = []
        self.symlinks: dict[str, str] = {}
        self.dirs: set[str] = set()
        self.subreaper = False
        self.fail: dict[str, OSError] = {}  # method name -> error to raise
        self.calls: dict[str, int] = {}  # method name -> calls, for those that can fail
        self.release = "6.1.0-fake"
        self.entropy: list[bytes] = []
        self.random_reseeds = 0
        self.realtime: tuple[int, int] | None = None  # (sec, usec) last set

    def _maybe_fail(self, what: str) -> None:
        self.calls[what] = self.calls.get(what, 0) + 1
        if what in self.fail:
            raise self.fail[what]

    def set_hostname(self, name: str) -> None:
        self._maybe_fail("set_hostname")
        self.hostname = name

    def read_text(self, path: str) -> str:
        try:
            return self.files[path]
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, "no such file", path) from None

    def write_text(self, path: str, data: str) -> None:
        self._maybe_fail("write_text")
        self.files[path] = data

    def exists(self, path: str) -> bool:
        return path in self.files or path in self.dirs or self._is_dir(path)

    def _is_dir(self, path: str) -> bool:
        prefix = path.rstrip("/") + "/"
        return any(p.startswith(prefix) for p in (*self.files, *self.dirs))

    def listdir(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        names = {
            p[len(prefix) :].split("/")[0]
            for p in (*self.files, *self.dirs)
            if p.startswith(prefix)
        }
        if not names and path not in self.dirs:
            raise FileNotFoundError(errno.ENOENT, "no such directory", path)
        return sorted(names)

    def makedirs(self, path: str) -> None:
        self.dirs.add(path)

    def symlink(self, target: str, path: str) -> None:
        self.symlinks[path] = target

    def is_mountpoint(self, path: str) -> bool:
        return path in self.mounts

    def mount(self, source: str, target: str, fstype: str, flags: int, data: str) -> None:
        self._maybe_fail("mount")
        if target in self.mounts:
            raise OSError(errno.EBUSY, "already mounted", target)
        self.mounts[target] = (source, fstype, data)

    def umount(self, target: str) -> None:
        self._maybe_fail("umount")
        if self.mounts.pop(target, None) is None:
            raise OSError(errno.EINVAL, "not mounted", target)

    def load_module(self, path: str, params: str = "") -> bool:
        self._maybe_fail("load_module")
        if any(p == path for p, _ in self.modules):
            return False
        self.modules.append((path, params))
        return True

    def set_link_up(self, name: str) -> None:
        self._maybe_fail("set_link_up")
        self.links_up.append(name)

    def set_child_subreaper(self) -> None:
        self._maybe_fail("set_child_subreaper")
        self.subreaper = True

    def kernel_release(self) -> str:
        return self.release

    def add_entropy(self, data: bytes) -> None:
        self._maybe_fail("add_entropy")
        self.entropy.append(data)

    def reseed_random(self) -> None:
        self.random_reseeds += 1

    def set_realtime(self, sec: int, usec: int) -> None:
        self._maybe_fail("set_realtime")
        self.realtime = (sec, usec)


def fake_sysfs(cpus: int = 2, offline_cpus: int = 1, memory_blocks: int = 2) -> dict[str, str]:
    """Files of a small /sys: cpus (cpu0 without an online file), memory blocks."""
    files: dict[str, str] = {}
    cpu = "/sys/devices/system/cpu"
    for i in range(cpus):
        if i:
            files[f"{cpu}/cpu{i}/online"] = "0\n" if i > cpus - 1 - offline_cpus else "1\n"
        else:
            files[f"{cpu}/cpu0/uevent"] = ""
    mem = "/sys/devices/system/memory"
    files[f"{mem}/block_size_bytes"] = "8000000\n"
    for i in range(memory_blocks):
        files[f"{mem}/memory{i}/online"] = "0\n" if i else "1\n"
    return files


class FakeIpCommand(IpCommand):
    """``ip`` on a made-up machine: ``ip -o link`` lists ``links`` (add or remove some
    meanwhile to hot-plug them), addresses and routes are empty, and every other
    command succeeds and is only recorded. Commands go through ``IpCommand``'s own
    runner seam, and an argument that no exec could pass (a NUL byte) fails as it would."""

    def __init__(self) -> None:
        super().__init__(runner=self._answer)
        self.links: list[str] = []  # ``ip -o link`` lines
        self.commands: list[tuple[str, ...]] = []  # all but the listings
        self.link_listings = 0

    def add_link(self, name: str, mac: str, *, up: bool = False) -> None:
        index = len(self.links) + 2  # 1 is lo's
        flags = "BROADCAST,MULTICAST,UP,LOWER_UP" if up else "BROADCAST,MULTICAST"
        self.links.append(
            f"{index}: {name}: <{flags}> mtu 1500 qdisc noop qlen 1000\\"
            f"    link/ether {mac} brd ff:ff:ff:ff:ff:ff"
        )

    async def _answer(self, argv: Sequence[str], timeout: float) -> tuple[int, bytes, bytes]:
        if any("\0" in arg for arg in argv):
            raise ValueError("embedded null byte")  # as posix_spawn and subprocess raise
        tool, *rest = argv
        args = tuple(rest)
        if tool == "arp":
            self.commands.append(("arp", *args))
            return 0, b"", b""
        if args == ("-o", "link"):
            self.link_listings += 1
            return 0, "".join(f"{line}\n" for line in self.links).encode(), b""
        if args == ("-o", "addr") or "show" in args:  # addresses, routes
            return 0, b"", b""
        self.commands.append(args)
        return 0, b"", b""


__all__ = ["FakeGuestOS", "FakeIpCommand", "fake_sysfs"]
