"""A clean daemon's marker and the ``delete`` that answers from it alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from shimv2.pb.containerd.runtime.task.v2.shim_pb2 import DeleteResponse
from shimv2.shim.clean_exit import MARKER, answer, delete_response, mark
from tests.imports import imported_by, loaded


@pytest.mark.parametrize(
    ("status", "at_ns"),
    [(137, 1_796_204_755_654_126_123), (0, 0), (1, 5), (255, 253_402_300_799_999_999_999)],
)
def test_the_response_is_what_the_generated_class_makes(status: int, at_ns: int) -> None:
    made = DeleteResponse(pid=0, exit_status=status)
    made.exited_at.FromNanoseconds(at_ns)
    assert delete_response(status, at_ns) == made.SerializeToString()
    assert DeleteResponse.FromString(delete_response(status, at_ns)) == made


def _args(*before: str) -> list[str]:
    return ["-namespace", "default", "-address", "/run/cd.sock", "-id", "c1", *before, "delete"]


def test_only_a_marked_bundle_is_answered(tmp_path: Path) -> None:
    bundle, other = tmp_path / "bundle", tmp_path / "other"
    bundle.mkdir()
    other.mkdir()
    assert answer(_args("-bundle", str(bundle)), str(other)) is None  # not marked yet
    mark(str(bundle))
    mark(str(bundle))  # twice is fine
    mark(str(tmp_path / "gone"))  # a bundle containerd removed already: nothing, no error
    assert (bundle / MARKER).is_file()
    for argv, cwd in [
        (_args("-bundle", str(bundle)), str(other)),
        (_args(f"-bundle={bundle}"), str(other)),
        (_args("--bundle", str(bundle)), str(other)),
        (_args("-debug"), str(bundle)),  # no -bundle: containerd's cwd is the bundle
    ]:
        reply = answer(argv, cwd)
        assert reply is not None, argv
        assert DeleteResponse.FromString(reply).exit_status == 137
    # What is not a delete of the marked bundle goes the long way.
    assert answer(_args("-bundle", str(other)), str(bundle)) is None
    assert answer([*_args("-bundle", str(bundle))[:-1], "start"], str(bundle)) is None
    assert answer(["-bundle", "delete"], str(bundle)) is None  # -bundle without its value
    assert answer([], str(bundle)) is None


def test_the_answer_loads_nothing_of_weight(tmp_path: Path) -> None:
    mark(str(tmp_path))
    code = """
from shimv2.shim import run
import io
stdout, sys.stdout = sys.stdout, io.TextIOWrapper(io.BytesIO())  # the response is bytes
assert run(["-id", "c1", "-bundle", sys.argv[1], "delete"]) == 0
assert sys.stdout.buffer.getvalue()
sys.stdout = stdout
"""
    modules = imported_by(code, str(tmp_path))
    assert "shimv2.shim.clean_exit" in modules
    assert not loaded(
        modules, "google.protobuf", "trio", "logging", "shimv2.errdefs", "shimv2.shim.flags"
    )
