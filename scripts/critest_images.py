"""Build the images critest expects, locally and offline, from Debian packages.

Usage: scripts/build-critest-images [--force]

Writes one OCI image archive per image into build/critest-images/ (for ``ctr -n
k8s.io images import`` and scripts/oci_image.py's push), and images.json there:
each archive with its names and image ID. Skipped when up to date (a stamp of
the inputs); the .debs are cached in build/critest-images/debs, so a rebuild
needs no network.

What the specs need (../shared/reference/critest.md §1): Debian's
*dynamic* busybox, as hard links (a masked /bin/ls must be an exec that fails
with "Permission denied"; busybox-static runs applets in-shell), plus a pgrep
(busybox 1.35 has none) and util-linux's ipcs; nginx as PID 1 with its master
process and /var/run/nginx.pid; an httpd on :80 that logs "httpd" (busybox
httpd); a setuid-root binary printing its effective uid (nonewprivs); the
user/group images; distinct tagged images for the image-manager specs; pause.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oci_image import Image, Layer, layer_from_dir, write_archive

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "critest-images"
DEBS = OUT / "debs"
PACKAGES = ["busybox", "libc6", "util-linux", "nginx", "libcrypt1", "libpcre2-8-0", "libssl3",
            "zlib1g"]  # fmt: skip
LIB_DIRS = ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"]
E2E = "registry.k8s.io/e2e-test-images/"
CRI_TOOLS = "gcr.io/k8s-staging-cri-tools/"
# The CRI sandbox image: scripts/critest pins it (containerd 2.4's default name).
SANDBOX = "registry.k8s.io/pause:3.10.2"

PASSWD = """root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
"""
GROUP = """root:x:0:
daemon:x:1:
www-data:x:33:
nogroup:x:65534:
"""
# busybox 1.35 has no pgrep: the specs call `pgrep sleep || true` and want
# nothing on stdout or stderr when no sleep is left.
PGREP = r"""#!/bin/sh
# pgrep PATTERN: the pids whose command name matches PATTERN (a grep regex)
[ $# -eq 1 ] || { echo "usage: pgrep PATTERN" >&2; exit 2; }
rc=1
for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    [ "$pid" = "$$" ] && continue
    read -r comm 2>/dev/null <"$d/comm" || continue
    if echo "$comm" | grep -q -- "$1"; then echo "$pid"; rc=0; fi
done
exit $rc
"""
NGINX_CONF = """user nobody nogroup;
worker_processes 1;
pid /var/run/nginx.pid;
error_log stderr;
events { worker_connections 64; }
http {
    access_log /dev/stdout;
    default_type text/html;
    server {
        listen %d;
        root /usr/share/nginx/html;
    }
}
"""
NNP_C = """#include <stdio.h>
#include <unistd.h>
int main(void) { printf("Effective uid: %d\\n", (int)geteuid()); return 0; }
"""
# Like Kubernetes' pause: containers share the pod's PID namespace with it, so a
# shell loop would show its `sleep` to the specs' `pgrep sleep`.
PAUSE_C = """#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
static void quit(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
    struct sigaction q = {.sa_handler = quit};
    struct sigaction r = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP | SA_RESTART};
    sigaction(SIGINT, &q, 0);
    sigaction(SIGTERM, &q, 0);
    sigaction(SIGCHLD, &r, 0);
    for (;;) pause();
}
"""


def run(*argv: str, cwd: Path | None = None) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, cwd=cwd).stdout


def debs() -> list[Path]:
    """The cached .deb of each package, downloaded when missing."""
    DEBS.mkdir(parents=True, exist_ok=True)
    missing = [p for p in PACKAGES if not list(DEBS.glob(f"{p}_*.deb"))]
    if missing:
        print(f"build-critest-images: apt-get download {' '.join(missing)}")
        try:
            run("apt-get", "download", *missing, cwd=DEBS)
        except subprocess.CalledProcessError:
            # a fresh machine's package lists may be missing or stale
            run("apt-get", "update", "-qq")
            run("apt-get", "download", *missing, cwd=DEBS)
    return [sorted(DEBS.glob(f"{p}_*.deb"))[-1] for p in PACKAGES]


class Tree:
    """A directory to become one layer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True)
        os.chmod(path, 0o755)

    def dir(self, rel: str, mode: int = 0o755) -> Path:
        p = self.path / rel
        p.mkdir(parents=True, exist_ok=True)
        os.chmod(p, mode)
        return p

    def file(self, rel: str, data: str | bytes, mode: int = 0o644) -> Path:
        p = self.path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        os.chmod(p, mode)
        return p

    def copy(self, src: Path, rel: str, mode: int = 0o755) -> Path:
        return self.file(rel, src.read_bytes(), mode)

    def layer(self) -> Layer:
        return layer_from_dir(self.path)


def needed(binary: Path) -> list[str]:
    out = run("readelf", "-d", str(binary))
    return [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


def add_libs(tree: Tree, binaries: list[Path], sysroot: Path, have: set[str]) -> None:
    """Copy the shared-library closure of binaries from sysroot; skip the sonames in have."""
    todo = [lib for b in binaries for lib in needed(b)]
    while todo:
        soname = todo.pop()
        if soname in have:
            continue
        have.add(soname)
        src = next(
            (sysroot / d / soname for d in LIB_DIRS if (sysroot / d / soname).exists()), None
        )
        if src is None:
            sys.exit(f"build-critest-images: {soname} is in none of {PACKAGES}")
        dst = tree.copy(src.resolve(), f"lib/x86_64-linux-gnu/{soname}")
        todo += needed(dst)


def base_tree(tree: Tree, sysroot: Path, have: set[str]) -> None:
    for d in ("etc", "home", "root", "proc", "sys", "dev", "usr/bin", "usr/sbin", "var/run",
              "var/www", "lib64", "lib/x86_64-linux-gnu"):  # fmt: skip
        tree.dir(d, 0o700 if d == "root" else 0o755)
    tree.dir("tmp", 0o1777)
    busybox = tree.copy(sysroot / "bin/busybox", "bin/busybox")
    applets = run(str(busybox), "--list").split()
    for applet in sorted(set(applets) - {"busybox"}):
        os.link(busybox, tree.path / "bin" / applet)  # hard links: see the docstring
    tree.file("bin/pgrep", PGREP, 0o755)
    ipcs = tree.copy(sysroot / "usr/bin/ipcs", "usr/bin/ipcs")
    add_libs(tree, [busybox, ipcs], sysroot, have)
    loader = "ld-linux-x86-64.so.2"
    tree.copy((sysroot / "lib64" / loader).resolve(), f"lib/x86_64-linux-gnu/{loader}")
    os.symlink(f"/lib/x86_64-linux-gnu/{loader}", tree.path / "lib64" / loader)
    have.add(loader)
    tree.file("etc/passwd", PASSWD)
    tree.file("etc/group", GROUP)


def nginx_tree(tree: Tree, sysroot: Path, have: set[str], port: int) -> None:
    nginx = tree.copy(sysroot / "usr/sbin/nginx", "usr/sbin/nginx")
    add_libs(tree, [nginx], sysroot, set(have))
    tree.file("etc/nginx/nginx.conf", NGINX_CONF % port)
    tree.file("usr/share/nginx/html/index.html", "<html><body>nginx</body></html>\n")
    tree.dir("var/lib/nginx")  # its temp paths are made under it at start
    tree.dir("var/log/nginx")


def compile_c(tmp: Path, source: str, out: Path) -> None:
    """A static binary: it needs no libraries in its image."""
    src = tmp / (out.name + ".c")
    src.write_text(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    run("gcc", "-static", "-O2", "-o", str(out), str(src))
    os.chmod(out, 0o755)


def marker(tmp: Path, name: str) -> Layer:
    """A layer holding one empty file named after the image, as upstream's test images do."""
    tree = Tree(tmp / f"marker-{name}")
    tree.file(name.replace("/", "_").replace(":", "_"), "")
    return tree.layer()


def images(tmp: Path, sysroot: Path) -> dict[str, Image]:
    have: set[str] = set()
    base = Tree(tmp / "base")
    base_tree(base, sysroot, have)
    bb = base.layer()
    nginx = Tree(tmp / "nginx")
    nginx_tree(nginx, sysroot, have, 80)
    hostnet = Tree(tmp / "hostnet-nginx")
    nginx_tree(hostnet, sysroot, have, 12003)
    # -e stderr: Debian's nginx opens /var/log/nginx/error.log before reading its config
    nginx_cmd = {"Entrypoint": ["nginx", "-e", "stderr", "-g", "daemon off;"]}
    www = Tree(tmp / "httpd")
    www.file("var/www/index.html", "<html><body>httpd</body></html>\n")
    httpd_cmd = ["sh", "-c", "echo 'httpd: listening on :80'; exec httpd -f -v -p 80 -h /var/www"]
    nnp = Tree(tmp / "nonewprivs")
    compile_c(tmp, NNP_C, nnp.path / "usr/local/bin/nnp")
    os.chmod(nnp.path / "usr/local/bin/nnp", 0o4755)  # setuid root: what NoNewPrivs defeats
    pause = Tree(tmp / "pause")
    compile_c(tmp, PAUSE_C, pause.path / "pause")
    pause_layer = pause.layer()
    group = Tree(tmp / "predefined-group")
    group.file("etc/passwd", PASSWD + "default-user:x:1000:1000::/home/default-user:/bin/sh\n")
    group.file(
        "etc/group", GROUP + "default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n"
    )
    group.dir("home/default-user")

    def tagged(*names: str, **config: object) -> Image:
        return Image(list(names), [bb, marker(tmp, names[0].rsplit("/", 1)[-1])], dict(config))

    out = {
        "busybox": Image([E2E + "busybox:1.29-2"], [bb], {"Cmd": ["sh"]}),
        "nginx": Image([E2E + "nginx:1.14-2"], [bb, nginx.layer()], nginx_cmd),
        "httpd": Image([E2E + "httpd:2.4.39-4"], [bb, www.layer()], {"Cmd": httpd_cmd}),
        "nonewprivs": Image([E2E + "nonewprivs:1.3"], [bb, nnp.layer()],
                            {"Cmd": ["/usr/local/bin/nnp"]}),
        "hostnet-nginx": Image([CRI_TOOLS + "hostnet-nginx-amd64:latest"], [bb, hostnet.layer()],
                               nginx_cmd),
        "test-image-predefined-group": Image([CRI_TOOLS + "test-image-predefined-group:latest"],
                                             [bb, group.layer()], {"Cmd": ["sh"], "User": "1000"}),
        # a marker: removing pause:3.9 by ID must not remove the sandbox image
        "pause-3.9": Image(["registry.k8s.io/pause:3.9", "k8s.gcr.io/pause:3.9"],
                           [pause_layer, marker(tmp, "pause-3.9")], {"Entrypoint": ["/pause"]}),
        "sandbox": Image([SANDBOX], [pause_layer], {"Entrypoint": ["/pause"]}),
        "test-image-tags": tagged(*(f"{CRI_TOOLS}test-image-tags:{n}" for n in (1, 2, 3)),
                                  Cmd=["sh"]),
    }  # fmt: skip
    for name, user in (("uid", "1002"), ("username", "www-data"), ("uid-group", "1003:1004"),
                       ("username-group", "www-data:1004")):  # fmt: skip
        out[f"test-image-user-{name}"] = tagged(
            f"{CRI_TOOLS}test-image-user-{name}:latest", Cmd=["sh"], User=user
        )
    for ref in ("test-image-tag:test", "test-image-tag:all", "test-image-latest:latest",
                "test-image-1:latest", "test-image-2:latest", "test-image-3:latest"):  # fmt: skip
        out[ref.replace(":", "_")] = tagged(CRI_TOOLS + ref, Cmd=["sh"])
    return out


def stamp(deb_files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in (Path(__file__), Path(__file__).with_name("oci_image.py")):
        h.update(f.read_bytes())
    h.update("\n".join(d.name for d in deb_files).encode())
    h.update(run("gcc", "--version").encode())
    return h.hexdigest()


def main(argv: list[str]) -> int:
    if argv not in ([], ["--force"]):
        print(__doc__, file=sys.stderr)
        return 2
    deb_files = debs()
    want = stamp(deb_files)
    stamp_file, index_file = OUT / ".stamp", OUT / "images.json"
    if argv != ["--force"] and stamp_file.exists() and stamp_file.read_text() == want:
        listed = json.loads(index_file.read_text()) if index_file.exists() else {}
        if listed and all((OUT / e["archive"]).exists() for e in listed.values()):
            print(f"build-critest-images: {OUT} is up to date")
            return 0
    stamp_file.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="critest-images-") as t:
        tmp = Path(t)
        sysroot = tmp / "sysroot"
        for deb in deb_files:
            run("dpkg-deb", "-x", str(deb), str(sysroot))
        index: dict[str, dict[str, object]] = {}
        for key, image in images(tmp, sysroot).items():
            archive = f"{key}.tar"
            image_id = write_archive(OUT / archive, image)
            index[key] = {"archive": archive, "names": image.names, "id": image_id}
            print(f"build-critest-images: {archive} {image_id[:19]} {' '.join(image.names)}")
    for stale in set(OUT.glob("*.tar")) - {OUT / str(e["archive"]) for e in index.values()}:
        stale.unlink()
    index_file.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    stamp_file.write_text(want)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
