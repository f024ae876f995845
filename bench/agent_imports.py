#!/opt/kata-py/venv/bin/python
"""What the agent's imports cost in the guest, against the least an agent could import.

A cold pod waits for the guest's Python to import the agent. This boots one pod
VM (vc API, debug console on) and reports:

- from its console, the guest's uptime when init ran, when the agent had
  imported its modules (its "starting" line) and when it answered;
- from a root shell in that VM, ``--rounds`` alternating runs of
  ``python3.11 -S -c CODE`` (as the guest's init starts the agent), medians:
  the agent's imports (on asyncio since session 14, in a guest without ``_ssl``;
  on trio they took 2.34 s); the standard library and protobuf modules without
  any event loop (what an agent on threads and ``selectors`` would import); and
  Python alone.

These later runs find the VM's translation cache warm for Python, so they are
cheaper than the agent's own first start; compare them with each other.

    bench/agent_imports.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

import trio

# bench/ is sys.path[0] when a script here runs.
from _guest import file_in_guest, result_line, root_shell

NO_EVENT_LOOP = (
    "import os, sys, socket, selectors, threading, json, ctypes, struct, signal, logging, "
    "errno, fcntl, termios, pathlib, random, shutil, re; "
    "from shimv2.pb.kata import agent_pb2, health_pb2, oci_pb2, types_pb2; "
    "from shimv2.pb.ttrpc import request_pb2; from shimv2.pb.google.rpc import status_pb2; "
    "import shimv2.errdefs, shimv2.oci, shimv2.guest_protocol"
)
VARIANTS = {
    "the agent": "import shimv2.guest.agent",
    "stdlib and protobuf, no event loop": NO_EVENT_LOOP,
    "Python alone": "pass",
}
GUEST_TIMER = """
import json, statistics, subprocess, sys, time
with open(sys.argv[1]) as f:
    variants = json.load(f)
times = {name: [] for name in variants}
for _ in range(int(sys.argv[2])):
    for name, code in variants.items():
        t0 = time.perf_counter()
        subprocess.run(["python3.11", "-S", "-c", code], check=True)
        times[name].append(time.perf_counter() - t0)
print("RESULT " + json.dumps(times))
"""


def uptime(console: str, pattern: str) -> float:
    m = re.search(pattern, console)
    return float(m.group(1)) if m else float("nan")


async def run(rounds: int, tmp: Path) -> tuple[dict[str, list[float]], dict[str, float]]:
    shell_input = (
        file_in_guest(GUEST_TIMER.encode(), "/run/kpy-imports.py")
        + file_in_guest(json.dumps(VARIANTS).encode(), "/run/kpy-imports.json")
        + f"python3.11 -S /run/kpy-imports.py /run/kpy-imports.json {rounds}\n"
    )
    guest = await root_shell(shell_input, tmp)
    boot = {
        "guest init": uptime(guest.console, r"KATA_PY_INIT uptime=([0-9.]+)"),
        "agent imported (its first line)": uptime(guest.console, r"starting at uptime ([0-9.]+)"),
        "guest setup done": uptime(guest.console, r"guest setup done at uptime ([0-9.]+)"),
        "agent ready": uptime(guest.console, r"KATA_PY_AGENT_READY uptime=([0-9.]+)"),
    }
    times: dict[str, list[float]] = json.loads(result_line(guest, "RESULT "))
    return times, boot


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kpy-imports-") as tmp:
        times, boot = trio.run(run, args.rounds, Path(tmp))
    print("the pod's own start, guest uptime (s):")
    for what, seconds in boot.items():
        print(f"  {what}: {seconds:.2f}")
    print(f"\n`python3.11 -S -c CODE` in the same guest, {args.rounds} rounds, alternating:\n")
    print("| imports | median s | min s |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
