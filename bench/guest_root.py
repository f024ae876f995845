#!/opt/kata-py/venv/bin/python
"""The guest root: an initramfs in every VM's RAM against one DAX-mapped image, by machine.

For each of N rounds, each configuration in turn (the order rotated every round):
two sandboxes through the vc API, one after the other, each running a busybox
container. Of the first: QEMU spawn to agent ready (and the guest's uptime when
its init ran and, with an image, when the root was mounted), container
create+start+output. With both running, idle: each QEMU's PSS from
``/proc/PID/smaps_rollup`` (split into guest RAM = shmem, anonymous = mostly
TCG, file = binaries and the image), and the root image mapping's RSS and PSS.
Prints medians.

    bench/guest_root.py [-n 5] [--memory 512] [--configs microvm-initrd,q35-image,...]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
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
from shimv2.vc.config import Config, HypervisorConfig, RuntimeConfig  # noqa: E402
from shimv2.vc.container import ContainerConfig  # noqa: E402
from shimv2.vc.qemu_config import default_guest_dir  # noqa: E402
from shimv2.vc.sandbox import Sandbox, SandboxConfig  # noqa: E402
from tests.guest.rootfs import build_rootfs, make_spec  # noqa: E402

GUEST = default_guest_dir()
# name: machine, and whether the root is the image (else the whole-root initramfs)
CONFIGS = {
    "microvm-initrd": ("microvm", False),
    "q35-initrd": ("q35", False),
    "q35-image": ("q35", True),
    "microvm-image": ("microvm", True),
}


def hypervisor(name: str, memory: int) -> HypervisorConfig:
    machine, image = CONFIGS[name]
    return HypervisorConfig(
        machine_type=machine,
        default_memory=memory,
        image=str(GUEST / "root.erofs") if image else "",
        initrd="" if image else str(GUEST / "initrd.img"),
    )


def _uptime(console: str, marker: str) -> float:
    m = re.search(rf"{marker} uptime=([0-9.]+)", console)
    return float(m.group(1)) if m else float("nan")


def rollup(pid: int) -> dict[str, float]:
    """smaps_rollup in MiB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0]) / 1024
    return out


def mapping(pid: int, path_suffix: str) -> tuple[float, float]:
    """RSS and PSS (MiB) of the mappings of a file whose path ends so."""
    rss = pss = 0
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            inside = len(fields) >= 6 and fields[5].endswith(path_suffix)
        elif inside and fields[0] == "Rss:":
            rss += int(fields[1])
        elif inside and fields[0] == "Pss:":
            pss += int(fields[1])
    return rss / 1024, pss / 1024


async def run_container(vc: VirtContainers, sandbox: Sandbox, bundle: Path) -> float:
    spec = spec_to_json(make_spec("rootfs", ["echo", "ready"]))
    t0 = time.monotonic()
    await vc.create_container(sandbox.id, ContainerConfig(id="c", bundle=str(bundle), spec=spec))
    await vc.start_container(sandbox.id, "c")
    out = await sandbox.container("c").read_stdout("", 64)
    assert out == b"ready\n", out
    return time.monotonic() - t0


async def config_round(name: str, memory: int, state_dir: str, bundle: Path) -> dict[str, float]:
    config = Config(hypervisor=hypervisor(name, memory), runtime=RuntimeConfig(state_dir=state_dir))
    result: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        vc = VirtContainers(nursery, config)
        sandboxes: list[Sandbox] = []
        try:
            for i in range(2):
                t0 = time.monotonic()
                sandbox = await vc.create_sandbox(SandboxConfig(id=f"gr{uuid.uuid4().hex[:8]}"))
                ready = time.monotonic() - t0
                sandboxes.append(sandbox)
                ctr = await run_container(vc, sandbox, bundle)
                if i == 0:
                    assert sandbox.vm is not None
                    console = sandbox.vm.console_path.read_text(errors="replace")
                    result |= {
                        "agent_ready_s": ready,
                        "root_mounted_uptime_s": _uptime(console, "KATA_PY_ROOT_MOUNTED"),
                        "init_uptime_s": _uptime(console, "KATA_PY_INIT"),
                        "container_s": ctr,
                    }
            await trio.sleep(2)  # idle: what stays
            pss: list[dict[str, float]] = []
            images: list[tuple[float, float]] = []
            for sandbox in sandboxes:
                pid = sandbox.vm.pid if sandbox.vm is not None else None
                assert pid is not None
                pss.append(rollup(pid))
                images.append(mapping(pid, "root.erofs"))
            result |= {
                "pss_mib": statistics.mean(p["Pss"] for p in pss),
                "pss_guest_ram_mib": statistics.mean(p["Pss_Shmem"] for p in pss),
                "pss_anon_mib": statistics.mean(p["Pss_Anon"] for p in pss),
                "pss_file_mib": statistics.mean(p["Pss_File"] for p in pss),
                "image_rss_mib": statistics.mean(r for r, _ in images),
                "image_pss_mib": statistics.mean(p for _, p in images),
            }
        finally:
            for sandbox in sandboxes:
                await vc.stop_sandbox(sandbox.id)
                await vc.delete_sandbox(sandbox.id)
            nursery.cancel_scope.cancel()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    # The same guest RAM for all: an initramfs root needs room for its 56 MB unpacked
    # (q35 fails to unpack it at 256 MiB).
    parser.add_argument("--memory", type=int, default=512, help="guest RAM, MiB")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    names = args.configs.split(",")
    state_dir = f"/run/kpy-bench-{uuid.uuid4().hex[:6]}"
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        build_rootfs(bundle / "rootfs")
        try:
            for r in range(args.n):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    result = trio.run(config_round, name, args.memory, state_dir, bundle)
                    runs[name].append(result)
                    print(f"round {r + 1} {name}: {json.dumps(runs[name][-1])}", file=sys.stderr)
        finally:
            shutil.rmtree(state_dir, ignore_errors=True)
    medians = {
        name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()
    }
    if args.json:
        print(json.dumps({"n": args.n, "medians": medians}))
        return 0
    keys = list(next(iter(medians.values())))
    print(f"guest root by machine, {args.memory} MiB guests, medians of {args.n} (interleaved)")
    print(f"{'':24}" + "".join(f"{name:>16}" for name in names))
    for key in keys:
        print(f"{key:24}" + "".join(f"{medians[name][key]:16.2f}" for name in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
