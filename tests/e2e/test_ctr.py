"""kata-py as containerd sees it: real containerd, real ctr, real VMs."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shimv2.vc.qemu_config import default_guest_dir
from tests.e2e.conftest import IMAGE, RUNTIME, Containerd, shim_pids
from tests.leaks import cgroup_hierarchies, process_cgroups, vm_processes
from tests.mountinfo import mounts_in_every_namespace

pytestmark = pytest.mark.vm

GUEST_KERNEL = (default_guest_dir() / "kver").read_text().strip()


def cid() -> str:
    return f"e2e{uuid.uuid4().hex[:8]}"


def run_detached(
    cd: Containerd, name: str, *cmd: str, annotations: dict[str, str] | None = None
) -> None:
    extra = [a for k, v in (annotations or {}).items() for a in ("--annotation", f"{k}={v}")]
    cd.ctr("run", "-d", "--runtime", RUNTIME, *extra, IMAGE, name, *cmd)


def remove(cd: Containerd, name: str) -> None:
    cd.ctr("task", "kill", "-s", "SIGKILL", name, check=False)
    for _ in range(100):
        if (
            "STOPPED" in cd.ctr("task", "ls", check=False).stdout
            or name not in cd.ctr("task", "ls", check=False).stdout
        ):
            break
        time.sleep(0.2)
    cd.ctr("task", "rm", "-f", name, check=False)
    cd.ctr("containers", "rm", name, check=False)


def task_status(cd: Containerd, name: str) -> str:
    for line in cd.ctr("task", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == name:
            return fields[-1]
    return "MISSING"


def negotiated_task_api(cd: Containerd, name: str) -> int:
    """The Task API version containerd took from the shim's ``start`` reply."""
    bootstrap = cd.bundle(name) / "bootstrap.json"
    if not bootstrap.exists():
        return 2  # 1.x reads only the plain address, which means v2
    reply = json.loads(bootstrap.read_text())
    assert reply["address"] == (cd.bundle(name) / "address").read_text()
    assert reply["protocol"] == "ttrpc"
    return int(reply["version"])


def wait_stopped(cd: Containerd, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while task_status(cd, name) != "STOPPED":
        assert time.monotonic() < deadline, f"{name} did not stop within {timeout} s"
        time.sleep(0.2)


def test_run_prints_the_guest_kernel_and_exit_codes(cd: Containerd) -> None:
    out = cd.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, cid(), "uname", "-r")
    assert out.stdout.strip() == GUEST_KERNEL
    assert out.stdout.strip() != os.uname().release
    failed = cd.ctr(
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        cid(),
        "sh",
        "-c",
        "echo err >&2; exit 3",
        check=False,
    )
    assert failed.returncode == 3
    assert "err" in failed.stderr


def test_run_with_bind_mounts(cd: Containerd, tmp_path: Path) -> None:
    data, conf = tmp_path / "data", tmp_path / "conf"
    data.mkdir()
    conf.mkdir()
    (conf / "setting").write_text("on\n")
    script = "cat /conf/setting; echo out > /data/w; touch /conf/x 2>/dev/null || echo read-only"
    out = cd.ctr(
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--mount",
        f"type=bind,src={data},dst=/data,options=rbind:rw",
        "--mount",
        f"type=bind,src={conf},dst=/conf,options=rbind:ro",
        IMAGE,
        cid(),
        "sh",
        "-c",
        script,
    )
    assert out.stdout == "on\nread-only\n"
    assert (data / "w").read_text() == "out\n"
    assert sorted(os.listdir(conf)) == ["setting"]


def test_exec_stdin_tty_ps_metrics_pause_kill(cd: Containerd) -> None:
    name = cid()
    run_detached(cd, name, "sleep", "1000")
    try:
        assert task_status(cd, name) == "RUNNING"
        out = cd.ctr(
            "task", "exec", "--exec-id", "e1", name, "sh", "-c", "echo hi; exit 4", check=False
        )
        assert out.stdout == "hi\n"
        assert out.returncode == 4
        echoed = cd.ctr("task", "exec", "--exec-id", "e2", name, "cat", stdin=b"from stdin\n")
        assert echoed.stdout == "from stdin\n"
        assert "tty-ok" in exec_with_tty(cd, name)
        ps = cd.ctr("task", "ps", name).stdout
        assert len(ps.strip().splitlines()) >= 2  # header and at least the init
        metrics = cd.ctr("task", "metrics", name).stdout
        assert "memory" in metrics.lower()
        assert_prometheus_metrics(name)
        cd.ctr("task", "pause", name)
        assert task_status(cd, name) == "PAUSED"
        cd.ctr("task", "resume", name)
        assert task_status(cd, name) == "RUNNING"
        cd.ctr("task", "kill", "-a", "-s", "SIGKILL", name)
        wait_stopped(cd, name, 30)
        cd.ctr("task", "rm", name)
        cd.ctr("containers", "rm", name)
    finally:
        remove(cd, name)


def assert_prometheus_metrics(sandbox: str) -> None:
    """``kata-py metrics`` reads the pod's shim, as kata-monitor would."""
    out = subprocess.run(["kata-py", "metrics", sandbox], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(out.stdout)
        for s in family.samples
    }
    rpc = "kata_shim_rpc_durations_histogram_milliseconds_count"
    assert got[(rpc, (("action", "Create"),))] == 1
    assert got[(rpc, (("action", "Exec"),))] >= 3
    qemu_rss = got[("kata_hypervisor_proc_status", (("item", "vmrss"), ("sandbox_id", sandbox)))]
    assert qemu_rss > 100 << 20
    assert got[("kata_virtiofsd_threads", (("sandbox_id", sandbox),))] >= 1
    assert got[("kata_shim_proc_status", (("item", "vmrss"),))] > 10 << 20


def exec_with_tty(cd: Containerd, name: str) -> str:
    """``ctr task exec -t`` wants a terminal: give it a pty and read what it writes."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [cd.ctr_binary, "-a", cd.socket, "task", "exec", "-t", "--exec-id", "tty", name,
         "sh", "-c", "test -t 0 && echo tty-ok"],
        stdin=follower, stdout=follower, stderr=follower,
    )  # fmt: skip
    os.close(follower)
    out = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(leader)
    return out.decode(errors="replace")


def test_kill_without_all_and_delete(cd: Containerd) -> None:
    name = cid()
    run_detached(cd, name, "sh", "-c", "trap 'exit 42' TERM; while :; do sleep 0.1; done")
    try:
        time.sleep(1)
        cd.ctr("task", "kill", "-s", "SIGTERM", name)
        wait_stopped(cd, name, 30)
        deleted = cd.ctr("task", "rm", name).stdout
        assert "42" in deleted or deleted == ""
        cd.ctr("containers", "rm", name)
        assert name not in cd.ctr("containers", "ls").stdout
    finally:
        remove(cd, name)


def test_two_containers_of_a_pod_share_one_shim_and_one_vm(cd: Containerd) -> None:
    pod = cid()
    app = cid()
    sandbox_ann = {
        "io.kubernetes.cri.container-type": "sandbox",
        "io.kubernetes.cri.sandbox-id": pod,
    }
    app_ann = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": pod}
    run_detached(cd, pod, "sleep", "1000", annotations=sandbox_ann)
    try:
        run_detached(cd, app, "sleep", "1000", annotations=app_ann)
        assert len(shim_pids()) == 1
        assert len([p for p in vm_processes("kata-py-") if "qemu-system" in p]) == 1
        addresses = {(cd.bundle(n) / "address").read_text() for n in (pod, app)}
        assert len(addresses) == 1
        # 1.x reads our plain address (Task v2); 2.x takes our JSON (2.2) or protobuf
        # (2.3+) reply and speaks Task v3.
        want = 3 if cd.version.startswith("2.") else 2
        assert [negotiated_task_api(cd, n) for n in (pod, app)] == [want, want]
        assert task_status(cd, app) == "RUNNING"
        hostname = cd.ctr("task", "exec", "--exec-id", "h", app, "cat", "/proc/version").stdout
        assert GUEST_KERNEL in hostname
    finally:
        remove(cd, app)
        remove(cd, pod)


def test_containerd_restart_finds_the_shim_again(cd: Containerd) -> None:
    name = cid()
    run_detached(cd, name, "sh", "-c", "sleep 8; exit 5")
    try:
        cd.stop()
        time.sleep(1)
        cd.start()
        assert task_status(cd, name) in ("RUNNING", "STOPPED")
        wait_stopped(cd, name, 60)
        cd.ctr("task", "rm", name)
        cd.ctr("containers", "rm", name)
    finally:
        remove(cd, name)


@pytest.mark.parametrize("victim", ["qemu-system", "vhost-device-vsock"])
def test_vm_death_ends_the_task_with_255_and_the_shim_goes(cd: Containerd, victim: str) -> None:
    """QEMU killed, or the hybrid vsock backend the agent channel runs through."""
    if cd.channel == "serial" and victim == "vhost-device-vsock":
        name = cid()
        run_detached(cd, name, "sleep", "1000")
        try:
            assert [p for p in vm_processes(f"/vm/{name}/") if victim in p] == []  # not needed
        finally:
            remove(cd, name)
        return
    kill_a_running_pods_vm(cd, victim)


def kill_a_running_pods_vm(cd: Containerd, victim: str) -> str:
    """``ctr run --rm`` a pod, kill -9 its ``victim`` (QEMU or a helper of it): the run
    ends with 255, the shim exits and the container is gone. The pod's name."""
    name = cid()
    run = subprocess.Popen(
        [cd.ctr_binary, "-a", cd.socket, "run", "--rm", "--runtime", RUNTIME, IMAGE, name,
         "sleep", "1000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while task_status(cd, name) != "RUNNING":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        found = [p for p in vm_processes(f"/vm/{name}/") if victim in p]
        assert len(found) == 1
        os.kill(int(found[0].split(":")[0]), 9)
        assert run.wait(timeout=60) == 255, run.stderr.read() if run.stderr else ""
        deadline = time.monotonic() + 20
        while shim_pids():
            assert time.monotonic() < deadline, "the shim did not exit after the delete"
            time.sleep(0.2)
        assert name not in cd.ctr("containers", "ls").stdout
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        remove(cd, name)
    return name


def test_a_killed_shim_is_cleaned_up_by_delete(cd: Containerd) -> None:
    name = cid()
    run_detached(cd, name, "sleep", "1000")
    try:
        assert len(shim_pids()) == 1
        assert [p for p in vm_processes(f"kata-py-{name}") if "qemu-system" in p]
        os.kill(shim_pids()[0], 9)
        # containerd notices the dead shim and runs `containerd-shim-kata-py-v2 delete`,
        # which must clean up from the persisted state alone.
        deadline = time.monotonic() + 60
        while vm_processes(f"kata-py-{name}") or vm_processes(f"/vm/{name}/"):
            assert time.monotonic() < deadline, vm_processes(f"kata-py-{name}")
            time.sleep(0.5)
        cd.ctr("task", "rm", "-f", name, check=False)
        cd.ctr("containers", "rm", name)
        while pod_cgroups(name):  # removed by `delete` from the state alone
            assert time.monotonic() < deadline, pod_cgroups(name)
            time.sleep(0.2)
        assert not os.path.exists(f"/run/kata-py/sbs/{name}")
        assert not os.path.exists(f"/run/kata-py/vm/{name}")
        assert mounts_in_every_namespace(f"/run/kata-py/sbs/{name}/") == []
    finally:
        remove(cd, name)


def pod_cgroups(name: str, namespace: str = "default") -> list[str]:
    """The host cgroup directories of a ``ctr run`` pod that exist."""
    return [str(h) for h in cgroup_hierarchies() if (h / namespace / name).exists()]


def test_the_vm_runs_in_the_cgroup_containerd_gives_the_pod(cd: Containerd) -> None:
    name = cid()
    run_detached(cd, name, "sleep", "1000")
    try:
        # What ctr (every version here) puts in the spec: /<namespace>/<id>.
        spec = json.loads((cd.bundle(name) / "config.json").read_text())
        path = spec["linux"]["cgroupsPath"]
        assert path == f"/default/{name}"
        names = ["" if h.name == "cgroup" else h.name for h in cgroup_hierarchies()]
        assert len(pod_cgroups(name)) == len(names) > 0
        vm = vm_processes(f"kata-py-{name}") + vm_processes(f"/{name}/")
        pids = {int(p.split(":")[0]): p for p in vm}
        # By program: virtiofsd's path has "qemu" in it too (/usr/lib/qemu/virtiofsd).
        programs = {"qemu-system": "qemu", "vhost-device-vsock": "vhost-device-vsock"}
        kinds = sorted(
            next((kind for prog, kind in programs.items() if prog in p), "virtiofsd")
            for p in pids.values()
        )
        # The hybrid vsock backend too: auto takes it on this host (no /dev/vhost-vsock).
        backend = [] if cd.channel == "serial" else ["vhost-device-vsock"]
        assert kinds == ["qemu", *backend, "virtiofsd"]
        for pid in pids:
            joined = process_cgroups(pid)
            assert {n: joined[n] for n in names} == dict.fromkeys(names, path), pids[pid]
    finally:
        remove(cd, name)
    assert pod_cgroups(name) == []
