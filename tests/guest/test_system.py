"""SandboxService and the guest setup steps, against FakeGuestOS (the host stays untouched)."""

from __future__ import annotations

import asyncio
import errno
import struct

import pytest

from shimv2.errdefs import AlreadyExists, FailedPrecondition, Internal, InvalidArgument
from shimv2.guest import system
from shimv2.guest.agent import Options, build_agent
from shimv2.guest.system import GuestOS, SandboxService, guest_setup
from shimv2.guest.testing import FakeGuestOS, fake_sysfs
from shimv2.pb.kata import agent_pb2
from shimv2.ttrpc import CallContext
from tests.aio import asyncio_test, run_autojump

CTX = CallContext("grpc.AgentService", "test", {})


def sandbox_request(**kw: object) -> agent_pb2.CreateSandboxRequest:
    req = agent_pb2.CreateSandboxRequest(
        hostname="pod-a",
        dns=["nameserver 10.0.0.10", "search svc.local", "1.1.1.1"],
        sandbox_id="sb1",
        storages=[
            agent_pb2.Storage(
                driver="virtio-fs",
                source="kataShared",
                fstype="virtiofs",
                mount_point="/run/kata-containers/shared/containers",
            )
        ],
    )
    for key, value in kw.items():
        setattr(req, key, value)
    return req


@asyncio_test
async def test_create_sandbox_sets_up_the_guest() -> None:
    guest = FakeGuestOS()
    svc = SandboxService(guest)
    await svc.CreateSandbox(CTX, sandbox_request())
    assert guest.hostname == "pod-a"
    assert guest.files["/etc/resolv.conf"] == (
        "nameserver 10.0.0.10\nsearch svc.local\nnameserver 1.1.1.1\n"
    )
    assert guest.mounts == {
        "/run/kata-containers/shared/containers": ("kataShared", "virtiofs", "")
    }
    assert svc.sandbox_id == "sb1"


@asyncio_test
async def test_create_sandbox_twice_is_already_exists() -> None:
    svc = SandboxService(FakeGuestOS())
    await svc.CreateSandbox(CTX, sandbox_request())
    with pytest.raises(AlreadyExists):
        await svc.CreateSandbox(CTX, sandbox_request(sandbox_id="sb2"))


@asyncio_test
async def test_create_sandbox_skips_a_storage_already_mounted() -> None:
    guest = FakeGuestOS()
    guest.mounts["/run/kata-containers/shared/containers"] = ("kataShared", "virtiofs", "")
    svc = SandboxService(guest)
    await svc.CreateSandbox(CTX, sandbox_request())
    assert svc.mounted == []  # not ours to unmount at DestroySandbox


@asyncio_test
async def test_create_sandbox_rejects_bad_requests() -> None:
    svc = SandboxService(FakeGuestOS())
    with pytest.raises(InvalidArgument):
        await svc.CreateSandbox(CTX, sandbox_request(sandbox_id=""))
    bad = sandbox_request()
    bad.storages[0].driver = "blk"
    with pytest.raises(InvalidArgument):
        await svc.CreateSandbox(CTX, bad)
    assert svc.sandbox_id is None


@asyncio_test
async def test_create_sandbox_os_failure_is_internal_and_retryable() -> None:
    guest = FakeGuestOS()
    guest.fail["mount"] = OSError(errno.ENODEV, "no such device")
    svc = SandboxService(guest)
    with pytest.raises(Internal):
        await svc.CreateSandbox(CTX, sandbox_request())
    assert guest.calls["mount"] == 1  # not an error a late device explains: no retry
    del guest.fail["mount"]
    await svc.CreateSandbox(CTX, sandbox_request())
    assert svc.sandbox_id == "sb1"


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ENOENT])
def test_create_sandbox_waits_for_a_hot_plugged_virtio_fs_device(err: int) -> None:
    guest = FakeGuestOS()
    guest.fail["mount"] = OSError(err, "virtio-fs: tag kataShared not found")
    svc = SandboxService(guest)

    async def plug() -> None:
        await asyncio.sleep(0.3)  # runs only if the mount's retries leave the event loop free
        del guest.fail["mount"]

    async def create() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with asyncio.TaskGroup() as group:
            group.create_task(plug())
            await svc.CreateSandbox(CTX, sandbox_request())
        return loop.time() - start

    assert 0.3 <= run_autojump(create()) < 0.4
    assert guest.mounts == {
        "/run/kata-containers/shared/containers": ("kataShared", "virtiofs", "")
    }
    assert svc.mounted == ["/run/kata-containers/shared/containers"]
    assert guest.calls["mount"] > 2
    assert svc.sandbox_id == "sb1"


@pytest.mark.parametrize("wait", [None, 0.5])
def test_create_sandbox_gives_up_on_a_virtio_fs_tag_after_the_deadline(
    wait: float | None,
) -> None:
    guest = FakeGuestOS()
    guest.fail["mount"] = OSError(errno.EINVAL, "virtio-fs: tag kataShared not found")
    svc = SandboxService(guest) if wait is None else SandboxService(guest, mount_wait=wait)

    async def create() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(Internal, match="tag kataShared not found"):
            await svc.CreateSandbox(CTX, sandbox_request())
        return loop.time() - start

    waited = run_autojump(create())
    deadline = system.MOUNT_WAIT if wait is None else wait
    assert deadline <= waited < deadline + 0.1
    assert svc.sandbox_id is None
    assert svc.mounted == []


def test_create_sandbox_retries_only_virtio_fs_mounts() -> None:
    guest = FakeGuestOS()
    guest.fail["mount"] = OSError(errno.EINVAL, "bad option")
    svc = SandboxService(guest)
    req = sandbox_request()
    req.storages[0].fstype = "9p"

    async def create() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(Internal):
            await svc.CreateSandbox(CTX, req)
        return loop.time() - start

    # No retry's sleep: that would have jumped the clock by MOUNT_RETRY (the clock's real
    # time goes on too, by microseconds).
    assert run_autojump(create()) < system.MOUNT_RETRY
    assert guest.calls["mount"] == 1


@asyncio_test
async def test_create_sandbox_loads_kernel_modules() -> None:
    guest = FakeGuestOS({system.MODULES_LIST: "/lib/modules/x/virtio_console.ko\n"})
    svc = SandboxService(guest)
    req = sandbox_request()
    del req.storages[:]
    req.kernel_modules.add(name="virtio-console", parameters=["a=1", "b=2"])
    await svc.CreateSandbox(CTX, req)
    assert guest.modules == [("/lib/modules/x/virtio_console.ko", "a=1 b=2")]
    svc2 = SandboxService(FakeGuestOS())
    req.kernel_modules[0].name = "nonexistent_mod"
    with pytest.raises(InvalidArgument):
        await svc2.CreateSandbox(CTX, req)


@asyncio_test
async def test_destroy_sandbox_removes_containers_then_unmounts() -> None:
    guest = FakeGuestOS()
    order: list[str] = []

    async def remove_all() -> None:
        order.append("containers")
        assert guest.mounts  # still mounted while containers go

    svc = SandboxService(guest, on_destroy=remove_all)
    with pytest.raises(FailedPrecondition):
        await svc.DestroySandbox(CTX, agent_pb2.DestroySandboxRequest())
    await svc.CreateSandbox(CTX, sandbox_request())
    await svc.DestroySandbox(CTX, agent_pb2.DestroySandboxRequest())
    assert order == ["containers"]
    assert guest.mounts == {}
    assert svc.sandbox_id is None


@asyncio_test
async def test_guest_details() -> None:
    guest = FakeGuestOS(fake_sysfs())
    svc = SandboxService(guest, init_daemon=True)
    resp = await svc.GetGuestDetails(
        CTX, agent_pb2.GuestDetailsRequest(mem_block_size=True, mem_hotplug_probe=True)
    )
    assert resp.mem_block_size_bytes == 0x8000000
    assert not resp.support_mem_hotplug_probe
    assert resp.agent_details.version == system.AGENT_VERSION
    assert resp.agent_details.init_daemon
    assert not resp.agent_details.supports_seccomp
    assert list(resp.agent_details.storage_handlers) == ["virtio-fs"]
    guest.files["/sys/devices/system/memory/probe"] = ""
    resp = await svc.GetGuestDetails(CTX, agent_pb2.GuestDetailsRequest(mem_hotplug_probe=True))
    assert resp.support_mem_hotplug_probe
    assert resp.mem_block_size_bytes == 0  # not asked for


@asyncio_test
async def test_online_cpu_mem() -> None:
    guest = FakeGuestOS(fake_sysfs(cpus=4, offline_cpus=2, memory_blocks=3))
    svc = SandboxService(guest)
    await svc.OnlineCPUMem(CTX, agent_pb2.OnlineCPUMemRequest(nb_cpus=1, cpu_only=True))
    cpu = "/sys/devices/system/cpu"
    assert [guest.files[f"{cpu}/cpu{i}/online"].strip() for i in (1, 2, 3)] == ["1", "1", "0"]
    assert guest.files["/sys/devices/system/memory/memory1/online"].strip() == "0"
    await svc.OnlineCPUMem(CTX, agent_pb2.OnlineCPUMemRequest())
    assert guest.files[f"{cpu}/cpu3/online"] == "1"
    mem = "/sys/devices/system/memory"
    assert [guest.files[f"{mem}/memory{i}/online"].strip() for i in (0, 1, 2)] == ["1"] * 3


@asyncio_test
async def test_online_mem_waits_for_a_dimms_later_blocks() -> None:
    # A DIMM's memory blocks show up one after another, the first soon after the
    # host plugs it: a block that comes a moment after the first is onlined too.
    guest = FakeGuestOS(fake_sysfs(memory_blocks=1))
    svc = SandboxService(guest)
    mem = "/sys/devices/system/memory"

    async def plug() -> None:
        await asyncio.sleep(0.1)
        guest.files[f"{mem}/memory1/online"] = "0\n"
        while guest.files[f"{mem}/memory1/online"].strip() != "1":  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        guest.files[f"{mem}/memory2/online"] = "0\n"  # once the first is onlined

    async with asyncio.TaskGroup() as group:
        group.create_task(plug())
        await svc.OnlineCPUMem(CTX, agent_pb2.OnlineCPUMemRequest(wait=True))
    assert [guest.files[f"{mem}/memory{i}/online"].strip() for i in (1, 2)] == ["1", "1"]


@asyncio_test
async def test_reseed_random_dev_feeds_the_kernel_then_python() -> None:
    guest = FakeGuestOS()
    svc = SandboxService(guest)
    data = bytes(range(256)) * 16
    await svc.ReseedRandomDev(CTX, agent_pb2.ReseedRandomDevRequest(data=data))
    assert guest.entropy == [data]  # 4096 bytes: the most accepted
    assert guest.random_reseeds == 1


@pytest.mark.parametrize("size", [0, system.MAX_ENTROPY + 1])
@asyncio_test
async def test_reseed_random_dev_rejects_no_data_or_too_much(size: int) -> None:
    guest = FakeGuestOS()
    svc = SandboxService(guest)
    with pytest.raises(InvalidArgument):
        await svc.ReseedRandomDev(CTX, agent_pb2.ReseedRandomDevRequest(data=b"x" * size))
    assert guest.entropy == []
    assert guest.random_reseeds == 0


@asyncio_test
async def test_reseed_random_dev_os_failure_is_internal() -> None:
    guest = FakeGuestOS()
    guest.fail["add_entropy"] = OSError(errno.EPERM, "RNDADDENTROPY on /dev/random: denied")
    svc = SandboxService(guest)
    with pytest.raises(Internal, match="RNDADDENTROPY on /dev/random: denied"):
        await svc.ReseedRandomDev(CTX, agent_pb2.ReseedRandomDevRequest(data=b"seed"))
    assert guest.random_reseeds == 0  # os.urandom was not reseeded: no use seeding from it


def test_rand_pool_info_and_ioctl_numbers() -> None:
    info = system.rand_pool_info(b"abc")
    assert struct.unpack_from("ii", info) == (24, 3)  # bits credited, bytes
    assert info[8:] == b"abc"
    assert isinstance(info, bytearray)  # fcntl.ioctl passes only a mutable buffer as is

    def ioc(direction: int, nr: int, size: int) -> int:  # linux/ioctl.h
        return direction << 30 | size << 16 | ord("R") << 8 | nr

    assert ioc(1, 0x03, struct.calcsize("2i")) == system._RNDADDENTROPY  # _IOW
    assert ioc(0, 0x07, 0) == system._RNDRESEEDCRNG  # _IO


@asyncio_test
async def test_set_guest_date_time() -> None:
    guest = FakeGuestOS()
    svc = SandboxService(guest)
    req = agent_pb2.SetGuestDateTimeRequest(Sec=1_700_000_000, Usec=999_999)
    await svc.SetGuestDateTime(CTX, req)
    assert guest.realtime == (1_700_000_000, 999_999)


@pytest.mark.parametrize(("sec", "usec"), [(0, 0), (-1, 0), (1, -1), (1, 1_000_000), (2**62, 0)])
@asyncio_test
async def test_set_guest_date_time_rejects_bad_times(sec: int, usec: int) -> None:
    guest = FakeGuestOS()
    svc = SandboxService(guest)
    with pytest.raises(InvalidArgument):
        await svc.SetGuestDateTime(CTX, agent_pb2.SetGuestDateTimeRequest(Sec=sec, Usec=usec))
    assert guest.realtime is None


@asyncio_test
async def test_set_guest_date_time_os_failure_is_internal() -> None:
    guest = FakeGuestOS()
    guest.fail["set_realtime"] = OSError(errno.EPERM, "Operation not permitted")
    svc = SandboxService(guest)
    with pytest.raises(Internal, match="Operation not permitted"):
        await svc.SetGuestDateTime(CTX, agent_pb2.SetGuestDateTimeRequest(Sec=1, Usec=0))


def test_the_agent_serves_the_clone_rpcs() -> None:
    agent = build_agent(Options(), guest=FakeGuestOS(), load_containers=False)
    for rpc in ("ReseedRandomDev", "SetGuestDateTime"):
        assert agent.server.lookup("grpc.AgentService", rpc) is not None, rpc


def test_guest_setup_runs_every_step() -> None:
    files = {
        system.MODULES_LIST: "/m/virtio_console.ko\n\n/m/virtiofs.ko\n",
        "/sys/class/virtio-ports/vport0p1/name": "agent.channel.0\n",
        "/sys/bus/virtio/drivers/virtiofs/virtio2": "",
    }
    guest = FakeGuestOS(files)
    report = guest_setup(guest)
    assert report.errors == []
    assert report.modules == 2
    assert guest.links_up == ["lo"]
    assert guest.symlinks == {"/dev/virtio-ports/agent.channel.0": "../vport0p1"}
    assert report.ports == ["agent.channel.0"]
    assert guest.mounts[system.SHARED_MOUNT] == ("kataShared", "virtiofs", "")
    assert guest.subreaper
    assert report.subreaper
    assert report.lo_up
    steps = ["modules", "lo up", "virtio ports", "shared fs", "child subreaper"]
    assert list(report.seconds) == steps
    assert all(0 <= secs < 5 for secs in report.seconds.values())
    assert report.timings().startswith("modules 0.")


def test_guest_setup_failures_are_logged_not_fatal() -> None:
    guest = FakeGuestOS({system.MODULES_LIST: "/m/a.ko\n"})
    guest.fail["load_module"] = OSError(errno.ENOEXEC, "bad module")
    guest.fail["set_link_up"] = OSError(errno.ENODEV, "no lo")
    guest.dirs.add("/sys/bus/virtio/drivers/virtiofs")  # driver loaded, no device
    report = guest_setup(guest)
    assert not report.lo_up
    assert report.modules == 0
    assert report.errors == ["lo up: [Errno 19] no lo"]  # a module failure is only logged
    assert not report.shared  # no virtio-fs device: not even tried
    assert guest.mounts == {}
    assert report.subreaper


def test_shared_mount_is_tried_without_a_driver_and_failure_logged() -> None:
    guest = FakeGuestOS()
    guest.fail["mount"] = OSError(errno.ENODEV, "unknown filesystem type")
    report = guest_setup(guest)
    assert not report.shared
    assert report.errors == []


def test_modules_already_loaded_are_fine() -> None:
    guest = FakeGuestOS({system.MODULES_LIST: "/m/a.ko\n/m/a.ko\n"})
    assert system.load_listed_modules(guest) == 1


def test_real_guest_os_reads_mounts_without_changing_anything() -> None:
    real = GuestOS()
    assert real.is_mountpoint("/proc")
    assert not real.is_mountpoint("/proc/self")
    assert real.kernel_release()
