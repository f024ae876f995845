from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from shimv2.errdefs import (
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from shimv2.vc.persist import ContainerState, SandboxState, Store


def _state(sid: str = "pod1") -> SandboxState:
    return SandboxState(
        id=sid,
        state="running",
        qemu_pid=123,
        containers={"c1": ContainerState(id="c1", bundle="/b", state="created", mounts=["/m"])},
    )


def test_round_trip_and_list(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert store.list() == []  # no storage directory yet
    store.create("pod1")
    assert store.list() == []  # no state saved yet
    store.save(_state())
    assert store.list() == ["pod1"]
    loaded = store.load("pod1")
    assert loaded == _state()
    assert loaded.containers["c1"].mounts == ["/m"]
    with pytest.raises(FailedPrecondition, match="already exists"):
        store.create("pod1")
    store.remove("pod1")
    assert store.list() == []
    with pytest.raises(NotFound):
        store.load("pod1")


def test_a_full_disk_keeps_the_last_state_and_says_why(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "kpy", small], check=True)
    try:
        store = Store(small)
        store.create("pod1")
        store.save(_state())
        big = _state()
        big.containers["c1"].mounts = ["/m" * 1000] * 100  # over 64 KiB of JSON
        with pytest.raises(ResourceExhausted, match="cannot save its state: No space left"):
            store.save(big)
        assert store.load("pod1") == _state()  # the last state written, whole
        assert not (small / "sbs" / "pod1" / "state.tmp").exists()
    finally:
        subprocess.run(["umount", small], check=True)


def test_ids_are_checked_before_paths(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for bad in ("../etc", "a/b", ""):
        with pytest.raises(InvalidArgument):
            store.sandbox_dir(bad)
    assert not (tmp_path / "etc").exists()


def test_bad_or_future_state_is_data_loss(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.create("pod1")
    path = store.sandbox_dir("pod1") / "state.json"
    path.write_text("{not json")
    with pytest.raises(DataLoss, match="unreadable"):
        store.load("pod1")
    raw = json.loads(_state().to_json())
    raw["version"] = 99
    path.write_text(json.dumps(raw))
    with pytest.raises(DataLoss, match="version 99"):
        store.load("pod1")


async def test_exclusive_lock_excludes_another_process(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.create("pod1")
    lock = store.sandbox_dir("pod1") / "lock"
    holder = await trio.lowlevel.open_process(
        [sys.executable, "-c",
         "import fcntl,os,sys,time; fd=os.open(sys.argv[1],os.O_RDWR); "
         "fcntl.flock(fd,fcntl.LOCK_SH); print('held',flush=True); time.sleep(30)", str(lock)],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert (await holder.stdout.receive_some(16)).strip() == b"held"
        async with store.locked("pod1", exclusive=False, timeout=1):
            pass  # readers share
        with pytest.raises(DeadlineExceeded, match="lock busy"):
            async with store.locked("pod1", exclusive=True, timeout=0.3):
                pass
    finally:
        holder.kill()
        await holder.wait()
    with trio.fail_after(2):
        async with store.locked("pod1", exclusive=True):
            pass


def test_states_without_start_times_still_load() -> None:
    # Written before start times were recorded: 0, and the exact argv decides (procs.py).
    raw = json.loads(_state().to_json())
    del raw["qemu_start_time"], raw["virtiofsd_start_time"]
    state = SandboxState.from_json(json.dumps(raw), "old")
    assert (state.qemu_pid, state.qemu_start_time, state.virtiofsd_start_time) == (123, 0, 0)
