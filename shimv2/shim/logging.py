"""The shim's log: containerd's FIFO ``<bundle>/log``, in logrus-style logfmt lines.

containerd creates the FIFO before ``start`` and copies what it reads into its
own log (cd core/runtime/v2/shim.go ``openShimLog``). Lines look like the Go
shims' ``time="…" level=info msg="…"`` so they read the same in containerd's log.

Writes never raise: a log line that cannot be written (containerd restarted
and nobody reads the FIFO) is lost rather than failing the shim.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import re

LOG_FIFO = "log"
_BARE = re.compile(r"^[A-Za-z0-9._/@^+-]+$")
_LEVELS = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "fatal",
}


def open_log_fifo(path: str) -> int | None:
    """Open the FIFO for writing without blocking; None if absent or nobody reads it.

    O_NONBLOCK only for the open (a blocking open waits for a reader forever),
    then cleared so that writes keep their order and are never partial.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENXIO, errno.EACCES, errno.ENOTDIR):
            return None
        raise
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    return fd


def _quote(value: str) -> str:
    return value if _BARE.match(value) else json.dumps(value, ensure_ascii=False)


class LogfmtFormatter(logging.Formatter):
    """``time="<RFC3339 nanoseconds>" level=<name> msg="…" [key=value…]``."""

    def __init__(self, fields: dict[str, str] | None = None) -> None:
        super().__init__()
        self._fields = dict(fields or {})

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created).astimezone()
        stamp = when.isoformat(timespec="microseconds")
        # Go's RFC3339NanoFixed has nine fraction digits.
        stamp = stamp[:26] + "000" + stamp[26:].replace("+00:00", "Z")
        level = _LEVELS.get(record.levelno, record.levelname.lower())
        msg = record.getMessage()
        if record.exc_info:
            msg = f"{msg}\n{self.formatException(record.exc_info)}"
        parts = [f'time="{stamp}"', f"level={level}", f"msg={_quote(msg)}"]
        parts += [f"{key}={_quote(value)}" for key, value in self._fields.items()]
        parts.append(f"logger={_quote(record.name)}")
        return " ".join(parts)


class FdHandler(logging.Handler):
    """Writes each line with one ``write(2)`` to a raw fd; never raises."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode(errors="replace")
            while data:
                data = data[os.write(self.fd, data) :]
        except Exception:
            pass  # nobody reads the log (or it is full and broken): drop the line


def setup(fd: int | None, *, debug: bool, fields: dict[str, str] | None = None) -> None:
    """Send every log record to ``fd`` in logfmt; to nowhere when ``fd`` is None.

    Never to stdout or stderr by accident: ``start``'s output is what containerd
    parses, so the root logger always has a handler (no ``lastResort``).
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler = logging.NullHandler() if fd is None else FdHandler(fd)
    handler.setFormatter(LogfmtFormatter(fields))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
