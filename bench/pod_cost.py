#!/opt/kata-py/venv/bin/python
"""What a pod costs: start time, memory and idle CPU, kata-py beside runc in one run.

Through a private containerd (Debian's, or ``--containerd PATH``) and the
locally built busybox image:

1. ``ctr run --rm`` of busybox ``true``, N times each, alternating kata-py and
   the runc shim of the same containerd, after one warm-up run of each;
2. one idle pod (``sh -c 'cat /proc/uptime; exec sleep …'``), then more up to
   ``--pods``, started one after the other: for each kata-py pod, when QEMU was
   spawned, when the guest reached init and the agent (the ``KATA_PY_INIT`` and
   ``KATA_PY_AGENT_READY`` lines on its console) and when the container ran (its
   first output, through ``--log-uri file://``), as seen from the host;
3. whenever 1, ``--pods`` (and each ``--at``) pods run and have settled: PSS
   (``smaps_rollup``) of each pod's processes, the guest's memory apart (the
   Pss of QEMU's and virtiofsd's mappings of the memfd guest RAM, and of the
   root image mapped shared), and their CPU time (utime+stime) over ``--idle``
   seconds. The same for runc pods.

A start that fails (on a shared host another job may kill our shims) is said on
stderr and tried again, up to 3 times.

Prints a markdown table (``--json`` for the numbers). ``--set KEY=VALUE``
writes a ``[hypervisor.qemu]`` configuration for this run only (for instance
``--set tcg_tb_size=64``); ``--config FILE`` names a whole one. ``--ksm`` turns
the host's KSM on for the run (and back as it was), scanning faster, and waits
for two full scans before measuring memory. PSS divides shared pages between
every process mapping them: VMs of others running meanwhile lower our share.

    bench/pod_cost.py [-n 5] [--pods 10] [--at 2,5] [--containerd … --ctr …] [--set K=V …]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

# bench/ is sys.path[0] when a script here runs.
from _common import (
    IMAGE,
    Containerd,
    Proc,
    cpu_seconds,
    guest_pss_mib,
    ksm_mib,
    private_containerd,
    processes,
    pss_mib,
    remove_task,
    runtimes,
)

from shimv2.vc.config import HypervisorConfig, load_config

IDLE_SCRIPT = "cat /proc/uptime; exec sleep 100000"
MARKERS = {"guest_init": "KATA_PY_INIT uptime=", "agent_ready": "KATA_PY_AGENT_READY uptime="}
START_TIMEOUT = 180.0  # seconds for one pod to start, on a busy 2-CPU host under TCG
RETRIES = 3  # tries of one start before the run gives up
SETTLE = 5.0  # seconds between the last start and measuring: the guests finish booting
KSM = Path("/sys/kernel/mm/ksm")
# The kata-py processes of a pod, and the runc ones (a container's run on the host).
KATA_ROLES = ("shim", "qemu", "guest_ram", "guest_image", "guest_boot", "virtiofsd", "vsock")
RUNC_ROLES = ("shim", "container")


@dataclass
class Start:
    """When a pod's start reached each point, seconds after ``ctr run -d`` began."""

    wall: dict[str, float] = field(default_factory=dict)
    uptime: dict[str, float] = field(default_factory=dict)  # the guest's clock
    qemu_argv: tuple[str, ...] = ()


@dataclass
class Usage:
    """PSS (MiB) and CPU seconds of some pods' processes, by role."""

    pods: int
    pss: dict[str, float]
    cpu: dict[str, float]
    seconds: float
    ksm: float = 0.0  # MiB the pods map of pages KSM merged (within their PSS)

    def per_pod(self, role: str) -> float:
        return self.pss[role] / self.pods

    def cpu_percent(self, role: str) -> float:
        """Of one CPU, per pod."""
        return 100 * self.cpu[role] / self.seconds / self.pods


def timed_run(cd: Containerd, runtime: str) -> float:
    """One ``ctr run --rm``; a failed run is retried (and said on stderr), not timed."""
    for attempt in range(1, RETRIES + 1):
        name = f"b{uuid.uuid4().hex[:8]}"
        t0 = time.monotonic()
        try:
            cd.ctr("run", "--rm", "--runtime", runtime, IMAGE, name, "true")
            return time.monotonic() - t0
        except AssertionError as exc:
            _failed(f"ctr run --rm ({attempt}/{RETRIES})", exc)
            remove_task(cd, name)
    raise RuntimeError(f"ctr run --rm failed {RETRIES} times")


def alternating_runs(cd: Containerd, runtimes: dict[str, str], n: int) -> dict[str, list[float]]:
    """``timed_run`` of each runtime n times, taking turns, after one warm-up run of each
    (page cache, the accelerator probe)."""
    for runtime in runtimes.values():
        timed_run(cd, runtime)
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    for _ in range(n):
        for name, runtime in runtimes.items():
            times[name].append(timed_run(cd, runtime))
    return times


def _failed(what: str, exc: Exception) -> None:
    # On a shared host another job's cleanup may kill our shims: say so, go on.
    print(f"pod_cost: {what}: {str(exc).strip()[:300]}", file=sys.stderr, flush=True)


def _uptime_after(text: str, marker: str) -> float | None:
    at = text.find(marker)
    if at < 0:
        return None
    word = text[at + len(marker) :].split(None, 1)
    try:
        return float(word[0]) if word else None
    except ValueError:
        return None


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def start_pod(cd: Containerd, runtime: str, name: str, logs: Path, vm_root: Path) -> Start:
    """``ctr run -d`` an idle pod, watching its console and output as it starts.

    The host sees a console line or the container's output within the 10 ms
    of a poll (plus the shim's relay); the guest's uptime of each is exact.
    """
    console, out = vm_root / name / "console.log", logs / f"{name}.log"
    argv = [cd.ctr_binary, "-a", cd.socket, "run", "-d", "--runtime", runtime]
    argv += ["--log-uri", f"file://{out}", IMAGE, name, "sh", "-c", IDLE_SCRIPT]
    boot0 = time.clock_gettime(time.CLOCK_BOOTTIME)
    t0 = time.monotonic()
    ctr = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kata = runtime.endswith("kata-py.v2")
    wanted = {"ctr_returned", *(("container", *MARKERS) if kata else ())}
    start = Start()
    while not wanted <= start.wall.keys():
        now = time.monotonic() - t0
        if now > START_TIMEOUT:
            ctr.kill()
            raise RuntimeError(f"pod {name} did not start within {START_TIMEOUT:.0f} s")
        text = _read(console)
        for key, marker in MARKERS.items():
            if key not in start.wall and (up := _uptime_after(text, marker)) is not None:
                start.wall[key], start.uptime[key] = now, up
        if "container" not in start.wall and (first := _read(out)).endswith("\n"):
            start.wall["container"] = now
            with contextlib.suppress(ValueError, IndexError):
                start.uptime["container"] = float(first.split()[0])
        if "ctr_returned" not in start.wall and ctr.poll() is not None:
            start.wall["ctr_returned"] = now
            if ctr.returncode != 0:
                raise RuntimeError(f"ctr run {name}: {ctr.stderr.read() if ctr.stderr else ''}")
        time.sleep(0.01)
    qemu = [p for p in processes().values() if _is_qemu_of(p, name)]
    if qemu:
        start.wall["qemu_spawned"] = _started_at(qemu[0].pid) - boot0
        start.qemu_argv = qemu[0].argv
    return start


def _is_qemu_of(proc: Proc, name: str) -> bool:
    return bool(proc.argv) and "qemu-system" in proc.argv[0] and f"kata-py-{name}" in proc.argv


def _started_at(pid: int) -> float:
    """A process's start, on CLOCK_BOOTTIME (clock ticks: 10 ms here)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")


def pod_roles(name: str, procs: dict[int, Proc]) -> dict[str, list[int]]:
    """A pod's processes: its shim (``-id NAME``) and everything below it, by role."""
    shims = [
        p.pid
        for p in procs.values()
        if any("containerd-shim" in a for a in p.argv[:3])
        and any(a == "-id" and b == name for a, b in zip(p.argv, p.argv[1:], strict=False))
        and "start" not in p.argv
    ]
    roles: dict[str, list[int]] = {"shim": shims}
    children: dict[int, list[Proc]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p)
    todo = list(shims)
    while todo:
        for child in children.get(todo.pop(), []):
            exe = Path(child.argv[0]).name if child.argv else ""
            role = "qemu" if exe.startswith("qemu-system") else exe
            role = {"vhost-device-vsock": "vsock"}.get(role, role)
            role = role if role in ("qemu", "virtiofsd", "vsock") else "container"
            roles.setdefault(role, []).append(child.pid)
            todo.append(child.pid)
    return roles


def measure(names: list[str], idle: float, kata: bool, boot_files: tuple[str, ...]) -> Usage:
    """PSS by role now, and CPU time by role over the next ``idle`` seconds."""
    procs = processes()
    pids = [
        (role, pid) for name in names for role, ps in pod_roles(name, procs).items() for pid in ps
    ]
    pss = dict.fromkeys(KATA_ROLES if kata else RUNC_ROLES, 0.0)
    for role, pid in pids:
        guest = guest_pss_mib(pid, boot_files) if kata else {}
        pss[role] = pss.get(role, 0.0) + pss_mib(pid) - sum(guest.values())
        for kind, mib in guest.items():
            pss[kind] += mib
    pss["total"] = sum(pss.values())
    merged = sum(ksm_mib(pid) for _, pid in pids)
    before = {pid: cpu_seconds(pid) for _, pid in pids}
    t0 = time.monotonic()
    time.sleep(idle)
    seconds = time.monotonic() - t0
    cpu = dict.fromkeys((r for r in pss if not r.startswith("guest_") and r != "total"), 0.0)
    for role, pid in pids:
        cpu[role] = cpu.get(role, 0.0) + max(0.0, cpu_seconds(pid) - before[pid])
    cpu["total"] = sum(cpu.values())
    return Usage(len(names), pss, cpu, seconds, merged)


@contextlib.contextmanager
def host_ksm(enabled: bool) -> Iterator[None]:
    """KSM on, scanning fast, for the run; every knob back as it was afterwards."""
    if not enabled:
        yield
        return
    knobs = {k: (KSM / k).read_text().strip() for k in ("run", "pages_to_scan", "sleep_millisecs")}
    try:
        (KSM / "pages_to_scan").write_text("4000")
        (KSM / "sleep_millisecs").write_text("20")
        (KSM / "run").write_text("1")
        yield
    finally:
        for knob in ("run", "pages_to_scan", "sleep_millisecs"):
            (KSM / knob).write_text(knobs[knob])


def wait_ksm_scans(scans: int = 2, timeout: float = 180.0) -> None:
    first = int((KSM / "full_scans").read_text())
    deadline = time.monotonic() + timeout
    while int((KSM / "full_scans").read_text()) < first + scans and time.monotonic() < deadline:
        time.sleep(0.5)


@dataclass
class PodRun:
    starts: list[Start]
    usages: list[Usage]  # one per count measured at, fewest pods first


def run_pods(
    cd: Containerd,
    runtime: str,
    at: list[int],
    idle: float,
    tag: str,
    logs: Path,
    hyp: HypervisorConfig,
    vm_root: Path,
) -> PodRun:
    """Start pods one after the other; measure them all whenever there are ``at`` of them."""
    kata = runtime.endswith("kata-py.v2")
    names: list[str] = []
    starts: list[Start] = []
    usages: list[Usage] = []
    try:
        for i in range(max(at)):
            for attempt in range(1, RETRIES + 1):
                names.append(f"{tag}{i}-{uuid.uuid4().hex[:6]}")
                try:
                    starts.append(start_pod(cd, runtime, names[-1], logs, vm_root))
                    break
                except RuntimeError as exc:
                    _failed(f"pod {names[-1]} ({attempt}/{RETRIES})", exc)
                    remove_task(cd, names.pop())
            else:
                raise RuntimeError(f"no pod {i + 1} after {RETRIES} tries")
            if i + 1 in at:
                time.sleep(SETTLE)
                if kata and (KSM / "run").read_text().strip() == "1":
                    wait_ksm_scans()
                boot = (hyp.kernel, hyp.image_initrd, hyp.initrd)
                usages.append(measure(names, idle, kata, boot))
        return PodRun(starts, usages)
    finally:
        with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
            list(pool.map(lambda n: remove_task(cd, n), names))


def write_settings(settings: list[str], where: Path) -> Path:
    """A configuration holding only ``[hypervisor.qemu]`` KEY = VALUE (TOML values)."""
    lines = ["[hypervisor.qemu]"]
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item}: want KEY=VALUE")
        lines.append(f"{key.strip()} = {value.strip()}")
    path = where / "configuration.toml"
    path.write_text("\n".join(lines) + "\n")
    load_config(str(path))  # refused here, not by every shim
    return path


def _median(starts: list[Start], clock: str, key: str) -> float:
    values = [getattr(s, clock)[key] for s in starts if key in getattr(s, clock)]
    return statistics.median(values) if values else float("nan")


def report(header: str, n: int, times: dict[str, list[float]], kata: PodRun, runc: PodRun) -> str:
    med = {name: statistics.median(t) for name, t in times.items()}
    rows = [header, "", "| start | kata-py | runc |", "|---|---|---|"]
    rows.append(
        f"| `ctr run --rm` busybox `true`, median of {n} (alternating) "
        f"| {med['kata-py']:.2f} s ({med['kata-py'] / med['runc']:.0f}x runc) "
        f"| {med['runc']:.2f} s |"
    )
    k = len(kata.starts)
    for key, what in (
        ("qemu_spawned", "QEMU spawned"),
        ("guest_init", "guest init (`KATA_PY_INIT`)"),
        ("agent_ready", "agent ready (`KATA_PY_AGENT_READY`)"),
        ("container", "container ran (its first output)"),
    ):
        up = _median(kata.starts, "uptime", key)
        guest = f", guest uptime {up:.2f} s" if up == up else ""
        rows.append(
            f"| {what}, after `ctr run -d`, median of {k} pods "
            f"| {_median(kata.starts, 'wall', key):.2f} s{guest} | - |"
        )
    rows.append(
        f"| `ctr run -d` returned, median of {k} pods "
        f"| {_median(kata.starts, 'wall', 'ctr_returned'):.2f} s "
        f"| {_median(runc.starts, 'wall', 'ctr_returned'):.2f} s |"
    )
    rows += ["", memory_table(kata, runc)]
    return "\n".join(rows)


def memory_table(kata: PodRun, runc: PodRun) -> str:
    usages = [*kata.usages, *runc.usages]
    heads = [
        f"{name}, {u.pods} pod{'s' if u.pods > 1 else ''}"
        for name, run in (("kata-py", kata), ("runc", runc))
        for u in run.usages
    ]
    rows = [
        f"| PSS per idle pod, MiB | {' | '.join(heads)} |",
        "|---" * (len(heads) + 1) + "|",
    ]
    labels = {
        "shim": "shim",
        "qemu": "QEMU, less the guest's memory",
        "guest_ram": "guest RAM (memfd, in QEMU and virtiofsd)",
        "guest_image": "guest root image (shared file, DAX)",
        "guest_boot": "guest kernel and initrd (QEMU's copies)",
        "virtiofsd": "virtiofsd, less guest RAM",
        "vsock": "vhost-device-vsock (hybrid vsock), less guest RAM",
        "container": "container's processes (on the host)",
        "total": "**total**",
    }
    for role, label in labels.items():
        cells = [f"{u.per_pod(role):.1f}" if role in u.pss else "-" for u in usages]
        rows.append(f"| {label} | {' | '.join(cells)} |")
    cells = [f"{u.pss['total']:.0f}" for u in usages]
    rows.append(f"| all the pods together | {' | '.join(cells)} |")
    if any(u.ksm for u in usages):
        cells = [f"{u.ksm / u.pods:.1f}" for u in usages]
        rows.append(f"| mapped from pages KSM merged, per pod | {' | '.join(cells)} |")
    secs = usages[0].seconds
    cells = [
        f"{u.cpu_percent('total'):.2f}"
        + (f" (QEMU {u.cpu_percent('qemu'):.2f})" if "qemu" in u.cpu else "")
        for u in usages
    ]
    rows.append(f"| idle CPU per pod, % of one CPU over {secs:.0f} s | {' | '.join(cells)} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5, help="ctr run --rm runs of each runtime")
    parser.add_argument("--pods", type=int, default=10, help="idle pods at most (1 = one)")
    parser.add_argument(
        "--at",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[],
        metavar="N,…",
        help="measure also when there are N pods (1 and --pods always)",
    )
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU")
    parser.add_argument("--containerd", default="/usr/bin/containerd")
    parser.add_argument("--ctr", default="/usr/bin/ctr")
    parser.add_argument("--config", help="a kata-py configuration.toml for this run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--ksm", action="store_true", help="host KSM on during the run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.config and args.set:
        parser.error("--config and --set do not mix")
    with tempfile.TemporaryDirectory(prefix="kpy-pod-cost-") as tmp:
        config = args.config or (str(write_settings(args.set, Path(tmp))) if args.set else None)
        effective = load_config(config)
        vm_root = Path(effective.runtime.state_dir) / "vm"
        env = {"KATA_PY_CONFIG": config} if config else {}
        logs = Path(tmp)
        with host_ksm(args.ksm), private_containerd(args.containerd, args.ctr, env) as cd:
            runtime = runtimes(args.containerd)
            times = alternating_runs(cd, runtime, args.n)
            at = sorted({1, args.pods, *args.at})
            hyp = effective.hypervisor
            kata = run_pods(cd, runtime["kata-py"], at, args.idle, "k", logs, hyp, vm_root)
            runc = run_pods(cd, runtime["runc"], at, args.idle, "r", logs, hyp, vm_root)
    if args.json:
        print(json.dumps(_as_json(args.n, times, kata, runc, effective.hypervisor)))
        return 0
    header = f"{_header(args, effective.hypervisor)}; {_qemu_summary(kata.starts[0].qemu_argv)}"
    print(report(header, args.n, times, kata, runc))
    return 0


def _header(args: argparse.Namespace, hyp: HypervisorConfig) -> str:
    version = subprocess.run([args.containerd, "--version"], capture_output=True, text=True)
    qemu = subprocess.run([hyp.path, "--version"], capture_output=True, text=True)
    qemu_version = qemu.stdout.splitlines()[0] if qemu.stdout else hyp.path
    root = f"image {Path(hyp.image).name}" if hyp.image else f"initrd {Path(hyp.initrd).name}"
    return (
        f"{version.stdout.strip()}; {qemu_version}; {os.cpu_count()} CPUs; "
        f"kata-py {hyp.machine_type}, {root}, enable_ksm = {str(hyp.enable_ksm).lower()}"
        + ("; host KSM on" if args.ksm else "")
    )


def _qemu_summary(argv: tuple[str, ...]) -> str:
    """What the pods' QEMU ran with: accelerator, RAM, machine options, a balloon."""

    def value(flag: str) -> str:
        return argv[argv.index(flag) + 1] if flag in argv[:-1] else "?"

    balloon = any("free-page-reporting=on" in a for a in argv)
    return f"QEMU -accel {value('-accel')} -m {value('-m')} -M {value('-M')}" + (
        ", balloon with free page reporting" if balloon else ""
    )


def _as_json(
    n: int, times: dict[str, list[float]], kata: PodRun, runc: PodRun, hyp: HypervisorConfig
) -> dict[str, object]:
    def usage(u: Usage) -> dict[str, object]:
        return {"pods": u.pods, "pss_mib": u.pss, "cpu_s": u.cpu, "ksm_mib": u.ksm}

    return {
        "n": n,
        "ctr_run_s": times,
        "kata_starts": [{"wall": s.wall, "uptime": s.uptime} for s in kata.starts],
        "runc_starts": [{"wall": s.wall} for s in runc.starts],
        "kata": [usage(u) for u in kata.usages],
        "runc": [usage(u) for u in runc.usages],
        "idle_s": kata.usages[0].seconds,
        "hypervisor": dataclasses.asdict(hyp),
    }


if __name__ == "__main__":
    sys.exit(main())
