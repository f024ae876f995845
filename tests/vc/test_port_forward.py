"""Port-forward's host relay: a real network namespace, real iptables, the real guest end.

The "guest" is ``shimv2.guest.port_forward`` on a unix socket in this process (on
its own asyncio loop, in a thread: the ``guest`` fixture), so its dials land on
servers in the test's own network namespace; the relay is the host's, on trio in
the test; the client runs inside a fresh pod namespace (``nsenter``), as
containerd's dial does.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from shimv2.vc.mountns import NSENTER
from shimv2.vc.port_forward import RULE_COMMENT, PortForward
from tests.guest.test_port_forward import guest  # noqa: F401 - a fixture

# Sends argv[2] argv[3] times, then prints what came back (before an EOF or a reset).
CLIENT = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
got = b""
try:
    s.sendall(sys.argv[2].encode() * int(sys.argv[3]))
    s.shutdown(socket.SHUT_WR)
    while data := s.recv(65536):
        got += data
except (ConnectionResetError, BrokenPipeError, OSError):
    pass  # closed on us: what came before is all there is
sys.stdout.write(got.decode())
"""


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"kpy-pf-{os.getpid()}-{os.urandom(3).hex()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


async def upper_server(nursery: trio.Nursery, dials: list[int] | None = None) -> int:
    """A TCP server on the test's 127.0.0.1 (the "guest's" loopback) that answers in capitals,
    chunk by chunk: the client's half-close does not cross the vsock leg (``shimv2.relay``).
    Each connection adds to ``dials``."""

    async def serve(stream: trio.SocketStream) -> None:
        if dials is not None:
            dials.append(1)
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data.upper())

    listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def client_in(netns: str, port: int, message: str, times: int = 1) -> str:
    done = await trio.run_process(
        [NSENTER, f"--net={netns}", "--", sys.executable, "-c", CLIENT, str(port), message,
         str(times)],
        capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip
    return done.stdout.decode() if done.returncode == 0 else f"failed: {done.stderr.decode()}"


def rules(netns: str) -> str:
    return subprocess.run(
        [NSENTER, f"--net={netns}", "--", "iptables", "-t", "nat", "-S", "OUTPUT"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


async def test_a_dial_on_the_pods_loopback_reaches_the_guests(
    netns: str,
    guest: Path,  # noqa: F811 - the fixture imported above
    nursery: trio.Nursery,
) -> None:
    port = await upper_server(nursery)
    assert (await client_in(netns, port, "x")).startswith("failed")  # nothing there before
    relay = await PortForward.start(netns)
    scope = trio.CancelScope()

    async def serve() -> None:
        with scope:
            await relay.serve(functools.partial(trio.open_unix_socket, str(guest)))

    nursery.start_soon(serve)
    assert RULE_COMMENT in rules(netns)
    assert await client_in(netns, port, "hello from the pod") == "HELLO FROM THE POD"
    # More than one chunk each way.
    assert await client_in(netns, port, "y", 300_000) == "Y" * 300_000
    scope.cancel()
    await relay.stop()
    assert RULE_COMMENT not in rules(netns)
    assert relay.listener.fileno() == -1
    assert (await client_in(netns, port, "x")).startswith("failed")


async def test_a_held_relay_dials_the_guest_only_once_released(
    netns: str,
    guest: Path,  # noqa: F811 - the fixture imported above
    nursery: trio.Nursery,
) -> None:
    """While the pod is paused (the agent held), no connection or byte goes to the guest."""
    dials: list[int] = []
    port = await upper_server(nursery, dials)
    relay = await PortForward.start(netns)
    gate = trio.Event()
    nursery.start_soon(
        functools.partial(
            relay.serve, functools.partial(trio.open_unix_socket, str(guest)), hold=gate.wait
        )
    )
    answers: list[str] = []

    async def dial() -> None:
        answers.append(await client_in(netns, port, "paused"))

    try:
        async with trio.open_nursery() as inner:
            inner.start_soon(dial)
            await trio.sleep(1)
            assert (dials, answers) == ([], [])  # the client waits; the guest saw nothing
            gate.set()
        assert (dials, answers) == ([1], ["PAUSED"])
    finally:
        await relay.stop()


async def test_a_port_the_guest_does_not_listen_on_gets_nothing(
    netns: str,
    guest: Path,  # noqa: F811 - the fixture imported above
    nursery: trio.Nursery,
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    relay = await PortForward.start(netns)
    nursery.start_soon(relay.serve, functools.partial(trio.open_unix_socket, str(guest)))
    try:
        assert await client_in(netns, closed, "anyone?") == ""  # accepted, then closed at once
    finally:
        await relay.stop()


async def test_a_hostile_guest_answer_ends_the_connection(
    netns: str, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The guest answers junk, or far too much: no bytes of it reach the pod's client."""
    path = tmp_path / "hostile.sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen(8)
    answers = [b"OK but not quite\n", b"X" * 100_000]

    async def hostile() -> None:
        for answer in answers:
            conn, _ = await listener.accept()
            with conn:
                await conn.recv(100)
                await conn.send(answer)
                await trio.sleep(1)

    nursery.start_soon(hostile)
    relay = await PortForward.start(netns)
    nursery.start_soon(relay.serve, functools.partial(trio.open_unix_socket, str(path)))
    try:
        for _ in answers:
            assert await client_in(netns, 8080, "GET /") == ""
    finally:
        await relay.stop()
        listener.close()


async def test_a_missing_iptables_is_a_clear_error(netns: str) -> None:
    with pytest.raises(Exception, match="iptables"):
        await PortForward.start(netns, iptables="/nonexistent/iptables")
    assert RULE_COMMENT not in rules(netns)
