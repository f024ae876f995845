"""Prometheus metrics of a shim: its Task API calls, its own process, its pods' VMs.

Kata's shim serves ``/metrics`` on a unix socket for kata-monitor to scrape; so
does ours, at ``<state_dir>/monitor/<shim id>.sock`` (``kata-py metrics`` reads
it). The text exposition format (0.0.4) is written here rather than with
prometheus_client, whose import alone would add 40 ms to every shim start; the
tests check the output with prometheus_client's own parser. HTTP is h11
(sans-IO) under a thin trio loop, one request per connection.

Names follow Kata's: ``kata_shim_rpc_durations_histogram_milliseconds``,
``kata_shim_proc_status``/``_fds``/``_threads``, ``kata_hypervisor_*`` and
``kata_virtiofsd_*`` (the latter two labelled with the sandbox id).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from shimv2.errdefs import Unavailable

if TYPE_CHECKING:
    # Imported where a request is read or sent: a shim nobody scrapes never loads it.
    import h11

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS_MS = (1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0)
MAX_REQUEST = 8 * 1024  # a scrape is one short GET
REQUEST_TIMEOUT = 10.0
LINGER = 1.0
# Fields of /proc/<pid>/status reported as kata_*_proc_status{item=...}, in bytes.
PROC_STATUS_ITEMS = ("VmPeak", "VmSize", "VmHWM", "VmRSS", "RssAnon", "RssFile")

# (sandbox id, component, pid): component is "hypervisor" or "virtiofsd".
VmProcesses = Callable[[], Iterable[tuple[str, str, int]]]


@dataclass
class RpcHistogram:
    """Milliseconds per Task API method, in ``BUCKETS_MS`` (cumulative when written)."""

    counts: dict[str, list[int]] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=dict)

    def observe(self, action: str, ms: float) -> None:
        counts = self.counts.setdefault(action, [0] * (len(BUCKETS_MS) + 1))
        counts[bisect.bisect_left(BUCKETS_MS, ms)] += 1
        self.sums[action] = self.sums.get(action, 0.0) + ms

    def lines(self, name: str) -> list[str]:
        out = [
            f"# HELP {name} Task API calls served by the shim, by method.",
            f"# TYPE {name} histogram",
        ]
        for action in sorted(self.counts):
            running = 0
            for bound, count in zip((*BUCKETS_MS, float("inf")), self.counts[action], strict=True):
                running += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                out.append(f'{name}_bucket{{action="{action}",le="{le}"}} {running}')
            out.append(f'{name}_sum{{action="{action}"}} {self.sums[action]!r}')
            out.append(f'{name}_count{{action="{action}"}} {running}')
        return out


@dataclass(frozen=True)
class ProcessSample:
    status: dict[str, int]  # PROC_STATUS_ITEMS, in bytes
    fds: int
    threads: int


def sample_process(pid: int) -> ProcessSample | None:
    """What /proc says of ``pid``; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    status: dict[str, int] = {}
    threads = 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in PROC_STATUS_ITEMS:
            status[key] = int(value.split()[0]) * 1024  # kB
        elif key == "Threads":
            threads = int(value)
    return ProcessSample(status, fds, threads)


def _process_lines(prefix: str, what: str, samples: list[tuple[str, ProcessSample]]) -> list[str]:
    """Gauges for ``samples`` of (label text, sample), e.g. ('sandbox_id="p1"', ...)."""
    out = [
        f"# HELP {prefix}_proc_status {what}: /proc/<pid>/status sizes in bytes.",
        f"# TYPE {prefix}_proc_status gauge",
    ]
    for labels, sample in samples:
        sep = "," if labels else ""
        for item, value in sample.status.items():
            out.append(f'{prefix}_proc_status{{{labels}{sep}item="{item.lower()}"}} {value}')
    for metric, help_text in (("fds", "open file descriptors"), ("threads", "threads")):
        out.append(f"# HELP {prefix}_{metric} {what}: {help_text}.")
        out.append(f"# TYPE {prefix}_{metric} gauge")
        for labels, sample in samples:
            value = sample.fds if metric == "fds" else sample.threads
            out.append(f"{prefix}_{metric}{{{labels}}} {value}")
    return out


class ShimMetrics:
    """Everything a scrape reports; ``observe_call`` is the ttrpc server's call observer."""

    def __init__(self, vm_processes: VmProcesses) -> None:
        self._vm_processes = vm_processes
        self.rpc = RpcHistogram()

    def observe_call(self, service: str, method: str, seconds: float, code: int) -> None:
        self.rpc.observe(method, seconds * 1000.0)

    def render(self) -> str:
        lines = self.rpc.lines("kata_shim_rpc_durations_histogram_milliseconds")
        own = sample_process(os.getpid())
        if own is not None:
            lines += _process_lines("kata_shim", "the shim", [("", own)])
        by_component: dict[str, list[tuple[str, ProcessSample]]] = {}
        for sandbox, component, pid in self._vm_processes():
            sample = sample_process(pid)
            if sample is not None:
                by_component.setdefault(component, []).append((f'sandbox_id="{sandbox}"', sample))
        for component, samples in sorted(by_component.items()):
            lines += _process_lines(f"kata_{component}", component, samples)
        return "\n".join(lines) + "\n"


def fetch_metrics(path: str, timeout: float = REQUEST_TIMEOUT) -> str:
    """``GET /metrics`` from a shim's monitor socket (blocking: for the CLI)."""
    import h11

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        conn = h11.Connection(h11.CLIENT)
        headers = [("Host", "shim"), ("Connection", "close")]
        request = conn.send(h11.Request(method="GET", target="/metrics", headers=headers))
        sock.sendall((request or b"") + (conn.send(h11.EndOfMessage()) or b""))
        status, body = 0, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            else:  # EndOfMessage or ConnectionClosed
                break
    if status != 200:
        raise Unavailable(f"{path}: HTTP {status}: {body[:200]!r}")
    return body.decode()


def _in_use(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def listen_monitor(path: str) -> socket.socket:
    """The monitor's listening socket (mode 0600), replacing a stale one, never a live one."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        if _in_use(path):
            raise FileExistsError(f"{path} is served by another shim")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(16)
    return sock


async def serve_metrics(
    sock: socket.socket,
    metrics: ShimMetrics,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer ``GET /metrics`` on ``sock`` until cancelled."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    async with listener, trio.open_nursery() as nursery:
        task_status.started()
        while True:
            stream = await listener.accept()
            nursery.start_soon(_answer, stream, metrics)


async def _answer(stream: trio.SocketStream, metrics: ShimMetrics) -> None:
    import h11

    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
    async with stream:
        with trio.move_on_after(REQUEST_TIMEOUT):
            try:
                request = await _read_request(stream, conn)
            except h11.RemoteProtocolError as exc:
                await _respond(stream, conn, exc.error_status_hint, f"{exc}\n")
                await _linger(stream)
                return
            if request is None:
                return
            if request.method != b"GET":
                await _respond(stream, conn, 405, "only GET\n")
            elif request.target.split(b"?")[0] != b"/metrics":
                await _respond(stream, conn, 404, "not found: try /metrics\n")
            else:
                await _respond(stream, conn, 200, metrics.render(), CONTENT_TYPE)


async def _linger(stream: trio.SocketStream) -> None:
    """Read what the client still sends before closing: closing on unread data resets
    the connection, and the client could lose the error response we just sent."""
    with trio.move_on_after(LINGER), contextlib.suppress(trio.BrokenResourceError):
        await stream.send_eof()
        while await stream.receive_some(65536):
            pass


async def _read_request(stream: trio.SocketStream, conn: h11.Connection) -> h11.Request | None:
    import h11

    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(4096))  # b"" marks the end
        elif isinstance(event, h11.Request):
            return event
        else:
            return None  # the client left without asking


async def _respond(
    stream: trio.SocketStream,
    conn: h11.Connection,
    status: int,
    body: str,
    content_type: str = "text/plain; charset=utf-8",
) -> None:
    import h11

    data = body.encode()
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(data))),
        ("Connection", "close"),
    ]
    try:
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
        await stream.send_all(conn.send(h11.Data(data=data)) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        pass
