"""The event publisher: task events forwarded to containerd over ttrpc, in order.

``publish`` only enqueues (one bounded queue per shim); ``run`` is the one
sender. Each event is ``containerd.services.events.ttrpc.v1.Events/Forward``ed
to ``TTRPC_ADDRESS`` with a 5 s deadline, the namespace in the
``containerd-namespace-ttrpc`` metadata (cd pkg/shim/publisher.go).

Unlike containerd's publisher, which requeues a failed event at the back of the
queue, a failed event is retried in place, so a retry never reorders events
(``TaskExit`` before ``TaskStart`` confuses containerd). Up to ``max_retries``
retries (5, as containerd), a short exponential backoff between them, and a new
connection whenever the old one broke; then the event is dropped and logged.

When the queue is full an event is dropped: the first drop of a burst is
logged at once, the rest are counted and reported in one line when the queue
takes events again (or at close). Events the guest can raise at will (OOM
kills) may only fill part of the queue, so a flood of them leaves room for
the lifecycle events (``TaskExit``) containerd cannot do without.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import trio
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from shimv2.errdefs import Error, FailedPrecondition
from shimv2.pb.containerd.services.ttrpc.events.v1.events_pb2 import ForwardRequest
from shimv2.pb.containerd.types.event_pb2 import Envelope
from shimv2.ttrpc import Client, SocketTransport, open_unix_stream

log = logging.getLogger(__name__)

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
NAMESPACE_KEY = "containerd-namespace-ttrpc"
QUEUE_SIZE = 2048
FORWARD_TIMEOUT = 5.0
MAX_RETRIES = 5
BACKOFF = 0.05
MAX_BACKOFF = 1.0
# Topics the guest can trigger at will, and the share of the queue they may use.
BEST_EFFORT_TOPICS = frozenset({"/tasks/oom"})
BEST_EFFORT_SHARE = 0.5


@dataclass(frozen=True, slots=True)
class _Item:
    topic: str
    request: ForwardRequest


def envelope(namespace: str, topic: str, event: Message) -> Envelope:
    """An Envelope whose ``event.type_url`` is the bare full proto name, as containerd's."""
    env = Envelope(namespace=namespace, topic=topic)
    env.timestamp.FromNanoseconds(time.time_ns())
    env.event.type_url = event.DESCRIPTOR.full_name
    env.event.value = event.SerializeToString()
    return env


class Publisher:
    def __init__(
        self,
        ttrpc_address: str,
        namespace: str,
        *,
        queue_size: int = QUEUE_SIZE,
        timeout: float = FORWARD_TIMEOUT,
        max_retries: int = MAX_RETRIES,
        backoff: float = BACKOFF,
    ) -> None:
        self._path = ttrpc_address.removeprefix("unix://")
        self._namespace = namespace
        self._timeout = timeout
        self._max_retries = max_retries
        self._backoff = backoff
        self._send, self._receive = trio.open_memory_channel[_Item](queue_size)
        self._best_effort_room = max(1, int(queue_size * BEST_EFFORT_SHARE))
        self._unreported = 0  # drops since the queue last took an event
        self._closed = False
        self._client: Client | None = None
        self._done = trio.Event()
        self._cancel: trio.CancelScope | None = None
        self.dropped = 0

    def publish(self, topic: str, event: Message) -> None:
        """Enqueue ``event``; never blocks. A full queue drops it (counted, logged).

        Errors: ``FailedPrecondition`` once ``aclose`` was called.
        """
        if self._closed:
            raise FailedPrecondition(f"publisher closed: cannot publish {topic}")
        used = self._send.statistics().current_buffer_used
        if topic in BEST_EFFORT_TOPICS and used >= self._best_effort_room:
            self._drop(topic, event)
            return
        item = _Item(topic, ForwardRequest(envelope=envelope(self._namespace, topic, event)))
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            self._drop(topic, event)
            return
        self._report_drops()

    def _drop(self, topic: str, event: Message) -> None:
        self.dropped += 1
        if not self._unreported:
            log.error(
                "event queue full: dropping %s %s (further drops are counted)",
                topic, event.DESCRIPTOR.full_name,
            )  # fmt: skip
        self._unreported += 1

    def _report_drops(self) -> None:
        if self._unreported > 1:
            log.error("event queue was full: dropped %d event(s)", self._unreported)
        self._unreported = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send queued events in order until ``aclose`` (or cancellation)."""
        try:
            async with trio.open_nursery() as nursery:
                self._cancel = nursery.cancel_scope
                task_status.started()
                async with self._receive:
                    async for item in self._receive:
                        await self._deliver(nursery, item)
                nursery.cancel_scope.cancel()
        finally:
            if self._client is not None:
                with trio.CancelScope(shield=True):
                    await self._client.aclose()
                self._client = None
            self._done.set()

    async def aclose(self, timeout: float = 5.0) -> None:
        """Refuse new events, send what is queued within ``timeout``, then stop."""
        self._closed = True
        self._report_drops()
        await self._send.aclose()
        if self._cancel is None:
            return  # never ran
        with trio.move_on_after(timeout):
            await self._done.wait()
        if not self._done.is_set():
            left = self._receive.statistics().current_buffer_used
            log.error("event publisher: %d event(s) not sent within %.1fs", left + 1, timeout)
            self._cancel.cancel()
            await self._done.wait()

    async def _deliver(self, nursery: trio.Nursery, item: _Item) -> None:
        last: BaseException | None = None
        for attempt in range(self._max_retries + 1):
            if attempt:
                await trio.sleep(min(self._backoff * 2 ** (attempt - 1), MAX_BACKOFF))
            try:
                with trio.fail_after(self._timeout):
                    client = await self._connected(nursery)
                    await client.call(
                        EVENTS_SERVICE,
                        "Forward",
                        item.request,
                        Empty,
                        timeout=self._timeout,
                        metadata=[(NAMESPACE_KEY, self._namespace)],
                    )
                return
            except (Error, OSError, trio.TooSlowError) as exc:
                last = exc
                log.debug("forward %s (attempt %d) failed: %r", item.topic, attempt + 1, exc)
        self.dropped += 1
        log.error(
            "dropping event %s after %d attempts: %r", item.topic, self._max_retries + 1, last
        )

    async def _connected(self, nursery: trio.Nursery) -> Client:
        if self._client is not None:
            if not self._client.closed:
                return self._client
            old, self._client = self._client, None
            await old.aclose()  # ends its receive loop
        stream = await open_unix_stream(self._path)
        client = Client(SocketTransport.from_stream(stream))
        nursery.start_soon(client.receive_loop)
        self._client = client
        return client
