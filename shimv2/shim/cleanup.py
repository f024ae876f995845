"""``delete``: clean up after a shim daemon that died, from persisted state alone.

containerd runs ``<binary> … -id ID -bundle DIR delete`` (cwd = bundle) when the
shim is gone (cd core/runtime/v2/shim.go ``cleanupAfterDeadShim``) and reads a
protobuf ``DeleteResponse`` from stdout; the runc shim answers 137 (SIGKILL).

The container's sandbox is its CRI ``sandbox-id`` annotation, or itself. A
sandbox's own container (or the last one left) takes the whole sandbox down
(``VirtContainers.cleanup_sandbox``: VM, virtiofsd, mounts, network, state); any
other container only loses its rootfs mounts. ``<bundle>/rootfs`` is unmounted
last. Nothing to clean is not an error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from typing import TYPE_CHECKING

from shimv2.errdefs import Error
from shimv2.shim.bootstrap import (
    SANDBOX_ID,
    can_connect,
    monitor_socket,
    read_annotations,
    read_config_path,
    socket_path,
)
from shimv2.shim.clean_exit import KILLED_STATUS
from shimv2.shim.flags import Flags
from shimv2.vc.config import Config, load_config
from shimv2.vc.ids import sandbox_id
from shimv2.vc.persist import Store
from shimv2.vc.storage import remove_container_dir, unmount_all

if TYPE_CHECKING:
    from shimv2.pb.containerd.runtime.task.v2.shim_pb2 import DeleteResponse

    # The whole of virtcontainers (QEMU, network, agent): imported only when a
    # sandbox has state left to clean, not by every ``delete``.
    from shimv2.vc.api import VirtContainers

log = logging.getLogger(__name__)


def response() -> DeleteResponse:
    from shimv2.pb.containerd.runtime.task.v2.shim_pb2 import DeleteResponse

    resp = DeleteResponse(pid=0, exit_status=KILLED_STATUS)
    resp.exited_at.FromNanoseconds(time.time_ns())
    return resp


def _shim_socket(flags: Flags, sid: str) -> str | None:
    """Where the pod's daemon listens (or listened), as ``start`` chose it."""
    if not flags.address or not flags.namespace:
        return None
    try:
        return socket_path(flags.address, flags.namespace, sid)
    except Error:
        return None


def _shim_alive(flags: Flags, sid: str) -> bool:
    """A daemon still serves the pod: its sandbox is not ours to destroy."""
    path = _shim_socket(flags, sid)
    return path is not None and can_connect(path)


def _remove_dead_socket(path: str | None) -> None:
    """A daemon killed outright leaves its socket files behind, with nobody listening."""
    if path is None:
        return
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode) and not can_connect(path):
            os.unlink(path)
            log.info("delete: removed the dead socket %s", path)


def _monitor_sockets(state_dir: str, *ids: str) -> list[str]:
    """The metrics sockets a daemon of this pod may have had: it is named by its first id."""
    out = []
    for name in dict.fromkeys(ids):
        with contextlib.suppress(Error):
            out.append(monitor_socket(state_dir, sandbox_id(name)))
    return out


async def _forget_container(vc: VirtContainers, sid: str, cid: str) -> bool:
    """Unmount a container's recorded mounts and drop it from the state.

    Returns True when no container of the sandbox is left.
    """
    import trio

    store = vc.store
    async with store.locked(sid, exclusive=True):
        state = store.load(sid)
        container = state.containers.pop(cid, None)
        if container is not None:
            points = list(container.mounts)
            if container.rootfs and container.rootfs not in points:
                points.append(container.rootfs)
            top = store.sandbox_dir(sid)
            failed = await trio.to_thread.run_sync(unmount_all, top, points)
            if not failed:
                await trio.to_thread.run_sync(remove_container_dir, top, cid)
            if failed:
                log.error("delete %s: still mounted: %s", cid, ", ".join(failed))
            store.save(state)
        return not state.containers


def clean(flags: Flags, bundle: str, config: Config | None = None) -> None:
    """Undo what kata-py left for ``flags.id``; errors are logged, never raised.

    Runs after every shim that ends, a clean one included (containerd waits for
    it before ``ctr run --rm`` returns): trio and virtcontainers are loaded only
    when a sandbox has state left to clean.
    """
    cid = flags.id
    try:
        annotations = read_annotations(bundle)
    except Error as exc:
        log.warning("delete %s: %s", cid, exc)
        annotations = {}
    sid = annotations.get(SANDBOX_ID) or cid
    state_dir = None
    try:
        # The file CRI's options named at start, recorded in the bundle; else the default.
        config = config or load_config(read_config_path(bundle))
        state_dir = config.runtime.state_dir
        store = Store(state_dir)
        if sid not in store.list():
            log.debug("delete %s: no kata-py state for sandbox %s", cid, sid)
        elif _shim_alive(flags, sid):
            log.warning("delete %s: the shim of sandbox %s is alive; leaving it", cid, sid)
        else:
            import trio

            trio.run(_clean_sandbox, config, store, sid, cid)
    except Exception:
        log.exception("delete %s: cleaning up sandbox %s failed", cid, sid)
    _remove_dead_socket(_shim_socket(flags, sid))
    for path in _monitor_sockets(state_dir, sid, cid) if state_dir else []:
        _remove_dead_socket(path)
    rootfs = os.path.join(bundle, "rootfs")
    if unmount_all(bundle, [rootfs]):
        log.error("delete %s: could not unmount %s", cid, rootfs)


async def _clean_sandbox(config: Config, store: Store, sid: str, cid: str) -> None:
    import trio

    from shimv2.vc.api import VirtContainers
    from shimv2.vc.tracing import NoTracer

    async with trio.open_nursery() as nursery:
        # NoTracer: nothing in this process sets up a provider to export spans to.
        vc = VirtContainers(nursery, config, store=store, tracer=NoTracer())
        if cid == sid or await _forget_container(vc, sid, cid):
            log.info("delete %s: cleaning up sandbox %s", cid, sid)
            await vc.cleanup_sandbox(sid)


def delete(flags: Flags, config: Config | None = None) -> bytes:
    """Run ``delete``; returns the serialized ``DeleteResponse`` for stdout."""
    clean(flags, flags.bundle or os.getcwd(), config)
    return response().SerializeToString()
