"""The agent channel's transport, and hybrid vsock's userspace backend.

Three transports, the first a host supports being ``auto``'s choice:

- ``vsock``: the kernel's vhost-vsock (``/dev/vhost-vsock``); the host dials
  AF_VSOCK (guest CID, port 1024), as Kata does.
- ``hybrid-vsock``: the same guest device served by ``vhost-device-vsock``
  (rust-vmm) through vhost-user, one per VM, for hosts without
  ``/dev/vhost-vsock`` (nested guests, this CI). The host dials a unix socket
  and asks for the guest port with Firecracker's ``CONNECT <port>\\n``, answered
  ``OK <n>\\n`` (``shimv2.vc.agent``).
- ``serial``: a virtio-serial port on a unix socket.

The guest needs nothing of this: ``kata_py.channel=vsock`` makes its agent
listen on AF_VSOCK whatever serves the device.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from shimv2.errdefs import FailedPrecondition, Unavailable
from shimv2.vc.procs import Child
from shimv2.vc.qemu_config import VSOCK_BACKEND

# Each VM has its own backend, so every guest may have the same CID.
HYBRID_GUEST_CID = 3
LISTEN_TIMEOUT = 5.0  # seconds for a backend to listen (~10 ms measured)
# Polling QEMU for a started vsock device before the first hybrid dial (qemu.py),
# then a grace of at least GRACE, 10 QMP round trips, at most GRACE_MAX seconds.
VSOCK_START_POLL = 0.05
VSOCK_START_GRACE = 0.1
VSOCK_START_GRACE_MAX = 2.0
_UNIX_LISTENING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's flags


def vsock_start_grace(qmp_round_trip: float) -> float:
    """Seconds to let a vsock backend take in its device's start after QEMU said it
    started, given how long QEMU took to answer: the busier the host, the longer."""
    return min(VSOCK_START_GRACE_MAX, max(VSOCK_START_GRACE, 10 * qmp_round_trip))


def listening(path: Path) -> bool:
    """A unix socket bound at ``path`` accepts connections (not only bound: the gap
    between a backend's bind and listen would refuse QEMU's connect)."""
    wanted = str(path)
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return os.path.exists(path)
    for line in lines:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == wanted and int(fields[3], 16) & _UNIX_LISTENING:
            return True
    return False


async def start_backend(
    vhost_socket: Path,
    hybrid_socket: Path,
    log_path: Path,
    *,
    binary: str,
    cgroup: tuple[str, ...] = (),
) -> Child:
    """Start a VM's vhost-device-vsock; returns once it listens for QEMU.

    It serves ``vhost_socket`` to QEMU and ``hybrid_socket`` to the host.
    """
    if not binary or not os.access(binary, os.X_OK):
        raise FailedPrecondition(
            f"agent channel hybrid-vsock needs {VSOCK_BACKEND} (scripts/build-vsock-backend)"
        )
    spec = f"guest-cid={HYBRID_GUEST_CID},socket={vhost_socket},uds-path={hybrid_socket}"
    with open(log_path, "ab") as log_file:
        child = await Child.spawn(
            VSOCK_BACKEND, [binary, "--vm", spec], stderr=log_file.fileno(), cgroup=cgroup
        )
    try:
        with trio.move_on_after(LISTEN_TIMEOUT):
            while not listening(vhost_socket):
                if child.returncode is not None:
                    break
                await trio.sleep(0.005)
            else:
                return child
        raise Unavailable(f"{VSOCK_BACKEND} did not listen: {_tail(log_path)}")
    except BaseException:
        with trio.CancelScope(shield=True):
            await child.stop(grace=1.0)
        raise


def backend_argv_marker(vhost_socket: Path, hybrid_socket: Path) -> tuple[str, str]:
    """The exact ``--vm`` argument a VM's backend runs with: who it is, after a restart."""
    return (
        "--vm",
        f"guest-cid={HYBRID_GUEST_CID},socket={vhost_socket},uds-path={hybrid_socket}",
    )


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-600:].strip() or "(no output)"
    except OSError:
        return "(no log)"
