"""asyncio pieces the guest agent uses that asyncio lacks.

The agent runs on asyncio, not trio: under TCG, importing trio costs the guest
about 0.8 s more at every boot (``bench/agent_imports.py``). These are the few
trio idioms it relied on: fd readiness, a task that says when it is ready
(``nursery.start``), a timeout that moves on, and a wake-all broadcast.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any


class ClosedResourceError(Exception):
    """The object was closed by this side (trio's name for it)."""


class BrokenResourceError(Exception):
    """The peer or the kernel broke the connection (trio's name for it)."""


Handle = int | socket.socket


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def wait_readable(handle: Handle) -> None:
    """Wait until ``handle`` has data (or EOF). One waiter per handle at a time; its
    reader is removed before this returns, so the caller may then close it."""
    await FdWait().readable(handle)


async def wait_writable(handle: Handle) -> None:
    await FdWait().writable(handle)


async def checkpoint() -> None:
    """Let other tasks run."""
    await asyncio.sleep(0)


class TaskStatus:
    """How a task started with ``start`` says it is ready (trio's ``task_status``)."""

    __slots__ = ("_future",)

    def __init__(self, future: asyncio.Future[Any] | None = None) -> None:
        self._future = future

    def started(self, value: Any = None) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_result(value)


# A task run without ``start`` reports to nobody.
TASK_STATUS_IGNORED = TaskStatus()


async def start(
    group: asyncio.TaskGroup, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any
) -> Any:
    """Run ``fn(*args, task_status=...)`` in ``group``; return once it called ``started``.

    Like trio's ``nursery.start``: the value given to ``started`` is returned, and an
    error before that is raised here.
    """
    _task, value = await start_task(group, fn, *args)
    return value


async def start_task(
    group: asyncio.TaskGroup, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any
) -> tuple[asyncio.Task[Any], Any]:
    """``start``, also returning the task, for a caller that cancels it later."""
    ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    task = group.create_task(fn(*args, task_status=TaskStatus(ready)))
    await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done():
        return task, ready.result()
    task.result()  # its error, if it failed
    raise RuntimeError(f"{getattr(fn, '__name__', fn)} returned before it started")


@contextlib.asynccontextmanager
async def move_on_after(seconds: float | None) -> AsyncIterator[asyncio.Timeout]:
    """Cancel the body after ``seconds`` and carry on; ``.expired()`` says if it was.

    ``None`` never expires. Only our own deadline is swallowed: a ``TimeoutError``
    the body raises itself propagates.
    """
    scope = asyncio.timeout(seconds)
    try:
        async with scope:
            yield scope
    except TimeoutError:
        if not scope.expired():
            raise


class Broadcast:
    """Wakes every waiter at each ``notify_all`` (trio's ``ParkingLot.unpark_all``)."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = asyncio.Event()

    async def wait(self) -> None:
        await self._event.wait()

    def notify_all(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


class FdWait:
    """One task's waits on a handle that another task may close (trio's ``notify_closing``).

    asyncio has no such call: closing an fd that a waiter left registered leaves it
    waiting forever, and its later ``remove_reader`` may hit another fd given the same
    number. ``closing`` unregisters the handle at once and wakes the waiter, which
    raises ``ClosedResourceError``; the caller may then close the handle.
    """

    __slots__ = ("_future", "_remove")

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None
        self._remove: Callable[[], object] | None = None

    async def readable(self, handle: Handle) -> None:
        loop = asyncio.get_running_loop()
        await self._wait(handle, loop.add_reader, loop.remove_reader)

    async def writable(self, handle: Handle) -> None:
        loop = asyncio.get_running_loop()
        await self._wait(handle, loop.add_writer, loop.remove_writer)

    async def _wait(
        self,
        handle: Handle,
        add: Callable[..., object],
        remove: Callable[[Handle], object],
    ) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        add(handle, _wake, future)
        self._future, self._remove = future, lambda: remove(handle)
        try:
            await future
        finally:
            closed = self._future is not future
            if not closed:
                self._future = self._remove = None
                remove(handle)
        if closed:  # even if it was ready first: the handle is no longer there to use
            raise ClosedResourceError("closed while waiting")

    def closing(self) -> None:
        """The handle is about to be closed: end the current wait, if any, now."""
        future, remove = self._future, self._remove
        self._future = self._remove = None
        if future is not None and remove is not None:
            remove()
            _wake(future)
