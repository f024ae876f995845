#!/opt/kata-py/venv/bin/python
"""The shim's own cost on the host: ``start`` and ``delete`` wall time, and the daemon's
memory with one idle pod, beside the runc shim's in the same run.

``start`` is timed on its join path (a listener already at the pod's socket, as for a
pod's second container), so no daemon is left behind; ``delete`` on a bundle with no
state, which is what containerd runs after every ``ctr run --rm``. Then a private
containerd runs one pod of each runtime (``ctr run -d … sleep``) and the shim daemons'
PSS and RSS are read from ``/proc/PID/smaps_rollup``.

``--variant NAME=DIR`` runs the kata-py shim from the source tree DIR (``PYTHONPATH``)
instead of the installed package; several variants are interleaved, to compare trees.

    bench/shim_start.py [-n 20] [--no-memory] [--variant before=/tmp/old --variant after=.]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.conftest import IMAGE, Containerd  # noqa: E402

KATA = "/opt/kata-py/venv/bin/python"
RUNC_SHIM = "/usr/bin/containerd-shim-runc-v2"
# Like the installed console script, without its file: the same imports.
KATA_MAIN = (
    "import sys; sys.argv[0] = 'containerd-shim-kata-py-v2'; "
    "from shimv2.shim.__main__ import main; sys.exit(main())"
)


def kata_argv(*args: str) -> list[str]:
    return [KATA, "-c", KATA_MAIN, *args]


def socket_path(address: str, namespace: str, group: str) -> str:
    """Where both shims put a pod's socket (containerd's ``SocketAddress``)."""
    joined = os.path.normpath(os.path.join(address, namespace, group))
    return os.path.join("/run/containerd/s", hashlib.sha256(joined.encode()).hexdigest())


@contextlib.contextmanager
def listener(path: str) -> Iterator[None]:
    """A socket already listening at ``path``: ``start`` joins it and spawns nothing."""
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)
        sock.listen(64)
        try:
            yield
        finally:
            os.unlink(path)


def timed(argv: list[str], cwd: Path, env: Mapping[str, str]) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{argv}: rc {out.returncode}: {out.stderr.decode()[-500:]}")
    return elapsed


def wall_times(n: int, variants: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, float]]:
    """Median seconds of ``start`` (join) and ``delete`` (no state) per shim, interleaved."""
    shims: dict[str, tuple[list[str], Mapping[str, str]]] = {
        name: (kata_argv(), env) for name, env in variants.items()
    }
    shims["runc shim"] = ([RUNC_SHIM], dict(os.environ))
    runs: dict[str, dict[str, list[float]]] = {s: {"start": [], "delete": []} for s in shims}
    address = f"/run/kpy-bench-{uuid.uuid4().hex[:6]}/containerd.sock"
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            for shim, (argv, env) in shims.items():
                cid = f"b{uuid.uuid4().hex[:8]}"
                # Named by the id, as containerd's: the runc shim finds ``runtime`` there.
                bundle = Path(tmp) / cid
                bundle.mkdir()
                (bundle / "config.json").write_text('{"ociVersion": "1.0.2"}')
                (bundle / "runtime").write_text("runc")
                flags = ["-namespace", "bench", "-address", address, "-id", cid]
                with listener(socket_path(address, "bench", cid)):
                    runs[shim]["start"].append(timed([*argv, *flags, "start"], bundle, env))
                    (bundle / "address").unlink(missing_ok=True)
                delete = [*argv, *flags, "-bundle", str(bundle), "delete"]
                runs[shim]["delete"].append(timed(delete, bundle, env))
            print(f"round {i + 1}/{n}", file=sys.stderr, end="\r")
    print(file=sys.stderr)
    return {s: {k: statistics.median(v) for k, v in r.items()} for s, r in runs.items()}


def smaps(pid: int) -> dict[str, float]:
    """MiB from ``smaps_rollup``: Pss, Rss, and the anonymous part of Pss."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0]) / 1024
    return {"pss": values["Pss"], "rss": values["Rss"], "pss_anon": values.get("Pss_Anon", 0.0)}


def daemon_pids(name: str, address: str) -> list[int]:
    """Our containerd's long-lived shims: not a ``start`` or ``delete`` running, nor
    another containerd's shims."""
    out = subprocess.run(["pgrep", "-f", name], capture_output=True, text=True)
    pids = []
    for pid in map(int, out.stdout.split()):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if address.encode() in argv and b"start" not in argv and b"delete" not in argv:
                pids.append(pid)
    return pids


def pod_memory(env: Mapping[str, str], settle: float) -> dict[str, dict[str, float]]:
    """One idle pod of each runtime through a private containerd; each shim daemon's memory."""
    base = Path(f"/run/kpy-bench-{uuid.uuid4().hex[:6]}")
    base.mkdir()
    cd = Containerd("/usr/bin/containerd", "/usr/bin/ctr", base, env=dict(env))
    names = {"kata-py": f"k{uuid.uuid4().hex[:6]}", "runc shim": f"r{uuid.uuid4().hex[:6]}"}
    runtimes = {"kata-py": "io.containerd.kata-py.v2", "runc shim": "io.containerd.runc.v2"}
    cd.start()
    try:
        subprocess.run(
            [str(ROOT / "scripts" / "busybox-image"), str(base / "bb.tar"), IMAGE], check=True
        )
        cd.ctr("images", "import", str(base / "bb.tar"))
        for shim, name in names.items():
            cd.ctr("run", "-d", "--runtime", runtimes[shim], IMAGE, name, "sleep", "1000")
        time.sleep(settle)
        result = {}
        for shim, pattern in (
            ("kata-py", "containerd-shim-kata-py-v2"),
            ("runc shim", "containerd-shim-runc-v2"),
        ):
            pids = daemon_pids(pattern, cd.socket)
            assert len(pids) == 1, f"{shim}: daemons {pids}"
            result[shim] = smaps(pids[0])
        return result
    finally:
        for name in names.values():
            cd.ctr("task", "kill", "-s", "SIGKILL", name, check=False)
        for name in names.values():
            for _ in range(100):
                if cd.ctr("task", "rm", name, check=False).returncode == 0:
                    break
                time.sleep(0.2)
            cd.ctr("containers", "rm", name, check=False)
        cd.stop()
        subprocess.run(["umount", "-R", str(base / "root")], check=False, capture_output=True)
        subprocess.run(["rm", "-rf", str(base)], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="start/delete rounds")
    parser.add_argument("--pods", type=int, default=3, help="pod memory samples per variant")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds idle before reading")
    parser.add_argument("--no-memory", action="store_true", help="skip the containerd part")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ["PATH"] = f"/usr/local/bin:{os.environ.get('PATH', '')}"
    variants: dict[str, dict[str, str]] = {}
    for spec in args.variant:
        name, _, src = spec.partition("=")
        tree = Path(src).resolve()
        guest = tree / "build" / "guest" if (tree / "build" / "guest").is_dir() else None
        # A tree without its own guest image boots this one's.
        guest_dir = os.environ.get("KATA_PY_GUEST_DIR", str(guest or ROOT / "build" / "guest"))
        variants[name] = {**os.environ, "PYTHONPATH": str(tree), "KATA_PY_GUEST_DIR": guest_dir}
    if not variants:
        variants["kata-py"] = dict(os.environ)

    walls = wall_times(args.n, variants)
    memory: dict[str, list[dict[str, dict[str, float]]]] = {name: [] for name in variants}
    if not args.no_memory:
        for _ in range(args.pods):
            for name, env in variants.items():
                memory[name].append(pod_memory(env, args.settle))

    def median_of(samples: list[dict[str, dict[str, float]]], shim: str, key: str) -> float:
        return statistics.median(s[shim][key] for s in samples)

    mem = {
        name: {
            shim: {k: median_of(samples, shim, k) for k in ("pss", "rss", "pss_anon")}
            for shim in ("kata-py", "runc shim")
        }
        for name, samples in memory.items()
        if samples
    }
    if args.json:
        print(json.dumps({"n": args.n, "pods": args.pods, "wall_s": walls, "memory_mib": mem}))
        return 0
    print(f"shim start (join) and delete (no state): medians of {args.n}, interleaved")
    for shim, w in walls.items():
        start, delete = w["start"] * 1000, w["delete"] * 1000
        print(f"  {shim:16} start {start:7.1f} ms   delete {delete:7.1f} ms")
    for name, m in mem.items():
        print(f"shim daemon of one idle pod ({name}), medians of {args.pods} pods, MiB:")
        for shim, v in m.items():
            pss, rss, anon = v["pss"], v["rss"], v["pss_anon"]
            print(f"  {shim:16} PSS {pss:6.1f}  RSS {rss:6.1f}  PSS anon {anon:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
