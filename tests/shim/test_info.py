"""``-info``: the RuntimeInfo containerd's introspection reads, from the real binary."""

from __future__ import annotations

import json
import subprocess
import sys

from google.protobuf.any_pb2 import Any as AnyPb

from shimv2.pb.containerd.types.introspection_pb2 import RuntimeInfo
from shimv2.pb.containerd.types.runtimeoptions.v1.api_pb2 import Options
from shimv2.shim.info import FEATURES_TYPE_URL, RUNTIME_NAME

SHIM = f"{sys.executable.rsplit('/', 1)[0]}/containerd-shim-kata-py-v2"


def info(stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([SHIM, "-info"], input=stdin, capture_output=True, timeout=30)


def test_info_says_what_the_runtime_supports() -> None:
    out = info(b"")
    assert out.returncode == 0, out.stderr
    runtime = RuntimeInfo.FromString(out.stdout)
    assert runtime.name == RUNTIME_NAME
    assert runtime.version.version == "0.1.0"
    assert not runtime.HasField("options")
    assert runtime.features.type_url == FEATURES_TYPE_URL
    features = json.loads(runtime.features.value)
    # CRI reads these two: recursive read-only mounts yes, user namespaces no.
    assert "rro" in features["mountOptions"]
    assert "rshared" not in features["mountOptions"]  # taken as rslave: not claimed
    assert "user" not in features["linux"]["namespaces"]
    assert features["linux"]["mountExtensions"]["idmap"]["enabled"] is False


def test_info_returns_the_options_it_was_given() -> None:
    given = AnyPb()
    given.Pack(Options(config_path="/etc/kata-py/other.toml"))
    out = info(given.SerializeToString())
    assert out.returncode == 0, out.stderr
    back = Options()
    assert RuntimeInfo.FromString(out.stdout).options.Unpack(back)
    assert back.config_path == "/etc/kata-py/other.toml"


def test_info_refuses_options_that_are_not_an_any() -> None:
    out = info(b"\xff\xff\xff")
    assert out.returncode == 1
    assert out.stdout == b""
    assert b"not a protobuf Any" in out.stderr
