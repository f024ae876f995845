"""The tests' own view of every mount namespace (``tests.mountinfo``), which the leak checks use."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tests.mountinfo import mounts_in_every_namespace


def test_a_mount_seen_only_by_a_chrooted_process_is_found(tmp_path: Path) -> None:
    # As a cached VM's virtiofsd: alone in its namespace and chrooted into the share,
    # its mountinfo names mount points from its root ("/sub"), not from ours.
    root = tmp_path / "share"
    (root / "sub").mkdir(parents=True)
    shutil.copy(shutil.which("busybox") or "/bin/busybox", root / "busybox")
    script = f"mount -t tmpfs kpy-test {root}/sub && exec chroot {root} /busybox sleep 60"
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
    try:
        deadline = time.monotonic() + 10
        while (found := mounts_in_every_namespace(str(root))) == [] and proc.poll() is None:
            assert time.monotonic() < deadline, "the chrooted process never showed its mount"
            time.sleep(0.05)
        assert found == [f"{root}/sub"]
    finally:
        proc.kill()
        proc.wait()
    assert mounts_in_every_namespace(str(root)) == []
