from __future__ import annotations

import subprocess
import sys

import pytest

from shimv2.errdefs import InvalidArgument
from shimv2.shim.flags import Flags, parse

SHIM = f"{sys.executable.rsplit('/', 1)[0]}/containerd-shim-kata-py-v2"
START = ["-namespace", "k8s.io", "-address", "/run/c.sock", "-publish-binary", "/bin/cd"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            [*START, "-id", "c1", "start"],
            Flags(
                namespace="k8s.io",
                address="/run/c.sock",
                publish_binary="/bin/cd",
                id="c1",
                action="start",
                ttrpc_address="/run/c.sock.ttrpc",
                grpc_address="/run/c.sock",
            ),
        ),
        (
            ["--namespace=ns", "-id=c2", "--debug", "-bundle", "/b", "delete"],
            Flags(namespace="ns", id="c2", debug=True, bundle="/b", action="delete"),
        ),
        (["-debug=false", "-id", "x"], Flags(id="x")),
        (["-debug=true", "-socket", "unix:///s"], Flags(debug=True, socket="unix:///s")),
        (["-v"], Flags(version=True)),
        (["--info"], Flags(info=True)),
        (["-id", "c1", "--", "start"], Flags(id="c1", action="start")),
        # Go stops at the first non-flag: what follows the action is not parsed.
        (["-id", "c1", "start", "-debug"], Flags(id="c1", action="start")),
        (["-id", "-debug"], Flags(id="-debug")),
    ],
)
def test_argv_forms(argv: list[str], expected: Flags) -> None:
    assert parse(argv, {}) == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["-nope", "x"],
        ["-id"],
        ["-debug=maybe"],
        ["-id", "c1", "stop"],
    ],
)
def test_bad_argv(argv: list[str]) -> None:
    with pytest.raises(InvalidArgument):
        parse(argv, {})


def test_environment() -> None:
    env = {
        "TTRPC_ADDRESS": "/run/containerd/containerd.sock.ttrpc",
        "GRPC_ADDRESS": "/run/containerd/containerd.sock",
        "NAMESPACE": "default",
        "MAX_SHIM_VERSION": "2",
    }
    flags = parse(["-id", "c1", "-address", "/other.sock"], env)
    assert flags.ttrpc_address == "/run/containerd/containerd.sock.ttrpc"
    assert flags.grpc_address == "/run/containerd/containerd.sock"
    assert flags.namespace == "default"
    assert flags.max_shim_version == 2
    assert parse(["-namespace", "k8s.io"], env).namespace == "k8s.io"
    with pytest.raises(InvalidArgument):
        parse([], {"MAX_SHIM_VERSION": "two"})


def test_daemon_argv_round_trips() -> None:
    flags = parse([*START, "-id", "c1", "-debug", "start"], {})
    again = parse(flags.daemon_argv("/bundle"), {})
    assert again == Flags(
        namespace="k8s.io",
        address="/run/c.sock",
        publish_binary="/bin/cd",
        id="c1",
        bundle="/bundle",
        debug=True,
        ttrpc_address="/run/c.sock.ttrpc",
        grpc_address="/run/c.sock",
    )


def test_version_flag() -> None:
    out = subprocess.run([SHIM, "-v"], capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout.strip()) == (0, "containerd-shim-kata-py-v2 0.1.0")


def test_bad_flag_is_one_line_on_stderr() -> None:
    out = subprocess.run([SHIM, "-bogus", "start"], capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr.count("\n") == 1
    assert "bogus" in out.stderr
