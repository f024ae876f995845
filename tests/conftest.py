"""Suite-wide setup: the guest image must match the code under test."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def fresh_guest_image() -> None:
    # A no-op in 0.1 s when nothing changed; rebuilds the agent layer when
    # shimv2 changed since scripts/setup ran, so VM tests run this very code.
    subprocess.run([str(ROOT / "scripts" / "build-guest")], check=True, capture_output=True)
