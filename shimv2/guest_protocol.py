"""What host and guest agree on besides the agent API: port names, the console's exit marker.

Imported by both sides (the host's QEMU command line and ``kata-py exec``, the
guest's agent), so it stays free of either's imports.
"""

from __future__ import annotations

AGENT_PORT_NAME = "agent.channel.0"  # the agent's virtio-serial port
DEBUG_CONSOLE_PORT = "debug.console.0"  # the debug console's (``kata-py exec``)
# "\e]kata-py;shell-exited=<status>\a", an OSC sequence a terminal ignores: the
# guest's shell ended with that status, and ``kata-py exec`` ends with it.
SHELL_EXITED_PREFIX = b"\x1b]kata-py;shell-exited="
SHELL_EXITED_END = b"\x07"


def shell_exited(status: int) -> bytes:
    return SHELL_EXITED_PREFIX + str(status).encode() + SHELL_EXITED_END
