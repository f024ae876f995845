"""``kata-py``: the admin command line.

``check`` says whether this host can run kata-py (and which accelerator a VM
would get); ``env`` prints the effective configuration and paths; ``list``
shows the sandboxes in the state directory; ``metrics`` prints what a pod's
shim reports to Prometheus; ``exec`` attaches to a pod VM's debug console;
``factory`` builds, shows and removes the VM templates pods are cloned from.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from shimv2.vc.config import Config


def package_version() -> str:
    try:
        return version("kata-py")
    except PackageNotFoundError:
        return "0+unknown"


KSM_SYSFS = Path("/sys/kernel/mm/ksm")


def ksm_status(enabled: bool, sysfs: Path = KSM_SYSFS) -> str:
    """Whether the host's KSM runs (``run`` = 1), beside ``enable_ksm``.

    Only private memory merges: guest RAM shared with virtiofsd does not, so
    even with both on little of a pod merges (see the README).
    """
    setting = f"enable_ksm = {'true' if enabled else 'false'}"
    try:
        run = (sysfs / "run").read_text().strip()
    except OSError:
        return f"not in this kernel; {setting}"
    if run != "1":
        return f"not running (run = {run}); {setting}"
    state = "running"
    with contextlib.suppress(OSError, ValueError):
        state += f", {int((sysfs / 'pages_sharing').read_text())} pages sharing"
    return f"{state}; {setting}"


def _checks(config_path: str | None) -> list[tuple[str, bool, str]]:
    from shimv2.vc.config import load_config

    config = load_config(config_path)
    hyp = config.hypervisor
    out: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        out.append((name, ok, detail))

    qemu = shutil.which(hyp.path)
    check("hypervisor", qemu is not None, qemu or f"{hyp.path} not found")
    check("virtiofsd", os.access(hyp.virtio_fs_daemon, os.X_OK), hyp.virtio_fs_daemon)
    files = [("guest kernel", hyp.kernel)]
    if hyp.image:
        files += [("guest image", hyp.image), ("image initrd", hyp.image_initrd)]
    else:
        files += [("guest initrd", hyp.initrd)]
    for what, path in files:
        check(what, os.path.isfile(path), path)
    check("/dev/net/tun", os.path.exists("/dev/net/tun"), "taps for the pod network")
    check("ksm", True, ksm_status(hyp.enable_ksm))
    check("root", os.geteuid() == 0, "mounts, taps and namespaces need root")
    v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    check("host cgroups", True, "v2" if v2 else "v1 (stats are reported as cgroups v1 Metrics)")
    from shimv2.vc.qemu_config import default_backend, resolve_channel

    backend = hyp.vsock_backend or default_backend()
    channel = resolve_channel(hyp.agent_channel, backend)
    detail = {
        "vsock": "vsock (/dev/vhost-vsock)",
        "hybrid-vsock": f"hybrid-vsock ({backend or 'vhost-device-vsock: not found'})",
        "serial": "serial (virtio-serial)",
    }[channel]
    usable = channel != "hybrid-vsock" or (bool(backend) and os.access(backend, os.X_OK))
    usable = usable and (channel != "vsock" or os.path.exists("/dev/vhost-vsock"))
    check("agent channel", usable, f"{detail}; agent_channel = {hyp.agent_channel}")
    # Not a failure: pods run without it, only kubectl port-forward does not.
    iptables = shutil.which("iptables")
    if channel == "serial":
        forward = "serial: no port-forward"
    elif iptables:
        forward = f"relay over vsock, iptables {iptables}"
    else:
        forward = "no iptables: no port-forward"
    check("port-forward", True, forward)
    if qemu is not None and os.path.isfile(hyp.kernel):
        from shimv2.vc.accel import choose_accelerator
        from shimv2.vc.qemu_config import ACCEL_CACHE

        accel, reason = trio.run(
            choose_accelerator, hyp.accelerator, hyp.path, hyp.kernel, ACCEL_CACHE
        )
        check("accelerator", True, f"{accel} ({reason})")
    return out


def cmd_check(args: argparse.Namespace) -> int:
    failed = 0
    for name, ok, detail in _checks(args.config):
        failed += not ok
        print(f"{'ok ' if ok else 'FAIL'} {name:14} {detail}")
    print("this host can run kata-py" if not failed else f"{failed} check(s) failed")
    return 1 if failed else 0


def cmd_env(args: argparse.Namespace) -> int:
    from shimv2.vc.config import load_config

    config = load_config(args.config)
    env = {
        "version": package_version(),
        "config_file": args.config
        or os.environ.get("KATA_PY_CONFIG")
        or "/etc/kata-py/configuration.toml",
        **dataclasses.asdict(config),
    }
    print(json.dumps(env, indent=2, default=list))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from shimv2.vc.config import load_config
    from shimv2.vc.persist import Store

    store = Store(load_config(args.config).runtime.state_dir)
    for sid in store.list():
        state = store.load(sid)
        print(
            f"{sid}\t{state.state}\tqemu={state.qemu_pid}\tcontainers={','.join(state.containers)}"
        )
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from shimv2.errdefs import NotFound
    from shimv2.shim.bootstrap import monitor_socket
    from shimv2.shim.metrics import fetch_metrics
    from shimv2.vc.config import load_config
    from shimv2.vc.ids import sandbox_id

    path = monitor_socket(load_config(args.config).runtime.state_dir, sandbox_id(args.sandbox))
    try:
        text = fetch_metrics(path)
    except (FileNotFoundError, ConnectionRefusedError):
        raise NotFound(f"no shim serves sandbox {args.sandbox} ({path})") from None
    sys.stdout.write(text)
    return 0


DETACH_KEY = b"\x1d"  # ^], as telnet's: leave the console, the shell keeps running
# After piped input: a ^D could reach the pty before the shell switches it to raw
# mode and be lost; an ``exit`` line is read after the script, whatever the mode.
END_OF_INPUT = b"\nexit\n"
# The agent writes nothing after its exit marker, so a marker counts only once
# the console stays quiet this long after it (seconds).
MARKER_QUIET = 0.3
MAX_STATUS_DIGITS = 3
MAX_STRING = 4096  # an OSC/DCS string longer than this is dropped whole
TITLE_OSC = (b"0;", b"1;", b"2;")
# UTF-8 C1 controls that open a string (DCS, SOS, OSC, PM, APC), as their ESC forms.
C1_STRINGS = {0x90: b"P", 0x98: b"X", 0x9D: b"]", 0x9E: b"^", 0x9F: b"_"}
STRING_START = re.compile(rb"\x1b|\xc2[\x90\x98\x9d\x9e\x9f]")
STRING_END = re.compile(rb"[\x07\x18\x1a\x1b]|\xc2\x9c")
TITLE_UNSAFE = re.compile(rb"[\x00-\x1f\x7f]|\xc2[\x80-\x9f]")  # controls, C1 too


class ExitMarker:
    """Finds the agent's shell-exited marker in the console's output.

    What the guest can and cannot do here: the status is the guest's word by
    nature (a root shell in a VM we do not trust), so any guest can end a
    session with any status from 0 to 255. What is refused is anything else:
    a status that is no status (not 1 to 3 digits, over 255) is output, not a
    marker; a marker followed by more output is output too (the agent writes
    nothing after its own; a forged one, in a file the admin cats, is followed
    by the shell's prompt), which ``attach_console`` checks by waiting
    ``MARKER_QUIET`` before it believes one. Only content that forges a marker
    and then keeps the shell silent still ends the session: telling the agent's
    marker from one the shell prints would need a secret per session, which
    the guest side does not have today. At most a marker's length is held back.
    """

    def __init__(self, prefix: bytes, end: bytes) -> None:
        self._prefix = prefix
        self._end = end
        self.pending = b""  # held back: maybe the start of a marker, or a marker seen
        self.status: int | None = None  # a complete marker, if nothing follows it

    def feed(self, data: bytes) -> bytes:
        """What to show of ``data`` now; sets ``status`` when a marker ends the output."""
        if self.status is not None:  # output after a marker: it was not the agent's
            self.status = None
        buf, self.pending = self.pending + data, b""
        prefix, end_mark = self._prefix, self._end
        longest = len(prefix) + MAX_STATUS_DIGITS + len(end_mark)
        shown = 0  # buf[:shown] is output
        while True:
            start = buf.find(prefix, shown)
            if start < 0:
                # A marker may be cut anywhere: hold back what may be its start.
                keep = next(
                    (n for n in range(min(len(prefix) - 1, len(buf) - shown), 0, -1)
                     if prefix.startswith(buf[len(buf) - n :])),
                    0,
                )  # fmt: skip
                self.pending = buf[len(buf) - keep :]
                return buf[: len(buf) - keep]
            end = buf.find(end_mark, start + len(prefix), start + longest)
            if end < 0:
                if len(buf) - start < longest:
                    self.pending = buf[start:]  # may still become a marker
                    return buf[:start]
                shown = start + len(prefix)  # too long for a status: not a marker
                continue
            digits = buf[start + len(prefix) : end]
            after = end + len(end_mark)
            if digits.isdigit() and int(digits) <= 255 and after == len(buf):
                self.status = int(digits)
                self.pending = buf[start:]
                return buf[:start]
            shown = after  # no status, or output follows: not the agent's marker

    def flush(self) -> bytes:
        out, self.pending, self.status = self.pending, b"", None
        return out


class TerminalFilter:
    """Keeps the console's escape sequences that could act on the admin's terminal from it.

    Dropped: every DCS, SOS, PM and APC string (tmux passthrough, terminal
    queries, sixel) and every OSC but window titles (clipboard writes with
    OSC 52, colour and font changes, hyperlinks), also in their UTF-8 C1 forms.
    Kept: CSI and the other short sequences, which an interactive shell and
    full-screen programs (vi, top, less) need: colours, cursor moves, modes;
    dropping those would break the shell. The terminal's answers to queries
    go back to the guest, not to the host. Not covered: raw 8-bit C1 bytes,
    which a UTF-8 terminal does not take as controls. Only for a terminal:
    piped output is passed on as it comes.
    """

    def __init__(self) -> None:
        self._held = b""  # an unfinished sequence
        self._discarding = False  # inside a string too long to keep

    def feed(self, data: bytes) -> bytes:
        buf, self._held = self._held + data, b""
        out = bytearray()
        i = 0
        if self._discarding:
            end, size = _string_end(buf, 0)
            if end < 0:
                self._held = buf[-1:] if buf[-1:] in (b"\x1b", b"\xc2") else b""
                return b""
            self._discarding = False
            i = end + size
        while True:
            m = STRING_START.search(buf, i)
            if m is None:
                tail = buf[i:]
                if tail.endswith(b"\xc2"):  # maybe the first half of a C1 control
                    self._held, tail = tail[-1:], tail[:-1]
                out += tail
                return bytes(out)
            j = m.start()
            out += buf[i:j]
            if buf[j] == 0x1B:
                if j + 1 >= len(buf):
                    self._held = buf[j:]
                    return bytes(out)
                if buf[j + 1] not in b"]PX^_":
                    # Not a string: pass the ESC, then look at what follows again
                    # (it may start one itself: ESC ESC ] 52 ...).
                    out += b"\x1b"
                    i = j + 1
                    continue
                kind = buf[j + 1 : j + 2]
            else:
                kind = C1_STRINGS[buf[j + 1]]
            end, size = _string_end(buf, j + 2)
            if end < 0:
                if len(buf) - j > MAX_STRING:
                    self._discarding = True
                    self._held = buf[-1:] if buf[-1:] in (b"\x1b", b"\xc2") else b""
                else:
                    self._held = buf[j:]
                return bytes(out)
            body = buf[j + 2 : end]
            if kind == b"]" and body[:2] in TITLE_OSC and not TITLE_UNSAFE.search(body):
                out += b"\x1b]" + body + b"\x07"
            i = end + size


def _string_end(buf: bytes, start: int) -> tuple[int, int]:
    """Where the string from ``start`` ends and its terminator's length; (-1, 0) if not yet.

    BEL, ST (ESC \\ or C1), CAN and SUB end it; so does an ESC starting
    something else (length 0: it is looked at again), as in xterm.
    """
    m = STRING_END.search(buf, start)
    if m is None:
        return -1, 0
    k = m.start()
    if buf[k] != 0x1B:
        return k, m.end() - k
    if k + 1 >= len(buf):
        return -1, 0
    return (k, 2) if buf[k + 1] == 0x5C else (k, 0)


def cmd_exec(args: argparse.Namespace) -> int:
    from shimv2.errdefs import FailedPrecondition, NotFound
    from shimv2.vc.config import load_config
    from shimv2.vc.ids import sandbox_id
    from shimv2.vc.persist import Store
    from shimv2.vc.qemu import debug_console_socket

    store = Store(load_config(args.config).runtime.state_dir)
    sid = sandbox_id(args.sandbox)
    if sid not in store.list():
        raise NotFound(f"no sandbox {sid}")
    path = debug_console_socket(store.vm_dir(store.load(sid).vm_id or sid))
    if not path.exists():
        raise FailedPrecondition(
            f"sandbox {sid} has no debug console: set debug_console_enabled = true "
            "under [agent.kata] (pods started after that get one)"
        )
    return attach_console(str(path), sys.stdin.fileno(), sys.stdout.fileno())


def attach_console(path: str, stdin: int, stdout: int) -> int:
    """Relay a terminal (raw mode) or a pipe to the debug console; the shell's exit status.

    Piped input ends with an ``exit``, so ``echo 'uname -r' | kata-py exec POD`` runs and
    returns the status of the last command. The guest is not trusted: its status
    is checked (``ExitMarker``), what it prints to a terminal filtered
    (``TerminalFilter``), and nothing it sends is buffered beyond a marker's length.
    """
    import selectors
    import socket
    import termios
    import tty

    from shimv2.guest_protocol import SHELL_EXITED_END, SHELL_EXITED_PREFIX

    interactive = os.isatty(stdin)
    saved = termios.tcgetattr(stdin) if interactive else None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        if interactive:
            tty.setraw(stdin)
            os.write(stdout, b"kata-py: debug console; ^] leaves\r\n")
        else:
            sock.sendall(b"\n")  # the guest starts a shell when the host first speaks
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ)
        sel.register(stdin, selectors.EVENT_READ)
        marker = ExitMarker(SHELL_EXITED_PREFIX, SHELL_EXITED_END)
        screen = TerminalFilter() if os.isatty(stdout) else None

        def show(data: bytes) -> None:
            data = screen.feed(data) if screen is not None else data
            view = memoryview(data)
            while view:
                view = view[os.write(stdout, view) :]

        while True:
            # Once a marker came, it ends the session if nothing follows it soon
            # (a key typed meanwhile starts the guest's next shell, whose prompt
            # then cancels the marker: the admin lands in that shell).
            events = sel.select(MARKER_QUIET if marker.status is not None else None)
            if not events and marker.status is not None:
                return marker.status
            for key, _ in events:
                if key.fileobj is stdin:
                    data = os.read(stdin, 4096)
                    if interactive and DETACH_KEY in data:
                        return 0
                    if not data:
                        sel.unregister(stdin)
                        data = END_OF_INPUT
                    try:
                        sock.sendall(data)
                    except (BrokenPipeError, ConnectionResetError):
                        # The port is gone: what it sent last is still to be read.
                        with contextlib.suppress(KeyError):
                            sel.unregister(stdin)
                    continue
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if not data:
                    if marker.status is not None:
                        return marker.status
                    show(marker.flush())
                    print("kata-py: the VM closed the console", file=sys.stderr)
                    return 255
                show(marker.feed(data))
    finally:
        sock.close()
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)


def cmd_factory(args: argparse.Namespace) -> int:
    """``factory init | status | destroy``: the VM templates pods are cloned from;
    ``factory serve``: warm shims (``shimv2.shim.warm_server``)."""
    from shimv2.vc import template
    from shimv2.vc.config import load_config

    if args.action == "serve":  # warm shims, in the foreground (a service runs it)
        import logging

        from shimv2.shim import warm_server

        if args.title_room is None:
            # Again, with room in the argument area for the shims' command lines
            # (shimv2.shim.warm_server.set_cmdline).
            again = [sys.executable, sys.argv[0], "factory", "serve", "--socket", args.socket]
            os.execv(sys.executable, [*again, "--title-room", "." * warm_server.TITLE_ROOM])
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        return warm_server.serve(args.socket)
    config = load_config(args.config)
    path = config.factory.template_path
    qemu = config.qemu(None)
    cache_size = config.factory.vm_cache_number
    if args.action == "init":
        if config.factory.enable_template or not cache_size:
            built = trio.run(template.build_template, qemu, path)
            print(f"template {built.name} ready in {built.parent}", flush=True)
            if not config.factory.enable_template:
                print("pods use it once [factory] enable_template = true")
        if cache_size:
            return _serve_vm_cache(config)
        return 0
    if args.action == "destroy":
        if trio.run(_ask_vm_cache, config.factory.vm_cache_endpoint, "quit") is not None:
            print(f"stopped the VM cache on {config.factory.vm_cache_endpoint}")
        print(f"removed {template.destroy_templates(path)} template(s) from {path}")
        return 0
    cache = trio.run(_ask_vm_cache, config.factory.vm_cache_endpoint, "status")
    if cache is not None:
        print(
            f"vm cache: {len(cache.get('ready', []))} of {cache.get('number')} ready, "
            f"{cache.get('handed_out')} handed out; {config.factory.vm_cache_endpoint}"
        )
    elif cache_size:
        print(f"vm cache: no server on {config.factory.vm_cache_endpoint} (kata-py factory init)")
    key = template.template_key(qemu)
    templates = template.list_templates(path)
    state = "enabled" if config.factory.enable_template else "disabled"
    print(f"templates: {state}; {path}; this configuration's key {key}")
    for t in templates:
        mark = "*" if t.get("key") == key else " "
        print(
            f"{mark} {t.get('key')}  {t.get('memory_mib')} MiB guest, "
            f"{t.get('resident_mib')} MiB resident, booted in {t.get('boot_seconds')} s"
        )
    if not any(t.get("key") == key for t in templates):
        print("no template matches this configuration: pods boot cold (kata-py factory init)")
        return 1
    return 0


def _serve_vm_cache(config: Config) -> int:
    """Kata's VM cache server, in the foreground until SIGTERM, SIGINT or ``destroy``."""
    import logging
    import signal

    from shimv2.vc.api import factory_for
    from shimv2.vc.persist import Store
    from shimv2.vc.vm_cache import VmCache

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cache = VmCache(
        config.qemu(None),
        factory_for(config, cache=False),
        number=config.factory.vm_cache_number,
        endpoint=config.factory.vm_cache_endpoint,
        vm_dir=Store(config.runtime.state_dir).vm_dir,
        dial_timeout=config.agent.dial_timeout,
    )

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def serve(*, task_status: trio.TaskStatus[None]) -> None:
                    await cache.serve(task_status=task_status)
                    nursery.cancel_scope.cancel()

                async def quit_on_signal() -> None:
                    async for _ in signals:
                        cache.quit()

                await nursery.start(serve)
                print(f"vm cache: keeping {cache.number} VM(s) on {cache.endpoint}", flush=True)
                nursery.start_soon(quit_on_signal)

    trio.run(main)
    return 0


async def _ask_vm_cache(endpoint: str, op: str) -> dict[str, Any] | None:
    """The VM cache server's answer to ``op``; None when none runs there."""
    from shimv2.vc.vm_cache import ask

    if not os.path.exists(endpoint):
        return None
    try:
        stream, reply = await ask(endpoint, {"op": op})
    except (OSError, trio.TooSlowError):
        return None
    await stream.aclose()
    if op == "quit":
        for _ in range(600):  # up to 60 s: it stops the VMs it holds, then unlinks it
            if not os.path.exists(endpoint):
                break
            await trio.sleep(0.1)
    return reply


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kata-py", description="Run containerd pods in their own QEMU VMs."
    )
    parser.add_argument("--version", action="version", version=f"kata-py {package_version()}")
    parser.add_argument("--config", help="configuration file (default: $KATA_PY_CONFIG or /etc)")
    sub = parser.add_subparsers(dest="command")
    commands: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {
        "check": ("can this host run kata-py?", cmd_check),
        "env": ("the effective configuration, as JSON", cmd_env),
        "list": ("sandboxes in the state directory", cmd_list),
    }
    for name, (help_text, fn) in commands.items():
        sub.add_parser(name, help=help_text).set_defaults(func=fn)
    exec_ = sub.add_parser("exec", help="a root shell in a pod's VM (the debug console)")
    exec_.add_argument("sandbox", help="the sandbox (pod) id")
    exec_.set_defaults(func=cmd_exec)
    metrics = sub.add_parser("metrics", help="a running pod's Prometheus metrics, from its shim")
    metrics.add_argument("sandbox", help="the sandbox (pod) id")
    metrics.set_defaults(func=cmd_metrics)
    factory = sub.add_parser("factory", help="the VM templates pods start from")
    factory.add_argument("action", choices=("init", "status", "destroy", "serve"))
    factory.add_argument("--socket", default="/run/kata-py/shims.sock", help="serve: where")
    factory.add_argument("--title-room", help=argparse.SUPPRESS)
    factory.set_defaults(func=cmd_factory)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    from shimv2.errdefs import Error

    try:
        result: int = args.func(args)
    except Error as exc:
        print(f"kata-py: {exc.message}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
