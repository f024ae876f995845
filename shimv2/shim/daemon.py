"""The long-lived per-pod shim process (started by ``start`` with no action).

It serves the Task API on the listening socket it inherited as fd 3, publishes
events to containerd, and exits once ``Shutdown`` is requested (by the task
service or SIGTERM/SIGINT): it stops accepting, runs the shutdown callbacks,
drains the event queue, removes its socket and returns 0. With
``[runtime] enable_tracing`` its verbs' spans go to the configured OTLP
endpoint, flushed before it exits; Prometheus metrics are served on
``<state_dir>/monitor/<id>.sock`` (``shimv2.shim.metrics``). It is a child
subreaper, as containerd's shims are, so processes orphaned below it are reaped
here rather than by init.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from shimv2.errdefs import Error
from shimv2.shim import clean_exit
from shimv2.shim import logging as shim_logging
from shimv2.shim.bootstrap import SHUTDOWN_SIGNALS, monitor_socket
from shimv2.shim.events import Publisher
from shimv2.shim.flags import Flags
from shimv2.shim.metrics import ShimMetrics, listen_monitor, serve_metrics
from shimv2.shim.shutdown import Shutdown
from shimv2.ttrpc import Server, Service
from shimv2.vc.api import VirtContainers
from shimv2.vc.config import Config, load_config
from shimv2.vc.ids import sandbox_id
from shimv2.vc.tracing import NoTracer, Tracer, otlp_tracer

log = logging.getLogger(__name__)

LISTEN_FD = 3
PR_SET_CHILD_SUBREAPER = 36
REAP_INTERVAL = 5.0
PUBLISHER_DRAIN = 5.0


class TaskServiceLike(Protocol):
    def services(self) -> list[Service]: ...

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...


TaskServiceFactory = Callable[[VirtContainers, Publisher, Shutdown, str, str], TaskServiceLike]


def default_task_service() -> TaskServiceFactory | None:
    """``shimv2.task_service.service.TaskService``, or None while it is not there."""
    try:
        from shimv2.task_service.service import (  # type: ignore[import-not-found,unused-ignore]
            TaskService,
        )
    except ImportError as exc:
        log.error("no task service (%s): serving without the Task API", exc)
        return None

    def build(
        vc: VirtContainers, publisher: Publisher, shutdown: Shutdown, namespace: str, shim_id: str
    ) -> TaskServiceLike:
        service: TaskServiceLike = TaskService(
            vc, publisher, shutdown, namespace=namespace, shim_id=shim_id
        )
        return service

    return build


def set_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_CHILD_SUBREAPER): %s", os.strerror(ctypes.get_errno()))


def _zombie_children() -> set[int]:
    me = os.getpid()
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid …": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[0] == "Z" and fields[1] == str(me):
            found.add(int(entry))
    return found


async def reap_orphans(interval: float = REAP_INTERVAL) -> None:
    """Reap zombies that stayed zombies for a whole ``interval``.

    Children we spawned through trio are waited for by their owners; those who
    got to us as orphans have nobody. Reaping only what outlived one interval
    keeps us from stealing an exit status someone is about to collect.
    """
    seen: set[int] = set()
    while True:
        await trio.sleep(interval)
        zombies = _zombie_children()
        for pid in zombies & seen:
            _reap(pid)
        seen = zombies - seen


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # a zombie: never blocks
        log.debug("reaped orphan %d", pid)


@dataclass
class Daemon:
    flags: Flags
    sock: socket.socket
    task_service: TaskServiceFactory | None = None
    config: Config | None = None
    tracer: Tracer | None = None
    shutdown: Shutdown = field(default_factory=Shutdown)
    _socket_removed: bool = field(default=False, init=False)
    # Set once it has shut down with no sandbox left: its ``delete`` has nothing to do.
    left_nothing: bool = field(default=False, init=False)
    _monitor_path: str = field(default="", init=False)

    async def serve(self) -> None:
        name = self.sock.getsockname()
        path = name if isinstance(name, str) else ""
        try:
            await self._serve(path)
        finally:
            # Also when serving failed: a socket nobody accepts on would make the
            # next ``start`` of the pod wait on a dead daemon's backlog.
            self.sock.close()
            self._remove_socket(path)
            if self._monitor_path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._monitor_path)
        if self.left_nothing:  # and its sockets are gone: ``delete`` has nothing to do
            clean_exit.mark(self.flags.bundle or ".")

    def _remove_socket(self, path: str) -> None:
        """Once: after that, the path may be a new daemon's (a ``start`` that came later)."""
        if path and not self._socket_removed:
            self._socket_removed = True
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def _serve(self, path: str) -> None:
        flags = self.flags
        async with trio.open_nursery() as nursery:
            vc = VirtContainers(nursery, self.config, tracer=self.tracer)
            metrics = ShimMetrics(vc.vm_processes)
            await self._serve_metrics(nursery, vc.config.runtime.state_dir, metrics)
            publisher = Publisher(flags.ttrpc_address, flags.namespace)
            await nursery.start(publisher.run)
            services: list[Service] = []
            if self.task_service is not None:
                ts = self.task_service(vc, publisher, self.shutdown, flags.namespace, flags.id)
                services = ts.services()
                await nursery.start(ts.run)
            server = Server(services, observer=metrics.observe_call)
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(self.sock))
            await nursery.start(server.serve, listener)
            nursery.start_soon(self._signals)
            nursery.start_soon(reap_orphans)
            log.info("shim %s serving at unix://%s (pid %d)", flags.id, path, os.getpid())

            await self.shutdown.wait()
            log.info("shim %s shutting down", flags.id)
            await listener.aclose()
            self._remove_socket(path)
            await self.shutdown.run_callbacks()
            await publisher.aclose(PUBLISHER_DRAIN)
            self.left_nothing = not vc.holds_sandboxes()
            nursery.cancel_scope.cancel()

    async def _serve_metrics(
        self, nursery: trio.Nursery, state_dir: str, metrics: ShimMetrics
    ) -> None:
        """``/metrics`` on ``<state_dir>/monitor/<id>.sock``; a shim without it still runs."""
        try:
            path = monitor_socket(state_dir, sandbox_id(self.flags.id))
            sock = listen_monitor(path)
        except (Error, OSError) as exc:
            log.warning("shim %s: no metrics endpoint: %s", self.flags.id, exc)
            return
        self._monitor_path = path
        await nursery.start(serve_metrics, sock, metrics)

    async def _signals(self) -> None:
        with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
            # ``start`` spawned us with them blocked; pending ones arrive now.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SHUTDOWN_SIGNALS)
            async for signum in signals:
                log.info("received %s", signal.Signals(signum).name)
                self.shutdown.request()


def run(flags: Flags) -> int:
    """The daemon's main: logging, subreaper, then serve until shutdown."""
    fd = shim_logging.open_log_fifo(os.path.join(flags.bundle or ".", shim_logging.LOG_FIFO))
    if fd is not None:
        os.dup2(fd, 2)
        os.close(fd)
    shim_logging.setup(2, debug=flags.debug, fields={"id": flags.id, "namespace": flags.namespace})
    try:
        sock = socket.socket(fileno=LISTEN_FD)
    except OSError as exc:
        log.error("no listening socket on fd %d: %s", LISTEN_FD, exc)
        return 1
    if sock.family != socket.AF_UNIX:
        log.error("fd %d is not a unix socket", LISTEN_FD)
        return 1
    sock.set_inheritable(False)
    set_subreaper()
    try:
        with contextlib.ExitStack() as stack:
            config = load_config()
            # Not the OpenTelemetry API's global provider: nothing in the shim sets one.
            tracer: Tracer = NoTracer()
            if config.runtime.enable_tracing:
                resource = {"kata_py.shim_id": flags.id, "kata_py.namespace": flags.namespace}
                tracer = stack.enter_context(otlp_tracer(config.runtime.tracing_endpoint, resource))
            daemon = Daemon(flags, sock, default_task_service(), config, tracer)
            trio.run(daemon.serve)
    except Exception:
        log.exception("shim %s failed", flags.id)
        return 1
    log.info("shim %s exited", flags.id)
    return 0
