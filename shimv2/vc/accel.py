"""Choose the accelerator: KVM only when a guest really runs on it, TCG otherwise.

``/dev/kvm`` can exist and still be useless (nested KVM here fails the first
instructions of a 64-bit kernel and QEMU stops with "KVM internal error"). So
the probe boots the guest kernel itself, with no root: under working KVM it
panics and, with ``panic=-1 -no-reboot``, QEMU exits within a second. Anything
else within the time limit means no. The answer is cached per boot of the host.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import trio

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 4.0


@dataclass(frozen=True, slots=True)
class ProbeResult:
    kvm: bool
    reason: str


def _probe_argv(qemu: str, kernel: str) -> list[str]:
    return [
        qemu, "-accel", "kvm", "-cpu", "host", "-m", "128", "-M", "microvm",
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
        "-no-reboot", "-kernel", kernel,
        "-append", "console=ttyS0 quiet panic=-1 nokaslr",
    ]  # fmt: skip


async def probe_kvm(qemu: str, kernel: str, timeout: float = PROBE_TIMEOUT) -> ProbeResult:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return ProbeResult(False, f"/dev/kvm: {exc.strerror}")
    os.close(fd)
    proc = await trio.lowlevel.open_process(
        _probe_argv(qemu, kernel),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    err = b""
    try:
        with trio.move_on_after(timeout):
            # QEMU reports a failed KVM guest at once, then sits paused: read
            # stderr as it comes rather than wait out the timeout.
            while chunk := await proc.stderr.receive_some(4096):
                err += chunk
                if b"KVM internal error" in err:
                    break
            else:
                rc = await proc.wait()
                if rc == 0:
                    return ProbeResult(True, "a guest kernel booted under KVM")
                return ProbeResult(False, f"KVM guest failed (rc {rc}): {_first_line(err)}")
            return ProbeResult(False, f"KVM guest failed: {_first_line(err)}")
        return ProbeResult(False, f"KVM guest did not finish within {timeout:g}s")
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()


def _first_line(err: bytes) -> str:
    lines = [ln for ln in err.decode(errors="replace").splitlines() if "warning" not in ln]
    return lines[0][:200] if lines else "(no output)"


async def choose_accelerator(
    requested: str, qemu: str, kernel: str, cache: Path | None = None
) -> tuple[str, str]:
    """Return (accelerator, reason) for ``requested`` in {"auto", "kvm", "tcg"}."""
    if requested in ("kvm", "tcg"):
        return requested, "configured"
    if requested != "auto":
        raise ValueError(f"accelerator must be auto, kvm or tcg, not {requested!r}")
    key = f"{qemu}:{kernel}"
    if cache is not None:
        try:
            cached = json.loads(cache.read_text())
            if cached.get("key") == key:
                return ("kvm" if cached["kvm"] else "tcg"), f"cached: {cached['reason']}"
        except (OSError, ValueError, KeyError):
            pass
    result = await probe_kvm(qemu, kernel)
    log.info("KVM probe: %s", result.reason)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "kvm": result.kvm, "reason": result.reason}))
        tmp.replace(cache)
    return ("kvm" if result.kvm else "tcg"), result.reason
