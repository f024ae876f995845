"""OCI image archives from directory trees, and a push to a plain-HTTP registry.

Usage: scripts/oci_image.py push ARCHIVE HOST:PORT
    pushes every image named in ARCHIVE's index.json (``io.containerd.image.name``)
    to the registry, under its name less the registry host: mirrors keep the
    path (``registry.k8s.io/pause:3.9`` -> ``HOST:PORT/pause:3.9``).

As a module: ``layer_from_dir`` tars a tree (hard links kept, fixed mtimes and
owners, sorted), ``write_archive`` writes an OCI image layout as one tar that
``ctr images import`` accepts, one index entry per name. Same inputs, same
bytes: the image IDs (config digests) are stable across builds.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MTIME = 946684800  # 2000-01-01, for every entry: reproducible layers
CREATED = "2000-01-01T00:00:00Z"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Layer:
    tar: bytes  # uncompressed: its sha256 is the diff ID
    gz: bytes

    @property
    def diff_id(self) -> str:
        return "sha256:" + hashlib.sha256(self.tar).hexdigest()

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.gz).hexdigest()


def _info(name: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mtime = kind, MTIME
    info.mode = stat.S_IMODE(st.st_mode)  # keeps setuid (nonewprivs)
    info.uid, info.gid = st.st_uid, st.st_gid
    return info


def layer_from_dir(root: Path) -> Layer:
    """The tree under root as a layer; files sharing an inode become tar hard links."""
    raw = io.BytesIO()
    seen: dict[tuple[int, int], str] = {}
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            base = Path(dirpath)
            rel_dir = base.relative_to(root)
            if rel_dir != Path("."):
                tar.addfile(_info(str(rel_dir), base.lstat(), tarfile.DIRTYPE))
            # symlinks to directories show up in dirnames: tar them as links
            for name in sorted(filenames + [d for d in dirnames if (base / d).is_symlink()]):
                path, rel = base / name, str(rel_dir / name) if rel_dir != Path(".") else name
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    info = _info(rel, st, tarfile.SYMTYPE)
                    info.linkname = os.readlink(path)
                    tar.addfile(info)
                elif stat.S_ISREG(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    if st.st_nlink > 1 and key in seen:
                        info = _info(rel, st, tarfile.LNKTYPE)
                        info.linkname = seen[key]
                        tar.addfile(info)
                        continue
                    seen[key] = rel
                    info = _info(rel, st, tarfile.REGTYPE)
                    info.size = st.st_size
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    raise ValueError(f"{path}: only files, links and directories go in a layer")
    data = raw.getvalue()
    return Layer(data, gzip.compress(data, compresslevel=6, mtime=0))


@dataclass
class Image:
    names: list[str]  # full references, e.g. registry.k8s.io/pause:3.9
    layers: list[Layer]
    config: dict[str, Any] = field(default_factory=dict)  # the image config's "config"

    def blobs(self) -> tuple[dict[str, bytes], str, bytes]:
        """(digest -> bytes, manifest digest, manifest bytes)."""
        blobs = {layer.digest: layer.gz for layer in self.layers}
        config = {
            "architecture": "amd64",
            "os": "linux",
            "created": CREATED,
            "config": {"Env": [PATH_ENV], "WorkingDir": "/", **self.config},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in self.layers]},
        }
        config_bytes = json.dumps(config, sort_keys=True).encode()
        config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        blobs[config_digest] = config_bytes
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": CONFIG, "digest": config_digest, "size": len(config_bytes)},
            "layers": [
                {"mediaType": LAYER, "digest": layer.digest, "size": len(layer.gz)}
                for layer in self.layers
            ],
        }
        manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
        manifest_digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
        blobs[manifest_digest] = manifest_bytes
        return blobs, manifest_digest, manifest_bytes


def _add(tar: tarfile.TarFile, name: str, data: bytes | None) -> None:
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid = MTIME, 0, 0
    if data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
    else:
        info.mode, info.size = 0o644, len(data)
        tar.addfile(info, io.BytesIO(data))


def write_archive(out: Path, image: Image) -> str:
    """Write the image as an OCI layout tar (atomically); return its config digest (the ID)."""
    blobs, digest, manifest = image.blobs()
    index = {
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [
            {
                "mediaType": MANIFEST,
                "digest": digest,
                "size": len(manifest),
                "platform": {"architecture": "amd64", "os": "linux"},
                # ctr import names the image after the first; ref.name is the tag
                "annotations": {
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1],
                },
            }
            for name in image.names
        ],
    }
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        _add(tar, "index.json", json.dumps(index, sort_keys=True).encode())
        _add(tar, "blobs", None)
        _add(tar, "blobs/sha256", None)
        for d in sorted(blobs):
            _add(tar, f"blobs/sha256/{d.split(':', 1)[1]}", blobs[d])
    tmp.replace(out)
    return str(json.loads(manifest)["config"]["digest"])


def split_reference(name: str) -> tuple[str, str]:
    """(repository path without the registry host, tag) of a tagged reference."""
    host, _, rest = name.partition("/")
    if not rest or ("." not in host and ":" not in host and host != "localhost"):
        rest = name  # no host part: docker.io style
    repo, _, tag = rest.rpartition(":")
    if not repo or "/" in tag:
        raise ValueError(f"{name}: a tagged reference is needed")
    return repo, tag


def _request(method: str, url: str, data: bytes | None = None, ctype: str = "") -> Any:
    req = urllib.request.Request(url, data=data, method=method)
    if ctype:
        req.add_header("Content-Type", ctype)
    return urllib.request.urlopen(req, timeout=60)


def push(archive: Path, registry: str) -> list[str]:
    """Push each named image of archive to http://registry; return the references pushed."""
    with tarfile.open(archive) as tar:

        def read(name: str) -> bytes:
            f = tar.extractfile(name)
            if f is None:
                raise ValueError(f"{archive}: no {name}")
            return f.read()

        index = json.loads(read("index.json"))
        pushed = []
        for entry in index["manifests"]:
            name = entry["annotations"]["io.containerd.image.name"]
            repo, tag = split_reference(name)
            base = f"http://{registry}/v2/{repo}"
            manifest = read(f"blobs/sha256/{entry['digest'].split(':', 1)[1]}")
            doc = json.loads(manifest)
            for desc in [doc["config"], *doc["layers"]]:
                digest = desc["digest"]
                try:
                    with _request("HEAD", f"{base}/blobs/{digest}"):
                        continue  # already there
                except urllib.error.HTTPError as e:
                    if e.code != 404:
                        raise
                with _request("POST", f"{base}/blobs/uploads/", b"") as resp:
                    location = urllib.parse.urljoin(base, resp.headers["Location"])
                sep = "&" if "?" in location else "?"
                blob = read(f"blobs/sha256/{digest.split(':', 1)[1]}")
                url = f"{location}{sep}digest={urllib.parse.quote(digest)}"
                with _request("PUT", url, blob, "application/octet-stream"):
                    pass
            with _request("PUT", f"{base}/manifests/{tag}", manifest, doc["mediaType"]):
                pushed.append(f"{registry}/{repo}:{tag}")
        return pushed


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "push":
        print(__doc__, file=sys.stderr)
        return 2
    for ref in push(Path(argv[1]), argv[2]):
        print(f"pushed {ref}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
