"""OutputBuffer and StdinWriter over real pipes."""

from __future__ import annotations

import asyncio
import os

import pytest

from shimv2.aio import ClosedResourceError, move_on_after
from shimv2.errdefs import FailedPrecondition
from shimv2.guest.stdio import OutputBuffer, StdinWriter
from tests.aio import asyncio_test


async def _write_all(fd: int, data: bytes) -> None:
    writer = StdinWriter(fd)
    await writer.write(data)
    await writer.aclose()


@asyncio_test
async def test_read_blocks_until_data_then_eof() -> None:
    r, w = os.pipe()
    buf = OutputBuffer()
    async with asyncio.TaskGroup() as group:
        group.create_task(buf.pump(r))
        async with move_on_after(0.1) as scope:
            await buf.read(10)
        assert scope.expired()  # nothing written yet: the read blocks
        os.write(w, b"hello")
        assert await buf.read(3) == b"hel"
        assert await buf.read(10) == b"lo"
        os.close(w)
        assert await buf.read(10) == b""
        await buf.eof_seen.wait()
        assert buf.at_eof


@asyncio_test
async def test_back_pressure_bounds_the_buffer() -> None:
    r, w = os.pipe()
    buf = OutputBuffer(limit=1000)
    payload = bytes(range(256)) * 1000  # 256 KB: more than our buffer plus the pipe
    writer_done = asyncio.Event()

    async def writer() -> None:
        await _write_all(w, payload)
        writer_done.set()

    async with asyncio.TaskGroup() as group:
        group.create_task(buf.pump(r))
        group.create_task(writer())
        await asyncio.sleep(0.2)
        assert len(buf) == 1000
        assert not writer_done.is_set()  # the writer is blocked: nobody reads
        got = bytearray()
        while chunk := await buf.read(4096):
            assert len(chunk) <= 1000
            got += chunk
        assert bytes(got) == payload
        assert writer_done.is_set()


@asyncio_test
async def test_close_wakes_readers() -> None:
    r, w = os.pipe()
    buf = OutputBuffer()
    results: list[bytes] = []

    async def reader() -> None:
        results.append(await buf.read(10))

    async with asyncio.timeout(5), asyncio.TaskGroup() as group:
        group.create_task(buf.pump(r))
        group.create_task(reader())
        await asyncio.sleep(0.05)
        buf.close()  # wakes the pump too, which sees the close and stops
    assert results == [b""]
    assert buf.eof_seen.is_set()
    with pytest.raises(BrokenPipeError):  # the pump closed the only read end
        os.write(w, b"x")
    os.close(w)


@asyncio_test
async def test_close_stops_a_pump_held_back_by_a_full_buffer() -> None:
    r, w = os.pipe()
    buf = OutputBuffer(limit=4)
    os.write(w, b"more than four bytes")
    async with asyncio.timeout(5), asyncio.TaskGroup() as group:
        group.create_task(buf.pump(r))
        await asyncio.sleep(0.05)
        assert len(buf) == 4
        buf.close()
    assert await buf.read(10) == b""
    with pytest.raises(BrokenPipeError):
        os.write(w, b"x")
    os.close(w)


@asyncio_test
async def test_close_before_the_pump_ran_still_closes_its_fd() -> None:
    r, w = os.pipe()
    buf = OutputBuffer()
    async with asyncio.TaskGroup() as group:
        group.create_task(buf.pump(r))
        buf.close()  # the pump's task has not started yet
    with pytest.raises(BrokenPipeError):
        os.write(w, b"x")
    os.close(w)


@asyncio_test
async def test_closed_buffer_is_eof() -> None:
    buf = OutputBuffer.closed()
    assert await buf.read(10) == b""


@asyncio_test
async def test_stdin_writes_in_order_then_closes() -> None:
    r, w = os.pipe()
    out = OutputBuffer()
    writer = StdinWriter(w)
    big = b"a" * 200_000  # larger than the pipe: the write must wait for room
    async with asyncio.TaskGroup() as outer:
        outer.create_task(out.pump(r))
        async with asyncio.TaskGroup() as inner:
            inner.create_task(writer.write(big))
            await asyncio.sleep(0.01)
            inner.create_task(writer.write(b"END"))
            await asyncio.sleep(0.01)
            inner.create_task(writer.aclose())  # after the queued writes
        got = bytearray()
        while chunk := await out.read(65536):
            got += chunk
        assert bytes(got) == big + b"END"
        assert writer.closed
        with pytest.raises(FailedPrecondition):
            await writer.write(b"late")
        await writer.aclose()  # idempotent


@asyncio_test
async def test_stdin_reader_gone_is_failed_precondition() -> None:
    r, w = os.pipe()
    os.close(r)
    writer = StdinWriter(w)
    with pytest.raises(FailedPrecondition):
        await writer.write(b"x")
    writer.close_now()
    assert writer.closed


@asyncio_test
async def test_close_now_ends_a_blocked_write() -> None:
    r, w = os.pipe()
    writer = StdinWriter(w)
    async with asyncio.timeout(5):
        blocked = asyncio.get_running_loop().create_task(writer.write(b"a" * 200_000))
        await asyncio.sleep(0.05)  # the pipe is full: nobody reads it
        assert not blocked.done()
        writer.close_now()
        with pytest.raises(ClosedResourceError):
            await blocked
    assert writer.closed
    assert os.read(r, 65536)  # what went out before
    os.close(r)
