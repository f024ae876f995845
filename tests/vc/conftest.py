"""A sandbox whose agent is a fake (hostile) one on a unix socket: no VM."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from shimv2.vc.testing import FakePod


@pytest.fixture
async def pod(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[FakePod]:
    pod = await FakePod.start(tmp_path, nursery)
    yield pod
    pod.agent.disconnect()
