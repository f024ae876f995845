"""The one place where exceptions become ``google.rpc.Status`` and back."""

from __future__ import annotations

import sys

from shimv2.errdefs import Code, Error, error_for
from shimv2.pb.google.rpc.status_pb2 import Status


def status_from_exception(exc: BaseException) -> Status:
    """Map a handler's exception to the status sent to the peer.

    Coded errors keep their code and message; a trio or asyncio deadline is
    DEADLINE_EXCEEDED; anything else is a bug on our side and goes out as
    UNKNOWN with its text, as Go's ttrpc does for plain errors.
    """
    if isinstance(exc, Error):
        return Status(code=exc.code, message=exc.message)
    if isinstance(exc, TimeoutError):  # asyncio's, in the guest agent
        return Status(code=Code.DEADLINE_EXCEEDED, message="deadline exceeded")
    # The guest agent runs without trio; only look for its deadline when loaded.
    trio = sys.modules.get("trio")
    if trio is not None and isinstance(exc, trio.TooSlowError):
        return Status(code=Code.DEADLINE_EXCEEDED, message="deadline exceeded")
    if isinstance(exc, NotImplementedError):
        return Status(code=Code.UNIMPLEMENTED, message=str(exc) or "not implemented")
    return Status(code=Code.UNKNOWN, message=f"{type(exc).__name__}: {exc}")


def error_from_status(status: Status) -> Error:
    return error_for(status.code, status.message)
