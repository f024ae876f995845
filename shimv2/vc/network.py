"""The pod network on the host side, in Kata's tc-filter model.

CNI sets up the pod's network namespace before the sandbox starts: ``lo`` and
usually one veth (``eth0``) with addresses, routes and static neighbours. For
each such interface we create a tap ``tap{index}_kata`` in the same namespace
and join the two with tc: an ingress qdisc (``ffff:``) on each, with a u32
match-all filter whose action is ``mirred egress redirect`` to the other. The
veth's own IP stack then sees nothing: every frame arriving on the veth leaves
through the tap to QEMU, and every frame QEMU writes goes out of the veth.
The guest NIC gets the veth's MAC, and the agent gives it the veth's addresses,
routes and neighbours (it finds the NIC by that MAC).

Everything here runs inside the target namespace on a fresh OS thread that
joins it with ``setns(2)`` and then ends, so no thread ever goes back to a
pool in the wrong namespace (trio's worker threads are cached and reused).
The tap is opened from that thread too: ``/dev/net/tun`` binds a tap to the
namespace of whoever opens it.

Kata's sources: ``virtcontainers/network_linux.go`` (``setupTCFiltering``,
``addQdiscIngress``, ``addRedirectTCFilter``, ``generateVCNetworkStructures``,
``validGuestRoute``/``validGuestNeighbor``) and ``veth_endpoint.go``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import logging
import os
import re
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from shimv2.errdefs import (
    DeadlineExceeded,
    Error,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
)
from shimv2.pb.kata import types_pb2
from shimv2.vc.qemu_config import Nic

if TYPE_CHECKING:
    # pyroute2 costs ~20 MiB and 90 ms: imported at run time only when a pod has a netns.
    from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

T = TypeVar("T")

TUN_DEVICE = "/dev/net/tun"
NETNS_TIMEOUT = 10.0

# <linux/sched.h>, <linux/nsfs.h>
CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703
# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
TUNGETIFF = 0x800454D2
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TAP_FLAGS = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
_IFREQ = struct.Struct("16sH22x")
# <linux/if.h>, <linux/neighbour.h>, <linux/rtnetlink.h>, <linux/if_ether.h>
IFF_LOOPBACK = 0x8
IFF_NOARP = 0x80
NUD_PERMANENT = 0x80
RTPROT_KERNEL = 2
RTN_UNICAST = 1
RT_TABLE_MAIN = 254
ETH_P_ALL = 0x0003
INGRESS_PARENT = 0xFFFF0000

_TAP_NAME = re.compile(r"^tap[0-9]+_kata$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_ZERO_MAC = "00:00:00:00:00:00"
_GONE = (errno.ENOENT, errno.ENODEV, errno.EINVAL)


def tap_name(index: int) -> str:
    return f"tap{index}_kata"


# -- what a scan finds ----------------------------------------------------------


def _pb_family(family: int) -> types_pb2.IPFamily:
    return types_pb2.v6 if family == socket.AF_INET6 else types_pb2.v4


@dataclass(frozen=True)
class Address:
    """An address of an interface; ``family`` is ``socket.AF_INET`` or ``AF_INET6``."""

    family: int
    address: str
    prefixlen: int

    @property
    def link_local(self) -> bool:
        return ipaddress.ip_address(self.address).is_link_local

    def to_pb(self) -> types_pb2.IPAddress:
        return types_pb2.IPAddress(
            family=_pb_family(self.family), address=self.address, mask=str(self.prefixlen)
        )


@dataclass(frozen=True)
class Route:
    """A main-table unicast route through the interface; ``dest`` is "" for a default route."""

    family: int
    dest: str
    gateway: str
    device: str
    source: str
    scope: int
    flags: int = 0
    mtu: int = 0

    def to_pb(self) -> types_pb2.Route:
        return types_pb2.Route(
            dest=self.dest,
            gateway=self.gateway,
            device=self.device,
            source=self.source,
            scope=self.scope,
            family=_pb_family(self.family),
            flags=self.flags,
            mtu=self.mtu,
        )


@dataclass(frozen=True)
class Neighbor:
    """A permanent (static) neighbour entry on the interface."""

    family: int
    address: str
    lladdr: str
    device: str
    state: int
    flags: int

    def to_pb(self) -> types_pb2.ARPNeighbor:
        return types_pb2.ARPNeighbor(
            toIPAddress=types_pb2.IPAddress(family=_pb_family(self.family), address=self.address),
            device=self.device,
            lladdr=self.lladdr,
            state=self.state,
            flags=self.flags,
        )


@dataclass(frozen=True)
class Endpoint:
    """One interface of the pod netns, as CNI left it (Kata's ``NetworkInfo``)."""

    name: str
    index: int
    kind: str
    mac: str
    mtu: int
    raw_flags: int
    addresses: tuple[Address, ...] = ()
    routes: tuple[Route, ...] = ()
    neighbors: tuple[Neighbor, ...] = ()

    def to_interface(self, device_path: str = "") -> types_pb2.Interface:
        """The agent's ``Interface``: matched in the guest by ``hwAddr``.

        IPv6 link-local addresses are left out: the guest kernel derives its own
        from the same MAC when the link comes up.
        """
        return types_pb2.Interface(
            device=self.name,
            name=self.name,
            IPAddresses=[a.to_pb() for a in self.addresses if not a.link_local],
            mtu=self.mtu,
            hwAddr=self.mac,
            devicePath=device_path,
            type=self.kind,
            raw_flags=self.raw_flags & IFF_NOARP,
        )

    def to_routes(self) -> list[types_pb2.Route]:
        return [r.to_pb() for r in self.routes]

    def to_neighbors(self) -> list[types_pb2.ARPNeighbor]:
        return [n.to_pb() for n in self.neighbors]


@dataclass
class TapAttachment:
    """A tap joined to an endpoint by tc; ``fd`` is the open tap queue for QEMU.

    ``fd`` is -1 once closed (or when rebuilt after a crash, only to detach).
    The guest NIC must use ``mac`` (the veth's), so the agent can find it.
    """

    index: int
    endpoint: Endpoint
    fd: int = -1
    tap: str = field(default="")

    def __post_init__(self) -> None:
        if not self.tap:
            self.tap = tap_name(self.index)

    @property
    def mac(self) -> str:
        return self.endpoint.mac

    @property
    def netdev_id(self) -> str:
        return f"net{self.index}"

    def nic(self) -> Nic:
        """The guest NIC on this tap, for QEMU (given ``fd`` with the same number)."""
        return Nic(self.netdev_id, self.fd, self.mac)

    def close(self) -> None:
        """Close our tap fd (QEMU keeps its own copy); idempotent."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


# -- running in a namespace -------------------------------------------------------


def _open_netns(netns_path: str) -> int:
    if not netns_path or not os.path.isabs(netns_path):
        raise InvalidArgument(f"network namespace path must be absolute, not {netns_path!r}")
    try:
        fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NotFound(f"network namespace {netns_path} does not exist") from exc
    except OSError as exc:
        raise InvalidArgument(f"network namespace {netns_path}: {exc.strerror}") from exc
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        kind = -1
    if kind != CLONE_NEWNET:
        os.close(fd)
        raise InvalidArgument(f"{netns_path} is not a network namespace")
    return fd


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def run_in_netns(netns_path: str, fn: Callable[[], T], *, timeout: float = NETNS_TIMEOUT) -> T:
    """Call ``fn`` on a new thread inside the namespace at ``netns_path``; blocking.

    Error handling: a missing path raises ``NotFound``, a file that is not a
    network namespace ``InvalidArgument``; ``fn``'s own exception is re-raised;
    ``DeadlineExceeded`` if it takes longer than ``timeout`` (the thread is
    then left to finish on its own).
    """
    ns_fd = _open_netns(netns_path)
    outcome: list[tuple[bool, Any]] = []

    def body() -> None:
        try:
            _setns(ns_fd)
            outcome.append((True, fn()))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=body, name=f"netns {netns_path}", daemon=True)
    try:
        thread.start()
    except BaseException:
        os.close(ns_fd)
        raise
    thread.join(timeout)
    if not outcome:
        # The thread still holds the namespace fd; it is left to the process.
        raise DeadlineExceeded(f"network namespace {netns_path}: no answer in {timeout:.0f} s")
    os.close(ns_fd)
    ok, value = outcome[0]
    if ok:
        return value  # type: ignore[no-any-return]
    raise value


def _netlink_error(what: str, exc: NetlinkError) -> Error:
    code = exc.code
    text = os.strerror(code) if code else str(exc)
    if code in (errno.ENODEV, errno.ENOENT):
        return NotFound(f"{what}: {text}")
    if code in (errno.EEXIST, errno.EBUSY):
        return FailedPrecondition(f"{what}: {text}")
    return Internal(f"{what}: {text}")


def _ipr() -> Any:
    from pyroute2 import IPRoute

    # groups=0: no multicast subscription, so no events pile up unread.
    return IPRoute(groups=0)


# -- scan ---------------------------------------------------------------------------


def scan(netns_path: str) -> list[Endpoint]:
    """The interfaces CNI configured in the namespace: not ``lo``, not our taps.

    As in Kata, interfaces with no address are skipped (the fallback tunnel
    devices such as ``gre0``/``sit0`` look like that), and so are those
    without an Ethernet MAC. Routes are the main table's unicast routes out of
    the interface, except the kernel's own (prefix routes of addresses);
    neighbours are the permanent ones.
    """
    return run_in_netns(netns_path, _scan_here)


def _scan_here() -> list[Endpoint]:
    with _ipr() as ipr:
        links = ipr.get_links()
        addrs = ipr.get_addr()
        routes = ipr.get_routes(table=RT_TABLE_MAIN)
        neighs = ipr.get_neighbours()
    by_index: dict[int, list[Address]] = {}
    for msg in addrs:
        value = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        if value is None or ipaddress.ip_address(value).is_loopback:
            continue
        by_index.setdefault(msg["index"], []).append(
            Address(family=msg["family"], address=value, prefixlen=msg["prefixlen"])
        )
    endpoints = []
    for link in links:
        name: str = link.get("IFLA_IFNAME") or ""
        mac: str = (link.get("IFLA_ADDRESS") or "").lower()
        index: int = link["index"]
        if link["flags"] & IFF_LOOPBACK or _TAP_NAME.match(name):
            continue
        if not _MAC.match(mac) or mac == _ZERO_MAC or not by_index.get(index):
            continue
        endpoints.append(
            Endpoint(
                name=name,
                index=index,
                kind=link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or "",
                mac=mac,
                mtu=link.get("IFLA_MTU") or 0,
                raw_flags=link["flags"],
                addresses=tuple(by_index[index]),
                routes=tuple(_routes_of(routes, index, name)),
                neighbors=tuple(_neighbors_of(neighs, index, name)),
            )
        )
    return endpoints


def _routes_of(msgs: Sequence[Any], index: int, name: str) -> list[Route]:
    out = []
    for msg in msgs:
        if msg.get("RTA_OIF") != index or msg["proto"] == RTPROT_KERNEL:
            continue
        if msg["type"] != RTN_UNICAST or msg.get("RTA_TABLE", msg["table"]) != RT_TABLE_MAIN:
            continue
        dst = msg.get("RTA_DST")
        mtu = msg.get_nested("RTA_METRICS", "RTAX_MTU") or 0
        out.append(
            Route(
                family=msg["family"],
                dest=f"{dst}/{msg['dst_len']}" if dst and msg["dst_len"] else "",
                gateway=msg.get("RTA_GATEWAY") or "",
                device=name,
                source=msg.get("RTA_PREFSRC") or "",
                scope=msg["scope"],
                flags=msg["flags"],
                mtu=mtu,
            )
        )
    return out


def _neighbors_of(msgs: Sequence[Any], index: int, name: str) -> list[Neighbor]:
    return [
        Neighbor(
            family=msg["family"],
            address=msg.get("NDA_DST"),
            lladdr=(msg.get("NDA_LLADDR") or "").lower(),
            device=name,
            state=msg["state"],
            flags=msg["flags"],
        )
        for msg in msgs
        if msg["ifindex"] == index and msg["state"] == NUD_PERMANENT and msg.get("NDA_DST")
    ]


# -- attach / detach --------------------------------------------------------------------


def attach(netns_path: str, endpoint: Endpoint, index: int) -> TapAttachment:
    """Create ``tap{index}_kata`` next to ``endpoint`` and redirect both ways with tc.

    The tap is single-queue, persistent and owned by root, with the veth's MTU,
    and is opened ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``; the returned
    attachment holds that fd (close-on-exec: pass it to QEMU explicitly).

    Error handling: ``NotFound`` if the endpoint is gone; ``FailedPrecondition``
    if the tap name is taken or the veth already has an ingress qdisc;
    ``Internal`` for other netlink or tun errors. On any error everything made
    so far is undone.
    """
    if index < 0 or index > 9999:
        raise InvalidArgument(f"tap index must be 0..9999, not {index}")
    if endpoint.mtu <= 0:
        raise InvalidArgument(f"endpoint {endpoint.name} has no MTU")
    tap = tap_name(index)
    fd = run_in_netns(netns_path, lambda: _attach_here(endpoint, tap))
    return TapAttachment(index=index, endpoint=endpoint, fd=fd, tap=tap)


def _open_tap(name: str) -> int:
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(name.encode(), TAP_FLAGS))
        fcntl.ioctl(fd, TUNSETOWNER, 0)
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EBUSY, errno.EINVAL, errno.EEXIST):
            raise FailedPrecondition(f"tap {name}: {exc.strerror} (name taken?)") from exc
        raise Internal(f"tap {name}: {exc.strerror}") from exc
    return fd


def _attach_here(endpoint: Endpoint, tap: str) -> int:
    from pyroute2.netlink.exceptions import NetlinkError

    with _ipr() as ipr:
        veth = _link_index(ipr, endpoint.name)
        if veth is None:
            raise NotFound(f"interface {endpoint.name} is gone from the network namespace")
        if _link_index(ipr, tap) is not None:
            raise FailedPrecondition(f"tap {tap} already exists")
        fd = _open_tap(tap)
        veth_ingress = False
        step = f"find {tap}"
        try:
            tap_index = _link_index(ipr, tap)
            if tap_index is None:
                raise Internal(f"tap {tap} vanished after creation")
            step = f"set {tap} up"
            ipr.link("set", index=tap_index, mtu=endpoint.mtu, state="up")
            step = f"add ingress qdisc on {tap}"
            ipr.tc("add", "ingress", tap_index, INGRESS_PARENT)
            step = f"add ingress qdisc on {endpoint.name}"
            ipr.tc("add", "ingress", veth, INGRESS_PARENT)
            veth_ingress = True
            step = f"add redirect filter on {endpoint.name}"
            _add_redirect(ipr, veth, tap_index)
            step = f"add redirect filter on {tap}"
            _add_redirect(ipr, tap_index, veth)
        except BaseException as exc:
            # Undo exactly what was made: the tap takes its own qdisc and filter along.
            try:
                if veth_ingress:
                    _del_ingress(ipr, veth, endpoint.name)
                _del_link(ipr, tap)
            except Exception as undo:
                log.warning("undo attach of %s: %s", tap, undo)
            os.close(fd)
            if isinstance(exc, NetlinkError):
                raise _netlink_error(step, exc) from exc
            raise
    return fd


def _add_redirect(ipr: Any, src: int, dst: int) -> None:
    """``tc filter add dev SRC parent ffff: protocol all u32 match u8 0 0
    action mirred egress redirect dev DST``."""
    ipr.tc(
        "add-filter",
        "u32",
        src,
        parent=INGRESS_PARENT,
        protocol=ETH_P_ALL,
        target=0,
        keys=["0x0/0x0+0"],
        action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": dst},
    )


def _link_index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def _del_ingress(ipr: Any, index: int, name: str) -> None:
    """Delete the ingress qdisc of ``index``; its filters go with it."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        ipr.tc("del", "ingress", index, INGRESS_PARENT)
    except NetlinkError as exc:
        if exc.code not in _GONE:
            raise _netlink_error(f"delete ingress qdisc on {name}", exc) from exc


def _del_link(ipr: Any, name: str) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    index = _link_index(ipr, name)
    if index is None:
        return
    try:
        ipr.link("del", index=index)
    except NetlinkError as exc:
        if exc.code not in _GONE:
            raise _netlink_error(f"delete {name}", exc) from exc


def tap_fd_name(fd: int) -> str:
    """The interface a tap fd is attached to (``TUNGETIFF``)."""
    raw = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ.size))
    name, _flags = _IFREQ.unpack(raw)
    return bytes(name).rstrip(b"\0").decode()


def detach(netns_path: str, attachment: TapAttachment) -> None:
    """Undo ``attach``: filters, ingress qdiscs, the tap, our fd. Idempotent.

    If the namespace is already gone (or its path no longer a namespace) there
    is nothing left to remove but our fd.
    """
    try:
        cleanup(netns_path, attachment.index, attachment.endpoint.name)
    finally:
        attachment.close()


def cleanup(netns_path: str, index: int, veth: str) -> None:
    """Remove what ``attach`` made for ``index``/``veth``, from names alone.

    For ``delete`` after a crash, when no fd or scan is left. Idempotent.
    """
    if not os.path.isabs(netns_path):
        raise InvalidArgument(f"network namespace path must be absolute, not {netns_path!r}")
    try:
        run_in_netns(netns_path, lambda: _teardown_here(tap_name(index), veth))
    except (NotFound, InvalidArgument) as exc:
        # The namespace is gone (``ip netns del`` may leave a plain file behind
        # for a moment), and the tap and filters with it.
        log.debug("cleanup in %s: %s", netns_path, exc)


def _teardown_here(tap: str, veth: str) -> None:
    with _ipr() as ipr:
        veth_index = _link_index(ipr, veth)
        tap_index = _link_index(ipr, tap)
        # The veth's side first, so nothing is redirected to a dying tap. Its
        # ingress qdisc is removed only if its filters are ours: redirecting to
        # this tap, or to nothing once the tap is gone.
        if veth_index is not None and _redirects_to(ipr, veth_index, tap_index):
            _del_ingress(ipr, veth_index, veth)
        # Deleting the tap takes its qdisc and filter with it.
        _del_link(ipr, tap)


def _redirects_to(ipr: Any, index: int, tap_index: int | None) -> bool:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        filters = ipr.get_filters(index=index, parent=INGRESS_PARENT)
    except NetlinkError as exc:
        if exc.code in _GONE:
            return False
        raise _netlink_error("list ingress filters", exc) from exc
    targets = [t for msg in filters for t in _mirred_targets(msg)]
    if not targets:
        return False
    if tap_index is not None:
        return tap_index in targets
    existing = {link["index"] for link in ipr.get_links()}
    return all(t == 0 or t not in existing for t in targets)


def _mirred_targets(msg: Any) -> list[int]:
    acts = msg.get_nested("TCA_OPTIONS", "TCA_U32_ACT")
    if acts is None:
        return []
    out = []
    for _name, act in acts.get("attrs", []):
        parms = act.get_nested("TCA_ACT_OPTIONS", "TCA_MIRRED_PARMS")
        if parms is not None:
            out.append(int(parms["ifindex"]))
    return out


# -- async API for the sandbox ------------------------------------------------------------


async def add_interfaces(netns_path: str) -> list[TapAttachment]:
    """Scan the pod netns and attach a tap to every endpoint, ``tap0_kata`` first.

    All or nothing: if one attach fails, the taps already made are detached.
    """
    endpoints = await trio.to_thread.run_sync(scan, netns_path)
    attachments: list[TapAttachment] = []
    try:
        for i, endpoint in enumerate(endpoints):
            attachments.append(await trio.to_thread.run_sync(attach, netns_path, endpoint, i))
    except BaseException:
        with trio.CancelScope(shield=True):
            await remove_interfaces(netns_path, attachments)
        raise
    return attachments


async def remove_interfaces(netns_path: str, attachments: Sequence[TapAttachment]) -> None:
    """Detach every attachment; the first error is raised after trying them all."""
    first: BaseException | None = None
    for attachment in attachments:
        try:
            await trio.to_thread.run_sync(detach, netns_path, attachment)
        except Exception as exc:
            log.warning("detach %s in %s: %s", attachment.tap, netns_path, exc)
            first = first or exc
    if first is not None:
        raise first
