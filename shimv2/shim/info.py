"""``-info``: what this runtime supports, for containerd's introspection.

containerd 2.x runs ``<shim> -info`` with the runtime's options (a protobuf
``Any``, possibly empty) on stdin and reads a ``containerd.types.RuntimeInfo``
from stdout. Its CRI plugin turns the OCI ``features`` (runtime-spec
features.md, JSON in an ``Any``) into the handler's features: recursive
read-only mounts when ``mountOptions`` holds ``rro``, user namespaces when
idmapped mounts and the user namespace are listed (neither here).
"""

from __future__ import annotations

import json

from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.message import DecodeError

from shimv2.errdefs import InvalidArgument
from shimv2.pb.containerd.types.introspection_pb2 import RuntimeInfo, RuntimeVersion

RUNTIME_NAME = "io.containerd.kata-py.v2"
FEATURES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
MAX_OPTIONS = 1 << 20

# What a container of a kata-py pod gets. Mounts: binds are made on the host
# (shimv2.vc.storage: ro/nosuid/nodev/noexec on the top mount, their r-forms on
# the whole tree; rshared is taken as rslave, so not listed); the rest reach
# crun in the guest.
# Namespaces: the guest's; no user namespace (no idmapped mounts over virtio-fs).
FEATURES: dict[str, object] = {
    "ociVersionMin": "1.0.0",
    "ociVersionMax": "1.1.0",
    "hooks": [],
    "mountOptions": [
        "bind", "rbind", "ro", "rw", "rro", "rrw", "nosuid", "suid", "rnosuid", "rsuid",
        "nodev", "dev", "rnodev", "rdev", "noexec", "exec", "rnoexec", "rexec",
        "private", "rprivate", "slave", "rslave",
        "noatime", "relatime", "strictatime", "nodiratime",
    ],
    "linux": {
        "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts"],
        "cgroup": {"v1": True, "v2": True},
        "mountExtensions": {"idmap": {"enabled": False}},
    },
}  # fmt: skip


def runtime_info(options: bytes, version: str) -> bytes:
    """The serialized ``RuntimeInfo`` for ``-info``; ``options`` is what stdin held."""
    info = RuntimeInfo(name=RUNTIME_NAME, version=RuntimeVersion(version=version))
    if options:
        if len(options) > MAX_OPTIONS:
            raise InvalidArgument(f"-info: options of {len(options)} bytes")
        given = AnyPb()
        try:
            given.ParseFromString(options)
        except DecodeError as exc:
            raise InvalidArgument(f"-info: options are not a protobuf Any: {exc}") from None
        info.options.CopyFrom(given)
    info.features.type_url = FEATURES_TYPE_URL
    info.features.value = json.dumps(FEATURES, separators=(",", ":")).encode()
    return info.SerializeToString()
