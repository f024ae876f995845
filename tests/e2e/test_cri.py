"""kata-py as the kubelet sees it: containerd's CRI plugin driven by crictl.

A private containerd with CRI on, a RuntimeClass-style handler ``kata-py``, a
CNI bridge of its own, and a locally built pause image. Run against Debian's
containerd 1.6 (every container goes through the shim's ``start``) and
containerd 2.4.2 (app containers reuse the pod's Task v3 address without it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shimv2.vc.config import GUEST_OVERHEAD_MIB
from shimv2.vc.qemu_config import default_guest_dir
from tests.e2e.conftest import (
    IMAGE,
    ROOT,
    Containerd,
    assert_nothing_left,
    shim_pids,
    shim_sockets,
)
from tests.leaks import cgroup_dirs, vm_processes

pytestmark = pytest.mark.vm

GUEST_KERNEL = (default_guest_dir() / "kver").read_text().strip()
CRICTL = ROOT / "build" / "bin" / "crictl"
CRITEST = ROOT / "build" / "bin" / "critest"
PAUSE = "localhost/kata-py/pause:latest"
# Like the real pause: sleeps, reaps, and exits on TERM or INT.
PAUSE_ENTRYPOINT = ["sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait; done"]
BRIDGE = "kpy-cni0"
SUBNET = "10.231.7.0/24"
HANDLER = "kata-py"


INSTALL_GUIDE = ROOT / "docs" / "install.md"


def install_guide_snippet(heading: str) -> str:
    """The first ``toml`` block after ``heading`` in docs/install.md: the suite runs the
    guide's containerd configuration, so that it stays true."""
    lines = INSTALL_GUIDE.read_text().splitlines()
    start = lines.index(heading)
    begin = lines.index("```toml", start) + 1
    return "\n".join(lines[begin : lines.index("```", begin)]) + "\n"


def cri_config(base: Path, config_version: int = 2) -> str:
    """containerd 2.x's own form (3) with the guide's 2.x handler, or 1.x's (2) with its 1.7 one."""
    if config_version == 3:
        return f"""
[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = '{PAUSE}'
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
  runtime_type = 'io.containerd.runc.v2'
{install_guide_snippet("### containerd 2.x (`version = 3`)")}
[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dirs = ['/usr/lib/cni']
  conf_dir = '{base}/cni'
"""
    return f"""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
{install_guide_snippet("### containerd 1.7 (`version = 2`)")}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{base}/cni"
"""


def cni_conflist() -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "kpy-e2e",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            }
        ],
    }


class Cri:
    def __init__(self, containerd: Containerd) -> None:
        self.containerd = containerd
        self.endpoint = f"unix://{containerd.socket}"

    def __call__(self, *args: str, timeout: float = 180) -> str:
        out = subprocess.run(
            [str(CRICTL), "--runtime-endpoint", self.endpoint, "--image-endpoint", self.endpoint,
             "--timeout", "120s", *args],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if out.returncode != 0:
            raise AssertionError(f"crictl {' '.join(args)}: rc {out.returncode}: {out.stderr}")
        return out.stdout

    def write(self, name: str, obj: dict[str, Any]) -> str:
        path = self.containerd.base / f"{name}-{uuid.uuid4().hex[:6]}.json"
        path.write_text(json.dumps(obj))
        return str(path)


CONTAINERD_24 = tuple(str(ROOT / "build" / "containerd-v2.4.2" / b) for b in ("containerd", "ctr"))
# (version, containerd, ctr, pods cloned from a VM template)
CRI_VERSIONS = [
    ("1.6", "/usr/bin/containerd", "/usr/bin/ctr", False),
    ("2.4.2", *CONTAINERD_24, False),
    ("2.4.2", *CONTAINERD_24, True),
]


def _cri_id(param: tuple[str, str, str, bool]) -> str:
    return f"containerd-{param[0]}" + ("-template" if param[3] else "")


@pytest.fixture(scope="module", params=CRI_VERSIONS, ids=_cri_id)
def cri_containerd(request: pytest.FixtureRequest) -> Iterator[Containerd]:
    version, binary, ctr_binary, templated = request.param
    for exe in (binary, ctr_binary, str(CRICTL), str(CRITEST)):
        assert os.access(exe, os.X_OK), f"{exe} is missing: run scripts/setup"
    base = Path(f"/run/kpy-cri-{uuid.uuid4().hex[:6]}")
    (base / "cni").mkdir(parents=True)
    (base / "cni" / "10-kpy.conflist").write_text(json.dumps(cni_conflist()))
    shm = Path("/dev/shm") / base.name
    env: dict[str, str] = {}
    if templated:  # the shims read a configuration with templates on, built first
        config = base / "configuration.toml"
        config.write_text(f'[factory]\nenable_template = true\ntemplate_path = "{shm}/template"\n')
        cli = [sys.executable, "-m", "shimv2.cli", "--config", str(config), "factory", "init"]
        subprocess.run(cli, check=True, cwd=ROOT, timeout=300)
        env = {"KATA_PY_CONFIG": str(config)}
    config_version = 2 if version.startswith("1.") else 3
    cd = Containerd(
        binary, ctr_binary, base, version, cri_config(base, config_version), env,
        templated=templated, config_version=config_version,
    )  # fmt: skip
    cd.start()
    try:
        cd.import_image(IMAGE, namespace="k8s.io")
        cd.import_image(PAUSE, PAUSE_ENTRYPOINT, namespace="k8s.io")
        yield cd
    finally:
        remove_cri_containerd(cd, base)
        shutil.rmtree(shm, ignore_errors=True)


def remove_cri_containerd(cd: Containerd, base: Path) -> None:
    """Stop a CRI containerd and remove its root, its CNI bridge and IP leases."""
    cd.stop()
    subprocess.run(["umount", "-R", str(base / "root")], check=False, capture_output=True)
    subprocess.run(["ip", "link", "del", BRIDGE], check=False, capture_output=True)
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(f"/var/lib/cni/networks/{cni_conflist()['name']}", ignore_errors=True)


@pytest.fixture
def cri(cri_containerd: Containerd) -> Iterator[Cri]:
    before, cgroups_before = shim_sockets(), cgroup_dirs()
    netns_before = set(os.listdir("/var/run/netns")) if os.path.exists("/var/run/netns") else set()
    yield Cri(cri_containerd)
    assert_nothing_left(before, cgroups_before)
    netns_after = set(os.listdir("/var/run/netns")) if os.path.exists("/var/run/netns") else set()
    assert netns_after - netns_before == set()


def pod_config(name: str, log_dir: Path) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "e2e", "uid": uuid.uuid4().hex, "attempt": 0},
        "hostname": name,
        "log_directory": str(log_dir),
        "linux": {"sysctls": {"kernel.shm_rmid_forced": "1"}},
    }


def container_config(name: str, *command: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "image": {"image": IMAGE},
        "command": list(command),
        "log_path": f"{name}.log",
        "linux": {},
    }


def pod_ip(cri: Cri, pod: str) -> str:
    status = json.loads(cri("inspectp", "-o", "json", pod))
    return str(status["status"]["network"]["ip"])


def port_forward(cri: Cri, pod: str, port: int) -> str:
    """What a client of ``crictl port-forward`` to the pod's ``port`` reads, to the end."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        local = s.getsockname()[1]
    forward = subprocess.Popen(
        [str(CRICTL), "--runtime-endpoint", cri.endpoint, "port-forward", pod, f"{local}:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert forward.stdout is not None
        said = ""  # until "Forwarding from 127.0.0.1:<local> -> <port>", after crictl's warnings
        while "Forwarding from" not in said:
            line = forward.stdout.readline()
            assert line, f"crictl port-forward ended: {said}"
            said += line
        got = b""
        with socket.create_connection(("127.0.0.1", local), timeout=30) as conn:
            while data := conn.recv(4096):
                got += data
        return got.decode()
    finally:
        forward.kill()
        forward.wait()


def test_a_pod_of_two_containers_runs_in_one_vm(cri: Cri, tmp_path: Path) -> None:
    pod_json = cri.write("pod", pod_config("kpy-pod", tmp_path))
    pod = cri("runp", "--runtime", HANDLER, pod_json).strip()
    try:
        app = cri(
            "create",
            pod,
            cri.write("app", container_config("app", "sh", "-c", "echo started; sleep 1000")),
            pod_json,
        ).strip()
        cri("start", app)
        server = ("nc", "-ll", "-p", "8080", "-e", "echo", "hello from the pod")
        side = cri(
            "create", pod, cri.write("side", container_config("side", *server)), pod_json
        ).strip()
        cri("start", side)

        pod_bundle, app_bundle = (cri.containerd.bundle(c, "k8s.io") for c in (pod, app))
        if cri.containerd.version == "1.6":
            # `start` ran for the app too, and found the pod's shim by its annotations
            assert (app_bundle / "address").read_text() == (pod_bundle / "address").read_text()
        else:
            # the app reused the pod's Task v3 shim without `start`
            assert (app_bundle / "sandbox").read_text() == pod
            assert not (app_bundle / "address").exists()
            bootstrap = json.loads((pod_bundle / "bootstrap.json").read_text())
            assert bootstrap["version"] == 3
            assert json.loads((app_bundle / "bootstrap.json").read_text()) == bootstrap
        if cri.containerd.templated:  # the pod's VM is a clone: its RAM copy is recorded
            state = json.loads(Path(f"/run/kata-py/sbs/{pod}/state.json").read_text())
            assert Path(state["hypervisor"]["memory_dir"]).is_dir()
        # one shim and one VM for the pod, and the containers run in it
        assert len(shim_pids()) == 1
        assert len([p for p in vm_processes("kata-py-") if "qemu-system" in p]) == 1
        assert cri("exec", "--sync", app, "uname", "-r").strip() == GUEST_KERNEL
        assert cri("exec", "--sync", side, "cat", "/proc/version").find(GUEST_KERNEL) >= 0
        if cri.containerd.version != "1.6":
            # CRI 2.x sets this pod sysctl; the agent set it on the guest's network
            group_range = cri("exec", "--sync", app, "cat", "/proc/sys/net/ipv4/ping_group_range")
            assert group_range.split() == ["0", "2147483647"]
        # the containers share the pod's IPC namespace, with the pod's sysctl in it
        ipc = {cri("exec", "--sync", c, "readlink", "/proc/self/ns/ipc") for c in (app, side)}
        assert len(ipc) == 1
        assert cri("exec", "--sync", app, "cat", "/proc/sys/kernel/shm_rmid_forced").strip() == "1"
        # CRI's files reach the guest through the shared bind mounts
        assert cri("exec", "--sync", app, "cat", "/etc/hostname").strip() == "kpy-pod"
        # the pod's IP, from the CNI bridge on the host, answers from inside the VM
        ip = pod_ip(cri, pod)
        assert ip.startswith("10.231.7.")
        assert ip in cri("exec", "--sync", app, "ip", "-4", "addr")
        ping = subprocess.run(
            ["busybox", "ping", "-c", "1", "-W", "5", ip], capture_output=True, text=True
        )
        assert ping.returncode == 0, ping.stdout + ping.stderr
        # port-forward reaches the guest's loopback through the shim's relay
        assert port_forward(cri, pod, 8080) == "hello from the pod\n"
        # the container's output reaches the kubelet's log file
        deadline = time.monotonic() + 20
        while "started" not in (tmp_path / "app.log").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.2)
        stats = json.loads(cri("stats", "-o", "json", "--id", app))
        assert int(stats["stats"][0]["memory"]["workingSetBytes"]["value"]) > 0

        cri("stop", "--timeout", "2", side)
        cri("rm", side)
        assert (
            json.loads(cri("inspect", "-o", "json", app))["status"]["state"] == "CONTAINER_RUNNING"
        )
    finally:
        cri("stopp", pod)
        cri("rmp", pod)


def test_critest_pod_sandbox_specs(cri: Cri) -> None:
    """CRI's conformance suite, its PodSandbox specs (run, status, sysctls, metrics): one VM each.

    containerd 1.6 has no pod sandbox metrics, so critest runs 6 of the 8 there.
    """
    images = cri.containerd.base / "critest-images.yaml"
    images.write_text(f"defaultTestContainerImage: {IMAGE}\nwebServerTestImage: {IMAGE}\n")
    out = subprocess.run(
        [str(CRITEST), f"--runtime-endpoint={cri.endpoint}", f"--image-endpoint={cri.endpoint}",
         f"--runtime-handler={HANDLER}", f"--test-images-file={images}",
         r"--ginkgo.focus=\[k8s.io\] PodSandbox", "--ginkgo.no-color", "--ginkgo.timeout=15m"],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    summary = [line for line in out.stdout.splitlines() if " Passed | " in line]
    assert out.returncode == 0, "\n".join(summary) or out.stdout[-4000:]
    want = 6 if cri.containerd.version == "1.6" else 8
    assert summary[-1].split("--")[-1].strip().startswith(f"{want} Passed | 0 Failed")


def test_a_pod_memory_limit_sizes_its_vm(cri: Cri, tmp_path: Path) -> None:
    """kubelet's pod-level limit (CRI's sandbox-memory annotation) is added to the guest's share."""
    limit_mib = 512
    config = pod_config("kpy-sized", tmp_path)
    config["linux"]["resources"] = {"memory_limit_in_bytes": limit_mib << 20}
    pod_json = cri.write("pod", config)
    pod = cri("runp", "--runtime", HANDLER, pod_json).strip()
    try:
        app = cri(
            "create", pod, cri.write("app", container_config("app", "sleep", "1000")), pod_json
        ).strip()
        cri("start", app)
        meminfo = cri("exec", "--sync", app, "cat", "/proc/meminfo")
        total_mib = int(meminfo.split("MemTotal:")[1].split()[0]) >> 10
        # The kernel keeps some RAM for itself; without the limit the guest has 256 MiB.
        assert limit_mib < total_mib <= limit_mib + GUEST_OVERHEAD_MIB
    finally:
        cri("stopp", pod)
        cri("rmp", pod)


def test_the_handler_reports_what_kata_py_supports(cri: Cri) -> None:
    """containerd 2.x asks the shim (``-info``) and tells the kubelet the handler's features."""
    info = json.loads(cri("info"))
    if cri.containerd.version == "1.6":
        assert "runtimeHandlers" not in info  # 1.6's CRI has no introspection
        return
    handlers = {h.get("name", ""): h.get("features", {}) for h in info["runtimeHandlers"]}
    # userNamespaces is false, so left out.
    assert handlers[HANDLER] == {"recursive_read_only_mounts": True}


def test_a_host_network_pod_is_refused_with_the_reason(cri: Cri, tmp_path: Path) -> None:
    """hostNetwork cannot apply to a pod in a VM (docs/differences.md): refused, nothing left."""
    config = pod_config("kpy-hostnet", tmp_path)
    config["linux"]["security_context"] = {"namespace_options": {"network": 2}}  # NODE
    with pytest.raises(AssertionError, match="host networking is not supported"):
        cri("runp", "--runtime", HANDLER, cri.write("pod", config))
    assert json.loads(cri("pods", "-o", "json"))["items"] == []
