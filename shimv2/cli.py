"""``kata-py``: the admin command line.

``check`` says whether this host can run kata-py (and which accelerator a VM
would get); ``env`` prints the effective configuration and paths; ``list``
shows the sandboxes in the state directory; ``metrics`` prints what a pod's
shim reports to Prometheus; ``exec`` attaches to a pod VM's debug console.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import trio


def package_version() -> str:
    try:
        return version("kata-py")
    except PackageNotFoundError:
        return "0+unknown"


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
    for what, path in (("guest kernel", hyp.kernel), ("guest initrd", hyp.initrd)):
        check(what, os.path.isfile(path), path)
    check("/dev/net/tun", os.path.exists("/dev/net/tun"), "taps for the pod network")
    check("root", os.geteuid() == 0, "mounts, taps and namespaces need root")
    v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    check("host cgroups", True, "v2" if v2 else "v1 (stats are reported as cgroups v1 Metrics)")
    check(
        "vsock",
        True,
        "/dev/vhost-vsock present"
        if os.path.exists("/dev/vhost-vsock")
        else "absent: virtio-serial",
    )
    if qemu is not None and os.path.isfile(hyp.kernel):
        from shimv2.vc.accel import choose_accelerator
        from shimv2.vc.qemu import ACCEL_CACHE

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
    from shimv2.shim.metrics import fetch_metrics, monitor_socket
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
    path = debug_console_socket(store.vm_dir(sid))
    if not path.exists():
        raise FailedPrecondition(
            f"sandbox {sid} has no debug console: set debug_console_enabled = true "
            "under [agent.kata] (pods started after that get one)"
        )
    return attach_console(str(path), sys.stdin.fileno(), sys.stdout.fileno())


def attach_console(path: str, stdin: int, stdout: int) -> int:
    """Relay a terminal (raw mode) or a pipe to the debug console; the shell's exit status.

    Piped input ends with an ``exit``, so ``echo 'uname -r' | kata-py exec POD`` runs and
    returns the status of the last command.
    """
    import selectors
    import socket
    import termios
    import tty

    from shimv2.guest.debug_console import SHELL_EXITED_END, SHELL_EXITED_PREFIX

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
        pending = b""  # output held back while it may be the start of the exit marker
        while True:
            for key, _ in sel.select():
                if key.fileobj is stdin:
                    data = os.read(stdin, 4096)
                    if interactive and DETACH_KEY in data:
                        return 0
                    if not data:
                        sel.unregister(stdin)
                        data = END_OF_INPUT
                    sock.sendall(data)
                    continue
                data = sock.recv(65536)
                if not data:
                    os.write(stdout, pending)
                    print("kata-py: the VM closed the console", file=sys.stderr)
                    return 255
                pending += data
                start = pending.find(SHELL_EXITED_PREFIX)
                end = pending.find(SHELL_EXITED_END, start) if start >= 0 else -1
                if end >= 0:
                    os.write(stdout, pending[:start])
                    status = pending[start + len(SHELL_EXITED_PREFIX) : end]
                    return int(status) if status.isdigit() and len(status) < 4 else 255
                keep = 0 if start < 0 else len(pending) - start
                if start < 0:  # a marker may be cut anywhere: hold back a possible start
                    for n in range(min(len(SHELL_EXITED_PREFIX) - 1, len(pending)), 0, -1):
                        if SHELL_EXITED_PREFIX.startswith(pending[-n:]):
                            keep = n
                            break
                os.write(stdout, pending[: len(pending) - keep])
                pending = pending[len(pending) - keep :]
    finally:
        sock.close()
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)


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
