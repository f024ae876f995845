from __future__ import annotations

import json
from pathlib import Path

import pytest

from shimv2.vc.accel import choose_accelerator, probe_kvm
from shimv2.vc.qemu_config import default_guest_dir

KERNEL = str(default_guest_dir() / "vmlinux")


async def test_configured_accelerator_is_taken_as_is() -> None:
    assert await choose_accelerator("tcg", "qemu-system-x86_64", KERNEL) == ("tcg", "configured")
    with pytest.raises(ValueError, match="auto, kvm or tcg"):
        await choose_accelerator("xen", "qemu-system-x86_64", KERNEL)


@pytest.mark.vm
async def test_probe_answers_within_its_bound() -> None:
    # Here /dev/kvm exists but nested guests hang: the probe must say no in time.
    # On a host with working KVM it must say yes; either way it ends by itself.
    result = await probe_kvm("qemu-system-x86_64", KERNEL, timeout=4.0)
    assert result.reason
    if not Path("/dev/kvm").exists():
        assert not result.kvm


async def test_cache_is_used_and_keyed(tmp_path: Path) -> None:
    cache = tmp_path / "accel.json"
    key = f"qemu-system-x86_64:{KERNEL}"
    cache.write_text(json.dumps({"key": key, "kvm": True, "reason": "from test"}))
    accel, reason = await choose_accelerator("auto", "qemu-system-x86_64", KERNEL, cache)
    assert (accel, reason) == ("kvm", "cached: from test")
