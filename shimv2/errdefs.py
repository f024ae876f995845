"""Errors that carry a status code.

Every layer raises these; the ttrpc server turns them into a ``google.rpc.Status``
in exactly one place (``shimv2.ttrpc._status``), and the client turns a status
back into the matching class, so callers match on type, never on message text.
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar


class Code(IntEnum):
    """gRPC status codes, as ttrpc and containerd's errdefs use them."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class Error(Exception):
    """Base of all coded errors; ``code`` decides the status on the wire."""

    code: ClassVar[Code] = Code.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class Cancelled(Error):
    code = Code.CANCELLED


class Unknown(Error):
    code = Code.UNKNOWN


class InvalidArgument(Error):
    code = Code.INVALID_ARGUMENT


class DeadlineExceeded(Error):
    code = Code.DEADLINE_EXCEEDED


class NotFound(Error):
    code = Code.NOT_FOUND


class AlreadyExists(Error):
    code = Code.ALREADY_EXISTS


class PermissionDenied(Error):
    code = Code.PERMISSION_DENIED


class ResourceExhausted(Error):
    code = Code.RESOURCE_EXHAUSTED


class FailedPrecondition(Error):
    code = Code.FAILED_PRECONDITION


class Aborted(Error):
    code = Code.ABORTED


class OutOfRange(Error):
    code = Code.OUT_OF_RANGE


class Unimplemented(Error):
    code = Code.UNIMPLEMENTED


class Internal(Error):
    code = Code.INTERNAL


class Unavailable(Error):
    code = Code.UNAVAILABLE


class DataLoss(Error):
    code = Code.DATA_LOSS


class Unauthenticated(Error):
    code = Code.UNAUTHENTICATED


_BY_CODE: dict[Code, type[Error]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def error_for(code: int, message: str) -> Error:
    """The error class for a status code; an unknown number becomes ``Unknown``."""
    try:
        cls = _BY_CODE[Code(code)]
    except (ValueError, KeyError):
        return Unknown(f"code {code}: {message}")
    return cls(message)
