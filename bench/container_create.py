#!/opt/kata-py/venv/bin/python
"""The container's create inside the guest: crun against the agent doing it itself.

One pod VM (vc API, debug console on) runs a busybox container; through
``kata-py exec``, ``bench/guest_create.py`` then runs in the guest as root and
creates ``--rounds`` containers of each variant on that container's rootfs,
alternating, with ``ctr oci spec``'s default spec (containerd's own, the network
namespace dropped as the shim drops it):

- ``crun``: ``crun create`` as the agent runs it, the spec as it is;
- ``crun-nodev``: the same without the spec's device rules (crun then loads no
  cgroup-v2 device filter), which is what ``direct`` implements;
- ``direct``: a fork of the caller sets the container up, as Kata's agent does;
- ``crun-seccomp`` and ``direct-seccomp``: both with a seccomp allowlist of
  every syscall libseccomp knows but ten, the size of containerd's default.

Each time is from the request until the container's process waits to be
started, which is what CreateContainer waits for. A probe container of each
variant prints its hostname, capabilities, seccomp mode, /dev, mount count and
rlimit; the table says whether each pair printed the same.

    bench/container_create.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

# bench/ is sys.path[0] when a script here runs.
from _guest import CONTAINER_CONFIG, ROOT, file_in_guest, result_line, root_shell

PAIRS = (("crun-nodev", "direct"), ("crun-seccomp", "direct-seccomp"))


def default_spec() -> dict[str, object]:
    ctr = subprocess.run(["ctr", "oci", "spec"], capture_output=True, check=True)
    spec = json.loads(ctr.stdout)
    linux = spec["linux"]
    linux["namespaces"] = [ns for ns in linux["namespaces"] if ns["type"] != "network"]
    spec["hostname"] = "bench"
    return dict(spec)


async def run(rounds: int, tmp: Path) -> dict[str, object]:
    request = {"spec": default_spec(), "rounds": rounds, "config_of": CONTAINER_CONFIG}
    shell_input = (
        file_in_guest((ROOT / "bench" / "guest_create.py").read_bytes(), "/run/kpy-create.py")
        + file_in_guest(json.dumps(request).encode(), "/run/kpy-create.json")
        + "python3.11 /run/kpy-create.py /run/kpy-create.json\n"
    )
    result: dict[str, object] = json.loads(
        result_line(await root_shell(shell_input, tmp), "RESULT ")
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kpy-cc-") as tmp:
        result = trio.run(run, args.rounds, Path(tmp))
    times: dict[str, list[float]] = result["times"]  # type: ignore[assignment]
    probes: dict[str, str] = result["probes"]  # type: ignore[assignment]
    base = statistics.median(times["crun"])
    print(
        f"{args.rounds} rounds, alternating, in one guest; {result['syscalls']} seccomp rules; "
        f"RSS {result['rss_mib']:.1f} MiB forked (the agent's: {result['agent_rss_mib']:.1f})"
    )
    print("\n| variant | create, median ms | min ms | to crun |\n|---|---|---|---|")
    for variant, values in times.items():
        median = statistics.median(values)
        ms = f"{1000 * median:.1f} | {1000 * min(values):.1f}"
        print(f"| {variant} | {ms} | {median / base:.2f} |")
    for a, b in PAIRS:
        same = "the same" if probes[a] == probes[b] else "DIFFERENT"
        print(f"\nprobe of {a} and {b}: {same}")
        if probes[a] != probes[b]:
            print(f"--- {a}\n{probes[a]}--- {b}\n{probes[b]}")
    print(f"\nprobe of direct:\n{probes['direct']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
