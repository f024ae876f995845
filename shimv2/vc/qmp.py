"""QMP from trio: qemu.qmp is asyncio-only, so it runs on an asyncio loop in a thread.

This module is the one bridge between the two event loops. Each command is
submitted to the loop thread; its completion wakes the trio task through the
trio token, so no worker thread is held per call.

QMP events are counted and dropped: qemu.qmp's default listener would keep
every one (a queue and a history, both unbounded), and a guest can make QEMU
send them for as long as it runs (VSERPORT_CHANGE, by opening and closing a
virtio-serial port). Nothing here waits for events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

import trio
from qemu.qmp import ExecuteError, QMPClient

from shimv2.errdefs import FailedPrecondition, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


class Qmp:
    """A QMP connection on its own asyncio loop thread."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"qmp-{name}", daemon=True
        )
        self._thread.start()
        self._client: QMPClient | None = None
        self.events_seen = 0  # written on the loop thread only

    async def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def wake(_: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future.add_done_callback(wake)
        try:
            await done.wait()
        except trio.Cancelled:
            future.cancel()
            raise
        return future.result()

    async def connect(self, path: str) -> None:
        async def connect() -> QMPClient:
            client = QMPClient(self._name)
            # Before connecting: no event can be kept, not even one from the greeting.
            client.events.event_filter = self._drop_event
            await client.connect(path)
            return client

        self._client = await self._run(connect())

    def _drop_event(self, event: Mapping[str, object]) -> bool:
        self.events_seen += 1
        return False  # the listener keeps nothing

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        if self._client is None:
            raise Unavailable(f"qmp {self._name}: not connected")
        try:
            return await self._run(self._client.execute(command, arguments))
        except (ConnectionError, EOFError) as exc:
            raise Unavailable(f"qmp {self._name}: {command}: {exc}") from exc
        except ExecuteError as exc:
            raise FailedPrecondition(f"qmp {self._name}: {command}: {exc}") from exc

    async def getfd(self, name: str, fd: int) -> None:
        """Hand ``fd`` to QEMU under ``name`` (SCM_RIGHTS on the QMP socket, then getfd)."""
        client = self._client
        if client is None:
            raise Unavailable(f"qmp {self._name}: not connected")

        async def send() -> None:
            client.send_fd_scm(fd)  # must run on the loop that owns the socket
            await client.execute("getfd", {"fdname": name})

        await self._run(send())

    async def aclose(self) -> None:
        """Disconnect and stop the loop thread; safe to call twice."""
        client, self._client = self._client, None
        if client is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                try:
                    await self._run(client.disconnect())
                except Exception as exc:
                    log.debug("qmp %s: disconnect: %s", self._name, exc)
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            await trio.to_thread.run_sync(self._thread.join)
        if not self._loop.is_closed():
            self._loop.close()
