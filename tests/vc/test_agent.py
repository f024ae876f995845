"""The agent client against a hostile fake agent (no VM)."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.message import Message

from shimv2.errdefs import Internal, Unknown, error_for
from shimv2.pb.kata import agent_pb2
from shimv2.vc.agent import MAX_ERROR_TEXT
from shimv2.vc.testing import FakePod


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
