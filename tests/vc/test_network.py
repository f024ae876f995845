"""The tc-filter network with real namespaces, veths, taps and frames (needs root)."""

from __future__ import annotations

import json
import os
import random
import socket
import stat
import struct
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import trio

from shimv2.errdefs import FailedPrecondition, InvalidArgument, NotFound
from shimv2.pb.kata import types_pb2
from shimv2.vc import network
from shimv2.vc.network import (
    Endpoint,
    TapAttachment,
    add_interfaces,
    attach,
    detach,
    remove_interfaces,
    scan,
    tap_fd_name,
)
from shimv2.vc.qemu_config import Nic

ETH_P_ARP = 0x0806
ETH_P_TEST = 0x88B5  # IEEE local experimental
VNET_HDR_LEN = 10  # struct virtio_net_hdr, the size a tap uses by default
GUEST_MTU = 1400


def _sh(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


@dataclass(frozen=True)
class Pod:
    name: str
    path: str
    host_if: str
    subnet: int
    mac: str
    gw_mac: str = "02:00:00:00:00:01"

    @property
    def ip(self) -> str:
        return f"10.77.{self.subnet}.2"

    @property
    def gateway(self) -> str:
        return f"10.77.{self.subnet}.1"

    def ns(self, *argv: str, check: bool = True) -> str:
        return _sh("ip", "netns", "exec", self.name, *argv, check=check)


@pytest.fixture
def pod() -> Iterator[Pod]:
    """A CNI-like pod netns: eth0 (a veth) with v4+v6 addresses, default routes, a neighbour."""
    tag = uuid.uuid4().hex[:8]
    name, host_if, subnet = f"kpy-{tag}", f"kpyh{tag}", random.randint(1, 250)
    try:
        _sh("ip", "netns", "add", name)
        _sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", f"kpyp{tag}")
        _sh("ip", "link", "set", f"kpyp{tag}", "netns", name)
        _sh("ip", "link", "set", host_if, "up")
        for cmd in (
            f"link set kpyp{tag} name eth0",
            f"link set eth0 mtu {GUEST_MTU} up",
            f"addr add 10.77.{subnet}.2/24 dev eth0",
            "-6 addr add fd00::2/64 dev eth0 nodad",
            f"route add default via 10.77.{subnet}.1",
            "-6 route add default via fd00::1",
            f"neigh add 10.77.{subnet}.1 lladdr 02:00:00:00:00:01 dev eth0 nud permanent",
        ):
            _sh("ip", "-n", name, *cmd.split())
        link = json.loads(_sh("ip", "-n", name, "-j", "link", "show", "eth0"))[0]
        yield Pod(name, f"/var/run/netns/{name}", host_if, subnet, link["address"])
    finally:
        _sh("ip", "netns", "del", name, check=False)
        _sh("ip", "link", "del", host_if, check=False)
    assert not os.path.exists(f"/var/run/netns/{name}")
    assert _sh("ip", "link", "show", host_if, check=False) == ""


def _taps(pod: Pod) -> list[str]:
    links = json.loads(_sh("ip", "-n", pod.name, "-j", "link", "show"))
    return [link["ifname"] for link in links if link["ifname"].endswith("_kata")]


def _ingress(pod: Pod, dev: str) -> str:
    return pod.ns("tc", "qdisc", "show", "dev", dev, "ingress")


# -- scan ------------------------------------------------------------------------------


async def test_scan_finds_eth0_with_addresses_routes_and_neighbour(pod: Pod) -> None:
    endpoints = scan(pod.path)
    assert [e.name for e in endpoints] == ["eth0"]
    ep = endpoints[0]
    assert (ep.mac, ep.mtu, ep.kind) == (pod.mac, GUEST_MTU, "veth")
    addrs = {(a.family, a.address, a.prefixlen) for a in ep.addresses}
    assert {(socket.AF_INET, pod.ip, 24), (socket.AF_INET6, "fd00::2", 64)} <= addrs
    defaults = {(r.family, r.gateway) for r in ep.routes if r.dest == ""}
    assert defaults == {(socket.AF_INET, pod.gateway), (socket.AF_INET6, "fd00::1")}
    # The kernel's prefix routes (10.77.x.0/24, fd00::/64) are the guest kernel's job.
    assert all(r.device == "eth0" for r in ep.routes)
    assert len(ep.routes) == 2
    neigh = [(n.address, n.lladdr) for n in ep.neighbors]
    assert neigh == [(pod.gateway, pod.gw_mac)]


async def test_protobuf_conversion(pod: Pod) -> None:
    (ep,) = scan(pod.path)
    iface = ep.to_interface()
    assert (iface.name, iface.device, iface.hwAddr, iface.mtu) == ("eth0", "eth0", pod.mac, 1400)
    assert iface.type == "veth"
    assert iface.raw_flags == 0  # IFF_NOARP is off
    ips = {(ip.family, ip.address, ip.mask) for ip in iface.IPAddresses}
    assert ips == {(types_pb2.v4, pod.ip, "24"), (types_pb2.v6, "fd00::2", "64")}  # no fe80::
    routes = {(r.family, r.dest, r.gateway, r.device, r.scope) for r in ep.to_routes()}
    assert routes == {
        (types_pb2.v4, "", pod.gateway, "eth0", 0),
        (types_pb2.v6, "", "fd00::1", "eth0", 0),
    }
    (arp,) = ep.to_neighbors()
    assert arp.toIPAddress.address == pod.gateway
    assert arp.toIPAddress.family == types_pb2.v4
    assert (arp.device, arp.lladdr, arp.state) == ("eth0", pod.gw_mac, network.NUD_PERMANENT)
    # And they survive the wire.
    again = types_pb2.Interface.FromString(iface.SerializeToString())
    assert again == iface


async def test_bad_namespace_paths() -> None:
    with pytest.raises(NotFound, match="does not exist"):
        scan("/var/run/netns/kpy-no-such-ns")
    with pytest.raises(InvalidArgument, match="not a network namespace"):
        scan("/etc/hostname")
    with pytest.raises(InvalidArgument, match="not a network namespace"):
        scan(f"/proc/{os.getpid()}/ns/mnt")
    with pytest.raises(InvalidArgument, match="absolute"):
        scan("var/run/netns/x")
    with pytest.raises(NotFound):
        await add_interfaces("/var/run/netns/kpy-no-such-ns")


async def test_scan_via_proc_pid_path(pod: Pod) -> None:
    proc = await trio.lowlevel.open_process(
        ["ip", "netns", "exec", pod.name, "sh", "-c", "echo ready; exec sleep 30"],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        with trio.fail_after(5):  # the shell runs inside the netns once it speaks
            assert await proc.stdout.receive_some() == b"ready\n"
        path = f"/proc/{proc.pid}/ns/net"
        assert [e.mac for e in scan(path)] == [pod.mac]
    finally:
        proc.kill()
        await proc.wait()


# -- attach / detach -------------------------------------------------------------------


async def test_attach_creates_tap_qdiscs_and_filters(pod: Pod) -> None:
    (ep,) = scan(pod.path)
    att = attach(pod.path, ep, 0)
    try:
        assert att.tap == "tap0_kata"
        assert att.mac == pod.mac
        assert stat.S_ISCHR(os.fstat(att.fd).st_mode)
        assert tap_fd_name(att.fd) == "tap0_kata"
        assert _taps(pod) == ["tap0_kata"]
        details = pod.ns("ip", "-d", "link", "show", "tap0_kata")
        for word in (
            "vnet_hdr on",
            "pi off",
            "persist on",
            "user root",
            f"mtu {GUEST_MTU}",
            ",UP,",
        ):
            assert word in details
        assert "multi_queue" not in details
        for dev, peer in (("eth0", "tap0_kata"), ("tap0_kata", "eth0")):
            assert "qdisc ingress ffff:" in _ingress(pod, dev)
            filters = pod.ns("tc", "filter", "show", "dev", dev, "ingress")
            assert "protocol all pref 49152 u32" in filters
            assert "match 00000000/00000000 at 0" in filters
            assert f"mirred (Egress Redirect to device {peer})" in filters
        # Our own tap is not an endpoint on a second scan.
        assert [e.name for e in scan(pod.path)] == ["eth0"]
        with pytest.raises(FailedPrecondition, match="tap0_kata"):
            attach(pod.path, ep, 0)
    finally:
        detach(pod.path, att)
    assert att.fd == -1
    assert _taps(pod) == []
    for dev in ("eth0",):
        assert _ingress(pod, dev) == ""
        assert pod.ns("tc", "filter", "show", "dev", dev, "ingress") == ""
    detach(pod.path, att)  # idempotent


async def test_attach_refuses_foreign_ingress_and_undoes(pod: Pod) -> None:
    (ep,) = scan(pod.path)
    pod.ns("tc", "qdisc", "add", "dev", "eth0", "ingress")
    with pytest.raises(FailedPrecondition, match="ingress qdisc on eth0"):
        attach(pod.path, ep, 3)
    assert _taps(pod) == []
    assert "ingress" in _ingress(pod, "eth0")  # not ours: left alone
    network.cleanup(pod.path, 3, "eth0")
    assert "ingress" in _ingress(pod, "eth0")


async def test_attach_gone_interface(pod: Pod) -> None:
    (ep,) = scan(pod.path)
    with pytest.raises(NotFound, match="eth9"):
        attach(pod.path, Endpoint(**{**ep.__dict__, "name": "eth9"}), 0)
    with pytest.raises(InvalidArgument):
        attach(pod.path, ep, -1)
    assert _taps(pod) == []


def _frame(dst: str, src: str, ethertype: int, payload: bytes) -> bytes:
    macs = bytes.fromhex(dst.replace(":", "") + src.replace(":", ""))
    return macs + struct.pack("!H", ethertype) + payload


def _arp_request(src_mac: str, src_ip: str, target_ip: str) -> bytes:
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)  # ethernet/IPv4, request
    arp += bytes.fromhex(src_mac.replace(":", "")) + socket.inet_aton(src_ip)
    arp += bytes(6) + socket.inet_aton(target_ip)
    return _frame("ff:ff:ff:ff:ff:ff", src_mac, ETH_P_ARP, arp)


async def _read_tap_until(fd: int, wanted: bytes) -> bytes:
    with trio.fail_after(2):
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                packet = os.read(fd, 65536)
            except BlockingIOError:
                continue
            frame = packet[VNET_HDR_LEN:]
            if wanted in frame:
                return frame


async def _recv_until(sock: socket.socket, wanted: bytes) -> bytes:
    with trio.fail_after(2):
        while True:
            await trio.lowlevel.wait_readable(sock)
            frame = sock.recv(65536)
            if wanted in frame:
                return frame


async def test_redirect_carries_real_frames_both_ways(pod: Pod) -> None:
    host_mac = json.loads(_sh("ip", "-j", "link", "show", pod.host_if))[0]["address"]
    (ep,) = scan(pod.path)
    request = _arp_request(host_mac, pod.gateway, pod.ip)
    # The sender/target part of the pod's ARP reply to us.
    arp_reply = bytes.fromhex(pod.mac.replace(":", "")) + socket.inet_aton(pod.ip)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    sock.bind((pod.host_if, 0))
    sock.setblocking(False)
    # Before: the netns' own stack answers the ARP request.
    sock.send(request)
    await _recv_until(sock, arp_reply)
    att = attach(pod.path, ep, 0)
    try:
        os.set_blocking(att.fd, False)
        # After: host -> eth0 ingress -> tap. The filter steals the request, so
        # only the tap (the guest) gets it and the netns stack stays silent.
        sock.send(request)
        frame = await _read_tap_until(att.fd, request[14:])
        assert frame.startswith(request)
        with trio.move_on_after(0.3) as waited:
            await _recv_until(sock, arp_reply)
        assert waited.cancelled_caught, "the netns stack answered: the filter did not steal"
        # tap -> its ingress -> eth0 egress -> host: what the guest would send.
        marker = uuid.uuid4().bytes
        reply = _frame(host_mac, pod.mac, ETH_P_TEST, marker + bytes(46))
        os.write(att.fd, bytes(VNET_HDR_LEN) + reply)
        got = await _recv_until(sock, marker)
        assert got[:14] == reply[:14]
        stats = pod.ns("tc", "-s", "filter", "show", "dev", "tap0_kata", "ingress")
        assert "Sent 0 bytes" not in stats
    finally:
        sock.close()
        detach(pod.path, att)
    assert _taps(pod) == []


async def test_detach_after_namespace_is_gone(pod: Pod) -> None:
    (ep,) = scan(pod.path)
    att = attach(pod.path, ep, 1)
    fd = att.fd
    _sh("ip", "netns", "del", pod.name)
    detach(pod.path, att)  # nothing to do but close our fd
    assert att.fd == -1
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)
    detach(pod.path, att)


# -- async API ---------------------------------------------------------------------------


async def test_add_and_remove_interfaces(pod: Pod) -> None:
    attachments = await add_interfaces(pod.path)
    try:
        assert [(a.tap, a.mac, a.endpoint.name) for a in attachments] == [
            ("tap0_kata", pod.mac, "eth0")
        ]
        assert _taps(pod) == ["tap0_kata"]
    finally:
        await remove_interfaces(pod.path, attachments)
    assert _taps(pod) == []
    assert _ingress(pod, "eth0") == ""
    assert all(a.fd == -1 for a in attachments)
    await remove_interfaces(pod.path, attachments)


# -- QEMU ----------------------------------------------------------------------------


def test_a_tap_gives_qemu_its_nic() -> None:
    ep = Endpoint(name="eth0", index=2, kind="veth", mac="02:42:ac:11:00:02", mtu=1500, raw_flags=0)
    nic = TapAttachment(index=1, endpoint=ep, fd=7).nic()
    assert nic == Nic("net1", 7, "02:42:ac:11:00:02")
    assert [*nic.netdev_args(), *nic.device_args("microvm")] == [
        "-netdev", "tap,id=net1,fd=7",
        "-device", "virtio-net-device,netdev=net1,mac=02:42:ac:11:00:02",
    ]  # fmt: skip
    assert nic.device_args("q35") == [
        "-device", "virtio-net-pci,netdev=net1,mac=02:42:ac:11:00:02,romfile="
    ]  # fmt: skip
    assert nic.device_add("rp1") == {
        "driver": "virtio-net-pci", "bus": "rp1", "netdev": "net1",
        "mac": "02:42:ac:11:00:02", "romfile": "",
    }  # fmt: skip
    nic.validate()
    with pytest.raises(FailedPrecondition):
        TapAttachment(index=1, endpoint=ep).nic().validate()  # its tap is closed
    for bad in (Nic("net1", 7, "02:42:ac:11:00:02,romfile=x"), Nic("n,x=1", 7, ep.mac)):
        with pytest.raises(InvalidArgument):  # a comma would add QEMU options
            bad.validate()


@pytest.mark.parametrize("machine", ["microvm", "q35"])
async def test_qemu_accepts_the_tap_fd(pod: Pod, machine: str) -> None:
    """A real (paused, kernel-less) QEMU takes the fd and shows the veth's MAC on the NIC."""
    (ep,) = scan(pod.path)
    att = attach(pod.path, ep, 0)
    try:
        qmp = "".join(
            json.dumps({"execute": cmd}) + "\n"
            for cmd in ("qmp_capabilities", "query-rx-filter", "quit")
        )
        argv = [
            "qemu-system-x86_64", "-M", machine, "-S", "-nodefaults", "-display", "none",
            "-qmp", "stdio", *att.nic().netdev_args(), *att.nic().device_args(machine),
        ]  # fmt: skip
        with trio.fail_after(20):
            done = await trio.run_process(
                argv, stdin=qmp.encode(), capture_stdout=True, capture_stderr=True,
                check=False, pass_fds=(att.fd,),
            )  # fmt: skip
        replies = [json.loads(line) for line in done.stdout.decode().splitlines() if line]
        filters = next(r["return"] for r in replies if isinstance(r.get("return"), list))
        assert [f["main-mac"] for f in filters] == [pod.mac], done.stderr
    finally:
        detach(pod.path, att)


async def test_no_fd_or_thread_leak_over_many_cycles(pod: Pod) -> None:
    (ep,) = scan(pod.path)
    attach(pod.path, ep, 0).close()  # warm up pyroute2's lazy imports
    network.cleanup(pod.path, 0, "eth0")
    fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
    for i in range(20):
        att = attach(pod.path, ep, i % 3)
        detach(pod.path, att)
    assert len(os.listdir("/proc/self/fd")) == fds
    assert threading.active_count() == threads
    assert _taps(pod) == []
    assert _ingress(pod, "eth0") == ""


async def test_detach_when_tap_was_deleted_behind_our_back(pod: Pod) -> None:
    (ep,) = scan(pod.path)
    att = attach(pod.path, ep, 0)
    att.close()
    pod.ns("ip", "link", "del", "tap0_kata")
    assert "ingress" in _ingress(pod, "eth0")  # a redirect to nowhere is left
    detach(pod.path, att)
    assert _ingress(pod, "eth0") == ""
    with pytest.raises(InvalidArgument):
        network.cleanup("relative/path", 0, "eth0")
