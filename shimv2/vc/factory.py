"""The factory seam: CreateSandbox gets its VM from a factory.

The default boots a fresh VM. A cache of pre-booted or templated VMs (Kata's
VM factory) plugs in here with the same one method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import trio

from shimv2.vc.qemu import Qemu
from shimv2.vc.qemu_config import QemuConfig


class Factory(Protocol):
    async def get_vm(
        self, vm_id: str, config: QemuConfig, run_dir: Path, nursery: trio.Nursery
    ) -> Qemu:
        """A started VM for ``vm_id``; the factory owns nothing after handing it out."""
        ...


class DirectFactory:
    """Boot a new VM for every sandbox."""

    async def get_vm(
        self, vm_id: str, config: QemuConfig, run_dir: Path, nursery: trio.Nursery
    ) -> Qemu:
        vm = Qemu(vm_id, config, run_dir)
        await vm.start(nursery)
        return vm
