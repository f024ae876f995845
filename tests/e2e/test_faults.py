"""Faults under load: pods keep running and streaming while one thing is killed.

``PODS`` pods run at once through containerd 2.4 (Task API v3; one version, to
keep CI short): ``PODS - 1`` stay up through every test, each streaming an
exec's output, and each test starts one more, the victim, and breaks it: kill
-9 of its QEMU, its virtiofsd or its shim, a guest kernel panic, a full disk
under its state directory; or kill -9 of containerd itself. Each test checks
what containerd reports, how long until the task stopped, that the other pods
did not notice (same processes, RUNNING, their streams still flowing in order,
a new exec works), and that nothing of the victim is left once it is removed.
After the last test, nothing of any pod is left (``assert_nothing_left``).

The figures go to ``faults.json`` in pytest's temporary directory and are
printed as a table at the end. ``KATA_PY_FAULT_PODS=10`` runs the issue's ten.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import (
    IMAGE,
    VERSIONS,
    Containerd,
    shim_sockets,
)
from tests.e2e.faults import (
    NAMES,
    Pod,
    assert_none_of_ours_left,
    events,
    fill,
    remove,
    shim_of,
    vm_pid,
    wait_gone,
)
from tests.e2e.test_ctr import cid, pod_cgroups, task_status
from tests.leaks import cgroup_dirs, vm_processes

pytestmark = pytest.mark.vm

PODS = int(os.environ.get("KATA_PY_FAULT_PODS", "4"))  # the victim and PODS - 1 others
# Bounds, generous for a shared 2-CPU host under TCG; the figures are reported.
STOPPED_WITHIN = 60.0  # seconds from the fault to containerd's /tasks/exit
VM_DEAD = 255  # the exit status of every process of a pod whose VM died
KILLED = 128 + 9
EXITS_AFTER = 6  # seconds: the pod of the containerd test exits while containerd is down
FIGURES: list[dict[str, Any]] = []


@pytest.fixture(scope="module")
def fcd() -> Iterator[Containerd]:
    """containerd 2.4 (the newest here, Task v3), hybrid vsock: one version for these tests."""
    version, binary, ctr, _ = next(v for v in VERSIONS if v[0] == "2.4.2" and not v[3])
    base = Path(f"/run/kpy-e2e-{uuid.uuid4().hex[:6]}")
    base.mkdir()
    cd = Containerd(binary, ctr, base, version)
    try:
        cd.start()
        cd.import_image(IMAGE)
        yield cd
    finally:
        cd.stop()
        subprocess.run(["umount", "-R", str(base / "root")], check=False, capture_output=True)
        subprocess.run(["rm", "-rf", str(base)], check=False)


@pytest.fixture(scope="module")
def report(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[dict[str, Any]]]:
    """The figures: written to faults.json and printed once every test has added its own."""
    yield FIGURES
    path = tmp_path_factory.mktemp("faults") / "faults.json"
    path.write_text(json.dumps({"pods": PODS, "faults": FIGURES}, indent=2) + "\n")
    rows = [f"{'fault':<22} {'containerd reports':<48} {'s to stopped':>12}"]
    for f in FIGURES:
        seconds = "-" if f["seconds"] is None else f"{f['seconds']:.2f}"
        rows.append(f"{f['fault']:<22} {f['report']:<48} {seconds:>12}")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\nfaults under load, {PODS} pods ({path}):\n" + "\n".join(rows))


@pytest.fixture(scope="module")
def load(fcd: Containerd, report: list[dict[str, Any]]) -> Iterator[list[Pod]]:
    """``PODS - 1`` pods up for the whole module, streaming; at the end nothing is left."""
    before, cgroups_before = shim_sockets(), cgroup_dirs()
    pods = [Pod(fcd, f"load{i}{uuid.uuid4().hex[:6]}") for i in range(PODS - 1)]
    try:
        with ThreadPoolExecutor(max_workers=len(pods)) as pool:
            list(pool.map(lambda p: p.start(), pods))
        yield pods
    finally:
        for pod in pods:
            pod.close()
            remove(fcd, pod.name)
    assert [left for p in pods for left in wait_gone(fcd, p.name)] == []
    assert_none_of_ours_left(fcd, before, cgroups_before)


@pytest.fixture
def others(load: list[Pod]) -> list[Pod]:
    """The long-lived pods, each with a stream flowing (a new one if a fault ended it)."""
    for pod in load:
        pod.ensure_stream()
    return load


@contextmanager
def victim(cd: Containerd, *flags: str) -> Iterator[Pod]:
    """One more pod, streaming too, to be broken; removed (best effort) whatever happens."""
    pod = Pod(cd, cid())
    try:
        pod.start(*flags)
        pod.ensure_stream()
        yield pod
    finally:
        pod.close()
        remove(cd, pod.name)


def untouched(pods: list[Pod]) -> list[str]:
    with ThreadPoolExecutor(max_workers=len(pods)) as pool:
        return [w for wrong in pool.map(Pod.untouched, pods) for w in wrong]


def figure(fault: str, said: str, seconds: float | None, **more: Any) -> None:
    FIGURES.append({"fault": fault, "report": said, "seconds": seconds, **more})


@pytest.mark.parametrize("program", ["qemu-system", "virtiofsd"])
def test_a_killed_vm_process_stops_only_its_pod(
    fcd: Containerd, others: list[Pod], program: str
) -> None:
    """QEMU killed, or the virtiofsd serving its pod's root filesystems (the VM is ended)."""
    with victim(fcd) as pod, events(fcd) as ev:
        t0 = time.monotonic()
        os.kill(vm_pid(pod.name, program), 9)
        exited = ev.exit_of(pod.name, STOPPED_WITHIN)
        assert exited is not None, f"no /tasks/exit within {STOPPED_WITHIN} s"
        assert exited.body.get("exit_status", 0) == VM_DEAD
        assert task_status(fcd, pod.name) == "STOPPED"
        assert pod.stream is not None
        assert pod.stream.proc.wait(timeout=30) == VM_DEAD  # its exec ended too, not hung
        assert untouched(others) == []
        fcd.ctr("task", "rm", pod.name)
        fcd.ctr("containers", "rm", pod.name)
        assert wait_gone(fcd, pod.name) == []
    figure(f"kill -9 {program}", f"STOPPED, exit {VM_DEAD}", exited.at - t0, exec_exit=VM_DEAD)


def test_a_killed_shim_is_cleaned_up_and_only_its_pod_goes(
    fcd: Containerd, others: list[Pod]
) -> None:
    """containerd sees the shim's connection close and runs the shim's ``delete``."""
    with victim(fcd) as pod, events(fcd) as ev:
        shim = shim_of(pod.name)
        assert shim is not None
        t0 = time.monotonic()
        os.kill(shim, 9)
        exited = ev.exit_of(pod.name, STOPPED_WITHIN)
        assert exited is not None, f"no /tasks/exit within {STOPPED_WITHIN} s"
        assert exited.body.get("exit_status", 0) == KILLED  # the DeleteResponse of `delete`
        # containerd deletes a dead shim's task itself: no task left to stop.
        assert task_status(fcd, pod.name) == "MISSING"
        assert "/tasks/delete" in ev.topics(pod.name)
        assert pod.stream is not None
        exec_exit = pod.stream.proc.wait(timeout=30)  # its client ended, not hung
        assert untouched(others) == []
        fcd.ctr("containers", "rm", pod.name)
        assert wait_gone(fcd, pod.name) == []
    figure("kill -9 shim", f"task deleted, exit {KILLED}", exited.at - t0, exec_exit=exec_exit)


def test_containerd_killed_and_restarted_finds_every_pod(
    fcd: Containerd, others: list[Pod]
) -> None:
    """Shims and VMs outlive containerd; a task that exits meanwhile is STOPPED after."""
    assert fcd.proc is not None
    pod = Pod(fcd, cid())
    try:
        # It exits while containerd is down: its exit event has nowhere to go then.
        pod.start(cmd=("sh", "-c", f"sleep {EXITS_AFTER}; exit 3"))
        started = time.monotonic()
        fcd.proc.kill()
        fcd.proc.wait()
        t0 = time.monotonic()
        assert [w for p in [*others, pod] for w in p.lost_processes()] == []
        # Their `ctr task exec` clients lose containerd and end; the pods do not.
        assert [s.proc.wait(timeout=30) for p in others if (s := p.stream)] != []
        time.sleep(max(0.0, started + EXITS_AFTER + 2 - time.monotonic()))
        assert [w for p in others for w in p.lost_processes()] == []
        # kill -9 leaves containerd's socket behind: start() must not take it for live.
        os.unlink(fcd.socket)
        fcd.start()
        down = time.monotonic() - t0
        assert task_status(fcd, pod.name) == "STOPPED"
        with events(fcd) as ev:
            for p in others:
                p.ensure_stream()
            assert untouched(others) == []
            # The shims' events reach the new containerd: the new execs' starts came through.
            got = [ev.topics(p.name) for p in others]
            assert all("/tasks/exec-started" in t for t in got), got
        deleted = fcd.ctr("task", "rm", pod.name)
        assert "exit code 3" in deleted.stderr, deleted.stderr  # ctr warns of the status
        fcd.ctr("containers", "rm", pod.name)
        assert wait_gone(fcd, pod.name) == []
    finally:
        remove(fcd, pod.name)
    figure(
        "kill -9 containerd",
        "others RUNNING after restart; one exited meanwhile: STOPPED, 3",
        None,
        containerd_down_seconds=round(down, 2),
    )


def test_a_guest_kernel_panic_stops_only_its_pod(fcd: Containerd, others: list[Pod]) -> None:
    """``echo c > /proc/sysrq-trigger`` from a privileged container: ``panic=-1`` and
    ``-no-reboot`` make QEMU exit, which ends the pod as a killed QEMU does."""
    with victim(fcd, "--privileged", "--privileged-without-host-devices") as pod:
        # Opened now: the console log is removed with the VM, what it holds is not.
        console = open(f"/run/kata-py/vm/{pod.name}/console.log", "rb")  # noqa: SIM115
        with console, events(fcd) as ev:
            crash = subprocess.Popen(
                [fcd.ctr_binary, "-a", fcd.socket, "task", "exec", "--exec-id", "panic",
                 pod.name, "sh", "-c", "echo c > /proc/sysrq-trigger"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )  # fmt: skip
            t0 = time.monotonic()
            exited = ev.exit_of(pod.name, STOPPED_WITHIN)
            said = crash.communicate(timeout=30)[0].decode(errors="replace")
            assert crash.returncode == VM_DEAD, said  # the exec that panicked it ended too
            assert exited is not None, f"no /tasks/exit within {STOPPED_WITHIN} s"
            assert exited.body.get("exit_status", 0) == VM_DEAD
            log = console.read().decode(errors="replace")
        # The kernel's last words; its panic line is often lost as QEMU exits at once.
        assert "sysrq: Trigger a crash" in log, log[-1500:]
        assert task_status(fcd, pod.name) == "STOPPED"
        assert untouched(others) == []
        fcd.ctr("task", "rm", pod.name)
        fcd.ctr("containers", "rm", pod.name)
        assert wait_gone(fcd, pod.name) == []
    # From the exec's request: it includes the exec's own start in the guest.
    figure("guest kernel panic", f"STOPPED, exit {VM_DEAD}", exited.at - t0)


@pytest.fixture
def small_state(fcd: Containerd) -> Iterator[Path]:
    """A kata-py configuration whose state directory is a 16 MiB tmpfs of its own."""
    state = fcd.base / "kstate"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "kpy", state], check=True)
    try:
        (fcd.base / "small-state.toml").write_text(f'[runtime]\nstate_dir = "{state}"\n')
        yield state
    finally:
        # A shim that dies here is cleaned up by a `delete` that reads the default
        # configuration, not this one, and leaves the VM: end what is left of ours.
        for proc in vm_processes(f"{state}/"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.split(":")[0]), 9)
        time.sleep(0.5)
        subprocess.run(["umount", "-R", "-l", str(state)], check=False)
        state.rmdir()
        for name in NAMES:
            for d in pod_cgroups(name):
                with contextlib.suppress(OSError):
                    os.rmdir(d)


def test_a_full_disk_under_the_state_directory(
    fcd: Containerd, others: list[Pod], small_state: Path
) -> None:
    """With no space left where the shim keeps its state: the running pod keeps running
    and can be stopped and deleted, a new pod fails to start saying why and leaves
    nothing, and the other pods (state elsewhere) do not notice."""
    config = ("--runtime-config-path", str(fcd.base / "small-state.toml"))
    with victim(fcd, *config) as pod:
        assert (small_state / "sbs" / pod.name / "state.json").exists()  # the config was taken
        filled = fill(small_state)
        assert filled > 0
        assert pod.stream is not None
        assert pod.stream.flowing(30), pod.stream.stderr()
        new_exec = "ok" if pod.exec_works() else "failed"
        assert pod.lost_processes() == []
        assert task_status(fcd, pod.name) == "RUNNING"

        refused = cid()
        NAMES.append(refused)
        try:
            started = fcd.ctr("run", "-d", "--runtime", "io.containerd.kata-py.v2", *config,
                              IMAGE, refused, "true", check=False)  # fmt: skip
            assert started.returncode != 0
            assert "no space left" in started.stderr.lower(), started.stderr
        finally:
            remove(fcd, refused)
        assert wait_gone(fcd, refused, small_state) == []

        with events(fcd) as ev:
            t0 = time.monotonic()
            fcd.ctr("task", "kill", "-s", "SIGKILL", pod.name)
            exited = ev.exit_of(pod.name, STOPPED_WITHIN)
            assert exited is not None, f"no /tasks/exit within {STOPPED_WITHIN} s"
            assert exited.body.get("exit_status", 0) == KILLED
        assert task_status(fcd, pod.name) == "STOPPED"
        assert untouched(others) == []
        fcd.ctr("task", "rm", pod.name)  # still full: a delete needs no space
        fcd.ctr("containers", "rm", pod.name)
        assert wait_gone(fcd, pod.name, small_state) == []
    (small_state / "filler").unlink()
    assert [str(p) for p in small_state.rglob("*") if not p.is_dir()] == []
    figure(
        "full state disk",
        f"running pod: exec {new_exec}, SIGKILL -> STOPPED {KILLED}; new pod refused",
        exited.at - t0,
        filled_bytes=filled,
    )
