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
from shimv2.pb.kata.health_pb2 import CheckRequest, HealthCheckResponse
from shimv2.ttrpc import Method, Server, Service, open_unix_listener
from shimv2.vc.agent import HEALTH_SERVICE, MAX_ERROR_TEXT, connect_agent
from shimv2.vc.hypervisor import AgentEndpoint
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


async def test_a_ready_hint_cuts_the_dial_backoff_short(tmp_path: Path) -> None:
    """The guest's console said its agent serves: the next dial goes at once, not after
    the backoff's pause (up to MAX_DIAL_PAUSE)."""
    path = str(tmp_path / "agent.sock")
    hint = trio.Event()
    server = Server([Service(HEALTH_SERVICE, {"Check": Method(CheckRequest, _serving)})])
    endpoint = AgentEndpoint(unix_path=path, hint=hint.wait)
    async with trio.open_nursery() as nursery:

        async def guest() -> float:
            await trio.sleep(1.6)  # the host's pauses have grown to 0.8 s by now
            listener = await open_unix_listener(path)
            nursery.start_soon(server.serve, listener)
            hint.set()
            return trio.current_time()

        listening: list[float] = []
        nursery.start_soon(lambda: _record(guest, listening))
        async with connect_agent(endpoint, ready_timeout=20) as agent:
            connected = trio.current_time()
            assert await agent.check(5)
        assert connected - listening[0] < 0.5
        nursery.cancel_scope.cancel()


async def _serving(ctx: object, req: CheckRequest) -> HealthCheckResponse:
    return HealthCheckResponse(status=HealthCheckResponse.SERVING)


async def _record(fn: Any, into: list[float]) -> None:
    into.append(await fn())
