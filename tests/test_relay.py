"""shimv2.relay: both ways, half-closes only where asked, an idle end once one side ended."""

from __future__ import annotations

import trio
import trio.testing

from shimv2.relay import splice


async def test_bytes_cross_both_ways_and_an_idle_side_is_closed_after_the_linger() -> None:
    client, a = trio.testing.memory_stream_pair()
    server, b = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: splice(a, b, eof_to_a=True, eof_to_b=False, linger=0.3))
        await client.send_all(b"ping")
        assert await server.receive_some(10) == b"ping"
        await server.send_all(b"pong")
        assert await client.receive_some(10) == b"pong"
        start = trio.current_time()
        await server.send_eof()  # the server is done; the client idles
        with trio.fail_after(5):
            assert await client.receive_some(10) == b""  # passed on: eof_to_a
        assert await server.receive_some(10) == b""  # closed, not half-closed, after the linger
        assert trio.current_time() - start >= 0.3


async def test_a_half_close_is_not_passed_where_it_is_not_asked_for() -> None:
    client, a = trio.testing.memory_stream_pair()
    server, b = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: splice(a, b, eof_to_a=True, eof_to_b=False, linger=0.5))
        await client.send_eof()
        with trio.move_on_after(0.2) as idle:
            await server.receive_some(10)  # no EOF crosses to b
        assert idle.cancelled_caught
        await server.send_all(b"late but moving")  # bytes keep the other direction alive
        assert await client.receive_some(100) == b"late but moving"
        with trio.fail_after(5):
            assert await server.receive_some(10) == b""  # then it ends, idle


async def test_no_byte_goes_to_b_while_its_gate_is_closed() -> None:
    # A paused VM's vsock must get nothing (vhost-device-vsock 0.3.0 ends its worker).
    client, a = trio.testing.memory_stream_pair()
    server, b = trio.testing.memory_stream_pair()
    gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: splice(a, b, eof_to_a=True, eof_to_b=False, linger=0.3, wait_b=gate.wait)
        )
        await client.send_all(b"held")
        with trio.move_on_after(0.3) as idle:
            await server.receive_some(10)
        assert idle.cancelled_caught
        await server.send_all(b"the guest may still talk")  # the other way is not gated
        assert await client.receive_some(100) == b"the guest may still talk"
        gate.set()
        with trio.fail_after(5):
            assert await server.receive_some(10) == b"held"
        nursery.cancel_scope.cancel()
