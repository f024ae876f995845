"""SandboxService and the guest setup steps, against FakeGuestOS (the host stays untouched)."""

from __future__ import annotations

import errno

import pytest

from shimv2.errdefs import AlreadyExists, FailedPrecondition, Internal, InvalidArgument
from shimv2.guest import system
from shimv2.guest.system import GuestOS, SandboxService, guest_setup
from shimv2.guest.testing import FakeGuestOS, fake_sysfs
from shimv2.pb.kata import agent_pb2
from shimv2.ttrpc import CallContext

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


async def test_create_sandbox_twice_is_already_exists() -> None:
    svc = SandboxService(FakeGuestOS())
    await svc.CreateSandbox(CTX, sandbox_request())
    with pytest.raises(AlreadyExists):
        await svc.CreateSandbox(CTX, sandbox_request(sandbox_id="sb2"))


async def test_create_sandbox_skips_a_storage_already_mounted() -> None:
    guest = FakeGuestOS()
    guest.mounts["/run/kata-containers/shared/containers"] = ("kataShared", "virtiofs", "")
    svc = SandboxService(guest)
    await svc.CreateSandbox(CTX, sandbox_request())
    assert svc.mounted == []  # not ours to unmount at DestroySandbox


async def test_create_sandbox_rejects_bad_requests() -> None:
    svc = SandboxService(FakeGuestOS())
    with pytest.raises(InvalidArgument):
        await svc.CreateSandbox(CTX, sandbox_request(sandbox_id=""))
    bad = sandbox_request()
    bad.storages[0].driver = "blk"
    with pytest.raises(InvalidArgument):
        await svc.CreateSandbox(CTX, bad)
    assert svc.sandbox_id is None


async def test_create_sandbox_os_failure_is_internal_and_retryable() -> None:
    guest = FakeGuestOS()
    guest.fail["mount"] = OSError(errno.ENODEV, "no such device")
    svc = SandboxService(guest)
    with pytest.raises(Internal):
        await svc.CreateSandbox(CTX, sandbox_request())
    del guest.fail["mount"]
    await svc.CreateSandbox(CTX, sandbox_request())
    assert svc.sandbox_id == "sb1"


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
