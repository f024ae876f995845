"""Running a script as root in a pod's VM, for the benchmarks that measure inside the guest.

``root_shell`` starts one sandbox through the vc API with the debug console on and
a busybox container (``c``, running ``sleep``), feeds its input to ``kata-py
exec`` (a root shell in the guest), and returns what the shell printed and the
VM's console; the sandbox is gone afterwards. ``file_in_guest`` turns bytes into
shell input that writes them to a guest path.
"""

from __future__ import annotations

import base64
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import trio
from _common import ROOT

from shimv2.oci import spec_to_json
from shimv2.vc.api import VirtContainers
from shimv2.vc.config import load_config
from shimv2.vc.container import ContainerConfig
from shimv2.vc.sandbox import SandboxConfig
from tests.guest.rootfs import build_rootfs, make_spec

# Where the agent keeps container c's config.json (its root.path is the rootfs in the guest).
CONTAINER_CONFIG = "/run/kata-py/containers/c/config.json"
__all__ = ["CONTAINER_CONFIG", "ROOT", "GuestRun", "file_in_guest", "result_line", "root_shell"]


@dataclass(frozen=True)
class GuestRun:
    output: str  # what the root shell printed (its echo of the input included)
    console: str  # the VM's console: the guest init's and the agent's start lines


def file_in_guest(data: bytes, path: str) -> str:
    text = base64.encodebytes(data).decode()
    return f"base64 -d > {path} <<'EOF'\n{text}EOF\n"


def result_line(run: GuestRun, prefix: str) -> str:
    """The rest of the first output line that starts with ``prefix``."""
    for line in run.output.splitlines():
        if line.startswith(prefix):
            return line.removeprefix(prefix)
    raise SystemExit(f"no {prefix!r} line from the guest:\n{run.output[-3000:]}")


async def root_shell(shell_input: str, tmp: Path, timeout: float = 900) -> GuestRun:
    state_dir = f"/run/kpy-guest-{uuid.uuid4().hex[:6]}"
    config_file = tmp / "config.toml"
    config_file.write_text(
        f'[runtime]\nstate_dir = "{state_dir}"\n[agent.kata]\ndebug_console_enabled = true\n'
    )
    config = load_config(str(config_file))  # what ``kata-py exec`` reads too
    bundle = tmp / "bundle"
    build_rootfs(bundle / "rootfs")
    spec = spec_to_json(make_spec("rootfs", ["sleep", "1000"]))
    sid = f"g{uuid.uuid4().hex[:8]}"
    argv = [str(Path(sys.executable).parent / "kata-py"), "--config", str(config_file), "exec", sid]
    try:
        async with trio.open_nursery() as nursery:
            vc = VirtContainers(nursery, config)
            sandbox = await vc.run_sandbox(
                SandboxConfig(id=sid, containers=(ContainerConfig("c", str(bundle), spec),))
            )
            assert sandbox.vm is not None
            with trio.fail_after(timeout):
                shell = await trio.run_process(
                    argv, stdin=(shell_input + "exit 0\n").encode(), capture_stdout=True,
                    capture_stderr=True, check=False,
                )  # fmt: skip
            console = sandbox.vm.console_path.read_text(errors="replace")
            await vc.stop_sandbox(sid)
            await vc.delete_sandbox(sid)
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    if shell.returncode != 0:
        raise SystemExit(f"kata-py exec failed: {shell.stderr.decode(errors='replace')[-2000:]}")
    return GuestRun(shell.stdout.decode(errors="replace").replace("\r", ""), console)
