"""Runs inside a pod's VM (``bench/container_create.py`` sends it): crun create against
a container made by the caller itself, as Kata's agent does without an OCI runtime.

Standard library only (the guest's Python), libseccomp through ctypes. Reads
``{"spec": ..., "rootfs": ..., "rounds": N}`` from the file named by argv[1] and
prints one line, ``RESULT <json>``: the seconds from the request until the
container's process waits to be started (what the agent waits for in
CreateContainer), per variant and round, and what one probe container of each
variant printed, so that the two can be compared.

The direct create does, in a fork: unshare of the spec's namespaces, a second
fork into the new PID namespace, the spec's mounts on a private bind of the
rootfs, the default devices, pivot_root, masked and read-only paths, hostname,
rlimits, the capability sets, no_new_privs and the seccomp filter; then it
reports ready and waits for the start byte before its execve. It does not do
the v2 devices eBPF filter, hooks, users other than root, a terminal, or any
of the OCI spec beyond what ``ctr oci spec`` asks for; the ``crun-nodev``
variant is crun on the same spec without device rules, the like-for-like one.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import shutil
import sys
import time
from typing import Any

Spec = dict[str, Any]

LIBC = ctypes.CDLL(None, use_errno=True)
SYS_PIVOT_ROOT, SYS_CAPSET = 155, 126  # x86_64
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER = 38, 24, 36
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
NAMESPACES = {
    "mount": 0x00020000, "uts": 0x04000000, "ipc": 0x08000000,
    "network": 0x40000000, "pid": 0x20000000, "cgroup": 0x02000000,
}  # fmt: skip
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_BIND, MS_REC = 32, 1024, 4096, 16384
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
MNT_DETACH = 2
FLAGS = {
    "ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
    "bind": MS_BIND, "rbind": MS_BIND | MS_REC, "noatime": MS_NOATIME,
    "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME,
}  # fmt: skip
NO_FLAG = {"rw", "suid", "dev", "exec", "private", "rprivate"}
DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8),
           "urandom": (1, 9), "tty": (5, 0)}  # fmt: skip
LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
         "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx", "core": "/proc/kcore"}  # fmt: skip
CAPS = [
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
    "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST",
    "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO",
    "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
    "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
    "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
]  # fmt: skip
SCMP_ACT_ALLOW, SCMP_ACT_ERRNO = 0x7FFF0000, 0x00050000
CGROUP_PARENT = "/sys/fs/cgroup/kpy-bench"
PROBE = (
    "hostname; grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; "
    "ls /dev | tr '\\n' ' '; echo; wc -l < /proc/self/mountinfo; ulimit -n; "
    "ls /proc/acpi | wc -l; touch /proc/sys/x 2>/dev/null || echo ro-ok"
)


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def check(ret: int, what: str) -> None:
    if ret < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    b = [None if v is None else v.encode() for v in (source, target, fstype)]
    check(LIBC.mount(b[0], b[1], b[2], ctypes.c_ulong(flags), data.encode() or None), target)


def mount_options(options: list[str]) -> tuple[int, str]:
    flags, data = 0, []
    for opt in options:
        if opt in FLAGS:
            flags |= FLAGS[opt]
        elif opt not in NO_FLAG:
            data.append(opt)
    return flags, ",".join(data)


def spec_mounts(spec: Spec, rootfs: str) -> None:
    for m in spec.get("mounts") or []:
        target = rootfs + m["destination"]
        flags, data = mount_options(m.get("options") or [])
        if flags & MS_BIND and os.path.isfile(m["source"]):
            if not os.path.exists(target):
                open(target, "a").close()
        else:
            os.makedirs(target, exist_ok=True)
        if flags & MS_BIND:
            mount(m["source"], target, None, flags & (MS_BIND | MS_REC))
            if flags & ~(MS_BIND | MS_REC):
                mount(None, target, None, flags | MS_REMOUNT)
        else:
            mount(m["source"], target, m.get("type"), flags, data)
        if m["destination"] == "/dev":
            for name, (major, minor) in DEVICES.items():
                os.mknod(f"{target}/{name}", 0o20666, os.makedev(major, minor))
                os.chmod(f"{target}/{name}", 0o666)
            for name, to in LINKS.items():
                os.symlink(to, f"{target}/{name}")


def pivot_root(rootfs: str) -> None:
    os.chdir(rootfs)
    check(LIBC.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    check(LIBC.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")


def mask_and_protect(linux: Spec) -> None:
    for path in linux.get("maskedPaths") or []:
        if os.path.isdir(path):
            mount("tmpfs", path, "tmpfs", MS_RDONLY)
        elif os.path.exists(path):
            mount("/dev/null", path, None, MS_BIND)
    for path in linux.get("readonlyPaths") or []:
        if os.path.exists(path):
            mount(path, path, None, MS_BIND | MS_REC)
            mount(None, path, None, MS_BIND | MS_REC | MS_REMOUNT | MS_RDONLY)


def set_capabilities(caps: Spec) -> None:
    def mask(name: str) -> int:
        return sum(1 << CAPS.index(c.removeprefix("CAP_")) for c in caps.get(name) or [])

    bounding = mask("bounding")
    last = int(read("/proc/sys/kernel/cap_last_cap"))
    for cap in range(last + 1):
        if not bounding & (1 << cap):
            check(LIBC.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "drop bounding cap")
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    eff, perm, inh = mask("effective"), mask("permitted"), mask("inheritable")
    data = (ctypes.c_uint32 * 6)(
        eff & 0xFFFFFFFF, perm & 0xFFFFFFFF, inh & 0xFFFFFFFF, eff >> 32, perm >> 32, inh >> 32
    )
    check(LIBC.syscall(SYS_CAPSET, header, data), "capset")
    check(LIBC.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient")


def load_seccomp(profile: Spec) -> None:
    """The profile through libseccomp, as crun compiles it (names and actions only)."""
    seccomp = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    seccomp.seccomp_init.restype = ctypes.c_void_p
    seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]

    def action(name: str) -> int:
        if name == "SCMP_ACT_ALLOW":
            return SCMP_ACT_ALLOW
        return SCMP_ACT_ERRNO | 1  # EPERM

    ctx = ctypes.c_void_p(seccomp.seccomp_init(action(profile["defaultAction"])))
    for rule in profile.get("syscalls") or []:
        for name in rule["names"]:
            nr = seccomp.seccomp_syscall_resolve_name(name.encode())
            if nr >= 0:
                check(seccomp.seccomp_rule_add(ctx, action(rule["action"]), nr, 0), name)
    check(seccomp.seccomp_load(ctx), "seccomp_load")


def container_init(spec: Spec, rootfs: str, ready: int, start: int) -> None:
    """PID 1 of the new PID namespace: set up, report ready, wait, exec."""
    linux = spec.get("linux") or {}
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount(rootfs, rootfs, None, MS_BIND | MS_REC)
    spec_mounts(spec, rootfs)
    pivot_root(rootfs)
    mask_and_protect(linux)
    if spec.get("hostname"):
        name = spec["hostname"].encode()
        check(LIBC.sethostname(name, len(name)), "sethostname")
    for limit in spec["process"].get("rlimits") or []:
        kind = getattr(resource, limit["type"])
        resource.setrlimit(kind, (limit["soft"], limit["hard"]))
    os.chdir(spec["process"].get("cwd") or "/")
    if spec["process"].get("noNewPrivileges"):
        check(LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    set_capabilities(spec["process"].get("capabilities") or {})
    if linux.get("seccomp"):
        load_seccomp(linux["seccomp"])
    os.write(ready, b"R")
    if os.read(start, 1) != b"S":
        os._exit(1)
    env = dict(e.split("=", 1) for e in spec["process"].get("env") or [])
    os.execve(shutil.which(spec["process"]["args"][0], path=env.get("PATH")) or "",
              spec["process"]["args"], env)  # fmt: skip


def direct_create(spec: Spec, rootfs: str, cgroup: str, stdout: int) -> tuple[int, int]:
    """Fork the container's init; returns (its pid, the fd that starts it) once it waits."""
    ready_r, ready_w = os.pipe()
    start_r, start_w = os.pipe()
    pid_r, pid_w = os.pipe()
    flags = 0
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        flags |= NAMESPACES[ns["type"]]
    os.makedirs(cgroup)
    child = os.fork()
    if child == 0:
        try:
            os.dup2(stdout, 1)
            os.dup2(stdout, 2)
            check(LIBC.unshare(flags), "unshare")
            init = os.fork()  # the new PID namespace's first process
            if init == 0:
                container_init(spec, rootfs, ready_w, start_r)
            os.write(pid_w, str(init).encode())
            os._exit(0)
        except BaseException as exc:
            os.write(ready_w, f"E{exc}".encode())
            os._exit(1)
    for fd in (ready_w, start_r, pid_w):
        os.close(fd)
    os.waitpid(child, 0)
    init = int(os.read(pid_r, 32) or b"0")
    os.close(pid_r)
    with open(f"{cgroup}/cgroup.procs", "w") as f:
        f.write(str(init))
    answer = os.read(ready_r, 4096)
    os.close(ready_r)
    if answer != b"R":
        raise RuntimeError(f"direct create failed: {answer.decode(errors='replace')}")
    return init, start_w


def crun_create(bundle: str, cid: str, stdout: int) -> int:
    pid_file = f"{bundle}/init.pid"
    null = os.open("/dev/null", os.O_RDONLY)
    crun = os.fork()
    if crun == 0:
        os.dup2(null, 0)
        os.dup2(stdout, 1)
        os.dup2(stdout, 2)
        os.execv("/usr/bin/crun", ["crun", "--log", f"{bundle}/crun.log", "create",
                                   "--bundle", bundle, "--pid-file", pid_file, cid])  # fmt: skip
    os.close(null)
    _, status = os.waitpid(crun, 0)
    if status != 0:
        raise RuntimeError(f"crun create: {read(f'{bundle}/crun.log')[-500:]}")
    return int(read(pid_file))


def crun_start(cid: str) -> None:
    fifo = f"/run/crun/{cid}/exec.fifo"
    fd = os.open(fifo, os.O_WRONLY)
    os.unlink(fifo)
    os.write(fd, b"\0")
    os.close(fd)


def one(variant: str, spec: Spec, rootfs: str, n: int, args: list[str]) -> tuple[float, str]:
    """One container of ``variant`` running ``args``: (seconds to create, its output)."""
    cid = f"b{os.getpid()}-{variant}-{n}"
    cgroup = f"{CGROUP_PARENT}/{cid}"
    spec = json.loads(json.dumps(spec))
    spec["process"]["args"] = args
    spec["root"] = {"path": rootfs, "readonly": False}
    spec["linux"]["cgroupsPath"] = f"/kpy-bench/{cid}"
    if variant != "crun":
        spec["linux"].get("resources", {}).pop("devices", None)
    out_r, out_w = os.pipe()
    t0 = time.perf_counter()
    if variant.startswith("crun"):
        bundle = f"/run/kpy-bench/{cid}"
        os.makedirs(bundle)
        with open(f"{bundle}/config.json", "w") as f:
            json.dump(spec, f)
        t0 = time.perf_counter()  # not counting config.json, which only crun needs
        pid = crun_create(bundle, cid, out_w)
        created = time.perf_counter() - t0
        crun_start(cid)
    else:
        pid, start = direct_create(spec, rootfs, cgroup, out_w)
        created = time.perf_counter() - t0
        os.write(start, b"S")
        os.close(start)
    os.close(out_w)
    output = b""
    while chunk := os.read(out_r, 65536):
        output += chunk
    os.close(out_r)
    os.waitpid(pid, 0)
    os.rmdir(cgroup)
    if variant.startswith("crun"):
        shutil.rmtree(f"/run/crun/{cid}")
        shutil.rmtree(f"/run/kpy-bench/{cid}")
    return created, output.decode(errors="replace")


def allow_all_but(denied: set[str]) -> Spec:
    """A profile the size of containerd's default: every syscall libseccomp knows but a few."""
    seccomp = ctypes.CDLL("libseccomp.so.2")
    seccomp.seccomp_syscall_resolve_num_arch.restype = ctypes.c_void_p
    names = []
    for nr in range(0, 460):
        p = seccomp.seccomp_syscall_resolve_num_arch(0, nr)
        if p:
            name = ctypes.string_at(p).decode()
            LIBC.free(ctypes.c_void_p(p))
            if name not in denied:
                names.append(name)
    return {"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": names, "action": "SCMP_ACT_ALLOW"}]}  # fmt: skip


def rss_mib(pid: int | str) -> float:
    for line in read(f"/proc/{pid}/status").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def agent_rss_mib() -> float:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if "shimv2.guest" in read(f"/proc/{pid}/cmdline"):
                return rss_mib(pid)
    return 0.0


def main() -> None:
    # What the agent has imported, so that the fork copies a process of about its size.
    import google.protobuf  # noqa: F401
    import trio  # noqa: F401

    from shimv2.pb.kata import agent_pb2  # noqa: F401

    request = json.loads(read(sys.argv[1]))
    spec, rounds = request["spec"], request["rounds"]
    rootfs = json.loads(read(request["config_of"]))["root"]["path"]  # a running container's
    check(LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "subreaper")
    os.makedirs(CGROUP_PARENT, exist_ok=True)
    profile = allow_all_but(
        {
            "kexec_load",
            "init_module",
            "finit_module",
            "delete_module",
            "reboot",
            "swapon",
            "swapoff",
            "acct",
            "bpf",
            "perf_event_open",
        }
    )
    with_seccomp = json.loads(json.dumps(spec))
    with_seccomp["linux"]["seccomp"] = profile
    specs = {"crun": spec, "crun-nodev": spec, "direct": spec,
             "crun-seccomp": with_seccomp, "direct-seccomp": with_seccomp}  # fmt: skip
    probes = {v: one(v, s, rootfs, 0, ["/bin/sh", "-c", PROBE])[1] for v, s in specs.items()}
    times: dict[str, list[float]] = {v: [] for v in specs}
    for n in range(1, rounds + 1):
        for variant, s in specs.items():
            times[variant].append(one(variant, s, rootfs, n, ["/bin/true"])[0])
    os.rmdir(CGROUP_PARENT)
    print("RESULT " + json.dumps({"times": times, "probes": probes, "rss_mib": rss_mib("self"),
                                  "agent_rss_mib": agent_rss_mib(),
                                  "syscalls": len(profile["syscalls"][0]["names"])}))  # fmt: skip


if __name__ == "__main__":
    main()
