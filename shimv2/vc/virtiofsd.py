"""One virtiofsd per sandbox, sharing its shared directory under the tag kataShared."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from shimv2.errdefs import Unavailable
from shimv2.vc.procs import Child

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


async def start_virtiofsd(
    socket_path: Path, shared_dir: Path, log_path: Path, *, binary: str = VIRTIOFSD
) -> Child:
    """Start virtiofsd and wait for its socket (QEMU connects to it at launch).

    ``sandbox=chroot`` keeps virtiofsd in our mount namespace, so a rootfs
    mounted under the shared directory after the VM booted is visible in the
    guest (with ``sandbox=namespace`` it would need a shared mount).
    """
    argv = [
        binary, f"--socket-path={socket_path}", "-o", f"source={shared_dir}",
        "-o", "cache=auto", "-o", "sandbox=chroot", "-o", "xattr",
    ]  # fmt: skip
    with open(log_path, "ab") as log_file:
        child = await Child.spawn("virtiofsd", argv, stderr=log_file.fileno())
    with trio.move_on_after(5):
        while not os.path.exists(socket_path):
            if child.returncode is not None:
                break
            await trio.sleep(0.005)
        else:
            return child
    await child.stop()
    tail = Path(log_path).read_text(errors="replace")[-500:]
    raise Unavailable(f"virtiofsd did not start (rc {child.returncode}): {tail}")
