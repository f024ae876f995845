"""containerd's shim command line, parsed the way Go's ``flag`` package does.

containerd runs ``<binary> -namespace NS -address ADDR -publish-binary BIN -id ID
[-debug] start`` (cd pkg/shim/util.go ``Command``), and ``... -bundle DIR delete``.
Flags take one or two dashes, ``-flag value`` or ``-flag=value``; booleans take
only ``-flag`` or ``-flag=true|false``. Parsing stops at the first non-flag
argument (the action) or at ``--``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from shimv2.errdefs import InvalidArgument

ACTIONS = ("start", "delete")

_STRING_FLAGS = {
    "namespace": "namespace",
    "address": "address",
    "publish-binary": "publish_binary",
    "id": "id",
    "bundle": "bundle",
    "socket": "socket",
}
_BOOL_FLAGS = {"debug": "debug", "v": "version", "info": "info"}
_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_FALSE = ("0", "f", "F", "FALSE", "false", "False")


# A NamedTuple, not a dataclass: ``start`` would pay ~10 ms to import dataclasses.
class Flags(NamedTuple):
    namespace: str = ""
    address: str = ""
    publish_binary: str = ""
    id: str = ""
    bundle: str = ""
    socket: str = ""
    debug: bool = False
    version: bool = False
    info: bool = False
    # "start", "delete", or "" for the long-lived daemon.
    action: str = ""
    # From the environment containerd sets (cd pkg/shim/util.go).
    ttrpc_address: str = ""
    grpc_address: str = ""
    max_shim_version: int | None = None

    def daemon_argv(self, bundle: str) -> list[str]:
        """The flags the daemon is re-executed with: the same, plus ``-bundle``, no action."""
        argv = ["-namespace", self.namespace, "-id", self.id, "-address", self.address]
        if self.publish_binary:
            argv += ["-publish-binary", self.publish_binary]
        argv += ["-bundle", bundle]
        if self.debug:
            argv.append("-debug")
        return argv


def _parse_bool(name: str, value: str) -> bool:
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InvalidArgument(f"invalid boolean value {value!r} for flag -{name}")


def parse(argv: Sequence[str], env: Mapping[str, str]) -> Flags:
    """Parse ``argv`` (without the program name) and the environment.

    Errors: ``InvalidArgument`` for an unknown flag, a missing value, a bad
    boolean, an unknown action or an unparsable ``MAX_SHIM_VERSION``.
    """
    values: dict[str, str | bool] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest = list(argv[i + 1 :])
            break
        if len(arg) < 2 or arg[0] != "-" or arg == "-" or arg.startswith("---"):
            rest = list(argv[i:])
            break
        name = arg[2:] if arg.startswith("--") else arg[1:]
        name, eq, value = name.partition("=")
        if name in _BOOL_FLAGS:
            values[_BOOL_FLAGS[name]] = _parse_bool(name, value) if eq else True
        elif name in _STRING_FLAGS:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise InvalidArgument(f"flag needs an argument: -{name}")
                value = argv[i]
            values[_STRING_FLAGS[name]] = value
        else:
            raise InvalidArgument(f"flag provided but not defined: -{name}")
        i += 1

    action = rest[0] if rest else ""
    if action and action not in ACTIONS:
        raise InvalidArgument(f"unknown action {action!r}: expected one of {', '.join(ACTIONS)}")

    address = str(values.get("address", ""))
    namespace = str(values.get("namespace", "")) or env.get("NAMESPACE", "")
    ttrpc = env.get("TTRPC_ADDRESS", "") or (address + ".ttrpc" if address else "")
    max_version: int | None = None
    if env.get("MAX_SHIM_VERSION"):
        try:
            max_version = int(env["MAX_SHIM_VERSION"])
        except ValueError:
            raise InvalidArgument(
                f"MAX_SHIM_VERSION is not a number: {env['MAX_SHIM_VERSION']!r}"
            ) from None
    return Flags(
        namespace=namespace,
        address=address,
        publish_binary=str(values.get("publish_binary", "")),
        id=str(values.get("id", "")),
        bundle=str(values.get("bundle", "")),
        socket=str(values.get("socket", "")),
        debug=bool(values.get("debug", False)),
        version=bool(values.get("version", False)),
        info=bool(values.get("info", False)),
        action=action,
        ttrpc_address=ttrpc,
        grpc_address=env.get("GRPC_ADDRESS", "") or address,
        max_shim_version=max_version,
    )
