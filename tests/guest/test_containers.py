"""ContainerService for real: crun (or runc), a busybox rootfs, our ttrpc over a socketpair
(``tests.guest.container_agent``)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shimv2.errdefs import FailedPrecondition, InvalidArgument, NotFound
from shimv2.guest import cgroups
from shimv2.pb.kata import agent_pb2, oci_pb2
from tests.aio import asyncio_test
from tests.guest.container_agent import crun_ids, serve_agent
from tests.guest.rootfs import host_runtime, make_process, make_spec
from tests.strategies import texts

# ---- lifecycle ------------------------------------------------------------------------------


@asyncio_test
async def test_echo_hello(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as agent:
        cid = await agent.run("echo", ["echo", "hello"])
        assert await agent.read_all(cid) == b"hello\n"
        assert await agent.read_all(cid, stderr=True) == b""
        assert await agent.wait(cid) == 0
        await agent.remove(cid)


@asyncio_test
async def test_exit_code(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as agent:
        cid = await agent.run("exit3", ["sh", "-c", "echo oops >&2; exit 3"])
        assert await agent.read_all(cid, stderr=True) == b"oops\n"
        assert await agent.wait(cid) == 3
        await agent.remove(cid)


@asyncio_test
async def test_stdin_to_stdout_through_cat(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as agent:
        cid = await agent.run("cat", ["cat"])
        for chunk in (b"one\n", b"two\n"):
            resp = await agent.call(
                "WriteStdin",
                agent_pb2.WriteStreamRequest(container_id=cid, data=chunk),
                agent_pb2.WriteStreamResponse,
            )
            assert resp.len == len(chunk)
        await agent.call("CloseStdin", agent_pb2.CloseStdinRequest(container_id=cid))
        assert await agent.read_all(cid) == b"one\ntwo\n"
        assert await agent.wait(cid) == 0
        with pytest.raises(FailedPrecondition):
            await agent.call(
                "WriteStdin", agent_pb2.WriteStreamRequest(container_id=cid, data=b"x")
            )
        await agent.remove(cid)


@asyncio_test
async def test_exec_in_running_container(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as agent:
        cid = await agent.run("sleeper", ["sleep", "100"])
        proc = make_process(["uname", "-r"])
        await agent.call(
            "ExecProcess",
            agent_pb2.ExecProcessRequest(container_id=cid, exec_id="ex1", process=proc),
        )
        assert await agent.read_all(cid, "ex1") == (os.uname().release + "\n").encode()
        assert await agent.wait(cid, "ex1") == 0
        # Waited and drained: the exec is gone; the init still runs.
        with pytest.raises(NotFound):
            await agent.wait(cid, "ex1")
        proc = make_process(["sleep", "100"])
        await agent.call(
            "ExecProcess",
            agent_pb2.ExecProcessRequest(container_id=cid, exec_id="ex2", process=proc),
        )
        # An exec's SIGTERM is delivered as is (sleep is not pid 1): 128 + 15.
        await agent.call(
            "SignalProcess",
            agent_pb2.SignalProcessRequest(container_id=cid, exec_id="ex2", signal=signal.SIGTERM),
        )
        assert await agent.wait(cid, "ex2") == 143
        await agent.remove(cid)


@asyncio_test
async def test_illegal_transitions(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as agent:
        cid = await agent.create("twice", ["true"])
        with pytest.raises(FailedPrecondition):  # exec before start
            await agent.call(
                "ExecProcess",
                agent_pb2.ExecProcessRequest(
                    container_id=cid, exec_id="e", process=make_process(["true"])
                ),
            )
        await agent.call("StartContainer", agent_pb2.StartContainerRequest(container_id=cid))
        with pytest.raises(FailedPrecondition):
            await agent.call("StartContainer", agent_pb2.StartContainerRequest(container_id=cid))
        assert await agent.wait(cid) == 0
        with pytest.raises(FailedPrecondition):  # exec in a stopped container
            await agent.call(
                "ExecProcess",
                agent_pb2.ExecProcessRequest(
                    container_id=cid, exec_id="e", process=make_process(["true"])
                ),
            )
        with pytest.raises(FailedPrecondition):  # pause a stopped container
            await agent.call("PauseContainer", agent_pb2.PauseContainerRequest(container_id=cid))
        await agent.remove(cid)


@asyncio_test
async def test_start_releases_the_runtimes_fifo_itself(tmp_path: Path) -> None:
    """With crun and no poststart hooks, the agent lets the process run without ``crun start``."""
    async with serve_agent(tmp_path) as agent:
        cid = await agent.create("fifo", ["echo", "started"])
        fifo = Path("/run/crun") / cid / "exec.fifo"
        assert fifo.exists()  # crun's own mark of a created container
        assert json.loads(agent.host.run("state", cid).stdout)["status"] == "created"
        assert agent.service.runtime._release_exec_fifo(cid)
        assert not fifo.exists()
        assert await agent.read_all(cid) == b"started\n"
        assert await agent.wait(cid) == 0
        assert json.loads(agent.host.run("state", cid).stdout)["status"] == "stopped"
        await agent.remove(cid)
        assert cid not in crun_ids(agent.host)


@asyncio_test
async def test_start_of_a_container_whose_process_died_fails_at_once(tmp_path: Path) -> None:
    """No reader on the FIFO: ``crun start`` runs and says why, nothing hangs."""
    async with serve_agent(tmp_path) as agent:
        cid = await agent.create("died", ["echo", "never"])
        pid = json.loads(agent.host.run("state", cid).stdout)["pid"]
        os.kill(pid, signal.SIGKILL)
        async with asyncio.timeout(10):
            while _proc_state(pid) not in ("Z", "gone"):  # noqa: ASYNC110 (a process, no event)
                await asyncio.sleep(0.02)
            assert not agent.service.runtime._release_exec_fifo(cid)
            assert (Path("/run/crun") / cid / "exec.fifo").exists()
            with pytest.raises(FailedPrecondition, match="crun start"):
                await agent.service.runtime.start(cid)
            with pytest.raises(FailedPrecondition):
                await agent.call(
                    "StartContainer", agent_pb2.StartContainerRequest(container_id=cid)
                )
        await agent.remove(cid)
        assert cid not in crun_ids(agent.host)


@asyncio_test
async def test_poststart_hooks_run_through_the_runtimes_start(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as agent:
        cid = agent.cid("hooked")
        mark = tmp_path / "poststart"
        spec = make_spec(agent.rootfs, ["echo", "hooked"])
        hook = oci_pb2.Hook(Path="/bin/sh", Args=["sh", "-c", f"echo ran > {mark}"])
        spec.Hooks.Poststart.append(hook)
        create = agent_pb2.CreateContainerRequest(container_id=cid, OCI=spec)
        await agent.call("CreateContainer", create)
        await agent.call("StartContainer", agent_pb2.StartContainerRequest(container_id=cid))
        assert await agent.read_all(cid) == b"hooked\n"
        assert await agent.wait(cid) == 0
        assert mark.read_text() == "ran\n"  # crun ran it: the agent's own start would not
        await agent.remove(cid)


@asyncio_test
async def test_remove_deletes_the_runtimes_container_itself(tmp_path: Path) -> None:
    """With crun and no poststop hooks, the agent removes a stopped container without
    ``crun delete``, leaving crun nothing: the same id runs again."""
    async with serve_agent(tmp_path) as agent:
        cid = await agent.run("gone", ["echo", "once"])
        assert await agent.read_all(cid) == b"once\n"
        assert await agent.wait(cid) == 0
        state = Path("/run/crun") / cid
        cgroup = Path(agent.service._containers[cid].cgroup)
        assert state.is_dir()
        assert cgroup.is_dir()
        assert agent.service.runtime.remove_stopped(cid, str(cgroup))
        assert not state.exists()
        assert not cgroup.exists()
        assert cid not in crun_ids(agent.host)
        await agent.remove(cid)
        again = await agent.run("gone", ["echo", "twice"])
        assert again == cid
        assert await agent.read_all(cid) == b"twice\n"
        assert await agent.wait(cid) == 0
        await agent.remove(cid)
        assert cid not in crun_ids(agent.host)
        assert not state.exists()
        assert not cgroup.exists()


@asyncio_test
async def test_a_container_still_in_its_cgroup_is_left_to_the_runtime(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as agent:
        cid = await agent.run("busy", ["sleep", "1000"])
        cgroup = agent.service._containers[cid].cgroup
        assert not agent.service.runtime.remove_stopped(cid, cgroup)  # sleep is in it
        assert (Path("/run/crun") / cid).is_dir()  # nothing crun's delete would miss
        await agent.remove(cid)  # kills it; then removed
        assert cid not in crun_ids(agent.host)
        assert not Path(cgroup).exists()


@asyncio_test
async def test_poststop_hooks_run_through_the_runtimes_delete(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as agent:
        cid = agent.cid("poststop")
        mark = tmp_path / "poststop"
        spec = make_spec(agent.rootfs, ["true"])
        spec.Hooks.Poststop.append(
            oci_pb2.Hook(Path="/bin/sh", Args=["sh", "-c", f"echo ran > {mark}"])
        )
        await agent.call(
            "CreateContainer", agent_pb2.CreateContainerRequest(container_id=cid, OCI=spec)
        )
        await agent.call("StartContainer", agent_pb2.StartContainerRequest(container_id=cid))
        assert await agent.wait(cid) == 0
        await agent.remove(cid)
        assert mark.read_text() == "ran\n"  # crun ran it: the agent's own removal would not
        assert cid not in crun_ids(agent.host)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


@asyncio_test
async def test_destroy_all_kills_and_forgets_every_container_without_the_runtime(
    tmp_path: Path,
) -> None:
    """DestroySandbox: the VM goes next, so crun's own state is left to go with it."""
    async with serve_agent(tmp_path) as agent:
        cid = await agent.run("doomed", ["sleep", "1000"])
        pid = json.loads(agent.host.run("state", cid).stdout)["pid"]
        async with asyncio.timeout(15):
            await agent.service.destroy_all()
        assert _proc_state(pid) in ("Z", "gone")
        with pytest.raises(NotFound):
            await agent.wait(cid)
        assert json.loads(agent.host.run("state", cid).stdout)["status"] == "stopped"


@asyncio_test
async def test_tty_and_resize(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as agent:
        cid = await agent.run("tty", ["sh", "-c", "sleep 0.5; stty size"], terminal=True)
        await agent.call(
            "TtyWinResize", agent_pb2.TtyWinResizeRequest(container_id=cid, row=33, column=101)
        )
        assert await agent.read_all(cid, stderr=True) == b""  # a terminal has no stderr
        out = await agent.read_all(cid)
        assert out.replace(b"\r", b"").strip() == b"33 101"
        assert await agent.wait(cid) == 0
        await agent.remove(cid)


@asyncio_test
async def test_close_stdin_of_a_terminal_is_end_of_input(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as agent:
        cid = await agent.run("ttycat", ["cat"], terminal=True)
        await agent.call("WriteStdin", agent_pb2.WriteStreamRequest(container_id=cid, data=b"hi\n"))
        # ^D at the start of a line: cat reads EOF (and the writer's own fd is closed).
        await agent.call("CloseStdin", agent_pb2.CloseStdinRequest(container_id=cid))
        assert await agent.wait(cid) == 0
        assert (await agent.read_all(cid)).replace(b"\r", b"") == b"hi\nhi\n"  # echo, cat
        await agent.remove(cid)


@asyncio_test
async def test_resize_without_tty_is_refused(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as agent:
        cid = await agent.run("notty", ["sleep", "100"])
        with pytest.raises(FailedPrecondition):
            await agent.call(
                "TtyWinResize", agent_pb2.TtyWinResizeRequest(container_id=cid, row=1, column=1)
            )
        await agent.remove(cid)


@asyncio_test
async def test_signal_init(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as agent:
        cid = await agent.run("kill", ["sleep", "100"])
        # pid 1 ignores SIGTERM without a handler: as Kata, the agent sends SIGKILL instead.
        await agent.call(
            "SignalProcess", agent_pb2.SignalProcessRequest(container_id=cid, signal=signal.SIGTERM)
        )
        assert await agent.wait(cid) == 137
        # Signalling an init that already exited is not an error.
        await agent.call(
            "SignalProcess", agent_pb2.SignalProcessRequest(container_id=cid, signal=signal.SIGKILL)
        )
        await agent.remove(cid)


@asyncio_test
async def test_sigterm_to_init_with_a_handler(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as agent:
        script = "trap 'exit 143' TERM; echo ready; while :; do sleep 0.05; done"
        cid = await agent.run("trap", ["sh", "-c", script])
        resp = await agent.call(
            "ReadStdout",
            agent_pb2.ReadStreamRequest(container_id=cid, len=64),
            agent_pb2.ReadStreamResponse,
        )
        assert resp.data == b"ready\n"
        await agent.call(
            "SignalProcess", agent_pb2.SignalProcessRequest(container_id=cid, signal=signal.SIGTERM)
        )
        assert await agent.wait(cid) == 143
        await agent.remove(cid)


@asyncio_test
async def test_many_waiters(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as agent:
        cid = await agent.run("waiters", ["sh", "-c", "sleep 0.3; exit 7"])
        results: list[int] = []

        async def waiter() -> None:
            results.append(await agent.wait(cid))

        async with asyncio.TaskGroup() as group:
            for _ in range(5):
                group.create_task(waiter())
        assert results == [7] * 5
        await agent.remove(cid)


@asyncio_test
async def test_large_output_complete_and_bounded(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as agent:
        cid = await agent.run("big", ["head", "-c", "5000000", "/dev/zero"])
        await asyncio.sleep(0.5)  # the process fills our buffer and the pipe, then blocks
        container = agent.service._containers[cid]
        assert container.init is not None
        assert len(container.init.stdout) <= 1 << 20
        assert not container.init.exited  # back-pressure: it cannot finish unread
        total = 0
        while True:
            resp = await agent.call(
                "ReadStdout",
                agent_pb2.ReadStreamRequest(container_id=cid, len=4 << 20),
                agent_pb2.ReadStreamResponse,
            )
            if not resp.data:
                break
            assert len(resp.data) <= 1 << 20
            assert resp.data.count(0) == len(resp.data)
            total += len(resp.data)
        assert total == 5_000_000
        assert await agent.wait(cid) == 0
        await agent.remove(cid)


# ---- container-wide verbs -------------------------------------------------------------------


@asyncio_test
async def test_stats(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as agent:
        cid = await agent.run(
            "stats", ["sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; sleep 100"]
        )
        await asyncio.sleep(0.5)
        resp = await agent.call(
            "StatsContainer",
            agent_pb2.StatsContainerRequest(container_id=cid),
            agent_pb2.StatsContainerResponse,
        )
        usage = resp.cgroup_stats.cpu_stats.cpu_usage
        assert usage.total_usage > 0
        assert usage.total_usage >= usage.usage_in_usermode
        cgroup = Path(agent.host.cgroup_root) / "kata-py" / cid
        if (cgroup / "memory.current").exists():
            assert resp.cgroup_stats.memory_stats.usage.usage > 0
            assert resp.cgroup_stats.pids_stats.current >= 2
        await agent.remove(cid)


@asyncio_test
async def test_pause_resume(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as agent:
        cid = await agent.run("pause", ["sleep", "100"])
        freeze = Path(agent.host.cgroup_root) / "kata-py" / cid / "cgroup.freeze"
        await agent.call("PauseContainer", agent_pb2.PauseContainerRequest(container_id=cid))
        assert freeze.read_text().strip() == "1"
        with pytest.raises(FailedPrecondition):
            await agent.call("PauseContainer", agent_pb2.PauseContainerRequest(container_id=cid))
        await agent.call("ResumeContainer", agent_pb2.ResumeContainerRequest(container_id=cid))
        assert freeze.read_text().strip() == "0"
        # A paused container can be removed: it is thawed and killed.
        await agent.call("PauseContainer", agent_pb2.PauseContainerRequest(container_id=cid))
        await agent.remove(cid)
        assert not freeze.parent.exists()


@asyncio_test
async def test_list_processes(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as agent:
        cid = await agent.run("ps", ["sleep", "100"])
        init = agent.service._containers[cid].init
        assert init is not None
        resp = await agent.call(
            "ListProcesses",
            agent_pb2.ListProcessesRequest(container_id=cid, format="json"),
            agent_pb2.ListProcessesResponse,
        )
        assert json.loads(resp.process_list) == [init.pid]
        # Start returns once the process may run, as crun's does: it may still be
        # on its way to exec ``sleep`` (the table shows what it is now).
        table = ""
        async with asyncio.timeout(10):
            while not re.search(rf"^\s*{init.pid} sleep 100$", table, re.M):
                resp = await agent.call(
                    "ListProcesses",
                    agent_pb2.ListProcessesRequest(container_id=cid, format="table"),
                    agent_pb2.ListProcessesResponse,
                )
                table = resp.process_list.decode()
        with pytest.raises(InvalidArgument):
            await agent.call(
                "ListProcesses", agent_pb2.ListProcessesRequest(container_id=cid, format="xml")
            )
        await agent.remove(cid)


@asyncio_test
async def test_update_container(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as agent:
        cid = await agent.run("update", ["sleep", "100"])
        cgroup = Path(agent.host.cgroup_root) / "kata-py" / cid
        resources = oci_pb2.LinuxResources()
        if (cgroup / "pids.max").exists():
            resources.Pids.Limit = 42
            await agent.call(
                "UpdateContainer",
                agent_pb2.UpdateContainerRequest(container_id=cid, resources=resources),
            )
            assert (cgroup / "pids.max").read_text().strip() == "42"
        else:  # no pids controller here: the runtime's refusal comes back as a status
            resources.Pids.Limit = 42
            with pytest.raises(FailedPrecondition):
                await agent.call(
                    "UpdateContainer",
                    agent_pb2.UpdateContainerRequest(container_id=cid, resources=resources),
                )
        await agent.remove(cid)


# ---- errors and removal ---------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../x", "", "-x", "a/b", "x" * 77, ".."])
@asyncio_test
async def test_bad_ids_are_refused(tmp_path: Path, bad: str) -> None:
    async with serve_agent(tmp_path) as agent:
        spec = make_spec(agent.rootfs, ["true"])
        with pytest.raises(InvalidArgument):
            await agent.call(
                "CreateContainer", agent_pb2.CreateContainerRequest(container_id=bad, OCI=spec)
            )
        with pytest.raises(InvalidArgument):
            await agent.call("StartContainer", agent_pb2.StartContainerRequest(container_id=bad))
        assert not os.path.exists(agent.state_dir / "x")
        # The agent still serves.
        cid = await agent.run("after", ["echo", "alive"])
        assert await agent.read_all(cid) == b"alive\n"
        await agent.remove(cid)


@asyncio_test
async def test_bad_exec_id_and_sizes(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as agent:
        cid = await agent.run("sizes", ["sleep", "100"])
        with pytest.raises(InvalidArgument):
            await agent.call(
                "ExecProcess",
                agent_pb2.ExecProcessRequest(
                    container_id=cid, exec_id="../e", process=make_process(["true"])
                ),
            )
        with pytest.raises(InvalidArgument):
            await agent.call("ReadStdout", agent_pb2.ReadStreamRequest(container_id=cid, len=0))
        with pytest.raises(InvalidArgument):
            await agent.call(
                "SignalProcess", agent_pb2.SignalProcessRequest(container_id=cid, signal=1000)
            )
        with pytest.raises(NotFound):
            await agent.call(
                "SignalProcess",
                agent_pb2.SignalProcessRequest(container_id=cid, exec_id="nope", signal=9),
            )
        await agent.remove(cid)


@asyncio_test
async def test_unknown_container(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as agent:
        for method, req in [
            ("StartContainer", agent_pb2.StartContainerRequest(container_id="nope")),
            ("WaitProcess", agent_pb2.WaitProcessRequest(container_id="nope")),
            ("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="nope")),
            ("StatsContainer", agent_pb2.StatsContainerRequest(container_id="nope")),
        ]:
            with pytest.raises(NotFound):
                await agent.call(method, req)


@asyncio_test
async def test_create_failure_leaves_nothing(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as agent:
        cid = agent.cid("nobin")
        spec = make_spec(agent.rootfs, ["/no/such/binary"])
        # crun checks the binary at create or at start, depending on its version.
        try:
            await agent.call(
                "CreateContainer", agent_pb2.CreateContainerRequest(container_id=cid, OCI=spec)
            )
        except FailedPrecondition:
            assert cid not in agent.service._containers
        else:
            with pytest.raises(FailedPrecondition):
                await agent.call(
                    "StartContainer", agent_pb2.StartContainerRequest(container_id=cid)
                )
            await agent.remove(cid)
        assert cid not in crun_ids(agent.host)
        assert not (agent.state_dir / cid).exists()
        assert not (Path(agent.host.cgroup_root) / "kata-py" / cid).exists()


@asyncio_test
async def test_net_sysctls_of_a_shared_network_are_set_by_the_agent(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as agent:
        # CRI sets this on every pod; crun refuses it without a new network namespace.
        setting = tmp_path / "proc_sys" / "net" / "ipv4" / "ping_group_range"
        setting.parent.mkdir(parents=True)
        setting.write_text("1\t0\n")
        cid = agent.cid("sysctl")
        spec = make_spec(agent.rootfs, ["echo", "ran"])
        namespaces = [ns for ns in spec.Linux.Namespaces if ns.Type != "network"]
        del spec.Linux.Namespaces[:]
        spec.Linux.Namespaces.extend(namespaces)
        spec.Linux.Sysctl["net.ipv4.ping_group_range"] = "0 2147483647"
        await agent.call(
            "CreateContainer", agent_pb2.CreateContainerRequest(container_id=cid, OCI=spec)
        )
        assert setting.read_text() == "0 2147483647"
        config = json.loads((agent.state_dir / cid / "config.json").read_text())
        assert "net.ipv4.ping_group_range" not in config["linux"].get("sysctl", {})
        await agent.call("StartContainer", agent_pb2.StartContainerRequest(container_id=cid))
        assert await agent.read_all(cid) == b"ran\n"
        assert await agent.wait(cid) == 0
        await agent.remove(cid)


@pytest.mark.parametrize("sandbox_pidns", [False, True])
@asyncio_test
async def test_an_app_container_joins_its_pods_namespaces(
    tmp_path: Path, sandbox_pidns: bool
) -> None:
    async with serve_agent(tmp_path) as agent:
        pod, app = agent.cid("pod"), agent.cid("app")
        pod_spec = make_spec(agent.rootfs, ["sleep", "100"])
        pod_spec.Hostname = "pod-host"
        pod_spec.Annotations.update(
            {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": pod}
        )
        await agent.call(
            "CreateContainer", agent_pb2.CreateContainerRequest(container_id=pod, OCI=pod_spec)
        )
        await agent.call("StartContainer", agent_pb2.StartContainerRequest(container_id=pod))
        pod_pid = agent.service._containers[pod].init.pid  # type: ignore[union-attr]
        script = "for ns in ipc uts pid; do readlink /proc/self/ns/$ns; done; hostname"
        app_spec = make_spec(agent.rootfs, ["sh", "-c", script])
        app_spec.Hostname = "pod-host"
        app_spec.Annotations.update(
            {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": pod}
        )
        request = agent_pb2.CreateContainerRequest(
            container_id=app, OCI=app_spec, sandbox_pidns=sandbox_pidns
        )
        await agent.call("CreateContainer", request)
        await agent.call("StartContainer", agent_pb2.StartContainerRequest(container_id=app))
        ipc, uts, pid, hostname = (await agent.read_all(app)).decode().split()
        assert await agent.wait(app) == 0
        assert ipc == os.readlink(f"/proc/{pod_pid}/ns/ipc")
        assert uts == os.readlink(f"/proc/{pod_pid}/ns/uts")
        assert (pid == os.readlink(f"/proc/{pod_pid}/ns/pid")) is sandbox_pidns
        assert hostname == "pod-host"
        await agent.remove(app)
        await agent.call(
            "SignalProcess", agent_pb2.SignalProcessRequest(container_id=pod, signal=9)
        )
        await agent.wait(pod)
        await agent.remove(pod)


@asyncio_test
async def test_remove_leaves_nothing(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as agent:
        cid = await agent.run("rm", ["sleep", "100"])
        init = agent.service._containers[cid].init
        assert init is not None
        pid = init.pid
        cgroup = Path(agent.host.cgroup_root) / "kata-py" / cid
        assert cgroup.exists()
        assert cid in crun_ids(agent.host)
        await agent.remove(cid)  # still running: killed first, as Kata does
        assert not (agent.state_dir / cid).exists()
        assert cid not in crun_ids(agent.host)
        assert not cgroup.exists()
        assert not os.path.exists(f"/proc/{pid}")
        with pytest.raises(NotFound):
            await agent.wait(cid)


@pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc")
@asyncio_test
async def test_runc_selectable(tmp_path: Path) -> None:
    host = host_runtime("runc")
    async with serve_agent(tmp_path, host) as agent:
        cid = await agent.run("runc", ["sh", "-c", "echo via runc; exit 5"])
        assert await agent.read_all(cid) == b"via runc\n"
        assert await agent.wait(cid) == 5
        await agent.remove(cid)
        assert cid not in crun_ids(host)


# ---- cgroup files, without a container ------------------------------------------------------


def test_read_stats_from_cgroup_files(tmp_path: Path) -> None:
    files = {
        "cpu.stat": "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 4\n",
        "memory.current": "4096\n",
        "memory.peak": "8192\n",
        "memory.max": "max\n",
        "memory.stat": "anon 1024\nfile 2048\nkernel 100\n",
        "memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n",
        "pids.current": "3\n",
        "pids.max": "100\n",
        "io.stat": "8:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n",
        "hugetlb.2MB.current": "0\n",
        "cgroup.procs": "12\n34\n",
        "cgroup.freeze": "1\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    stats = cgroups.read_stats(str(tmp_path))
    assert stats.cpu_stats.cpu_usage.total_usage == 1_500_000
    assert stats.cpu_stats.cpu_usage.usage_in_usermode == 1_000_000
    assert stats.cpu_stats.cpu_usage.usage_in_kernelmode == 500_000
    assert stats.memory_stats.usage.usage == 4096
    assert stats.memory_stats.usage.max_usage == 8192
    assert stats.memory_stats.usage.limit == cgroups.UNLIMITED
    assert stats.memory_stats.usage.failcnt == 3
    assert stats.memory_stats.cache == 2048
    assert dict(stats.memory_stats.stats) == {
        "anon": 1024,
        "file": 2048,
        "kernel": 100,
        "oom": 1,
        "oom_kill": 2,
    }
    assert (stats.pids_stats.current, stats.pids_stats.limit) == (3, 100)
    assert [(e.op, e.value) for e in stats.blkio_stats.io_service_bytes_recursive] == [
        ("Read", 10),
        ("Write", 20),
    ]
    assert "2MB" in stats.hugetlb_stats
    assert cgroups.oom_kills(str(tmp_path)) == 2
    assert cgroups.read_procs(str(tmp_path)) == [12, 34]
    assert cgroups.is_frozen(str(tmp_path))
    # A cgroup with no files at all: zeros, no error.
    empty = cgroups.read_stats(str(tmp_path / "none"))
    assert empty.cpu_stats.cpu_usage.total_usage == 0
    assert empty.memory_stats.usage.usage == 0
    assert not empty.memory_stats.stats
    assert not empty.hugetlb_stats


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/kata-py/c1", "/cg/kata-py/c1"), ("kubepods/p/c", "/cg/kubepods/p/c"), ("/a/../b", "/cg/b")],
)
def test_cgroup_dir(path: str, expected: str) -> None:
    assert cgroups.cgroup_dir("/cg", path) == expected


@pytest.mark.parametrize("path", ["/", "", "/..", "a\x00b"])  # NUL: found by fuzzing
def test_cgroup_dir_refuses_the_root(path: str) -> None:
    with pytest.raises(InvalidArgument):
        cgroups.cgroup_dir("/cg", path)


@pytest.mark.fuzz
@given(st.one_of(texts(), st.lists(texts(["..", ".", "", "a", "/", "x\x00"])).map("/".join)))
def test_fuzz_cgroup_dir_stays_under_the_root(path: str) -> None:
    # CreateContainer takes the host's linux.cgroupsPath through this.
    try:
        got = cgroups.cgroup_dir("/cg", path)
    except InvalidArgument:
        return
    assert got.startswith("/cg/")
    assert os.path.normpath(got) == got
    assert "\0" not in got


def test_a_process_without_arguments_is_listed_by_its_name() -> None:
    from shimv2.guest.containers import _cmdline

    zombie = subprocess.Popen(["sleep", "0"])
    try:
        deadline = time.monotonic() + 5
        # Not reaped: a zombie, whose cmdline is empty (by its state: a process
        # in the middle of its execve has an empty cmdline too, and its old name).
        while _proc_state(zombie.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert Path(f"/proc/{zombie.pid}/cmdline").read_bytes() == b""
        assert _cmdline(zombie.pid) == "[sleep]"
    finally:
        zombie.wait()
    assert sys.executable in _cmdline(os.getpid())
    assert _cmdline(2**22 + 1) == "?"
