"""A daemon that ended with nothing left says so in its bundle; ``delete`` then answers at once.

containerd 1.6 runs ``<shim> delete`` after every shim that ends, a clean one
included, and ``ctr run --rm`` waits for it: ~70 ms of Python start and imports
here (the warm server's child included) to find nothing to clean. A daemon
whose sandboxes are all gone (state, VM, sockets) leaves ``MARKER`` in its
bundle as it exits; ``delete`` on that bundle answers from it alone, before it
imports anything of weight. Without the marker, ``delete`` cleans up as ever.
The bundle is containerd's (root's), and the guest has no way to it.

Only ``os``, ``sys`` and ``time`` here: this runs first in every shim process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

MARKER = "kata-py-clean-exit"
KILLED_STATUS = 128 + 9  # what the runc shim's delete answers (SIGKILL)


def mark(bundle: str) -> None:
    """Leave the marker in ``bundle`` (the daemon's own, as it exits cleanly)."""
    import contextlib

    with contextlib.suppress(OSError):  # the bundle is gone already: nobody asks then
        os.close(os.open(os.path.join(bundle, MARKER), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC))


def answer(argv: Sequence[str], cwd: str) -> bytes | None:
    """The ``DeleteResponse`` for a ``delete`` of a bundle its daemon left clean, else None.

    The bundle is ``-bundle``'s value, else the working directory (containerd
    runs ``delete`` there); anything this cannot read goes the long way.
    """
    if not argv or argv[-1] != "delete":
        return None
    bundle = cwd
    for i, arg in enumerate(argv[:-1]):
        name, eq, value = arg.lstrip("-").partition("=")
        if name == "bundle" and arg.startswith("-"):
            if not eq:
                if i + 1 >= len(argv) - 1:
                    return None
                value = argv[i + 1]
            bundle = value
    if not bundle or not os.path.isfile(os.path.join(bundle, MARKER)):
        return None
    return delete_response(KILLED_STATUS, time.time_ns())


def delete_response(exit_status: int, exited_at_ns: int) -> bytes:
    """containerd's ``DeleteResponse{pid: 0, exit_status, exited_at}``, serialized.

    By hand: the generated class would cost its import (~20 ms) in every
    ``delete``. Fields 2 (varint) and 3 (a ``Timestamp``: 1 seconds, 2 nanos).
    """
    seconds, nanos = divmod(exited_at_ns, 1_000_000_000)
    stamp = b"".join(_field(number, value) for number, value in ((1, seconds), (2, nanos)) if value)
    out = _field(2, exit_status) if exit_status else b""
    return out + _tag(3, 2) + _varint(len(stamp)) + stamp


def _field(number: int, value: int) -> bytes:
    return _tag(number, 0) + _varint(value)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)
