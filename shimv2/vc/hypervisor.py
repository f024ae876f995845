"""The hypervisor seam: what the sandbox needs of a VM, and nothing more.

Like nerdbox's ``vm.Instance``: configure, ``start``, reach the agent,
``shutdown`` (safe after a failed start). One implementation per module
(``qemu.py``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio


@dataclass(frozen=True, slots=True)
class AgentEndpoint:
    """Where the guest agent listens: a unix socket (virtio-serial), vsock, or
    hybrid vsock (a unix socket that forwards to ``vsock_port`` once asked)."""

    unix_path: str | None = None
    vsock_cid: int | None = None
    vsock_port: int = 1024
    hybrid_path: str | None = None
    # Awaited before the first dial, when the transport must not be dialled
    # earlier (hybrid vsock: until the guest has started the device).
    ready: Callable[[], Awaitable[None]] | None = field(default=None, compare=False, repr=False)
    # Returns once the guest's console said the agent serves: a backing-off dialler
    # then dials at once (only once: the guest may print it early, or falsely).
    hint: Callable[[], Awaitable[object]] | None = field(default=None, compare=False, repr=False)


class Hypervisor(Protocol):
    @property
    def pid(self) -> int | None: ...

    async def start(self, nursery: trio.Nursery) -> None:
        """Launch the VM; ``nursery`` hosts the task that watches it die."""
        ...

    def agent_endpoint(self) -> AgentEndpoint: ...

    async def wait_exited(self) -> int:
        """Block until the VM process is gone; its exit status."""
        ...

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the VM and its helpers and remove their sockets; idempotent."""
        ...
