#!/opt/kata-py/venv/bin/python
"""The long soak: many cycles of pods created, exec'd, stopped and deleted.

``tests/e2e/soak.py`` does the work (the suite runs a few cycles): each cycle
starts ``--pods`` pods at once beside one long-lived pod, streams an exec in
each, removes them, then checks that the host holds exactly the long-lived
pod again (tasks, shims, VM processes, state directories, mounts, sockets).
Pods are cloned from a template (``--cold`` boots them instead). Prints the
long-lived shim's fds and RSS over the cycles, and the cycle times.

    bench/soak.py [--cycles 1000] [--pods 2] [--cold] [--minutes M]

SIGTERM ends the run after the cycle under way, with its figures.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import private_containerd  # noqa: E402
from factory import factory_cli, templated_runtime  # noqa: E402

from tests.e2e.soak import Soak  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--pods", type=int, default=2)
    parser.add_argument("--cold", action="store_true", help="boot pods instead of cloning")
    parser.add_argument(
        "--minutes", type=float, default=0.0, help="stop after this long, if earlier (0: never)"
    )
    parser.add_argument("--containerd", default="/usr/bin/containerd")
    parser.add_argument("--ctr", default="/usr/bin/ctr")
    args = parser.parse_args()
    shm = Path("/dev/shm") / f"kpy-soak-{uuid.uuid4().hex[:6]}"
    # Its own state directory: what it counts is its own, whatever else runs VMs here.
    state = Path("/run") / shm.name
    failures: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="kpy-soak-") as tmp:
            config, wrapper = templated_runtime(
                Path(tmp), shm, state_dir=state, template=not args.cold
            )
            if not args.cold:
                factory_cli(config, "init")
            with private_containerd(args.containerd, args.ctr) as cd:
                soak = Soak(cd, str(wrapper), pods=args.pods, state=state)
                baseline = soak.start()
                t0 = time.monotonic()
                stop = _stop_requested()
                try:
                    for n in range(args.cycles):
                        if args.minutes and time.monotonic() - t0 > args.minutes * 60:
                            print(f"stopping after {n} cycles: --minutes {args.minutes:g}")
                            break
                        if stop.is_set():
                            print(f"stopping after {n} cycles: SIGTERM")
                            break
                        sample = soak.cycle(n)
                        if sample.counts != baseline:
                            failures.append(f"cycle {n}: {sample.counts}")
                        if n % 50 == 0 or n == args.cycles - 1:
                            print(
                                f"cycle {n}: {sample.seconds:.1f} s, shim fds {sample.fds}, "
                                f"RSS {sample.rss_mib:.1f} MiB, {len(failures)} mismatches",
                                flush=True,
                            )
                finally:
                    soak.stop()
                total = time.monotonic() - t0
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)
    samples = soak.samples
    print(
        f"\n{len(samples)} cycles of {args.pods} pods in {total / 60:.1f} min "
        f"({'cold' if args.cold else 'template'}); cycle median "
        f"{statistics.median(s.seconds for s in samples):.1f} s; long-lived shim fds "
        f"{samples[0].fds} -> {samples[-1].fds}, RSS {samples[0].rss_mib:.1f} -> "
        f"{samples[-1].rss_mib:.1f} MiB; count mismatches: {len(failures)}"
    )
    for line in failures[:20]:
        print(line)
    return 1 if failures else 0


def _stop_requested() -> threading.Event:
    """Set by SIGTERM: the run ends after the cycle under way, with its figures."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    return stop


if __name__ == "__main__":
    sys.exit(main())
