"""Port-forward into a VM pod: a relay on the loopback of the pod's network namespace.

containerd (1.6 to 2.4) forwards a port (``kubectl port-forward``, CRI
``PortForward``) by dialling ``localhost:<port>`` inside the pod's network
namespace on the host. For a VM pod nothing listens there: the containers'
loopback is the guest's, and the namespace holds only the tap and the tc
redirect. So the shim listens on one port of 127.0.0.1 in that namespace, and
an iptables ``REDIRECT`` in the namespace's nat OUTPUT chain sends every other
TCP connection to 127.0.0.1 there. For each connection the relay reads the
port that was asked for (``SO_ORIGINAL_DST``), opens a stream to the agent's
forward port (``shimv2.guest_protocol``, vsock only), names the port, and
copies bytes both ways once the guest answers OK (``shimv2.relay``).

Trust: the relay only ever connects to the guest, never where the guest says;
the guest's answer is bounded and must be exactly OK. A pod whose agent is on
the serial port, or a host without iptables, gets no forward (logged): the
dial then fails in containerd as it did before.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from shimv2.errdefs import Error, Internal
from shimv2.guest_protocol import FORWARD_OK, FORWARD_REPLY_MAX
from shimv2.relay import Gate, read_line, splice
from shimv2.vc.mountns import NSENTER
from shimv2.vc.network import run_in_netns

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h, at SOL_IP
MAX_CONNECTIONS = 64
GUEST_TIMEOUT = 10.0  # to reach the guest's forward port and hear its answer
RULE_COMMENT = "kata-py port-forward"

DialGuest = Callable[[], Awaitable[trio.abc.Stream]]


def redirect_rule(relay_port: int) -> list[str]:
    """The nat OUTPUT rule (after ``-A``/``-D``) that sends loopback TCP to the relay."""
    return [
        "OUTPUT", "-o", "lo", "-p", "tcp", "-d", "127.0.0.1", "!", "--dport", str(relay_port),
        "-m", "comment", "--comment", RULE_COMMENT, "-j", "REDIRECT", "--to-ports", str(relay_port),
    ]  # fmt: skip


def original_port(sock: socket.socket | trio.socket.SocketType) -> int:
    """The port a redirected connection was made to (``struct sockaddr_in``'s port)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    (family,) = struct.unpack_from("=H", raw)
    (port,) = struct.unpack_from("!H", raw, 2)
    if family != socket.AF_INET:
        raise OSError(f"not an IPv4 original destination (family {family})")
    return int(port)


@dataclass
class PortForward:
    """One pod's relay: its listener in the pod's namespace and the rule that feeds it."""

    netns: str
    listener: trio.socket.SocketType
    port: int  # the listener's, kept for the rule's removal after it is closed
    iptables: str

    @classmethod
    async def start(cls, netns: str, iptables: str | None = None) -> PortForward:
        """Listen in ``netns`` and redirect its loopback TCP to us; Internal if it cannot."""
        iptables = iptables or shutil.which("iptables") or ""
        if not iptables:
            raise Internal("port-forward needs iptables, and there is none")

        def listen() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.bind(("127.0.0.1", 0))
                sock.listen(MAX_CONNECTIONS)
            except BaseException:
                sock.close()
                raise
            return sock

        listener = trio.socket.from_stdlib_socket(
            await trio.to_thread.run_sync(run_in_netns, netns, listen)
        )
        relay = cls(netns, listener, int(listener.getsockname()[1]), iptables)
        try:
            await relay._iptables("-A")
        except BaseException:
            listener.close()
            raise
        return relay

    async def _iptables(self, action: str) -> None:
        argv = [NSENTER, f"--net={self.netns}", "--", self.iptables, "-w", "5", "-t", "nat",
                action, *redirect_rule(self.port)]  # fmt: skip
        done = await trio.run_process(argv, capture_stderr=True, check=False)
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip()[-300:]
            raise Internal(f"port-forward: iptables {action} in {self.netns}: {err}")

    async def serve(self, dial_guest: DialGuest, *, hold: Gate | None = None) -> None:
        """Accept and relay until cancelled; each connection on its own task.

        ``hold``, if given, is awaited before any dial or byte goes to the guest: while
        the pod is paused, the agent's hold (vhost-device-vsock 0.3.0 ends its worker
        on a host byte that reaches a stopped VM).
        """
        limit = trio.CapacityLimiter(MAX_CONNECTIONS)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    conn, _ = await self.listener.accept()
                except trio.ClosedResourceError:
                    return  # stopped
                except OSError as exc:
                    log.warning("port-forward: accept: %s", exc)
                    await trio.sleep(0.1)
                    continue
                if limit.available_tokens == 0:
                    conn.close()  # more than MAX_CONNECTIONS at once: refused, not queued
                    continue
                nursery.start_soon(self._relay, conn, dial_guest, limit, hold)

    async def _relay(
        self,
        conn: trio.socket.SocketType,
        dial_guest: DialGuest,
        limit: trio.CapacityLimiter,
        hold: Gate | None,
    ) -> None:
        async with limit:
            client = trio.SocketStream(conn)
            try:
                port = original_port(conn)
            except OSError as exc:
                log.info("port-forward: a connection without a redirected port (%s)", exc)
                await client.aclose()
                return
            log.debug("port-forward: a connection to port %d", port)
            if hold is not None:
                await hold()
            guest = await self._open_guest(port, dial_guest)
            if guest is None:
                await client.aclose()
                return
            await splice(client, guest, eof_to_a=True, eof_to_b=False, wait_b=hold)  # b: vsock

    async def _open_guest(self, port: int, dial_guest: DialGuest) -> trio.abc.Stream | None:
        guest: trio.abc.Stream | None = None
        try:
            with trio.fail_after(GUEST_TIMEOUT):
                guest = await dial_guest()
                await guest.send_all(f"{port}\n".encode())
                answer = await read_line(guest, FORWARD_REPLY_MAX)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, Error) as exc:
            log.info("port-forward to %d: the guest cannot be reached: %s", port, exc)
        else:
            if answer == FORWARD_OK:
                log.debug("port-forward to %d: the guest dialled it", port)
                return guest
            log.info("port-forward to %d: %r", port, answer[:FORWARD_REPLY_MAX])
        if guest is not None:
            await guest.aclose()
        return None

    async def stop(self) -> None:
        """Close the listener (waking a pending accept), then remove the rule (the
        namespace may be gone already)."""
        self.listener.close()
        with contextlib.suppress(Internal, OSError):
            await self._iptables("-D")
