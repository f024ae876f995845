"""The OCI spec: protobuf ``grpc.Spec`` (Go field names) ⇄ runtime-spec JSON (config.json).

One rule names almost every JSON key: the Go field name with its leading
capitals lowered (``UIDMappings`` → ``uidMappings``, ``CPU`` → ``cpu``,
``OOMScoreAdj`` → ``oomScoreAdj``). ``JSON_NAMES`` lists the exceptions, and
``REQUIRED`` the fields that specs-go/config.go writes even when zero (no
``omitempty``); every other zero, empty or unset field is left out, as Go does.

Error handling: ``spec_from_json`` raises ``InvalidArgument`` for JSON that does
not fit the messages (wrong types, out-of-range numbers).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from shimv2.errdefs import InvalidArgument
from shimv2.pb.kata import oci_pb2

# (message name, proto field) -> JSON key, where the rule gets it wrong.
JSON_NAMES: dict[tuple[str, str], str] = {
    ("Spec", "Version"): "ociVersion",
    ("LinuxHugepageLimit", "Pagesize"): "pageSize",
    ("LinuxSyscall", "errnoret"): "errnoRet",
}

# Fields written even when zero (no omitempty in specs-go), by message name.
REQUIRED: dict[str, frozenset[str]] = {
    "Spec": frozenset({"Version"}),
    "Process": frozenset({"User", "Cwd"}),
    "User": frozenset({"UID", "GID"}),
    "Box": frozenset({"Height", "Width"}),
    "POSIXRlimit": frozenset({"Type", "Hard", "Soft"}),
    "Root": frozenset({"Path"}),
    "Mount": frozenset({"destination"}),
    "Hook": frozenset({"Path"}),
    "LinuxIDMapping": frozenset({"HostID", "ContainerID", "Size"}),
    "LinuxNamespace": frozenset({"Type"}),
    "LinuxDevice": frozenset({"Path", "Type", "Major", "Minor"}),
    "LinuxDeviceCgroup": frozenset({"Allow"}),
    "LinuxPids": frozenset({"Limit"}),
    "LinuxWeightDevice": frozenset({"Major", "Minor"}),
    "LinuxThrottleDevice": frozenset({"Major", "Minor", "Rate"}),
    "LinuxHugepageLimit": frozenset({"Pagesize", "Limit"}),
    "LinuxInterfacePriority": frozenset({"Name", "Priority"}),
    "LinuxSyscall": frozenset({"Names", "Action"}),
    "LinuxSeccompArg": frozenset({"Index", "Value", "Op"}),
}

# Device cgroup numbers: unset (0, or Kata's -1) means "any", left out of the JSON.
WILDCARD_BELOW_ZERO: frozenset[tuple[str, str]] = frozenset(
    {("LinuxDeviceCgroup", "Major"), ("LinuxDeviceCgroup", "Minor")}
)

# Never written: Solaris and Windows are placeholders on a Linux guest.
SKIPPED: frozenset[tuple[str, str]] = frozenset({("Spec", "Solaris"), ("Spec", "Windows")})

_LEADING_CAPS = re.compile(r"^([A-Z0-9]+)(?=[A-Z][a-z]|$)|^[A-Z]")


@functools.cache
def json_name(message: str, field: str) -> str:
    """The runtime-spec JSON key of a proto field of ``message``."""
    special = JSON_NAMES.get((message, field))
    if special is not None:
        return special
    return _LEADING_CAPS.sub(lambda m: m.group(0).lower(), field, count=1)


def message_to_json(msg: Message) -> dict[str, Any]:
    """Any message of oci.proto as its runtime-spec JSON object."""
    desc: Any = msg.DESCRIPTOR
    name = desc.name
    out: dict[str, Any] = {}
    # ListFields: only what is set (non-empty, non-default, or present), from
    # protobuf's C code; walking every field in Python costs ~10x under TCG.
    for field, value in msg.ListFields():
        if (name, field.name) in SKIPPED:
            continue
        if (name, field.name) in WILDCARD_BELOW_ZERO and value <= 0:
            continue
        out[json_name(name, field.name)] = _to_json(msg, field, value)
    for field_name in REQUIRED.get(name, ()):
        key = json_name(name, field_name)
        if key not in out:
            field = desc.fields_by_name[field_name]
            out[key] = _to_json(msg, field, getattr(msg, field_name))
    return out


def _to_json(msg: Message, field: Any, value: Any) -> Any:
    if _is_map(msg, field):
        value_field = field.message_type.fields_by_name["value"]
        return {k: _scalar_or_message(value_field, v) for k, v in value.items()}
    if _is_repeated(field):
        return [_scalar_or_message(field, v) for v in value]
    return _scalar_or_message(field, value)


def _scalar_or_message(field: Any, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_to_json(value)
    return value


def _is_repeated(field: Any) -> bool:
    return bool(field.is_repeated)


def _is_map(msg: Message, field: Any) -> bool:
    # By its container: the descriptor's map_entry option (GetOptions) would import
    # descriptor_pb2, ~1.5 MiB in every shim and agent, at the first container.
    return (
        _is_repeated(field)
        and field.type == FieldDescriptor.TYPE_MESSAGE
        and isinstance(getattr(msg, field.name), Mapping)
    )


def message_from_json(msg: Message, obj: Any, path: str = "") -> None:
    """Fill ``msg`` from its runtime-spec JSON; unknown keys are ignored."""
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{path or 'spec'}: expected an object")
    desc: Any = msg.DESCRIPTOR
    for field in desc.fields:
        key = json_name(desc.name, field.name)
        if key not in obj or obj[key] is None:
            continue
        value = obj[key]
        where = f"{path}.{key}" if path else key
        try:
            if _is_map(msg, field):
                if not isinstance(value, dict):
                    raise InvalidArgument(f"{where}: expected an object")
                target = getattr(msg, field.name)
                for k, v in value.items():
                    target[k] = v
            elif _is_repeated(field):
                if not isinstance(value, list):
                    raise InvalidArgument(f"{where}: expected a list")
                target = getattr(msg, field.name)
                for i, item in enumerate(value):
                    if field.type == FieldDescriptor.TYPE_MESSAGE:
                        message_from_json(target.add(), item, f"{where}[{i}]")
                    else:
                        target.append(item)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                message_from_json(getattr(msg, field.name), value, where)
                getattr(msg, field.name).SetInParent()
            else:
                setattr(msg, field.name, value)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"{where}: {exc}") from exc


def spec_to_json(spec: oci_pb2.Spec) -> dict[str, Any]:
    """A ``grpc.Spec`` as the runtime-spec ``config.json`` object."""
    return message_to_json(spec)


# The newest runtime-spec version the guest's runtimes accept (Debian's crun 1.8
# refuses "1.2.0" and later with "unknown version specified"). The config.json
# the agent writes holds only fields of Kata's oci.proto, all of which 1.1
# defines, so a newer 1.x from the host (containerd 2.2+ sends "1.3.0") is
# written as this one.
NEWEST_WRITTEN_VERSION = (1, 1, 0)
_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)(?:-[0-9A-Za-z.+-]*)?")


def written_version(requested: str) -> str:
    """The ``ociVersion`` to write for a spec the host sent as ``requested``."""
    if not requested:
        return "1.0.2"
    match = _VERSION.fullmatch(requested)
    if match is None or match.group(1) != "1":
        raise InvalidArgument(f"unsupported OCI spec version {requested!r}: want 1.x.y")
    if tuple(map(int, match.groups())) > NEWEST_WRITTEN_VERSION:
        return ".".join(map(str, NEWEST_WRITTEN_VERSION))
    return requested


_NET_SYSCTL = re.compile(r"net(?:\.[A-Za-z0-9_-]+)+")


def take_shared_net_sysctls(config: dict[str, Any]) -> dict[str, str]:
    """Remove and return the ``net.*`` sysctls of a container that shares the guest's network.

    The host drops the pod's network namespace from the spec: in the VM the
    guest's own network namespace is the pod's. Runtimes refuse ``net.*``
    sysctls without a new network namespace (CRI sets
    ``net.ipv4.ping_group_range`` on every pod), so the agent sets them on the
    guest's namespace itself, which is where the pod's sysctls belong.
    """
    linux = config.get("linux") or {}
    if any(ns.get("type") == "network" for ns in linux.get("namespaces") or []):
        return {}
    sysctls: dict[str, str] = linux.get("sysctl") or {}
    taken = {k: v for k, v in sysctls.items() if k.startswith("net.")}
    for key in taken:
        if not _NET_SYSCTL.fullmatch(key):
            raise InvalidArgument(f"bad sysctl name {key[:100]!r}")
        del sysctls[key]
    return taken


def spec_from_json(obj: Any) -> oci_pb2.Spec:
    spec = oci_pb2.Spec()
    message_from_json(spec, obj)
    return spec


def process_to_json(process: oci_pb2.Process) -> dict[str, Any]:
    """A ``grpc.Process`` as the runtime-spec ``process`` object (``--process`` file)."""
    return message_to_json(process)


def resources_to_json(resources: oci_pb2.LinuxResources) -> dict[str, Any]:
    """``grpc.LinuxResources`` as the runtime-spec ``linux.resources`` object."""
    return message_to_json(resources)
