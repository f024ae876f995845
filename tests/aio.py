"""Running the guest agent's asyncio code from pytest, whose async tests are trio's.

- ``@asyncio_test`` turns ``async def test_...`` into a plain test that runs the
  coroutine in a fresh asyncio loop (pytest still sees its fixture arguments).
- ``run_autojump`` runs a coroutine on a loop whose clock jumps over every wait
  (trio's ``MockClock(autojump_threshold=0)``).
- ``asyncio_in_thread`` runs a coroutine on its own loop in a thread, so that a
  trio test (the host's client, say) can talk to the agent's asyncio side.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import selectors
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait for it to end (trio: cancelling a scope, then leaving it)."""
    if task is None or task.done():
        return
    task.cancel()
    await asyncio.wait({task})  # never raises the task's error; our own cancel does


def asyncio_test(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, T]:
    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        return asyncio.run(fn(*args, **kwargs))

    return run


class _JumpingSelector(selectors.DefaultSelector):
    """Never sleeps: a wait with nothing ready moves the loop's clock instead."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready: list[tuple[selectors.SelectorKey, int]] = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:  # nothing scheduled: only I/O can wake the loop
            return list(super().select(None))
        self.offset += timeout
        return []


class _AutojumpLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._jumps = _JumpingSelector()
        super().__init__(self._jumps)

    def time(self) -> float:
        return super().time() + self._jumps.offset


def run_autojump(main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=_AutojumpLoop) as runner:
        return runner.run(main)


@contextmanager
def asyncio_in_thread(main: Callable[[], Awaitable[Any]]) -> Iterator[None]:
    """Run ``main()`` in a thread's own loop while the block runs; cancel it after."""
    started = threading.Event()
    loop_box: list[asyncio.AbstractEventLoop] = []
    task_box: list[asyncio.Task[Any]] = []
    failure: list[BaseException] = []

    async def runner() -> None:
        loop_box.append(asyncio.get_running_loop())
        task = asyncio.ensure_future(main())
        task_box.append(task)
        started.set()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=asyncio.run, args=(runner(),), daemon=True)
    thread.start()
    assert started.wait(10), "the asyncio thread did not start"
    try:
        yield
    finally:
        if not task_box[0].done():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: it ended
                loop_box[0].call_soon_threadsafe(task_box[0].cancel)
        thread.join(10)
        assert not thread.is_alive(), "the asyncio thread did not stop"
    if failure:
        raise failure[0]
