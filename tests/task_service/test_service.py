"""The Task API end to end through the real ttrpc server and client, on a fake vc."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from shimv2.errdefs import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
    Unimplemented,
)
from shimv2.pb.cgroups.v1 import metrics_pb2 as v1
from shimv2.pb.cgroups.v2 import metrics_pb2 as v2
from shimv2.pb.containerd.events import task_pb2 as events
from shimv2.pb.containerd.runtime.task.v2 import shim_pb2 as shim_v2
from shimv2.pb.containerd.runtime.task.v3 import shim_pb2 as shim_v3
from shimv2.pb.containerd.types.task import task_pb2
from shimv2.pb.kata import agent_pb2
from shimv2.task_service import TaskService, VirtContainers
from shimv2.task_service.service import cgroups_path, network_namespace
from shimv2.task_service.stats import host_is_cgroup_v2
from shimv2.task_service.testing import (
    FAKE_VM_PID,
    FakeVirtContainers,
    Program,
    RecordingPublisher,
    RecordingShutdown,
)
from shimv2.ttrpc import CallContext, Client, Server, open_client
from shimv2.vc import api

PROCESS_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"


def _real_vc_conforms(real: api.VirtContainers) -> VirtContainers:
    return real  # checked by mypy: the service's Protocol matches the real vc


class HookedPublisher(RecordingPublisher):
    """Runs ``hook(topic)`` synchronously as each event is published."""

    def __init__(self) -> None:
        super().__init__()
        self.hook: Callable[[str], None] = lambda topic: None

    def publish(self, topic: str, event: Message) -> None:
        self.hook(topic)
        super().publish(topic, event)


@dataclass
class Harness:
    client: Client
    service: TaskService
    vc: FakeVirtContainers
    events: HookedPublisher
    shutdown: RecordingShutdown
    version: str
    tmp: Path

    async def __call__(self, method: str, **fields: Any) -> Any:
        pb = shim_v2 if self.version == "v2" else shim_v3
        rpc = pb.DESCRIPTOR.services_by_name["Task"].methods_by_name[method]
        request = GetMessageClass(rpc.input_type)(**fields)
        response_type = GetMessageClass(rpc.output_type)
        name = f"containerd.task.{self.version}.Task"
        return await self.client.call(name, method, request, response_type)

    def bundle(self, cid: str, annotations: dict[str, str] | None = None) -> str:
        path = self.tmp / "bundles" / cid
        path.mkdir(parents=True, exist_ok=True)
        spec = {
            "ociVersion": "1.1.0",
            "hostname": cid,
            "process": {"args": ["sh"], "cwd": "/"},
            "root": {"path": "rootfs"},
            "annotations": annotations or {},
            "linux": {
                "namespaces": [{"type": "network", "path": "/var/run/netns/x"}],
                "cgroupsPath": f"/kubepods/besteffort/pod1/{cid}",
            },
        }
        (path / "config.json").write_text(json.dumps(spec))
        return str(path)

    def fifo(self, name: str) -> str:
        path = str(self.tmp / name)
        os.mkfifo(path)
        return path

    async def create(self, cid: str, **fields: Any) -> Any:
        bundle = self.bundle(cid, fields.pop("annotations", None))
        return await self("Create", id=cid, bundle=bundle, **fields)

    def exited(self) -> list[tuple[str, int]]:
        return [
            (e.id, e.exit_status)
            for t, e in self.events.events
            if t == "/tasks/exit" and isinstance(e, events.TaskExit)
        ]


@pytest.fixture(params=["v2", "v3"])
async def h(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    async with trio.open_nursery() as nursery:
        vc = FakeVirtContainers(nursery)
        publisher, shutdown = HookedPublisher(), RecordingShutdown()
        service = TaskService(vc, publisher, shutdown, namespace="k8s.io", shim_id="shim1")
        await nursery.start(service.run)
        server = Server(service.services())
        a, b = socket.socketpair()
        nursery.start_soon(
            server.serve_stream, trio.SocketStream(trio.socket.from_stdlib_socket(a))
        )
        async with open_client(trio.SocketStream(trio.socket.from_stdlib_socket(b))) as client:
            yield Harness(client, service, vc, publisher, shutdown, request.param, tmp_path)
        nursery.cancel_scope.cancel()


class FifoReader:
    """containerd's end of an output FIFO: read in the background, drainable at once."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.data = bytearray()
        self.eof = False

    def drain(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                self.eof = True
                return
            self.data += chunk

    async def run(self, delay: float = 0.0) -> None:
        await trio.sleep(delay)
        while not self.eof:
            await trio.lowlevel.wait_readable(self.fd)
            self.drain()

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.fd)
        os.close(self.fd)


# -- lifecycle -----------------------------------------------------------------------


async def test_lifecycle_and_event_order(h: Harness) -> None:
    h.vc.programs["c1", ""] = Program(exit_code=3)
    created = await h.create("c1")
    assert created.pid == FAKE_VM_PID
    state = await h("State", id="c1")
    assert (state.status, state.pid) == (task_pb2.CREATED, FAKE_VM_PID)
    assert state.bundle == str(h.tmp / "bundles" / "c1")
    started = await h("Start", id="c1")
    assert started.pid == FAKE_VM_PID
    waited = await h("Wait", id="c1")
    assert waited.exit_status == 3
    assert waited.exited_at.seconds > 0
    assert (await h("State", id="c1")).status == task_pb2.STOPPED
    deleted = await h("Delete", id="c1")
    assert (deleted.exit_status, deleted.pid) == (3, FAKE_VM_PID)
    assert h.events.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    create_event = h.events.events[0][1]
    assert isinstance(create_event, events.TaskCreate)
    assert create_event.pid == FAKE_VM_PID
    assert h.exited() == [("c1", 3)]
    verbs = [c[0] for c in h.vc.calls]
    # The sandbox goes with its own container: its VM is stopped before the
    # container is deleted, so nothing is removed in the guest one by one.
    assert verbs == [
        "create_sandbox", "start_sandbox", "stop_sandbox", "delete_container", "stop_sandbox",
        "delete_sandbox",
    ]  # fmt: skip
    assert h.vc.sandboxes == {}
    with pytest.raises(NotFound):
        await h("State", id="c1")


async def test_services_bind_both_versions_with_their_classes(h: Harness, tmp_path: Path) -> None:
    v2svc, v3svc = h.service.services()
    assert (v2svc.name, v3svc.name) == ("containerd.task.v2.Task", "containerd.task.v3.Task")
    assert "Checkpoint" in v3svc.methods
    assert len(v3svc.methods) == 17
    assert v3svc.methods["State"].request_type is shim_v3.StateRequest
    await h.create("c1")
    ctx = CallContext("containerd.task.v3.Task", "State", {})
    reply = await v3svc.methods["State"].handler(ctx, shim_v3.StateRequest(id="c1"))
    assert type(reply) is shim_v3.StateResponse
    reply = await v2svc.methods["State"].handler(ctx, shim_v2.StateRequest(id="c1"))
    assert type(reply) is shim_v2.StateResponse


async def test_sandbox_config_from_spec(h: Harness) -> None:
    await h.create("c1")
    config = h.vc.sandboxes["c1"].config
    assert (config.id, config.hostname, config.netns) == ("c1", "c1", "/var/run/netns/x")
    assert [c.id for c in config.containers] == ["c1"]
    assert config.cgroups_path == "/kubepods/besteffort/pod1/c1"  # QEMU's cgroup


def test_a_pod_on_the_hosts_network_is_refused() -> None:
    # CRI's hostNetwork and ctr --net-host leave the network namespace out.
    assert network_namespace({"linux": {"namespaces": [{"type": "network"}]}}) == ""
    for spec in ({}, {"linux": {"namespaces": [{"type": "pid"}]}}):
        with pytest.raises(InvalidArgument, match="host networking is not supported"):
            network_namespace(spec)


async def test_a_host_network_sandbox_is_refused_before_anything_starts(h: Harness) -> None:
    bundle = Path(h.bundle("c1"))
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["namespaces"] = [{"type": "pid"}]
    (bundle / "config.json").write_text(json.dumps(spec))
    with pytest.raises(InvalidArgument, match="host networking"):
        await h("Create", id="c1", bundle=str(bundle))
    assert h.vc.sandboxes == {}


def test_cgroups_path_must_be_a_string() -> None:
    assert cgroups_path({}) == ""
    assert cgroups_path({"linux": {"cgroupsPath": "a:b:c"}}) == "a:b:c"
    with pytest.raises(InvalidArgument, match="not a string"):
        cgroups_path({"linux": {"cgroupsPath": ["/x"]}})


async def test_fifo_output_complete_before_exit_event_and_wait(h: Harness) -> None:
    out = h.fifo("out")
    reader = FifoReader(out)
    big = os.urandom(200_000)
    h.vc.programs["c1", ""] = Program(stdout=big)
    at_exit: list[bytes] = []

    def hook(topic: str) -> None:
        if topic == "/tasks/exit":
            reader.drain()
            at_exit.append(bytes(reader.data))

    h.events.hook = hook
    try:
        async with trio.open_nursery() as n:
            n.start_soon(reader.run)
            await h.create("c1", stdout=out)
            await h("Start", id="c1")
            await h("Wait", id="c1")
            reader.drain()
            assert bytes(reader.data) == big
    finally:
        reader.close()
    assert at_exit == [big]


async def test_exec_events_and_init_exit_after_exec_exit(h: Harness) -> None:
    await h.create("c1")
    await h("Start", id="c1")
    out = h.fifo("exec-out")
    reader = FifoReader(out)
    # The exec's output outlasts the pipe buffer and its reader is late: its
    # exit is late too, and the init's exit must still come after it.
    h.vc.programs["c1", "e1"] = Program(stdout=b"z" * 300_000, run_for=None)
    spec = AnyPb(type_url=PROCESS_URL, value=json.dumps({"args": ["top"], "cwd": "/"}).encode())
    try:
        async with trio.open_nursery() as n:
            await h("Exec", id="c1", exec_id="e1", stdout=out, spec=spec)
            assert (await h("State", id="c1", exec_id="e1")).status == task_pb2.CREATED
            await h("Start", id="c1", exec_id="e1")
            assert (await h("State", id="c1", exec_id="e1")).status == task_pb2.RUNNING
            await h("Kill", id="c1", signal=signal.SIGKILL)
            n.start_soon(reader.run, 0.3)
            init = await h("Wait", id="c1")
            execd = await h("Wait", id="c1", exec_id="e1")
    finally:
        reader.close()
    assert (init.exit_status, execd.exit_status) == (137, 137)
    assert len(reader.data) == 300_000
    assert h.events.topics() == [
        "/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started",
        "/tasks/exit", "/tasks/exit",
    ]  # fmt: skip
    assert h.exited() == [("e1", 137), ("c1", 137)]
    added = h.events.events[2][1]
    assert isinstance(added, events.TaskExecAdded)
    assert added.exec_id == "e1"
    assert ("enter", "c1", "e1", {"args": ["top"], "cwd": "/"}) in h.vc.calls


async def test_exec_lifecycle_and_kill_of_stopped_exec(h: Harness) -> None:
    await h.create("c1")
    await h("Start", id="c1")
    h.vc.programs["c1", "e1"] = Program(exit_code=5)
    spec = AnyPb(type_url=PROCESS_URL, value=b'{"args": ["true"]}')
    await h("Exec", id="c1", exec_id="e1", spec=spec)
    with pytest.raises(AlreadyExists):
        await h("Exec", id="c1", exec_id="e1", spec=spec)
    with pytest.raises(FailedPrecondition):
        await h("Kill", id="c1", exec_id="e1", signal=signal.SIGTERM)  # not started
    await h("Start", id="c1", exec_id="e1")
    assert (await h("Wait", id="c1", exec_id="e1")).exit_status == 5
    with pytest.raises(NotFound, match="process already finished"):
        await h("Kill", id="c1", exec_id="e1", signal=signal.SIGKILL)
    with pytest.raises(FailedPrecondition):
        await h("Start", id="c1", exec_id="e1")
    deleted = await h("Delete", id="c1", exec_id="e1")
    assert deleted.exit_status == 5
    with pytest.raises(NotFound):
        await h("State", id="c1", exec_id="e1")
    assert "/tasks/delete" not in h.events.topics()  # only the init's delete is an event


async def test_a_deleted_exec_is_forgotten_and_its_id_free_again(h: Harness) -> None:
    # Exec liveness probes: an exec per probe, each deleted once waited for.
    await h.create("c1")
    await h("Start", id="c1")
    spec = AnyPb(type_url=PROCESS_URL, value=b'{"args": ["true"]}')
    for code in range(3):
        h.vc.programs["c1", "probe"] = Program(exit_code=code)
        await h("Exec", id="c1", exec_id="probe", spec=spec)
        await h("Start", id="c1", exec_id="probe")
        assert (await h("Wait", id="c1", exec_id="probe")).exit_status == code
        assert (await h("Delete", id="c1", exec_id="probe")).exit_status == code
        assert h.vc.container("c1", "c1").execs == {}  # vc forgot it too


@pytest.mark.parametrize(
    "raw",
    [b"[1, -5]", b"[4294967296]", b"[" * 50_000 + b"]" * 50_000, b'{"a": 1}', b"[true]"],
)
async def test_pids_refuses_an_absurd_process_list(h: Harness, raw: bytes) -> None:
    await h.create("c1")
    await h("Start", id="c1")
    h.vc.process_list = raw
    with pytest.raises(Internal, match="process list"):
        await h("Pids", id="c1")


async def test_kill_stopped_init(h: Harness) -> None:
    h.vc.programs["c1", ""] = Program()
    await h.create("c1")
    await h("Start", id="c1")
    await h("Wait", id="c1")
    await h("Kill", id="c1", signal=signal.SIGKILL)  # nothing left: fine
    with pytest.raises(NotFound):
        await h("Kill", id="c1", signal=signal.SIGTERM)


async def test_kill_running_init_signals_it(h: Harness) -> None:
    await h.create("c1")
    await h("Start", id="c1")
    await h("Kill", id="c1", signal=signal.SIGTERM, all=True)
    assert (await h("Wait", id="c1")).exit_status == 128 + signal.SIGTERM
    assert ("kill_container", "c1", "c1", signal.SIGTERM, True) in h.vc.calls


async def test_stdin_echo_and_close_io(h: Harness) -> None:
    stdin, out = h.fifo("in"), h.fifo("out")
    reader = FifoReader(out)
    h.vc.programs["c1", ""] = Program(echo=True)
    await h.create("c1", stdin=stdin, stdout=out)
    writer = os.open(stdin, os.O_WRONLY | os.O_NONBLOCK)
    try:
        await h("Start", id="c1")
        os.write(writer, b"ping\n")
        with trio.fail_after(5):
            while bytes(reader.data) != b"ping\n":
                await trio.sleep(0.01)
                reader.drain()
            os.write(writer, b"last\n")
            await h("CloseIO", id="c1", stdin=True)
            waited = await h("Wait", id="c1")
        reader.drain()
    finally:
        os.close(writer)
        reader.close()
    assert waited.exit_status == 0
    assert bytes(reader.data) == b"ping\nlast\n"


async def test_terminal_and_resize(h: Harness) -> None:
    out, err = h.fifo("out"), h.fifo("err")
    reader = FifoReader(out)
    h.vc.programs["c1", ""] = Program(stdout=b"$ ", stderr=b"ignored", run_for=None)
    try:
        await h.create("c1", stdout=out, stderr=err, terminal=True)
        with pytest.raises(FailedPrecondition):
            await h("ResizePty", id="c1", width=80, height=24)
        await h("Start", id="c1")
        await h("ResizePty", id="c1", width=120, height=40)
        assert h.vc.container("c1", "c1").resizes == [("", 40, 120)]
        assert (await h("State", id="c1")).terminal
        await h("Kill", id="c1", signal=signal.SIGKILL)
        await h("Wait", id="c1")
        reader.drain()
    finally:
        reader.close()
    assert bytes(reader.data) == b"$ "


async def test_delete_created_task(h: Harness) -> None:
    await h.create("c1")
    waiter_done = trio.Event()

    async def waiter() -> None:
        await h("Wait", id="c1")
        waiter_done.set()

    async with trio.open_nursery() as n:
        n.start_soon(waiter)
        await trio.sleep(0.05)
        deleted = await h("Delete", id="c1")
    assert waiter_done.is_set()
    assert deleted.exit_status == 137
    assert h.events.topics() == ["/tasks/create", "/tasks/delete"]
    assert ("stop_container", "c1", "c1") in h.vc.calls


async def test_a_delete_past_its_deadline_still_takes_the_pod_down(h: Harness) -> None:
    """containerd 1.6 gives a sandbox's exit 10 s; 20 pods stopping at once here took
    longer. The shim must not stop half-way (QEMU gone, its sandbox kept, the shim
    alive for good): the delete finishes, and containerd's retry finds it done."""
    h.vc.programs["p1", ""] = Program(exit_code=0)
    await h.create("p1")
    await h("Start", id="p1")
    await h("Wait", id="p1")
    h.vc.stop_delay = 0.5
    name = f"containerd.task.{h.version}.Task"
    pb = shim_v2 if h.version == "v2" else shim_v3
    with pytest.raises(DeadlineExceeded):
        await h.client.call(
            name, "Delete", pb.DeleteRequest(id="p1"), pb.DeleteResponse, timeout=0.1
        )
    # containerd's retry finds the task gone, and asks the shim to shut down: it does
    # once the first delete, which went on, has taken the sandbox down.
    with pytest.raises(NotFound):
        await h("Delete", id="p1")
    with trio.fail_after(5):
        await h("Shutdown", id="p1")
    assert h.vc.sandboxes == {}
    assert [c[0] for c in h.vc.calls][-2:] == ["stop_sandbox", "delete_sandbox"]
    assert h.shutdown.requested()


async def test_a_sandbox_whose_teardown_failed_is_taken_down_at_shutdown(h: Harness) -> None:
    h.vc.programs["p1", ""] = Program(exit_code=0)
    await h.create("p1")
    await h("Start", id="p1")
    await h("Wait", id="p1")
    h.vc.stop_failures = 2  # the early stop (logged), then the reap's (reported)
    with pytest.raises(Unavailable, match="stop failed"):
        await h("Delete", id="p1")
    assert "p1" in h.vc.sandboxes
    await h("Shutdown", id="p1")  # no task left: the sandbox is tried again, then the shim goes
    assert h.vc.sandboxes == {}
    assert h.shutdown.requested()


async def test_delete_running_task_refused(h: Harness) -> None:
    await h.create("c1")
    await h("Start", id="c1")
    with pytest.raises(FailedPrecondition, match="cannot delete task in running state"):
        await h("Delete", id="c1")


async def test_wait_blocks_nothing_and_many_waiters(h: Harness) -> None:
    await h.create("c1")
    await h("Start", id="c1")
    results: list[int] = []

    async def waiter() -> None:
        results.append((await h("Wait", id="c1")).exit_status)

    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(waiter)
        await trio.sleep(0.05)
        with trio.fail_after(1):
            assert (await h("State", id="c1")).status == task_pb2.RUNNING
        assert results == []
        await h("Kill", id="c1", signal=signal.SIGKILL)
    assert results == [137] * 5


# -- pods ------------------------------------------------------------------------------


async def test_pod_sandbox_outlives_its_own_container_until_empty(h: Harness) -> None:
    cri = "io.kubernetes.cri"
    await h.create("pod", annotations={f"{cri}.container-type": "sandbox"})
    await h("Start", id="pod")
    app = {f"{cri}.container-type": "container", f"{cri}.sandbox-id": "pod"}
    await h.create("app", annotations=app)
    assert ("create_container", "pod", "app") in h.vc.calls
    await h("Start", id="app")
    assert ("start_container", "pod", "app") in h.vc.calls
    for cid in ("pod", "app"):
        await h("Kill", id=cid, signal=signal.SIGKILL)
        await h("Wait", id=cid)
    await h("Delete", id="pod")
    assert "pod" in h.vc.sandboxes  # the app container still lives in it
    await h("Shutdown", id="shim1")
    assert not h.shutdown.requested()
    await h("Delete", id="app")
    assert h.vc.sandboxes == {}
    assert [c[0] for c in h.vc.calls][-2:] == ["stop_sandbox", "delete_sandbox"]
    await h("Shutdown", id="shim1")
    assert h.shutdown.requested()


async def test_container_without_sandbox_id_rejected(h: Harness) -> None:
    with pytest.raises(InvalidArgument, match="sandbox-id"):
        await h.create("app", annotations={"io.kubernetes.cri.container-type": "container"})
    await h.create("app", annotations={})  # the id is free again


# -- controls and queries ---------------------------------------------------------------


async def test_pause_resume(h: Harness) -> None:
    await h.create("c1")
    with pytest.raises(FailedPrecondition, match="cannot pause task in created state"):
        await h("Pause", id="c1")
    await h("Start", id="c1")
    await h("Pause", id="c1")
    assert (await h("State", id="c1")).status == task_pb2.PAUSED
    with pytest.raises(FailedPrecondition):
        await h("Pause", id="c1")
    await h("Resume", id="c1")
    assert (await h("State", id="c1")).status == task_pb2.RUNNING
    assert h.events.topics()[-2:] == ["/tasks/paused", "/tasks/resumed"]
    paused = h.events.events[-2][1]
    assert isinstance(paused, events.TaskPaused)
    assert paused.container_id == "c1"


async def test_stats(h: Harness) -> None:
    h.vc.stats_response = agent_pb2.StatsContainerResponse(
        cgroup_stats=agent_pb2.CgroupStats(
            pids_stats=agent_pb2.PidsStats(current=4, limit=10),
            memory_stats=agent_pb2.MemoryStats(usage=agent_pb2.MemoryData(usage=77, limit=99)),
        )
    )
    await h.create("c1")
    await h("Start", id="c1")
    stats = (await h("Stats", id="c1")).stats
    if host_is_cgroup_v2():
        assert stats.type_url == "io.containerd.cgroups.v2.Metrics"
        m2 = v2.Metrics.FromString(stats.value)
        assert (m2.pids.current, m2.memory.usage, m2.memory.usage_limit) == (4, 77, 99)
    else:
        assert stats.type_url == "io.containerd.cgroups.v1.Metrics"
        m1 = v1.Metrics.FromString(stats.value)
        assert (m1.pids.current, m1.memory.usage.usage, m1.memory.usage.limit) == (4, 77, 99)


async def test_pids_update_connect(h: Harness) -> None:
    await h.create("c1")
    await h("Start", id="c1")
    pids = await h("Pids", id="c1")
    assert [p.pid for p in pids.processes] == [1, 7]
    resources = AnyPb(
        type_url="types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
        value=json.dumps({"memory": {"limit": 1 << 28}}).encode(),
    )
    await h("Update", id="c1", resources=resources)
    assert h.vc.container("c1", "c1").updates == [{"memory": {"limit": 1 << 28}}]
    connected = await h("Connect", id="c1")
    assert (connected.shim_pid, connected.task_pid, connected.version) == (
        os.getpid(), FAKE_VM_PID, "kata-py"
    )  # fmt: skip


@pytest.mark.parametrize(
    ("method", "fields"),
    [
        ("State", {}),
        ("Start", {}),
        ("Wait", {}),
        ("Kill", {"signal": 9}),
        ("Delete", {}),
        ("Pids", {}),
        ("Pause", {}),
        ("Resume", {}),
        ("Stats", {}),
        ("CloseIO", {"stdin": True}),
        ("ResizePty", {"width": 1, "height": 1}),
        ("Update", {}),
        ("Exec", {"exec_id": "e1"}),
    ],
)
async def test_unknown_id_is_not_found(h: Harness, method: str, fields: dict[str, Any]) -> None:
    with pytest.raises(NotFound):
        await h(method, id="nope", **fields)


async def test_unknown_exec_is_not_found(h: Harness) -> None:
    await h.create("c1")
    with pytest.raises(NotFound):
        await h("State", id="c1", exec_id="nope")


async def test_checkpoint_unimplemented(h: Harness) -> None:
    with pytest.raises(Unimplemented, match="checkpoint"):
        await h("Checkpoint", id="c1", path="/tmp/x")


async def test_shutdown_only_when_empty_unless_now(h: Harness) -> None:
    await h.create("c1")
    await h("Shutdown", id="shim1")
    assert not h.shutdown.requested()
    await h("Shutdown", id="shim1", now=True)
    assert h.shutdown.requested()
    assert ("stop_sandbox", "c1") in h.vc.calls


async def test_duplicate_create(h: Harness) -> None:
    await h.create("c1")
    with pytest.raises(AlreadyExists):
        await h("Create", id="c1", bundle=str(h.tmp / "bundles" / "c1"))


async def test_guest_oom_becomes_a_tasks_oom_event(h: Harness) -> None:
    await h.create("c1")
    await h("Start", id="c1")
    sandbox = await h.vc.fetch_sandbox("c1")
    assert sandbox.on_oom is not None
    sandbox.on_oom("c1")
    assert h.events.topics()[-1] == "/tasks/oom"
    oom = h.events.events[-1][1]
    assert isinstance(oom, events.TaskOOM)
    assert oom.container_id == "c1"


# -- regressions found by fuzzing ------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "fields"),
    [("Update", {"resources": None}), ("Exec", {"exec_id": "e1", "spec": None})],
)
async def test_deeply_nested_json_is_invalid_argument(
    h: Harness, method: str, fields: dict[str, Any]
) -> None:
    # Found by fuzzing: json.loads raised RecursionError, answered as UNKNOWN.
    await h.create("c1")
    await h("Start", id="c1")
    deep = AnyPb(type_url=PROCESS_URL, value=b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(InvalidArgument, match="JSON"):
        await h(method, id="c1", **{k: v or deep for k, v in fields.items()})
    assert (await h("State", id="c1")).status == task_pb2.RUNNING


async def test_kill_with_a_signal_the_guest_refuses(h: Harness) -> None:
    # Found by fuzzing (in the fake: its exit status 128 + 2**32 - 1 broke TaskExit).
    await h.create("c1")
    await h("Start", id="c1")
    with pytest.raises(InvalidArgument, match="signal"):
        await h("Kill", id="c1", signal=2**32 - 1)
    assert (await h("State", id="c1")).status == task_pb2.RUNNING


async def test_a_deeply_nested_config_json_is_invalid_argument(h: Harness) -> None:
    bundle = Path(h.bundle("c1"))
    (bundle / "config.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(InvalidArgument, match=r"config\.json"):
        await h("Create", id="c1", bundle=str(bundle))
