"""OutputBuffer and StdinWriter over real pipes."""

from __future__ import annotations

import os

import pytest
import trio

from shimv2.errdefs import FailedPrecondition
from shimv2.guest.stdio import OutputBuffer, StdinWriter


async def _write_all(fd: int, data: bytes) -> None:
    writer = StdinWriter(fd)
    await writer.write(data)
    await writer.aclose()


async def test_read_blocks_until_data_then_eof(nursery: trio.Nursery) -> None:
    r, w = os.pipe()
    buf = OutputBuffer()
    nursery.start_soon(buf.pump, r)
    with trio.move_on_after(0.1) as scope:
        await buf.read(10)
    assert scope.cancelled_caught  # nothing written yet: the read blocks
    os.write(w, b"hello")
    assert await buf.read(3) == b"hel"
    assert await buf.read(10) == b"lo"
    os.close(w)
    assert await buf.read(10) == b""
    await buf.eof_seen.wait()
    assert buf.at_eof


async def test_back_pressure_bounds_the_buffer(nursery: trio.Nursery) -> None:
    r, w = os.pipe()
    buf = OutputBuffer(limit=1000)
    nursery.start_soon(buf.pump, r)
    payload = bytes(range(256)) * 1000  # 256 KB: more than our buffer plus the pipe
    writer_done = trio.Event()

    async def writer() -> None:
        await _write_all(w, payload)
        writer_done.set()

    nursery.start_soon(writer)
    await trio.sleep(0.2)
    assert len(buf) == 1000
    assert not writer_done.is_set()  # the writer is blocked: nobody reads
    got = bytearray()
    while chunk := await buf.read(4096):
        assert len(chunk) <= 1000
        got += chunk
    assert bytes(got) == payload
    assert writer_done.is_set()


async def test_close_wakes_readers(nursery: trio.Nursery) -> None:
    r, w = os.pipe()
    buf = OutputBuffer()
    results: list[bytes] = []

    async def reader() -> None:
        results.append(await buf.read(10))

    async with trio.open_nursery() as inner:
        inner.start_soon(buf.pump, r)
        inner.start_soon(reader)
        await trio.sleep(0.05)
        buf.close()
        os.write(w, b"x")  # wakes the pump, which sees the close and stops
    os.close(w)
    assert results == [b""]
    assert buf.eof_seen.is_set()


async def test_closed_buffer_is_eof() -> None:
    buf = OutputBuffer.closed()
    assert await buf.read(10) == b""


async def test_stdin_writes_in_order_then_closes(nursery: trio.Nursery) -> None:
    r, w = os.pipe()
    out = OutputBuffer()
    nursery.start_soon(out.pump, r)
    writer = StdinWriter(w)
    big = b"a" * 200_000  # larger than the pipe: the write must wait for room
    async with trio.open_nursery() as inner:
        inner.start_soon(writer.write, big)
        await trio.sleep(0.01)
        inner.start_soon(writer.write, b"END")
        await trio.sleep(0.01)
        inner.start_soon(writer.aclose)  # after the queued writes
    got = bytearray()
    while chunk := await out.read(65536):
        got += chunk
    assert bytes(got) == big + b"END"
    assert writer.closed
    with pytest.raises(FailedPrecondition):
        await writer.write(b"late")
    await writer.aclose()  # idempotent


async def test_stdin_reader_gone_is_failed_precondition() -> None:
    r, w = os.pipe()
    os.close(r)
    writer = StdinWriter(w)
    with pytest.raises(FailedPrecondition):
        await writer.write(b"x")
    writer.close_now()
    assert writer.closed
