from __future__ import annotations

import pytest

from shimv2.errdefs import InvalidArgument
from shimv2.vc.ids import NeedContainerID, NeedSandboxID, check_id, container_id, sandbox_id


@pytest.mark.parametrize("good", ["a", "pod-1", "A.b_c-d", "0" * 76, "f" + "x" * 75])
def test_good_ids(good: str) -> None:
    assert check_id(good) == good


@pytest.mark.parametrize(
    "bad",
    ["..", "../etc", "a/b", "/abs", ".hidden", "-x", "_x", "a" * 77, "a b", "é", "a\0b", "a\n"],
)
def test_bad_ids(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid id"):
        check_id(bad)


def test_empty_ids_name_what_is_missing() -> None:
    with pytest.raises(NeedSandboxID, match="need sandbox id"):
        sandbox_id("")
    with pytest.raises(NeedContainerID, match="need container id"):
        container_id("")
    with pytest.raises(InvalidArgument, match="invalid container id"):
        container_id("../x")
