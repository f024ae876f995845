"""The daemon's serve loop in-process, with a stand-in task service; logging; reaping."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from google.protobuf.empty_pb2 import Empty

from shimv2.errdefs import Unavailable
from shimv2.pb.containerd.events.task_pb2 import TaskDelete
from shimv2.pb.containerd.runtime.task.v2.shim_pb2 import ShutdownRequest
from shimv2.shim import clean_exit
from shimv2.shim import logging as shim_logging
from shimv2.shim.daemon import Daemon, TaskServiceLike, reap_orphans
from shimv2.shim.events import Publisher
from shimv2.shim.flags import Flags
from shimv2.shim.shutdown import Shutdown
from shimv2.shim.testing import ForwardRecorder
from shimv2.ttrpc import CallContext, Method, Server, Service, open_unix_client, open_unix_listener
from shimv2.vc.api import VirtContainers

TASK = "containerd.task.v2.Task"


class FakeTaskService:
    """What the daemon needs of a task service: services() and run()."""

    def __init__(self, publisher: Publisher, shutdown: Shutdown, calls: list[str]) -> None:
        self._publisher = publisher
        self._shutdown = shutdown
        self._calls = calls

    def services(self) -> list[Service]:
        return [Service(TASK, {"Shutdown": Method(ShutdownRequest, self.shutdown)})]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        for name in ("first", "second"):
            self._shutdown.register(self._callback(name))
        task_status.started()
        await trio.sleep_forever()

    def _callback(self, name: str) -> Callable[[], Awaitable[None]]:
        async def callback() -> None:
            self._calls.append(name)

        return callback

    async def shutdown(self, ctx: CallContext, req: ShutdownRequest) -> Empty:
        self._publisher.publish("/tasks/delete", TaskDelete(container_id=req.id))
        self._shutdown.request()
        return Empty()


def listening_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


async def test_serve_until_shutdown(tmp_path: Path, nursery: trio.Nursery) -> None:
    recorder = ForwardRecorder()
    events_path = str(tmp_path / "cd.ttrpc")
    listener = await open_unix_listener(events_path)
    await nursery.start(Server([recorder.service()]).serve, listener)

    calls: list[str] = []

    def factory(
        vc: VirtContainers, publisher: Publisher, shutdown: Shutdown, ns: str, shim_id: str
    ) -> TaskServiceLike:
        assert (ns, shim_id) == ("k8s.io", "pod1")
        return FakeTaskService(publisher, shutdown, calls)

    shim_path = tmp_path / "shim.sock"
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    flags = Flags(id="pod1", namespace="k8s.io", ttrpc_address=events_path, bundle=str(bundle))
    daemon = Daemon(flags, listening_socket(shim_path), factory)
    done = trio.Event()

    async def serve() -> None:
        await daemon.serve()
        done.set()

    nursery.start_soon(serve)
    with trio.fail_after(10):
        async with open_unix_client(str(shim_path)) as client:
            # containerd tolerates "ttrpc: closed" here too.
            with contextlib.suppress(Unavailable):
                await client.call(TASK, "Shutdown", ShutdownRequest(id="pod1"), Empty)
        await done.wait()
    assert calls == ["second", "first"]
    assert not shim_path.exists()
    assert (bundle / clean_exit.MARKER).is_file()  # no sandbox left: ``delete`` answers at once
    [forwarded] = recorder.received
    assert forwarded.envelope.topic == "/tasks/delete"
    assert forwarded.envelope.namespace == "k8s.io"
    await listener.aclose()


async def test_shutdown_callbacks_are_bounded_and_errors_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    shutdown = Shutdown(callback_timeout=0.05)
    ran: list[str] = []

    async def hangs() -> None:
        await trio.sleep_forever()

    async def fails() -> None:
        ran.append("fails")
        raise RuntimeError("boom")

    async def works() -> None:
        ran.append("works")

    for cb in (works, hangs, fails):
        shutdown.register(cb)
    assert not shutdown.requested()
    shutdown.request()
    shutdown.request()
    assert shutdown.requested()
    with trio.fail_after(2):
        await shutdown.wait()
        await shutdown.run_callbacks()
    assert ran == ["fails", "works"]
    assert "boom" in caplog.text
    assert "abandoned" in caplog.text


def test_logfmt_lines() -> None:
    formatter = shim_logging.LogfmtFormatter({"id": "c1"})
    record = logging.LogRecord("shimv2.x", logging.WARNING, __file__, 1, 'say "%s"', ("hi",), None)
    line = formatter.format(record)
    assert re.fullmatch(
        r'time="\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}(Z|[+-]\d\d:\d\d)" level=warning '
        r'msg="say \\"hi\\"" id=c1 logger=shimv2.x',
        line,
    ), line


def test_log_fifo_without_reader_is_none(tmp_path: Path) -> None:
    assert shim_logging.open_log_fifo(str(tmp_path / "missing")) is None
    os.mkfifo(tmp_path / "log")
    assert shim_logging.open_log_fifo(str(tmp_path / "log")) is None
    reader = os.open(tmp_path / "log", os.O_RDONLY | os.O_NONBLOCK)
    try:
        fd = shim_logging.open_log_fifo(str(tmp_path / "log"))
        assert fd is not None
        assert os.get_blocking(fd)  # blocking writes, in order
        handler = shim_logging.FdHandler(fd)
        handler.setFormatter(shim_logging.LogfmtFormatter())
        handler.emit(logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None))
        assert b"level=info msg=hello" in os.read(reader, 4096)
        os.close(reader)
        reader = -1
        # Nobody reads any more: the line is dropped, nothing raised.
        handler.emit(logging.LogRecord("x", logging.INFO, __file__, 1, "lost", None, None))
        os.close(fd)
    finally:
        if reader >= 0:
            os.close(reader)


def spawn_unwaited() -> int:
    return os.posix_spawn("/bin/true", ["true"], os.environ)


def still_ours(pid: int) -> bool:
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


async def test_orphans_that_stay_zombies_are_reaped() -> None:
    pid = spawn_unwaited()  # nobody waits for it, as for an orphan
    assert still_ours(pid)
    with trio.move_on_after(0.5):
        await reap_orphans(interval=0.05)
    assert not still_ours(pid)
