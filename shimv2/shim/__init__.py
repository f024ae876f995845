"""The generic containerd shim runtime: bootstrap, socket, events, shutdown.

``run`` is the whole program: ``start`` (bootstrap), ``delete`` (cleanup) or,
with no action, the per-pod daemon. Each mode's modules are imported only when
that mode runs: ``start`` must answer containerd quickly.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from shimv2.shim import clean_exit

if TYPE_CHECKING:
    from shimv2.shim.flags import Flags

PROGRAM = "containerd-shim-kata-py-v2"


def _fail(message: str) -> int:
    print(f"{PROGRAM}: {message}", file=sys.stderr)
    return 1


def run(argv: Sequence[str] | None = None, *, warm: bool = True) -> int:
    """The shim's main; returns the exit status. ``warm``: a warm shim server may run
    ``delete`` (not when this is that server's child already)."""
    args = sys.argv[1:] if argv is None else argv
    if (done := clean_exit.answer(args, os.getcwd())) is not None:
        sys.stdout.buffer.write(done)
        sys.stdout.flush()
        return 0
    from shimv2.errdefs import Error
    from shimv2.shim.flags import parse

    try:
        flags = parse(args, os.environ)
    except Error as exc:
        return _fail(exc.message)
    if flags.version:
        from shimv2.cli import package_version

        print(f"{PROGRAM} {package_version()}")
        return 0
    if flags.info:
        return _info()
    if flags.action == "start":
        return _start(flags)
    if flags.action == "delete":
        return _delete(flags, args, warm)
    from shimv2.shim import daemon

    return daemon.run(flags)


def _info() -> int:
    from shimv2.cli import package_version
    from shimv2.errdefs import Error
    from shimv2.shim.info import runtime_info

    try:
        output = runtime_info(sys.stdin.buffer.read(), package_version())
    except Error as exc:
        return _fail(exc.message)
    sys.stdout.buffer.write(output)
    sys.stdout.flush()
    return 0


def _setup_log(flags: Flags) -> None:
    """Log to containerd's FIFO when it reads one; never to stdout or stderr."""
    from shimv2.shim import logging as shim_logging

    bundle = flags.bundle or os.getcwd()
    fd = shim_logging.open_log_fifo(os.path.join(bundle, shim_logging.LOG_FIFO))
    fields = {"id": flags.id, "namespace": flags.namespace, "action": flags.action}
    shim_logging.setup(fd, debug=flags.debug, fields=fields)


def _start(flags: Flags) -> int:
    import logging

    from shimv2.errdefs import Error
    from shimv2.shim import bootstrap

    _setup_log(flags)
    try:
        output = bootstrap.start(flags, sys.stdin.buffer.read(), os.environ)
    except (Error, OSError) as exc:
        logging.getLogger(__name__).error("start %s failed: %s", flags.id, exc)
        return _fail(f"start {flags.id}: {exc}")
    sys.stdout.buffer.write(output)
    sys.stdout.flush()
    return 0


def _delete(flags: Flags, argv: Sequence[str], warm: bool) -> int:
    if warm:
        from shimv2.shim import warm as warm_shims

        server = os.environ.get(warm_shims.ENV) or warm_shims.SOCKET
        status = warm_shims.request_delete(argv, os.environ, os.getcwd(), server)
        if status is not None:
            return status
    import logging

    from shimv2.shim import cleanup

    _setup_log(flags)
    try:
        output = cleanup.delete(flags)
    except Exception as exc:
        logging.getLogger(__name__).exception("delete %s failed", flags.id)
        return _fail(f"delete {flags.id}: {exc}")
    sys.stdout.buffer.write(output)
    sys.stdout.flush()
    return 0
