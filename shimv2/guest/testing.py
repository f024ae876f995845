"""Fakes for the guest's OS side effects, for unit tests on the host.

``FakeGuestOS`` keeps files, mounts, links and modules in memory and records
what was done, so tests can run CreateSandbox without renaming the host.
"""

from __future__ import annotations

import errno

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
        self.release = "6.1.0-fake"

    def _maybe_fail(self, what: str) -> None:
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


__all__ = ["FakeGuestOS", "fake_sysfs"]
