"""container.py against a hostile guest agent (a fake one on a unix socket; no VM).

Every reply is the guest's word: statuses, lengths and lists are checked
before the host uses them.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import event, given
from hypothesis import strategies as st

from shimv2.errdefs import AlreadyExists, Error, FailedPrecondition, Internal, NotFound
from shimv2.pb.kata import agent_pb2
from shimv2.vc.agent import MAX_ERROR_TEXT
from shimv2.vc.container import MAX_PIDS, PID_MAX, VM_GONE_STATUS, Container, guest_pids
from shimv2.vc.testing import AGENT_SERVICE, FakePod, RawReply, scripted
from tests.strategies import hostile_replies, reply_with

PROCESS = {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}}


def c1(pod: FakePod) -> Container:
    return pod.sandbox.container("c1")


def answer(reply: Message) -> Any:
    async def handler(request: Any) -> Message:
        return reply

    return handler


@pytest.mark.parametrize("status", [-1, 256, 2**31 - 1, -(2**31)])
async def test_an_absurd_exit_status_is_not_trusted(
    pod: FakePod, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    # containerd's exit_status is a uint32: a negative one would not even encode.
    pod.agent.replies["WaitProcess"] = answer(agent_pb2.WaitProcessResponse(status=status))
    container = c1(pod)
    with trio.fail_after(5):
        await container.watch_init()
        assert await container.wait() == VM_GONE_STATUS
    assert container.state.exit_status == VM_GONE_STATUS
    assert "exit status" in caplog.text


async def test_a_wait_that_fails_or_does_not_decode_ends_the_process(pod: FakePod) -> None:
    pod.agent.replies["WaitProcess"] = scripted(RawReply(b"\x08").as_message())  # truncated
    with trio.fail_after(5):
        await c1(pod).watch_init()
        assert await c1(pod).wait() == VM_GONE_STATUS


async def test_exec_status_is_checked_too(pod: FakePod) -> None:
    pod.agent.replies["ExecProcess"] = answer(Empty())
    pod.agent.replies["WaitProcess"] = answer(agent_pb2.WaitProcessResponse(status=-9))
    await c1(pod).enter("e1", PROCESS)
    with trio.fail_after(5):
        assert await c1(pod).wait_exec("e1") == VM_GONE_STATUS


async def test_execs_are_forgotten_once_deleted(pod: FakePod) -> None:
    release = trio.Event()

    async def wait(request: agent_pb2.WaitProcessRequest) -> Message:
        await release.wait()
        return agent_pb2.WaitProcessResponse(status=3)

    pod.agent.replies["ExecProcess"] = answer(Empty())
    pod.agent.replies["WaitProcess"] = wait
    container = c1(pod)
    await container.enter("e1", PROCESS)
    with pytest.raises(FailedPrecondition, match="running"):
        container.delete_exec("e1")  # still running
    release.set()
    with trio.fail_after(5):
        assert await container.wait_exec("e1") == 3
    container.delete_exec("e1")
    assert container.execs == {}
    with pytest.raises(NotFound):
        await container.wait_exec("e1")
    container.delete_exec("never-started")  # an exec the guest never ran: nothing to do
    # The id can be used again, and many execs leave nothing behind.
    for _ in range(50):
        await container.enter("e1", PROCESS)
        with trio.fail_after(5):
            assert await container.wait_exec("e1") == 3
        container.delete_exec("e1")
    assert container.execs == {}
    await container.enter("e2", PROCESS)
    with pytest.raises(AlreadyExists):
        await container.enter("e2", PROCESS)


async def test_a_late_wait_never_touches_a_reused_exec_id(pod: FakePod) -> None:
    first_fails = trio.Event()
    calls = 0

    async def wait(request: agent_pb2.WaitProcessRequest) -> Message:
        nonlocal calls
        calls += 1
        if calls == 1:
            await first_fails.wait()
            raise Internal("the guest lies late")
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    pod.agent.replies["ExecProcess"] = answer(Empty())
    pod.agent.replies["WaitProcess"] = wait
    container = c1(pod)
    await container.enter("e1", PROCESS)
    container.vm_lost()  # every process ends, the first WaitProcess still pending
    assert await container.wait_exec("e1") == VM_GONE_STATUS
    container.delete_exec("e1")
    container.state.state = "running"  # as if it had been a lost connection, not a VM
    await container.enter("e1", PROCESS)
    with trio.fail_after(5):
        await pod.agent.wait_calls("WaitProcess", 2)
    first_fails.set()
    await trio.sleep(0.2)
    assert not container.execs["e1"].event.is_set()  # the new e1 still runs


async def test_read_refuses_more_than_asked(pod: FakePod) -> None:
    pod.agent.replies["ReadStdout"] = answer(agent_pb2.ReadStreamResponse(data=b"x" * 100_000))
    with pytest.raises(Internal, match="100000 bytes"):
        await c1(pod).read_stdout("", 64)


async def test_write_refuses_a_count_beyond_what_was_sent(pod: FakePod) -> None:
    pod.agent.replies["WriteStdin"] = answer(agent_pb2.WriteStreamResponse(len=2**32 - 1))
    with pytest.raises(Internal, match="wrote"):
        await c1(pod).write_stdin("", b"abc")
    pod.agent.replies["WriteStdin"] = answer(agent_pb2.WriteStreamResponse(len=2))
    assert await c1(pod).write_stdin("", b"abc") == 2


@pytest.mark.parametrize(
    "raw",
    [
        b"[1, -5]",
        b"[0]",
        b"[4194305]",
        b"[1e400]",
        b'["7"]',
        b"[true]",
        b"[[1]]",
        b'{"1": 2}',
        b"[" * 100_000 + b"]" * 100_000,  # deep enough to overflow json's recursion
        b"[" + b"1," * 70_000 + b"1]",
        b"9" * 5000,
        b"\xff",
    ],
)
def test_guest_pids_refuses_absurd_lists(raw: bytes) -> None:
    with pytest.raises(Internal, match="process list"):
        guest_pids(raw, "c1")


def test_guest_pids_reads_a_sane_list() -> None:
    assert guest_pids(b"[1, 7, 4194304]", "c1") == [1, 7, 4194304]
    assert guest_pids(b"", "c1") == []


async def test_process_list_pids_goes_through_the_check(pod: FakePod) -> None:
    pids = json.dumps([1, -1]).encode()
    pod.agent.replies["ListProcesses"] = answer(agent_pb2.ListProcessesResponse(process_list=pids))
    with pytest.raises(Internal):
        await c1(pod).process_list_pids()


async def test_an_oom_watcher_and_exec_waits_log_garbage_not_crash(
    pod: FakePod, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    pod.agent.replies["ExecProcess"] = answer(Empty())
    pod.agent.replies["WaitProcess"] = scripted(RawReply(b"\xff\xff").as_message())
    await c1(pod).enter("e1", PROCESS)
    with trio.fail_after(5):
        assert await c1(pod).wait_exec("e1") == VM_GONE_STATUS
    assert "e1" in caplog.text


# -- fuzzing: the container verbs against hostile answers ---------------------------------------


async def _start(c: Container) -> object:
    c.state.state = "created"
    await c.start()
    return c.state.state


async def _wait(c: Container) -> object:
    await c.watch_init()
    status = await c.wait()
    assert 0 <= status <= 255
    return status


async def _exec(c: Container) -> object:
    await c.enter("e1", PROCESS)
    status = await c.wait_exec("e1")  # its WaitProcess gets the same hostile answer
    assert 0 <= status <= 255
    return status


async def _read(c: Container) -> object:
    data = await c.read_stdout("", 100)
    assert len(data) <= 100
    return data


async def _write(c: Container) -> object:
    written = await c.write_stdin("", b"hello")
    assert 0 <= written <= 5
    return written


async def _pids(c: Container) -> object:
    pids = await c.process_list_pids()
    assert len(pids) <= MAX_PIDS
    assert all(type(p) is int and 1 <= p <= PID_MAX for p in pids)
    return pids


async def _resume(c: Container) -> object:
    c.state.state = "paused"
    await c.resume()
    return c.state.state


async def _stats(c: Container) -> object:
    return await c.stats()


# Each container verb and the rpc whose answer is hostile.
VERBS: dict[str, tuple[str, Callable[[Container], Awaitable[object]]]] = {
    "start": ("StartContainer", _start),
    "wait": ("WaitProcess", _wait),
    "exec": ("ExecProcess", _exec),
    "signal": ("SignalProcess", lambda c: c.signal_process("", 15)),
    "read": ("ReadStdout", _read),
    "write": ("WriteStdin", _write),
    "close_stdin": ("CloseStdin", lambda c: c.close_stdin("")),
    "resize": ("TtyWinResize", lambda c: c.resize("", 24, 80)),
    "pause": ("PauseContainer", lambda c: c.pause()),
    "resume": ("ResumeContainer", _resume),
    "update": ("UpdateContainer", lambda c: c.update({"memory": {"limit": 1 << 28}})),
    "pids": ("ListProcesses", _pids),
    "stats": ("StatsContainer", _stats),
}
RESPONSE_TYPES = {m.name: GetMessageClass(m.output_type) for m in AGENT_SERVICE.methods}


async def _verb_against(verb: str, answer: Message | Error) -> object:
    rpc, run = VERBS[verb]
    with tempfile.TemporaryDirectory() as tmp, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            pod = await FakePod.start(Path(tmp), nursery)
            pod.agent.replies[rpc] = reply_with(answer)
            if verb == "exec":  # and its WaitProcess, the same answer when it fits
                wait = answer if isinstance(answer, Error) else RawReply(b"").as_message()
                pod.agent.replies["WaitProcess"] = reply_with(wait)
            try:
                result = await run(c1(pod))
            except Error as exc:
                result = exc
            nursery.cancel_scope.cancel()
    return result


@pytest.mark.fuzz
@given(
    st.sampled_from(sorted(VERBS)).flatmap(
        lambda verb: st.tuples(st.just(verb), hostile_replies(RESPONSE_TYPES[VERBS[verb][0]]))
    )
)
def test_fuzz_verbs_end_in_a_checked_result_or_a_bounded_coded_error(
    case: tuple[str, Message | Error],
) -> None:
    verb, answer = case
    result = trio.run(_verb_against, verb, answer)
    event(f"{verb}: {type(result).__name__}")
    if isinstance(result, Error):
        assert len(result.message) <= MAX_ERROR_TEXT + 200


def test_the_guest_spec_leaves_the_host_spec_whole_for_the_pid_namespace_check() -> None:
    from shimv2.vc.container import guest_spec, joins_pod_pid_namespace

    spec: dict[str, Any] = {
        "process": PROCESS,
        "root": {"path": "/host/rootfs"},
        "annotations": {"io.kubernetes.cri.container-type": "container"},
        "linux": {
            "namespaces": [
                {"type": "pid", "path": "/proc/42/ns/pid"},
                {"type": "ipc", "path": "/proc/42/ns/ipc"},
                {"type": "network", "path": "/var/run/netns/cni-1"},
                {"type": "mount"},
            ]
        },
    }
    before = json.dumps(spec, sort_keys=True)
    guest = guest_spec(spec, "c1")
    # The guest gets no host path and no network namespace...
    assert [(ns.Type, ns.Path) for ns in guest.Linux.Namespaces] == [
        ("pid", ""),
        ("ipc", ""),
        ("mount", ""),
    ]
    # ...and the host's spec, read after, still says the pod's PID namespace is joined
    # (it did not: critest's PodPID spec saw the app as PID 1).
    assert json.dumps(spec, sort_keys=True) == before
    assert joins_pod_pid_namespace(spec)
