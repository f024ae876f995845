#!/opt/kata-py/venv/bin/python
"""What VM templates buy: kata-py cold, kata-py cloned from a template, and runc, in one run.

Through one private containerd (Debian's, or ``--containerd PATH``) and the
locally built busybox image. The template runtime is a wrapper (an absolute
shim path, which containerd accepts) that points the kata-py shim at a
configuration with ``[factory] enable_template = true``; its template is built
first with ``kata-py factory init``, and its build time reported.

1. ``ctr run --rm`` of busybox ``true``, N times each, alternating runc, cold
   kata-py and templated kata-py, after one warm-up run of each: medians, ratios.
2. ``--pods`` idle pods started at once (one ``ctr run -d`` each, in parallel):
   the time until the last ``ctr run -d`` returned, for runc, cold and templated.
3. One idle pod of each kind: PSS by process, the guest's RAM apart. A clone's
   RAM is its own copy on a tmpfs; pages of it that neither QEMU nor virtiofsd
   has touched are in no process's PSS, so the copy is counted whole (its
   allocated blocks) and QEMU's and virtiofsd's mappings of it are left out.
   The template's own RAM (once per node) is shown apart.

    bench/factory.py [-n 5] [--pods 10] [--containerd … --ctr …] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import (
    IMAGE,
    Containerd,
    guest_pss_mib,
    private_containerd,
    processes,
    pss_mib,
    remove_task,
    runtimes,
)
from pod_cost import alternating_runs, pod_roles

ROOT = Path(__file__).resolve().parents[1]
SHIM = "/usr/local/bin/containerd-shim-kata-py-v2"
IDLE = ["sleep", "100000"]
SETTLE = 5.0
KINDS = ("cache", "warm", "template", "cold", "runc")
HEADS = {
    "cache": "kata-py, VM cache + warm shims",
    "warm": "kata-py, template + warm shims",
    "template": "kata-py, template",
    "cold": "kata-py, cold",
    "runc": "runc",
}


def templated_runtime(
    where: Path,
    shm: Path,
    server: str = "",
    *,
    state_dir: Path | None = None,
    template: bool = True,
    cache: int = 0,
) -> tuple[Path, Path]:
    """A configuration with templates on, and a shim wrapper that uses it (and, with
    ``server``, warm shims from the server there). ``state_dir``: the shims' own
    state directory; ``template=False``: cold boots; ``cache``: a VM cache that size,
    served on ``where/cache.sock`` (``kata-py factory init`` runs it)."""
    config = where / f"configuration{'-cache' if cache else ''}.toml"
    text = (
        f'[factory]\nenable_template = {str(template).lower()}\ntemplate_path = "{shm}/template"\n'
    )
    if cache:
        text += f'vm_cache_number = {cache}\nvm_cache_endpoint = "{where}/cache.sock"\n'
    if state_dir is not None:
        text += f'[runtime]\nstate_dir = "{state_dir}"\n'
    config.write_text(text)
    kind = ("warm" if server else "") + ("cache" if cache else "")
    wrapper = where / f"containerd-shim-kpytemplate{kind}-v2"
    warm = f"KATA_PY_SHIM_SERVER={server} " if server else ""
    wrapper.write_text(f'#!/bin/sh\n{warm}KATA_PY_CONFIG={config} exec {SHIM} "$@"\n')
    wrapper.chmod(0o755)
    return config, wrapper


@contextlib.contextmanager
def shim_server(path: Path) -> Iterator[None]:
    """``kata-py factory serve`` on ``path`` for the run."""
    kata_py = Path(sys.executable).with_name("kata-py")
    proc = subprocess.Popen([str(kata_py), "factory", "serve", "--socket", str(path)],
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        while not path.exists():
            if proc.poll() is not None:
                raise RuntimeError("kata-py factory serve failed")
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@contextlib.contextmanager
def vm_cache(config: Path, endpoint: Path) -> Iterator[None]:
    """``kata-py factory init`` with a VM cache in ``config``: its server, for the run."""
    argv = [sys.executable, "-m", "shimv2.cli", "--config", str(config), "factory", "init"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_cache(endpoint, 1, proc)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def wait_for_cache(endpoint: Path, ready: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until the VM cache on ``endpoint`` holds ``ready`` VMs (up to 5 min)."""
    import trio

    from shimv2.vc.vm_cache import ask

    async def count() -> int:
        stream, reply = await ask(endpoint, {"op": "status"})
        await stream.aclose()
        return len(reply.get("ready", []))

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("the VM cache server exited")
        if endpoint.exists() and trio.run(count) >= ready:
            return
        time.sleep(0.2)
    raise RuntimeError(f"the VM cache on {endpoint} did not fill to {ready}")


def factory_cli(config: Path, action: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "shimv2.cli", "--config", str(config), "factory", action]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True)


def parallel_start(cd: Containerd, runtime: str, pods: int) -> float:
    """Seconds from starting ``pods`` ``ctr run -d`` at once until the last returned."""
    names = [f"p{uuid.uuid4().hex[:8]}" for _ in range(pods)]

    def run(name: str) -> None:
        cd.ctr("run", "-d", "--runtime", runtime, IMAGE, name, *IDLE, timeout=600)

    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=pods) as pool:
            list(pool.map(run, names))
        return time.monotonic() - t0
    finally:
        with ThreadPoolExecutor(max_workers=pods) as pool:
            list(pool.map(lambda n: remove_task(cd, n), names))


def pod_memory(cd: Containerd, runtime: str, clones: Path) -> dict[str, float]:
    """PSS (MiB) by process of one idle pod, the guest's RAM apart."""
    name = f"m{uuid.uuid4().hex[:8]}"
    cd.ctr("run", "-d", "--runtime", runtime, IMAGE, name, *IDLE)
    try:
        time.sleep(SETTLE)
        vm_id = _vm_id(name)
        copy = clones / (vm_id or name)
        usage: dict[str, float] = {}
        procs = processes()
        roles = pod_roles(name, procs)
        if vm_id:  # a cached VM: its QEMU, virtiofsd and vsock backend are the cache server's
            for p in procs.values():
                line = " ".join(p.argv)
                if f"kata-py-{vm_id}" in p.argv:
                    roles.setdefault("qemu", []).append(p.pid)
                elif f"/vm/{vm_id}/" in line:
                    for exe, role in (("vhost-device-vsock", "vsock"), ("virtiofsd", "virtiofsd")):
                        if Path(p.argv[0]).name == exe:
                            roles.setdefault(role, []).append(p.pid)
        for role, pids in roles.items():
            for pid in pids:
                guest = guest_pss_mib(pid, ram_dirs=(str(copy),))
                own = pss_mib(pid) - guest["guest_ram"] - guest["guest_image"]
                usage[role] = usage.get(role, 0.0) + own
                usage["guest_image"] = usage.get("guest_image", 0.0) + guest["guest_image"]
                if not copy.exists():  # memfd RAM: all of it is mapped by QEMU
                    usage["guest_ram"] = usage.get("guest_ram", 0.0) + guest["guest_ram"]
        if copy.exists():
            usage["guest_ram"] = allocated_mib(copy)
        usage["total"] = sum(usage.values())
        return usage
    finally:
        remove_task(cd, name)


def _vm_id(name: str) -> str:
    """A pod's VM id when it is not the pod's own (a cached VM's)."""
    try:
        state = json.loads(Path(f"/run/kata-py/sbs/{name}/state.json").read_text())
    except (OSError, ValueError):
        return ""
    return str(state.get("vm_id", ""))


def allocated_mib(path: Path) -> float:
    return sum(f.stat().st_blocks * 512 for f in path.iterdir() if f.is_file()) / (1 << 20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5, help="ctr run --rm runs of each")
    parser.add_argument("--pods", type=int, default=10, help="pods started at once")
    parser.add_argument("--containerd", default="/usr/bin/containerd")
    parser.add_argument("--ctr", default="/usr/bin/ctr")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    shm = Path("/dev/shm") / f"kpy-bench-{uuid.uuid4().hex[:6]}"
    try:
        with tempfile.TemporaryDirectory(prefix="kpy-factory-") as tmp:
            config, wrapper = templated_runtime(Path(tmp), shm)
            _, warm_wrapper = templated_runtime(Path(tmp), shm, f"{tmp}/shims.sock")
            # A cache of one for the runs one at a time, and one of --pods for the pods
            # started at once, alive only then: its refills (and its VMs' memory) would
            # weigh on the other kinds.
            single, big = Path(tmp) / "single", Path(tmp) / "big"
            single.mkdir()
            big.mkdir()
            cache_config, cache_wrapper = templated_runtime(
                single, shm, f"{tmp}/shims.sock", cache=1
            )
            big_config, big_wrapper = templated_runtime(
                big, shm, f"{tmp}/shims.sock", cache=args.pods
            )
            t0 = time.monotonic()
            factory_cli(config, "init")
            build = time.monotonic() - t0
            template_mib = sum(allocated_mib(d) for d in (shm / "template").iterdir() if d.is_dir())
            with (
                private_containerd(args.containerd, args.ctr) as cd,
                shim_server(Path(tmp) / "shims.sock"),
            ):
                base = runtimes(args.containerd)
                kinds = {
                    "runc": base["runc"],
                    "cold": base["kata-py"],
                    "template": str(wrapper),
                    "warm": str(warm_wrapper),
                    "cache": str(cache_wrapper),
                }
                together = {}
                with vm_cache(cache_config, single / "cache.sock"):
                    times = alternating_runs(cd, kinds, args.n)  # after a warm-up run of each
                    for k, r in kinds.items():
                        if k != "cache":
                            together[k] = parallel_start(cd, r, args.pods)
                    wait_for_cache(single / "cache.sock", 1)
                    memory = {
                        k: pod_memory(cd, r, shm / "clones")
                        for k, r in kinds.items()
                        if k != "runc"
                    }
                with vm_cache(big_config, big / "cache.sock"):
                    wait_for_cache(big / "cache.sock", args.pods)  # one VM for each pod
                    together["cache"] = parallel_start(cd, str(big_wrapper), args.pods)
                memory["runc"] = pod_memory(cd, kinds["runc"], shm / "clones")
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    if args.json:
        print(json.dumps({"build": build, "template_mib": template_mib, "times": times,
                          "together": together, "memory": memory}))  # fmt: skip
        return 0
    print(report(args, build, template_mib, med, together, memory))
    return 0


def report(
    args: argparse.Namespace,
    build: float,
    template_mib: float,
    med: dict[str, float],
    together: dict[str, float],
    memory: dict[str, dict[str, float]],
) -> str:
    version = subprocess.run([args.containerd, "--version"], capture_output=True, text=True)
    rows = [
        f"{version.stdout.strip()}; {os.cpu_count()} CPUs; template built in {build:.1f} s, "
        f"{template_mib:.0f} MiB on tmpfs (once per node)",
        "",
        f"| | {' | '.join(HEADS[k] for k in KINDS)} |",
        "|---" * (len(KINDS) + 1) + "|",
        f"| `ctr run --rm` busybox `true`, median of {args.n} (alternating) | "
        + " | ".join(
            f"{med[k]:.2f} s" + (f" ({med[k] / med['runc']:.1f}x runc)" if k != "runc" else "")
            for k in KINDS
        )
        + " |",
        f"| {args.pods} pods started at once, until the last `ctr run -d` returned | "
        + " | ".join(f"{together[k]:.1f} s" for k in KINDS)
        + " |",
    ]
    labels = {
        "shim": "PSS of one idle pod, MiB: shim",
        "qemu": "QEMU, less the guest's memory",
        "guest_ram": "guest RAM (cold: memfd; template: the clone's copy, whole)",
        "guest_image": "guest root image (shared file, DAX)",
        "virtiofsd": "virtiofsd, less guest RAM",
        "vsock": "vhost-device-vsock (hybrid vsock), less guest RAM",
        "container": "container's processes (on the host)",
        "total": "**total**",
    }
    for role, label in labels.items():
        cells = [f"{memory[k][role]:.1f}" if role in memory[k] else "-" for k in KINDS]
        rows.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
