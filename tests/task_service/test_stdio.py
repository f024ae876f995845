"""Stdio plumbing with real FIFOs, files and a logging binary; the agent side is fake."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from shimv2.errdefs import FailedPrecondition, InvalidArgument
from shimv2.task_service.stdio import CHUNK, ProcessIO, StdioConfig, binary_args
from shimv2.task_service.testing import FakeProcess, Program


class Streams:
    """The agent's stdio verbs over one fake process."""

    def __init__(self, program: Program) -> None:
        self.proc = FakeProcess(program)
        self.closed_stdin = 0

    async def read_stdout(self, exec_id: str, max_bytes: int = 65536) -> bytes:
        return await self.proc.stdout.read(max_bytes)

    async def read_stderr(self, exec_id: str, max_bytes: int = 65536) -> bytes:
        return await self.proc.stderr.read(max_bytes)

    async def write_stdin(self, exec_id: str, data: bytes) -> int:
        await trio.lowlevel.checkpoint()
        return self.proc.write_stdin(data[:5])  # partial writes on purpose

    async def close_stdin(self, exec_id: str) -> None:
        await trio.lowlevel.checkpoint()
        self.closed_stdin += 1
        self.proc.close_stdin()


def fifo(tmp_path: Path, name: str) -> str:
    path = str(tmp_path / name)
    os.mkfifo(path)
    return path


async def read_all(fd: int) -> bytes:
    """Read a FIFO (opened like containerd: O_RDONLY|O_NONBLOCK) to EOF."""
    out = bytearray()
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if not data:
            return bytes(out)
        out += data


@pytest.fixture
async def reader_fds() -> AsyncIterator[list[int]]:
    fds: list[int] = []
    yield fds
    for fd in fds:
        trio.lowlevel.notify_closing(fd)
        os.close(fd)


def open_reader(path: str, fds: list[int]) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    fds.append(fd)
    return fd


async def test_fifo_output_complete_before_wait_outputs(
    tmp_path: Path, nursery: trio.Nursery, reader_fds: list[int]
) -> None:
    out_path, err_path = fifo(tmp_path, "out"), fifo(tmp_path, "err")
    out_fd, err_fd = open_reader(out_path, reader_fds), open_reader(err_path, reader_fds)
    big = os.urandom(3 * CHUNK + 17) * 8  # more than a pipe buffer
    streams = Streams(Program(stdout=big, stderr=b"warn\n"))
    io = await ProcessIO.open(
        StdioConfig(stdout=out_path, stderr=err_path), container_id="c", namespace="ns"
    )
    got: dict[str, bytes] = {}

    async def collect(name: str, fd: int) -> None:
        got[name] = await read_all(fd)

    async with trio.open_nursery() as readers:
        readers.start_soon(collect, "out", out_fd)
        readers.start_soon(collect, "err", err_fd)
        io.start(nursery, streams, "")
        nursery.start_soon(streams.proc.run)
        await io.wait_outputs()
    assert got == {"out": big, "err": b"warn\n"}


async def test_back_pressure_reads_no_more_than_written(
    tmp_path: Path, nursery: trio.Nursery, reader_fds: list[int]
) -> None:
    out_path = fifo(tmp_path, "out")
    out_fd = open_reader(out_path, reader_fds)  # opened, never read
    total = 1 << 20
    streams = Streams(Program(stdout=b"x" * total, run_for=None))
    io = await ProcessIO.open(StdioConfig(stdout=out_path), container_id="c", namespace="ns")
    io.start(nursery, streams, "")
    nursery.start_soon(streams.proc.run)
    await trio.sleep(0.2)
    left = len(streams.proc.stdout._data)
    assert left > total - 256 * 1024  # at most a pipe buffer plus a chunk left the agent
    drained = await read_all_some(out_fd)
    assert drained + left + CHUNK >= total - CHUNK
    streams.proc.signal(9)
    await io.aclose()


async def read_all_some(fd: int) -> int:
    n = 0
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return n
        n += len(data)
        if not data:
            return n


async def test_fifo_without_reader_opens_at_once(tmp_path: Path) -> None:
    with trio.fail_after(2):
        io = await ProcessIO.open(
            StdioConfig(stdout=fifo(tmp_path, "out")), container_id="c", namespace="ns"
        )
    await io.aclose()


async def test_broken_destination_still_drains_to_eof(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    out_path = fifo(tmp_path, "out")
    fd = os.open(out_path, os.O_RDONLY | os.O_NONBLOCK)
    io = await ProcessIO.open(StdioConfig(stdout=out_path), container_id="c", namespace="ns")
    os.close(fd)  # containerd went away
    streams = Streams(Program(stdout=b"y" * (1 << 20)))
    io.start(nursery, streams, "")
    nursery.start_soon(streams.proc.run)
    with trio.fail_after(5):
        await io.wait_outputs()
    assert streams.proc.stdout._data == b""


async def test_stdin_fifo_to_process_then_close(
    tmp_path: Path, nursery: trio.Nursery, reader_fds: list[int]
) -> None:
    in_path, out_path = fifo(tmp_path, "in"), fifo(tmp_path, "out")
    out_fd = open_reader(out_path, reader_fds)
    streams = Streams(Program(echo=True))
    io = await ProcessIO.open(
        StdioConfig(stdin=in_path, stdout=out_path), container_id="c", namespace="ns"
    )
    io.start(nursery, streams, "")
    nursery.start_soon(streams.proc.run)
    await trio.sleep(0.05)  # no writer yet: must not be taken as EOF
    assert streams.closed_stdin == 0
    w = os.open(in_path, os.O_WRONLY)
    os.write(w, b"hello world\n")
    os.close(w)
    with trio.fail_after(5):
        echoed = await read_all(out_fd)
    assert echoed == b"hello world\n"
    assert streams.closed_stdin == 1


async def test_close_stdin_forwards_what_was_written(tmp_path: Path, nursery: trio.Nursery) -> None:
    in_path = fifo(tmp_path, "in")
    streams = Streams(Program(echo=True))
    io = await ProcessIO.open(StdioConfig(stdin=in_path), container_id="c", namespace="ns")
    w = os.open(in_path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(w, b"abcdefghij")
        io.start(nursery, streams, "")
        nursery.start_soon(streams.proc.run)
        with trio.fail_after(5):
            await io.close_stdin()
        assert bytes(streams.proc.stdin_data) == b"abcdefghij"
        assert streams.closed_stdin == 1
    finally:
        os.close(w)


async def test_close_stdin_before_start(tmp_path: Path, nursery: trio.Nursery) -> None:
    in_path = fifo(tmp_path, "in")
    streams = Streams(Program(echo=True))
    io = await ProcessIO.open(StdioConfig(stdin=in_path), container_id="c", namespace="ns")
    w = os.open(in_path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(w, b"early")
        await io.close_stdin()  # returns at once: nothing runs yet
        io.start(nursery, streams, "")
        nursery.start_soon(streams.proc.run)
        with trio.fail_after(5):
            await streams.proc.exited.wait()
        assert bytes(streams.proc.stdin_data) == b"early"
        assert streams.closed_stdin == 1
    finally:
        os.close(w)


async def test_file_scheme_appends_stdout_and_stderr(tmp_path: Path, nursery: trio.Nursery) -> None:
    log = tmp_path / "logs" / "c.log"
    log.parent.mkdir()
    log.write_bytes(b"old\n")
    streams = Streams(Program(stdout=b"out\n", stderr=b"err\n"))
    io = await ProcessIO.open(
        StdioConfig(stdout=f"file://{log}", stderr=f"file://{log}"),
        container_id="c",
        namespace="ns",
    )
    io.start(nursery, streams, "")
    nursery.start_soon(streams.proc.run)
    await io.wait_outputs()
    content = log.read_bytes()
    assert content.startswith(b"old\n")
    assert sorted(content[4:].splitlines()) == [b"err", b"out"]


async def test_file_scheme_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    victim.chmod(0o644)
    log = tmp_path / "c.log"
    log.symlink_to(victim)
    with pytest.raises(FailedPrecondition, match="cannot open stdio file"):
        await ProcessIO.open(
            StdioConfig(stdout=f"file://{log}", stderr=f"file://{log}"),
            container_id="c",
            namespace="ns",
        )
    assert victim.read_bytes() == b"precious\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert log.is_symlink()


async def test_file_scheme_refuses_what_is_not_a_regular_file(
    tmp_path: Path, reader_fds: list[int]
) -> None:
    path = fifo(tmp_path, "c.log")
    open_reader(path, reader_fds)  # a reader: a plain O_WRONLY open would succeed
    with trio.fail_after(5), pytest.raises(FailedPrecondition, match="not a regular file"):
        await ProcessIO.open(StdioConfig(stdout=f"file://{path}"), container_id="c", namespace="n")
    lonely = fifo(tmp_path, "lonely.log")  # no reader: a blocking open would hang the shim
    with trio.fail_after(5), pytest.raises(FailedPrecondition):
        await ProcessIO.open(
            StdioConfig(stdout=f"file://{lonely}"), container_id="c", namespace="n"
        )


LOGGER = """#!/bin/sh
out="$2"
echo "$CONTAINER_ID $CONTAINER_NAMESPACE $*" > "$out.meta"
cat <&4 > "$out.err" 5>&- &
exec 5>&-
cat <&3 > "$out"
wait
"""


def logger_binary(tmp_path: Path) -> Path:
    path = tmp_path / "logger"
    path.write_text(LOGGER)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


async def test_binary_scheme(tmp_path: Path, nursery: trio.Nursery) -> None:
    binary, out = logger_binary(tmp_path), tmp_path / "captured"
    uri = f"binary://{binary}?out={out}&debug"
    streams = Streams(Program(stdout=b"to the logger\n", stderr=b"oops\n"))
    io = await ProcessIO.open(
        StdioConfig(stdout=uri, stderr=uri), container_id="c1", namespace="k8s.io"
    )
    assert (tmp_path / "captured.meta").exists()  # it ran before being ready
    io.start(nursery, streams, "")
    nursery.start_soon(streams.proc.run)
    await io.wait_outputs()
    with trio.fail_after(5):
        await io.aclose()  # the logger sees EOF and exits; reaped
    assert out.read_bytes() == b"to the logger\n"
    assert (tmp_path / "captured.err").read_bytes() == b"oops\n"
    assert (tmp_path / "captured.meta").read_text() == f"c1 k8s.io out {out} debug\n"


def test_binary_args() -> None:
    assert binary_args("binary:///usr/bin/log?a=1&b") == ("/usr/bin/log", ["a", "1", "b"])
    with pytest.raises(InvalidArgument):
        binary_args("binary://relative")


async def test_unknown_scheme_rejected() -> None:
    with pytest.raises(InvalidArgument):
        await ProcessIO.open(StdioConfig(stdout="ftp://x/y"), container_id="c", namespace="n")


async def test_terminal_has_one_stream(
    tmp_path: Path, nursery: trio.Nursery, reader_fds: list[int]
) -> None:
    out_path, err_path = fifo(tmp_path, "out"), fifo(tmp_path, "err")
    out_fd = open_reader(out_path, reader_fds)
    streams = Streams(Program(stdout=b"tty\r\n", stderr=b"never read"))
    io = await ProcessIO.open(
        StdioConfig(stdout=out_path, stderr=err_path, terminal=True),
        container_id="c",
        namespace="ns",
    )
    io.start(nursery, streams, "")
    nursery.start_soon(streams.proc.run)
    with trio.fail_after(5):
        assert await read_all(out_fd) == b"tty\r\n"
        await io.wait_outputs()
    assert streams.proc.stderr._data == b"never read"
