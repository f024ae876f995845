"""The Task API from raw frames, fuzzed: every frame gets a coded status and the server
(the real ttrpc server over the real task service, with fake virtcontainers) goes on."""

from __future__ import annotations

import json
import socket
from typing import NamedTuple

import pytest
import trio
from google.protobuf.message_factory import GetMessageClass
from hypothesis import event, given
from hypothesis import strategies as st

from shimv2.errdefs import Code
from shimv2.pb.containerd.runtime.task.v2 import shim_pb2 as shim_v2
from shimv2.pb.containerd.runtime.task.v3 import shim_pb2 as shim_v3
from shimv2.pb.ttrpc.request_pb2 import Response
from shimv2.task_service import TaskService
from shimv2.task_service.testing import FakeVirtContainers, RecordingPublisher, RecordingShutdown
from shimv2.ttrpc import Server
from shimv2.ttrpc._codec import NEED_DATA, Connection, ResponseReceived, Role
from tests.strategies import messages, texts

# -- fuzzing: raw frames to the real server ---------------------------------------------------

TASK_METHODS = [
    (f"containerd.task.{version}.Task", rpc.name, GetMessageClass(rpc.input_type))
    for version, pb in (("v2", shim_v2), ("v3", shim_v3))
    for rpc in pb.DESCRIPTOR.services_by_name["Task"].methods
]
# Every call carries a deadline, so none can hang; Wait blocks until an exit, so its deadline
# is short (the others answer at once with the fakes: theirs only bounds a hang).
FUZZ_CALL_TIMEOUT = 5.0
FUZZ_WAIT_TIMEOUT = 0.05


class FuzzCall(NamedTuple):
    service: str
    method: str
    payload: bytes


@st.composite
def task_calls(draw: st.DrawFn, bundle: str) -> FuzzCall:
    """A call of any Task rpc (v2 or v3), or of one that does not exist, with random bytes
    or a random valid request, which mostly names the live task ``c1`` so that the handlers
    get past their lookups."""
    if draw(st.integers(0, 19)) == 0:
        return FuzzCall(draw(texts()), draw(texts()), draw(st.binary(max_size=50)))
    service, method, cls = draw(st.sampled_from(TASK_METHODS))
    if draw(st.integers(0, 3)) == 0:
        return FuzzCall(service, method, draw(st.binary(max_size=200)))
    msg = draw(messages(cls))
    fields = cls.DESCRIPTOR.fields_by_name
    if "id" in fields and draw(st.integers(0, 3)):
        msg.id = draw(st.sampled_from(["c1", "c2"]))
    if "exec_id" in fields and draw(st.integers(0, 3)):
        msg.exec_id = draw(st.sampled_from(["", "e1"]))
    if "bundle" in fields and draw(st.booleans()):
        msg.bundle = bundle
    for name in ("spec", "resources"):
        if name in fields and draw(st.booleans()):
            value = {"args": ["sh"], "cwd": "/"} if name == "spec" else {}
            getattr(msg, name).value = json.dumps(value).encode()
    for name in ("stdin", "stdout", "stderr"):
        # Stdio URIs are containerd's: binary:// would start a program, file:// make a file.
        if name in fields and fields[name].type == fields[name].TYPE_STRING:
            setattr(msg, name, "")
    return FuzzCall(service, method, msg.SerializeToString())


async def _serve_calls(bundle: str, calls: list[FuzzCall]) -> list[Response]:
    """The real server over a socketpair, a raw codec client sending ``c1``'s Create and
    Start, then ``calls``, then a Connect, one after the other; every response."""
    with trio.fail_after(60):  # a hang fails the example instead of the whole run
        return await _serve_calls_in_time(bundle, calls)


async def _serve_calls_in_time(bundle: str, calls: list[FuzzCall]) -> list[Response]:
    async with trio.open_nursery() as nursery:
        vc = FakeVirtContainers(nursery)
        service = TaskService(
            vc, RecordingPublisher(), RecordingShutdown(), namespace="k8s.io", shim_id="shim1"
        )
        await nursery.start(service.run)
        a, b = socket.socketpair()
        server = Server(service.services())
        nursery.start_soon(
            server.serve_stream, trio.SocketStream(trio.socket.from_stdlib_socket(a))
        )
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(b))
        codec = Connection(Role.CLIENT)
        v2 = "containerd.task.v2.Task"
        setup = [
            FuzzCall(
                v2, "Create", shim_v2.CreateTaskRequest(id="c1", bundle=bundle).SerializeToString()
            ),
            FuzzCall(v2, "Start", shim_v2.StartRequest(id="c1").SerializeToString()),
        ]
        last = FuzzCall(v2, "Connect", shim_v2.ConnectRequest(id="c1").SerializeToString())
        responses = []
        for call in [*setup, *calls, last]:
            sid, wire = codec.send_request(
                call.service,
                call.method,
                call.payload,
                timeout_nano=int(
                    (FUZZ_WAIT_TIMEOUT if call.method == "Wait" else FUZZ_CALL_TIMEOUT) * 1e9
                ),
            )
            await stream.send_all(wire)
            while not isinstance(event := codec.next_event(), ResponseReceived):
                assert event is NEED_DATA, event
                data = await stream.receive_some()
                assert data, "the server closed the connection"
                codec.receive_data(data)
            assert event.stream_id == sid
            responses.append(event.response)
        await stream.aclose()
        nursery.cancel_scope.cancel()
    return responses


@pytest.fixture(scope="module")
def fuzz_bundle(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("bundle")
    spec = {
        "ociVersion": "1.1.0",
        "process": {"args": ["sh"], "cwd": "/"},
        "root": {"path": "r"},
        "linux": {"namespaces": [{"type": "network"}]},
    }
    (path / "config.json").write_text(json.dumps(spec))
    return str(path)


@pytest.mark.fuzz
@given(data=st.data())
def test_fuzz_every_frame_gets_a_coded_status_and_the_server_goes_on(
    fuzz_bundle: str, data: st.DataObject
) -> None:
    calls = data.draw(st.lists(task_calls(fuzz_bundle), min_size=1, max_size=6))
    responses = trio.run(_serve_calls, fuzz_bundle, calls)
    created, started, *answers, connected = responses
    assert created.status.code == Code.OK
    assert started.status.code == Code.OK
    for call, response in zip(calls, answers, strict=True):
        code = response.status.code
        known = any(call.method == m and call.service == s for s, m, _ in TASK_METHODS)
        event(f"{call.method if known else '(no such rpc)'}: {code}")
        # UNKNOWN is what the server answers for an exception that is not an errdefs error.
        assert code in list(Code), (call, response.status)
        assert code != Code.UNKNOWN, (call, response.status)
        assert len(response.status.message) < 4096
    assert connected.status.code == Code.OK
    assert shim_v2.ConnectResponse.FromString(connected.payload).version == "kata-py"
