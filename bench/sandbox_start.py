#!/opt/kata-py/venv/bin/python
"""Cold sandbox start, broken into its phases, beside runc in the same run.

For each of N rounds (alternating): a kata-py sandbox through the vc API —
QEMU spawned (QMP up), kernel booted (the guest init's uptime), agent ready
(health check answered), container created and started in the guest, first
output read — and, for reference, ``runc run`` of the same busybox bundle on
the host. Prints medians; the VM accelerator is whatever the host allows
(TCG here).

    bench/sandbox_start.py [-n 5]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shimv2.oci import spec_to_json  # noqa: E402
from shimv2.vc.api import VirtContainers  # noqa: E402
from shimv2.vc.config import Config, RuntimeConfig  # noqa: E402
from shimv2.vc.container import ContainerConfig  # noqa: E402
from shimv2.vc.factory import DirectFactory  # noqa: E402
from shimv2.vc.qemu import Qemu  # noqa: E402
from shimv2.vc.qemu_config import QemuConfig  # noqa: E402
from shimv2.vc.sandbox import SandboxConfig  # noqa: E402
from tests.guest.rootfs import build_rootfs, make_spec  # noqa: E402


class TimedFactory(DirectFactory):
    """The default factory, noting when QEMU answered QMP."""

    def __init__(self) -> None:
        self.spawned_at = 0.0

    async def get_vm(
        self, vm_id: str, config: QemuConfig, run_dir: Path, nursery: trio.Nursery
    ) -> Qemu:
        vm = await super().get_vm(vm_id, config, run_dir, nursery)
        self.spawned_at = time.monotonic()
        return vm


def _uptime(console: str, marker: str) -> float:
    m = re.search(rf"{marker} uptime=([0-9.]+)", console)
    return float(m.group(1)) if m else float("nan")


async def kata_round(state_dir: str, bundle: Path) -> dict[str, float]:
    spec = spec_to_json(make_spec("rootfs", ["echo", "ready"]))
    factory = TimedFactory()
    async with trio.open_nursery() as nursery:
        vc = VirtContainers(
            nursery, Config(runtime=RuntimeConfig(state_dir=state_dir)), factory=factory
        )
        sid = f"bench{uuid.uuid4().hex[:8]}"
        t0 = time.monotonic()
        sandbox = await vc.create_sandbox(SandboxConfig(id=sid))
        t_agent = time.monotonic()
        assert sandbox.vm is not None
        console = sandbox.vm.console_path.read_text(errors="replace")
        await vc.create_container(sid, ContainerConfig(id="c", bundle=str(bundle), spec=spec))
        await vc.start_container(sid, "c")
        out = await sandbox.container("c").read_stdout("", 64)
        t_ctr = time.monotonic()
        assert out == b"ready\n", out
        await vc.stop_sandbox(sid)
        await vc.delete_sandbox(sid)
        nursery.cancel_scope.cancel()
    return {
        "qemu_spawn_s": factory.spawned_at - t0,
        "kernel_boot_s": _uptime(console, "KATA_PY_INIT"),
        "agent_ready_s": t_agent - t0,
        "container_start_s": t_ctr - t_agent,
        "total_s": t_ctr - t0,
    }


def runc_round(bundle: Path) -> float:
    t0 = time.monotonic()
    subprocess.run(
        ["runc", "run", "--bundle", str(bundle), f"bench-{uuid.uuid4().hex[:8]}"],
        check=True,
        capture_output=True,
    )
    return time.monotonic() - t0


def write_runc_bundle(path: Path) -> None:
    build_rootfs(path / "rootfs")
    subprocess.run(["runc", "spec"], cwd=path, check=True)
    config = json.loads((path / "config.json").read_text())
    config["process"]["terminal"] = False
    config["process"]["args"] = ["echo", "ready"]
    (path / "config.json").write_text(json.dumps(config))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    state_dir = f"/run/kpy-bench-{uuid.uuid4().hex[:6]}"
    kata: list[dict[str, float]] = []
    runc: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        kata_bundle, runc_bundle = Path(tmp) / "kata", Path(tmp) / "runc"
        build_rootfs(kata_bundle / "rootfs")
        write_runc_bundle(runc_bundle)
        try:
            for _ in range(args.n):
                kata.append(trio.run(kata_round, state_dir, kata_bundle))
                runc.append(runc_round(runc_bundle))
        finally:
            shutil.rmtree(state_dir, ignore_errors=True)
    medians = {k: statistics.median(r[k] for r in kata) for k in kata[0]}
    runc_median = statistics.median(runc)
    if args.json:
        print(json.dumps({"n": args.n, "kata_py": medians, "runc_run_s": runc_median}))
        return 0
    print(f"cold sandbox start, medians of {args.n} (alternating with runc)")
    print(f"  QEMU spawned (QMP up)        {medians['qemu_spawn_s']:7.3f} s after start")
    print(f"  kernel booted (guest init)   {medians['kernel_boot_s']:7.3f} s guest uptime")
    print(f"  agent ready                  {medians['agent_ready_s']:7.3f} s after start")
    print(f"  container create+start+out   {medians['container_start_s']:7.3f} s")
    print(f"  total                        {medians['total_s']:7.3f} s")
    print(f"  runc run (host, same bundle) {runc_median:7.3f} s")
    print(f"  ratio kata-py/runc           {medians['total_s'] / runc_median:7.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
