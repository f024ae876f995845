"""Pods started at once, through ``ctr`` and through CRI: all start, and no streams cross.

Each pod's container has a token of its own in its environment and prints it
first; afterwards an exec in every pod, all at once, prints it again. Each log
and each exec's output must be exactly its own token. ``bench/parallel.py``
runs the same with 20 pods, beside runc, and times it.

Bounded for CI: a few cold pods on one containerd each way, as a node would
see a burst of pods scheduled together.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.conftest import IMAGE, RUNTIME, VERSIONS, Containerd, _version_id
from tests.e2e.test_cri import (
    CRI_VERSIONS,
    CRICTL,
    HANDLER,
    Cri,
    _cri_id,
    container_config,
    cri,
    cri_containerd,
    pod_config,
)
from tests.e2e.test_ctr import remove

pytestmark = pytest.mark.vm
__all__ = ["cri", "cri_containerd"]  # the fixtures, used by name

CTR_PODS = 4
CRI_PODS = 3
# Seconds for a pod to be ready with others starting beside it on 2 CPUs under
# TCG: a cold pod alone takes ~7 s; twenty at once share the CPUs.
READY_TIMEOUT = 600.0
# Prints the token, then idles; an exec of ECHO prints it again from the same
# environment (ctr and CRI give an exec the container's env).
SCRIPT = "echo $TOKEN; exec sleep 100000"
ECHO = ["sh", "-c", "echo $TOKEN"]


@dataclass
class Pod:
    name: str
    token: str = field(default_factory=lambda: f"tok-{uuid.uuid4().hex}")
    ready: float | None = None  # seconds after all were started, once its token was logged
    log: str = ""  # what its container printed (CRI: the messages of its log lines)
    exec_out: str | None = None
    error: str = ""
    sandbox: str = ""  # CRI's pod sandbox id
    container: str = ""  # CRI's container id


@dataclass
class AtOnce:
    """Pods started at once: when each was ready, and what each printed."""

    pods: list[Pod]

    @property
    def last_ready(self) -> float:
        times = [p.ready for p in self.pods]
        return max(t for t in times if t is not None) if any(times) else float("nan")

    def failures(self) -> list[str]:
        """Why any pod failed or saw another's output (none: all well)."""
        out: list[str] = []
        for p in self.pods:
            if p.error:
                out.append(f"{p.name}: {p.error.strip()[-500:]}")
            elif p.log != f"{p.token}\n":
                out.append(f"{p.name}: logged {p.log[:200]!r}, want its token {p.token}")
            # crictl ends an exec's output with blank lines of its own: lines are compared
            elif p.exec_out is not None and p.exec_out.split() != [p.token]:
                out.append(f"{p.name}: exec printed {p.exec_out[:200]!r}, want {p.token}")
        return out


def _wait_logged(path: Path, t0: float, deadline: float, parse: Callable[[str], str]) -> float:
    """Seconds after ``t0`` when ``path`` first held a whole line."""
    while True:
        with contextlib.suppress(OSError):
            if parse(path.read_text(errors="replace")).endswith("\n"):
                return time.monotonic() - t0
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing logged in {path} within {deadline - t0:.0f} s")
        time.sleep(0.05)


def _all_at_once(pods: list[Pod], start: Callable[[Pod], None], echo: Callable[[Pod], str]) -> None:
    """``start`` every pod at once (errors kept in the pod), then ``echo`` in every ready one."""

    def guarded(step: Callable[[Pod], None]) -> Callable[[Pod], None]:
        def run(p: Pod) -> None:
            try:
                step(p)
            except (AssertionError, OSError, TimeoutError, subprocess.SubprocessError) as exc:
                p.error = f"{type(exc).__name__}: {exc}"

        return run

    def echo_into(p: Pod) -> None:
        if not p.error:
            p.exec_out = echo(p)

    with ThreadPoolExecutor(max_workers=len(pods)) as pool:
        list(pool.map(guarded(start), pods))
        list(pool.map(guarded(echo_into), pods))


@contextlib.contextmanager
def ctr_at_once(
    cd: Containerd, runtime: str, count: int, logs: Path, timeout: float = READY_TIMEOUT
) -> Iterator[AtOnce]:
    """``count`` ``ctr run -d`` at once, each pod's output in a file; removed afterwards."""
    pods = [Pod(f"par{i}-{uuid.uuid4().hex[:6]}") for i in range(count)]
    t0 = time.monotonic()

    def start(p: Pod) -> None:
        out = logs / f"{p.name}.log"
        cd.ctr("run", "-d", "--runtime", runtime, "--env", f"TOKEN={p.token}",
               "--log-uri", f"file://{out}", IMAGE, p.name, "sh", "-c", SCRIPT,
               timeout=timeout)  # fmt: skip
        p.ready = _wait_logged(out, t0, t0 + timeout, str)
        p.log = out.read_text(errors="replace")

    def echo(p: Pod) -> str:
        return cd.ctr("task", "exec", "--exec-id", "echo", p.name, *ECHO, timeout=timeout).stdout

    try:
        _all_at_once(pods, start, echo)
        yield AtOnce(pods)
    finally:
        with ThreadPoolExecutor(max_workers=count) as pool:
            list(pool.map(lambda p: remove(cd, p.name), pods))


def cri_messages(text: str) -> str:
    """The output in a CRI log file: each line's message after ``TIME STREAM TAG``."""
    return "".join(
        parts[3] + "\n" for line in text.splitlines() if len(parts := line.split(" ", 3)) == 4
    )


class PatientCri(Cri):
    """crictl with a request timeout of our choosing (``Cri`` gives each request 120 s,
    the kubelet's default ``--runtime-request-timeout`` too)."""

    def __init__(self, containerd: Containerd, request_timeout: float) -> None:
        super().__init__(containerd)
        self.request_timeout = request_timeout

    def __call__(self, *args: str, timeout: float = 180) -> str:
        out = subprocess.run(
            [str(CRICTL), "--runtime-endpoint", self.endpoint, "--image-endpoint", self.endpoint,
             "--timeout", f"{self.request_timeout:.0f}s", *args],
            capture_output=True, text=True, timeout=max(timeout, self.request_timeout + 30),
        )  # fmt: skip
        if out.returncode != 0:
            raise AssertionError(f"crictl {' '.join(args)}: rc {out.returncode}: {out.stderr}")
        return out.stdout


@contextlib.contextmanager
def cri_at_once(
    cri: Cri, handler: str, count: int, logs: Path, timeout: float = READY_TIMEOUT
) -> Iterator[AtOnce]:
    """``count`` pods at once through CRI (``runp``, ``create``, ``start``), one container
    each; stopped and removed afterwards."""
    pods = [Pod(f"par{i}-{uuid.uuid4().hex[:6]}") for i in range(count)]
    t0 = time.monotonic()

    def start(p: Pod) -> None:
        config = pod_config(p.name, logs)
        pod_json = cri.write("pod", config)
        p.sandbox = cri("runp", "--runtime", handler, pod_json, timeout=timeout).strip()
        app = container_config(p.name, "sh", "-c", SCRIPT)
        app["envs"] = [{"key": "TOKEN", "value": p.token}]
        p.container = cri("create", p.sandbox, cri.write("app", app), pod_json, timeout=timeout)
        p.container = p.container.strip()
        cri("start", p.container, timeout=timeout)
        log = logs / f"{app['metadata']['name']}.log"
        p.ready = _wait_logged(log, t0, t0 + timeout, cri_messages)
        p.log = cri_messages(log.read_text(errors="replace"))

    def echo(p: Pod) -> str:
        return cri("exec", "--sync", p.container, *ECHO, timeout=timeout)

    def remove_pod(p: Pod) -> None:
        if p.sandbox:
            cri("stopp", p.sandbox, timeout=timeout)
            cri("rmp", p.sandbox, timeout=timeout)

    try:
        _all_at_once(pods, start, echo)
        yield AtOnce(pods)
    finally:
        with ThreadPoolExecutor(max_workers=count) as pool:
            list(pool.map(remove_pod, pods))
        # a sandbox whose runp failed midway has no id here: remove whatever is left
        for sandbox in cri("pods", "-q").split():
            with contextlib.suppress(AssertionError):
                cri("stopp", sandbox, timeout=timeout)
                cri("rmp", sandbox, timeout=timeout)


# The newest containerd (Task v3, its own shim address per container) over ctr;
# CRI on Debian's 1.6, where every container goes through the shim's `start`.
@pytest.mark.parametrize("containerd", [VERSIONS[3]], indirect=True, ids=_version_id)
def test_pods_started_at_once_through_ctr_print_only_their_own(
    cd: Containerd, tmp_path: Path
) -> None:
    with ctr_at_once(cd, RUNTIME, CTR_PODS, tmp_path) as run:
        assert run.failures() == []
        assert len({p.token for p in run.pods}) == CTR_PODS
        tasks = cd.ctr("task", "ls").stdout
        assert all(f"{p.name} " in tasks for p in run.pods), tasks


@pytest.mark.parametrize("cri_containerd", [CRI_VERSIONS[0]], indirect=True, ids=_cri_id)
def test_pods_started_at_once_through_cri_print_only_their_own(cri: Cri, tmp_path: Path) -> None:
    with cri_at_once(cri, HANDLER, CRI_PODS, tmp_path) as run:
        assert run.failures() == []
        sandboxes = json.loads(cri("pods", "-o", "json"))["items"]
        ready = [s["id"] for s in sandboxes if s["state"] == "SANDBOX_READY"]
        assert sorted(ready) == sorted(p.sandbox for p in run.pods)
