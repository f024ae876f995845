"""Suite-wide setup: the guest image must match the code under test; hypothesis profiles."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent

# Property and fuzz tests run a bounded number of examples in the suite ("ci"); scripts/fuzz
# sets KATA_PY_FUZZ=long for a long run (or KATA_PY_FUZZ=<n> for n examples per test).
# No deadline: fuzz examples start trio, servers and sockets, whose time varies with the load.
settings.register_profile(
    "ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "long", max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
_fuzz = os.environ.get("KATA_PY_FUZZ", "")
if _fuzz.isdigit():
    settings.register_profile("long", settings.get_profile("long"), max_examples=int(_fuzz))
settings.load_profile("long" if _fuzz else "ci")


@pytest.fixture(scope="session", autouse=True)
def fresh_guest_image() -> None:
    # A no-op in 0.1 s when nothing changed; rebuilds the agent layer when
    # shimv2 changed since scripts/setup ran, so VM tests run this very code.
    subprocess.run([str(ROOT / "scripts" / "build-guest")], check=True, capture_output=True)
