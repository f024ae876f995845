"""The agent client against a hostile fake agent (no VM)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import event, given
from hypothesis import strategies as st

from shimv2.errdefs import Error, Internal, Unknown, error_for
from shimv2.pb.kata import agent_pb2
from shimv2.vc.agent import MAX_ERROR_TEXT
from shimv2.vc.testing import AGENT_SERVICE, FakePod
from tests.strategies import hostile_replies, reply_with


@pytest.mark.parametrize(("code", "error"), [(13, Internal), (99, Unknown)])
async def test_a_huge_error_text_from_the_guest_is_cut(
    pod: FakePod, code: int, error: type[Exception]
) -> None:
    # The text goes into logs and into replies to containerd (and kubelet's events).
    async def fail(request: Any) -> Message:
        raise error_for(code, "x" * 1_000_000)

    pod.agent.replies["GetGuestDetails"] = fail
    with pytest.raises(error) as caught:
        await pod.sandbox.agent.call(
            "GetGuestDetails", agent_pb2.GuestDetailsRequest(), agent_pb2.GuestDetailsResponse
        )
    message = caught.value.args[0]
    assert len(message) <= MAX_ERROR_TEXT + 100
    assert message.endswith("characters)")  # says how long it was


async def test_a_held_agent_gets_no_new_call_until_released(pod: FakePod) -> None:
    # Pausing a VM holds the agent's calls: none may reach the channel while
    # its rings are stopped (hybrid vsock dies of it).
    pod.agent.replies["GetGuestDetails"] = reply_with(agent_pb2.GuestDetailsResponse())
    agent = pod.sandbox.agent
    await agent.hold(timeout=5)
    answered = trio.Event()

    async def details() -> None:
        await agent.call(
            "GetGuestDetails", agent_pb2.GuestDetailsRequest(), agent_pb2.GuestDetailsResponse
        )
        answered.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(details)
        await trio.sleep(0.2)
        assert pod.agent.calls["GetGuestDetails"] == 0
        agent.release()
        with trio.fail_after(5):
            await answered.wait()
    assert pod.agent.calls["GetGuestDetails"] == 1


# -- fuzzing: every rpc against hostile answers -------------------------------------------------

RPCS = [
    (m.name, GetMessageClass(m.input_type), GetMessageClass(m.output_type))
    for m in AGENT_SERVICE.methods
]


async def _call_hostile(
    rpc: str, request: type[Message], response: type[Message], answer: Message | Error
) -> Message | Error:
    with tempfile.TemporaryDirectory() as tmp, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            pod = await FakePod.start(Path(tmp), nursery)
            pod.agent.replies[rpc] = reply_with(answer)
            try:
                result: Message | Error = await pod.sandbox.agent.call(rpc, request(), response)
            except Error as exc:
                result = exc
            nursery.cancel_scope.cancel()
    return result


@pytest.mark.fuzz
@given(st.sampled_from(RPCS).flatmap(lambda r: st.tuples(st.just(r), hostile_replies(r[2]))))
def test_fuzz_every_rpc_gives_its_reply_type_or_a_bounded_coded_error(
    case: tuple[tuple[str, type[Message], type[Message]], Message | Error],
) -> None:
    (rpc, request, response), answer = case
    result = trio.run(_call_hostile, rpc, request, response, answer)
    if isinstance(result, Error):
        event(f"{type(result).__name__}")
        assert len(result.message) <= MAX_ERROR_TEXT + 100
    else:
        assert type(result) is response
