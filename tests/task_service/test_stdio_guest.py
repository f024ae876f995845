"""stdio.py's copiers reading from a hostile guest: a real vc Container over a fake agent.

The plumbing itself (FIFOs, files, logging binaries) is tested in test_stdio.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from google.protobuf.message import Message

from shimv2.errdefs import Internal
from shimv2.pb.kata import agent_pb2
from shimv2.task_service.stdio import ProcessIO, StdioConfig
from shimv2.vc.testing import FakePod, RawReply, scripted


@pytest.fixture
async def pod(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[FakePod]:
    pod = await FakePod.start(tmp_path, nursery)
    yield pod
    pod.agent.disconnect()


async def outputs_of(pod: FakePod, tmp_path: Path, nursery: trio.Nursery) -> bytes:
    """Copy c1's stdout to a file until the copier ends; what reached the file."""
    out = tmp_path / "out.log"
    io = await ProcessIO.open(StdioConfig(stdout=f"file://{out}"), container_id="c1", namespace="n")
    io.start(nursery, pod.sandbox.container("c1"), "")
    with trio.fail_after(5):
        await io.wait_outputs()
    await io.aclose()
    return out.read_bytes()


@pytest.mark.parametrize(
    "bad",
    [
        Internal("x" * 1_000_000),  # an error status with a huge message
        RawReply(b"\x0a\xff\xff\xff\xff\x0f").as_message(),  # length beyond the payload
        agent_pb2.ReadStreamResponse(data=b"y" * 1_000_000),  # far more than asked for
    ],
)
async def test_output_copier_survives_garbage_and_logs_one_short_line(
    pod: FakePod,
    tmp_path: Path,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    bad: Message | Exception,
) -> None:
    pod.agent.replies["ReadStdout"] = scripted(agent_pb2.ReadStreamResponse(data=b"ok\n"), bad)
    pod.agent.replies["ReadStderr"] = scripted(agent_pb2.ReadStreamResponse(data=b""))
    caplog.set_level(logging.WARNING)
    assert await outputs_of(pod, tmp_path, nursery) == b"ok\n"  # and no more
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "taking it as EOF" in lines[0]
    assert len(lines[0]) < 1000


async def test_stdin_copier_ends_on_a_lying_write_count(
    pod: FakePod, tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    async def lie(request: Any) -> Message:
        return agent_pb2.WriteStreamResponse(len=len(request.data) + 1000)

    pod.agent.replies["WriteStdin"] = lie
    pod.agent.replies["ReadStdout"] = scripted()
    fifo = str(tmp_path / "stdin")
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        io = await ProcessIO.open(StdioConfig(stdin=fifo), container_id="c1", namespace="n")
        os.write(writer, b"data")
        io.start(nursery, pod.sandbox.container("c1"), "")
        with trio.fail_after(5):
            while "stdin copy ended" not in caplog.text:  # noqa: ASYNC110 - a log line has no event
                await trio.sleep(0.01)
        assert "wrote 1004 bytes of 4" in caplog.text
        await io.aclose()
    finally:
        os.close(writer)
