"""Configuration: a TOML file like Kata's configuration.toml, with built-in defaults.

Looked up at ``$KATA_PY_CONFIG`` or ``/etc/kata-py/configuration.toml``; a
missing default file means the defaults, a missing named file is an error.
Unknown keys are refused (a typo must not silently become a default). Pod
annotations ``io.katacontainers.config.hypervisor.<key>`` may override the keys
listed in ``enable_annotations``, within bounds (the host's CPUs and RAM, an
allowlist of kernel parameters); any other ``io.katacontainers.config.``
annotation is refused.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shimv2.errdefs import InvalidArgument
from shimv2.vc.qemu_config import (
    DEFAULT_MEMORY_MIB,
    TCG_TB_SIZE_MIB,
    VIRTIOFSD,
    QemuConfig,
    default_backend,
    default_guest_dir,
)

DEFAULT_PATH = Path("/etc/kata-py/configuration.toml")
ANNOTATION_PREFIX = "io.katacontainers.config."
HYPERVISOR_ANNOTATION = ANNOTATION_PREFIX + "hypervisor."
# What a pod may ask for, if the operator lists it in enable_annotations.
ANNOTATABLE = frozenset({"default_vcpus", "default_memory", "kernel_params"})
# Kernel parameters a pod's annotation may add: logging and the guest's own
# memory tuning. Not init/rdinit, console, mitigations (the operator's policy)
# nor kata_py.* (the agent's settings come from the host alone).
ANNOTATABLE_KERNEL_PARAMS = frozenset({
    "debug", "ignore_loglevel", "loglevel", "printk.time", "printk.devkmsg",
    "hugepages", "hugepagesz", "default_hugepagesz", "transparent_hugepage",
    "init_on_alloc", "init_on_free", "page_alloc.shuffle",
})  # fmt: skip
ANNOTATED_PARAM = re.compile(r"([a-z0-9_.]+)(?:=([A-Za-z0-9_.,:+-]{1,64}))?")
ANNOTATED_PARAMS_MAX = 256  # characters, all of a pod's kernel_params together
# containerd's CRI on the pod's sandbox container: the sum of its containers'
# memory limits in bytes ("0" when none has one), as kubelet states them.
SANDBOX_MEMORY = "io.kubernetes.cri.sandbox-memory"
# MiB a guest needs beside its containers: the kernel keeps ~40 MiB of a small
# VM for itself, its slab, the agent and crun use ~65 MiB (measured, 128-512 MiB).
GUEST_OVERHEAD_MIB = 128
# Room for the operator's parameters within the guest's 2048-byte command line,
# after ours (see shimv2.vc.qemu).
CONFIG_PARAMS_MAX = 1024
MAX_VM_CACHE = 64  # VMs a cache may hold: each is a pod's worth of memory


@dataclass(frozen=True, slots=True)
class HostLimits:
    """What a pod's annotations may size its VM up to: this host's CPUs and RAM."""

    cpus: int
    memory_mib: int

    @classmethod
    def probe(cls) -> HostLimits:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return cls(cpus=len(os.sched_getaffinity(0)), memory_mib=memory >> 20)


@dataclass(frozen=True, slots=True)
class HypervisorConfig:
    path: str = "qemu-system-x86_64"
    kernel: str = field(default_factory=lambda: str(default_guest_dir() / "vmlinux"))
    # The guest root as Kata's: a read-only image mapped with DAX (one copy in the
    # host's page cache for all VMs) or an initramfs unpacked into each VM's RAM;
    # one of the two. ``image_initrd`` is what mounts the image (our kernel's
    # drivers for it are modules).
    image: str = field(default_factory=lambda: str(default_guest_dir() / "root.erofs"))
    image_initrd: str = field(default_factory=lambda: str(default_guest_dir() / "image-initrd.img"))
    initrd: str = ""
    machine_type: str = "microvm"
    accelerator: str = "auto"
    default_vcpus: int = 1
    default_memory: int = DEFAULT_MEMORY_MIB
    kernel_params: str = ""
    virtio_fs_daemon: str = VIRTIOFSD
    # auto | vsock | hybrid-vsock | serial (shimv2.vc.vsock); auto takes the first
    # this host supports. hybrid-vsock runs vsock_backend ("": build/bin or PATH).
    agent_channel: str = "auto"
    vsock_backend: str = ""
    enable_annotations: tuple[str, ...] = ()
    # The guest kernel's Spectre/Meltdown-class mitigations (and KASLR) stay on
    # unless this turns them off, trading isolation inside the guest for speed
    # (no boot time difference measurable under TCG; see the README).
    disable_guest_mitigations: bool = False
    # MiB of TCG's translation cache (QEMU's -accel tcg,tb-size); KVM ignores it.
    tcg_tb_size: int = TCG_TB_SIZE_MIB
    # Let the host's KSM merge guest RAM (QEMU's mem-merge). Off unless asked:
    # merging opens a timing side channel between pods.
    enable_ksm: bool = False
    # Kata's name: a virtio-balloon with free page reporting, so guest RAM a pod
    # has used and freed goes back to the host (the guest needs virtio_balloon).
    reclaim_guest_freed_memory: bool = True

    def check_root(self, where: str = "hypervisor.qemu") -> None:
        if self.image and self.initrd:
            raise InvalidArgument(f"{where}: image and initrd are mutually exclusive")
        if not self.image and not self.initrd:
            raise InvalidArgument(f"{where}: the guest root needs an image or an initrd")

    def qemu(self, shared_dir: str | None) -> QemuConfig:
        self.check_root()
        return QemuConfig(
            kernel=self.kernel,
            initrd=self.image_initrd if self.image else self.initrd,
            image=self.image,
            binary=self.path,
            machine=self.machine_type,
            accelerator=self.accelerator,
            vcpus=self.default_vcpus,
            memory_mib=self.default_memory,
            kernel_params=tuple(self.kernel_params.split()),
            shared_dir=shared_dir,
            virtiofsd=self.virtio_fs_daemon,
            agent_channel=self.agent_channel,
            vsock_backend=self.vsock_backend or default_backend(),
            disable_mitigations=self.disable_guest_mitigations,
            tcg_tb_size=self.tcg_tb_size,
            ksm=self.enable_ksm,
            free_page_reporting=self.reclaim_guest_freed_memory,
        )


@dataclass(frozen=True, slots=True)
class AgentConfig:
    # Seconds for the agent to answer after the VM starts, and per request.
    dial_timeout: float = 90.0
    request_timeout: float = 60.0
    oci_runtime: str = "crun"
    # A root shell in each VM for ``kata-py exec`` (Kata's debug console): debugging only.
    debug_console_enabled: bool = False


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    state_dir: str = "/run/kata-py"
    enable_debug: bool = False
    # Spans of the virtcontainers verbs, sent over OTLP/HTTP (Jaeger and the
    # OpenTelemetry collector take it on 4318); needs the ``tracing`` extra.
    enable_tracing: bool = False
    tracing_endpoint: str = "http://127.0.0.1:4318/v1/traces"


@dataclass(frozen=True, slots=True)
class FactoryConfig:
    # Kata's names. Pods start as clones of a template VM (``kata-py factory
    # init`` builds it), or boot cold when none matches the configuration.
    enable_template: bool = False
    # On a tmpfs: the templates' RAM; clones copy theirs beside, in ../clones.
    template_path: str = "/dev/shm/kata-py/template"
    # VMs kept started ahead by ``kata-py factory init`` (shimv2.vc.vm_cache),
    # served to the shims on the endpoint; 0: none.
    vm_cache_number: int = 0
    vm_cache_endpoint: str = "/run/kata-py/cache.sock"


@dataclass(frozen=True, slots=True)
class Config:
    hypervisor: HypervisorConfig = field(default_factory=HypervisorConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    factory: FactoryConfig = field(default_factory=FactoryConfig)

    def qemu(self, shared_dir: str | None) -> QemuConfig:
        """The VM to launch; the agent's settings travel on the kernel command line."""
        if self.agent.oci_runtime not in ("crun", "runc"):
            raise InvalidArgument(
                f"agent.kata.oci_runtime must be crun or runc: {self.agent.oci_runtime!r}"
            )
        qemu = self.hypervisor.qemu(shared_dir)
        params = [f"kata_py.runtime={self.agent.oci_runtime}"]
        if self.runtime.enable_debug:
            params.append("kata_py.debug=1")
        if self.agent.debug_console_enabled:
            params.append("kata_py.debug_console=1")
        return dataclasses.replace(
            qemu,
            kernel_params=(*qemu.kernel_params, *params),
            debug_console=self.agent.debug_console_enabled,
        )


def _section(cls: type[Any], table: Mapping[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            raise InvalidArgument(f"{where}: unknown key {key!r}")
        default = getattr(cls(), key)
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InvalidArgument(f"{where}.{key}: want a list of strings")
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise InvalidArgument(f"{where}.{key}: want true or false")
        elif isinstance(default, float):
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise InvalidArgument(f"{where}.{key}: want a positive number")
            value = float(value)
        elif isinstance(default, int):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidArgument(f"{where}.{key}: want a positive integer")
        elif not isinstance(value, str):
            raise InvalidArgument(f"{where}.{key}: want a string")
        values[key] = value
    return cls(**values)


def parse_config(text: str, source: str = "<config>") -> Config:
    import tomllib  # only with a configuration file: most hosts run on the defaults

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{source}: {exc}") from exc
    known = {"hypervisor", "agent", "runtime", "factory"}
    for key in doc:
        if key not in known:
            raise InvalidArgument(f"{source}: unknown section [{key}]")
    hyp = doc.get("hypervisor", {})
    if set(hyp) - {"qemu"}:
        raise InvalidArgument(f"{source}: only [hypervisor.qemu] is supported")
    agent = doc.get("agent", {})
    if set(agent) - {"kata"}:
        raise InvalidArgument(f"{source}: only [agent.kata] is supported")
    qemu = dict(hyp.get("qemu", {}))
    if qemu.get("initrd") and "image" not in qemu:  # as in Kata: an initrd means no image
        qemu["image"] = ""
    factory = dict(doc.get("factory", {}))
    if factory.get("vm_cache_number") == 0:  # Kata's default, written out: no cache
        del factory["vm_cache_number"]
    config = Config(
        hypervisor=_section(HypervisorConfig, qemu, "hypervisor.qemu"),
        agent=_section(AgentConfig, agent.get("kata", {}), "agent.kata"),
        runtime=_section(RuntimeConfig, doc.get("runtime", {}), "runtime"),
        factory=_section(FactoryConfig, factory, "factory"),
    )
    config.hypervisor.check_root(f"{source}: hypervisor.qemu")
    if config.factory.vm_cache_number > MAX_VM_CACHE:
        raise InvalidArgument(f"{source}: factory.vm_cache_number: at most {MAX_VM_CACHE}")
    if not os.path.isabs(config.factory.vm_cache_endpoint):
        raise InvalidArgument(f"{source}: factory.vm_cache_endpoint: want an absolute path")
    _check_config_kernel_params(config.hypervisor.kernel_params, source)
    bad = set(config.hypervisor.enable_annotations) - ANNOTATABLE
    if bad:
        raise InvalidArgument(
            f"{source}: enable_annotations: {sorted(bad)} cannot be annotated "
            f"(allowed: {sorted(ANNOTATABLE)})"
        )
    return config


def _check_config_kernel_params(params: str, source: str) -> None:
    """The operator's parameters are trusted, but must not break the command line."""
    where = f"{source}: hypervisor.qemu.kernel_params"
    for ch in params:
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise InvalidArgument(f"{where}: control character {ord(ch):#04x} not allowed")
    if params.count('"') % 2:
        raise InvalidArgument(f"{where}: unbalanced double quote")
    if len(params) > CONFIG_PARAMS_MAX:
        raise InvalidArgument(f"{where}: longer than {CONFIG_PARAMS_MAX} characters")


def _check_annotated_kernel_params(key: str, value: str) -> None:
    if len(value) > ANNOTATED_PARAMS_MAX:
        raise InvalidArgument(
            f"annotation {key}: kernel parameters longer than {ANNOTATED_PARAMS_MAX} characters"
        )
    for param in value.split(" "):
        if not param:
            continue
        match = ANNOTATED_PARAM.fullmatch(param)
        if match is None:
            raise InvalidArgument(f"annotation {key}: malformed kernel parameter {param!r}")
        if match[1] not in ANNOTATABLE_KERNEL_PARAMS:
            raise InvalidArgument(
                f"annotation {key}: kernel parameter {match[1]!r} is not allowed "
                f"(allowed: {' '.join(sorted(ANNOTATABLE_KERNEL_PARAMS))})"
            )


def load_config(path: str | None = None) -> Config:
    """The configuration from ``path``, ``$KATA_PY_CONFIG`` or the default file."""
    named = path or os.environ.get("KATA_PY_CONFIG")
    target = Path(named) if named else DEFAULT_PATH
    try:
        text = target.read_text()
    except FileNotFoundError:
        if named:
            raise InvalidArgument(f"configuration file not found: {target}") from None
        return Config()
    return parse_config(text, str(target))


def apply_annotations(
    config: Config, annotations: Mapping[str, str], host: HostLimits | None = None
) -> Config:
    """Apply the permitted ``io.katacontainers.config.*`` overrides of a pod, and its limit.

    A memory limit that containerd's CRI states for the pod (``pod_memory_limit_mib``)
    sizes the VM: the limit plus ``GUEST_OVERHEAD_MIB``, or ``default_memory`` if larger.
    """
    hyp = config.hypervisor
    host = host or HostLimits.probe()
    changes: dict[str, Any] = {}
    for key, value in annotations.items():
        if not key.startswith(ANNOTATION_PREFIX):
            continue
        name = (
            key.removeprefix(HYPERVISOR_ANNOTATION) if key.startswith(HYPERVISOR_ANNOTATION) else ""
        )
        if name not in hyp.enable_annotations:
            raise InvalidArgument(f"annotation {key} is not permitted by the configuration")
        if name == "kernel_params":
            _check_annotated_kernel_params(key, value)
            changes[name] = f"{hyp.kernel_params} {value}".strip()
            continue
        try:
            number = int(value)
        except ValueError:
            raise InvalidArgument(f"annotation {key}: want an integer, got {value!r}") from None
        # No bigger than the host (nor than what QemuConfig accepts at all).
        if name == "default_vcpus":
            low, high = 1, min(64, host.cpus)
        else:
            low, high = 128, min(262144, host.memory_mib)
        if not low <= number <= high:
            raise InvalidArgument(f"annotation {key}: {number} out of range {low}..{high}")
        changes[name] = number
    limit = pod_memory_limit_mib(annotations)
    if limit:
        # Sized once (microvm cannot hotplug): the pod's limits and the guest's own
        # share, never less than the default nor more than the host has.
        base = changes.get("default_memory", hyp.default_memory)
        wanted = min(limit + GUEST_OVERHEAD_MIB, host.memory_mib, 262144)
        changes["default_memory"] = max(base, wanted)
    if not changes:
        return config
    return dataclasses.replace(config, hypervisor=dataclasses.replace(hyp, **changes))


def pod_memory_limit_mib(annotations: Mapping[str, str]) -> int:
    """The pod's memory limit that containerd's CRI states, in whole MiB; 0 if none."""
    value = annotations.get(SANDBOX_MEMORY, "")
    try:
        limit = int(value or 0)
    except ValueError:
        raise InvalidArgument(f"annotation {SANDBOX_MEMORY}: want bytes, got {value!r}") from None
    return -(-limit // (1 << 20)) if limit > 0 else 0
