"""grpc.Spec ⇄ runtime-spec JSON, both ways, against tables and real runtimes' default specs."""

from __future__ import annotations

import contextlib
import json
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

from shimv2 import oci
from shimv2.errdefs import InvalidArgument
from shimv2.pb.kata import oci_pb2
from tests.strategies import fuzz_settings, messages, texts

# (message, proto field, JSON key), as in specs-go/config.go.
NAMES = [
    ("Spec", "Version", "ociVersion"),
    ("Spec", "Hostname", "hostname"),
    ("Process", "Terminal", "terminal"),
    ("Process", "ConsoleSize", "consoleSize"),
    ("Process", "OOMScoreAdj", "oomScoreAdj"),
    ("Process", "NoNewPrivileges", "noNewPrivileges"),
    ("Process", "ApparmorProfile", "apparmorProfile"),
    ("User", "UID", "uid"),
    ("User", "AdditionalGids", "additionalGids"),
    ("Linux", "UIDMappings", "uidMappings"),
    ("Linux", "CgroupsPath", "cgroupsPath"),
    ("Linux", "RootfsPropagation", "rootfsPropagation"),
    ("Linux", "IntelRdt", "intelRdt"),
    ("LinuxIDMapping", "HostID", "hostID"),
    ("LinuxIDMapping", "ContainerID", "containerID"),
    ("LinuxResources", "CPU", "cpu"),
    ("LinuxResources", "BlockIO", "blockIO"),
    ("LinuxResources", "HugepageLimits", "hugepageLimits"),
    ("LinuxMemory", "KernelTCP", "kernelTCP"),
    ("LinuxMemory", "DisableOOMKiller", "disableOOMKiller"),
    ("LinuxCPU", "RealtimeRuntime", "realtimeRuntime"),
    ("LinuxBlockIO", "ThrottleReadIOPSDevice", "throttleReadIOPSDevice"),
    ("LinuxBlockIO", "WeightDevice", "weightDevice"),
    ("LinuxNetwork", "ClassID", "classID"),
    ("LinuxHugepageLimit", "Pagesize", "pageSize"),
    ("LinuxIntelRdt", "L3CacheSchema", "l3CacheSchema"),
    ("LinuxSyscall", "errnoret", "errnoRet"),
    ("LinuxSeccompArg", "ValueTwo", "valueTwo"),
    ("Mount", "destination", "destination"),
    ("Hooks", "CreateRuntime", "createRuntime"),
]


@pytest.mark.parametrize(("message", "field", "key"), NAMES)
def test_json_names(message: str, field: str, key: str) -> None:
    assert oci.json_name(message, field) == key


def full_spec() -> oci_pb2.Spec:
    spec = oci_pb2.Spec(
        Version="1.0.2",
        Hostname="pod",
        Process=oci_pb2.Process(
            Terminal=True,
            ConsoleSize=oci_pb2.Box(Height=24, Width=80),
            User=oci_pb2.User(UID=0, GID=0, AdditionalGids=[10]),
            Args=["sh", "-c", "true"],
            Env=["A=b"],
            Cwd="/",
            Rlimits=[oci_pb2.POSIXRlimit(Type="RLIMIT_NOFILE", Hard=1024, Soft=0)],
            OOMScoreAdj=-998,
        ),
        Root=oci_pb2.Root(Path="/run/kata-containers/shared/containers/c1/rootfs"),
        Mounts=[oci_pb2.Mount(destination="/proc", type="proc", source="proc")],
    )
    spec.Annotations["io.kubernetes.cri.container-type"] = "container"
    linux = spec.Linux
    linux.Sysctl["net.ipv4.ip_forward"] = "1"
    linux.CgroupsPath = "/kubepods/pod1/c1"
    linux.Namespaces.add(Type="pid")
    linux.Namespaces.add(Type="network", Path="/var/run/netns/x")
    linux.UIDMappings.add(HostID=1000, ContainerID=0, Size=1)
    linux.Resources.Memory.Limit = 1 << 30
    linux.Resources.CPU.Shares = 1024
    linux.Resources.CPU.Quota = 50000
    linux.Resources.Pids.Limit = 0
    linux.Resources.Devices.add(Allow=False, Access="rwm", Major=-1, Minor=-1)
    linux.Resources.Devices.add(Allow=True, Type="c", Major=1, Minor=3, Access="rwm")
    linux.Resources.HugepageLimits.add(Pagesize="2MB", Limit=0)
    linux.Seccomp.DefaultAction = "SCMP_ACT_ERRNO"
    linux.Seccomp.Syscalls.add(Names=["read"], Action="SCMP_ACT_ALLOW")
    linux.Seccomp.Syscalls.add(Names=["mount"], Action="SCMP_ACT_ERRNO", errnoret=0)
    linux.MaskedPaths.append("/proc/kcore")
    return spec


EXPECTED: dict[str, Any] = {
    "ociVersion": "1.0.2",
    "hostname": "pod",
    "process": {
        "terminal": True,
        "consoleSize": {"height": 24, "width": 80},
        "user": {"uid": 0, "gid": 0, "additionalGids": [10]},
        "args": ["sh", "-c", "true"],
        "env": ["A=b"],
        "cwd": "/",
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 0}],
        "oomScoreAdj": -998,
    },
    "root": {"path": "/run/kata-containers/shared/containers/c1/rootfs"},
    "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
    "annotations": {"io.kubernetes.cri.container-type": "container"},
    "linux": {
        "uidMappings": [{"hostID": 1000, "containerID": 0, "size": 1}],
        "sysctl": {"net.ipv4.ip_forward": "1"},
        "resources": {
            "devices": [
                {"allow": False, "access": "rwm"},
                {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
            ],
            "memory": {"limit": 1 << 30},
            "cpu": {"shares": 1024, "quota": 50000},
            "pids": {"limit": 0},
            "hugepageLimits": [{"pageSize": "2MB", "limit": 0}],
        },
        "cgroupsPath": "/kubepods/pod1/c1",
        "namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/x"}],
        "seccomp": {
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [
                {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["mount"], "action": "SCMP_ACT_ERRNO", "errnoRet": 0},
            ],
        },
        "maskedPaths": ["/proc/kcore"],
    },
}


def test_spec_to_json() -> None:
    assert oci.spec_to_json(full_spec()) == EXPECTED


def test_json_to_spec() -> None:
    spec = oci.spec_from_json(EXPECTED)
    expected = full_spec()
    # The device wildcard (-1) has no JSON form: it comes back as 0, "any" as well.
    for dev in expected.Linux.Resources.Devices:
        dev.Major, dev.Minor = max(dev.Major, 0), max(dev.Minor, 0)
    assert spec == expected
    assert spec.Linux.Seccomp.Syscalls[1].HasField("errnoret")
    assert not spec.Linux.Seccomp.Syscalls[0].HasField("errnoret")


def test_empty_spec_has_required_fields_only() -> None:
    assert oci.spec_to_json(oci_pb2.Spec()) == {"ociVersion": ""}
    assert oci.process_to_json(oci_pb2.Process(Args=["x"])) == {
        "user": {"uid": 0, "gid": 0},
        "args": ["x"],
        "cwd": "",
    }


def _drop_empty(obj: Any) -> Any:
    """What omitempty leaves out: empty lists and objects."""
    if isinstance(obj, dict):
        return {k: _drop_empty(v) for k, v in obj.items() if v not in ([], {})}
    if isinstance(obj, list):
        return [_drop_empty(v) for v in obj]
    return obj


@pytest.mark.parametrize("runtime", ["crun", "runc"])
def test_default_spec_round_trips(runtime: str, tmp_path: Path) -> None:
    subprocess.run([runtime, "spec"], cwd=tmp_path, check=True, capture_output=True)
    original = json.loads((tmp_path / "config.json").read_text())
    spec = oci.spec_from_json(original)
    assert spec.Process.Args
    assert oci.spec_to_json(spec) == _drop_empty(original)


@pytest.mark.parametrize(
    "bad",
    [
        {"process": []},
        {"process": {"args": "sh"}},
        {"process": {"terminal": "yes"}},
        {"linux": {"resources": {"memory": {"limit": 1 << 70}}}},
        {"annotations": ["a"]},
        [],
    ],
)
def test_bad_json_is_invalid_argument(bad: Any) -> None:
    with pytest.raises(InvalidArgument):
        oci.spec_from_json(bad)


def test_resources_to_json() -> None:
    res = oci_pb2.LinuxResources()
    res.Pids.Limit = 42
    res.Memory.Limit = 1 << 20
    res.Memory.Swappiness = 0
    assert oci.resources_to_json(res) == {"memory": {"limit": 1 << 20}, "pids": {"limit": 42}}


@pytest.mark.parametrize(
    ("requested", "written"),
    [
        ("", "1.0.2"),
        ("1.0.2-dev", "1.0.2-dev"),
        ("1.1.0", "1.1.0"),
        ("1.2.1", "1.1.0"),
        ("1.3.0", "1.1.0"),
        ("1.10.0", "1.1.0"),
    ],
)
def test_written_version_stays_within_what_crun_accepts(requested: str, written: str) -> None:
    assert oci.written_version(requested) == written


@pytest.mark.parametrize("requested", ["2.0.0", "0.9.0", "1.3", "one", "1.3.0\n"])
def test_written_version_refuses_unknown_versions(requested: str) -> None:
    with pytest.raises(InvalidArgument, match="unsupported OCI spec version"):
        oci.written_version(requested)


def test_net_sysctls_are_taken_only_when_the_network_is_shared() -> None:
    sysctl = {"net.ipv4.ping_group_range": "0 1", "kernel.msgmax": "8192"}
    shared: dict[str, Any] = {"linux": {"namespaces": [{"type": "pid"}], "sysctl": dict(sysctl)}}
    assert oci.take_shared_net_sysctls(shared) == {"net.ipv4.ping_group_range": "0 1"}
    assert shared["linux"]["sysctl"] == {"kernel.msgmax": "8192"}
    own = {"linux": {"namespaces": [{"type": "network"}], "sysctl": dict(sysctl)}}
    assert oci.take_shared_net_sysctls(own) == {}
    assert own["linux"]["sysctl"] == sysctl
    assert oci.take_shared_net_sysctls({}) == {}


@pytest.mark.parametrize("key", ["net.", "net..x", "net.ipv4/../../x", "net.a b"])
def test_bad_net_sysctl_names_are_refused(key: str) -> None:
    with pytest.raises(InvalidArgument, match="bad sysctl name"):
        oci.take_shared_net_sysctls({"linux": {"sysctl": {key: "1"}}})


# -- fuzzing: both directions with arbitrary input ------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts(), inner, max_size=3),
    max_leaves=10,
)


@cache
def _json_for(desc: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """JSON shaped like ``desc``'s (its keys, mostly fitting values), with anything in places."""
    if depth > 4:
        return json_values
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in desc.fields:
        if (
            field.type == FieldDescriptor.TYPE_MESSAGE
            and not field.message_type.GetOptions().map_entry
        ):
            fitting = _json_for(field.message_type, depth + 1)
            if field.is_repeated:
                fitting = st.lists(fitting, max_size=2)
        else:
            fitting = json_values
        optional[oci.json_name(desc.name, field.name)] = fitting | json_values
    return st.fixed_dictionaries({}, optional=optional)


@pytest.mark.fuzz
@fuzz_settings(50)  # ~30 ms an example, most of it drawing the JSON
@given(
    st.sampled_from([oci_pb2.Spec(), oci_pb2.Process(), oci_pb2.LinuxResources()]).flatmap(
        lambda msg: st.tuples(st.just(type(msg)), _json_for(msg.DESCRIPTOR) | json_values)
    )
)
def test_fuzz_json_to_message_fills_it_or_is_invalid_argument(
    case: tuple[type[Message], Any],
) -> None:
    # The host reads config.json and the Task API's exec and update JSON with this.
    cls, obj = case
    with contextlib.suppress(InvalidArgument):
        oci.message_from_json(cls(), obj)


@pytest.mark.fuzz
@given(messages(oci_pb2.Spec))
def test_fuzz_any_spec_becomes_a_config_json_or_invalid_argument(spec: oci_pb2.Spec) -> None:
    # What CreateContainer makes of the host's spec before it runs crun.
    config = oci.spec_to_json(spec)
    again = oci.spec_from_json(json.loads(json.dumps(config)))
    assert oci.spec_to_json(again) == config  # nothing lost or invented on the way back
    try:
        version = oci.written_version(spec.Version)
    except InvalidArgument:
        pass
    else:
        assert version.startswith("1.")
    try:
        taken = oci.take_shared_net_sysctls(config)
    except InvalidArgument:
        return
    assert all(key.startswith("net.") and "/" not in key for key in taken)
