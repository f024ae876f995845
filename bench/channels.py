#!/opt/kata-py/venv/bin/python
"""The agent channels side by side: virtio-serial and hybrid vsock, in one run.

For each channel, one sandbox through the vc API (the kernel's vhost-vsock is
measured only where ``/dev/vhost-vsock`` exists):

- the agent's round trip: ``N`` sequential Health/Check calls on one
  connection, median and 90th percentile;
- stdout throughput: a container writes ``--mib`` MiB of zeros, read by the host
  through ReadStdout until EOF, as containerd's IO would;
- the time from QEMU's launch until the agent answered.

The channels alternate over ``--rounds`` sandboxes each; medians over rounds.

    bench/channels.py [--calls 200] [--mib 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
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
from shimv2.vc.sandbox import SandboxConfig  # noqa: E402
from tests.guest.rootfs import build_rootfs, make_spec  # noqa: E402


async def one_round(channel: str, calls: int, mib: int, tmp: Path) -> dict[str, float]:
    state_dir = f"/run/kpy-ch-{uuid.uuid4().hex[:6]}"
    config = Config(
        hypervisor=HypervisorConfig(agent_channel=channel),
        runtime=RuntimeConfig(state_dir=state_dir),
    )
    bundle = tmp / f"bundle-{uuid.uuid4().hex[:6]}"
    build_rootfs(bundle / "rootfs")
    script = f"head -c {mib << 20} /dev/zero"
    spec = spec_to_json(make_spec("rootfs", ["sh", "-c", script]))
    sid = f"ch{uuid.uuid4().hex[:8]}"
    out: dict[str, float] = {}
    try:
        async with trio.open_nursery() as nursery:
            vc = VirtContainers(nursery, config)
            t0 = time.monotonic()
            sandbox = await vc.create_sandbox(
                SandboxConfig(id=sid, containers=(ContainerConfig("c", str(bundle), spec),))
            )
            out["create_sandbox"] = time.monotonic() - t0
            assert sandbox.vm is not None
            assert sandbox.vm.channel == channel
            rtts = []
            for _ in range(calls):
                t = time.perf_counter()
                assert await sandbox.agent.check(timeout=10)  # one Health/Check call
                rtts.append(time.perf_counter() - t)
            rtts.sort()
            out["rtt_ms"] = 1000 * statistics.median(rtts)
            out["rtt_p90_ms"] = 1000 * rtts[int(len(rtts) * 0.9)]
            container = sandbox.container("c")
            t = time.monotonic()
            await vc.start_container(sid, "c")
            got = 0
            while chunk := await container.read_stdout("", 1 << 20):
                got += len(chunk)
            out["stdout_mib_s"] = (got / (1 << 20)) / (time.monotonic() - t)
            assert got == mib << 20, got
            await container.wait()
            await vc.stop_sandbox(sid)
            await vc.delete_sandbox(sid)
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    channels = ["serial", "hybrid-vsock"]
    if os.path.exists("/dev/vhost-vsock"):
        channels.append("vsock")
    results: dict[str, list[dict[str, float]]] = {c: [] for c in channels}
    with tempfile.TemporaryDirectory(prefix="kpy-channels-") as tmp:
        for _ in range(args.rounds):
            for channel in channels:
                results[channel].append(
                    trio.run(one_round, channel, args.calls, args.mib, Path(tmp))
                )
    rows = [
        f"{os.cpu_count()} CPUs; {args.rounds} rounds, alternating; {args.calls} calls; "
        f"{args.mib} MiB of stdout",
        "",
        f"| | {' | '.join(channels)} |",
        "|---" * (len(channels) + 1) + "|",
    ]
    labels = {
        "rtt_ms": "agent round trip (Health/Check), median, ms",
        "rtt_p90_ms": "agent round trip, 90th percentile, ms",
        "stdout_mib_s": "container stdout to the host, MiB/s",
        "create_sandbox": "sandbox with its container created, s",
    }
    for key, label in labels.items():
        cells = [f"{statistics.median(r[key] for r in results[c]):.2f}" for c in channels]
        rows.append(f"| {label} | {' | '.join(cells)} |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
