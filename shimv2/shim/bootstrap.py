"""``start``: find or spawn the pod's shim daemon and tell containerd its address.

containerd runs ``start`` with cwd = bundle and reads its stdout *and* stderr
(``CombinedOutput``) as the reply, so nothing but the reply may be written there,
and the daemon must not inherit either pipe (containerd waits for EOF).

The containers of a pod share one daemon: a container whose CRI annotations say
``container-type=container`` joins the group of its ``sandbox-id``. The socket
is ``/run/containerd/s/<sha256 of "<address>/<namespace>/<group>">``, as the
runc shim's (cd pkg/shim/util_unix.go ``SocketAddress``); a daemon already
listening there is reused. Otherwise the listening socket is created here and
passed to a re-executed daemon as fd 3, in a new session, so a connection from
containerd waits in the backlog and never misses the daemon.

The reply (protocol.md §2): a protobuf ``BootstrapResult`` v3 when containerd
2.3+ sent ``BootstrapParams``; JSON ``{"version":3,…}`` when the containerd
binary says it is 2.0 or later; else the plain address (Task API v2), which
every containerd from 1.6 on reads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import re
import signal
import socket
import stat
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple
from typing import Any as AnyT

from shimv2.errdefs import AlreadyExists, InvalidArgument
from shimv2.shim import warm
from shimv2.shim.flags import Flags
from shimv2.shim.logging import LOG_FIFO, open_log_fifo

if TYPE_CHECKING:
    # protobuf (~20 ms) only when containerd sent something on stdin: ``ctr`` on
    # containerd 1.x sends nothing and reads a plain address.
    from google.protobuf.any_pb2 import Any

    from shimv2.pb.containerd.runtime.bootstrap.v1.bootstrap_pb2 import BootstrapParams

log = logging.getLogger(__name__)

SOCKET_ROOT = "/run/containerd/s"
ADDRESS_FILE = "address"
MONITOR_DIR = "monitor"  # under the state directory: the daemons' metrics sockets
# The configuration file CRI's runtime options named at start: ``delete`` runs
# without those options, and must clean up with the same state directory.
CONFIG_PATH_FILE = "kata-py-config-path"
CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
TASK_API_VERSION = 3
VERSION_TIMEOUT = 2.0
CONNECT_TIMEOUT = 1.0
# sockaddr_un.sun_path minus the NUL, and minus "unix://" containerd may add.
MAX_SOCKET_PATH = 106
RUNTIME_OPTIONS = "runtimeoptions.v1.Options"
CONFIG_ENV = "KATA_PY_CONFIG"
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
WARM_SHIMS_ENV = warm.ENV


def default_entry() -> list[str]:
    """How the daemon is re-executed: this interpreter, never a PATH lookup.

    ``-P``: cwd is the bundle, which must not be able to shadow our modules.
    The console script beside the interpreter is preferred so that ``ps``
    shows the shim's name.
    """
    script = Path(sys.executable).with_name("containerd-shim-kata-py-v2")
    if script.is_file():
        return [sys.executable, "-P", str(script)]
    return [sys.executable, "-P", "-m", "shimv2.shim"]


class StartInput(NamedTuple):
    """What ``start`` read on stdin."""

    params: BootstrapParams | None = None  # containerd 2.3+
    options: Any | None = None  # the runtime options, any version


def decode_stdin(data: bytes, flags: Flags) -> StartInput:
    """Tell ``BootstrapParams`` from a bare ``Any`` of options (both parse as either).

    ``BootstrapParams`` is recognised by its instance_id and namespace matching
    ``-id`` and ``-namespace`` (containerd PR #13764); undecodable input is
    logged and ignored.
    """
    if not data:
        return StartInput()
    from google.protobuf.any_pb2 import Any
    from google.protobuf.message import DecodeError

    from shimv2.pb.containerd.runtime.bootstrap.v1.bootstrap_pb2 import BootstrapParams

    with contextlib.suppress(DecodeError):
        params = BootstrapParams.FromString(data)
        if flags.id and params.instance_id == flags.id and params.namespace == flags.namespace:
            options = params.extensions[0].value if params.extensions else None
            return StartInput(params, options)
    try:
        return StartInput(options=Any.FromString(data))
    except DecodeError:
        log.warning("start: ignoring %d undecodable bytes on stdin", len(data))
        return StartInput()


def config_path_from(options: Any | None) -> str:
    """The kata-py configuration file named in CRI's runtime options, if any."""
    if options is None or not options.type_url.endswith(RUNTIME_OPTIONS):
        return ""
    from google.protobuf.message import DecodeError

    from shimv2.pb.containerd.types.runtimeoptions.v1.api_pb2 import Options

    try:
        return Options.FromString(options.value).config_path
    except DecodeError:
        return ""


def read_annotations(bundle: str) -> dict[str, str]:
    """The OCI annotations of ``<bundle>/config.json``; {} when there are none."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            spec: AnyT = json.load(f)
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise InvalidArgument(f"{bundle}/config.json: {exc}") from exc
    annotations = spec.get("annotations") if isinstance(spec, dict) else None
    if not isinstance(annotations, dict):
        return {}
    return {str(k): str(v) for k, v in annotations.items()}


def group_id(container_id: str, annotations: Mapping[str, str]) -> str:
    """The id whose daemon serves this container: its pod's sandbox, or itself."""
    if annotations.get(CONTAINER_TYPE) == "container" and annotations.get(SANDBOX_ID):
        return annotations[SANDBOX_ID]
    return container_id


def monitor_socket(state_dir: str, shim_id: str) -> str:
    """Where a pod's daemon serves its metrics (``shimv2.shim.metrics``)."""
    return os.path.join(state_dir, MONITOR_DIR, f"{shim_id}.sock")


def socket_path(address: str, namespace: str, group: str, root: str = SOCKET_ROOT) -> str:
    """``<root>/<hex sha256 of filepath.Join(address, namespace, group)>``."""
    joined = posixpath.normpath(posixpath.join(address, namespace, group))
    if joined.startswith("//"):
        joined = joined[1:]  # Go's Clean keeps one leading slash, normpath two
    path = os.path.join(root, hashlib.sha256(joined.encode()).hexdigest())
    if len(path) > MAX_SOCKET_PATH:
        raise InvalidArgument(f"socket path longer than {MAX_SOCKET_PATH} bytes: {path}")
    return path


def can_connect(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(CONNECT_TIMEOUT)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def listen(path: str) -> socket.socket | None:
    """A listening socket at ``path`` (mode 0600); None if a daemon already listens there."""
    if can_connect(path):
        return None
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise AlreadyExists(f"{path} exists and is not a socket")
        os.unlink(path)  # stale: nobody accepted our connection
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE and can_connect(path):
            return None  # a concurrent start won the race
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def write_address(bundle: str, address: str) -> None:
    """``<bundle>/address``, atomically: containerd 1.6/1.7 reconnect from it."""
    _write_atomically(os.path.join(bundle, ADDRESS_FILE), address)


def _write_atomically(target: str, text: str) -> None:
    tmp = target + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, target)


def read_config_path(bundle: str) -> str | None:
    """The configuration file ``start`` was given for this bundle, if any."""
    try:
        with open(os.path.join(bundle, CONFIG_PATH_FILE)) as f:
            return f.read(4096).strip() or None
    except OSError:
        return None


def containerd_version(binary: str, timeout: float = VERSION_TIMEOUT) -> tuple[int, int] | None:
    """(major, minor) from ``<binary> --version``; None if it cannot tell in time."""
    if not binary:
        return None
    import subprocess

    try:
        out = subprocess.run(
            [binary, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        ).stdout.decode(errors="replace")
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("start: %s --version: %s", binary, exc)
        return None
    # "containerd <package> <version> <revision>", e.g. "… v2.1.0 abc" or "… 1.6.20~ds1 …".
    fields = out.split()
    candidates = fields[2:3] + fields
    for text in candidates:
        match = re.match(r"v?(\d+)\.(\d+)(?:\.|$|[~+-])", text)
        if match:
            return int(match.group(1)), int(match.group(2))
    return None


def reply(address: str, params: BootstrapParams | None, version: tuple[int, int] | None) -> bytes:
    """What ``start`` prints: see the module docstring."""
    if params is not None:
        from shimv2.pb.containerd.runtime.bootstrap.v1.bootstrap_pb2 import BootstrapResult

        result = BootstrapResult(version=TASK_API_VERSION, address=address, protocol="ttrpc")
        return result.SerializeToString()
    if version is not None and version >= (2, 0):
        return json.dumps(
            {"version": TASK_API_VERSION, "address": address, "protocol": "ttrpc"},
            separators=(",", ":"),
        ).encode()
    return address.encode()


def _oom_score_adj(pid: int) -> None:
    """The daemon is killed before containerd: one more than ours, at most 1000."""
    try:
        with open("/proc/self/oom_score_adj") as f:
            score = int(f.read().strip())
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(min(score + 1, 1000)))
    except (OSError, ValueError) as exc:
        log.debug("start: oom_score_adj of %d: %s", pid, exc)


def spawn_daemon(
    entry: Sequence[str],
    argv: Sequence[str],
    bundle: str,
    sock: socket.socket,
    env: Mapping[str, str],
) -> int:
    """Start the daemon: ``sock`` as fd 3, a new session, stdio not ours, SIGTERM blocked.

    stdout and stderr go to the log FIFO when containerd reads one, else /dev/null.
    A warm shim server (``shimv2.shim.warm_server``), when one runs, forks it instead.
    """
    # Above 3, so that dup2(…, 3) really clears close-on-exec.
    sock_fd = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 4)
    out_fd = open_log_fifo(os.path.join(bundle, LOG_FIFO))
    if out_fd is None:
        out_fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        server = env.get(WARM_SHIMS_ENV) or warm.SOCKET
        pid = warm.request_daemon(argv, env, bundle, sock_fd, out_fd, server)
        if pid is not None:
            log.info("start: a warm shim, forked by the server at %s", server)
            _oom_score_adj(pid)
            return pid
        pid = os.posix_spawn(
            entry[0],
            [*entry, *argv],
            dict(env),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, out_fd, 1),
                (os.POSIX_SPAWN_DUP2, out_fd, 2),
                (os.POSIX_SPAWN_DUP2, sock_fd, 3),
            ],
            setsid=True,
            # Until its handlers are in place: an early SIGTERM then still shuts it
            # down cleanly (socket removed) instead of killing it mid-import.
            setsigmask=SHUTDOWN_SIGNALS,
        )
    finally:
        os.close(sock_fd)
        os.close(out_fd)
    _oom_score_adj(pid)
    return pid


def start(
    flags: Flags,
    stdin: bytes,
    env: Mapping[str, str],
    *,
    entry: Sequence[str] | None = None,
    socket_root: str = SOCKET_ROOT,
) -> bytes:
    """Run ``start``; returns the reply for stdout.

    Errors: ``InvalidArgument`` for missing flags or a bad config.json; OS errors
    from creating the socket or spawning the daemon.
    """
    if not flags.id or not flags.namespace or not flags.address:
        raise InvalidArgument("start needs -id, -namespace and -address")
    bundle = flags.bundle or os.getcwd()
    given = decode_stdin(stdin, flags)
    if given.params is not None and given.params.HasField("socket_dir"):
        socket_root = given.params.socket_dir or socket_root
    group = group_id(flags.id, read_annotations(bundle))
    path = socket_path(flags.address, flags.namespace, group, socket_root)
    address = f"unix://{path}"

    sock = listen(path)
    if sock is None:
        log.info("start: %s joins the shim of %s at %s", flags.id, group, address)
    else:
        child_env = dict(env)
        config_path = config_path_from(given.options)
        if config_path:
            child_env[CONFIG_ENV] = config_path
            _write_atomically(os.path.join(bundle, CONFIG_PATH_FILE), config_path)
        if flags.ttrpc_address:
            child_env.setdefault("TTRPC_ADDRESS", flags.ttrpc_address)
        try:
            pid = spawn_daemon(
                entry or default_entry(), flags.daemon_argv(bundle), bundle, sock, child_env
            )
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        finally:
            sock.close()
        log.info("start: shim daemon %d for %s listens at %s", pid, group, address)
    write_address(bundle, address)
    version = None if given.params is not None else containerd_version(flags.publish_binary)
    return reply(address, given.params, version)
