"""Runs one sandbox (no containers) until SIGTERM, for tests that drive it from elsewhere.

    python -m tests.vm_holder CONFIG SANDBOX_ID

Prints ``ready`` once the VM's agent answers; on SIGTERM stops and deletes the
sandbox and exits 0.
"""

from __future__ import annotations

import signal
import sys

import trio

from shimv2.vc.api import VirtContainers
from shimv2.vc.config import load_config
from shimv2.vc.sandbox import SandboxConfig


async def hold(config_path: str, sid: str) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            vc = VirtContainers(nursery, load_config(config_path))
            await vc.run_sandbox(SandboxConfig(id=sid))
            print("ready", flush=True)
            async for _ in signals:
                break
            await vc.stop_sandbox(sid)
            await vc.delete_sandbox(sid)
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(hold, sys.argv[1], sys.argv[2])
