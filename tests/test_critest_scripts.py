"""scripts/oci_image.py and scripts/critest_run.py's pure parts: layers, archives, reports."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import critest_run
import oci_image


def _tree(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "busybox").write_bytes(b"\x7fELF")
    os.chmod(root / "bin" / "busybox", 0o4755)
    os.link(root / "bin" / "busybox", root / "bin" / "ls")
    os.symlink("/bin/busybox", root / "bin" / "sh")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")


def test_a_layer_keeps_hard_links_and_modes_and_is_reproducible(tmp_path: Path) -> None:
    _tree(tmp_path / "a")
    _tree(tmp_path / "b")
    layer = oci_image.layer_from_dir(tmp_path / "a")
    assert layer == oci_image.layer_from_dir(tmp_path / "b")  # same tree, same bytes
    with tarfile.open(fileobj=io.BytesIO(layer.tar)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["bin/busybox"].isfile()
    assert members["bin/busybox"].mode == 0o4755  # setuid kept (nonewprivs)
    assert members["bin/ls"].islnk()  # a hard link: a masked /bin/ls must not follow it
    assert members["bin/ls"].linkname == "bin/busybox"
    assert members["bin/sh"].issym()
    assert members["bin/sh"].linkname == "/bin/busybox"
    assert {m.mtime for m in members.values()} == {oci_image.MTIME}


def test_an_archive_names_each_reference_and_its_id_is_the_config_digest(tmp_path: Path) -> None:
    _tree(tmp_path / "root")
    names = ["registry.k8s.io/pause:3.9", "k8s.gcr.io/pause:3.9"]
    image = oci_image.Image(names, [oci_image.layer_from_dir(tmp_path / "root")], {"User": "1000"})
    image_id = oci_image.write_archive(tmp_path / "out.tar", image)
    with tarfile.open(tmp_path / "out.tar") as tar:

        def read(name: str) -> bytes:
            f = tar.extractfile(name)
            assert f is not None
            return f.read()

        index = json.loads(read("index.json"))
        refs = [m["annotations"]["io.containerd.image.name"] for m in index["manifests"]]
        assert refs == names
        manifest = json.loads(read(f"blobs/sha256/{index['manifests'][0]['digest'][7:]}"))
        assert manifest["config"]["digest"] == image_id
        config = json.loads(read(f"blobs/sha256/{image_id[7:]}"))
    assert config["config"]["User"] == "1000"
    other = oci_image.Image(names, image.layers, {"User": "1002"})
    assert oci_image.write_archive(tmp_path / "other.tar", other) != image_id


@pytest.mark.parametrize(
    ("name", "repo", "tag"),
    [
        ("registry.k8s.io/e2e-test-images/busybox:1.29-2", "e2e-test-images/busybox", "1.29-2"),
        ("gcr.io/k8s-staging-cri-tools/test-image-tag:all", "k8s-staging-cri-tools/test-image-tag",
         "all"),
        ("localhost:5000/pause:3.9", "pause", "3.9"),
    ],
)  # fmt: skip
def test_a_mirror_keeps_the_path_less_the_registry_host(name: str, repo: str, tag: str) -> None:
    assert oci_image.split_reference(name) == (repo, tag)


JUNIT = """<?xml version="1.0" encoding="UTF-8"?>
<testsuites><testsuite name="CRI">
 <testcase name="[BeforeSuite]" status="passed"></testcase>
 <testcase name="[It] [k8s.io] A works" status="passed"></testcase>
 <testcase name="[It] [k8s.io] B differs" status="{b}"><failure message="boom">x</failure>
 </testcase>
 <testcase name="[It] [k8s.io] C skips" status="skipped"><skipped message="skipped - no"/>
 </testcase>
</testsuite></testsuites>
"""


def test_the_report_counts_each_handler_and_lists_what_differs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "runc.xml").write_text(JUNIT.format(b="passed"))
    (tmp_path / "kata-py.xml").write_text(JUNIT.format(b="failed"))
    results = {h: critest_run.read_junit(tmp_path / f"{h}.xml") for h in ("runc", "kata-py")}
    assert set(results["runc"]) == {"[k8s.io] A works", "[k8s.io] B differs", "[k8s.io] C skips"}
    assert critest_run.report(results, tmp_path / "summary.txt") == 1  # kata-py is worse
    out = capsys.readouterr().out
    assert "runc             2       0        1      3" in out
    assert "kata-py          1       1        1      3" in out
    assert "1 specs differ" in out
    assert "kata-py: boom" in out
    # only a spec that the first handler passes and the second does not fails the run
    better = {"runc": results["kata-py"], "kata-py": results["runc"]}
    assert critest_run.report(better, tmp_path / "summary.txt") == 0


def test_a_known_difference_is_reported_but_does_not_fail_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = next(iter(critest_run.KNOWN_DIFFERENCES))
    runc = {name: critest_run.Spec("passed", "")}
    kata = {name: critest_run.Spec("failed", "no way")}
    assert critest_run.report({"runc": runc, "kata-py": kata}, tmp_path / "summary.txt") == 0
    assert "known: docs/differences.md" in capsys.readouterr().out


def test_every_known_difference_is_explained_in_the_docs() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "differences.md").read_text()
    for name, title in critest_run.KNOWN_DIFFERENCES.items():
        assert f"**{title}" in doc, title  # the section giving the reason
        assert f"`{name.removeprefix('[k8s.io] ')}`" in doc, name  # the spec, by name
