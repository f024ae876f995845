"""critest, CRI's conformance suite, against runc and kata-py on one private containerd.

Usage: scripts/critest [--handler runc|kata-py|both] [--focus REGEX] [--skip REGEX]
                       [--containerd 2.4.2|2.2.9|1.7.35|1.6] [--results DIR] [--verbose]
                       [--baseline OTHER_HANDLER.xml] [--registry-port 5000]

One run: a private containerd (build/containerd-v<VERSION>, or Debian's for 1.6)
with the CRI plugin and both handlers, a CNI bridge of its own (bridge,
host-local, portmap), the images of scripts/build-critest-images preloaded into
k8s.io and pushed to a local registry (Debian's docker-registry on
127.0.0.1:5000) that containerd's hosts.toml puts in place of every upstream
registry, for the image specs that always pull. critest (build/bin/critest)
runs once per handler; the JUnit reports, critest's output and containerd's log
go to the results directory, which is printed; then a table of passed, failed
and skipped per handler, and every spec whose result differs between them.
Only the digest spec (test-image-digest@sha256:9700f9a2...) cannot pass: its
exact upstream digest cannot be rebuilt offline.

kata-py boots VMs: take the host's VM lock, as every such command does:
    flock /tmp/kata-py-vm.lock scripts/critest --handler kata-py
Everything started is stopped and removed at exit, also on failure or Ctrl-C:
critest, pods, containerd and its shims, the registry, netns, mounts, the
bridge, portmap's idle chains, the /run directory, and what critest's specs
leave on the host (the read-only specs' /tmp/test* dirs, the HostIpc specs'
segments). Exit status: 1 when a spec fails with kata-py that passes with runc
(both handlers run, or --baseline), else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oci_image import push

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "build" / "critest-images"
CRITEST = ROOT / "build" / "bin" / "critest"
CRICTL = ROOT / "build" / "bin" / "crictl"
SANDBOX = "registry.k8s.io/pause:3.10.2"  # built by scripts/build-critest-images
HANDLERS = {"runc": "io.containerd.runc.v2", "kata-py": "io.containerd.kata-py.v2"}


def log(msg: str) -> None:
    print(f"critest: {msg}", flush=True)


def binaries(version: str) -> tuple[Path, Path, str]:
    """containerd, ctr, and the directory whose shims go first on PATH ("" for Debian's)."""
    if version == "1.6":
        return Path("/usr/bin/containerd"), Path("/usr/bin/ctr"), ""
    release = ROOT / "build" / f"containerd-v{version}"
    # Each release brings its own runc shim: Debian's (1.6) cannot read 2.3+'s bootstrap.
    return release / "containerd", release / "ctr", str(release)


def containerd_config(base: Path, version: str) -> str:
    """The CRI configuration: version 3 for 2.x, version 2 for 1.6 and 1.7."""
    runtimes = "".join(
        f"[{{cri}}.containerd.runtimes.{name}]\n  runtime_type = '{rtype}'\n"
        for name, rtype in HANDLERS.items()
    )
    head = (
        f"root = '{base}/root'\nstate = '{base}/state'\n"
        f"[grpc]\n  address = '{base}/containerd.sock'\n"
    )
    # restrict_oom_score_adj: here runc init gets EACCES raising oom_score_adj
    # above containerd's own. stream port 0: another containerd may hold 10010.
    if version.startswith(("1.6", "1.7")):
        cri = "plugins.'io.containerd.grpc.v1.cri'"
        return (
            f"version = 2\n{head}[{cri}]\n  sandbox_image = '{SANDBOX}'\n"
            "  restrict_oom_score_adj = true\n"
            "  stream_server_address = '127.0.0.1'\n  stream_server_port = '0'\n"
            f"[{cri}.registry]\n  config_path = '{base}/certs.d'\n"
            + runtimes.format(cri=cri)
            + f"[{cri}.cni]\n  bin_dir = '/usr/lib/cni'\n  conf_dir = '{base}/cni'\n"
        )
    rt = "plugins.'io.containerd.cri.v1.runtime'"
    images = "plugins.'io.containerd.cri.v1.images'"
    return (
        f"version = 3\n{head}"
        f"[{images}.pinned_images]\n  sandbox = '{SANDBOX}'\n"
        f"[{images}.registry]\n  config_path = '{base}/certs.d'\n"
        f"[{rt}]\n  restrict_oom_score_adj = true\n"
        + runtimes.format(cri=rt)
        + f"[{rt}.cni]\n  bin_dirs = ['/usr/lib/cni']\n  conf_dir = '{base}/cni'\n"
        "[plugins.'io.containerd.grpc.v1.cri']\n"
        "  stream_server_address = '127.0.0.1'\n  stream_server_port = '0'\n"
    )


def cni_conflist(network: str, bridge: str, subnet: str) -> str:
    # No ipMasq: nothing leaves the host, and no rules are left behind.
    return json.dumps({
        "cniVersion": "1.0.0", "name": network,
        "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
             "promiscMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }, indent=1)  # fmt: skip


def registry_config(base: Path, registry: str) -> str:
    return (
        "version: 0.1\nlog:\n  level: warn\nstorage:\n"
        f"  filesystem:\n    rootdirectory: {base}/registry\n  delete:\n    enabled: true\n"
        f"http:\n  addr: {registry}\n"
    )


class Interrupted(Exception):
    pass


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def wait_for(what: str, ready: Callable[[], bool], proc: subprocess.Popen[bytes],
             timeout: float = 30) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.0f} s")
        time.sleep(0.1)


def stop(
    proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 30
) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Spec:
    status: str  # passed | failed | skipped
    message: str


def read_junit(path: Path) -> dict[str, Spec]:
    specs: dict[str, Spec] = {}
    if not path.exists():
        return specs
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "")
        if "[k8s.io]" not in name:
            continue  # suite nodes
        name = name.removeprefix("[It] ")
        status = case.get("status", "")
        detail = case.find("failure")
        if detail is None:
            detail = case.find("error")
        if detail is None:
            detail = case.find("skipped")
        message = "" if detail is None else (detail.get("message") or detail.text or "")
        if status not in ("passed", "skipped"):
            status = "failed"  # failed, panicked, interrupted, timedout
        specs[name] = Spec(status, " ".join(message.split()))
    return specs


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.version: str = args.containerd
        self.containerd_bin, self.ctr_bin, self.shim_dir = binaries(self.version)
        run_id = uuid.uuid4().hex[:6]
        self.base = Path(f"/run/kpy-critest-{run_id}")
        # Per run, so that a second run (another containerd version) cannot
        # take this one's bridge or addresses away.
        self.bridge, self.network = f"kpy-crit{run_id}", f"kpy-critest-{run_id}"
        self.subnet = f"10.233.{int(run_id[:2], 16)}.0/24"
        self.registry_addr = f"127.0.0.1:{args.registry_port}"
        self.sock = self.base / "containerd.sock"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.results = Path(
            args.results or ROOT / "build" / "critest-results" / f"{stamp}-{self.version}"
        )
        self.containerd: subprocess.Popen[bytes] | None = None
        self.registry: subprocess.Popen[bytes] | None = None
        self.critest: subprocess.Popen[bytes] | None = None
        self.netns: set[str] = set()  # the pods' netns paths, seen while they ran
        self.tmp_dirs = critest_tmp_dirs()
        self.shm = critest_shm()

    def env(self) -> dict[str, str]:
        path = os.environ.get("PATH", "/usr/bin:/bin")
        path = f"/usr/local/bin:/usr/sbin:/sbin:{path}"
        return {**os.environ, "PATH": f"{self.shim_dir}:{path}" if self.shim_dir else path}

    def ctr(self, *args: str) -> str:
        argv = [str(self.ctr_bin), "-a", str(self.sock), *args]
        return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=300).stdout

    def crictl(self, *args: str, check: bool = True) -> str:
        ep = f"unix://{self.sock}"
        out = subprocess.run([str(CRICTL), "-r", ep, "-i", ep, "--timeout", "120s", *args],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        if check and out.returncode != 0:
            raise RuntimeError(f"crictl {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def setup(self) -> None:
        for exe in (
            self.containerd_bin,
            self.ctr_bin,
            CRITEST,
            CRICTL,
            Path("/usr/bin/docker-registry"),
        ):
            if not os.access(exe, os.X_OK):
                raise RuntimeError(f"{exe} is missing: run scripts/setup")
        subprocess.run([str(ROOT / "scripts" / "build-critest-images")], check=True)
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", self.args.registry_port)) == 0:
                raise RuntimeError(f"{self.registry_addr} is taken: use --registry-port")
        self.results.mkdir(parents=True, exist_ok=True)
        log(f"results in {self.results}")
        (self.base / "cni").mkdir(parents=True)
        conflist = cni_conflist(self.network, self.bridge, self.subnet)
        (self.base / "cni" / "10-kpy-critest.conflist").write_text(conflist)
        # Every registry resolves to ours (mirrors keep the path); none is upstream.
        # _default for any; the images' own hosts too, for 1.6, which has no _default.
        index = json.loads((IMAGES / "images.json").read_text())
        hosts = {n.split("/", 1)[0] for e in index.values() for n in e["names"]}
        for host in sorted(hosts | {"_default"}):
            toml = self.base / "certs.d" / host / "hosts.toml"
            toml.parent.mkdir(parents=True)
            url = f"http://{self.registry_addr}"
            # server alone does for 1.7+; 1.6 still went upstream without the host entry
            toml.write_text(
                f'server = "{url}"\n[host."{url}"]\n  capabilities = ["pull", "resolve"]\n'
            )
        (self.base / "registry.yml").write_text(registry_config(self.base, self.registry_addr))
        with open(self.base / "registry.log", "ab") as out:
            self.registry = subprocess.Popen(
                ["/usr/bin/docker-registry", "serve", str(self.base / "registry.yml")],
                stdout=out, stderr=out, start_new_session=True,
            )  # fmt: skip

        def registry_up() -> bool:
            try:
                with urllib.request.urlopen(f"http://{self.registry_addr}/v2/", timeout=2):
                    return True
            except OSError:
                return False

        wait_for("docker-registry", registry_up, self.registry)
        for entry in index.values():
            push(IMAGES / entry["archive"], self.registry_addr)
        pushed = sum(len(e["names"]) for e in index.values())
        log(f"pushed {pushed} names to {self.registry_addr}")
        config = self.base / "config.toml"
        config.write_text(containerd_config(self.base, self.version))
        with open(self.base / "containerd.log", "ab") as out:
            self.containerd = subprocess.Popen(
                [str(self.containerd_bin), "--config", str(config)],
                stdout=out, stderr=out, env=self.env(), start_new_session=True,
            )  # fmt: skip
        wait_for("containerd", self.sock.exists, self.containerd)
        for entry in index.values():
            self.ctr("-n", "k8s.io", "images", "import", str(IMAGES / entry["archive"]))
        log(f"containerd {self.version} up, {len(index)} images preloaded into k8s.io")

    def run_critest(self, handler: str) -> dict[str, Spec]:
        junit = self.results / f"{handler}.xml"
        ep = f"unix://{self.sock}"
        argv = [str(CRITEST), f"--runtime-endpoint={ep}", f"--image-endpoint={ep}",
                f"--runtime-handler={handler}", f"--ginkgo.junit-report={junit}",
                "--ginkgo.no-color", "--ginkgo.timeout=3h"]  # fmt: skip
        if self.args.focus:
            argv.append(f"--ginkgo.focus={self.args.focus}")
        if self.args.skip:
            argv.append(f"--ginkgo.skip={self.args.skip}")
        log(f"{handler}: {' '.join(argv[1:])}")
        started = time.monotonic()
        out_path = self.results / f"{handler}.log"
        with open(out_path, "wb") as out:
            # its own session: a Ctrl-C reaches it through us, after containerd's is safe
            self.critest = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE if self.args.verbose else out,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,
            )
            if self.args.verbose and self.critest.stdout is not None:
                for line in self.critest.stdout:
                    out.write(line)
                    sys.stdout.buffer.write(line)
                    sys.stdout.flush()
            while self.critest.poll() is None:
                self.note_netns()
                time.sleep(2)
        self.critest = None
        summary = [
            line
            for line in out_path.read_text(errors="replace").splitlines()
            if " Passed | " in line
        ]
        log(f"{handler}: {summary[-1].strip() if summary else 'no summary'} "
            f"({time.monotonic() - started:.0f} s, {out_path})")  # fmt: skip
        self.remove_pods()
        return read_junit(junit)

    def note_netns(self) -> None:
        """Remember our pods' netns so that any left after containerd stops are removed."""
        try:
            for pod in self.crictl("pods", "-q", check=False).split():
                info = json.loads(self.crictl("inspectp", pod, check=False) or "{}")
                spec = (info.get("info") or {}).get("runtimeSpec") or {}
                for ns in (spec.get("linux") or {}).get("namespaces") or []:
                    if ns.get("type") == "network" and ns.get("path"):
                        self.netns.add(ns["path"])
        except (subprocess.SubprocessError, ValueError, AttributeError, RuntimeError):
            pass  # best effort: pods come and go

    def remove_pods(self) -> None:
        if self.containerd is None or self.containerd.poll() is not None:
            return
        self.note_netns()
        for pod in self.crictl("pods", "-q", check=False).split():
            self.crictl("stopp", pod, check=False)
            self.crictl("rmp", "-f", pod, check=False)

    def cleanup(self) -> None:
        steps: list[tuple[str, Callable[[], None]]] = [
            ("critest", self._stop_critest),
            ("pods", self.remove_pods),
            ("containerd", lambda: stop(self.containerd)),
            ("shims", self._kill_shims),
            ("registry", lambda: stop(self.registry)),
            ("logs", self._keep_logs),
            ("mounts", self._unmount),
            ("network", self._network),
            ("files", self._remove_files),
            ("critest's temp dirs", self._remove_critest_tmp),
            ("critest's shm segments", self._remove_critest_shm),
        ]
        for name, step in steps:
            try:
                step()
            except Exception as e:  # clean up the rest whatever fails
                log(f"cleanup of {name} failed: {e}")

    def _remove_files(self) -> None:
        subprocess.run(["rm", "-rf", str(self.base)], check=False)

    def _remove_critest_tmp(self) -> None:
        """The RRO specs' host paths: left when a spec fails before its cleanup, or it fails."""
        for d in critest_tmp_dirs() - self.tmp_dirs:
            with open("/proc/self/mountinfo") as f:
                points = [line.split()[4] for line in f]
            for point in sorted((p for p in points if p.startswith(f"{d}/")), reverse=True):
                subprocess.run(["umount", "-l", point], check=False, capture_output=True)
            subprocess.run(["rm", "-rf", "--one-file-system", d], check=False)

    def _remove_critest_shm(self) -> None:
        """The HostIpc specs' `ipcmk -M 1048576` on the host, which they never remove."""
        for shmid in critest_shm() - self.shm:
            subprocess.run(["ipcrm", "-m", shmid], check=False, capture_output=True)

    def _stop_critest(self) -> None:
        if self.critest is not None:
            # SIGINT: ginkgo runs the specs' cleanup (their pods) before it exits
            stop(self.critest, signal.SIGINT, timeout=120)

    def _kill_shims(self) -> None:
        """Shims of our containerd that outlived it (their -address is our socket)."""
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"-address" in cmdline and str(self.sock).encode() in cmdline:
                log(f"killing leftover shim {pid}")
                os.kill(int(pid), signal.SIGKILL)

    def _keep_logs(self) -> None:
        for name in ("containerd.log", "registry.log", "config.toml"):
            if (self.base / name).exists():
                (self.results / name).write_bytes((self.base / name).read_bytes())

    def _unmount(self) -> None:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        ours = [p for p in points if p.startswith(f"{self.base}/") or p in self.netns]
        for point in sorted(set(ours), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        for ns in self.netns:
            Path(ns).unlink(missing_ok=True)

    def _network(self) -> None:
        subprocess.run(["ip", "link", "del", self.bridge], check=False, capture_output=True)
        subprocess.run(["rm", "-rf", f"/var/lib/cni/networks/{self.network}"], check=False)
        if portmap_chains_exist():
            remove_portmap_chains()


def critest_tmp_dirs() -> set[str]:
    """The host paths critest's read-only mount specs make: /tmp/test<pod ID><random>."""
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    return {str(d) for d in tmp.glob("test*") if re.fullmatch(r"test[0-9a-f]{64}\d+", d.name)}


def critest_shm() -> set[str]:
    """IDs of the host's unattached 1 MiB System V segments: what critest's ipcmk makes."""
    with open("/proc/sysvipc/shm") as f:
        rows = [line.split() for line in f][1:]
    # columns: key shmid perms size cpid lpid nattch ...
    return {r[1] for r in rows if r[3] == "1048576" and r[6] == "0"}


def _nat(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["iptables", "-w", "-t", "nat", *args], capture_output=True, text=True)


def portmap_chains_exist() -> bool:
    return _nat("-S", "CNI-HOSTPORT-DNAT").returncode == 0


def remove_portmap_chains() -> None:
    """portmap's top-level chains and their jumps, if no pod's port mapping is left in them.

    Whoever made them: two runs overlap, so "this run made them" cannot be told,
    and portmap makes them again on its next port mapping.
    """
    if len(_nat("-S", "CNI-HOSTPORT-DNAT").stdout.splitlines()) > 1:
        return  # someone else's pod maps a port now
    _nat("-D", "PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "CNI-HOSTPORT-DNAT")
    _nat("-D", "OUTPUT", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "CNI-HOSTPORT-DNAT")
    _nat("-D", "POSTROUTING", "-m", "comment", "--comment", "CNI portfwd requiring masquerade",
         "-j", "CNI-HOSTPORT-MASQ")  # fmt: skip
    for chain in ("CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-MASQ", "CNI-HOSTPORT-SETMARK"):
        _nat("-F", chain)
        _nat("-X", chain)


# Specs runc passes and kata-py fails, each for a reason written down in
# docs/differences.md (by the title after the colon). Any other such spec fails the run.
KNOWN_DIFFERENCES = {
    "[k8s.io] Container Mount Propagation runtime should support mount propagation mount with "
    "'rshared' should support propagation from host to container and vice versa":
        "rshared mount propagation",
    "[k8s.io] Security Context NamespaceOption runtime should support HostIpc is true":
        "Host IPC",
    "[k8s.io] Security Context NamespaceOption runtime should support HostNetwork is true":
        "Host network",
    "[k8s.io] Streaming runtime should support streaming interfaces runtime should support "
    "portforward in host network": "Host network",
}  # fmt: skip


def report(results: dict[str, dict[str, Spec]], out: Path) -> int:
    lines = ["", f"{'handler':<10} {'passed':>7} {'failed':>7} {'skipped':>8} {'total':>6}"]
    for handler, specs in results.items():
        n = {
            s: sum(1 for v in specs.values() if v.status == s)
            for s in ("passed", "failed", "skipped")
        }
        lines.append(
            f"{handler:<10} {n['passed']:>7} {n['failed']:>7} {n['skipped']:>8} {len(specs):>6}"
        )
    worse = 0
    if len(results) == 2:
        (a, sa), (b, sb) = results.items()
        diff = sorted(
            n
            for n in set(sa) | set(sb)
            if sa.get(n, Spec("-", "")).status != sb.get(n, Spec("-", "")).status
        )
        lines += ["", f"{len(diff)} specs differ between {a} and {b}:"]
        for name in diff:
            x, y = sa.get(name, Spec("missing", "")), sb.get(name, Spec("missing", ""))
            known = KNOWN_DIFFERENCES.get(name) if b.startswith("kata-py") else None
            worse += x.status == "passed" and y.status != "passed" and known is None
            lines.append(f"- {name}\n    {a}: {x.status}  {b}: {y.status}")
            if known is not None:
                lines.append(f"    known: docs/differences.md, {known!r}")
            for handler, spec in ((a, x), (b, y)):
                if spec.status != "passed" and spec.message:
                    lines.append(f"    {handler}: {spec.message[:600]}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    out.write_text(text)
    return 1 if worse else 0


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--handler", choices=["runc", "kata-py", "both"], default="both")
    p.add_argument("--focus", default="", help="ginkgo focus regex")
    p.add_argument("--skip", default="", help="ginkgo skip regex")
    p.add_argument("--containerd", default="2.4.2", choices=["2.4.2", "2.2.9", "1.7.35", "1.6"])
    p.add_argument(
        "--results",
        default="",
        help="directory for the reports (default build/critest-results/...)",
    )
    p.add_argument("--verbose", action="store_true", help="stream critest's output")
    p.add_argument("--registry-port", type=int, default=5000, help="the local registry's port")
    p.add_argument(
        "--baseline",
        default="",
        help="a JUnit report of another handler from an earlier run (e.g. .../runc.xml), "
        "to compare a one-handler run with",
    )
    args = p.parse_args()
    if os.geteuid() != 0:
        log("run as root: it starts containerd, CNI and pods")
        return 2
    handlers = ["runc", "kata-py"] if args.handler == "both" else [args.handler]
    run = Run(args)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    results: dict[str, dict[str, Spec]] = {}
    try:
        run.setup()
        for handler in handlers:
            results[handler] = run.run_critest(handler)
    except Interrupted as e:
        log(f"interrupted ({e}): cleaning up")
    except (RuntimeError, subprocess.CalledProcessError) as e:
        log(f"failed: {e}")
        results = {}
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # let the cleanup finish
        run.cleanup()
        log(f"cleaned up; results in {run.results}")
    if not results:
        return 1
    if args.baseline and len(results) == 1:
        baseline = Path(args.baseline)
        log(f"comparing with {baseline}")
        results = {f"{baseline.stem}*": read_junit(baseline), **results}
    return report(results, run.results / "summary.txt")


if __name__ == "__main__":
    sys.exit(main())
