"""NetworkService against a real network namespace on the host, with busybox's ``ip``
(what the guest has) and with iproute2's; its waits for hot-plugged NICs against
FakeIpCommand, on a clock that jumps over every wait (``run_autojump``)."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from shimv2.errdefs import InvalidArgument, NotFound, Unavailable
from shimv2.guest import network
from shimv2.guest.network import IpCommand, NetworkService, parse_links, parse_routes
from shimv2.guest.testing import FakeIpCommand
from shimv2.pb.kata import agent_pb2, types_pb2
from shimv2.ttrpc import CallContext
from tests.aio import asyncio_test, run_autojump

CTX = CallContext("grpc.AgentService", "test", {})
MAC = "02:00:00:aa:bb:01"


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=10).stdout


@dataclass
class Netns:
    name: str
    ip: IpCommand

    def sh(self, *argv: str) -> str:
        return _run("ip", "netns", "exec", self.name, *argv)


TOOLS = {
    "busybox": (("busybox", "ip"), ("busybox", "arp")),
    "iproute2": (("ip",), ("busybox", "arp")),
}


@pytest.fixture(params=sorted(TOOLS))
def netns(request: pytest.FixtureRequest) -> Iterator[Netns]:
    # scripts/setup installs busybox-static and iproute2; CI runs as root.
    name = f"kpy-test-{secrets.token_hex(4)}"
    _run("ip", "netns", "add", name)
    try:
        ns = "ip", "netns", "exec", name
        _run(*ns, "ip", "link", "add", "v0", "address", MAC, "type", "veth", "peer", "name", "v1")
        _run(*ns, "ip", "link", "set", "v1", "up")
        ip, arp = TOOLS[request.param]
        yield Netns(name, IpCommand(prefix=ns, ip=ip, arp=arp))
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


def interface(**kw: object) -> types_pb2.Interface:
    iface = types_pb2.Interface(name="eth0", hwAddr=MAC.upper(), mtu=1400)
    iface.IPAddresses.add(family=types_pb2.v4, address="10.88.0.5", mask="16")
    iface.IPAddresses.add(family=types_pb2.v6, address="fd00:88::5", mask="64")
    for key, value in kw.items():
        setattr(iface, key, value)
    return iface


@asyncio_test
async def test_update_interface_by_mac(netns: Netns) -> None:
    svc = NetworkService(netns.ip)
    netns.sh("ip", "addr", "add", "192.168.9.9/24", "dev", "v0")  # replaced, not kept
    got = await svc.UpdateInterface(CTX, agent_pb2.UpdateInterfaceRequest(interface=interface()))
    assert got.name == "eth0"
    assert got.mtu == 1400
    assert got.hwAddr == MAC
    addrs = {(a.address, a.mask) for a in got.IPAddresses}
    assert {("10.88.0.5", "16"), ("fd00:88::5", "64")} <= addrs
    assert ("192.168.9.9", "24") not in addrs
    link = netns.sh("ip", "-o", "link", "show", "eth0")
    assert "mtu 1400" in link
    assert ",UP" in link
    listed = await svc.ListInterfaces(CTX, agent_pb2.ListInterfacesRequest())
    assert {i.name for i in listed.Interfaces} == {"lo", "eth0", "v1"}


@asyncio_test
async def test_update_interface_renames_a_clashing_link(netns: Netns) -> None:
    svc = NetworkService(netns.ip)
    iface = interface(name="v1")
    await svc.UpdateInterface(CTX, agent_pb2.UpdateInterfaceRequest(interface=iface))
    names = {link.name for link in parse_links(netns.sh("ip", "-o", "link"))}
    assert names == {"lo", "v1", "v1_temp"}


@asyncio_test
async def test_update_interface_errors(netns: Netns) -> None:
    svc = NetworkService(netns.ip, link_wait=0)  # a missing MAC: NotFound at once
    with pytest.raises(NotFound):
        await svc.UpdateInterface(
            CTX, agent_pb2.UpdateInterfaceRequest(interface=interface(hwAddr="02:de:ad:00:00:01"))
        )
    bad = interface()
    bad.IPAddresses[0].mask = "99"
    with pytest.raises(InvalidArgument):
        await svc.UpdateInterface(CTX, agent_pb2.UpdateInterfaceRequest(interface=bad))


@asyncio_test
async def test_update_routes_replaces_routes(netns: Netns) -> None:
    svc = NetworkService(netns.ip)
    await svc.UpdateInterface(CTX, agent_pb2.UpdateInterfaceRequest(interface=interface()))
    netns.sh("ip", "route", "add", "172.16.0.0/12", "via", "10.88.0.1", "dev", "eth0")
    routes = [
        types_pb2.Route(gateway="10.88.0.1", device="eth0"),
        types_pb2.Route(dest="10.99.0.0/16", device="eth0", scope=253, source="10.88.0.5"),
        types_pb2.Route(dest="10.88.0.0/16", device="eth0", scope=253),  # the kernel's: exists
        types_pb2.Route(family=types_pb2.v6, gateway="fd00:88::1", device="eth0"),
    ]
    resp = await svc.UpdateRoutes(
        CTX, agent_pb2.UpdateRoutesRequest(routes=agent_pb2.Routes(Routes=routes))
    )
    got = {(r.dest, r.gateway, r.device) for r in resp.Routes}
    assert ("", "10.88.0.1", "eth0") in got
    assert ("10.99.0.0/16", "", "eth0") in got
    assert ("10.88.0.0/16", "", "eth0") in got  # kept: the kernel's own
    assert ("", "fd00:88::1", "eth0") in got
    assert not any(r.dest == "172.16.0.0/12" for r in resp.Routes)  # deleted
    table = netns.sh("ip", "route")
    assert "default via 10.88.0.1 dev eth0" in table
    assert "172.16" not in table
    listed = await svc.ListRoutes(CTX, agent_pb2.ListRoutesRequest())
    assert {(r.dest, r.gateway, r.device) for r in listed.Routes} == got
    # Once more, the same list: idempotent.
    again = await svc.UpdateRoutes(
        CTX, agent_pb2.UpdateRoutesRequest(routes=agent_pb2.Routes(Routes=routes))
    )
    assert {(r.dest, r.gateway, r.device) for r in again.Routes} == got


@asyncio_test
async def test_update_routes_rejects_bad_routes(netns: Netns) -> None:
    svc = NetworkService(netns.ip)
    req = agent_pb2.UpdateRoutesRequest(
        routes=agent_pb2.Routes(Routes=[types_pb2.Route(dest="10.0.0.0/8")])
    )
    with pytest.raises(InvalidArgument):
        await svc.UpdateRoutes(CTX, req)
    req.routes.Routes[0].device = "nonexistent0"
    with pytest.raises(InvalidArgument):
        await svc.UpdateRoutes(CTX, req)


@asyncio_test
async def test_add_arp_neighbors(netns: Netns) -> None:
    svc = NetworkService(netns.ip)
    await svc.UpdateInterface(CTX, agent_pb2.UpdateInterfaceRequest(interface=interface()))
    neighbor = types_pb2.ARPNeighbor(
        toIPAddress=types_pb2.IPAddress(address="10.88.0.7"),
        device="eth0",
        lladdr="02:aa:bb:cc:dd:ee",
    )
    req = agent_pb2.AddARPNeighborsRequest(
        neighbors=agent_pb2.ARPNeighbors(ARPNeighbors=[neighbor])
    )
    await svc.AddARPNeighbors(CTX, req)
    assert "10.88.0.7 dev eth0 lladdr 02:aa:bb:cc:dd:ee PERMANENT" in netns.sh("ip", "neigh")
    neighbor.device = "nonexistent0"
    req = agent_pb2.AddARPNeighborsRequest(
        neighbors=agent_pb2.ARPNeighbors(ARPNeighbors=[neighbor])
    )
    with pytest.raises(InvalidArgument):
        await svc.AddARPNeighbors(CTX, req)


def test_update_interface_waits_for_a_hot_plugged_nic() -> None:
    ip = FakeIpCommand()
    svc = NetworkService(ip)

    async def plug() -> None:
        await asyncio.sleep(0.3)  # runs only if the retries leave the event loop free
        ip.add_link("eth1", MAC)

    async def update() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with asyncio.TaskGroup() as group:
            group.create_task(plug())
            await svc.UpdateInterface(CTX, agent_pb2.UpdateInterfaceRequest(interface=interface()))
        return loop.time() - start

    assert 0.3 <= run_autojump(update()) < 0.4
    assert ip.link_listings > 2
    assert ("-4", "addr", "add", "10.88.0.5/16", "dev", "eth1") in ip.commands
    assert ("link", "set", "eth1", "mtu", "1400", "name", "eth0", "arp", "on") in ip.commands
    assert ip.commands[-1] == ("link", "set", "eth0", "up")


@pytest.mark.parametrize("wait", [None, 0.5])
def test_update_interface_gives_up_on_a_mac_after_the_deadline(wait: float | None) -> None:
    ip = FakeIpCommand()
    ip.add_link("eth1", "02:00:00:aa:bb:02")
    svc = NetworkService(ip) if wait is None else NetworkService(ip, link_wait=wait)

    async def update() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(NotFound, match=f"no link with MAC {MAC.upper()}"):
            await svc.UpdateInterface(CTX, agent_pb2.UpdateInterfaceRequest(interface=interface()))
        return loop.time() - start

    waited = run_autojump(update())
    deadline = network.LINK_WAIT if wait is None else wait
    assert deadline <= waited < deadline + 0.1
    assert ip.commands == []  # the other link left alone


def test_update_interface_by_name_is_not_waited_for() -> None:
    ip = FakeIpCommand()
    ip.add_link("eth1", MAC)
    svc = NetworkService(ip)

    async def update() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(NotFound, match="no link named 'eth9'"):
            await svc.UpdateInterface(
                CTX, agent_pb2.UpdateInterfaceRequest(interface=interface(name="eth9", hwAddr=""))
            )
        return loop.time() - start

    # No retry's sleep: that would have jumped the clock by LINK_RETRY (the clock's real
    # time goes on too, by microseconds).
    assert run_autojump(update()) < network.LINK_RETRY
    assert ip.link_listings == 1


@asyncio_test
async def test_an_argument_with_a_nul_byte_is_invalid_argument() -> None:
    # Found by fuzzing: exec refuses a NUL byte with ValueError, which went out as UNKNOWN.
    ip = FakeIpCommand()
    ip.add_link("eth1", MAC)
    svc = NetworkService(ip)
    routes = agent_pb2.Routes(Routes=[types_pb2.Route(device="x\x00y")])
    with pytest.raises(InvalidArgument, match="null byte"):
        await svc.UpdateRoutes(CTX, agent_pb2.UpdateRoutesRequest(routes=routes))
    with pytest.raises(InvalidArgument, match="null byte"):
        await svc.UpdateInterface(
            CTX, agent_pb2.UpdateInterfaceRequest(interface=interface(name="x\x00y"))
        )
    assert not any("\x00" in arg for command in ip.commands for arg in command)


@asyncio_test
async def test_the_default_runner_bounds_commands_and_reports_failures() -> None:
    # subprocess.run in a worker thread: never asyncio's subprocesses (the agent's reaper).
    assert await IpCommand(ip=("echo",)).ip("-o", "link") == "-o link\n"
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(Unavailable, match="sleep 5: timed out"):
        await IpCommand(ip=("sleep",), timeout=0.2).ip("5")
    assert loop.time() - start < 2  # killed at the timeout
    with pytest.raises(Unavailable, match="/nonexistent/ip link"):
        await IpCommand(ip=("/nonexistent/ip",)).ip("link")
    with pytest.raises(InvalidArgument, match="null byte"):
        await IpCommand(ip=("echo",)).ip("x\x00y")


def test_parse_busybox_and_iproute2_routes() -> None:
    busybox = (
        "default via 192.0.2.1 dev eth0 \n"
        "192.0.2.0/24 dev eth0 scope link  src 192.0.2.2 \n"
        "multicast ff00::/8 dev eth0  metric 256 \n"
    )
    iproute2 = (
        "default via 192.0.2.1 dev eth0 proto static onlink \n"
        "192.0.2.0/24 dev eth0 proto kernel scope link src 192.0.2.2 linkdown\n"
    )
    for text in (busybox, iproute2):
        routes = parse_routes(text, types_pb2.v4)
        assert routes[0].route.dest == ""
        assert routes[0].route.gateway == "192.0.2.1"
        assert routes[1].route.scope == 253
        assert routes[1].route.source == "192.0.2.2"
    assert parse_routes(busybox, types_pb2.v6)[2].kind == "multicast"
