"""The shim's paths load only what they use: ``start`` no trio nor protobuf (containerd
waits on it), ``delete`` no trio nor virtcontainers when there is nothing to clean
(containerd runs it after every shim, and ``ctr run --rm`` waits for it), the daemon
no pyroute2, OpenTelemetry, h11 or stats until a pod needs them."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tests.imports import imported_by, loaded

# Never on any of these paths until used.
OPTIONAL = ("pyroute2", "opentelemetry", "h11", "prometheus_client")

START = """
import os, socket
from shimv2.shim import run  # what the console script imports
from shimv2.shim import bootstrap
from shimv2.shim.flags import Flags

bundle, root = sys.argv[1], sys.argv[2]
flags = Flags(namespace="default", address="/run/x/containerd.sock", id="c1", bundle=bundle)
out = bootstrap.start(flags, b"", {}, entry=["/bin/true"], socket_root=root)
assert out.startswith(b"unix://" + root.encode()), out
"""


def test_start_with_nothing_on_stdin_loads_neither_trio_nor_protobuf(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with tempfile.TemporaryDirectory(dir="/tmp") as root:  # a socket path fits in 106 bytes
        modules = imported_by(START, str(tmp_path), root)
    assert "shimv2.shim.bootstrap" in modules
    assert not loaded(modules, "trio", "google.protobuf", "shimv2.pb", *OPTIONAL)
    # Nor what only the daemon or a containerd 1.x version probe needs.
    assert not loaded(modules, "dataclasses", "subprocess", "asyncio", "shimv2.vc")


def test_protobuf_comes_with_something_to_decode() -> None:
    code = """
from shimv2.shim import bootstrap
from shimv2.shim.flags import Flags
from shimv2.pb.containerd.runtime.bootstrap.v1.bootstrap_pb2 import BootstrapParams
data = BootstrapParams(instance_id="c1", namespace="ns").SerializeToString()
assert bootstrap.decode_stdin(data, Flags(id="c1", namespace="ns")).params is not None
"""
    assert "google.protobuf" in imported_by(code)


DELETE = """
from shimv2.shim import cleanup
from shimv2.shim.flags import Flags
from shimv2.vc.config import Config, RuntimeConfig

bundle, state = sys.argv[1], sys.argv[2]
config = Config(runtime=RuntimeConfig(state_dir=state))
out = cleanup.delete(Flags(namespace="default", id="c1", bundle=bundle), config)
assert out, out
"""


def test_delete_with_nothing_to_clean_loads_neither_trio_nor_virtcontainers(
    tmp_path: Path,
) -> None:
    (tmp_path / "bundle").mkdir()
    modules = imported_by(DELETE, str(tmp_path / "bundle"), str(tmp_path / "state"))
    assert "shimv2.shim.cleanup" in modules
    # No QEMU, QMP (asyncio), agent, sandbox or network: only the config and the store.
    assert not loaded(modules, "shimv2.vc.api", "shimv2.vc.sandbox", "shimv2.vc.network")
    assert not loaded(modules, "shimv2.vc.qmp", "qemu", "asyncio", *OPTIONAL)
    assert not loaded(modules, "trio", "shimv2.vc.procs", "shimv2.vc.mountns")


def test_daemon_loads_no_optional_parts_before_a_pod_needs_them() -> None:
    code = """
from shimv2.shim import daemon
assert daemon.default_task_service() is not None  # imports the task service
"""
    modules = imported_by(code)
    assert "shimv2.task_service.service" in modules
    assert not loaded(modules, *OPTIONAL)
    # Stats only when asked; QMP (asyncio, qemu.qmp) when a VM starts.
    assert not loaded(modules, "shimv2.task_service.stats", "shimv2.vc.qmp", "qemu", "asyncio")
