"""The network rpcs: UpdateInterface, UpdateRoutes, ListInterfaces, ListRoutes,
AddARPNeighbors, done with the ``ip`` and ``arp`` commands.

The guest has only busybox (1.35), so everything stays in the subset both
busybox and iproute2 understand: ``ip -o link``, ``ip -o addr``, ``ip route``,
``ip link set``, ``ip addr add|flush``, ``ip route add|del``; ARP entries with
``arp -s`` (busybox ``ip neigh`` cannot add). busybox hides a route's protocol,
so the kernel's own routes (prefix routes of addresses, fe80::/64, typed
routes) are recognised by their shape, not by ``proto kernel``.

Semantics follow the Kata agent (src/agent/src/netlink.rs): a link is found by
MAC address, waited for a while (a hot-plugged NIC shows up late); UpdateInterface
replaces its addresses, then sets mtu, name, arp and up; UpdateRoutes deletes
every non-kernel route of the main table and adds the new ones, those without a
gateway first, tolerating "File exists".
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

from google.protobuf.empty_pb2 import Empty

from shimv2.errdefs import InvalidArgument, NotFound, Unavailable
from shimv2.pb.kata import agent_pb2, types_pb2
from shimv2.ttrpc import CallContext

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 10.0
LINK_WAIT = 10.0  # seconds UpdateInterface waits for a hot-plugged NIC to show up
LINK_RETRY = 0.02  # seconds between two listings of the links meanwhile
SCOPES = {"global": 0, "universe": 0, "site": 200, "link": 253, "host": 254, "nowhere": 255}
_SCOPE_NAMES = {0: "global", 200: "site", 253: "link", 254: "host", 255: "nowhere"}
_ROUTE_TYPES = {
    "unicast", "local", "broadcast", "multicast", "anycast",
    "unreachable", "blackhole", "prohibit", "throw", "nat",
}  # fmt: skip
# Route keywords followed by a value (the rest are single flags: onlink, linkdown...).
_ROUTE_KEYS = {
    "via", "dev", "src", "scope", "metric", "proto", "table", "pref", "mtu", "expires",
    "from", "realms", "error", "hoplimit", "advmss", "weight", "nexthop",
}  # fmt: skip
_LINK_RE = re.compile(
    r"^(?P<index>\d+):\s+(?P<name>[^:@\s]+)(?:@\S+)?:\s+<(?P<flags>[^>]*)>"
    r".*?\bmtu\s+(?P<mtu>\d+)(?:.*?link/\S+\s+(?P<mac>[0-9a-fA-F:]+))?"
)
_ADDR_RE = re.compile(
    r"^\d+:\s+(?P<name>\S+)\s+(?P<family>inet6?)\s+(?P<addr>[^/\s]+)/(?P<len>\d+)"
)


class CommandFailed(Exception):
    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{' '.join(argv)}: exit {returncode}: {stderr.strip()}")
        self.stderr = stderr


# Runs argv to completion within a timeout: (exit code, stdout, stderr); TimeoutError
# when it outlives the timeout.
CommandRunner = Callable[[Sequence[str], float], Awaitable[tuple[int, bytes, bytes]]]


async def run_in_thread(argv: Sequence[str], timeout: float) -> tuple[int, bytes, bytes]:
    """The default runner (tests, host): ``subprocess.run`` in a worker thread, which kills
    the command at the timeout. In the agent, the child reaper's runner is used: its
    ``waitpid(-1)`` would take the child from under ``subprocess.run`` (and asyncio's own
    subprocesses, whose child watcher would race it, are never used)."""
    try:
        proc = await asyncio.to_thread(
            subprocess.run,
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise TimeoutError(f"{argv[0]} did not finish within {timeout}s") from exc
    return proc.returncode, proc.stdout, proc.stderr


class IpCommand:
    """Runs ``ip``/``arp``; the seam through which tests aim at a network namespace.

    ``prefix`` goes before every command (``("ip", "netns", "exec", NAME)``);
    ``ip`` and ``arp`` name the tools (``("busybox", "ip")`` works on the host).
    """

    def __init__(
        self,
        *,
        prefix: Sequence[str] = (),
        ip: Sequence[str] = ("ip",),
        arp: Sequence[str] = ("arp",),
        timeout: float = COMMAND_TIMEOUT,
        runner: CommandRunner = run_in_thread,
    ) -> None:
        self._prefix = tuple(prefix)
        self._ip = tuple(ip)
        self._arp = tuple(arp)
        self._timeout = timeout
        self._runner = runner

    async def ip(self, *args: str) -> str:
        return await self._run((*self._prefix, *self._ip, *args))

    async def arp(self, *args: str) -> str:
        return await self._run((*self._prefix, *self._arp, *args))

    async def _run(self, argv: tuple[str, ...]) -> str:
        try:
            code, out, err = await self._runner(argv, self._timeout)
        except TimeoutError as exc:
            raise Unavailable(f"{' '.join(argv)}: timed out") from exc
        except OSError as exc:
            raise Unavailable(f"{' '.join(argv)}: {exc}") from exc
        except ValueError as exc:  # no exec passes a NUL byte: the request's fault, not ours
            raise InvalidArgument(f"{' '.join(argv)!r}: {exc}") from exc
        if code != 0:
            raise CommandFailed(argv, code, err.decode(errors="replace"))
        return out.decode(errors="replace")


class Link:
    # Not a dataclass nor a NamedTuple (whose ``index`` is tuple's): see ParsedRoute.
    __slots__ = ("flags", "index", "mac", "mtu", "name")

    def __init__(self, index: int, name: str, flags: set[str], mtu: int, mac: str) -> None:
        self.index = index
        self.name = name
        self.flags = flags
        self.mtu = mtu
        self.mac = mac

    @property
    def up(self) -> bool:
        return "UP" in self.flags


def parse_links(text: str) -> list[Link]:
    links = []
    for line in text.splitlines():
        m = _LINK_RE.match(line)
        if m:
            links.append(
                Link(
                    int(m["index"]),
                    m["name"],
                    set(m["flags"].split(",")),
                    int(m["mtu"]),
                    (m["mac"] or "").lower(),
                )
            )
    return links


def parse_addresses(text: str) -> dict[str, list[types_pb2.IPAddress]]:
    by_link: dict[str, list[types_pb2.IPAddress]] = {}
    for line in text.splitlines():
        m = _ADDR_RE.match(line)
        if m:
            family = types_pb2.v6 if m["family"] == "inet6" else types_pb2.v4
            by_link.setdefault(m["name"], []).append(
                types_pb2.IPAddress(family=family, address=m["addr"], mask=m["len"])
            )
    return by_link


# A NamedTuple, not a dataclass: under TCG each dataclass costs the agent's start ~10 ms.
class ParsedRoute(NamedTuple):
    kind: str
    route: types_pb2.Route
    table: str
    metric: str


def parse_routes(text: str, family: int) -> list[ParsedRoute]:
    routes = []
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        kind = "unicast"
        if words[0] in _ROUTE_TYPES:
            kind = words.pop(0)
        if not words:
            continue
        dest = words.pop(0)
        fields: dict[str, str] = {}
        while words:
            word = words.pop(0)
            if word in _ROUTE_KEYS and words:
                fields[word] = words.pop(0)
        scope = fields.get("scope", "global")
        route = types_pb2.Route(
            dest="" if dest == "default" else dest,
            gateway=fields.get("via", ""),
            device=fields.get("dev", ""),
            source=fields.get("src", ""),
            scope=int(scope) if scope.isdigit() else SCOPES.get(scope, 0),
            family=family,  # type: ignore[arg-type]
        )
        routes.append(
            ParsedRoute(kind, route, fields.get("table", "main"), fields.get("metric", ""))
        )
    return routes


def _family_flag(family: int) -> str:
    return "-6" if family == types_pb2.v6 else "-4"


def _is_default(dest: str) -> bool:
    return dest in ("", "default", "0.0.0.0", "0.0.0.0/0", "::", "::/0")


class NetworkService:
    def __init__(self, ip: IpCommand | None = None, *, link_wait: float = LINK_WAIT) -> None:
        self._cmd = ip or IpCommand()
        self._link_wait = link_wait
        self._lock = asyncio.Lock()

    # -- queries -------------------------------------------------------------

    async def _links(self) -> list[Link]:
        return parse_links(await self._cmd.ip("-o", "link"))

    async def _interfaces(self) -> list[types_pb2.Interface]:
        links = await self._links()
        addrs = parse_addresses(await self._cmd.ip("-o", "addr"))
        return [
            types_pb2.Interface(
                name=link.name,
                device=link.name,
                hwAddr=link.mac,
                mtu=link.mtu,
                IPAddresses=addrs.get(link.name, []),
            )
            for link in links
        ]

    async def _routes(self) -> list[ParsedRoute]:
        out = []
        for family in (types_pb2.v4, types_pb2.v6):
            text = await self._cmd.ip(_family_flag(family), "route", "show", "table", "main")
            out += [r for r in parse_routes(text, family) if r.table == "main"]
        return out

    async def ListInterfaces(
        self, ctx: CallContext, req: agent_pb2.ListInterfacesRequest
    ) -> agent_pb2.Interfaces:
        async with self._lock:
            return agent_pb2.Interfaces(Interfaces=await self._interfaces())

    async def ListRoutes(
        self, ctx: CallContext, req: agent_pb2.ListRoutesRequest
    ) -> agent_pb2.Routes:
        async with self._lock:
            routes = await self._routes()
        return agent_pb2.Routes(Routes=[r.route for r in routes if r.kind == "unicast"])

    # -- UpdateInterface -------------------------------------------------------

    async def UpdateInterface(
        self, ctx: CallContext, req: agent_pb2.UpdateInterfaceRequest
    ) -> types_pb2.Interface:
        iface = req.interface
        async with self._lock:
            try:
                return await self._update_interface(iface)
            except CommandFailed as exc:
                raise InvalidArgument(f"update interface {iface.name}: {exc}") from exc

    async def _update_interface(self, iface: types_pb2.Interface) -> types_pb2.Interface:
        links, link = await self._wait_for_link(iface)
        for ip in iface.IPAddresses:
            _check_address(ip)
        if link.up:
            await self._cmd.ip("link", "set", link.name, "down")
        await self._cmd.ip("addr", "flush", "dev", link.name)
        for ip in iface.IPAddresses:
            await self._cmd.ip(
                _family_flag(ip.family), "addr", "add", f"{ip.address}/{ip.mask}", "dev", link.name
            )
        name = link.name
        if iface.name and iface.name != link.name:
            # Another link holding the wanted name is renamed out of the way first.
            clash = next((lk for lk in links if lk.name == iface.name), None)
            if clash is not None:
                await self._cmd.ip("link", "set", clash.name, "down")
                await self._cmd.ip("link", "set", clash.name, "name", f"{clash.name}_temp")
            name = iface.name
        args = ["link", "set", link.name]
        if iface.mtu:
            args += ["mtu", str(iface.mtu)]
        if name != link.name:
            args += ["name", name]
        args += ["arp", "off" if iface.raw_flags & 0x80 else "on"]  # IFF_NOARP
        await self._cmd.ip(*args)
        await self._cmd.ip("link", "set", name, "up")
        current = {i.name: i for i in await self._interfaces()}
        return current.get(name, iface)

    async def _wait_for_link(self, iface: types_pb2.Interface) -> tuple[list[Link], Link]:
        """The links and ``iface``'s own. In a VM cloned from a snapshot, the NICs are
        hot-plugged just after the restore and show up a few hundred ms later: a link
        asked for by MAC is waited for. One asked for by name is not: a hot-plugged
        NIC's name is the kernel's choice, unknown to the host."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._link_wait
        while True:
            links = await self._links()
            try:
                return links, _find_link(links, iface)
            except NotFound:
                if not iface.hwAddr or loop.time() >= deadline:
                    raise
            await asyncio.sleep(LINK_RETRY)

    # -- routes ----------------------------------------------------------------

    async def UpdateRoutes(
        self, ctx: CallContext, req: agent_pb2.UpdateRoutesRequest
    ) -> agent_pb2.Routes:
        wanted = list(req.routes.Routes)
        for route in wanted:
            if not route.device:
                raise InvalidArgument(f"route {route.dest or 'default'} has no device")
        async with self._lock:
            try:
                await self._delete_routes()
                # Routes with no gateway first: the gateways they make reachable come next.
                for route in sorted(wanted, key=lambda r: bool(r.gateway)):
                    await self._add_route(route)
                routes = await self._routes()
            except CommandFailed as exc:
                raise InvalidArgument(f"update routes: {exc}") from exc
        return agent_pb2.Routes(Routes=[r.route for r in routes if r.kind == "unicast"])

    async def _delete_routes(self) -> None:
        addrs = parse_addresses(await self._cmd.ip("-o", "addr"))
        for parsed in await self._routes():
            if parsed.kind != "unicast" or _is_kernel_route(parsed.route, addrs):
                continue
            r = parsed.route
            args = [_family_flag(r.family), "route", "del", r.dest or "default"]
            if r.gateway:
                args += ["via", r.gateway]
            if r.device:
                args += ["dev", r.device]
            if parsed.metric:
                args += ["metric", parsed.metric]
            try:
                await self._cmd.ip(*args)
            except CommandFailed as exc:
                log.warning("route del: %s", exc)

    async def _add_route(self, route: types_pb2.Route) -> None:
        family: int = route.family
        dest = "default" if _is_default(route.dest) else route.dest
        if dest != "default":
            try:
                family = (
                    types_pb2.v6 if ipaddress.ip_network(dest, strict=False).version == 6 else 0
                )
            except ValueError as exc:
                raise InvalidArgument(f"bad route destination {route.dest!r}") from exc
        args = [_family_flag(family), "route", "add", dest]
        if route.gateway:
            args += ["via", route.gateway]
        args += ["dev", route.device]
        if route.source:
            src = route.source.split("/")[0]
            args += ["src", src]
        if route.scope:
            args += ["scope", _SCOPE_NAMES.get(route.scope, str(route.scope))]
        try:
            await self._cmd.ip(*args)
        except CommandFailed as exc:
            if "File exists" not in exc.stderr:
                raise

    # -- neighbours --------------------------------------------------------------

    async def AddARPNeighbors(
        self, ctx: CallContext, req: agent_pb2.AddARPNeighborsRequest
    ) -> Empty:
        async with self._lock:
            for neigh in req.neighbors.ARPNeighbors:
                addr = neigh.toIPAddress.address
                if not addr or not neigh.lladdr or not neigh.device:
                    raise InvalidArgument("neighbour needs an address, lladdr and device")
                try:
                    if ipaddress.ip_address(addr).version == 4:
                        await self._cmd.arp("-i", neigh.device, "-s", addr, neigh.lladdr)
                    else:
                        await self._cmd.ip(
                            "-6", "neigh", "replace", addr, "lladdr", neigh.lladdr,
                            "dev", neigh.device, "nud", "permanent",
                        )  # fmt: skip
                except ValueError as exc:
                    raise InvalidArgument(f"bad neighbour address {addr!r}") from exc
                except CommandFailed as exc:
                    raise InvalidArgument(f"add neighbour {addr}: {exc}") from exc
        return Empty()


def _find_link(links: list[Link], iface: types_pb2.Interface) -> Link:
    if iface.hwAddr:
        mac = iface.hwAddr.lower()
        for link in links:
            if link.mac == mac:
                return link
        raise NotFound(f"no link with MAC {iface.hwAddr}")
    for link in links:
        if link.name in (iface.name, iface.device):
            return link
    raise NotFound(f"no link named {iface.name or iface.device!r}")


def _check_address(ip: types_pb2.IPAddress) -> None:
    try:
        ipaddress.ip_interface(f"{ip.address}/{ip.mask}")
    except ValueError as exc:
        raise InvalidArgument(f"bad address {ip.address}/{ip.mask}") from exc


def _is_kernel_route(route: types_pb2.Route, addrs: dict[str, list[types_pb2.IPAddress]]) -> bool:
    """A route the kernel made itself (busybox does not show ``proto kernel``)."""
    if route.gateway or not route.dest:
        return False
    try:
        dest = ipaddress.ip_network(route.dest, strict=False)
    except ValueError:
        return False
    if dest.version == 6 and dest == ipaddress.ip_network("fe80::/64"):
        return True
    for ip in addrs.get(route.device, []):
        try:
            if ipaddress.ip_interface(f"{ip.address}/{ip.mask}").network == dest:
                return True
        except ValueError:
            continue
    return False
