"""The pod's own mount namespace, where the shim keeps the pod's tree of mounts.

Why not the host's: Linux refuses to remove a directory that is a mount point
in the caller's own namespace (EBUSY), and detaches the mounts of other
namespaces instead. The shim's copy of a hostPath with a submount makes the
submount's directory such a mount point, so the host could not remove its own
directory while the pod runs. runc's copies live in the container's namespace,
and ours now live in the pod's. A side effect: no mount outlives the pod, since
the namespace and its mounts go with the last process in it.

One thread of the shim enters the namespace and keeps it for the pod's life:
a thread may change its mount namespace only once it no longer shares its
filesystem attributes (``CLONE_FS``) with the rest of the process. Every mount
call of the pod's storage runs on that thread. Host paths (bind sources) are
opened from the host's namespace, on the same thread, through ``host()``, so
mounts the host makes after the pod started are seen. The namespace is a slave
of the host's: unmounts on the host reach it, and nothing mounted in it leaks
back. virtiofsd joins it (``nsenter_argv(path)``) to export the tree. A cached
VM comes with its share made in a namespace of the cache server's, held by its
virtiofsd: the shim joins that one (``join``) and keeps the pod's tree there.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import trio

from shimv2.errdefs import Internal
from shimv2.vc import linux

CLONE_FS = 0x200
CLONE_NEWNS = 0x20000
NSENTER = "/usr/bin/nsenter"

T = TypeVar("T")
_Job = tuple[Callable[[], Any], "Future[Any]"]


def nsenter_argv(path: str) -> list[str]:
    """The command prefix that runs the rest in the mount namespace at ``path``."""
    return [NSENTER, f"--mount={path}", "--"]


def _ns_call(name: str, result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


class MountNamespace:
    """A mount namespace of the pod's, entered by one thread of ours that runs its calls."""

    def __init__(self, join_fd: int = -1) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._host_fd = os.open("/proc/thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        self._join_fd = join_fd
        self._ns_fd = -1
        self._tid = 0
        self._broken = False
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._started: Future[None] = Future()
        self._thread = threading.Thread(target=self._serve, name="pod-mount-ns", daemon=True)

    @classmethod
    def create(cls) -> MountNamespace:
        """A new namespace, a slave copy of the caller's; blocks until it is entered."""
        return cls()._enter("make")

    @classmethod
    def join(cls, fd: int) -> MountNamespace:
        """The namespace open at ``fd`` (taken over), made by another process: a cached VM's."""
        return cls(fd)._enter("join")

    def _enter(self, verb: str) -> MountNamespace:
        self._thread.start()
        try:
            self._started.result()
        except OSError as exc:
            self._thread.join()
            os.close(self._host_fd)
            raise Internal(f"cannot {verb} the pod's mount namespace: {exc}") from None
        finally:
            if self._join_fd >= 0:
                os.close(self._join_fd)
        return self

    @property
    def path(self) -> str:
        """The namespace's file while it is open, for a child to join (``nsenter``)."""
        return f"/proc/{os.getpid()}/task/{self._tid}/ns/mnt"

    def _serve(self) -> None:
        try:
            if self._join_fd >= 0:
                _ns_call("unshare", self._libc.unshare(CLONE_FS))
                _ns_call("setns", self._libc.setns(self._join_fd, CLONE_NEWNS))
            else:
                _ns_call("unshare", self._libc.unshare(CLONE_FS | CLONE_NEWNS))
                linux.mount(None, "/", None, linux.MS_REC | linux.MS_SLAVE)
            self._ns_fd = os.open("/proc/thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            self._tid = threading.get_native_id()
        except OSError as exc:
            self._started.set_exception(exc)
            return
        self._started.set_result(None)
        while (job := self._jobs.get()) is not None:
            fn, future = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed to the caller, whatever it is
                    future.set_exception(exc)
        # The OS thread outlives join() for a moment; leaving now means close()'s
        # fd is the namespace's last hold, so its mounts go before close() returns.
        if self._libc.setns(self._host_fd, CLONE_NEWNS) != 0:
            self._broken = True

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the namespace's thread and wait for it (blocks: from a worker thread)."""
        if self._ns_fd < 0 or self._broken:
            raise Internal("the pod's mount namespace is closed")
        future: Future[T] = Future()
        self._jobs.put((lambda: fn(*args, **kwargs), future))
        return future.result()

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await trio.to_thread.run_sync(lambda: self.call(fn, *args, **kwargs))

    @contextlib.contextmanager
    def host(self) -> Iterator[None]:
        """On the namespace's thread: be in the host's namespace for a moment (host paths)."""
        if threading.get_native_id() != self._tid:
            raise Internal("host() is only for calls on the pod's mount namespace thread")
        _ns_call("setns", self._libc.setns(self._host_fd, CLONE_NEWNS))
        try:
            yield
        finally:
            back = self._libc.setns(self._ns_fd, CLONE_NEWNS)
            if back != 0:
                self._broken = True  # never mount the pod's tree in the host's namespace
            _ns_call("setns", back)

    def close(self) -> None:
        """Let go of the namespace; its mounts go once no process is left in it either."""
        if self._ns_fd < 0:
            return
        self._jobs.put(None)
        self._thread.join()
        os.close(self._ns_fd)
        os.close(self._host_fd)
        self._ns_fd = -1
