"""Shutdown of the shim daemon, as containerd's ``pkg/shutdown``: a request, then callbacks.

The task service calls ``request()`` once no container is left (after the
``Shutdown`` RPC) and registers callbacks for what must be undone; SIGTERM and
SIGINT request it too. The daemon waits on ``wait()``, stops accepting
connections, then runs the callbacks newest first, each bounded in time, so a
hung one cannot keep the shim alive.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)

CALLBACK_TIMEOUT = 10.0


class Shutdown:
    def __init__(self, *, callback_timeout: float = CALLBACK_TIMEOUT) -> None:
        self._event = trio.Event()
        self._callbacks: list[Callable[[], Awaitable[None]]] = []
        self._callback_timeout = callback_timeout

    def request(self) -> None:
        """Ask the daemon to exit; idempotent."""
        if not self._event.is_set():
            log.info("shutdown requested")
            self._event.set()

    def requested(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()

    def register(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` at shutdown: newest first, each bounded, errors logged."""
        self._callbacks.append(callback)

    async def run_callbacks(self) -> None:
        """Run (and forget) every registered callback; never raises but Cancelled."""
        while self._callbacks:
            callback = self._callbacks.pop()
            with trio.move_on_after(self._callback_timeout) as scope:
                try:
                    await callback()
                except Exception:
                    log.exception("shutdown callback %r failed", callback)
            if scope.cancelled_caught:
                log.error(
                    "shutdown callback %r took more than %.0fs: abandoned",
                    callback,
                    self._callback_timeout,
                )
