"""The host's copy of the guest console: capped, rotated once, never through a symlink."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from shimv2.vc.console import ReadyMarker, RotatingLog, connect_console, relay_console


def _sizes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in directory.iterdir()}


def test_rotates_once_and_never_passes_the_cap(tmp_path: Path) -> None:
    log = RotatingLog(tmp_path / "console.log", limit=10)
    written = b""
    for i, size in enumerate((3, 7, 1, 25, 4, 10, 9, 2)):
        chunk = bytes([ord("a") + i]) * size
        log.write(chunk)
        written += chunk
        sizes = _sizes(tmp_path)
        assert set(sizes) <= {"console.log", "console.log.1"}
        assert all(n <= 10 for n in sizes.values())
        # The newest bytes are all kept, in order, across the two files.
        kept = log.rotated.read_bytes() if log.rotated.exists() else b""
        kept += log.path.read_bytes()
        assert written.endswith(kept)
        assert len(kept) >= min(len(written), 10)
    log.close()


def test_reopens_an_existing_file_and_keeps_counting(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    path.write_bytes(b"x" * 8)  # a previous shim's output
    log = RotatingLog(path, limit=10)
    log.write(b"yyyy")
    assert log.rotated.read_bytes() == b"x" * 8 + b"yy"
    assert path.read_bytes() == b"yy"
    log.close()


def test_never_writes_through_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "console.log").symlink_to(victim)
    log = RotatingLog(tmp_path / "console.log", limit=10)
    with pytest.raises(OSError, match="symbolic links") as caught:
        log.write(b"guest output")
    assert caught.value.errno == errno.ELOOP
    assert victim.read_bytes() == b"precious"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a full /run, for real."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


async def test_relay_keeps_reading_when_the_host_disk_is_full(small_fs: Path) -> None:
    ours, qemu = trio.socket.socketpair()
    log = RotatingLog(small_fs / "console.log", limit=1 << 20)  # the disk fills first
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay_console, trio.SocketStream(ours), log)
        sent = 0
        with trio.fail_after(10):
            while sent < 1 << 20:  # more than the disk holds: the relay must keep reading
                sent += await qemu.send(b"z" * 65536)
        qemu.close()  # QEMU exits: the relay ends by itself
    assert 0 < (small_fs / "console.log").stat().st_size <= 64 * 1024


async def test_relay_copies_until_qemu_closes(tmp_path: Path) -> None:
    ours, qemu = trio.socket.socketpair()
    log = RotatingLog(tmp_path / "console.log", limit=100)
    data = bytes(i % 251 for i in range(350))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay_console, trio.SocketStream(ours), log)
        for i in range(0, 350, 70):
            await qemu.send(data[i : i + 70])
        qemu.close()
    assert (tmp_path / "console.log.1").read_bytes() == data[200:300]
    assert (tmp_path / "console.log").read_bytes() == data[300:]
    assert log._fd == -1  # closed


async def test_connect_waits_for_the_socket_and_gives_up_when_qemu_exits(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    path = tmp_path / "console.sock"
    exited = trio.Event()

    async def listen_later() -> None:
        await trio.sleep(0.2)
        sock = trio.socket.socket(trio.socket.AF_UNIX)
        await sock.bind(str(path))
        await trio.sleep(0.2)  # bound, not yet listening: refused meanwhile
        sock.listen()
        await trio.sleep_forever()

    nursery.start_soon(listen_later)
    with trio.fail_after(5):
        stream = await connect_console(path, exited=exited)
    assert stream is not None
    await stream.aclose()
    exited.set()
    with trio.fail_after(1):
        assert await connect_console(tmp_path / "never.sock", exited=exited) is None
    os.unlink(path)


def test_the_ready_marker_is_seen_across_chunks_and_only_once_whole() -> None:
    marker = ReadyMarker(b"KATA_PY_AGENT_READY")
    for chunk in (b"boot... KATA_PY_AG", b"ENT_REA"):
        marker.feed(chunk)
        assert not marker.seen.is_set()
    marker.feed(b"DY uptime=3.1\n")
    assert marker.seen.is_set()
    marker.feed(b"more output")  # stays set; nothing kept past it
    assert marker.seen.is_set()


async def test_the_relay_tells_the_marker_what_the_guest_printed(tmp_path: Path) -> None:
    a, b = trio.socket.socketpair()
    marker = ReadyMarker(b"READY")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            relay_console, trio.SocketStream(b), RotatingLog(tmp_path / "console.log"), marker
        )
        await a.send(b"not yet\n")
        await trio.sleep(0.05)
        assert not marker.seen.is_set()
        await a.send(b"READY\n")
        with trio.fail_after(5):
            await marker.seen.wait()
        a.close()
    assert (tmp_path / "console.log").read_bytes() == b"not yet\nREADY\n"
