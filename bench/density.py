#!/opt/kata-py/venv/bin/python
"""How many idle pods fit on this host: PSS per pod as pods accumulate, kata-py beside runc.

Through one private containerd (Debian's, or ``--containerd PATH``) and the
locally built busybox image, for each runtime kind in ``--kinds`` in turn
(``cold`` kata-py, kata-py cloned from a ``template`` as bench/factory.py does,
the same with ``warm`` shims, and ``runc``): idle pods (``sleep``) are started
one after the other, each with ``ctr run -d``, and whenever there are as many as
a ``--steps`` entry they settle and are measured:

- PSS (``smaps_rollup``) of every pod's processes (shim, QEMU, virtiofsd,
  vhost-device-vsock; runc: shim and container), the guest's memory apart: its
  RAM (cold: the memfd's Pss in QEMU and the helpers; a clone: its RAM copy on
  the tmpfs, counted whole by allocated blocks), the root image mapped shared
  (DAX) and QEMU's copies of kernel and initrd;
- the shims' RSS, the time ``ctr run -d`` took for the step's last pod, and how
  far the host's MemAvailable fell per pod (what PSS does not see: page tables,
  kernel stacks, slab).

A kind stops early at a limit: when its pods took more than ``--max-memory`` of
the host's memory (by MemAvailable), or one start took longer than
``--max-start`` seconds. Then it extrapolates how many pods would fit: the
host's memory, less what it used before the first pod and less a reserve for
the host itself (``--reserve-gib``), divided by the marginal PSS of a pod
(between the last two steps, so pages the pods share are counted once).

Prints markdown tables (``--json`` for the numbers). About 6 minutes for
``--kinds cold,template,runc --steps 1,5,10,20`` here.

    bench/density.py [--steps 1,5,10,20] [--kinds cold,runc] [--max-memory 0.5]
                     [--max-start 120] [--reserve-gib 2] [--containerd … --ctr …] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

# bench/ is sys.path[0] when a script here runs.
from _common import (
    IMAGE,
    Containerd,
    guest_pss_mib,
    private_containerd,
    processes,
    pss_mib,
    remove_task,
    rss_mib,
    runtimes,
)
from factory import allocated_mib, factory_cli, shim_server, templated_runtime
from pod_cost import pod_roles

from shimv2.vc.config import load_config

KINDS = ("cold", "template", "warm", "runc")
HEADS = {
    "cold": "kata-py",
    "template": "kata-py, template",
    "warm": "kata-py, template + warm shims",
    "runc": "runc",
}
IDLE = ["sleep", "100000"]
SETTLE = 5.0  # seconds after a step's last start: the guests finish booting
RETRIES = 3  # tries of one start (another job's cleanup may kill our shims)
# /proc/meminfo fields shown as where the memory goes beside PSS (kernel-side costs)
KERNEL = ("PageTables", "KernelStack", "SUnreclaim", "Shmem")


@dataclass
class Kinds:
    """The runtime (name or shim path) of each kind, and what the templated ones share."""

    runtimes: dict[str, str]
    clones: Path  # where clones keep their RAM copy, one directory per pod
    template_mib: float  # the template's RAM on the tmpfs, once per node


@contextlib.contextmanager
def runtime_kinds(kinds: Sequence[str], containerd: str) -> Iterator[Kinds]:
    """The runtimes of ``kinds``: a template built (``kata-py factory init``) when a
    templated kind is asked for, and a warm shim server while ``warm`` is."""
    shm = Path("/dev/shm") / f"kpy-bench-{uuid.uuid4().hex[:6]}"
    try:
        with tempfile.TemporaryDirectory(prefix="kpy-kinds-") as tmp:
            config, wrapper = templated_runtime(Path(tmp), shm)
            _, warm = templated_runtime(Path(tmp), shm, f"{tmp}/shims.sock")
            template_mib = 0.0
            if {"template", "warm"} & set(kinds):
                factory_cli(config, "init")
                dirs = (shm / "template").iterdir()
                template_mib = sum(allocated_mib(d) for d in dirs if d.is_dir())
            base = runtimes(containerd)
            every = {
                "cold": base["kata-py"],
                "template": str(wrapper),
                "warm": str(warm),
                "runc": base["runc"],
            }
            server = shim_server(Path(tmp) / "shims.sock") if "warm" in kinds else None
            with server or contextlib.nullcontext():
                yield Kinds({k: every[k] for k in kinds}, shm / "clones", template_mib)
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def meminfo() -> dict[str, float]:
    """/proc/meminfo in MiB."""
    out: dict[str, float] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = int(value.split()[0]) / 1024
    return out


@dataclass
class Step:
    pods: int
    last_start: float  # seconds ``ctr run -d`` took for the step's last pod
    starts: list[float]  # of every pod started in this step
    pss: dict[str, float]  # MiB of all the pods together, by role
    shim_rss: float  # MiB, the mean over the pods' shims
    host: dict[str, float]  # MiB each /proc/meminfo field moved since before the first pod

    def per_pod(self, key: str) -> float:
        return self.pss.get(key, 0.0) / self.pods

    @property
    def avail_drop(self) -> float:
        return -self.host["MemAvailable"]


@dataclass
class KindRun:
    kind: str
    steps: list[Step] = field(default_factory=list)
    stopped_by: str = ""  # the limit that ended it early, if any
    failed_starts: list[str] = field(default_factory=list)
    baseline: dict[str, float] = field(default_factory=dict)  # meminfo before its first pod


def usage(
    names: list[str], kata: bool, clones: Path, boot: tuple[str, ...]
) -> tuple[dict[str, float], list[float]]:
    """PSS (MiB) of the pods' processes by role, the guest's memory apart; the shims' RSS."""
    procs = processes()
    pss: dict[str, float] = {}
    shim_rss: list[float] = []

    def add(role: str, mib: float) -> None:
        pss[role] = pss.get(role, 0.0) + mib

    for name in names:
        copy = clones / name  # a clone's RAM: whole, by blocks (PSS misses untouched pages)
        cloned = copy.is_dir()
        for role, pids in pod_roles(name, procs).items():
            for pid in pids:
                try:
                    guest = guest_pss_mib(pid, boot, (str(copy),)) if kata else {}
                    add(role, pss_mib(pid) - sum(guest.values()))
                    if role == "shim":
                        shim_rss.append(rss_mib(pid))
                except OSError:  # gone meanwhile (another job's cleanup): said by the counts
                    continue
                for kind, mib in guest.items():
                    if not (kind == "guest_ram" and cloned):
                        add(kind, mib)
        if cloned:
            add("guest_ram", allocated_mib(copy))
    pss["total"] = sum(pss.values())
    return pss, shim_rss


def start_pod(cd: Containerd, runtime: str, name: str, timeout: float) -> float:
    """Seconds ``ctr run -d`` of an idle pod took (it returns once the task started)."""
    t0 = time.monotonic()
    cd.ctr("run", "-d", "--runtime", runtime, IMAGE, name, *IDLE, timeout=timeout)
    return time.monotonic() - t0


def grow(
    cd: Containerd,
    kind: str,
    runtime: str,
    args: argparse.Namespace,
    kinds: Kinds,
    boot: tuple[str, ...],
) -> KindRun:
    """Pods of one kind, one after the other, measured at each step until a limit."""
    run = KindRun(kind, baseline=meminfo())
    total = run.baseline["MemTotal"]
    names: list[str] = []
    starts: list[float] = []
    try:
        while len(names) < max(args.steps) and not run.stopped_by:
            for attempt in range(1, RETRIES + 1):
                name = f"d{kind[0]}{len(names)}-{uuid.uuid4().hex[:6]}"
                try:
                    starts.append(start_pod(cd, runtime, name, args.max_start + 60))
                    names.append(name)
                    break
                except (AssertionError, subprocess.TimeoutExpired) as exc:
                    run.failed_starts.append(f"{name}: {str(exc).strip()[:300]}")
                    print(
                        f"density: {kind} pod {name} ({attempt}/{RETRIES}): {exc}",
                        file=sys.stderr,
                        flush=True,
                    )
                    remove_task(cd, name)
            else:
                run.stopped_by = f"{RETRIES} failed starts of pod {len(names) + 1}"
                break
            taken = (run.baseline["MemAvailable"] - meminfo()["MemAvailable"]) / total
            if starts[-1] > args.max_start:
                run.stopped_by = f"pod {len(names)} took {starts[-1]:.1f} s > {args.max_start} s"
            elif taken > args.max_memory:
                run.stopped_by = f"{len(names)} pods took {taken:.0%} of memory"
            if len(names) in args.steps or run.stopped_by:
                time.sleep(SETTLE)
                run.steps.append(measure(names, starts, run, kind != "runc", kinds.clones, boot))
                print(f"density: {kind}: {len(names)} pods measured", file=sys.stderr, flush=True)
        return run
    finally:
        with ThreadPoolExecutor(max_workers=max(1, min(len(names), 10))) as pool:
            list(pool.map(lambda n: remove_task(cd, n), names))


def measure(
    names: list[str],
    starts: list[float],
    run: KindRun,
    kata: bool,
    clones: Path,
    boot: tuple[str, ...],
) -> Step:
    pss, rss = usage(names, kata, clones, boot)
    now = meminfo()
    host = {k: now[k] - run.baseline[k] for k in ("MemAvailable", *KERNEL)}
    earlier = run.steps[-1].pods if run.steps else 0
    return Step(
        len(names),
        starts[-1],
        starts[earlier:],
        pss,
        statistics.mean(rss) if rss else float("nan"),
        host,
    )


@dataclass
class Fit:
    marginal: float  # MiB of PSS one more pod adds
    between: tuple[int, int]  # the steps it was taken between
    by_pss: int  # pods that fit: the host's memory less its own use and the reserve
    by_available: int | None  # the same from MemAvailable's fall (None: lost in the noise)
    worst: int  # by PSS, if every guest touched all of its RAM
    budget: float  # MiB for pods


def fit(run: KindRun, reserve: float, guest_mib: float) -> Fit | None:
    """Pods that fit, extrapolated linearly from the last two steps."""
    if not run.steps:
        return None
    last = run.steps[-1]
    # with one step only, from none: shared pages are then charged to every pod
    first_pods, first_pss, first_drop = (
        (run.steps[-2].pods, run.steps[-2].pss["total"], run.steps[-2].avail_drop)
        if len(run.steps) > 1
        else (0, 0.0, 0.0)
    )
    span = last.pods - first_pods
    marginal = (last.pss["total"] - first_pss) / span
    drop = (last.avail_drop - first_drop) / span
    between = (first_pods, last.pods)
    host_used = run.baseline["MemTotal"] - run.baseline["MemAvailable"]
    budget = run.baseline["MemTotal"] - reserve - host_used
    worst = marginal + max(0.0, guest_mib - last.per_pod("guest_ram")) if guest_mib else marginal

    def pods(per_pod: float, used: float) -> int:
        return last.pods + math.floor((budget - used) / max(per_pod, 0.1))

    # MemAvailable moves with every other job on the host: a runc pod's few MiB drown
    by_available = pods(drop, last.avail_drop) if drop > 0.05 * marginal > 0 else None

    return Fit(
        marginal,
        between,
        pods(marginal, last.pss["total"]),
        by_available,
        pods(worst, last.pss["total"]),
        budget,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps",
        type=lambda v: sorted({int(x) for x in v.split(",")}),
        default=[1, 5, 10, 20],
        metavar="N,…",
        help="pod counts to measure at",
    )
    parser.add_argument(
        "--kinds",
        type=lambda v: v.split(","),
        default=["cold", "runc"],
        metavar="KIND,…",
        help=f"of {', '.join(KINDS)}, in this order",
    )
    parser.add_argument(
        "--max-memory",
        type=float,
        default=0.5,
        help="stop a kind once its pods took this fraction of memory",
    )
    parser.add_argument(
        "--max-start",
        type=float,
        default=120.0,
        help="stop a kind once one start took longer (seconds)",
    )
    parser.add_argument(
        "--reserve-gib",
        type=float,
        default=2.0,
        help="memory left to the host when counting pods that fit",
    )
    parser.add_argument("--containerd", default="/usr/bin/containerd")
    parser.add_argument("--ctr", default="/usr/bin/ctr")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if unknown := set(args.kinds) - set(KINDS):
        parser.error(f"unknown kinds {sorted(unknown)}: of {', '.join(KINDS)}")
    hyp = load_config(None).hypervisor
    boot = (hyp.kernel, hyp.image_initrd, hyp.initrd)
    t0 = time.monotonic()
    with (
        runtime_kinds(args.kinds, args.containerd) as kinds,
        private_containerd(args.containerd, args.ctr) as cd,
    ):
        runs = [grow(cd, k, kinds.runtimes[k], args, kinds, boot) for k in args.kinds]
    seconds = time.monotonic() - t0
    reserve = args.reserve_gib * 1024
    fits = {r.kind: fit(r, reserve, hyp.default_memory if r.kind != "runc" else 0) for r in runs}
    if args.json:
        print(
            json.dumps(
                {
                    "runs": [asdict(r) for r in runs],
                    "template_mib": kinds.template_mib,
                    "fits": {k: asdict(f) if f else None for k, f in fits.items()},
                }
            )
        )
        return 0
    print(report(args, runs, fits, kinds.template_mib, hyp.default_memory, seconds))
    return 0


def report(
    args: argparse.Namespace,
    runs: list[KindRun],
    fits: dict[str, Fit | None],
    template_mib: float,
    guest_mib: int,
    seconds: float,
) -> str:
    version = subprocess.run([args.containerd, "--version"], capture_output=True, text=True)
    total = runs[0].baseline["MemTotal"]
    rows = [
        f"{version.stdout.strip()}; {os.cpu_count()} CPUs; {total / 1024:.1f} GiB; guest RAM "
        f"{guest_mib} MiB; limits: pods may take {args.max_memory:.0%} of memory, a start "
        f"{args.max_start:.0f} s; {seconds / 60:.1f} min"
        + (f"; the template: {template_mib:.0f} MiB on tmpfs, once" if template_mib else ""),
        "",
        "| runtime | pods | `ctr run -d` of the last pod | PSS per pod, MiB | of it guest RAM "
        "| guest image + kernel/initrd | shim + QEMU + virtiofsd + vsock, less guest "
        "| shim RSS, MiB | host MemAvailable fell, per pod |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for s in run.steps:
            ram, guest = s.per_pod("guest_ram"), s.per_pod("guest_image") + s.per_pod("guest_boot")
            own = s.per_pod("total") - ram - guest
            cells = [
                HEADS[run.kind],
                str(s.pods),
                f"{s.last_start:.2f} s",
                f"{s.per_pod('total'):.1f}",
                *((f"{ram:.1f}", f"{guest:.1f}") if run.kind != "runc" else ("-", "-")),
                f"{own:.1f}",
                f"{s.shim_rss:.1f}",
                f"{s.avail_drop / s.pods:.1f}",
            ]
            rows.append(f"| {' | '.join(cells)} |")
    rows += ["", *where_it_goes(runs), "", *fit_table(runs, fits, args.reserve_gib, guest_mib)]
    for run in runs:
        if run.stopped_by:
            rows.append(f"\n{HEADS[run.kind]} stopped early: {run.stopped_by}.")
        if run.failed_starts:
            rows.append(f"\n{HEADS[run.kind]}: {len(run.failed_starts)} failed starts (retried):")
            rows += [f"- `{f}`" for f in run.failed_starts]
    return "\n".join(rows)


def where_it_goes(runs: list[KindRun]) -> list[str]:
    """Per pod at each kind's largest step, by process and guest part, and the kernel's share."""
    last = [(r, r.steps[-1]) for r in runs if r.steps]
    heads = [f"{HEADS[r.kind]}, {s.pods} pods" for r, s in last]
    rows = [
        f"| where the memory goes, MiB per pod | {' | '.join(heads)} |",
        "|---" * (len(heads) + 1) + "|",
    ]
    labels = {
        "shim": "shim (PSS)",
        "qemu": "QEMU, less the guest's memory",
        "guest_ram": "guest RAM (cold: memfd; clone: its copy, whole)",
        "guest_image": "guest root image (shared file, DAX)",
        "guest_boot": "guest kernel and initrd (QEMU's copies)",
        "virtiofsd": "virtiofsd, less guest RAM",
        "vsock": "vhost-device-vsock, less guest RAM",
        "container": "container's processes (on the host)",
        "total": "**PSS total**",
    }
    for role, label in labels.items():
        cells = [f"{s.per_pod(role):.1f}" if role in s.pss else "-" for _, s in last]
        if any(c != "-" for c in cells):
            rows.append(f"| {label} | {' | '.join(cells)} |")
    for key, label in (
        ("PageTables", "kernel: page tables"),
        ("KernelStack", "kernel: stacks"),
        ("SUnreclaim", "kernel: unreclaimable slab"),
        ("Shmem", "host Shmem (memfd, tmpfs: guest RAM again)"),
    ):
        rows.append(f"| {label} | {' | '.join(f'{s.host[key] / s.pods:.1f}' for _, s in last)} |")
    cells = [f"{s.avail_drop / s.pods:.1f}" for _, s in last]
    rows.append(f"| **host MemAvailable fell** | {' | '.join(cells)} |")
    return rows


def fit_table(
    runs: list[KindRun], fits: dict[str, Fit | None], reserve_gib: float, guest_mib: int
) -> list[str]:
    rows = [
        "| pods that fit | marginal PSS per pod | by PSS | by MemAvailable's fall "
        f"| by PSS, every guest using its {guest_mib} MiB |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        if (f := fits.get(run.kind)) is None:
            continue
        a, b = f.between
        rows.append(
            f"| {HEADS[run.kind]} | {f.marginal:.1f} MiB (from {a} to {b} pods) | **{f.by_pss}** "
            f"| {'-' if f.by_available is None else f.by_available} "
            f"| {f.worst if run.kind != 'runc' else '-'} |"
        )
    budget = next((f.budget for f in fits.values() if f), 0.0)
    rows.append(
        f"\nPods that fit: {budget / 1024:.1f} GiB for pods (the host's memory less what it used "
        f"before the first pod and a {reserve_gib:g} GiB reserve for the host: kubelet, "
        "containerd, the system, an eviction threshold), divided by the marginal PSS of a pod "
        "(the slope between the last two steps: pages the pods share count once), extrapolated "
        "linearly from the largest step measured."
    )
    return rows


if __name__ == "__main__":
    sys.exit(main())
