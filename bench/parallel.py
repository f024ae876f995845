#!/opt/kata-py/venv/bin/python
"""Pods started at once, through ``ctr run -d`` and through CRI, kata-py beside runc.

``--pods`` pods at once (default 20), one thread each, for each runtime kind in
``--kinds`` (``cold`` kata-py, ``template`` clones and ``warm`` shims as in
bench/density.py, and ``runc``) and each way in ``--via``:

- ``ctr``: ``ctr run -d`` of busybox with a token of its own in its environment,
  its output to a file (``--log-uri file://``);
- ``cri``: ``crictl runp``, ``create``, ``start`` (a CNI bridge, the locally
  built pause image and one handler per kind, as tests/e2e/test_cri.py sets up),
  crictl's request timeout ``--cri-timeout`` (the kubelet's default, 120 s).

A pod is ready once its container printed its token. Then an exec in every
pod, all at once, prints the token again. Every pod must start, with no
timeout, and each log and exec output must be exactly its own token (no crossed
streams): ``tests/e2e/test_parallel.py`` does the work, and checks a few pods in
CI. Reports the time until the last pod was ready and the ratio to runc; for a
failed pod, containerd's log lines about it (with the shim's, which containerd
copies there) and the tail of its VM console, on stderr. Once the pods are
removed, any kata-py shim, VM process or state (sandbox, monitor socket, clone) still there after a
minute is listed, and fails the run as a failed pod does.

    bench/parallel.py [--pods 20] [--via ctr,cri] [--kinds cold,runc] [--config FILE]
                      [--containerd … --ctr …] [--cri-timeout 120] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

# bench/ is sys.path[0] when a script here runs.
from _common import Containerd, private_containerd
from density import HEADS, KINDS, runtime_kinds

from tests.e2e.conftest import IMAGE, processes_left, state_left
from tests.e2e.test_cri import (
    PAUSE,
    PAUSE_ENTRYPOINT,
    cni_conflist,
    cri_config,
    remove_cri_containerd,
)
from tests.e2e.test_parallel import AtOnce, PatientCri, cri_at_once, ctr_at_once

READY_TIMEOUT = 900.0  # seconds for a `ctr` call or a pod's first output: the bound of a run
LEFT_TIMEOUT = 60.0  # seconds for the last shim and VM to go once every pod is removed


@contextlib.contextmanager
def cri_containerd(
    containerd: str, ctr: str, handlers: dict[str, str], env: dict[str, str]
) -> Iterator[Containerd]:
    """A containerd with CRI on, a CNI bridge and ``handlers`` (name: runtime type)."""
    base = Path(f"/run/kpy-bench-{uuid.uuid4().hex[:6]}")
    (base / "cni").mkdir(parents=True)
    (base / "cni" / "10-kpy.conflist").write_text(json.dumps(cni_conflist()))
    runtimes = "".join(
        f'  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{name}]\n'
        f'    runtime_type = "{runtime}"\n'
        for name, runtime in handlers.items()
    )
    # The sandbox's oom_score_adj (-998) is clamped to containerd's own: this host lacks
    # CAP_SYS_RESOURCE, without which runc cannot lower it and fails to start the pause.
    config = cri_config(base).replace(
        "sandbox_image", "restrict_oom_score_adj = true\n  sandbox_image"
    )
    cd = Containerd(containerd, ctr, base, cri_config=config + runtimes, env=env)
    try:
        cd.start()
        cd.import_image(IMAGE, namespace="k8s.io")
        cd.import_image(PAUSE, PAUSE_ENTRYPOINT, namespace="k8s.io")
        yield cd
    finally:
        remove_cri_containerd(cd, base)


def evidence(cd: Containerd, run: AtOnce, state_dir: Path) -> None:
    """Why pods failed, on stderr, while they are still there: containerd's log lines
    naming each, its errors and what the shims wrote there (a traceback names no pod),
    and each VM console's last lines."""
    log = cd.log.read_text(errors="replace").splitlines() if cd.log.exists() else []
    failed = [p for p in run.pods if p.error or p.ready is None]
    for pod in failed:
        ids = {i for i in (pod.name, pod.sandbox, pod.container) if i}
        print(f"--- {pod.name}: {pod.error.strip()[:600]}", file=sys.stderr)
        for line in [ln for ln in log if any(i in ln for i in ids)][-15:]:
            print(f"containerd: {line[:400]}", file=sys.stderr)
        for vm in ids:
            console = state_dir / "vm" / vm / "console.log"
            if console.exists():
                tail = console.read_text(errors="replace").splitlines()[-5:]
                print("\n".join(f"console: {ln[:300]}" for ln in tail), file=sys.stderr)
    if failed:
        odd = [ln for ln in log if "level=error" in ln or not ln.startswith("time=")]
        print("\n".join(f"containerd: {ln[:400]}" for ln in odd[-60:]), file=sys.stderr)


def kata_py_left() -> list[str]:
    """kata-py shims, VM processes and states on the host (what the e2e suite checks)."""
    return processes_left() + state_left()


def left_after(before: list[str], timeout: float = LEFT_TIMEOUT) -> list[str]:
    """What a run left beyond ``before``, once given ``timeout`` to go."""
    deadline = time.monotonic() + timeout
    while (left := sorted(set(kata_py_left()) - set(before))) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@dataclass
class Summary:
    last_ready: float  # seconds from the start of all until the last pod printed its token
    median_ready: float
    ready: int
    failures: list[str]
    left: list[str]  # shims, VM processes and sandboxes still there after the pods' removal

    @classmethod
    def of(cls, run: AtOnce, left: list[str]) -> Summary:
        ready = [p.ready for p in run.pods if p.ready is not None]
        median = statistics.median(ready) if ready else float("nan")
        return cls(run.last_ready, median, len(ready), run.failures(), left)


def at_once(via: str, cd: Containerd, kind: str, runtime: str, args: argparse.Namespace) -> Summary:
    """``--pods`` pods of one kind at once, one way; the failures' evidence on stderr."""
    print(f"parallel: {args.pods} {kind} pods via {via}", file=sys.stderr, flush=True)
    before = kata_py_left()
    with tempfile.TemporaryDirectory(prefix="kpy-parallel-") as tmp:
        if via == "ctr":
            pods = ctr_at_once(cd, runtime, args.pods, Path(tmp), READY_TIMEOUT)
        else:
            cri = PatientCri(cd, args.cri_timeout)
            pods = cri_at_once(cri, f"bench-{kind}", args.pods, Path(tmp), READY_TIMEOUT)
        with pods as run:
            if run.failures():
                evidence(cd, run, Path("/run/kata-py"))
        # Removed by now (ctr_at_once and cri_at_once remove their pods on the way out).
        left = left_after(before)
        if left:
            print("left after removal:\n  " + "\n  ".join(left), file=sys.stderr)
        return Summary.of(run, left)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=20)
    parser.add_argument("--via", type=lambda v: v.split(","), default=["ctr", "cri"])
    parser.add_argument(
        "--kinds", type=lambda v: v.split(","), default=["cold", "runc"], metavar="KIND,…"
    )
    parser.add_argument("--containerd", default="/usr/bin/containerd")
    parser.add_argument("--ctr", default="/usr/bin/ctr")
    parser.add_argument("--cri-timeout", type=float, default=120.0, help="crictl's, seconds")
    parser.add_argument(
        "--config",
        help="a kata-py configuration.toml for the cold pods (the templated "
        "kinds read their own), e.g. a longer [agent.kata] dial_timeout",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if unknown := set(args.kinds) - set(KINDS):
        parser.error(f"unknown kinds {sorted(unknown)}: of {', '.join(KINDS)}")
    os.environ["PATH"] = f"/usr/local/bin:{os.environ.get('PATH', '')}"
    env = {"KATA_PY_CONFIG": str(Path(args.config).resolve())} if args.config else {}
    results: dict[str, dict[str, Summary]] = {}
    with runtime_kinds(args.kinds, args.containerd) as kinds:
        if "ctr" in args.via:
            with private_containerd(args.containerd, args.ctr, env) as cd:
                results["ctr"] = {
                    k: at_once("ctr", cd, k, r, args) for k, r in kinds.runtimes.items()
                }
        if "cri" in args.via:
            handlers = {f"bench-{k}": r for k, r in kinds.runtimes.items()}
            with cri_containerd(args.containerd, args.ctr, handlers, env) as cd:
                results["cri"] = {
                    k: at_once("cri", cd, k, r, args) for k, r in kinds.runtimes.items()
                }
    if args.json:
        print(json.dumps({w: {k: asdict(r) for k, r in by.items()} for w, by in results.items()}))
    else:
        print(report(args, results))
    bad = any(r.failures or r.left for way in results.values() for r in way.values())
    return 1 if bad else 0


def report(args: argparse.Namespace, results: dict[str, dict[str, Summary]]) -> str:
    version = subprocess.run([args.containerd, "--version"], capture_output=True, text=True)
    kinds = list(args.kinds)
    ways = {"ctr": "`ctr run -d`", "cri": "CRI `runp` + `create` + `start`"}
    rows = [
        f"{version.stdout.strip()}; {os.cpu_count()} CPUs; {args.pods} pods at once; "
        f"crictl request timeout {args.cri_timeout:.0f} s"
        + (f"; cold pods: {Path(args.config).read_text().strip()!r}" if args.config else ""),
        "",
        f"| {args.pods} pods at once | {' | '.join(HEADS[k] for k in kinds)} |",
        "|---" * (len(kinds) + 1) + "|",
    ]
    for via, by_kind in results.items():
        runc = by_kind["runc"].last_ready if "runc" in by_kind else 0.0  # no ratio without runc
        last = [
            f"{by_kind[k].last_ready:.1f} s"
            + (f" ({by_kind[k].last_ready / runc:.0f}x runc)" if k != "runc" and runc else "")
            for k in kinds
        ]
        median = [f"{by_kind[k].median_ready:.1f} s" for k in kinds]
        ok = [f"{by_kind[k].ready}/{args.pods}, {len(by_kind[k].failures)} failed" for k in kinds]
        left = [str(len(by_kind[k].left)) for k in kinds]
        rows += [
            f"| {ways[via]}: until the last pod was ready | {' | '.join(last)} |",
            f"| {ways[via]}: median pod ready | {' | '.join(median)} |",
            f"| {ways[via]}: ready, printing only their own token | {' | '.join(ok)} |",
            f"| {ways[via]}: shims, VM processes, sandboxes left after removal "
            f"| {' | '.join(left)} |",
        ]
    failures = [
        f"- {via} {kind}: {f}"
        for via, by_kind in results.items()
        for kind, r in by_kind.items()
        for f in r.failures
    ]
    return "\n".join(rows + (["", *failures] if failures else []))


if __name__ == "__main__":
    sys.exit(main())
