"""sandbox.py against a hostile guest agent (a fake one on a unix socket; no VM).

The VM tests of sandbox.py are in test_sandbox.py.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
from google.protobuf.message import Message

from shimv2.errdefs import Internal, InvalidArgument, Unknown
from shimv2.pb.kata import agent_pb2
from shimv2.vc.testing import FakePod, RawReply, scripted


def start_watch_oom(nursery: trio.Nursery, pod: FakePod) -> trio.Event:
    """Run the sandbox's OOM watcher; the event is set when it returns."""
    done = trio.Event()

    async def watch() -> None:
        await pod.sandbox.watch_oom()
        done.set()

    nursery.start_soon(watch)
    return done


async def test_watch_oom_survives_error_statuses_and_garbage(pod: FakePod) -> None:
    pod.agent.replies["GetOOMEvent"] = scripted(
        Internal("boom"),
        InvalidArgument("no"),
        Unknown("code 99: made up"),
        RawReply(b"\x0a\x04\xff\xfe\xfd\xfc").as_message(),  # container_id: not UTF-8
        RawReply(b"\xff\xff\xff").as_message(),  # not protobuf at all
        agent_pb2.OOMEvent(container_id="c1"),
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pod.sandbox.watch_oom)
        with trio.fail_after(10):
            await pod.oom_seen.wait()
            await pod.agent.wait_calls("GetOOMEvent", 7)  # still asking: the watcher lives
        assert pod.ooms == ["c1"]
        nursery.cancel_scope.cancel()


async def test_watch_oom_backs_off_from_an_agent_that_fails_at_once(pod: FakePod) -> None:
    async def fail(request: Any) -> Message:
        raise Internal("always")

    pod.agent.replies["GetOOMEvent"] = fail
    with trio.move_on_after(1.0):
        await pod.sandbox.watch_oom()
    # Without a backoff this is thousands of round trips a second.
    assert 2 <= pod.agent.calls["GetOOMEvent"] <= 8


async def test_watch_oom_stops_at_once_when_the_vm_is_gone(pod: FakePod) -> None:
    async def fail(request: Any) -> Message:
        raise Internal("always")

    pod.agent.replies["GetOOMEvent"] = fail
    async with trio.open_nursery() as nursery:
        done = start_watch_oom(nursery, pod)
        await trio.sleep(1.5)  # the backoff has grown
        pod.sandbox.vm_gone = True
        pod.sandbox.vm_exited.set()
        with trio.fail_after(0.5):
            await done.wait()


async def test_watch_oom_rate_limits_a_flood(
    pod: FakePod, caplog: pytest.LogCaptureFixture
) -> None:
    async def flood(request: Any) -> Message:
        return agent_pb2.OOMEvent(container_id="c1")

    pod.agent.replies["GetOOMEvent"] = flood
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        done = start_watch_oom(nursery, pod)
        await trio.sleep(2.0)
        pod.agent.disconnect()  # the VM went away: the watcher ends
        with trio.fail_after(5):
            await done.wait()
    forwarded = len(pod.ooms)
    # A burst of 10, then 5 a second (with slack for a slow machine).
    assert 10 <= forwarded <= 25
    # Not a line per dropped event: one when dropping starts, one count at the end.
    lines = [r.getMessage() for r in caplog.records if "OOM" in r.getMessage()]
    assert 1 <= len(lines) <= 3, lines
    assert "dropped" in lines[-1]
