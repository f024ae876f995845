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
import statistics
import subprocess
import sys
import time
import uuid

# bench/ is sys.path[0] when a script here runs.
from _common import (
    IMAGE,
    Containerd,
    private_containerd,
    processes,
    remove_task,
    rss_mib,
    runtimes,
)


def pids_matching(pattern: str) -> list[int]:
    return [p.pid for p in processes().values() if pattern in " ".join(p.argv)]


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
            remove_task(cd, name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5)
    parser.add_argument("--containerd", default="/usr/bin/containerd")
    parser.add_argument("--ctr", default="/usr/bin/ctr")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with private_containerd(args.containerd, args.ctr) as cd:
        runtime = runtimes(args.containerd)
        times: dict[str, list[float]] = {name: [] for name in runtime}
        for _ in range(args.n):
            for name, path in runtime.items():
                times[name].append(timed_run(cd, path))
        mem = memory(cd, runtime)
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
