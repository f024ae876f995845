"""The guest agent: startup, composition of the services, and the serve loop.

Startup (only in the guest: PID 1, ``--guest-setup``, or started by the guest
init; never when tests build the agent on the host):
  1. logging to /dev/console (else stderr), every line prefixed ``kata-py-agent``;
  2. options from ``kata_py.*`` on /proc/cmdline, then the command line;
  3. ``system.guest_setup``: modules from /etc/kata-py/modules, ``lo`` up,
     /dev/virtio-ports links, the ``kataShared`` virtio-fs mount, child subreaper;
  4. the channel (serial port or vsock); once served, one line
     ``KATA_PY_AGENT_READY uptime=<s>``.
Only a channel that cannot be opened is fatal (exit status 1).
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from shimv2.aio import TASK_STATUS_IGNORED, TaskStatus, start, start_task
from shimv2.guest import channel as ch
from shimv2.guest.health import HealthService
from shimv2.guest.network import CommandRunner, IpCommand, NetworkService
from shimv2.guest.system import MODULES_LIST, GuestOS, SandboxService, guest_setup
from shimv2.guest_protocol import AGENT_PORT_NAME, AGENT_READY_LINE
from shimv2.pb.kata import agent_pb2, health_pb2
from shimv2.ttrpc import Method, Service
from shimv2.ttrpc.aio import Server

log = logging.getLogger("shimv2.guest")

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]
LOG_PREFIX = "kata-py-agent"
READY_LINE = AGENT_READY_LINE
# serial+vsock: a VM template's. Its builder talks over the serial port; its
# clones over vsock, once the host plugs their vsock device (hotplug after the
# restore: a vsock device in the template would give every clone its CID).
CHANNELS = ("auto", "serial", "vsock", "serial+vsock")
DEFAULT_STATE_DIR = "/run/kata-py/containers"


# NamedTuples, not dataclasses: under TCG each dataclass costs the agent's start ~10 ms.
class Options(NamedTuple):
    channel: str = "auto"
    port: str | None = None  # the serial port's device; found via /sys when None
    vsock_port: int = ch.VSOCK_PORT
    port_wait: float = 10.0  # seconds to wait for the serial port's device to appear
    runtime: str = "crun"
    debug: bool = False
    guest_setup: bool = False
    state_dir: str = DEFAULT_STATE_DIR
    debug_console: bool = False  # a shell on the debug.console.0 port (kata-py exec)


def parse_cmdline(text: str) -> dict[str, str]:
    """``kata_py.NAME=VALUE`` words of a kernel command line (``kata_py.NAME`` means 1)."""
    found = {}
    for word in text.split():
        if word.startswith("kata_py."):
            key, _, value = word[len("kata_py.") :].partition("=")
            if key:
                found[key] = value if _ else "1"
    return found


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes", "on")


def parse_options(
    argv: Sequence[str],
    cmdline: str = "",
    *,
    pid: int | None = None,
    ppid: int | None = None,
    modules_list: str = MODULES_LIST,
) -> Options:
    """Kernel command line first, then ``argv`` overrides it."""
    kv = parse_cmdline(cmdline)
    given: dict[str, Any] = {}
    if kv.get("channel") in CHANNELS:
        given["channel"] = kv["channel"]
    elif "channel" in kv:
        log.warning("ignoring kata_py.channel=%s (want one of %s)", kv["channel"], CHANNELS)
    given["port"] = kv.get("port") or None
    if kv.get("vsock_port", "").isdigit():
        given["vsock_port"] = int(kv["vsock_port"])
    if kv.get("runtime") in ("crun", "runc"):
        given["runtime"] = kv["runtime"]
    given["debug"] = _truthy(kv.get("debug"))
    given["debug_console"] = _truthy(kv.get("debug_console"))
    pid = os.getpid() if pid is None else pid
    ppid = os.getppid() if ppid is None else ppid
    # PID 1, or a child of the guest's own init (only the guest image has the module list).
    given["guest_setup"] = (
        pid == 1 or _truthy(kv.get("guest_setup")) or (ppid == 1 and os.path.exists(modules_list))
    )
    if argv:  # the guest's init passes none: argparse is not worth importing then
        given.update(_argv_options(argv))
    return Options(**given)


def _argv_options(argv: Sequence[str]) -> dict[str, Any]:
    """The options ``argv`` sets."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m shimv2.guest")
    parser.add_argument("--channel", choices=CHANNELS)
    parser.add_argument("--port")
    parser.add_argument("--vsock-port", type=int)
    parser.add_argument("--runtime", choices=("crun", "runc"))
    parser.add_argument("--debug", action="store_true", default=None)
    parser.add_argument("--state-dir")
    setup = parser.add_mutually_exclusive_group()
    setup.add_argument("--guest-setup", action="store_true", default=None)
    setup.add_argument("--no-guest-setup", dest="guest_setup", action="store_false")
    args = parser.parse_args(list(argv))
    names = ("channel", "port", "vsock_port", "runtime", "debug", "guest_setup", "state_dir")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def make_reaper() -> Any | None:
    """The child reaper of ``shimv2.guest.process``, or None (logged) when missing."""
    try:
        return importlib.import_module("shimv2.guest.process").Reaper()
    except Exception:
        log.exception("no child reaper: cannot import shimv2.guest.process")
        return None


def reaper_runner(reaper: Any) -> CommandRunner:
    """Run commands through the reaper: its ``waitpid(-1)`` owns every child of ours."""

    async def run(argv: Sequence[str], timeout: float) -> tuple[int, bytes, bytes]:
        result: tuple[int, bytes, bytes] = await reaper.run_command(argv, timeout=timeout)
        return result

    return run


def load_container_service(options: Options, reaper: Any | None) -> Any | None:
    """The container rpcs' implementation, or None (logged) when it cannot be built.

    Imported by name so that the rest of the agent serves even while that module
    is missing or broken.
    """
    try:
        containers = importlib.import_module("shimv2.guest.containers")
        runtime_mod = importlib.import_module("shimv2.guest.runtime")
    except Exception:
        log.exception("container service unavailable: cannot import it")
        return None
    try:
        runtime = runtime_mod.Runtime(options.runtime, reaper=reaper)
        return containers.ContainerService(runtime, options.state_dir)
    except Exception:
        log.exception("container service unavailable: cannot build it")
        return None


def _destroy_callback(containers: Any | None) -> Callable[[], Any] | None:
    """DestroySandbox has the container service kill and forget every container."""
    return None if containers is None else containers.destroy_all


def agent_service(*impls: object) -> Service:
    """One ``grpc.AgentService`` from several objects' same-named rpc methods."""
    methods: dict[str, Method] = {}
    for impl in impls:
        methods.update(Service.from_descriptor(AGENT_SERVICE, impl).methods)
    return Service(AGENT_SERVICE.full_name, methods)


class Agent(NamedTuple):
    server: Server
    sandbox: SandboxService
    network: NetworkService
    containers: Any | None
    reaper: Any | None


def build_agent(
    options: Options,
    *,
    guest: GuestOS | None = None,
    ip: IpCommand | None = None,
    containers: Any | None = None,
    load_containers: bool = True,
    reaper: Any | None = None,
) -> Agent:
    """Compose the services into one server. Touches nothing on the machine.

    ``reaper`` (``process.Reaper``) must be running before any rpc spawns a process.
    """
    if containers is None and load_containers:
        containers = load_container_service(options, reaper)
    sandbox = SandboxService(
        guest or GuestOS(),
        init_daemon=os.getpid() == 1,
        on_destroy=_destroy_callback(containers),
    )
    network = NetworkService(ip)
    impls: list[object] = [sandbox, network]
    if containers is not None:
        impls.append(containers)
    # No peer check: the channel's only peer is the host's shim.
    server = Server(
        [Service.from_descriptor(HEALTH_SERVICE, HealthService()), agent_service(*impls)]
    )
    return Agent(server, sandbox, network, containers, reaper)


def uptime() -> str:
    try:
        return Path("/proc/uptime").read_text().split()[0]
    except (OSError, IndexError):
        return "?"


async def serve_channel(
    server: Server,
    options: Options,
    *,
    on_ready: Callable[[str], None],
    dev: Path = Path("/dev"),
    sys_ports: Path = Path("/sys/class/virtio-ports"),
) -> None:
    """Open the channel the options ask for and serve it forever.

    Error handling: ``ChannelError`` when no channel can be opened.
    """
    vsock_dev = dev / "vsock"
    port: Path | None = Path(options.port) if options.port else None
    if options.channel != "vsock" and port is None:
        # Virtio ports can appear a little after their module loaded.
        wait = options.port_wait
        if options.channel == "auto" and vsock_dev.exists():
            wait = min(wait, 1.0)
        port = await ch.wait_for_serial_port(wait, dev=dev, sys_ports=sys_ports)
    serial = options.channel in ("serial", "serial+vsock") or (
        options.channel == "auto" and port is not None
    )
    vsock = options.channel in ("vsock", "serial+vsock") or not serial
    if serial and port is None:
        raise ch.ChannelError(f"no virtio-serial port {AGENT_PORT_NAME}")
    if options.channel == "auto" and not serial and not vsock_dev.exists():
        raise ch.ChannelError(f"neither a virtio-serial port {AGENT_PORT_NAME} nor {vsock_dev}")
    # Opened before anything is served: either failing fails the channel.
    fd = ch.open_port(port) if serial and port is not None else None
    try:
        listener = ch.open_vsock_listener(options.vsock_port) if vsock else None
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    try:
        async with asyncio.TaskGroup() as group:
            where = []
            if fd is not None:
                await start(group, ch.serve_port, server, fd)
                where.append(f"serial:{port}")
            if listener is not None:
                await start(group, ch.serve_listener, server, listener)
                where.append(f"vsock:{options.vsock_port}")
                forward = await start(group, serve_forward_port)
                if forward:
                    where.append(f"port-forward on vsock:{forward}")
            on_ready(" and ".join(where))
    finally:
        if fd is not None:
            os.close(fd)
        if listener is not None:
            listener.close()


async def serve_forward_port(*, task_status: TaskStatus = TASK_STATUS_IGNORED) -> None:
    """Port-forward's listener beside the agent's vsock port; without it the agent serves on."""
    from shimv2.guest.port_forward import serve_port_forward
    from shimv2.guest_protocol import FORWARD_VSOCK_PORT

    try:
        listener = ch.open_vsock_listener(FORWARD_VSOCK_PORT)
    except ch.ChannelError as exc:
        log.warning("no port-forward: %s", exc)
        task_status.started(0)
        return
    with listener:
        task_status.started(FORWARD_VSOCK_PORT)  # listening: the host's dials queue until accepted
        await serve_port_forward(listener)


async def debug_console(reaper: Any, port_wait: float) -> None:
    """The debug console, if its port shows up; the agent serves on without it."""
    from shimv2.guest.debug_console import serve_debug_console
    from shimv2.guest_protocol import DEBUG_CONSOLE_PORT

    port = await ch.wait_for_serial_port(port_wait, DEBUG_CONSOLE_PORT)
    if port is None:
        log.warning("debug console asked for, but there is no port %s", DEBUG_CONSOLE_PORT)
        return
    try:
        await serve_debug_console(reaper, str(port))
    except ch.ChannelError as exc:
        log.warning("debug console: %s", exc)


def setup_logging(debug: bool, in_guest: bool) -> TextIO:
    """Log lines to the console (the guest's serial console) or stderr; return the stream."""
    stream: TextIO = sys.stderr
    if in_guest:
        try:
            stream = open("/dev/console", "w", buffering=1)  # noqa: SIM115 - lives as long as we do
        except OSError:
            stream = sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(f"{LOG_PREFIX}: %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    return stream


async def run(options: Options, out: TextIO) -> None:
    if options.guest_setup:
        async with asyncio.timeout(30):  # every step is bounded; this bounds them all
            report = await asyncio.to_thread(guest_setup, GuestOS())
        log.info(
            "guest setup done at uptime %s: %d modules, lo up=%s, ports=%s, shared=%s, "
            "subreaper=%s; seconds: %s",
            uptime(), report.modules, report.lo_up, report.ports, report.shared, report.subreaper,
            report.timings(),
        )  # fmt: skip
    reaper = make_reaper()
    ip = IpCommand(runner=reaper_runner(reaper)) if reaper is not None else None
    agent = build_agent(options, ip=ip, reaper=reaper)

    def ready(where: str) -> None:
        log.info("serving on %s", where)
        print(f"{READY_LINE} uptime={uptime()}", file=out, flush=True)
        if not gc.isenabled():  # off since ``__main__``; later passes skip startup's objects
            gc.freeze()
            gc.enable()

    background: list[asyncio.Task[Any]] = []
    failure: ch.ChannelError | None = None
    async with asyncio.TaskGroup() as group:
        # The reaper (waitpid(-1)) must run before any rpc spawns a process; the container
        # service runs it with its own background tasks.
        containers_run = getattr(agent.containers, "run", None)
        if containers_run is not None:
            background.append((await start_task(group, containers_run))[0])
        elif reaper is not None:
            background.append((await start_task(group, reaper.run))[0])
        if options.debug_console and reaper is not None:
            background.append(group.create_task(debug_console(reaper, options.port_wait)))
        try:
            await serve_channel(agent.server, options, on_ready=ready)
        except ch.ChannelError as exc:
            failure = exc  # raised below, whole: the group would wrap it
        for task in background:
            task.cancel()
    if failure is not None:
        raise failure


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cmdline = Path("/proc/cmdline").read_text()
    except OSError:
        cmdline = ""
    options = parse_options(sys.argv[1:] if argv is None else argv, cmdline)
    out = setup_logging(options.debug, options.guest_setup)
    # Uptimes in the start lines show where boot time goes (imports, setup, serving).
    log.info("starting at uptime %s (pid %d, options %s)", uptime(), os.getpid(), options)
    try:
        asyncio.run(run(options, out))
    except ch.ChannelError as exc:
        log.error("no channel to the host: %s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
