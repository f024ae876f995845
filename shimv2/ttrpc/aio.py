"""The asyncio ttrpc shell, for the guest agent: a server and its transports.

The host's shell is on trio (``_server``, ``_transport``). Both share the codec,
the byte transports (``_nonblocking``) and the connection's loop and dispatch
(``_service``), so only the waiting differs.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any

from google.protobuf.message import Message

from shimv2.aio import BrokenResourceError, ClosedResourceError, FdWait, checkpoint, move_on_after
from shimv2.ttrpc import _nonblocking
from shimv2.ttrpc._codec import RequestReceived
from shimv2.ttrpc._nonblocking import Handle, Transport
from shimv2.ttrpc._service import (
    PeerCredentials,
    ServerConnection,
    Services,
)


class AsyncioWaits:
    """Waits for one transport; ``closing`` wakes its reader and writer, as trio's
    notify_closing does."""

    broken = BrokenResourceError
    closed = ClosedResourceError

    def __init__(self) -> None:
        # Two: a connection's receive loop reads while a response may be draining.
        self._reading = FdWait()
        self._writing = FdWait()

    async def readable(self, handle: Handle) -> None:
        await self._reading.readable(handle)

    async def writable(self, handle: Handle) -> None:
        await self._writing.writable(handle)

    async def checkpoint(self) -> None:
        await checkpoint()

    def closing(self, handle: Handle) -> None:
        self._reading.closing()
        self._writing.closing()

    def lock(self) -> AbstractAsyncContextManager[Any]:
        return asyncio.Lock()


class SocketTransport(_nonblocking.SocketTransport):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, AsyncioWaits())


class FdTransport(_nonblocking.FdTransport):
    def __init__(self, fd: int) -> None:
        super().__init__(fd, AsyncioWaits())


class _ServerConnection(ServerConnection):
    gone = (BrokenResourceError, ClosedResourceError)

    def __init__(
        self, server: Services, transport: Transport, peer: PeerCredentials | None
    ) -> None:
        super().__init__(server, transport, peer)
        self._calls: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        try:
            await self.serve()
        finally:
            # Go's ttrpc cancels the contexts of in-flight calls when a client goes away.
            calls = list(self._calls)
            for task in calls:
                task.cancel()
            if calls:
                await asyncio.wait(calls)

    def spawn(
        self, call: Callable[[RequestReceived], Coroutine[Any, Any, None]], event: RequestReceived
    ) -> None:
        task = asyncio.get_running_loop().create_task(call(event))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def run_with_deadline(
        self, call: Awaitable[Message], deadline: float | None
    ) -> Message | None:
        if deadline is None:
            return await call
        async with move_on_after(deadline - self.now()):  # the handler's own timeout propagates
            return await call
        return None


class Server(Services):
    connection = _ServerConnection
