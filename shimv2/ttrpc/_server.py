"""A trio ttrpc server: a thin shell around the sans-IO codec.

The connection's loop and dispatch are ``_service``'s, shared with the guest's
asyncio shell; here are the listener and how calls run on trio. Handler errors
become a status in one place, ``_status.status_from_exception``.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

import trio
from google.protobuf.message import Message

from shimv2.ttrpc._codec import RequestReceived
from shimv2.ttrpc._service import (
    CallObserver,
    PeerCheck,
    PeerCredentials,
    ServerConnection,
    Service,
    Services,
    peer_credentials,
    same_user,
)
from shimv2.ttrpc._transport import transport_for

log = logging.getLogger(__name__)

_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


class _ServerConnection(ServerConnection):
    gone = (trio.BrokenResourceError, trio.ClosedResourceError)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.serve()
            # Go's ttrpc cancels the contexts of in-flight calls when a client goes away.
            nursery.cancel_scope.cancel()

    def spawn(
        self, call: Callable[[RequestReceived], Coroutine[Any, Any, None]], event: RequestReceived
    ) -> None:
        self._nursery.start_soon(call, event)

    def now(self) -> float:
        return trio.current_time()

    async def run_with_deadline(
        self, call: Awaitable[Message], deadline: float | None
    ) -> Message | None:
        if deadline is None:  # most calls; a cancel scope costs ~10% of a round trip
            return await call
        with trio.move_on_at(deadline):
            return await call
        return None


class Server(Services):
    connection = _ServerConnection

    def __init__(
        self,
        services: Iterable[Service] = (),
        *,
        peer_check: PeerCheck = same_user,
        observer: CallObserver | None = None,
    ):
        super().__init__(services, observer=observer)
        self._peer_check = peer_check

    async def serve(
        self,
        listener: trio.abc.Listener[trio.SocketStream],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections until cancelled or the listener closes; one task each."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                try:
                    stream = await listener.accept()
                except trio.ClosedResourceError:
                    return  # the listener was closed: stop accepting, finish the rest
                except OSError as exc:
                    if exc.errno not in _RESOURCE_ERRNOS:
                        raise
                    # Out of fds or memory: back off instead of dying (as trio's
                    # serve_listeners does); open connections keep being served.
                    log.error("ttrpc: accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(self._serve_accepted, stream)

    async def _serve_accepted(self, stream: trio.SocketStream) -> None:
        peer = peer_credentials(stream.socket)
        if not self._peer_check(peer):
            log.warning("ttrpc: refusing connection from %s", peer)
            await stream.aclose()
            return
        await self.serve_stream(stream, peer)

    async def serve_stream(
        self, stream: trio.abc.Stream, peer: PeerCredentials | None = None
    ) -> None:
        """Serve one connection until the peer closes it or breaks the protocol."""
        await self.serve_transport(transport_for(stream), peer)
