#!/opt/kata-py/venv/bin/python
"""``ctr run --rm`` wall time: kata-py against the runc shim, in one run.

Starts a private containerd (Debian's, or ``--containerd PATH``), imports the
locally built busybox image, then alternates ``ctr run --rm`` with
``io.containerd.kata-py.v2`` and ``io.containerd.runc.v2`` N times each and
prints medians and the ratio. Then it keeps one kata-py pod running and reads
the shim daemon's RSS (and QEMU's, for scale) beside a runc shim's.

    bench/ctr_run.py [-n 5] [--containerd /usr/bin/containerd --ctr /usr/bin/ctr]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.conftest import IMAGE, Containerd  # noqa: E402


def runtimes(containerd: str) -> dict[str, str]:
    """kata-py and the runc shim of the same release as ``containerd`` where one is beside it.

    Debian's runc shim (1.6) cannot read containerd 2.3+'s BootstrapParams;
    scripts/build-containerd puts each release's own shim next to its binary,
    and containerd accepts a shim's absolute path as the runtime name.
    """
    beside = Path(containerd).resolve().parent / "containerd-shim-runc-v2"
    runc = str(beside) if beside.exists() else "io.containerd.runc.v2"
    return {"kata-py": "io.containerd.kata-py.v2", "runc": runc}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pids_matching(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def timed_run(cd: Containerd, runtime: str) -> float:
    t0 = time.monotonic()
    out = cd.ctr("run", "--rm", "--runtime", runtime, IMAGE, f"b{uuid.uuid4().hex[:8]}", "true")
    assert out.returncode == 0
    return time.monotonic() - t0


def memory(cd: Containerd, runtime: dict[str, str]) -> dict[str, float]:
    kata, runc = f"k{uuid.uuid4().hex[:6]}", f"r{uuid.uuid4().hex[:6]}"
    cd.ctr("run", "-d", "--runtime", runtime["kata-py"], IMAGE, kata, "sleep", "1000")
    cd.ctr("run", "-d", "--runtime", runtime["runc"], IMAGE, runc, "sleep", "1000")
    try:
        time.sleep(1)
        shim = pids_matching("containerd-shim-kata-py-v2")
        qemu = pids_matching("qemu-system-x86_64 -name kata-py-")
        runc_shim = pids_matching("containerd-shim-runc-v2")
        return {
            "kata_shim_rss_mib": sum(rss_mib(p) for p in shim),
            "kata_qemu_rss_mib": sum(rss_mib(p) for p in qemu),
            "runc_shim_rss_mib": sum(rss_mib(p) for p in runc_shim),
        }
    finally:
        for name in (kata, runc):
            cd.ctr("task", "kill", "-s", "SIGKILL", name, check=False)
        for name in (kata, runc):
            for _ in range(100):
                if cd.ctr("task", "rm", name, check=False).returncode == 0:
                    break
                time.sleep(0.2)
            cd.ctr("containers", "rm", name, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5)
    parser.add_argument("--containerd", default="/usr/bin/containerd")
    parser.add_argument("--ctr", default="/usr/bin/ctr")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ["PATH"] = f"/usr/local/bin:{os.environ.get('PATH', '')}"
    base = Path(f"/run/kpy-bench-{uuid.uuid4().hex[:6]}")
    base.mkdir()
    cd = Containerd(args.containerd, args.ctr, base)
    cd.start()
    try:
        subprocess.run(
            [str(ROOT / "scripts" / "busybox-image"), str(base / "bb.tar"), IMAGE], check=True
        )
        cd.ctr("images", "import", str(base / "bb.tar"))
        runtime = runtimes(args.containerd)
        times: dict[str, list[float]] = {name: [] for name in runtime}
        for _ in range(args.n):
            for name, path in runtime.items():
                times[name].append(timed_run(cd, path))
        mem = memory(cd, runtime)
    finally:
        cd.stop()
        subprocess.run(["umount", "-R", str(base / "root")], check=False, capture_output=True)
        subprocess.run(["rm", "-rf", str(base)], check=False)
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "n": args.n,
        "median_s": medians,
        "ratio": medians["kata-py"] / medians["runc"],
        **mem,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    version = subprocess.run([args.containerd, "--version"], capture_output=True, text=True)
    print(f"{version.stdout.strip()}: ctr run --rm busybox true, medians of {args.n}, alternating")
    for name, m in medians.items():
        print(f"  {name:8} {m:7.3f} s")
    print(f"  ratio kata-py/runc: {result['ratio']:.1f}x")
    print(
        f"  shim RSS with one pod: kata-py {mem['kata_shim_rss_mib']:.1f} MiB "
        f"(QEMU {mem['kata_qemu_rss_mib']:.1f} MiB), runc shim {mem['runc_shim_rss_mib']:.1f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
