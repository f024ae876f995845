"""Fakes for tests: a publisher that records, and containerd's end of event forwarding."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import trio
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from shimv2.errdefs import FailedPrecondition, Unavailable
from shimv2.pb.containerd.services.ttrpc.events.v1.events_pb2 import ForwardRequest
from shimv2.pb.containerd.types.event_pb2 import Envelope
from shimv2.shim.events import EVENTS_SERVICE
from shimv2.ttrpc import CallContext, Method, Service


class RecordingPublisher:
    """The ``Publisher`` interface; keeps every ``(topic, event)`` in ``events``, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Message]] = []
        self._closed = False
        self._stopped = trio.Event()

    def publish(self, topic: str, event: Message) -> None:
        if self._closed:
            raise FailedPrecondition(f"publisher closed: cannot publish {topic}")
        self.events.append((topic, event))

    def topics(self) -> list[str]:
        return [topic for topic, _ in self.events]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self._stopped.wait()

    async def aclose(self, timeout: float = 5.0) -> None:
        self._closed = True
        self._stopped.set()
        await trio.lowlevel.checkpoint()


@dataclass
class Forwarded:
    envelope: Envelope
    metadata: Mapping[str, tuple[str, ...]]


class ForwardRecorder:
    """containerd's side of ``Events/Forward``: records envelopes, can fail on demand.

    ``fail(n, match)`` makes the next ``n`` forwards whose envelope ``match``es
    answer UNAVAILABLE (n < 0: forever). ``attempts`` counts every call.
    """

    def __init__(self) -> None:
        self.received: list[Forwarded] = []
        self.attempts = 0
        self.changed = trio.Event()
        self._failures: list[tuple[int, Callable[[Envelope], bool]]] = []

    def fail(self, n: int, match: Callable[[Envelope], bool]) -> None:
        self._failures.append((n, match))

    def service(self) -> Service:
        return Service(EVENTS_SERVICE, {"Forward": Method(ForwardRequest, self._forward)})

    async def wait_for(self, count: int) -> None:
        while len(self.received) < count:
            await self.changed.wait()

    async def _forward(self, ctx: CallContext, req: ForwardRequest) -> Empty:
        self.attempts += 1
        for i, (left, match) in enumerate(self._failures):
            if left != 0 and match(req.envelope):
                self._failures[i] = (left - 1, match)
                raise Unavailable("failing on purpose")
        self.received.append(Forwarded(req.envelope, ctx.metadata))
        self.changed.set()
        self.changed = trio.Event()
        return Empty()
