"""The publisher against a real ttrpc server of ours on a unix socket."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from shimv2.errdefs import FailedPrecondition
from shimv2.pb.containerd.events.task_pb2 import TaskExit, TaskOOM, TaskStart
from shimv2.shim.events import NAMESPACE_KEY, Publisher
from shimv2.shim.testing import ForwardRecorder, RecordingPublisher
from shimv2.ttrpc import Server, open_unix_listener


@dataclass
class Containerd:
    """A fake containerd serving Events/Forward; ``stop``/``start`` restart it."""

    path: str
    recorder: ForwardRecorder
    nursery: trio.Nursery
    scope: trio.CancelScope | None = None

    async def start(self) -> None:
        listener = await open_unix_listener(self.path)
        await self.nursery.start(self._serve, listener)

    async def _serve(
        self, listener: trio.SocketListener, task_status: trio.TaskStatus[None]
    ) -> None:
        with trio.CancelScope() as self.scope:
            try:
                await Server([self.recorder.service()]).serve(listener, task_status=task_status)
            finally:
                await listener.aclose()

    def stop(self) -> None:
        assert self.scope is not None
        self.scope.cancel()


@pytest.fixture
async def containerd(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Containerd]:
    cd = Containerd(str(tmp_path / "containerd.sock.ttrpc"), ForwardRecorder(), nursery)
    await cd.start()
    yield cd
    cd.stop()


def exit_pid(env: object) -> int:
    from shimv2.pb.containerd.types.event_pb2 import Envelope

    assert isinstance(env, Envelope)
    return TaskExit.FromString(env.event.value).pid


async def test_order_type_url_and_namespace(containerd: Containerd, nursery: trio.Nursery) -> None:
    publisher = Publisher(containerd.path, "k8s.io")
    await nursery.start(publisher.run)
    publisher.publish("/tasks/start", TaskStart(container_id="c1", pid=1))
    for pid in range(2, 201):
        publisher.publish("/tasks/exit", TaskExit(container_id="c1", id="c1", pid=pid))
    await publisher.aclose()
    got = containerd.recorder.received
    assert len(got) == 200
    first = got[0].envelope
    assert (first.topic, first.namespace, first.event.type_url) == (
        "/tasks/start",
        "k8s.io",
        "containerd.events.TaskStart",
    )
    assert first.timestamp.seconds > 0
    assert [exit_pid(f.envelope) for f in got[1:]] == list(range(2, 201))
    assert {f.envelope.event.type_url for f in got[1:]} == {"containerd.events.TaskExit"}
    assert all(f.metadata[NAMESPACE_KEY] == ("k8s.io",) for f in got)
    with pytest.raises(FailedPrecondition):
        publisher.publish("/tasks/exit", TaskExit())


async def test_retries_in_place(containerd: Containerd, nursery: trio.Nursery) -> None:
    containerd.recorder.fail(2, lambda env: exit_pid(env) == 3)
    publisher = Publisher(containerd.path, "default", backoff=0.001)
    await nursery.start(publisher.run)
    for pid in range(1, 6):
        publisher.publish("/tasks/exit", TaskExit(pid=pid))
    await publisher.aclose()
    assert [exit_pid(f.envelope) for f in containerd.recorder.received] == [1, 2, 3, 4, 5]
    assert containerd.recorder.attempts == 7
    assert publisher.dropped == 0


async def test_gives_up_after_five_retries(containerd: Containerd, nursery: trio.Nursery) -> None:
    containerd.recorder.fail(-1, lambda env: exit_pid(env) == 1)
    publisher = Publisher(containerd.path, "default", backoff=0.001)
    await nursery.start(publisher.run)
    publisher.publish("/tasks/exit", TaskExit(pid=1))
    publisher.publish("/tasks/exit", TaskExit(pid=2))
    await publisher.aclose()
    assert [exit_pid(f.envelope) for f in containerd.recorder.received] == [2]
    assert containerd.recorder.attempts == 1 + 5 + 1
    assert publisher.dropped == 1


async def test_reconnects_after_containerd_restarts(
    containerd: Containerd, nursery: trio.Nursery
) -> None:
    publisher = Publisher(containerd.path, "default", backoff=0.01)
    await nursery.start(publisher.run)
    publisher.publish("/tasks/exit", TaskExit(pid=1))
    await containerd.recorder.wait_for(1)
    containerd.stop()
    await trio.sleep(0.05)
    publisher.publish("/tasks/exit", TaskExit(pid=2))  # fails: nobody listens
    await trio.sleep(0.02)
    await containerd.start()
    publisher.publish("/tasks/exit", TaskExit(pid=3))
    await publisher.aclose()
    assert [exit_pid(f.envelope) for f in containerd.recorder.received] == [1, 2, 3]
    assert publisher.dropped == 0


async def test_aclose_drains_then_is_bounded(containerd: Containerd, nursery: trio.Nursery) -> None:
    publisher = Publisher(containerd.path, "default")
    await nursery.start(publisher.run)
    for pid in range(50):
        publisher.publish("/tasks/exit", TaskExit(pid=pid))
    await publisher.aclose()
    assert len(containerd.recorder.received) == 50

    # A containerd that never answers: aclose still returns within its bound.
    containerd.recorder.fail(-1, lambda env: True)
    stuck = Publisher(containerd.path, "default", backoff=10)
    await nursery.start(stuck.run)
    stuck.publish("/tasks/exit", TaskExit(pid=1))
    stuck.publish("/tasks/exit", TaskExit(pid=2))
    with trio.fail_after(3):
        await stuck.aclose(timeout=0.3)


async def test_full_queue_drops_without_raising(tmp_path: Path) -> None:
    publisher = Publisher(str(tmp_path / "none.sock"), "default", queue_size=2)
    for pid in range(5):
        publisher.publish("/tasks/exit", TaskExit(pid=pid))
    assert publisher.dropped == 3
    await publisher.aclose()  # never ran: returns at once


async def test_a_full_queue_logs_once_per_burst(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = Publisher(str(tmp_path / "none.sock"), "default", queue_size=4)
    for pid in range(1000):
        publisher.publish("/tasks/exit", TaskExit(pid=pid))
    assert publisher.dropped == 996
    await publisher.aclose()
    lines = [r.getMessage() for r in caplog.records if "drop" in r.getMessage()]
    # One line when dropping starts, one with the count: not a line per event.
    assert 1 <= len(lines) <= 2, lines[:5]
    assert "995" in lines[-1] or "996" in lines[-1]


async def test_a_flood_of_oom_events_leaves_room_for_exits(
    containerd: Containerd, nursery: trio.Nursery
) -> None:
    # The guest decides when OOM events happen: a flood must not crowd out TaskExit.
    publisher = Publisher(containerd.path, "default", queue_size=8)
    for _ in range(100):
        publisher.publish("/tasks/oom", TaskOOM(container_id="c1"))
    publisher.publish("/tasks/exit", TaskExit(pid=7))
    await nursery.start(publisher.run)
    await publisher.aclose()
    topics = [f.envelope.topic for f in containerd.recorder.received]
    assert topics[-1] == "/tasks/exit"
    assert 1 <= topics.count("/tasks/oom") <= 4


async def test_recording_publisher(nursery: trio.Nursery) -> None:
    publisher = RecordingPublisher()
    await nursery.start(publisher.run)
    publisher.publish("/tasks/start", TaskStart(pid=1))
    assert publisher.topics() == ["/tasks/start"]
    await publisher.aclose()
    with pytest.raises(FailedPrecondition):
        publisher.publish("/tasks/exit", TaskExit())
