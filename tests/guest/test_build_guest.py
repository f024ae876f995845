"""Tests of scripts/build-guest: the guest kernel + initramfs, and a real TCG boot of them.

The module builds build/guest/ first (a no-op when it is up to date), so it also runs on a
fresh checkout.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import selectors
import shutil
import stat
import struct
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "build-guest"
OUT = Path(os.environ.get("KATA_PY_GUEST_OUT", REPO / "build" / "guest"))

# The recipe's FAST kernel command line (reference/vm-recipe.md), microvm + PVH vmlinux.
FAST_CMDLINE = (
    "console=ttyS0 quiet loglevel=0 mitigations=off tsc=reliable no_timer_check nokaslr "
    "cryptomgr.notests random.trust_cpu=on 8250.nr_uarts=1 tsc_early_khz=2100000"
)
BOOT_TIMEOUT = 60.0

# Every module the guest needs must be in the list (unless built into the kernel).
WANTED_MODULES = {
    "virtio_pci",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_mmio",
    "virtio_console",
    "virtio_blk",
    "virtio_net",
    "failover",
    "net_failover",
    "vsock",
    "vmw_vsock_virtio_transport",
    "vmw_vsock_virtio_transport_common",
    "fuse",
    "virtiofs",
    "overlay",
    "virtio_balloon",
}


@dataclasses.dataclass(frozen=True)
class Entry:
    mode: int
    mtime: int
    data: bytes


def _align4(n: int) -> int:
    return (n + 3) & ~3


def parse_newc(data: bytes, entries: dict[str, Entry]) -> None:
    """Add the members of (possibly several concatenated) newc cpio archives to entries."""
    off = 0
    while off < len(data):
        if data[off] == 0:  # padding after a trailer
            off += 1
            continue
        magic = data[off : off + 6]
        assert magic in (b"070701", b"070702"), f"bad cpio magic {magic!r} at {off}"
        fields = [int(data[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        mode, mtime, filesize, namesize = fields[1], fields[5], fields[6], fields[11]
        name = data[off + 110 : off + 110 + namesize - 1].decode()
        off = _align4(off + 110 + namesize)
        content = data[off : off + filesize]
        off = _align4(off + filesize)
        if name != "TRAILER!!!":
            entries[name.removeprefix("./")] = Entry(mode, mtime, content)


def decompress(blob: bytes) -> bytes:
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    if blob[:4] == b"\x02\x21\x4c\x18":  # legacy lz4, as the kernel reads it
        lz4 = shutil.which("lz4")
        assert lz4 is not None, "lz4 is needed to read the initrd"
        res = subprocess.run([lz4, "-dc"], input=blob, capture_output=True, check=True)
        return res.stdout
    if blob[:6] == b"070701":
        return blob
    raise AssertionError(f"unknown initrd member format {blob[:6]!r}")


def run_build() -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    res = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=1800, check=False)
    elapsed = time.monotonic() - start
    assert res.returncode == 0, f"build-guest failed:\n{res.stdout}\n{res.stderr}"
    return res, elapsed


@pytest.fixture(scope="module")
def built() -> subprocess.CompletedProcess[str]:
    res, elapsed = run_build()
    print(f"build-guest took {elapsed:.2f} s")
    return res


@pytest.fixture(scope="module")
def initrd(built: subprocess.CompletedProcess[str]) -> dict[str, Entry]:
    """All members of initrd.img, split by build/guest/initrd.layers."""
    image = (OUT / "initrd.img").read_bytes()
    layers = (OUT / "initrd.layers").read_text().split("\n")
    entries: dict[str, Entry] = {}
    covered = 0
    for line in filter(None, layers):
        name, offset, length = line.split()
        member = image[int(offset) : int(offset) + int(length)]
        assert member == (OUT / name).read_bytes(), f"{name} differs from its part of initrd.img"
        assert not image[covered : int(offset)].strip(b"\0"), "non-zero bytes between archives"
        covered = int(offset) + int(length)
        parse_newc(decompress(member), entries)
    assert covered == len(image)
    return entries


OUTPUTS = ["vmlinuz", "initrd.img", "root.erofs", "image-initrd.img"]


def test_outputs_exist(built: subprocess.CompletedProcess[str]) -> None:
    assert built.stdout.split("\n")[-5:] == [*(str(OUT / name) for name in OUTPUTS), ""]
    kver = (OUT / "kver").read_text().strip()
    assert kver.endswith("-cloud-amd64")
    assert (OUT / "vmlinuz").read_bytes() == Path(f"/boot/vmlinuz-{kver}").read_bytes()
    with (OUT / "vmlinux").open("rb") as f:
        assert f.read(4) == b"\x7fELF"
    assert (OUT / "vmlinux").stat().st_size > 10 * 2**20


def test_initrd_contents(initrd: dict[str, Entry]) -> None:
    def is_file(path: str) -> bool:
        return path in initrd and stat.S_ISREG(initrd[path].mode)

    for path in [
        "init",
        "bin/busybox",
        "usr/bin/python3.11",
        "usr/bin/crun",
        "usr/sbin/runc",
        "lib64/ld-linux-x86-64.so.2",
        "lib/x86_64-linux-gnu/libc.so.6",
        "etc/kata-py/modules",
        "usr/lib/python3.11/json/__init__.py",
        "usr/lib/python3.11/lib-dynload/_json.cpython-311-x86_64-linux-gnu.so",
        "opt/kata-py/site/google/protobuf/__init__.py",
        "opt/kata-py/site/google/_upb/_message.abi3.so",
        "opt/kata-py/lib/.agent-layer",
    ]:
        assert is_file(path), f"{path} missing from initrd"
    assert initrd["init"].mode & 0o111
    assert initrd["init"].data == (REPO / "guest" / "init").read_bytes()
    for applet in ["sh", "mount", "insmod", "ip", "switch_root", "poweroff", "cat", "ls"]:
        entry = initrd[f"bin/{applet}"]
        assert stat.S_ISLNK(entry.mode), applet
        assert entry.data == b"busybox", applet
    for unwanted in ["usr/lib/python3.11/test", "usr/lib/python3.11/idlelib"]:
        assert unwanted not in initrd

    modules = initrd["etc/kata-py/modules"].data.decode().split()
    assert modules, "empty module list"
    for ko in modules:
        assert ko.startswith("/lib/modules/"), ko
        assert ko.endswith(".ko"), ko
        assert is_file(ko.lstrip("/")), f"{ko} listed but missing"
    names = {Path(ko).stem for ko in modules}
    builtin = Path(f"/lib/modules/{(OUT / 'kver').read_text().strip()}/modules.builtin")
    builtins = {Path(line).stem for line in builtin.read_text().split()}
    assert WANTED_MODULES - builtins <= names
    # dependencies come before their users
    assert modules.index(next(m for m in modules if m.endswith("/virtio.ko"))) < modules.index(
        next(m for m in modules if m.endswith("/virtio_pci.ko"))
    )

    # the agent layer: our package, precompiled
    for src in (REPO / "shimv2").rglob("*.py"):
        rel = src.relative_to(REPO).as_posix()
        if rel.startswith(("shimv2/ttrpc/", "shimv2/pb/", "shimv2/guest/")) or rel in (
            "shimv2/__init__.py",
            "shimv2/errdefs.py",
        ):
            assert is_file(f"opt/kata-py/lib/{rel}"), rel
            pyc = f"opt/kata-py/lib/{src.parent.relative_to(REPO).as_posix()}/__pycache__/"
            pyc += f"{src.stem}.cpython-311.pyc"
            assert is_file(pyc), pyc


@pytest.mark.parametrize(
    "source",
    [
        "usr/lib/python3.11/json/__init__.py",
        "usr/lib/python3.11/encodings/utf_8.py",
        "usr/lib/python3.11/subprocess.py",
        "opt/kata-py/site/google/protobuf/message.py",
        "opt/kata-py/lib/shimv2/__init__.py",
    ],
)
def test_pyc_matches_source(initrd: dict[str, Entry], source: str) -> None:
    """Each .pyc records the mtime and size of its source, else Python recompiles on boot."""
    src = initrd[source]
    parent, _, name = source.rpartition("/")
    pyc = initrd[f"{parent}/__pycache__/{name[:-3]}.cpython-311.pyc"].data
    flags, mtime, size = struct.unpack("<III", pyc[4:16])
    assert flags == 0, "expected timestamp-based .pyc"
    assert (mtime, size) == (src.mtime & 0xFFFFFFFF, len(src.data))


def test_second_run_is_quick_noop(built: subprocess.CompletedProcess[str]) -> None:
    before = {name: (OUT / name).stat().st_mtime_ns for name in OUTPUTS}
    res, elapsed = run_build()
    print(f"no-op build-guest took {elapsed:.3f} s")
    assert res.stdout == built.stdout
    assert res.stdout.split("\n") == [*(str(OUT / name) for name in OUTPUTS), ""]
    for part in ("base layer", "agent layer", "root image", "image initrd"):
        assert f"{part}: up to date" in res.stderr
    assert res.stderr.count(": up to date") == 5  # and the kernel
    assert {name: (OUT / name).stat().st_mtime_ns for name in OUTPUTS} == before
    assert elapsed < 2.0


BOOTS = ["initrd-microvm", "image-q35", "image-microvm"]


def boot_args(boot: str) -> tuple[list[str], str]:
    """QEMU arguments and kernel parameters for a root (what shimv2/vc/qemu.py does)."""
    if boot == "initrd-microvm":
        return ["-m", "512", "-M", "microvm", "-initrd", str(OUT / "initrd.img")], ""
    size = (OUT / "root.erofs").stat().st_size >> 20
    image = f"memory-backend-file,id=img,mem-path={OUT / 'root.erofs'},size={size}M"
    image += ",share=on,readonly=on"
    initrd = ["-initrd", str(OUT / "image-initrd.img")]
    if boot == "image-q35":
        pmem = ["-object", image, "-device", "virtio-pmem-pci,memdev=img"]
        return ["-m", "512M,maxmem=2G", "-M", "q35", *initrd, *pmem], ""
    # microvm: the image between two NUMA nodes of RAM, made legacy pmem by memmap=
    ram = [
        "-object", "memory-backend-ram,id=lo,size=256M", "-numa", "node,memdev=lo",
        "-object", image, "-numa", "node,memdev=img",
        "-object", "memory-backend-ram,id=hi,size=256M", "-numa", "node,memdev=hi",
    ]  # fmt: skip
    return ["-m", f"{512 + size}M", "-M", "microvm,pcie=on", *initrd, *ram], f"memmap={size}M!256M"


def test_image_initrd_contents(built: subprocess.CompletedProcess[str]) -> None:
    """The small initramfs: busybox, its /init, and the modules that mount the image."""
    blob = (OUT / "image-initrd.img").read_bytes()
    assert len(blob) < 3 * 2**20, "the image initrd should stay small"
    entries: dict[str, Entry] = {}
    parse_newc(decompress(blob), entries)
    assert entries["init"].data == (REPO / "guest" / "image-init").read_bytes()
    assert entries["init"].mode & 0o111
    assert stat.S_ISREG(entries["bin/busybox"].mode)
    for applet in ["sh", "mount", "insmod", "switch_root", "poweroff", "cp", "sleep"]:
        assert entries[f"bin/{applet}"].data == b"busybox", applet
    modules = entries["etc/kata-py/root-modules"].data.decode().split()
    names = [Path(ko).stem for ko in modules]
    for ko in modules:
        assert stat.S_ISREG(entries[ko.lstrip("/")].mode), f"{ko} listed but missing"
    for wanted in ["virtio_pci", "libnvdimm", "nd_pmem", "nd_e820", "virtio_pmem", "erofs"]:
        assert wanted in names
    assert names.index("libnvdimm") < names.index("nd_pmem") < names.index("erofs")
    assert names.index("virtio") < names.index("virtio_pmem")
    assert not any(p.startswith("usr/") for p in entries), "python belongs in the image"


def test_root_image_holds_what_the_initrd_holds(initrd: dict[str, Entry], tmp_path: Path) -> None:
    image = OUT / "root.erofs"
    data = image.read_bytes()
    assert len(data) % (128 << 20) == 0, "the image is whole memory blocks"
    assert struct.unpack_from("<I", data, 1024)[0] == 0xE0F5E1E2, "no erofs superblock"
    tree = tmp_path / "tree"
    subprocess.run(["fsck.erofs", f"--extract={tree}", str(image)], check=True, capture_output=True)
    found = {p.relative_to(tree).as_posix() for p in tree.rglob("*")}
    assert found == set(initrd)
    for name, entry in initrd.items():
        path = tree / name
        st = path.lstat()
        assert st.st_mode == entry.mode, name
        if stat.S_ISREG(entry.mode):
            assert path.read_bytes() == entry.data, name
            # the .pyc files record their sources' mtimes: kept exactly, not the build time
            assert int(st.st_mtime) == entry.mtime, name
        elif stat.S_ISLNK(entry.mode):
            assert os.readlink(path).encode() == entry.data, name


@pytest.mark.parametrize(
    "path",
    ["usr/bin/python3.11", "usr/lib/python3.11/os.py", "init", "etc/passwd"],
)
def test_root_image_files_are_not_inline(
    built: subprocess.CompletedProcess[str], path: str
) -> None:
    """An inline tail (mkfs.erofs's default) is not mapped with DAX: the guest would copy it."""
    res = subprocess.run(
        ["dump.erofs", f"--path=/{path}", str(OUT / "root.erofs")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "Layout: 0 " in res.stdout, res.stdout  # EROFS_INODE_FLAT_PLAIN


@pytest.mark.vm
@pytest.mark.parametrize("boot", BOOTS)
def test_boot_selftest(built: subprocess.CompletedProcess[str], boot: str) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu is not None, "qemu-system-x86_64 not installed"
    args, params = boot_args(boot)
    cmd = [
        qemu, "-accel", "tcg", "-cpu", "max", *args,
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
        "-kernel", str(OUT / "vmlinux"),
        "-append", f"{FAST_CMDLINE} {params} kata_py.selftest=1",
    ]  # fmt: skip
    start = time.monotonic()
    deadline = start + BOOT_TIMEOUT
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output = b""
    ok_at: float | None = None
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not sel.select(timeout=deadline - time.monotonic()):
                    continue
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                output += chunk
                if ok_at is None and b"KATA_PY_SELFTEST_OK" in output:
                    ok_at = time.monotonic() - start
        rc = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    text = output.decode(errors="replace")
    print(text)
    assert "KATA_PY_SELFTEST_FAIL" not in text
    assert "KATA_PY_ROOT_FAIL" not in text
    assert ok_at is not None, f"no KATA_PY_SELFTEST_OK within {BOOT_TIMEOUT} s:\n{text}"
    assert ("KATA_PY_ROOT_MOUNTED" in text) == boot.startswith("image-")
    assert rc == 0, f"qemu exited with {rc}"
    assert "Kernel panic" not in text
    total = time.monotonic() - start
    print(f"boot to KATA_PY_SELFTEST_OK: {ok_at:.2f} s, qemu exit: {total:.2f} s")
