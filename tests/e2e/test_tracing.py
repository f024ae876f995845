"""``[runtime] enable_tracing``: a shim started by a real containerd sends its spans over OTLP."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.e2e.conftest import IMAGE, RUNTIME, Containerd, assert_nothing_left, shim_sockets
from tests.leaks import cgroup_dirs
from tests.otlp import Collector

pytestmark = pytest.mark.vm


def test_the_shim_sends_the_spans_of_a_pod_to_the_collector(tmp_path: Path) -> None:
    before, cgroups_before = shim_sockets(), cgroup_dirs()
    base = Path(f"/run/kpy-trace-{uuid.uuid4().hex[:6]}")
    base.mkdir()
    with Collector() as collector:
        config = tmp_path / "configuration.toml"
        config.write_text(
            f'[runtime]\nenable_tracing = true\ntracing_endpoint = "{collector.endpoint}"\n'
        )
        # containerd hands its environment down to the shim it starts
        cd = Containerd(
            "/usr/bin/containerd", "/usr/bin/ctr", base, env={"KATA_PY_CONFIG": str(config)}
        )
        try:
            cd.start()
            cd.import_image(IMAGE)
            out = cd.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, "traced", "echo", "hi")
            assert out.stdout == "hi\n"
            assert_nothing_left(before, cgroups_before)  # the shim has exited, so it has flushed
        finally:
            cd.stop()
            subprocess.run(["umount", "-R", str(base / "root")], check=False)
            shutil.rmtree(base, ignore_errors=True)
    spans = collector.spans()
    # the pod's life, from the first container's Create to its Delete
    assert {"CreateSandbox", "StartSandbox", "StopSandbox", "DeleteSandbox"} <= set(spans)
    assert spans["CreateSandbox"][0] == {"sandbox": "traced"}
    assert spans["DeleteContainer"][0] == {"sandbox": "traced", "container": "traced"}
    resource = collector.resources()[0]
    assert (resource["service.name"], resource["kata_py.shim_id"]) == ("kata-py", "traced")
