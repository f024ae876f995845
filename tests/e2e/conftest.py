"""A real containerd for end-to-end tests: private root, state and socket.

Every test runs against Debian's containerd 1.6 and the pinned 1.7 (both Task
v2, plain address), 2.2 (JSON bootstrap reply) and 2.4 (protobuf bootstrap
reply) that scripts/build-containerd builds under ``build/`` (scripts/setup
runs it); a missing one fails the tests. Each test leaves no shim, VM or state
behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shimv2.vc.config import FactoryConfig
from shimv2.vc.template import clones_dir
from tests.leaks import cgroup_dirs, vm_processes
from tests.mountinfo import mounts_in_every_namespace

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "localhost/kata-py/busybox:latest"
RUNTIME = "io.containerd.kata-py.v2"
SHIM = "containerd-shim-kata-py-v2"
DEFAULT_CLONES = clones_dir(FactoryConfig().template_path)


@dataclass
class Containerd:
    binary: str
    ctr_binary: str
    base: Path
    version: str = "1.6"
    # Config for containerd's CRI plugin (version 2 form, which 2.x migrates);
    # None turns the plugin off.
    cri_config: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)  # more environment for containerd
    templated: bool = False  # its kata-py pods are cloned from a VM template
    config_version: int = 2  # of its config.toml: 3 is containerd 2.x's own form
    channel: str = ""  # the agent channel its kata-py pods use ("": auto)
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.base / "containerd.log"

    def bundle(self, name: str, namespace: str = "default") -> Path:
        return self.base / "state" / "io.containerd.runtime.v2.task" / namespace / name

    @property
    def socket(self) -> str:
        return str(self.base / "containerd.sock")

    def start(self) -> None:
        config = self.base / "config.toml"
        cri = self.cri_config
        config.write_text(
            f"version = {self.config_version}\n"
            f'root = "{self.base}/root"\n'
            f'state = "{self.base}/state"\n'
            + ('disabled_plugins = ["io.containerd.grpc.v1.cri"]\n' if cri is None else "")
            + f'[grpc]\n  address = "{self.socket}"\n'
            + (cri or "")
        )
        path = f"/usr/local/bin:{os.environ.get('PATH', '/usr/bin:/bin')}"
        env = {**os.environ, "PATH": path, **self.env}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--config", str(config)], stdout=log, stderr=log, env=env
            )
        deadline = time.monotonic() + 20
        while not os.path.exists(self.socket):
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            assert time.monotonic() < deadline, "containerd did not start"
            time.sleep(0.05)
        self.ctr("version")

    def import_image(
        self, name: str, entrypoint: list[str] | None = None, namespace: str = "default"
    ) -> None:
        """A busybox image built locally (scripts/busybox-image), imported as ``name``."""
        archive = self.base / f"image-{uuid.uuid4().hex[:6]}.tar"
        argv = [str(ROOT / "scripts" / "busybox-image"), str(archive), name]
        subprocess.run([*argv, *([json.dumps(entrypoint)] if entrypoint else [])], check=True)
        self.ctr("-n", namespace, "images", "import", str(archive))
        archive.unlink()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 180, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [self.ctr_binary, "-a", self.socket, *args],
            input=stdin.decode() if stdin is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and out.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)}: rc {out.returncode}: {out.stderr}")
        return out


def _built(version: str) -> tuple[str, str, str]:
    release = ROOT / "build" / f"containerd-v{version}"
    return version, str(release / "containerd"), str(release / "ctr")


# (version, containerd, ctr, the agent channel the shims use: "" = auto, here
# hybrid vsock; the newest containerd also runs everything over virtio-serial)
VERSIONS = [
    ("1.6", "/usr/bin/containerd", "/usr/bin/ctr", ""),
    (*_built("1.7.35"), ""),
    (*_built("2.2.9"), ""),
    (*_built("2.4.2"), ""),
    (*_built("2.4.2"), "serial"),
]


def _version_id(param: tuple[str, str, str, str]) -> str:
    return f"containerd-{param[0]}" + (f"-{param[3]}" if param[3] else "")


def shim_pids() -> list[int]:
    """kata-py shims: the program run (or the script Python runs) is the shim, not a
    command line that merely names it (a shell script, a pgrep)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        head = [os.path.basename(a).decode(errors="replace") for a in argv[:3]]
        if head and (head[0] == SHIM or (head[0].startswith("python") and SHIM in head[1:])):
            found.append(int(entry))
    return sorted(found)


@pytest.fixture(scope="session", autouse=True)
def shim_runs_this_code() -> None:
    """containerd's shim imports shimv2 from this checkout, not another clone's.

    Otherwise shims run other code and boot other guest files: template keys
    then differ and clones silently boot cold (a CI run that failed that way).
    """
    shim = shutil.which(SHIM, path=f"/usr/local/bin:{os.environ.get('PATH', '')}")
    assert shim is not None, f"{SHIM} is not on PATH: run scripts/setup"
    interpreter = Path(shim).read_text().splitlines()[0].removeprefix("#!").split()[0]
    where = subprocess.run(
        [interpreter, "-c", "import shimv2; print(shimv2.__file__)"],
        cwd="/",
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).resolve().parents[1] == ROOT.resolve(), (
        f"{SHIM} runs {where}, not this checkout ({ROOT}): run scripts/setup"
    )


@pytest.fixture(scope="session", params=VERSIONS, ids=_version_id)
def containerd(request: pytest.FixtureRequest) -> Iterator[Containerd]:
    version, binary, ctr_binary, channel = request.param
    for exe in (binary, ctr_binary):
        assert os.access(exe, os.X_OK), f"{exe} is missing: run scripts/setup"
    base = Path(f"/run/kpy-e2e-{uuid.uuid4().hex[:6]}")
    base.mkdir()
    env = {}
    if channel:
        config = base / "configuration.toml"
        config.write_text(f'[hypervisor.qemu]\nagent_channel = "{channel}"\n')
        env["KATA_PY_CONFIG"] = str(config)
    cd = Containerd(binary, ctr_binary, base, version, env=env, channel=channel)
    cd.start()
    cd.import_image(IMAGE)
    yield cd
    cd.stop()
    subprocess.run(["umount", "-R", str(base / "root")], check=False, capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


SHIM_SOCKETS = Path("/run/containerd/s")


def shim_sockets() -> set[str]:
    return set(os.listdir(SHIM_SOCKETS)) if SHIM_SOCKETS.exists() else set()


def processes_left() -> list[str]:
    """kata-py shims (by pid) and VM processes (QEMU, virtiofsd, vsock backend) on the host."""
    return [*map(str, shim_pids()), *vm_processes("kata-py-")]


def state_left() -> list[str]:
    """Sandbox states, monitor sockets and template clones' RAM copies (their default place)."""
    return [
        f"{d.name}/{entry}"
        for d in (Path("/run/kata-py/sbs"), Path("/run/kata-py/monitor"), DEFAULT_CLONES)
        if d.exists()
        for entry in sorted(os.listdir(d))
    ]


def assert_nothing_left(sockets_before: set[str], cgroups_before: set[str]) -> None:
    """No shim, QEMU, virtiofsd, mount, shim or monitor socket, sandbox state or cgroup left.

    Leaked shims are killed before the asserts.
    """
    deadline = time.monotonic() + 15
    while processes_left() and time.monotonic() < deadline:
        time.sleep(0.2)
    leaks = processes_left()
    for pid in shim_pids():
        os.kill(pid, signal.SIGKILL)
    left = state_left()
    mounts = mounts_in_every_namespace("/run/kata-py/")
    assert leaks == []
    assert left == []
    assert mounts == []
    assert shim_sockets() - sockets_before == set()
    assert cgroup_dirs() - cgroups_before == set()  # the pods' host cgroups


@pytest.fixture
def cd(containerd: Containerd) -> Iterator[Containerd]:
    """The session's containerd, with a leak check after each test."""
    if containerd.proc is None or containerd.proc.poll() is not None:
        containerd.start()
    before, cgroups_before = shim_sockets(), cgroup_dirs()
    yield containerd
    assert_nothing_left(before, cgroups_before)
