"""What host and guest agree on besides the agent API: port names, the console's markers.

Imported by both sides (the host's QEMU command line and ``kata-py exec``, the
guest's agent), so it stays free of either's imports.
"""

from __future__ import annotations

AGENT_PORT_NAME = "agent.channel.0"  # the agent's virtio-serial port
# The agent's line on the guest console once it serves: the host dials at once on
# seeing it (a hint only: the guest may print anything).
AGENT_READY_LINE = "KATA_PY_AGENT_READY"
DEBUG_CONSOLE_PORT = "debug.console.0"  # the debug console's (``kata-py exec``)
# "\e]kata-py;shell-exited=<status>\a", an OSC sequence a terminal ignores: the
# guest's shell ended with that status, and ``kata-py exec`` ends with it.
SHELL_EXITED_PREFIX = b"\x1b]kata-py;shell-exited="
SHELL_EXITED_END = b"\x07"


def shell_exited(status: int) -> bytes:
    return SHELL_EXITED_PREFIX + str(status).encode() + SHELL_EXITED_END


# Port-forward (``kubectl port-forward``): the host dials this vsock port, sends
# the pod port as decimal digits and "\n", and the guest's agent dials
# 127.0.0.1:<port> in the VM, answering b"OK\n" (then the bytes flow both ways)
# or b"ERR <reason>\n" and closing.
FORWARD_VSOCK_PORT = 1025
FORWARD_REQUEST_MAX = 8  # "65535\n" and a little
FORWARD_REPLY_MAX = 128
FORWARD_OK = b"OK\n"


def parse_forward_port(line: bytes) -> int | None:
    """The port of a forward request line (without its newline), or None if it is not one."""
    if not line or len(line) > 5 or not line.isdigit():
        return None
    port = int(line)
    return port if 0 < port < 65536 else None
