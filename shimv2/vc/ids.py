"""Ids from containerd are validated before they touch a path."""

from __future__ import annotations

import re

from shimv2.errdefs import InvalidArgument

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,75}")


class NeedSandboxID(InvalidArgument):
    def __init__(self) -> None:
        super().__init__("need sandbox id")


class NeedContainerID(InvalidArgument):
    def __init__(self) -> None:
        super().__init__("need container id")


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a safe id; InvalidArgument otherwise.

    One to 76 characters, starting alphanumeric, then ``[A-Za-z0-9_.-]``: no
    slash, no leading dot, so never ``..`` or an absolute path.
    """
    if not _ID.fullmatch(value):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise InvalidArgument(f"invalid {what} {shown!r}: want ^[A-Za-z0-9][A-Za-z0-9_.-]{{0,75}}$")
    return value


def sandbox_id(value: str) -> str:
    if not value:
        raise NeedSandboxID()
    return check_id(value, "sandbox id")


def container_id(value: str) -> str:
    if not value:
        raise NeedContainerID()
    return check_id(value, "container id")
