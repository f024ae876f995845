"""Interop with the real Go ttrpc (github.com/containerd/ttrpc), both directions.

The Go program is built by scripts/build-go-tools (scripts/setup runs it); if the
binary is missing the tests build it, and a failed build fails them.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from google.protobuf.empty_pb2 import Empty
from google.protobuf.wrappers_pb2 import BytesValue, Int64Value, StringValue

from shimv2 import errdefs
from shimv2.pb.ttrpc.request_pb2 import Request, Response
from shimv2.ttrpc import Client, open_unix_client
from shimv2.ttrpc._codec import MAX_PAYLOAD, NEED_DATA, Connection, ResponseReceived, Role
from shimv2.ttrpc.testing import INTEROP_SERVICE as SVC

from .conftest import Served

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parents[2]
GO_CASES = ["echo", "error", "unimplemented", "deadline", "concurrent", "metadata", "oversize-raw"]


@pytest.fixture(scope="session")
def interop_bin() -> Path:
    subprocess.run([str(ROOT / "scripts" / "build-go-tools")], check=True)
    path = ROOT / "build" / "bin" / "ttrpc-interop"
    assert path.is_file()
    return path


async def _go_client(interop_bin: Path, path: str, *args: str) -> str:
    with trio.fail_after(120):
        proc = await trio.run_process(
            [str(interop_bin), "client", "-socket", path, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    out = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0, out
    return out


# -- the Go client against our server ---------------------------------------


@pytest.mark.parametrize("case", GO_CASES)
async def test_go_client_against_our_server(interop_bin: Path, served: Served, case: str) -> None:
    out = await _go_client(interop_bin, served.path, "-case", case)
    assert f"PASS {case}" in out


async def test_go_client_boundary_strict_against_our_server(
    interop_bin: Path, served: Served
) -> None:
    # -strict: an oversize response must come back as RESOURCE_EXHAUSTED on a
    # connection that stays usable (the Go server itself drops the connection).
    out = await _go_client(interop_bin, served.path, "-case", "boundary", "-strict")
    assert "PASS boundary" in out


# -- our client against the Go server ---------------------------------------


@pytest.fixture
async def go_server(interop_bin: Path, tmp_path: Path) -> AsyncIterator[str]:
    path = str(tmp_path / "go.sock")
    proc = await trio.lowlevel.open_process(
        [str(interop_bin), "server", "-socket", path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        with trio.fail_after(10):
            line = await proc.stdout.receive_some(64)
        assert line.strip() == b"READY"
        yield path
    finally:
        assert proc.stdin is not None
        await proc.stdin.aclose()  # the Go server exits on stdin EOF
        with trio.fail_after(5):
            assert await proc.wait() == 0
    assert not await trio.Path(path).exists()


@pytest.fixture
async def go_client(go_server: str) -> AsyncIterator[Client]:
    async with open_unix_client(go_server) as client:
        yield client


async def test_echo_against_go(go_client: Client) -> None:
    for payload in (b"hello", b""):
        out = await go_client.call(SVC, "Echo", BytesValue(value=payload), BytesValue)
        assert out.value == payload


@pytest.mark.parametrize(
    ("text", "cls"),
    [("5:no such thing", errdefs.NotFound), ("9:bad state", errdefs.FailedPrecondition)],
)
async def test_error_status_from_go(go_client: Client, text: str, cls: type[Exception]) -> None:
    with pytest.raises(cls, match=text.partition(":")[2]):
        await go_client.call(SVC, "Fail", StringValue(value=text), Empty)


async def test_unimplemented_from_go(go_client: Client) -> None:
    with pytest.raises(errdefs.Unimplemented):
        await go_client.call(SVC, "Nope", Empty(), Empty)
    with pytest.raises(errdefs.Unimplemented):
        await go_client.call("kata_py.interop.v1.Missing", "Echo", Empty(), Empty)


async def test_deadline_reaches_go(go_client: Client) -> None:
    start = trio.current_time()
    with pytest.raises(errdefs.DeadlineExceeded):
        await go_client.call(SVC, "Sleep", Int64Value(value=5000), Empty, timeout=0.3)
    assert trio.current_time() - start < 2
    out = await go_client.call(SVC, "Echo", BytesValue(value=b"ok"), BytesValue)
    assert out.value == b"ok"


async def test_go_server_honours_timeout_nano(go_server: str) -> None:
    # Raw codec, so only the server's deadline can end the call.
    conn = Connection(Role.CLIENT)
    stream = await trio.open_unix_socket(go_server)
    async with stream:
        payload = Int64Value(value=5000).SerializeToString()
        _, frame = conn.send_request(SVC, "Sleep", payload, timeout_nano=200_000_000)
        start = trio.current_time()
        await stream.send_all(frame)
        with trio.fail_after(3):
            while (event := conn.next_event()) is NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
        assert isinstance(event, ResponseReceived)
        assert event.response.status.code == errdefs.Code.DEADLINE_EXCEEDED
        assert 0.15 < trio.current_time() - start < 2


async def test_hundred_concurrent_calls_against_go(go_client: Client) -> None:
    done: list[int] = []

    async def slow() -> None:
        await go_client.call(SVC, "Sleep", Int64Value(value=1500), Empty)
        done.append(-1)

    async def echo(i: int) -> None:
        payload = f"msg-{i}".encode() * 150
        out = await go_client.call(SVC, "Echo", BytesValue(value=payload), BytesValue)
        assert out.value == payload
        done.append(i)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow)
        await trio.sleep(0.05)
        for i in range(100):
            nursery.start_soon(echo, i)
    assert sorted(done[:100]) == list(range(100))
    assert done[100] == -1


async def test_metadata_reaches_go(go_client: Client) -> None:
    out = await go_client.call(
        SVC, "Metadata", Empty(), StringValue, metadata=[("x-kata-test", "abc")]
    )
    assert out.value == "abc"


def _largest_echo_payload() -> int:
    def frame_size(n: int) -> int:
        inner = BytesValue(value=b"x" * n).SerializeToString()
        return len(Request(service=SVC, method="Echo", payload=inner).SerializeToString())

    n = MAX_PAYLOAD - 64
    while frame_size(n + 1) <= MAX_PAYLOAD:
        n += 1
    assert frame_size(n) == MAX_PAYLOAD
    return n


async def test_four_mib_boundary_against_go(go_client: Client) -> None:
    n = _largest_echo_payload()
    out = await go_client.call(SVC, "Echo", BytesValue(value=b"y" * n), BytesValue)
    assert len(out.value) == n
    with pytest.raises(errdefs.ResourceExhausted):
        await go_client.call(SVC, "Echo", BytesValue(value=b"y" * (n + 1)), BytesValue)
    # The largest response the Go server can send us.
    m = _largest_blob()
    blob = await go_client.call(SVC, "Blob", Int64Value(value=m), BytesValue)
    assert len(blob.value) == m
    out = await go_client.call(SVC, "Echo", BytesValue(value=b"ok"), BytesValue)
    assert out.value == b"ok"


def _largest_blob() -> int:
    def size(m: int) -> int:
        inner = BytesValue(value=b"x" * m).SerializeToString()
        return len(Response(payload=inner).SerializeToString())

    m = MAX_PAYLOAD - 64
    while size(m + 1) <= MAX_PAYLOAD:
        m += 1
    assert size(m) == MAX_PAYLOAD
    return m
