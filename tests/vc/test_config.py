from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from shimv2.errdefs import InvalidArgument
from shimv2.vc.config import (
    GUEST_OVERHEAD_MIB,
    SANDBOX_MEMORY,
    Config,
    HostLimits,
    apply_annotations,
    load_config,
    parse_config,
)
from shimv2.vc.qemu_config import TCG_TB_SIZE_MIB

SAMPLE = """
[hypervisor.qemu]
path = "/usr/bin/qemu-system-x86_64"
machine_type = "q35"
default_vcpus = 2
default_memory = 1024
kernel_params = "debug"
enable_annotations = ["default_vcpus", "kernel_params"]

[agent.kata]
dial_timeout = 30
oci_runtime = "runc"

[runtime]
enable_debug = true
enable_tracing = true
tracing_endpoint = "http://jaeger:4318/v1/traces"
"""


def test_defaults_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KATA_PY_CONFIG", raising=False)
    config = load_config()  # /etc/kata-py/configuration.toml does not exist here
    assert config == Config()
    assert config.hypervisor.machine_type == "microvm"
    assert config.agent.oci_runtime == "crun"


def test_file_values(tmp_path: Path) -> None:
    path = tmp_path / "configuration.toml"
    path.write_text(SAMPLE)
    config = load_config(str(path))
    assert config.hypervisor.machine_type == "q35"
    assert (config.hypervisor.default_vcpus, config.hypervisor.default_memory) == (2, 1024)
    assert config.agent.dial_timeout == 30.0
    assert config.agent.oci_runtime == "runc"
    assert config.runtime.enable_debug is True
    assert config.runtime.enable_tracing is True
    assert config.runtime.tracing_endpoint == "http://jaeger:4318/v1/traces"
    qemu = config.hypervisor.qemu("/tmp/shared")
    assert (qemu.machine, qemu.vcpus, qemu.memory_mib) == ("q35", 2, 1024)
    assert qemu.kernel_params == ("debug",)


def test_env_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[runtime]\nstate_dir = '/run/other'\n")
    monkeypatch.setenv("KATA_PY_CONFIG", str(path))
    assert load_config().runtime.state_dir == "/run/other"
    monkeypatch.setenv("KATA_PY_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(InvalidArgument, match="not found"):
        load_config()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[hypervisor.qemu]\ndefault_vcpu = 2\n", "unknown key 'default_vcpu'"),
        ("[hypervisor.qemu]\ndefault_vcpus = '2'\n", "positive integer"),
        ("[hypervisor.qemu]\ndefault_memory = -1\n", "positive integer"),
        ("[hypervisor.firecracker]\n", "only \\[hypervisor.qemu\\]"),
        ("[network]\n", "unknown section"),
        ("[runtime]\nenable_debug = 1\n", "true or false"),
        ("[hypervisor.qemu]\nenable_annotations = ['path']\n", "cannot be annotated"),
        ("not toml = = =", "configuration.toml"),
    ],
)
def test_bad_files_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "configuration.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match=message):
        load_config(str(path))


def test_permitted_annotations_apply() -> None:
    config = parse_config(SAMPLE)
    out = apply_annotations(
        config,
        {
            "io.katacontainers.config.hypervisor.default_vcpus": "4",
            "io.katacontainers.config.hypervisor.kernel_params": "loglevel=7 ignore_loglevel",
            "io.kubernetes.cri.sandbox-id": "ignored",
        },
        HostLimits(cpus=8, memory_mib=16384),
    )
    assert out.hypervisor.default_vcpus == 4
    assert out.hypervisor.kernel_params == "debug loglevel=7 ignore_loglevel"
    assert config.hypervisor.default_vcpus == 2  # the original is untouched


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("io.katacontainers.config.hypervisor.default_memory", "4096", "not permitted"),
        ("io.katacontainers.config.hypervisor.path", "/bin/sh", "not permitted"),
        ("io.katacontainers.config.agent.oci_runtime", "runc", "not permitted"),
        ("io.katacontainers.config.hypervisor.default_vcpus", "lots", "want an integer"),
        ("io.katacontainers.config.hypervisor.default_vcpus", "0", "out of range"),
    ],
)
def test_other_annotations_are_refused(key: str, value: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        apply_annotations(parse_config(SAMPLE), {key: value}, HostLimits(cpus=8, memory_mib=16384))


KERNEL_PARAMS = "io.katacontainers.config.hypervisor.kernel_params"


@pytest.mark.parametrize(
    "value",
    [
        "init=/bin/sh",  # another init than the agent's
        "rdinit=/bin/sh",
        "mitigations=off",  # the operator's policy, not the pod's
        "nokaslr",
        "kata_py.debug_console=1",  # the agent's own settings come from the host only
        "kata_py.runtime=runc",
        "console=ttyS1",
        "loglevel=7 panic=0",  # one bad parameter among good ones
        'loglevel="7 init=/bin/sh"',  # quotes would regroup the command line
        "loglevel=7\x00init=/bin/sh",
        "loglevel=7;reboot",
        "loglevel=" + "7" * 300,
        "debug " * 200,  # too many
    ],
)
def test_annotated_kernel_params_outside_the_allowlist_are_refused(value: str) -> None:
    with pytest.raises(InvalidArgument, match="kernel parameter"):
        apply_annotations(
            parse_config(SAMPLE), {KERNEL_PARAMS: value}, HostLimits(cpus=8, memory_mib=16384)
        )


def test_annotated_vm_size_is_bounded_by_the_host() -> None:
    config = parse_config(
        "[hypervisor.qemu]\nenable_annotations = ['default_vcpus', 'default_memory']\n"
    )
    host = HostLimits(cpus=2, memory_mib=4096)
    vcpus = "io.katacontainers.config.hypervisor.default_vcpus"
    memory = "io.katacontainers.config.hypervisor.default_memory"
    out = apply_annotations(config, {vcpus: "2", memory: "4096"}, host)
    assert (out.hypervisor.default_vcpus, out.hypervisor.default_memory) == (2, 4096)
    for key, value in ((vcpus, "3"), (memory, "4097"), (memory, "262144"), (memory, "64")):
        with pytest.raises(InvalidArgument, match="out of range"):
            apply_annotations(config, {key: value}, host)


def test_host_limits_are_this_host() -> None:
    host = HostLimits.probe()
    assert host.cpus == len(os.sched_getaffinity(0))
    assert host.memory_mib == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20


@pytest.mark.parametrize(
    "params",
    ["debug\\u0000init=/bin/sh", "debug\\ninit=/bin/sh", "debug\\rx", 'debug \\"a b', "x" * 2100],
)
def test_config_kernel_params_that_break_the_command_line_are_refused(params: str) -> None:
    with pytest.raises(InvalidArgument, match="kernel_params"):
        parse_config(f'[hypervisor.qemu]\nkernel_params = "{params}"\n')


def test_guest_mitigations_stay_on_unless_turned_off() -> None:
    assert Config().hypervisor.disable_guest_mitigations is False
    assert Config().qemu(None).disable_mitigations is False
    off = parse_config("[hypervisor.qemu]\ndisable_guest_mitigations = true\n")
    assert off.qemu(None).disable_mitigations is True
    with pytest.raises(InvalidArgument, match="true or false"):
        parse_config("[hypervisor.qemu]\ndisable_guest_mitigations = 'yes'\n")


def test_agent_settings_reach_the_kernel_command_line() -> None:
    config = parse_config('[agent.kata]\noci_runtime = "runc"\n[runtime]\nenable_debug = true\n')
    params = config.qemu("/shared").kernel_params
    assert "kata_py.runtime=runc" in params
    assert "kata_py.debug=1" in params
    assert "kata_py.runtime=crun" in Config().qemu(None).kernel_params
    assert not Config().qemu(None).debug_console
    console = parse_config("[agent.kata]\ndebug_console_enabled = true\n").qemu(None)
    assert console.debug_console
    assert "kata_py.debug_console=1" in console.kernel_params
    with pytest.raises(InvalidArgument, match="crun or runc"):
        parse_config('[agent.kata]\noci_runtime = "youki"\n').qemu(None)


def test_tcg_translation_cache_and_ksm_reach_qemu() -> None:
    default = Config().qemu("/shared")
    assert (default.tcg_tb_size, default.ksm) == (TCG_TB_SIZE_MIB, False)
    config = parse_config("[hypervisor.qemu]\ntcg_tb_size = 32\nenable_ksm = true\n")
    qemu = config.qemu("/shared")
    assert (qemu.tcg_tb_size, qemu.ksm) == (32, True)
    with pytest.raises(InvalidArgument, match="positive integer"):
        parse_config("[hypervisor.qemu]\ntcg_tb_size = 0\n")
    with pytest.raises(InvalidArgument, match="true or false"):
        parse_config("[hypervisor.qemu]\nenable_ksm = 1\n")
    with pytest.raises(InvalidArgument, match="translation cache"):
        dataclasses.replace(qemu, tcg_tb_size=8192).validate()


def test_the_pods_memory_limit_sizes_the_vm() -> None:
    host = HostLimits(cpus=2, memory_mib=4096)
    config = Config()
    base = config.hypervisor.default_memory
    sized = apply_annotations(config, {SANDBOX_MEMORY: str(300 << 20)}, host)
    assert sized.hypervisor.default_memory == 300 + GUEST_OVERHEAD_MIB
    assert sized.qemu("/shared").memory_mib == 300 + GUEST_OVERHEAD_MIB
    odd = apply_annotations(config, {SANDBOX_MEMORY: str((300 << 20) + 1)}, host)
    assert odd.hypervisor.default_memory == 301 + GUEST_OVERHEAD_MIB  # whole MiB, rounded up
    small = apply_annotations(config, {SANDBOX_MEMORY: str(16 << 20)}, host)
    assert small.hypervisor.default_memory == base  # never below the default
    assert apply_annotations(config, {SANDBOX_MEMORY: "0"}, host) == config  # no limit
    assert apply_annotations(config, {}, host) == config
    huge = apply_annotations(config, {SANDBOX_MEMORY: str(1 << 40)}, host)
    assert huge.hypervisor.default_memory == 4096  # the host's RAM at most
    with pytest.raises(InvalidArgument, match="sandbox-memory"):
        apply_annotations(config, {SANDBOX_MEMORY: "lots"}, host)
    annotatable = parse_config('[hypervisor.qemu]\nenable_annotations = ["default_memory"]\n')
    annotated = "io.katacontainers.config.hypervisor.default_memory"
    both = apply_annotations(annotatable, {annotated: "1024", SANDBOX_MEMORY: str(512 << 20)}, host)
    assert both.hypervisor.default_memory == 1024  # the pod's own default, larger
    both = apply_annotations(annotatable, {annotated: "256", SANDBOX_MEMORY: str(512 << 20)}, host)
    assert both.hypervisor.default_memory == 512 + GUEST_OVERHEAD_MIB
