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
import base64
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shimv2.oci import spec_to_json  # noqa: E402
from shimv2.vc.api import VirtContainers  # noqa: E402
from shimv2.vc.config import AgentConfig, Config, RuntimeConfig  # noqa: E402
from shimv2.vc.container import ContainerConfig  # noqa: E402
from shimv2.vc.sandbox import SandboxConfig  # noqa: E402
from tests.guest.rootfs import build_rootfs, make_spec  # noqa: E402

PAIRS = (("crun-nodev", "direct"), ("crun-seccomp", "direct-seccomp"))


def default_spec() -> dict[str, object]:
    ctr = subprocess.run(["ctr", "oci", "spec"], capture_output=True, check=True)
    spec = json.loads(ctr.stdout)
    linux = spec["linux"]
    linux["namespaces"] = [ns for ns in linux["namespaces"] if ns["type"] != "network"]
    spec["hostname"] = "bench"
    return dict(spec)


def guest_script(request: dict[str, object]) -> str:
    """Shell input that writes the script and its request into the guest and runs it."""

    def heredoc(data: bytes, path: str) -> str:
        text = base64.encodebytes(data).decode()
        return f"base64 -d > {path} <<'EOF'\n{text}EOF\n"

    script = (ROOT / "bench" / "guest_create.py").read_bytes()
    return (
        heredoc(script, "/run/kpy-create.py")
        + heredoc(json.dumps(request).encode(), "/run/kpy-create.json")
        + "python3.11 /run/kpy-create.py /run/kpy-create.json\nexit 0\n"
    )


async def run(rounds: int, tmp: Path) -> dict[str, object]:
    state_dir = f"/run/kpy-cc-{uuid.uuid4().hex[:6]}"
    config_file = tmp / "config.toml"
    config_file.write_text(
        f'[runtime]\nstate_dir = "{state_dir}"\n[agent.kata]\ndebug_console_enabled = true\n'
    )
    config = Config(
        runtime=RuntimeConfig(state_dir=state_dir), agent=AgentConfig(debug_console_enabled=True)
    )
    bundle = tmp / "bundle"
    build_rootfs(bundle / "rootfs")
    spec = spec_to_json(make_spec("rootfs", ["sleep", "1000"]))
    sid = f"cc{uuid.uuid4().hex[:8]}"
    request = {"spec": default_spec(), "rounds": rounds,
               "config_of": "/run/kata-py/containers/c/config.json"}  # fmt: skip
    kata_py = str(Path(sys.executable).parent / "kata-py")
    try:
        async with trio.open_nursery() as nursery:
            vc = VirtContainers(nursery, config)
            await vc.run_sandbox(
                SandboxConfig(id=sid, containers=(ContainerConfig("c", str(bundle), spec),))
            )
            argv = [kata_py, "--config", str(config_file), "exec", sid]
            shell_input = guest_script(request)
            out = await trio.to_thread.run_sync(
                lambda: subprocess.run(
                    argv, input=shell_input, capture_output=True, text=True, timeout=900
                )
            )
            await vc.stop_sandbox(sid)
            await vc.delete_sandbox(sid)
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    for line in out.stdout.replace("\r", "").splitlines():
        if line.startswith("RESULT {"):
            result: dict[str, object] = json.loads(line.removeprefix("RESULT "))
            return result
    raise SystemExit(f"no result from the guest:\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}")


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
